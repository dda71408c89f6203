"""Gated GINE and multi-head attention layers, and compaction of the graph and ViT zoo models."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lumos
from lumos.compact import CompactionError
from lumos.nn import GatedGINConv, GatedGINEAggregation, GatedMultiheadAttention, GINConv, GINEAggregation
from zoo import assert_state_dict_round_trip, randomize_gates
from zoo_graph_attention import EDGE_DIM, NODE_DIM, GINEMolecule, TinyViT, make_images, make_molecules

ATOL, RTOL = 1e-4, 1e-4  # float32, compacted vs gated eval (issue 4 acceptance)
TORCH_ATOL = 1e-5        # float32, lumos attention vs torch's, same weights
OPEN, CLOSED = 8.0, -8.0
STANDARD = (nn.Linear, nn.LayerNorm, nn.ReLU, nn.GELU, nn.Identity)


def _graph(seed=0, graphs=5):
    return make_molecules(graphs, seed=seed)[:4]


def _gated_gine(pool="sum", seed=0):
    torch.manual_seed(seed)
    inputs = _graph()
    return lumos.gate(GINEMolecule(pool=pool).eval(), inputs), inputs


def _gated_vit(seed=0):
    torch.manual_seed(seed)
    x = make_images(6)
    return lumos.gate(TinyViT().eval(), x), (x,)


def _close(gated, name: str, gate: str) -> None:
    with torch.no_grad():
        getattr(gated.get_submodule(name), gate).log_alpha.fill_(CLOSED)


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _compact_quiet(gated, inputs):
    return lumos.compact(gated, inputs, allow_constant=True)  # a closed layer may cut the input off


# -- compaction: exactness, sizes, modules -------------------------------------------------------
GINE_CLOSED = [None, ("model.convs.1.aggr", "column_gate"), ("model.convs.0.mlp.0", "out_gate"),
               ("model.convs.2.aggr", "column_gate")]


@pytest.mark.parametrize("pool", ["sum", "mean"])
@pytest.mark.parametrize("closed", GINE_CLOSED, ids=["random", "conv1-columns", "conv0-hidden", "last-columns"])
def test_compact_equals_gated_eval_gine(pool, closed):
    gated, inputs = _gated_gine(pool)
    randomize_gates(gated, seed=5)
    if closed is not None:
        _close(gated, *closed)
    compacted = _compact_quiet(gated, inputs)
    torch.testing.assert_close(compacted(*inputs), gated.eval()(*inputs), atol=ATOL, rtol=RTOL)
    other = _graph(seed=7, graphs=3)  # another batch of graphs than the one traced
    torch.testing.assert_close(compacted(*other), gated.eval()(*other), atol=ATOL, rtol=RTOL)
    assert _n_params(compacted) == lumos.report(gated, inputs).params_after


VIT_CLOSED = [None, ("model.blocks.0.attn", "head_gate"), ("model.blocks.1.attn", "qk_dim_gate"),
              ("model.blocks.1.attn", "v_dim_gate")]


@pytest.mark.parametrize("closed", VIT_CLOSED, ids=["random", "block0-heads", "block1-qk-dims", "block1-v-dims"])
def test_compact_equals_gated_eval_vit(closed):
    gated, inputs = _gated_vit()
    randomize_gates(gated, seed=3)
    if closed is not None:
        _close(gated, *closed)
    # block1-v-dims with the random gates: no attention reaches the cls token the head reads: a constant
    compacted = lumos.compact(gated, inputs, allow_constant=True)
    torch.testing.assert_close(compacted(*inputs), gated.eval()(*inputs), atol=ATOL, rtol=RTOL)
    x2 = make_images(3, seed=9)
    torch.testing.assert_close(compacted(x2), gated.eval()(x2), atol=ATOL, rtol=RTOL)
    assert _n_params(compacted) == lumos.report(gated).params_after


def test_compact_shrinks_heads_and_head_dims_to_kept_gates():
    gated, inputs = _gated_vit()
    randomize_gates(gated, seed=3)
    attn = gated.get_submodule("model.blocks.1.attn")
    with torch.no_grad():  # 2 of 4 heads, 5 of 8 Q/K dims, 3 of 8 V dims
        attn.head_gate.log_alpha.copy_(torch.tensor([OPEN, CLOSED, OPEN, CLOSED]))
        attn.qk_dim_gate.log_alpha.copy_(torch.tensor([OPEN] * 5 + [CLOSED] * 3))
        attn.v_dim_gate.log_alpha.copy_(torch.tensor([CLOSED] * 5 + [OPEN, 0.5, OPEN]))
    compacted = lumos.compact(gated, inputs)
    mods = dict(compacted.named_modules())
    assert mods["blocks.1.attn.q_proj"].weight.shape == (2 * 5, 32)
    assert mods["blocks.1.attn.k_proj"].weight.shape == (2 * 5, 32)
    assert mods["blocks.1.attn.v_proj"].weight.shape == (2 * 3, 32)
    assert mods["blocks.1.attn.out_proj"].weight.shape == (32, 2 * 3)
    torch.testing.assert_close(compacted(*inputs), gated.eval()(*inputs), atol=ATOL, rtol=RTOL)
    heads = {layer["name"]: layer["width_after"] for layer in lumos.report(gated).layers}
    assert heads["blocks.1.attn"] == 2


@pytest.mark.parametrize("make", [_gated_gine, _gated_vit], ids=["gine", "vit"])
def test_compacted_model_holds_only_standard_modules(make):
    gated, inputs = make()
    randomize_gates(gated, seed=1)
    compacted = _compact_quiet(gated, inputs)
    leaves = [m for m in compacted.modules() if not list(m.children())]
    assert all(isinstance(m, STANDARD) for m in leaves), sorted({type(m).__name__ for m in leaves})
    assert not any(isinstance(m, (lumos.HardConcreteGate, GatedGINEAggregation, GatedMultiheadAttention,
                                  nn.MultiheadAttention, lumos.nn.GatedLinear)) for m in compacted.modules())
    report = lumos.report(gated, inputs)
    assert _n_params(compacted) == report.params_after < report.params_before


def _round_trip(gated, inputs):
    compacted, twin = _compact_quiet(gated, inputs), _compact_quiet(gated, inputs)
    assert_state_dict_round_trip(compacted, twin, inputs)
    return compacted


def test_compacted_gine_state_dict_round_trip_and_jit_trace():
    gated, inputs = _gated_gine()
    randomize_gates(gated, seed=2)
    compacted = _round_trip(gated, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning: the graph's sizes become constants
        traced = torch.jit.trace(compacted, inputs, check_trace=False)
    torch.testing.assert_close(traced(*inputs), compacted(*inputs))


def test_compacted_vit_state_dict_round_trip_and_export():
    gated, inputs = _gated_vit()
    randomize_gates(gated, seed=2)
    compacted = _round_trip(gated, inputs)
    exported = torch.export.export(compacted, inputs)
    torch.testing.assert_close(exported.module()(*inputs), compacted(*inputs))


# -- masks in a compacted model, attention weights ------------------------------------------------
class MaskedSelfAttention(nn.Module):
    def __init__(self, dim=24, heads=4, need_weights=False):
        super().__init__()
        self.inp = nn.Linear(6, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, 2)
        self.need_weights = need_weights

    def forward(self, x, attn_mask, key_padding_mask):
        h = torch.tanh(self.inp(x))
        a, w = self.attn(h, h, h, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                         need_weights=self.need_weights)
        y = self.out(a)
        return (y, w) if self.need_weights else y


def _masks(batch=3, length=7, heads=4, per_head=True):
    g = torch.Generator().manual_seed(0)
    shape = (batch * heads, length, length) if per_head else (length, length)
    attn_mask = torch.randn(shape, generator=g)  # additive float mask
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[0, -2:] = True
    padding[2, -3:] = True
    return attn_mask, padding


@pytest.mark.parametrize("per_head", [True, False], ids=["3d-mask", "2d-mask"])
def test_compact_attention_with_masks_selects_kept_heads(per_head):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 6)
    inputs = (x, *_masks(per_head=per_head))
    gated = lumos.gate(MaskedSelfAttention().eval(), inputs)
    randomize_gates(gated, seed=4)
    with torch.no_grad():
        gated.get_submodule("model.attn").head_gate.log_alpha.copy_(torch.tensor([OPEN, CLOSED, 0.3, CLOSED]))
    compacted = lumos.compact(gated, inputs)
    torch.testing.assert_close(compacted(*inputs), gated.eval()(*inputs), atol=ATOL, rtol=RTOL)
    assert _n_params(compacted) == lumos.report(gated, inputs).params_after


def test_compact_keeps_every_head_whose_attention_weights_are_used():
    """Used attention weights (need_weights=True) keep every head, closed ones too: the weights
    are reproduced exactly; only a layer with every value dim closed (no head computed) is refused."""
    torch.manual_seed(0)
    inputs = (torch.randn(3, 7, 6), *_masks())
    gated = lumos.gate(MaskedSelfAttention(need_weights=True).eval(), inputs)
    with torch.no_grad():
        gated.get_submodule("model.attn").head_gate.log_alpha.copy_(torch.tensor([OPEN, CLOSED, OPEN, OPEN]))
    compacted = lumos.compact(gated, inputs)
    for got, want in zip(compacted(*inputs), gated.eval()(*inputs)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert _n_params(compacted) == lumos.report(gated, inputs).params_after
    with torch.no_grad():
        gated.get_submodule("model.attn").v_dim_gate.log_alpha.fill_(CLOSED)
    with pytest.raises(CompactionError, match="need_weights=False"):
        lumos.compact(gated, inputs)


# -- training with the penalty closes gates ----------------------------------------------------------
def _train(gated, inputs, target, steps, lam):
    optimizer = torch.optim.Adam(gated.parameters(), lr=2e-2)
    gated.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.mse_loss(gated(*inputs), target) + lam * lumos.penalty(gated, "params", normalize=True)
        loss.backward()
        optimizer.step()
        lumos.clamp_gates_(gated)
    return gated.eval()


def test_penalty_training_closes_gine_column_gates():
    torch.manual_seed(0)
    x, edge_index, edge_attr, batch, y = make_molecules(8)
    inputs = (x, edge_index, edge_attr, batch)
    gated = _train(lumos.gate(GINEMolecule(), inputs), inputs, y, steps=200, lam=5.0)
    for i in range(3):
        kept = gated.get_submodule(f"model.convs.{i}.aggr").column_gate.kept()
        assert 0 < int((~kept).sum()), f"conv {i}: no column gate closed"
    report = lumos.report(gated, inputs)
    assert report.params_after < 0.5 * report.params_before
    compacted = _compact_quiet(gated, inputs)
    torch.testing.assert_close(compacted(*inputs), gated(*inputs), atol=ATOL, rtol=RTOL)


def test_penalty_training_closes_attention_heads_and_dims():
    torch.manual_seed(0)
    x = make_images(16)
    target = torch.randn(16, 5)
    gated = _train(lumos.gate(TinyViT(), x), (x,), target, steps=200, lam=5.0)
    closed = 0
    for i in range(2):
        attn = gated.get_submodule(f"model.blocks.{i}.attn")
        closed += sum(int((~gate.kept()).sum()) for gate in (attn.head_gate, attn.qk_dim_gate, attn.v_dim_gate))
    assert closed > 0
    report = lumos.report(gated)
    assert report.params_after < 0.8 * report.params_before
    torch.testing.assert_close(lumos.compact(gated)(x), gated(x), atol=ATOL, rtol=RTOL)


# -- GatedMultiheadAttention vs nn.MultiheadAttention --------------------------------------------------
def _open(module):
    with torch.no_grad():
        for _, gate in lumos.gates_of(module):
            gate.log_alpha.fill_(OPEN)
    return module


MHA_CONFIGS = {
    "batch_first": dict(embed_dim=16, num_heads=4, batch_first=True),
    "seq_first": dict(embed_dim=16, num_heads=2, batch_first=False),
    "no_bias": dict(embed_dim=12, num_heads=3, batch_first=True, bias=False),
    "kdim_vdim": dict(embed_dim=16, num_heads=4, batch_first=True, kdim=10, vdim=6),
}


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch's, float + bool masks
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("masks", ["none", "bool", "float3d+padding"])
@pytest.mark.parametrize("config", sorted(MHA_CONFIGS))
def test_gated_mha_from_mha_equals_torch(config, masks, need_weights):
    torch.manual_seed(0)
    kwargs = MHA_CONFIGS[config]
    mha = nn.MultiheadAttention(**kwargs).eval()
    gated = _open(GatedMultiheadAttention.from_mha(mha)).eval()
    batch, length, source = 3, 5, 6
    first = (batch, length) if mha.batch_first else (length, batch)
    key_first = (batch, source) if mha.batch_first else (source, batch)
    query = torch.randn(*first, mha.embed_dim)
    key, value = torch.randn(*key_first, mha.kdim), torch.randn(*key_first, mha.vdim)
    call = dict(need_weights=need_weights)
    if masks == "bool":
        call["attn_mask"] = torch.rand(length, source) < 0.3
        call["attn_mask"][:, 0] = False  # every query sees a key: no all -inf rows
    elif masks == "float3d+padding":
        call["attn_mask"] = torch.randn(batch * mha.num_heads, length, source)
        call["key_padding_mask"] = torch.zeros(batch, source, dtype=torch.bool)
        call["key_padding_mask"][1, -2:] = True
    want_out, want_w = mha(query, key, value, **call)
    got_out, got_w = gated(query, key, value, **call)
    torch.testing.assert_close(got_out, want_out, atol=TORCH_ATOL, rtol=1e-4)
    if need_weights:
        torch.testing.assert_close(got_w, want_w, atol=TORCH_ATOL, rtol=1e-4)
    else:
        assert got_w is None and want_w is None


def test_gated_mha_unbatched_and_per_head_weights_equal_torch():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    gated = _open(GatedMultiheadAttention.from_mha(mha)).eval()
    q = torch.randn(4, 8)
    for kw in (dict(need_weights=False), dict(need_weights=True, average_attn_weights=False)):
        want, got = mha(q, q, q, **kw), gated(q, q, q, **kw)
        torch.testing.assert_close(got[0], want[0], atol=TORCH_ATOL, rtol=1e-4)
        if kw["need_weights"]:
            torch.testing.assert_close(got[1], want[1], atol=TORCH_ATOL, rtol=1e-4)


def test_gated_mha_gradients_reach_every_gate():
    torch.manual_seed(0)
    # gates inside the stochastic band (drop rate 0.5): a gate that starts open (the default) is
    # exactly 1 and gets no task gradient until the penalty moves it into the band
    gated = GatedMultiheadAttention(16, 4, batch_first=True, init_drop_rate=0.5).train()
    x = torch.randn(2, 5, 16)
    gated(x, x, x)[0].square().sum().backward()
    for name, gate in lumos.gates_of(gated):
        assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0, name


def test_gated_mha_init_matches_torch_statistics():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    gated = GatedMultiheadAttention(64, 4, batch_first=True)
    for ours, theirs in ((gated.q_proj.weight, mha.in_proj_weight), (gated.out_proj.weight, mha.out_proj.weight)):
        assert abs(ours.std().item() - theirs.std().item()) < 0.1 * theirs.std().item()
    assert gated.q_proj.bias.abs().sum() == 0 and gated.out_proj.bias.abs().sum() == 0


@pytest.mark.parametrize("bad, match", [
    (dict(query=torch.randn(2, 5, 15)), r"`query` must be \(batch, length, 16\)"),
    (dict(key=torch.randn(5, 16)), "all be batched or all unbatched"),
])
def test_gated_mha_rejects_mismatched_embed_dims(bad, match):
    gated = GatedMultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    args = dict(query=x, key=x, value=x) | bad
    with pytest.raises(ValueError, match=match):
        gated(**args)


def test_gated_mha_rejects_unsupported_options():
    with pytest.raises(ValueError, match="multiple of `num_heads`"):
        GatedMultiheadAttention(10, 4)
    with pytest.raises(ValueError, match="add_bias_kv"):
        GatedMultiheadAttention.from_mha(nn.MultiheadAttention(8, 2, add_bias_kv=True))


# -- GINConv / GatedGINConv ----------------------------------------------------------------------
def _conv(hidden=12, edge_dim=EDGE_DIM):
    mlp = nn.Sequential(nn.Linear(hidden, 20), nn.ReLU(), nn.Linear(20, 9))
    return GINConv(hidden, mlp, edge_dim, train_eps=True, eps=0.3)


def test_gated_gin_conv_with_open_gates_equals_gin_conv():
    torch.manual_seed(0)
    _, edge_index, edge_attr, _, _ = make_molecules(4)
    n = int(edge_index.max()) + 1
    x = torch.randn(n, 12)
    conv = _conv()
    gated = _open(GatedGINConv.from_gin(conv))
    torch.testing.assert_close(gated(x, edge_index, edge_attr), conv(x, edge_index, edge_attr))
    gated.train()(x, edge_index, edge_attr).sum().backward()  # gates above t_u: no task gradient, but eps gets one
    assert gated.aggr.eps.grad is not None


def test_gin_conv_matches_dense_gine_formula():
    torch.manual_seed(0)
    _, edge_index, edge_attr, _, _ = make_molecules(3)
    n = int(edge_index.max()) + 1
    x = torch.randn(n, 12)
    conv = _conv()
    src, dst = edge_index
    messages = torch.relu(x[src] + conv.edge_lin(edge_attr))
    h = (1 + conv.eps) * x + torch.zeros_like(x).index_add_(0, dst, messages)
    torch.testing.assert_close(conv(x, edge_index, edge_attr), conv.mlp(h), atol=1e-5, rtol=1e-5)


def test_gated_gine_aggregation_closed_columns_are_zero_and_gates_get_gradients():
    torch.manual_seed(0)
    _, edge_index, edge_attr, _, _ = make_molecules(3)
    x = torch.randn(int(edge_index.max()) + 1, 6)
    aggr = GatedGINEAggregation(6, EDGE_DIM)
    with torch.no_grad():
        aggr.column_gate.log_alpha.copy_(torch.tensor([OPEN, CLOSED, 0.0, OPEN, CLOSED, 0.2]))
    out = aggr.eval()(x, edge_index, edge_attr)
    assert out[:, [1, 4]].abs().sum() == 0 and out[:, [0, 3]].abs().sum() > 0
    for _ in range(4):  # a sample may sit on a clamp (zero gradient): accumulate a few steps' samples
        aggr.train()(x, edge_index, edge_attr).square().sum().backward()
        lumos.step_gates_(aggr)  # the next step's noise
    grad = aggr.column_gate.log_alpha.grad
    assert (grad[[2, 5]] != 0).all() and (grad[[0, 1, 3, 4]] == 0).all()  # only gates in the band learn from the task


def test_gine_aggregation_caches_csr_per_edge_index():
    _, edge_index, edge_attr, _, _ = make_molecules(3)
    x = torch.randn(int(edge_index.max()) + 1, 6)
    aggr = GINEAggregation(6, EDGE_DIM)
    aggr(x, edge_index, edge_attr)
    first = aggr._csr_cache[1]
    aggr(x, edge_index, edge_attr)
    assert aggr._csr_cache[1] is first
    fresh = GINEAggregation(6, EDGE_DIM)
    fresh.load_state_dict(aggr.state_dict())
    flipped = edge_index.flip(0)  # another graph: the cache must not answer for it
    torch.testing.assert_close(aggr(x, flipped, edge_attr), fresh(x, flipped, edge_attr))
    assert aggr._csr_cache[1] is not first


@pytest.mark.parametrize("args, match", [
    (lambda x, ei, ea: (x, ei.t(), ea), r"`edge_index` must be \(2, E\)"),
    (lambda x, ei, ea: (x[:, :5], ei, ea), r"`x` must be \(num_nodes, 6\)"),
    (lambda x, ei, ea: (x, ei, ea[:-1]), r"`edge_attr` must be \(E, 4\)"),
])
def test_gine_aggregation_errors_name_the_argument(args, match):
    _, edge_index, edge_attr, _, _ = make_molecules(3)
    x = torch.randn(int(edge_index.max()) + 1, 6)
    with pytest.raises(ValueError, match=match):
        GINEAggregation(6, EDGE_DIM)(*args(x, edge_index, edge_attr))


def test_gate_converts_gin_aggregations_and_their_mlps():
    gated, _ = _gated_gine()
    names = {n for n, m in gated.named_modules() if isinstance(m, (GatedGINEAggregation, lumos.nn.GatedLinear))}
    for i in range(3):
        assert {f"model.convs.{i}.aggr", f"model.convs.{i}.mlp.0", f"model.convs.{i}.mlp.2"} <= names
    assert "output" in gated.skipped["head.2"]
    assert gated.feature_gate.n_features == NODE_DIM


def test_from_pyg_gine_conv_equals_pyg():
    pyg = pytest.importorskip("torch_geometric.nn", reason="torch_geometric is not installed (optional extra)")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    conv = pyg.GINEConv(mlp, train_eps=True, edge_dim=EDGE_DIM)
    _, edge_index, edge_attr, _, _ = make_molecules(3)
    x = torch.randn(int(edge_index.max()) + 1, 8)
    ours = GINConv.from_pyg(conv)
    torch.testing.assert_close(ours(x, edge_index, edge_attr), conv(x, edge_index, edge_attr), atol=1e-5, rtol=1e-5)
