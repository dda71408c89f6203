"""The self-check :func:`lumos.compact` runs before it returns: the gated model (eval) and the
compacted one on fresh inputs (the example's shape, and other batch and spatial/sequence sizes
the model accepts) must agree within a stated tolerance, or :class:`CompactionError` names the
first node where they part."""
from __future__ import annotations

import torch
from torch import fx, nn

from ..plan.channels import CONST
from ..plan.errors import CompactionError, describe_node, leaf_hint
from ..plan.probe import _cycled
from .builder import Builder

# (rtol, atol relative to the largest reference value) per dtype of the compared outputs
TOLERANCE = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-3),
             torch.bfloat16: (5e-2, 1e-2)}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def disagreement(got, want) -> str | None:
    """Why ``got`` differs from ``want`` (nested tensors), or None when they agree."""
    got, want = _tensors(got), _tensors(want)
    if len(got) != len(want):
        return f"{len(got)} output tensors instead of {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            return f"output {i} has shape {tuple(g.shape)} instead of {tuple(w.shape)}"
        if not w.is_floating_point():
            if not torch.equal(g, w):
                return f"output {i} differs"
            continue
        rtol, atol = TOLERANCE.get(w.dtype, TOLERANCE[torch.float32])
        g64, w64 = g.detach().double(), w.detach().double()
        finite = torch.isfinite(w64)
        scale = float(w64[finite].abs().max()) if bool(finite.any()) else 1.0
        bound = atol * max(scale, 1e-30) + rtol * w64.abs()
        same = (g64 - w64).abs() <= bound
        same |= (g64 == w64) | (torch.isnan(g64) & torch.isnan(w64))
        if not bool(same.all()):
            err = float((g64 - w64)[~same].abs().max())
            return (f"output {i} differs by up to {err:.3g} (largest reference value {scale:.3g}; tolerance "
                    f"rtol={rtol:g}, atol={atol:g} x largest value, for {w.dtype})")
    return None


class _Recorder(fx.Interpreter):
    """Runs a graph module and keeps every node's output (cloned: a later in-place op must not
    change what was recorded)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}
        self.failed: fx.Node | None = None

    def run_node(self, n):
        try:
            value = super().run_node(n)
        except Exception:
            self.failed = n
            raise
        self.values[n] = value.detach().clone() if isinstance(value, torch.Tensor) else value
        return value


def _first_disagreeing(b: Builder, small: fx.GraphModule, inputs: tuple, small_inputs: tuple) -> str:
    """The first original node whose kept channels, or dropped channels' constants, differ."""
    plan = b.plan
    ref, got = _Recorder(plan.gm), _Recorder(small)
    with torch.no_grad():
        ref.run(*inputs)
        try:
            got.run(*small_inputs)
        except Exception as err:  # noqa: BLE001 - reported below
            origin = got.failed.meta.get("lumos_origin") if got.failed is not None else None
            where = next((n for n in plan.gm.graph.nodes if n.name == origin), None)
            what = describe_node(where, plan.gm) if where is not None else "an op lumos emitted"
            return f"the compacted model fails at {what}: {type(err).__name__}: {err}"
    for node in plan.gm.graph.nodes:
        space, new = plan.space_of.get(node), b.env.get(node)
        want = ref.values.get(node)
        if space is None or not isinstance(new, fx.Node) or not isinstance(want, torch.Tensor):
            continue
        have = got.values.get(new)
        kept = plan.kept(space).to(want.device)
        if isinstance(have, torch.Tensor) and have.shape == want.index_select(space.dim, kept).shape:
            if disagreement(have, want.index_select(space.dim, kept)):
                return f"kept channels of {describe_node(node, plan.gm)} differ; {leaf_hint(node)}"
        removed = plan.removed(space)
        const = removed[plan.kinds(space)[removed] == CONST]
        if const.numel() and node in b.values:
            values = b.values[node].const[const].to(want.device, want.dtype)
            view = [-1 if d == space.dim else 1 for d in range(want.dim())]
            expected = values.reshape(view).expand_as(want.index_select(space.dim, const.to(want.device)))
            if disagreement(expected, want.index_select(space.dim, const.to(want.device))):
                return (f"dropped channels {const.tolist()[:8]} of {describe_node(node, plan.gm)} do not hold the "
                        f"constants compaction folded; {leaf_hint(node)}")
    return "no single node differs (the outputs do): report this as a lumos bug, with the model"


def self_check(gated: nn.Module, small: nn.Module, flat: fx.GraphModule, b: Builder, example_inputs: tuple,
               feature_index: torch.Tensor | None, feature_dim: int) -> None:
    """Raise :class:`CompactionError` unless ``small`` equals ``gated.eval()`` on fresh inputs.

    ``flat``: the compacted graph as built (``small`` before hooked containers became
    submodules), whose nodes ``b.env`` names, for the diagnosis. ``feature_index``: with
    ``keep_input_shape=False``, the kept feature columns the compacted model takes (on
    ``feature_dim`` of the first input)."""
    plan = b.plan
    generator = torch.Generator().manual_seed(1)
    fresh = tuple(_cycled(t, {}, generator) if isinstance(t, torch.Tensor) else t for t in example_inputs)
    was_training = gated.training
    gated.eval()
    try:
        for inputs in [fresh, *plan.alternatives]:
            small_inputs = inputs
            if feature_index is not None:
                first = inputs[0].index_select(feature_dim, feature_index.to(inputs[0].device))
                small_inputs = (first,) + tuple(inputs[1:])
            with torch.no_grad():
                want = gated(*[t.clone() if isinstance(t, torch.Tensor) else t for t in inputs])
                if inputs is fresh:
                    again = gated(*[t.clone() if isinstance(t, torch.Tensor) else t for t in inputs])
                    why = disagreement(again, want)
                    if why is not None:
                        raise CompactionError(
                            f"lumos.compact: the gated model in eval mode gives different outputs for the same input "
                            f"({why}): it is random (dropout called with training=True, as in Monte Carlo dropout; "
                            "torch.rand in forward), and no compacted model can equal it; make it deterministic in "
                            "eval mode (F.dropout(x, p, training=self.training)), compact, and add the randomness "
                            "back around the compacted model")
                traced = plan.gm(*[t.clone() if isinstance(t, torch.Tensor) else t for t in inputs])
                why = disagreement(traced, want)
                if why is not None:
                    raise CompactionError(
                        f"lumos.compact: the traced graph of the model (torch.fx) computes something other than "
                        f"the model itself ({why}); usually an in-place op such as `h += x` on a tensor another "
                        "variable also refers to, which torch.fx records as out-of-place: write it out of place "
                        "(h = h + x) or keep that module whole with leaf_modules=[...]")
                try:
                    got = small(*[t.clone() if isinstance(t, torch.Tensor) else t for t in small_inputs])
                    why = disagreement(got, want)
                except Exception as err:  # noqa: BLE001 - diagnosed below
                    why = f"{type(err).__name__}: {err}"
            if why is not None:
                shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
                where = _first_disagreeing(b, flat, inputs, small_inputs)
                raise CompactionError(
                    f"lumos.compact: the compacted model disagrees with the gated model on inputs of shapes "
                    f"{shapes}: {why}. {where}. lumos never returns a model that is not exact.")
    finally:
        gated.train(was_training)
