"""Compaction red team: models the other zoos do not have (tests/zoo_redteam.py) and random
architectures, compacted with random gate patterns and compared with ``gated.eval()`` here, outside
lumos' own self-check, on fresh inputs of the example's shape and of other sizes; plus one
regression test per failure the red team found.

Run many random architectures locally (not in CI): ``python tests/test_compact_redteam.py 0 300``.
"""
from __future__ import annotations

import io
import sys
from collections import Counter

import pytest
import torch
from torch import nn

import lumos
from lumos.compact import table as build_table
from lumos.convert import GATED_LAYERS
from lumos.gates import HardConcreteGate
from lumos.plan import CompactionError, TraceError, plan_model
from lumos.plan import table as analysis_table
from lumos.plan.ops_linear import LinearLayer
from zoo import randomize_gates
from zoo_redteam import (CASES, AttentionBiasKV, MonteCarloDropout,
                         Parametrized, PositionalEncoding, ReusedLinear, _randn, gate_everything,
                         random_architecture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# compacted vs gated eval, per output dtype: (atol relative to the largest output, rtol)
TOLERANCE = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2)}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def mismatch(got, want) -> str | None:
    """Why ``got`` (compacted) is not ``want`` (gated eval): structure, shape, dtype or values."""
    if type(got) is not type(want) and not (isinstance(got, tuple) and isinstance(want, tuple)):
        return f"output is a {type(got).__name__}, expected a {type(want).__name__}"
    if isinstance(want, dict) and set(got) != set(want):
        return f"output keys {sorted(got)} instead of {sorted(want)}"
    got, want = _tensors(got), _tensors(want)
    if len(got) != len(want):
        return f"{len(got)} output tensors instead of {len(want)}"
    for g, w in zip(got, want):
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"output {tuple(g.shape)} {g.dtype} instead of {tuple(w.shape)} {w.dtype}"
        atol, rtol = TOLERANCE[w.dtype]
        scale = float(w.detach().double().abs().max()) if w.numel() else 1.0
        try:
            torch.testing.assert_close(g.double(), w.double(), atol=atol * max(scale, 1.0), rtol=rtol, equal_nan=True)
        except AssertionError as err:
            return str(err).splitlines()[0] + " " + " ".join(str(err).splitlines()[1:3])
    return None


def fresh(inputs: tuple, seed: int) -> tuple:
    """New values for the float inputs (same shapes), integer inputs as they are."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=g).to(t.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 else t for t in inputs)


def patterns(gated) -> list[dict]:
    """Gate patterns: about half closed (two seeds), none closed, everything closed, and one gated
    layer fully closed (the rest at random)."""
    layers = [n for n, m in gated.named_modules() if getattr(m, "out_gate", None) is not None]
    out = [dict(closed_fraction=0.5, seed=0), dict(closed_fraction=0.5, seed=1), dict(closed_fraction=0.0, seed=2),
           dict(closed_fraction=1.0, seed=3)]
    if layers:
        out.append(dict(closed_fraction=0.3, seed=4, fully_closed=layers[len(layers) // 2]))
    return out


def _compact(gated, **kwargs):
    return lumos.compact(gated, allow_constant=True, **kwargs)  # every gate closed: a constant model


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_compaction(gated, inputs: list[tuple], pattern: dict, keep_input_shape: bool = True) -> list[str]:
    """Compact ``gated`` under ``pattern`` and compare with ``gated.eval()`` on ``inputs``; return
    what failed (an empty list when everything holds)."""
    randomize_gates(gated, **pattern)
    state = {k: v.clone() for k, v in gated.state_dict().items()}
    try:
        compacted = _compact(gated, keep_input_shape=keep_input_shape)
    except (CompactionError, TraceError, ValueError) as err:
        return [f"refused {pattern}: {type(err).__name__}: {err}"]
    failures = [f"compact changed `{k}` of the gated model" for k, v in gated.state_dict().items()
                if not torch.equal(v, state[k])]
    report = lumos.report(gated)
    if _n_params(compacted) != report.params_after:
        failures.append(f"{pattern}: {_n_params(compacted)} parameters, report predicts {report.params_after}")
    kept = torch.tensor([i for i, f in enumerate(report.features) if f["kept"]], dtype=torch.long)
    for i, values in enumerate(inputs):
        with torch.no_grad():
            want = gated.eval()(*values)
            given = values
            if not keep_input_shape and gated.feature_gate is not None:
                given = (values[0].index_select(gated.feature_dim, kept),) + tuple(values[1:])
            try:
                got = compacted(*given)
            except Exception as err:  # noqa: BLE001 - a failure to report
                failures.append(f"{pattern} input {i}: compacted model fails: {type(err).__name__}: {err}")
                continue
        why = mismatch(got, want)
        if why:
            shapes = [tuple(t.shape) for t in values if isinstance(t, torch.Tensor)]
            failures.append(f"{pattern} keep_input_shape={keep_input_shape} inputs {shapes}: {why}")
    return failures


# -- the red-team zoo ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_compact_equals_gated_eval_on_redteam_zoo(name):
    case = CASES[name]()
    gated = lumos.gate(case.model, case.inputs, **case.gate_kwargs)
    supported = {n for n, m in case.model.named_modules() if n and isinstance(m, tuple(GATED_LAYERS))}
    gated_layers = {n for n, m in gated.model.named_modules() if any(isinstance(c, HardConcreteGate) for c in m.children())}
    unlisted = {n for n in supported - set(gated.skipped) if not any(g == n or n.startswith(g + ".") for g in gated_layers)}
    assert not unlisted, f"gate() left {sorted(unlisted)} ungated without a reason"
    inputs = [fresh(case.inputs, 11)] + [fresh(other, 12 + i) for i, other in enumerate(case.others)]
    failures = []
    for pattern in patterns(gated):
        if pattern["closed_fraction"] == 1.0 and case.all_closed_refusal:
            randomize_gates(gated, **pattern)
            with pytest.raises(CompactionError, match=case.all_closed_refusal):
                _compact(gated)
            continue
        failures += check_compaction(gated, inputs, pattern)
    assert not failures, "\n".join(failures)
    randomize_gates(gated, **patterns(gated)[0])
    compacted = _compact(gated)
    buffer = io.BytesIO()
    torch.save(compacted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert mismatch(loaded(*inputs[0]), compacted(*inputs[0])) is None
    gated.train()
    for cost in ("count", "params", "flops"):
        lumos.penalty(gated, cost=cost).backward()
    assert lumos.report(gated).to_markdown()


@pytest.mark.parametrize("name", ["glu_ffn", "norm_chain", "reused_linear", "attention_bias_kv", "channel_group_norm",
                                  "wavenet", "pointnet", "two_inputs"])
def test_compact_equals_gated_eval_with_every_layer_gated(name):
    """Every layer lumos can gate is gated (the output layer, layers called twice...), not only those
    lumos.gate chooses: the plan alone must keep what has to stay."""
    case = CASES[name]()
    gated = gate_everything(case.model, case.inputs, **case.gate_kwargs)
    inputs = [fresh(case.inputs, 21)] + [fresh(o, 22 + i) for i, o in enumerate(case.others) if o[0].dim() == case.inputs[0].dim()]
    failures = [f for pattern in patterns(gated) for f in check_compaction(gated, inputs, pattern)]
    assert not failures, "\n".join(failures)


# -- regressions: silently wrong or crashing once -----------------------------------------------------
def test_compacted_model_refuses_inputs_with_another_number_of_dims():
    """An MLP compacted on (N, F) rows used to put its feature selection on dim 1 of a (B, T, F)
    input: a wrong shape, or a crash inside. Now the compacted model names the rank it takes, and
    compacting with a 3-D example gives a model exact on 3-D inputs."""
    case = CASES["glu_ffn"]()
    gated = lumos.gate(case.model, case.inputs)
    randomize_gates(gated, closed_fraction=0.5, seed=0)
    compacted = _compact(gated)
    x3 = _randn(5, 3, 7, seed=9)
    with pytest.raises(AssertionError, match="takes `x` with 2 dims"):
        compacted(x3)
    compacted3 = _compact(gated, example_inputs=x3)
    with torch.no_grad():
        assert mismatch(compacted3(x3), gated.eval()(x3)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("closed", ["a", "b"])
def test_norm_whose_inputs_are_all_constants_folds_to_constants(closed, dtype):
    """Every input of a LayerNorm (or RMSNorm) closed: its output is constant per channel (once an
    ``rsqrt`` of a Python float, refused by the self-check)."""
    case = CASES["norm_chain"]()
    gated = lumos.gate(case.model.to(dtype), tuple(t.to(dtype) for t in case.inputs))
    randomize_gates(gated, closed_fraction=0.3, seed=1, fully_closed=f"model.{closed}")
    inputs = [fresh(tuple(t.to(dtype) for t in case.inputs), 3)]
    assert not check_compaction(gated, inputs, dict(closed_fraction=0.3, seed=1, fully_closed=f"model.{closed}"))


def test_group_norm_with_one_channel_per_group_folds_a_closed_channel():
    """``F.group_norm`` of a single constant per group raised inside the builder (a ValueError out of
    lumos.compact)."""
    case = CASES["channel_group_norm"]()
    gated = lumos.gate(case.model, case.inputs, **case.gate_kwargs)
    inputs = [fresh(case.inputs, 5), *case.others]
    assert not check_compaction(gated, inputs, dict(closed_fraction=0.5, seed=0))


def test_number_divided_by_a_norm_output_is_not_folded_as_affine():
    """``2 / (LayerNorm(h) + 5)``: the plan called it AFFINE and the builder crashed (KeyError)."""
    case = CASES["reciprocal_norm"]()
    gated = lumos.gate(case.model, case.inputs)
    assert not check_compaction(gated, [fresh(case.inputs, 5)], dict(closed_fraction=0.5, seed=0))


def test_parametrized_layers_become_plain_layers_that_save():
    """weight_norm / spectral_norm layers were copied as parametrized modules: torch.save of the
    compacted model raised, and building in train mode ran (and moved) spectral_norm's power
    iteration on the gated model."""
    model = Parametrized().eval()
    x = _randn(8, 6)
    gated = lumos.gate(model, x)
    assert {"a", "b", "c"} <= set(gated.skipped) and "parametrized" in gated.skipped["b"]
    randomize_gates(gated, closed_fraction=0.5, seed=0)
    gated.train()
    u = gated.get_submodule("model.b").parametrizations.weight[0]._u.clone()
    compacted = _compact(gated)
    assert torch.equal(u, gated.get_submodule("model.b").parametrizations.weight[0]._u)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in compacted.modules())
    buffer = io.BytesIO()
    torch.save(compacted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert mismatch(loaded(x), gated.eval()(x)) is None


def test_buffer_sliced_by_the_sequence_length_traces_compacts_and_saves():
    """``self.pe[:, :x.size(1)]`` (a positional-encoding buffer) could not be traced; now it is, and
    the compacted model still pickles (torch re-traces it with buffers as plain tensors)."""
    x = _randn(4, 10, 4)
    gated = lumos.gate(PositionalEncoding(), x)
    randomize_gates(gated, closed_fraction=0.5, seed=0)
    compacted = _compact(gated)
    buffer = io.BytesIO()
    torch.save(compacted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    longer = _randn(2, 23, 4, seed=1)
    with torch.no_grad():
        assert mismatch(loaded(longer), gated.eval()(longer)) is None


def test_internal_failures_name_the_node(monkeypatch):
    """A bug in an analysis rule or a builder surfaces as a CompactionError naming the node and the
    workaround, never as a bare traceback."""
    case = CASES["glu_ffn"]()
    gated = lumos.gate(case.model, case.inputs)

    def broken(*args):
        raise KeyError("boom")

    monkeypatch.setitem(build_table.BUILDERS, LinearLayer, broken)
    with pytest.raises(CompactionError, match=r"failed to build `embed` .*KeyError.*leaf_modules"):
        lumos.compact(gated)
    monkeypatch.setitem(analysis_table.FUNCTION_RULES, torch.nn.functional.silu, broken)
    with pytest.raises(CompactionError, match=r"failed to analyse `silu`"):
        lumos.report(gated)


def test_probes_resize_each_spatial_dim_and_integer_inputs():
    """A conv model gated without a feature dim (features=False) had its channel dim doubled by the
    probe, which the model refused: no other length was checked. Integer inputs (tokens) stopped
    every probe."""
    for name, changed in (("fully_convolutional", 2), ("tokens", 1)):
        case = CASES[name]()
        gated = lumos.gate(case.model, case.inputs, **case.gate_kwargs)
        plan, _ = plan_model(gated)
        lengths = {alt[0].shape[changed] for alt in plan.alternatives}
        assert lengths - {case.inputs[0].shape[changed]}, (name, [tuple(a[0].shape) for a in plan.alternatives])
        assert not check_compaction(gated, [fresh(o, 3) for o in case.others], dict(closed_fraction=0.5, seed=0))


def test_gate_and_compact_inside_inference_mode_give_models_usable_outside():
    """Built inside ``torch.inference_mode()``, the compacted model's parameters were inference
    tensors: calling it outside raised; a gated model made there could not train. Compacting a
    model left in train mode, under ``torch.no_grad()``, works too."""
    case = CASES["sequential_dict"]()
    with torch.inference_mode():
        gated = lumos.gate(case.model, case.inputs)
        randomize_gates(gated, closed_fraction=0.5, seed=0)
        compacted = lumos.compact(gated)
    x = _randn(5, 6, seed=4)
    out = compacted(x)
    out.sum().backward()
    assert mismatch(out.detach(), gated.eval()(x).detach()) is None
    gated.train()
    (gated(x).pow(2).mean() + lumos.penalty(gated)).backward()
    with torch.no_grad():  # in train mode (its dropout on), under no_grad
        compacted = lumos.compact(gated)
    assert gated.training
    assert mismatch(compacted(x).detach(), gated.eval()(x).detach()) is None


def test_keep_input_shape_false_without_a_feature_gate_keeps_the_input():
    """Without a feature gate, keep_input_shape=False dropped the input columns nothing read, and no
    report said which columns to pass (the full input then gave wrong values)."""
    case = CASES["slice_channels"]()
    gated = lumos.gate(case.model, case.inputs, features=False)
    assert not check_compaction(gated, [fresh(case.inputs, 2)], dict(closed_fraction=0.5, seed=0),
                                keep_input_shape=False)


def test_report_counts_no_gate_logits_of_a_gated_layer_called_twice():
    """A gated layer kept whole (called twice) was counted with its gate logits in params_after."""
    x = _randn(8, 6)
    gated = gate_everything(ReusedLinear(), (x,))
    assert not check_compaction(gated, [fresh((x,), 1)], dict(closed_fraction=0.5, seed=0))


def test_attention_weights_used_keep_every_head():
    """Used attention weights (need_weights=True, torch's default) keep every head: a closed head
    was a refusal after training."""
    case = CASES["attention_weights"]()
    gated = lumos.gate(case.model, case.inputs)
    with torch.no_grad():
        gated.get_submodule("model.attn").head_gate.log_alpha.copy_(torch.tensor([8.0, -8.0]))
    compacted = _compact(gated)
    x = fresh(case.inputs, 1)
    with torch.no_grad():
        assert mismatch(compacted(*x), gated.eval()(*x)) is None


def test_gate_leaves_attention_with_bias_kv_ungated_with_a_reason():
    """``add_bias_kv`` made lumos.gate fail (a ValueError from the gated twin) for the whole model."""
    gated = lumos.gate(AttentionBiasKV(), _randn(3, 5, 5))
    assert "add_bias_kv" in gated.skipped["attn"]
    assert isinstance(gated.get_submodule("model.ff.0"), lumos.nn.GatedLinear)


# -- clear refusals -------------------------------------------------------------------------------------
def test_model_random_in_eval_is_refused_by_name():
    """Monte Carlo dropout: the refusal said "an in-place op"; it now says the model is random."""
    gated = lumos.gate(MonteCarloDropout(), _randn(8, 6))
    with pytest.raises(CompactionError, match="random .*training=self.training"):
        lumos.compact(gated)


# -- random architectures ----------------------------------------------------------------------------------
def check_random_architecture(seed: int, dtype: torch.dtype = torch.float32, everything: bool = False,
                              channel_ops: bool = False) -> list[str]:
    """Failures of compaction on the random architecture ``seed`` (gated by lumos.gate, or every
    layer with ``everything``), four gate patterns, one of them with keep_input_shape=False."""
    case = random_architecture(seed, dtype, channel_ops)
    try:
        gated = (gate_everything(case.model, case.inputs, **case.gate_kwargs) if everything
                 else lumos.gate(case.model, case.inputs, **case.gate_kwargs))
    except ValueError as err:
        return [] if "nothing to gate" in str(err) else [f"gate: {err}"]
    inputs = [fresh(case.inputs, seed + 1), fresh(case.others[0], seed + 2)]
    failures = []
    for i, pattern in enumerate([dict(closed_fraction=0.5, seed=seed), dict(closed_fraction=0.3, seed=seed + 1),
                                 dict(closed_fraction=1.0, seed=0), dict(closed_fraction=0.0, seed=0)]):
        failures += check_compaction(gated, inputs, pattern, keep_input_shape=i != 1)
    return failures


@pytest.mark.parametrize("seed", range(20))
def test_compact_equals_gated_eval_on_random_architectures(seed):
    dtype = torch.float64 if seed % 2 else torch.float32
    failures = check_random_architecture(seed, dtype) + check_random_architecture(seed, dtype, everything=True)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("seed", range(20))
def test_compact_equals_gated_eval_on_random_architectures_with_channel_ops(seed):
    """The same, with per-channel PReLU, GLU, roll, flip and pixel (un)shuffles among the ops."""
    dtype = torch.float64 if seed % 2 else torch.float32
    failures = (check_random_architecture(seed, dtype, channel_ops=True)
                + check_random_architecture(seed, dtype, everything=True, channel_ops=True))
    assert not failures, "\n".join(failures)


def _fuzz(first: int, last: int, channel_ops: bool = False) -> None:
    """Run seeds ``first .. last - 1`` in float32 and float64, by lumos.gate and with every layer
    gated; print each failure and the counts by kind."""
    counts = Counter()
    for seed in range(first, last):
        for dtype in (torch.float32, torch.float64):
            for everything in (False, True):
                counts["cases"] += 1
                failures = check_random_architecture(seed, dtype, everything, channel_ops)
                for failure in failures:
                    print(f"seed {seed} {dtype} everything={everything}: {failure}")
                kinds = {f.split(":")[0].split(" ")[0] if f.startswith(("refused", "gate")) else
                         "fails" if "compacted model fails" in f else "parameters" if "report predicts" in f
                         else "changed" if "changed" in f else "wrong" for f in failures}
                counts.update(kinds)
    print(dict(counts))


if __name__ == "__main__":
    torch.set_num_threads(1)
    _fuzz(int(sys.argv[1]), int(sys.argv[2]), len(sys.argv) > 3 and sys.argv[3] == "channel_ops")
