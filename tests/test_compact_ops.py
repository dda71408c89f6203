"""Compaction of the ops that link channels, one small model each (tests/zoo_ops.py): exact on
another batch and spatial/sequence size, the parameter count lumos.report predicts, and the
layers around the op really shrink."""
import warnings

import pytest
import torch

import lumos
from zoo import randomize_gates
from zoo_ops import OPS, make

ATOL, RTOL = 1e-4, 1e-5  # float32, compacted vs gated eval


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _gated(name, seed=5, closed=0.5):
    model, x, other = make(name)
    gated = lumos.gate(model, x, feature_dim=1 if x.dim() == 4 else -1)
    randomize_gates(gated, closed_fraction=closed, seed=seed)
    if gated.feature_gate is not None:
        with torch.no_grad():
            gated.feature_gate.gate.log_alpha.fill_(4.0)
    return gated, x, other


@pytest.mark.parametrize("seed", [5, 6])
@pytest.mark.parametrize("name", sorted(OPS))
def test_compact_equals_gated_eval_on_other_shapes(name, seed):
    gated, x, other = _gated(name, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        compacted = lumos.compact(gated, x)
    for inputs in (x, other):
        torch.testing.assert_close(compacted(inputs), gated.eval()(inputs), atol=ATOL, rtol=RTOL)
    report = lumos.report(gated)
    assert _n_params(compacted) == report.params_after
    assert report.params_after < report.params_before


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_gated_layer_loses_its_closed_channels(name):
    """With one output channel of every gated layer closed (and all else open), each such
    layer's compacted output is narrower, or the channel lives on where the op needs it."""
    gated, x, _ = _gated(name, closed=0.0)
    with torch.no_grad():
        for _, gate in lumos.gates_of(gated):
            gate.log_alpha.fill_(4.0)
    layers = {n: m for n, m in gated.model.named_modules() if hasattr(m, "out_gate") and m.out_gate is not None}
    assert layers, "nothing gated"
    for module in layers.values():
        with torch.no_grad():
            module.out_gate.log_alpha[0] = -8.0
    report = lumos.report(gated)
    shrunk = [l["name"] for l in report.layers if l["gated"] and l["width_after"] < l["width_before"]]
    assert shrunk, report.to_markdown()
    compacted = lumos.compact(gated, x)
    torch.testing.assert_close(compacted(x), gated.eval()(x), atol=ATOL, rtol=RTOL)


def test_reused_stateless_relu_does_not_stop_gating():
    gated, x, _ = _gated("reused_relu")
    gated_layers = {n for n, m in gated.model.named_modules() if isinstance(m, lumos.nn.GatedConv2d)}
    assert {"conv1", "conv2", "downsample.0", "stem"} <= gated_layers, gated.skipped


def test_depthwise_conv_loses_exactly_its_closed_channels():
    gated, x, other = _gated("inverted_residual", closed=0.0)
    with torch.no_grad():
        for _, gate in lumos.gates_of(gated):
            gate.log_alpha.fill_(4.0)
        gated.get_submodule("model.depthwise.0").out_gate.log_alpha[[0, 3, 7, 30]] = -8.0
        gated.get_submodule("model.expand.0").out_gate.log_alpha[[3, 5]] = -8.0  # 3: both closed
    compacted = lumos.compact(gated, x)
    depthwise = compacted.get_submodule("depthwise.0")
    assert depthwise.groups == depthwise.out_channels == depthwise.in_channels == 28
    # 3 and 5 closed in the expansion too: 5 reaches its open depthwise channel as a constant
    assert compacted.get_submodule("expand.0").out_channels == 27
    assert compacted.get_submodule("project.0").in_channels == 28
    torch.testing.assert_close(compacted(other), gated.eval()(other), atol=ATOL, rtol=RTOL)


def test_grouped_conv_packs_kept_groups():
    gated, x, other = _gated("grouped_convs", closed=0.0)
    with torch.no_grad():
        for _, gate in lumos.gates_of(gated):
            gate.log_alpha.fill_(4.0)
        gated.get_submodule("model.grouped").out_gate.log_alpha[[0, 1, 2, 3, 5]] = -8.0  # group 0, one of group 1
    compacted = lumos.compact(gated, x)
    grouped = compacted.get_submodule("grouped")
    assert grouped.groups == 3 and grouped.out_channels == 12 and grouped.in_channels == 12
    torch.testing.assert_close(compacted(other), gated.eval()(other), atol=ATOL, rtol=RTOL)


def test_layer_norm_over_pruned_channels_keeps_full_width_statistics():
    """ConvNeXt: closed depthwise channels reach the LayerNorm as constants; the compacted
    LayerNorm runs on fewer channels with the statistics of all of them."""
    gated, x, other = _gated("convnext_block", closed=0.0)
    with torch.no_grad():
        for _, gate in lumos.gates_of(gated):
            gate.log_alpha.fill_(4.0)
        gated.get_submodule("model.dwconv").out_gate.log_alpha[[1, 4]] = -8.0
    compacted = lumos.compact(gated, x)
    assert compacted.get_submodule("pwconv1").in_features == 6
    assert compacted.get_submodule("dwconv").out_channels == 6
    torch.testing.assert_close(compacted(other), gated.eval()(other), atol=ATOL, rtol=RTOL)


def test_post_norm_stream_channels_dropped_through_norms():
    """A stream channel closed by every producer (embedding, fc2, fc4) is dropped everywhere;
    what the norms output on it is a function of each row's statistics, folded downstream."""
    gated, x, other = _gated("post_norm_stream", closed=0.0)
    with torch.no_grad():
        for _, gate in lumos.gates_of(gated):
            gate.log_alpha.fill_(4.0)
        for name in ("model.embed", "model.fc2", "model.fc4"):
            gated.get_submodule(name).out_gate.log_alpha[[2, 9]] = -8.0
    compacted = lumos.compact(gated, x)
    assert compacted.get_submodule("fc1").in_features == 14
    assert compacted.get_submodule("head").in_features == 14
    torch.testing.assert_close(compacted(other), gated.eval()(other), atol=ATOL, rtol=RTOL)
