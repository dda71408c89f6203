"""The whole lumos pipeline on a built-in workload: dense baseline, gated training, compaction,
measurements and a report. What ``lumos demo`` and ``lumos run`` execute."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import workloads
from .compact import compact
from .convert import gate
from .metrics import latency
from .report import Report, count_params, report
from .train import evaluate, fit
from .train.distributed import check_same_model, distributed_run


@dataclass
class PipelineResult:
    """Everything ``lumos run`` measured, plus the models."""

    workload: str
    target: float
    report: Report
    metric_name: str
    metric_dense: float
    metric_gated: float
    metric_compacted: float
    latency_dense: dict
    latency_compacted: dict
    params_dense: int
    params_compacted: int
    models: dict = field(default_factory=dict, repr=False)

    def summary_rows(self) -> list[tuple[str, str, str]]:
        r = self.report
        widths_before = " x ".join(str(l["width_before"]) for l in r.layers)
        widths_after = " x ".join(str(l["width_after"]) for l in r.layers)
        speedup = self.latency_dense["median_ms"] / max(self.latency_compacted["median_ms"], 1e-9)
        return [
            ("input features kept", f"{len(r.kept_features)}/{len(r.features)}", ", ".join(r.kept_features)),
            ("features dropped", str(len(r.dropped_features)), ", ".join(r.dropped_features)),
            ("layer widths", widths_before, widths_after),
            ("parameters", f"{self.params_dense:,}", f"{self.params_compacted:,} "
                                                     f"({1 - self.params_compacted / self.params_dense:.1%} fewer)"),
            ("FLOPs per row", f"{r.flops_before:,.0f}", f"{r.flops_after:,.0f} "
                                                        f"({1 - r.flops_after / max(r.flops_before, 1):.1%} fewer)"),
            (f"validation {self.metric_name} dense / gated / compacted",
             f"{self.metric_dense:.4f}", f"{self.metric_gated:.4f} / {self.metric_compacted:.4f}"),
            (f"CPU latency dense / compacted (median of {self.latency_dense['repeats']}, "
             f"{self.latency_dense['threads']} threads)",
             f"{self.latency_dense['median_ms']:.3f} ms",
             f"{self.latency_compacted['median_ms']:.3f} ms ({speedup:.2f}x faster)"),
        ]

    def table(self) -> str:
        rows = [("", "dense", "lumos")] + self.summary_rows()
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "workload": self.workload, "target": self.target, "metric_name": self.metric_name,
            "metric": {"dense": self.metric_dense, "gated": self.metric_gated, "compacted": self.metric_compacted},
            "latency_ms": {"dense": self.latency_dense, "compacted": self.latency_compacted},
            "params": {"dense": self.params_dense, "compacted": self.params_compacted},
            "report": self.report.to_dict(),
        }


def phase_checkpoint(folder: str | Path | None, phase: str) -> Path | None:
    """The checkpoint file of a training phase in ``folder`` (created), or None."""
    if folder is None:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"{phase}.pt"


def run_workload(name: str = "cfd_flux", *, target: float = 0.2, cost: str = "params",
                 dense_epochs: int | None = None, gated_epochs: int | None = None, seed: int = 0,
                 out_dir: str | Path | None = "lumos-demo", latency_rows: int = 4096,
                 latency_repeats: int = 50, progress: bool = True, log=print, checkpoint_dir: str | Path | None = None,
                 fit_options: dict | None = None) -> PipelineResult | None:
    """Train dense and gated models on workload ``name``, compact, measure, and write a report.

    Writes ``report.md``, ``report.json`` and ``report.png`` into ``out_dir`` (unless None).
    ``checkpoint_dir``: each training phase checkpoints to ``<phase>.pt`` there, and a rerun
    resumes from them. ``fit_options``: more :func:`lumos.fit` arguments (``precision``,
    ``compile``, ``checkpoint_every``...). Under ``torchrun`` the training is data-parallel
    (:mod:`lumos.train.distributed`); rank 0 measures and writes the report, and the other
    ranks return None once they checked that they built the same compacted model.
    """
    ranks = distributed_run()
    main = ranks is None or ranks.main
    log = log if main else (lambda *args, **kwargs: None)
    work = workloads.load(name, seed=seed)
    defaults = dict(work.fit_defaults)
    dense_epochs = dense_epochs or defaults.pop("epochs", 20)
    defaults.pop("epochs", None)
    gated_epochs = gated_epochs or 2 * dense_epochs
    common = dict(loss_fn=work.loss_fn, metric=work.metric, progress=progress and main, seed=seed, **defaults,
                  **(fit_options or {}), distributed=ranks is not None)
    example = work.train[0][:64]
    device = ranks.device if ranks is not None else torch.device("cpu")

    log(f"[1/4] dense baseline on {name}: {dense_epochs} epochs")
    torch.manual_seed(seed)
    dense = work.make_model().to(device)
    fit(dense, work.train, work.val, epochs=dense_epochs, description="dense",
        checkpoint=phase_checkpoint(checkpoint_dir, "dense"), **common)

    log(f"[2/4] gated model (target: keep {target:.0%} of {cost}): {gated_epochs} epochs")
    torch.manual_seed(seed)
    gated = gate(work.make_model(), example, feature_names=work.feature_names).to(device)
    fit(gated, work.train, work.val, epochs=gated_epochs, target=target, cost=cost,
        description="gated", checkpoint=phase_checkpoint(checkpoint_dir, "gated"), **common)
    dense, gated = dense.cpu(), gated.cpu()  # compaction and the CPU measurements

    log("[3/4] compacting")
    compacted = compact(gated, example)
    rep = report(gated, example)
    if ranks is not None:
        check_same_model(compacted, ranks, "lumos.pipeline.run_workload")
        if not ranks.main:
            return None

    log("[4/4] measuring")
    metric = lambda model: evaluate(model, work.val, work.loss_fn, work.metric)[1]  # noqa: E731
    rows = work.val[0][:latency_rows]
    result = PipelineResult(
        workload=name, target=target, report=rep, metric_name=work.metric_name,
        metric_dense=metric(dense), metric_gated=metric(gated), metric_compacted=metric(compacted),
        latency_dense=latency(dense, rows, repeats=latency_repeats),
        latency_compacted=latency(compacted, rows, repeats=latency_repeats),
        params_dense=count_params(dense), params_compacted=count_params(compacted),
        models={"dense": dense, "gated": gated, "compacted": compacted},
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(f"# lumos report: {name}\n\n```\n{result.table()}\n```\n\n"
                                       + rep.to_markdown())
        (out / "report.json").write_text(json.dumps(result.to_dict(), indent=2))
        try:
            rep.plot(out / "report.png")
        except ImportError as err:
            log(f"(no report.png: {err})")
    return result
