"""lumos.report: what the gates decided (features, widths) and what compaction will save."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .gates import HardConcreteGate
from .model import as_input_tuple, has_feature_gate
from .nn import FeatureGate
from .plan import check_gates, check_not_meta, default_inputs, plan_model
from .plan.record import count_params


def count_flops(model: nn.Module, example_inputs: tuple) -> float:
    """FLOPs of one forward of ``model`` in eval mode, per row of the first input."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*example_inputs)
    model.train(was_training)
    first = example_inputs[0]
    rows = first.shape[0] if first.dim() > 1 else 1
    return counter.get_total_flops() / rows


@dataclass
class Report:
    """Kept features and widths of a gated model, and its size before and after compaction.

    Attributes:
        features: one dict per input feature: ``name``, ``p_open``, ``kept``.
        layers: one dict per layer with a width (linear, conv...): ``name``, ``width_before``,
            ``width_after``, ``gated``, ``gate_of`` (the layer whose output gate it shares,
            :func:`lumos.gate`'s ``share_gates``, or None).
        params_before, params_after: parameters of the dense model and of the compacted one
            (predicted from the channel plan, without building it).
        flops_before, flops_after: FLOPs per input row of the linear, convolution and attention
            layers (2 per multiply-add, what ``torch.utils.flop_counter`` counts for them) at the
            dense and at the kept widths, from the channel plan; the few small products a
            compacted model adds (constants at zero-padded borders, norm statistics) are not counted.
        skipped: layers left ungated, with the reason.
    """

    features: list[dict] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    flops_before: float = 0.0
    flops_after: float = 0.0
    skipped: dict = field(default_factory=dict)

    @property
    def kept_features(self) -> list[str]:
        return [f["name"] for f in self.features if f["kept"]]

    @property
    def dropped_features(self) -> list[str]:
        return [f["name"] for f in self.features if not f["kept"]]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["kept_features"] = self.kept_features
        return data

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON text (also written to ``path`` if given)."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_markdown(self) -> str:
        """A human-readable summary: features, widths, params and FLOPs."""
        lines = ["## Input features", ""]
        if self.features:
            lines += [f"Kept {len(self.kept_features)} of {len(self.features)}: "
                      f"{', '.join(self.kept_features) or '(none)'}", "",
                      "| feature | p_open | kept |", "|---|---:|:---:|"]
            lines += [f"| {f['name']} | {f['p_open']:.3f} | {'yes' if f['kept'] else 'no'} |" for f in self.features]
        else:
            lines.append("No feature gate.")
        lines += ["", "## Layer widths", "", "| layer | before | after | gated |", "|---|---:|---:|:---:|"]
        lines += [f"| {l['name']} | {l['width_before']} | {l['width_after']} | {_gated_cell(l)} |" for l in self.layers]
        lines += ["", "## Size", "", "| | before | after | kept |", "|---|---:|---:|---:|",
                  f"| parameters | {self.params_before:,} | {self.params_after:,} | "
                  f"{self.params_after / max(self.params_before, 1):.1%} |",
                  f"| FLOPs per row | {self.flops_before:,.0f} | {self.flops_after:,.0f} | "
                  f"{self.flops_after / max(self.flops_before, 1):.1%} |"]
        if self.skipped:
            lines += ["", "Left ungated: " + "; ".join(f"`{k}` ({v})" for k, v in self.skipped.items())]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """Save a PNG: gate probability per input feature, and kept width per layer."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("Report.plot needs matplotlib: pip install 'lumos[plot]'") from err
        fig, (ax_f, ax_l) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
        if self.features:
            names = [f["name"] for f in self.features]
            colors = ["tab:green" if f["kept"] else "tab:gray" for f in self.features]
            ax_f.bar(range(len(names)), [f["p_open"] for f in self.features], color=colors)
            ax_f.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
            ax_f.set_ylim(0, 1.02)
            ax_f.set_ylabel("p_open (gate probability)")
            ax_f.set_title(f"Input features: kept {len(self.kept_features)}/{len(names)} (green)")
        else:
            ax_f.text(0.5, 0.5, "no feature gate", ha="center", va="center")
        names = [l["name"] for l in self.layers]
        pos = torch.arange(len(names)).tolist()
        ax_l.bar([p - 0.2 for p in pos], [l["width_before"] for l in self.layers], width=0.4,
                 label="before", color="tab:blue", alpha=0.5)
        ax_l.bar([p + 0.2 for p in pos], [l["width_after"] for l in self.layers], width=0.4,
                 label="after", color="tab:orange")
        ax_l.set_xticks(pos, names, rotation=30, ha="right", fontsize=8)
        ax_l.set_ylabel("output width")
        ax_l.set_title(f"Layer widths: params {self.params_after:,} / {self.params_before:,}")
        ax_l.legend()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _gated_cell(layer: dict) -> str:
    """The "gated" column of a layer row: no, yes, or whose shared gate it uses."""
    if layer.get("gate_of"):
        return f"yes, the gate of {layer['gate_of']}"
    return "yes" if layer["gated"] else "no"


def report(gated: nn.Module, example_inputs=None, *, leaf_modules=None) -> Report:
    """What the gates of ``gated`` decide, in eval mode: kept features (with their ``p_open``),
    width of every layer before and after, parameters and FLOPs before and after.

    Everything is read from the channel plan (nothing is built); :func:`lumos.compact` builds
    exactly ``params_after`` parameters. Refuses gates whose ``log_alpha`` holds NaN.
    """
    if not isinstance(gated, nn.Module):
        raise TypeError(f"lumos.report: `gated` must be an nn.Module, got {type(gated).__name__}")
    inputs = as_input_tuple(example_inputs, "lumos.report", has_feature_gate(gated)) if example_inputs is not None \
        else default_inputs(gated, "lumos.report")
    check_not_meta(gated, inputs, "lumos.report")
    check_gates(gated, "lumos.report")
    plan, records = plan_model(gated, inputs, leaf_modules=leaf_modules, who="lumos.report")
    out = Report(skipped=dict(getattr(gated, "skipped", {})))
    shared = getattr(gated, "shared_gates", {})
    for node in plan.gm.graph.nodes:
        module = plan.module(node) if node.op == "call_module" else None
        record = records[node]
        if isinstance(module, FeatureGate):
            kept = plan.kept_mask(plan.space_of[node]) & module.gate.kept().cpu()
            p_open = module.gate.p_open().detach().cpu()
            out.features = [{"name": name, "p_open": float(p), "kept": bool(k)}
                            for name, p, k in zip(module.feature_names, p_open, kept)]
        elif record.reports_width and (node in plan.space_of or hasattr(record, "width")):
            before, after = record.width(node, plan) if hasattr(record, "width") \
                else (plan.space_of[node].size, plan.width(node))
            gated_layer = any(isinstance(m, HardConcreteGate) for m in module.modules())
            out.layers.append({"name": node.target, "width_before": before, "width_after": after,
                               "gated": gated_layer, "gate_of": shared.get(node.target)})
    out.params_before = count_params(gated)
    counted = set()  # a module or attribute used twice holds its parameters once
    for node in plan.gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            if node.target in counted:
                continue
            counted.add(node.target)
        out.params_after += records[node].params(node, plan)
    first = inputs[0]
    rows = first.shape[0] if first.dim() > 1 else 1
    out.flops_before = sum(records[n].flops(n, plan, dense=True) for n in plan.gm.graph.nodes) / rows
    out.flops_after = sum(records[n].flops(n, plan) for n in plan.gm.graph.nodes) / rows
    return out
