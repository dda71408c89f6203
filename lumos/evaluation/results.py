"""Write ``lumos bench`` results: ``results.json`` (every row), ``results.md`` (tables and the
acceptance check of issue 12), ``results.png`` (metric against kept parameters per workload)."""
from __future__ import annotations

import datetime
import json
import statistics
from pathlib import Path

from .. import workloads

MAX_PARAMS_KEPT = 0.30   # issue 12, acceptance 3
MAX_RELATIVE_LOSS = 0.01


def _pct(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def _num(value, fmt: str = ".4g") -> str:
    return "n/a" if value is None else format(value, fmt)


def _features(row: dict) -> str:
    kept = row.get("features_kept")
    if kept is None:
        return "n/a"
    relevant = set(row["relevant_features"] or ())
    dropped_relevant = sorted(relevant - set(kept))
    kept_distractors = sorted(set(kept) - relevant)
    text = f"{len(kept)}"
    if dropped_relevant:
        text += f"; lost {', '.join(dropped_relevant)}"
    if kept_distractors:
        text += f"; kept {len(kept_distractors)} distractor(s)"
    return text + (" (exact)" if row.get("features_correct") else "")


def method_table(rows: list[dict]) -> list[str]:
    """Markdown table of the rows of one (workload, seed, target)."""
    first = rows[0]
    lines = [f"| method | params kept | FLOPs kept | test {first['metric_name']} | loss vs dense | CPU speedup | "
             "train time | features kept | peak memory | energy/forward | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        if r["skipped"]:
            lines.append(f"| {r['method']} | | | | | | | | | | skipped: {r['skipped']} |")
            continue
        memory = "n/a" if r.get("peak_memory_bytes") is None else f"{r['peak_memory_bytes'] / 2**20:.1f} MiB"
        energy = "n/a" if r.get("energy_j") is None else f"{r['energy_j']:.3g} J"
        lines.append(
            f"| {r['method']} | {_pct(r['params_kept'])} | {_pct(r['flops_kept'])} | {_num(r['metric'])} | "
            f"{_pct(r.get('relative_loss'), 2)} | {_num(r['cpu_speedup'], '.2f')}x | "
            f"{_num(r['train_time_ratio'], '.2f')}x | {_features(r)} | {memory} | {energy} | {r['note']} |")
    return lines


def acceptance(rows: list[dict]) -> list[dict]:
    """Issue 12's acceptance 3 and 4 for every lumos row: kept params <= 30%, relative loss <= 1%,
    metric at least every baseline's, relevant features kept and distractors dropped."""
    checks = []
    for r in rows:
        if r["method"] != "lumos" or r["skipped"]:
            continue
        peers = [p for p in rows if (p["workload"], p["seed"], p["target"]) == (r["workload"], r["seed"], r["target"])
                 and p["method"] not in ("dense", "lumos") and not p["skipped"]]
        sign = 1 if r["higher_is_better"] else -1
        beaten_by = [f"{p['method']} {p['metric']:.4g}" for p in peers if sign * (p["metric"] - r["metric"]) > 0]
        checks.append({
            "workload": r["workload"], "seed": r["seed"], "target": r["target"],
            "params_kept": r["params_kept"], "params_ok": r["params_kept"] <= MAX_PARAMS_KEPT,
            "relative_loss": r["relative_loss"], "loss_ok": r["relative_loss"] <= MAX_RELATIVE_LOSS,
            "baselines": [p["method"] for p in peers], "beaten_by": beaten_by,
            "features_ok": r["features_correct"], "features_kept": r["features_kept"],
        })
    return checks


def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _load(values) -> str:
    return "not recorded" if values is None else " / ".join(f"{v:.2f}" for v in values)


def run_header(run: dict) -> list[str]:
    """Markdown lines with one ``lumos bench`` run's command, end time (``date``), wall time,
    load average and machine."""
    m, load = run["machine"], run.get("load_average")
    load_text = ("load average not recorded" if load is None else
                 f"load average (1 / 5 / 15 min) {_load(load['start'])} at start, {_load(load['end'])} at end")
    return [f"Command: `{run['command']}`  ",
            f"Finished: {run['date']}; wall time {run['wall_seconds'] / 60:.1f} min; {load_text}  ",
            f"Machine: {m['processor']}, {m['platform']}, torch {m['torch']}, {m['threads']} threads"]


def to_markdown(results: dict) -> str:
    """The whole ``results.md``."""
    rows = results["rows"]
    lines = [f"# lumos bench ({results['size']})", ""]
    if results.get("note"):
        lines += [f"**{results['note']}**", ""]
    if "parts" in results:
        lines += [f"Merged from {len(results['parts'])} runs of `lumos bench` by `{results['command']}`; "
                  "each run's command, date, wall time, load and machine:", ""]
        for i, part in enumerate(results["parts"], 1):
            lines += [f"**Run {i}**: {', '.join(part['workloads'])}; size {part['size']}; seeds "
                      f"{', '.join(map(str, part['seeds']))}  "]
            if part.get("note"):
                lines += [f"{part['note']}  "]
            lines += run_header(part) + [""]
    else:
        lines += run_header(results) + [""]
    lines += [f"Protocol: {results['protocol']}", "",
             "Columns: params/FLOPs kept are fractions of the dense model (FLOPs by "
             "`torch.utils.flop_counter`, per sample; unstructured masks execute every dense FLOP); "
             "loss vs dense is the relative change of the test metric (positive: worse); CPU speedup is "
             "dense latency / method latency (median, batch in each workload's heading); train time is the "
             "method's training wall time / the dense model's (both its phases); peak memory is weights + "
             "inputs + the peak the forward allocates (method in results.json); energy comes from a "
             "hardware counter or is n/a, never estimated.", ""]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["seed"], r["target"]), []).append(r)
    for (name, seed, target), group in groups.items():
        batch = next((r.get("latency_batch") for r in group if r.get("latency_batch")), "n/a")
        threads = next((r.get("threads") for r in group if r.get("threads")), "n/a")
        lines += [f"## {name}: {workloads.describe(name)}", "",
                  f"seed {seed}, lumos target {target:.0%} of parameters; latency batch {batch}, "
                  f"{threads} threads; relevant inputs: {', '.join(group[0]['relevant_features'] or ['n/a'])}", ""]
        lines += method_table(group) + [""]
    checks = acceptance(rows)
    lines += ["## Acceptance check (issue 12: lumos keeps <= 30% of parameters, loses <= 1% vs dense, "
              "is at least every baseline, keeps exactly the relevant inputs)", "",
              "| workload | seed | target | params kept <= 30% | loss <= 1% | >= every baseline | exact features |",
              "|---|---:|---:|---|---|---|---|"]
    for c in checks:
        if not c["baselines"]:
            versus = "n/a (no baseline ran)"
        elif c["beaten_by"]:
            versus = f"**no** (below {', '.join(c['beaten_by'])})"
        else:
            versus = "yes"
        lines.append(f"| {c['workload']} | {c['seed']} | {c['target']:.0%} | {_mark(c['params_ok'])} "
                     f"({_pct(c['params_kept'])}) | {_mark(c['loss_ok'])} ({_pct(c['relative_loss'], 2)}) | "
                     f"{versus} | {_mark(c['features_ok'])} |")
    skipped = [r for r in rows if r["skipped"]]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {r['workload']} / {r['method']}: {r['skipped']}" for r in skipped]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str | Path) -> Path:
    """Metric against kept parameters, one panel per workload, one line per method (through its
    targets, averaged over seeds); the dense metric as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if not r["skipped"]]
    names = list(dict.fromkeys(r["workload"] for r in rows))
    cols = min(3, len(names)) or 1
    n_rows = (len(names) + cols - 1) // cols or 1
    fig, axes = plt.subplots(n_rows, cols, figsize=(5 * cols, 4 * n_rows), squeeze=False, constrained_layout=True)
    for ax, name in zip(axes.flat, names):
        mine = [r for r in rows if r["workload"] == name]
        for method in dict.fromkeys(r["method"] for r in mine):
            points: dict[float, list[tuple[float, float]]] = {}
            for r in mine:
                if r["method"] == method:
                    points.setdefault(r["target"], []).append((r["params_kept"], r["metric"]))
            xy = sorted((statistics.mean(p[0] for p in v), statistics.mean(p[1] for p in v)) for v in points.values())
            if method == "dense":
                ax.axhline(xy[0][1], color="black", ls="--", lw=1)
                ax.plot([1.0], [xy[0][1]], "ks", label="dense")
                continue
            ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", label=method)
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("parameters kept (fraction of dense)")
        ax.set_ylabel(f"test {mine[0]['metric_name']}" + ("" if mine[0]["higher_is_better"] else " (lower is better)"))
        ax.set_title(name)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


RUN_KEYS = ("command", "note", "size", "seeds", "targets", "date", "wall_seconds", "machine", "load_average")


def merge_results(parts: list[dict], *, command: str = "", note: str = "") -> dict:
    """One results dict from several ``lumos bench`` results (e.g. each workload run on its own):
    every row, rows ordered by workload; ``parts`` keeps each run's command, date, wall time, load
    average and machine (a part that is itself merged contributes its own parts).

    Raises:
        ValueError: no parts, parts written under different protocols, or the same (workload, size,
            seed, target) in two parts.
    """
    if not parts:
        raise ValueError("lumos.evaluation.merge_results: parts is empty; expected one or more results dicts")
    protocols = {part["protocol"] for part in parts}
    if len(protocols) > 1:
        raise ValueError("lumos.evaluation.merge_results: the parts were run under different protocols "
                         f"({len(protocols)} distinct); their rows cannot share one table")
    runs, rows, seen = [], [], {}
    for index, part in enumerate(parts):
        for run in part.get("parts") or [{k: part.get(k) for k in RUN_KEYS}
                                         | {"workloads": list(dict.fromkeys(r["workload"] for r in part["rows"]))}]:
            runs.append(run)
        for key in dict.fromkeys((r["workload"], r["size"], r["seed"], r["target"]) for r in part["rows"]):
            if key in seen:
                raise ValueError(f"lumos.evaluation.merge_results: workload {key[0]} size {key[1]} seed {key[2]} "
                                 f"target {key[3]} is in parts {seen[key]} and {index}; each may appear once")
            seen[key] = index
        rows += part["rows"]
    order = {name: i for i, name in enumerate(workloads.available())}
    rows.sort(key=lambda r: order.get(r["workload"], len(order)))  # stable: seeds and methods keep their order
    return {"command": command, "note": note, "size": ", ".join(dict.fromkeys(r["size"] for r in rows)),
            "seeds": sorted({r["seed"] for r in rows}), "targets": sorted({r["target"] for r in rows}),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": sum(run["wall_seconds"] for run in runs), "protocol": protocols.pop(),
            "parts": runs, "rows": rows}


def write_results(results: dict, out_dir: str | Path, log=print) -> list[str]:
    """Write ``results.json``, ``results.md`` and (with matplotlib) ``results.png``; the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "acceptance": acceptance(results["rows"])}
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps({k: v for k, v in results.items() if k != "files"}, indent=2))
    written[1].write_text(to_markdown(results))
    try:
        written.append(plot(results, out / "results.png"))
    except ImportError as err:
        log(f"(no results.png: matplotlib is missing: {err}; pip install 'lumos[plot]')")
    return [str(p) for p in written]
