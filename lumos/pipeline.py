"""The whole lumos pipeline on a built-in workload: dense baseline, gated training, compaction,
fine-tuning, measurements and a report. What ``lumos demo`` and ``lumos run`` execute.

Training budget, the same ``2 * epochs + fine_tune_epochs`` epochs for every method (``lumos
bench`` adds the pruning baselines): the dense model trains ``epochs`` epochs (where the pruning
baselines start), then ``epochs + fine_tune_epochs`` more; the gated model trains
``2 * epochs`` epochs from the same initial weights (one run that learns the task and the
structure), is compacted, and the compacted model is fine-tuned ``fine_tune_epochs`` epochs.
Each phase keeps its best epoch on the validation split; every reported metric is on the test
split.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import workloads
from .compact import compact
from .convert import gate
from .evaluation.training import Phase, evaluate_split, train
from .metrics import measure_inference
from .report import Report, count_flops, count_params, report
from .train.distributed import Ranks, check_same_model, distributed_run

LATENCY_ROWS = 4096      # tabular rows per timed forward
LATENCY_SAMPLES = 64     # fields, images or graphs per timed forward


@dataclass
class LumosOutcome:
    """The models and training phases of one lumos run on a workload.

    Attributes:
        work: the workload.
        target, cost: the budget the gated model trained to.
        dense_checkpoint: the dense model after ``epochs`` epochs (where pruning baselines start).
        dense: the dense model after ``2 * epochs + fine_tune_epochs`` epochs (the reference).
        gated: the trained gated model.
        compacted: ``lumos.compact(gated)``, equal to ``gated`` in eval mode.
        fine_tuned: ``compacted`` after fine-tuning (the final model; ``compacted`` itself when
            ``fine_tune_epochs`` is 0).
        report: :func:`lumos.report` of ``gated``.
        phases: ``dense``, ``dense_more``, ``gated``, ``fine_tune`` (those that ran).
    """

    work: workloads.Workload
    target: float
    cost: str
    dense_checkpoint: nn.Module
    dense: nn.Module
    gated: nn.Module
    compacted: nn.Module
    fine_tuned: nn.Module
    report: Report
    phases: dict[str, Phase] = field(default_factory=dict)


def example_inputs(work: workloads.Workload) -> tuple:
    """The inputs ``lumos.gate`` / ``compact`` trace with: 64 training samples."""
    return work.inputs("train", 64)


def inference_inputs(work: workloads.Workload) -> tuple:
    """The batch latency, memory and energy are measured on: up to :data:`LATENCY_ROWS` test rows
    for tabular workloads, :data:`LATENCY_SAMPLES` test samples otherwise."""
    return work.inputs("test", LATENCY_ROWS if work.unit == "row" else LATENCY_SAMPLES)


def sample_count(work: workloads.Workload, inputs: tuple) -> int:
    """How many samples (rows, boxes, graphs...) ``inputs`` of ``work`` hold."""
    return int(inputs[-1].max()) + 1 if work.unit == "graph" else inputs[0].shape[0]


def batch_label(work: workloads.Workload, inputs: tuple) -> str:
    """E.g. ``"4096 rows"``, ``"64 boxes"``."""
    count = sample_count(work, inputs)
    return f"{count} {work.unit}{'es' if work.unit.endswith('x') else 's'}" if count != 1 else f"1 {work.unit}"


def flops_per_sample(work: workloads.Workload, model: nn.Module, inputs: tuple) -> float:
    """FLOPs of ``model`` per sample of ``work`` (``torch.utils.flop_counter``: ops without a FLOP
    formula, such as the GINE message passing, count 0). ``nn.MultiheadAttention``'s fused
    inference path has no FLOP formula either, so it is switched off while counting."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return count_flops(model, inputs) * inputs[0].shape[0] / sample_count(work, inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def phase_checkpoint(folder: str | Path | None, phase: str) -> Path | None:
    """The checkpoint file of a training phase in ``folder`` (created), or None."""
    if folder is None:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"{phase}.pt"


def run_lumos(work: workloads.Workload, *, target: float = 0.2, cost: str = "params", epochs: int | None = None,
              fine_tune_epochs: int | None = None, seed: int = 0, progress: bool = False, log=print,
              checkpoint_dir: str | Path | None = None, fit_options: dict | None = None,
              ranks: Ranks | None = None) -> LumosOutcome:
    """Dense baseline, gated training to ``target``, compaction and fine-tuning on ``work``.

    ``checkpoint_dir``: each training phase checkpoints to ``<phase>.pt`` there (``dense``,
    ``dense_more``, ``gated``, ``fine_tune``) and a rerun resumes from them. ``fit_options``: more
    :func:`lumos.fit` arguments (``precision``, ``compile``, ``checkpoint_every``). ``ranks``: train
    data-parallel under torchrun (:mod:`lumos.train.distributed`); the returned models are on CPU.
    """
    epochs = epochs if epochs is not None else work.fit_defaults["epochs"]
    fine_tune_epochs = fine_tune_epochs if fine_tune_epochs is not None else work.fit_defaults["fine_tune_epochs"]
    if epochs < 1 or fine_tune_epochs < 0:
        raise ValueError(f"lumos.pipeline.run_lumos: need epochs >= 1 and fine_tune_epochs >= 0, "
                         f"got {epochs} and {fine_tune_epochs}")
    example = example_inputs(work)
    device = ranks.device if ranks is not None else torch.device("cpu")
    phases = {}

    def run_phase(model, phase, n_epochs, **kwargs):
        options = {**(fit_options or {}), "checkpoint": phase_checkpoint(checkpoint_dir, phase)}
        if ranks is not None:
            options["distributed"] = True
        phases[phase] = train(model, work, n_epochs, progress=progress, fit_options=options, **kwargs)

    log(f"[1/4] dense baseline on {work.name} ({work.size}): {epochs} + {epochs + fine_tune_epochs} epochs")
    torch.manual_seed(seed)
    dense = work.make_model().to(device)
    run_phase(dense, "dense", epochs, name="dense", seed=seed)
    checkpoint = copy.deepcopy(dense).cpu()
    run_phase(dense, "dense_more", epochs + fine_tune_epochs, name="dense (more)", seed=seed + 1)

    log(f"[2/4] gated model (target: keep {target:.0%} of {cost}): {2 * epochs} epochs")
    torch.manual_seed(seed)
    gated = gate(work.make_model(), example, feature_names=work.feature_names, feature_dim=work.feature_dim)
    run_phase(gated.to(device), "gated", 2 * epochs, name="gated", seed=seed, target=target, cost=cost)
    dense, gated = dense.cpu(), gated.cpu()  # compaction and the CPU measurements

    log("[3/4] compacting")
    compacted = compact(gated, example)
    rep = report(gated, example)
    if ranks is not None:
        check_same_model(compacted, ranks, "lumos.pipeline.run_lumos")
    fine_tuned = compacted
    if fine_tune_epochs:
        log(f"[4/4] fine-tuning the compacted model: {fine_tune_epochs} epochs")
        fine_tuned = copy.deepcopy(compacted).to(device)
        run_phase(fine_tuned, "fine_tune", fine_tune_epochs, name="fine-tune", seed=seed + 1)
        fine_tuned = fine_tuned.cpu()
    return LumosOutcome(work, target, cost, checkpoint, dense, gated, compacted, fine_tuned, rep, phases)


def speed_text(dense_ms: float, model_ms: float) -> str:
    """``"2.31x faster"`` or ``"1.25x slower"``: how ``model_ms`` compares with ``dense_ms``."""
    ratio = dense_ms / max(model_ms, 1e-12)
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


@dataclass
class PipelineResult:
    """Everything ``lumos run`` measured, plus the models.

    ``metrics`` holds the test metric of ``dense``, ``gated``, ``compacted`` and ``fine_tuned``;
    ``inference`` the :func:`lumos.metrics.measure_inference` dicts of ``dense`` and
    ``fine_tuned`` on ``batch`` (e.g. ``"4096 rows"``); ``train_seconds`` the wall time of each
    phase; ``files`` the paths written.
    """

    workload: str
    size: str
    target: float
    cost: str
    report: Report
    metric_name: str
    higher_is_better: bool
    metrics: dict
    inference: dict
    batch: str
    unit: str
    params: dict
    flops: dict
    train_seconds: dict
    history: dict
    files: list[str] = field(default_factory=list)
    models: dict = field(default_factory=dict, repr=False)

    def summary_rows(self) -> list[tuple[str, str, str]]:
        r = self.report
        widths_before = " x ".join(str(l["width_before"]) for l in r.layers)
        widths_after = " x ".join(str(l["width_after"]) for l in r.layers)
        dense_inf, small_inf = self.inference["dense"], self.inference["fine_tuned"]
        # the fine-tuned model was timed in alternation with the dense one: compare those two runs
        dense_ms, small_ms = small_inf["reference_latency"]["median_ms"], small_inf["latency"]["median_ms"]
        m = self.metrics
        dense_time = self.train_seconds["dense"] + self.train_seconds["dense_more"]
        lumos_time = self.train_seconds["gated"] + self.train_seconds.get("fine_tune", 0.0)
        rows = [
            ("input features kept", f"{len(r.kept_features)}/{len(r.features)}", ", ".join(r.kept_features)),
            ("features dropped", str(len(r.dropped_features)), ", ".join(r.dropped_features)),
            ("layer widths", widths_before, widths_after),
            ("parameters", f"{self.params['dense']:,}", f"{self.params['lumos']:,} "
                                                       f"({self.params['lumos'] / self.params['dense']:.1%} kept)"),
            (f"FLOPs per {self.unit}", f"{self.flops['dense']:,.0f}",
             f"{self.flops['lumos']:,.0f} ({self.flops['lumos'] / max(self.flops['dense'], 1):.1%} kept)"),
            (f"test {self.metric_name} dense / gated = compacted / fine-tuned", f"{m['dense']:.4g}",
             f"{m['gated']:.4g} = {m['compacted']:.4g} / {m['fine_tuned']:.4g}"),
            (f"CPU latency (median of {dense_inf['latency']['repeats']}, {self.batch}, "
             f"{dense_inf['latency']['threads']} threads)", f"{dense_ms:.3f} ms",
             f"{small_ms:.3f} ms ({speed_text(dense_ms, small_ms)})"),
            (f"peak memory of a forward ({dense_inf['memory']['method']})", _mb(dense_inf["memory"]["bytes"]),
             _mb(small_inf["memory"]["bytes"])),
            (f"energy per forward ({dense_inf['energy']['method']})", _joules(dense_inf["energy"]["joules"]),
             _joules(small_inf["energy"]["joules"])),
            ("training wall time (dense: both phases; lumos: gated + fine-tune)", f"{dense_time:.1f} s",
             f"{lumos_time:.1f} s ({lumos_time / max(dense_time, 1e-9):.2f}x dense)"),
        ]
        return rows

    def table(self) -> str:
        rows = [("", "dense", "lumos")] + self.summary_rows()
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "workload": self.workload, "size": self.size, "target": self.target, "cost": self.cost,
            "metric_name": self.metric_name, "higher_is_better": self.higher_is_better, "metric": self.metrics,
            "inference": self.inference, "batch": self.batch, "unit": self.unit, "params": self.params, "flops": self.flops,
            "train_seconds": self.train_seconds, "history": self.history, "report": self.report.to_dict(),
        }


def _mb(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f} MiB"


def _joules(joules: float | None) -> str:
    return "n/a" if joules is None else f"{joules:.4g} J"


def plot_training(phases: dict[str, Phase], metric_name: str, path: str | Path) -> Path:
    """Save a PNG of the training curves: loss, validation metric and kept fraction per epoch, the
    dense phases and the lumos phases (gated, then fine-tune) each on one continuing line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plot_training needs matplotlib: pip install 'lumos[plot]'") from err
    lines = {"dense": [p for k, p in phases.items() if k.startswith("dense")],
             "lumos": [p for k, p in phases.items() if k in ("gated", "fine_tune")]}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    for label, group in lines.items():
        rows = [row for phase in group for row in phase.history.epochs]
        epochs = list(range(1, len(rows) + 1))
        axes[0].plot(epochs, [r["train_loss"] for r in rows], label=f"{label} train")
        axes[0].plot(epochs, [r.get("val_loss") for r in rows], "--", label=f"{label} val")
        axes[1].plot(epochs, [r.get("val_metric") for r in rows], label=label)
        axes[2].plot(epochs, [r.get("kept_fraction", 1.0 if label == "dense" else None) for r in rows], label=label)
        if label == "lumos" and len(group) > 1:
            for ax in axes:
                ax.axvline(len(group[0].history.epochs) + 0.5, color="gray", lw=0.8, ls=":")
    axes[0].set_yscale("log")
    for ax, title in zip(axes, ("loss", f"validation {metric_name}", "kept fraction (eval masks)")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[2].set_ylim(0, 1.05)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def measure(outcome: LumosOutcome, repeats: int = 50) -> PipelineResult:
    """Test metrics, sizes and inference measurements of a :class:`LumosOutcome`."""
    work = outcome.work
    batch = inference_inputs(work)
    metric = lambda model: evaluate_split(model, work, "test")  # noqa: E731
    example = example_inputs(work)
    return PipelineResult(
        workload=work.name, size=work.size, target=outcome.target, cost=outcome.cost, report=outcome.report,
        metric_name=work.metric_name, higher_is_better=work.higher_is_better,
        metrics={"dense": metric(outcome.dense), "gated": metric(outcome.gated),
                 "compacted": metric(outcome.compacted), "fine_tuned": metric(outcome.fine_tuned)},
        inference={"dense": measure_inference(outcome.dense, batch, repeats),
                   "fine_tuned": measure_inference(outcome.fine_tuned, batch, repeats, reference=outcome.dense)},
        batch=batch_label(work, batch), unit=work.unit,
        params={"dense": count_params(outcome.dense), "lumos": count_params(outcome.fine_tuned)},
        flops={"dense": flops_per_sample(work, outcome.dense, example),
               "lumos": flops_per_sample(work, outcome.fine_tuned, example)},
        train_seconds={name: phase.seconds for name, phase in outcome.phases.items()},
        history={name: phase.history.epochs for name, phase in outcome.phases.items()},
        models={"dense": outcome.dense, "gated": outcome.gated, "compacted": outcome.compacted,
                "fine_tuned": outcome.fine_tuned},
    )


def write_report(result: PipelineResult, phases: dict[str, Phase], out_dir: str | Path, log=print) -> list[str]:
    """Write ``report.md``, ``report.json`` and, with matplotlib, ``report.png`` and
    ``training.png`` into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    (out / "report.md").write_text(f"# lumos report: {result.workload} ({result.size})\n\n```\n{result.table()}\n```\n\n"
                                   + result.report.to_markdown())
    written.append(out / "report.md")
    (out / "report.json").write_text(json.dumps(result.to_dict(), indent=2))
    written.append(out / "report.json")
    for name, draw in (("report.png", lambda p: result.report.plot(p)),
                       ("training.png", lambda p: plot_training(phases, result.metric_name, p))):
        try:
            written.append(draw(out / name))
        except ImportError as err:
            log(f"(no {name}: {err})")
    return [str(p) for p in written]


def run_workload(name: str = "cfd_flux", *, size: str = "full", target: float = 0.2, cost: str = "params",
                 epochs: int | None = None, fine_tune_epochs: int | None = None, seed: int = 0,
                 out_dir: str | Path | None = "lumos-demo", latency_repeats: int = 50, progress: bool = True,
                 log=print, checkpoint_dir: str | Path | None = None,
                 fit_options: dict | None = None) -> PipelineResult | None:
    """Run the pipeline on built-in workload ``name`` and write its report into ``out_dir``.

    Args:
        name, size, seed: the workload (:func:`lumos.workloads.load`).
        target, cost: keep this fraction of the dense model's ``cost`` (``"params"``, ``"flops"``
            or ``"count"``).
        epochs, fine_tune_epochs: the training budget, ``2 * epochs + fine_tune_epochs`` epochs per
            model (default: the workload's; see the module docstring).
        out_dir: folder for ``report.md``, ``report.json``, ``report.png``, ``training.png``
            (None: write nothing).
        latency_repeats: timed forwards per model.
        checkpoint_dir, fit_options: see :func:`run_lumos`.

    Under ``torchrun`` the training is data-parallel; every rank checks that it compacted to the
    same model, rank 0 measures and writes the report, and the other ranks return None.
    """
    ranks = distributed_run()
    main = ranks is None or ranks.main
    log = log if main else (lambda *args, **kwargs: None)
    work = workloads.load(name, size, seed=seed)
    outcome = run_lumos(work, target=target, cost=cost, epochs=epochs, fine_tune_epochs=fine_tune_epochs,
                        seed=seed, progress=progress and main, log=log, checkpoint_dir=checkpoint_dir,
                        fit_options=fit_options, ranks=ranks)
    if not main:
        return None
    log("measuring")
    result = measure(outcome, latency_repeats)
    if out_dir is not None:
        result.files = write_report(result, outcome.phases, out_dir, log)
    return result
