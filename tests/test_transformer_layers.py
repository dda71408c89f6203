"""lumos.nn Transformer twins: equal to torch's layers, same state_dict, converted by lumos.gate
so that heads, head dimensions and feed-forward widths are gated, and compacted exactly."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lumos
from lumos.compact.trace import trace
from lumos.nn import (GatedLinear, GatedMultiheadAttention, Transformer, TransformerDecoder, TransformerDecoderLayer,
                      TransformerEncoder, TransformerEncoderLayer)
from zoo_architectures import SequenceEncoder, close_half_of_every_gate

ATOL, RTOL = 2e-5, 1e-5  # float32: twin vs torch (torch's fused eval path rounds differently)
D_MODEL, NHEAD, FF = 16, 4, 24
OPEN = 8.0  # a gate logit whose eval mask is exactly 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sequences(batch_first: bool, batch=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, D_MODEL, generator=g)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1, length - 2:] = True
    padding[2, length - 4:] = True
    return (x if batch_first else x.transpose(0, 1)), padding


def _causal(length):
    return nn.Transformer.generate_square_subsequent_mask(length)


def _mask_cases(length):
    """Masks torch's layers accept: none, float causal (with the hint), bool, padding only, both."""
    bool_mask = torch.rand(length, length, generator=torch.Generator().manual_seed(1)) > 0.7
    bool_mask.fill_diagonal_(False)
    return {"none": (None, False, False), "causal": (_causal(length), True, False),
            "bool_mask": (bool_mask, False, False), "padding": (None, False, True),
            "causal_and_padding": (_causal(length), False, True)}


def _modes(module):
    """Train mode (dropout 0 in these layers), eval with autograd, eval under no_grad (torch's fast path)."""
    return [("train", module.train, torch.enable_grad), ("eval", module.eval, torch.enable_grad),
            ("eval_no_grad", module.eval, torch.no_grad)]


@pytest.mark.parametrize("masks", ["none", "causal", "bool_mask", "padding", "causal_and_padding"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_twin_equals_torch(norm_first, batch_first, masks):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D_MODEL, NHEAD, FF, dropout=0.0, batch_first=batch_first,
                                       norm_first=norm_first)
    twin = TransformerEncoderLayer.from_torch(layer)
    x, padding = _sequences(batch_first)
    mask, is_causal, use_padding = _mask_cases(7)[masks]
    kwargs = dict(src_mask=mask, is_causal=is_causal, src_key_padding_mask=padding if use_padding else None)
    for mode, set_mode, grad in _modes(layer):
        set_mode(), (twin.train if mode == "train" else twin.eval)()
        with grad():
            torch.testing.assert_close(twin(x, **kwargs), layer(x, **kwargs), atol=ATOL, rtol=RTOL, msg=mode)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_twin_equals_torch(norm_first, batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(D_MODEL, NHEAD, FF, dropout=0.0, batch_first=batch_first,
                                       norm_first=norm_first, activation="gelu")
    twin = TransformerDecoderLayer.from_torch(layer)
    tgt, tgt_padding = _sequences(batch_first, length=5, seed=1)
    memory, memory_padding = _sequences(batch_first, length=7, seed=2)
    memory_mask = torch.zeros(5, 7).masked_fill(torch.rand(5, 7) > 0.8, float("-inf"))
    memory_mask[:, 0] = 0.0
    kwargs = dict(tgt_mask=_causal(5), tgt_is_causal=True, memory_mask=memory_mask,
                  tgt_key_padding_mask=tgt_padding, memory_key_padding_mask=memory_padding)
    for mode, set_mode, grad in _modes(layer):
        set_mode(), (twin.train if mode == "train" else twin.eval)()
        with grad():
            torch.testing.assert_close(twin(tgt, memory, **kwargs), layer(tgt, memory, **kwargs), atol=ATOL,
                                       rtol=RTOL, msg=mode)
            torch.testing.assert_close(twin(tgt, memory), layer(tgt, memory), atol=ATOL, rtol=RTOL, msg=mode)


@pytest.mark.parametrize("activation", ["relu", "gelu", F.silu, nn.GELU(approximate="tanh")],
                         ids=["relu", "gelu", "callable", "module"])
def test_twin_keeps_activation_bias_and_eps(activation):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D_MODEL, NHEAD, FF, dropout=0.0, activation=activation, layer_norm_eps=1e-3,
                                       batch_first=True, bias=False)
    twin = TransformerEncoderLayer.from_torch(layer)
    assert twin.norm1.eps == 1e-3 and twin.linear1.bias is None and twin.norm2.bias is None
    x, _ = _sequences(True)
    torch.testing.assert_close(twin.eval()(x), layer.eval()(x), atol=ATOL, rtol=RTOL)


def test_unbatched_input_equals_torch():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D_MODEL, NHEAD, FF, dropout=0.0).eval()
    x = torch.randn(6, D_MODEL)
    torch.testing.assert_close(TransformerEncoderLayer.from_torch(layer)(x, src_mask=_causal(6)),
                               layer(x, src_mask=_causal(6)), atol=ATOL, rtol=RTOL)


def _encoder_stack(norm_first, batch_first=True):
    layer = nn.TransformerEncoderLayer(D_MODEL, NHEAD, FF, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D_MODEL), enable_nested_tensor=False)


@pytest.mark.parametrize("norm_first", [False, True])
def test_stacks_equal_torch(norm_first):
    torch.manual_seed(0)
    encoder = _encoder_stack(norm_first)
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(D_MODEL, NHEAD, FF, dropout=0.0, batch_first=True,
                                                               norm_first=norm_first), 2, norm=nn.LayerNorm(D_MODEL))
    encoder_twin, decoder_twin = TransformerEncoder.from_torch(encoder), TransformerDecoder.from_torch(decoder)
    assert all(type(layer) is TransformerEncoderLayer for layer in encoder_twin.layers)
    assert all(type(layer) is TransformerDecoderLayer for layer in decoder_twin.layers)
    src, padding = _sequences(True)
    tgt, _ = _sequences(True, length=5, seed=3)
    for mode, set_mode, grad in _modes(encoder):
        for module in (encoder, decoder, encoder_twin, decoder_twin):
            module.train(mode == "train")
        with grad():
            for kwargs in ({"src_key_padding_mask": padding}, {"mask": _causal(7)}, {"mask": _causal(7), "is_causal": True}):
                expected, actual = encoder(src, **kwargs), encoder_twin(src, **kwargs)
                torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=f"{mode} {list(kwargs)}")
            memory = encoder(src)
            kwargs = dict(tgt_mask=_causal(5), memory_key_padding_mask=padding)
            torch.testing.assert_close(decoder_twin(tgt, memory, **kwargs), decoder(tgt, memory, **kwargs), atol=ATOL,
                                       rtol=RTOL, msg=mode)


def test_nested_tensor_fast_path_differs_only_at_padded_positions():
    """torch's encoder, in eval under no_grad with a padding mask, returns zeros at padded
    positions (nested tensors); the twin computes them as torch's reference path does."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D_MODEL, NHEAD, FF, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2).eval()
    twin = TransformerEncoder.from_torch(encoder)
    src, padding = _sequences(True)
    with torch.no_grad():
        fast, ours = encoder(src, src_key_padding_mask=padding), twin(src, src_key_padding_mask=padding)
    torch.testing.assert_close(ours[~padding], fast[~padding], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours, encoder(src, src_key_padding_mask=padding), atol=ATOL, rtol=RTOL)  # with grad


def test_transformer_twin_equals_torch_and_checks_inputs():
    torch.manual_seed(0)
    model = nn.Transformer(D_MODEL, NHEAD, 1, 2, FF, dropout=0.0, batch_first=True)
    twin = Transformer.from_torch(model)
    assert isinstance(twin, nn.Transformer) and type(twin.encoder) is TransformerEncoder
    assert type(twin.decoder.layers[1]) is TransformerDecoderLayer
    src, padding = _sequences(True)
    tgt, _ = _sequences(True, length=5, seed=4)
    kwargs = dict(tgt_mask=twin.generate_square_subsequent_mask(5), src_key_padding_mask=padding,
                  memory_key_padding_mask=padding)
    for module in (model, twin):
        module.eval()
    torch.testing.assert_close(twin(src, tgt, **kwargs), model(src, tgt, **kwargs), atol=ATOL, rtol=RTOL)
    with pytest.raises(RuntimeError, match="lumos.nn.Transformer: the batch number"):
        twin(src, tgt[:2])
    with pytest.raises(RuntimeError, match="equal to d_model=16"):
        twin(src[..., :8], tgt)


def test_from_torch_copies_and_refuses_other_types():
    layer = nn.TransformerEncoderLayer(D_MODEL, NHEAD, FF)
    twin = TransformerEncoderLayer.from_torch(layer)
    assert type(layer) is nn.TransformerEncoderLayer and twin.linear1 is not layer.linear1
    with pytest.raises(TypeError, match=r"TransformerEncoderLayer.from_torch: `layer` must be a torch.nn.*"
                                        r"TransformerEncoderLayer, got TransformerDecoderLayer"):
        TransformerEncoderLayer.from_torch(nn.TransformerDecoderLayer(D_MODEL, NHEAD))
    with pytest.raises(TypeError, match="got TransformerEncoderLayer"):
        TransformerEncoderLayer.from_torch(twin)  # already a twin


def test_twin_constructor_matches_torch_init():
    torch.manual_seed(5)
    layer = nn.TransformerDecoderLayer(D_MODEL, NHEAD, FF, batch_first=True)
    torch.manual_seed(5)
    twin = TransformerDecoderLayer(D_MODEL, NHEAD, FF, batch_first=True)
    assert list(twin.state_dict()) == list(layer.state_dict())
    for (name, a), b in zip(twin.state_dict().items(), layer.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def _saved(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_state_dict_round_trip_both_ways():
    torch.manual_seed(0)
    model = nn.Transformer(D_MODEL, NHEAD, 1, 1, FF, dropout=0.0, batch_first=True).eval()
    torch.manual_seed(1)  # other weights
    twin = Transformer(D_MODEL, NHEAD, 1, 1, FF, dropout=0.0, batch_first=True).eval()
    twin.load_state_dict(_saved(model.state_dict()))
    src, tgt = _sequences(True)[0], _sequences(True, length=5, seed=2)[0]
    torch.testing.assert_close(twin(src, tgt), model(src, tgt), atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    model.load_state_dict(_saved(twin.state_dict()))
    torch.testing.assert_close(model(src, tgt), twin(src, tgt), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kdim", [None, 12], ids=["packed", "separate_kv_dims"])
def test_gated_attention_loads_torch_state_dict(kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D_MODEL, NHEAD, kdim=kdim, vdim=kdim, batch_first=True).eval()
    torch.manual_seed(1)
    gated = GatedMultiheadAttention(D_MODEL, NHEAD, kdim=kdim, vdim=kdim, batch_first=True).eval()
    gates = {n: t.clone() for n, t in gated.state_dict().items() if "gate" in n}
    result = gated.load_state_dict(_saved(mha.state_dict()))  # strict
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(gated.state_dict()[n], t) for n, t in gates.items())  # gates kept
    for gate in (gated.head_gate, gated.qk_dim_gate, gated.v_dim_gate):
        gate.log_alpha.data.fill_(OPEN)
    q = torch.randn(2, 5, D_MODEL)
    kv = torch.randn(2, 6, kdim or D_MODEL)
    torch.testing.assert_close(gated(q, kv, kv)[0], mha(q, kv, kv)[0], atol=ATOL, rtol=RTOL)
    own = GatedMultiheadAttention(D_MODEL, NHEAD, kdim=kdim, vdim=kdim, batch_first=True)
    own.load_state_dict(gated.state_dict())  # lumos' own layout is untouched by the hook
    torch.testing.assert_close(own.eval()(q, kv, kv)[0], gated(q, kv, kv)[0])


def test_gated_attention_refuses_torch_state_with_bias_kv():
    mha = nn.MultiheadAttention(D_MODEL, NHEAD, add_bias_kv=True)
    with pytest.raises(RuntimeError, match="bias_k"):
        GatedMultiheadAttention(D_MODEL, NHEAD).load_state_dict(mha.state_dict())


class _Tagger(nn.Module):
    """Embedding, ``nn.TransformerEncoder`` (post-norm, batch_first), per-token head; padding mask."""

    def __init__(self, norm_first=False):
        super().__init__()
        self.embed = nn.Linear(5, D_MODEL)
        layer = nn.TransformerEncoderLayer(D_MODEL, NHEAD, FF, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, 2)

    def forward(self, x, padding):
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=padding))


def _tagger_inputs(batch=4, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1:, length - 2:] = True
    return torch.randn(batch, length, 5, generator=g), padding


@pytest.mark.parametrize("norm_first", [False, True])
def test_gate_converts_transformer_layers_and_starts_equal(norm_first):
    torch.manual_seed(0)
    model = _Tagger(norm_first)
    inputs = _tagger_inputs()
    gated = lumos.gate(model, inputs)
    assert type(model.encoder) is nn.TransformerEncoder  # the user's model is not changed
    encoder = gated.model.encoder
    assert type(encoder) is TransformerEncoder and isinstance(encoder, nn.TransformerEncoder)
    for i, layer in enumerate(encoder.layers):
        assert type(layer) is TransformerEncoderLayer
        assert isinstance(layer.self_attn, GatedMultiheadAttention) and isinstance(layer.linear1, GatedLinear)
        assert gated.skipped[f"encoder.layers.{i}.linear2"].startswith("feeds an op that needs every channel")
    for _, gate in lumos.gates_of(gated):
        gate.log_alpha.data.fill_(OPEN)
    for mode in (True, False):  # train (gates exactly 1, dropout 0) and eval
        model.train(mode), gated.train(mode)
        torch.testing.assert_close(gated(*inputs), model(*inputs), atol=ATOL, rtol=RTOL)


def test_gated_transformer_trains():
    torch.manual_seed(0)
    gated = lumos.gate(_Tagger(), _tagger_inputs())
    gated.train()
    loss = gated(*_tagger_inputs()).square().mean() + 1e-3 * lumos.penalty(gated)
    loss.backward()
    attn = gated.model.encoder.layers[0].self_attn
    assert attn.head_gate.log_alpha.grad is not None and attn.head_gate.log_alpha.grad.abs().sum() > 0
    assert gated.model.encoder.layers[1].linear1.out_gate.log_alpha.grad.abs().sum() > 0


def test_gate_lists_transformer_layers_kept_whole_in_leaf_modules():
    model = _Tagger()
    gated = lumos.gate(model, _tagger_inputs(), leaf_modules=["encoder"])
    assert type(gated.model.encoder) is nn.TransformerEncoder
    assert "`encoder` is in leaf_modules" in gated.skipped["encoder"]
    assert "`encoder` is in leaf_modules" in gated.skipped["encoder.layers.1"]
    assert gated.skipped["encoder.layers.0.linear1"] == "inside `encoder`, which lumos keeps whole (a leaf module)"
    assert gated.skipped["encoder.layers.0.self_attn"].startswith("inside `encoder`")


def test_twin_traces_into_attention_and_linear_calls():
    twin = TransformerEncoder.from_torch(_encoder_stack(norm_first=True))
    gm = trace(twin)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert {"layers.0.self_attn", "layers.1.linear1", "layers.1.norm2", "norm"} <= set(targets)
    src, padding = _sequences(True)
    torch.testing.assert_close(gm.eval()(src, None, padding), twin.eval()(src, src_key_padding_mask=padding))


@pytest.mark.parametrize("norm_first", [False, True])
def test_compacted_transformer_shrinks_heads_and_feed_forward_exactly(norm_first):
    arch_model = SequenceEncoder(norm_first).eval()
    x = torch.randn(4, 10, 6)
    inputs = (x,) if norm_first else (x, torch.arange(10)[None, :] >= torch.tensor([10, 8, 6, 9])[:, None])
    gated = lumos.gate(arch_model, inputs).eval()
    close_half_of_every_gate(gated, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        compacted = lumos.compact(gated, inputs)
    modules = dict(compacted.named_modules())
    for i in range(2):
        layer = gated.model.encoder.layers[i]
        heads = int(layer.self_attn.head_gate.kept().sum())
        qk = int(layer.self_attn.qk_dim_gate.kept().sum())
        assert modules[f"encoder.layers.{i}.self_attn.q_proj"].out_features == heads * qk
        assert modules[f"encoder.layers.{i}.linear1"].out_features == int(layer.linear1.out_gate.kept().sum())
    x2 = torch.randn(3, 13, 6)
    fresh = (x2,) if norm_first else (x2, torch.arange(13)[None, :] >= torch.tensor([13, 5, 11])[:, None])
    torch.testing.assert_close(compacted(*fresh), gated(*fresh), atol=1e-5, rtol=1e-5)
    copy.deepcopy(compacted)  # a plain module


class _CustomLayer(nn.TransformerEncoderLayer):
    """A user's subclass: its forward is torch's, which torch.fx cannot trace."""


def test_gate_keeps_stacks_of_custom_layers_whole_and_says_why():
    torch.manual_seed(0)
    model = _Tagger()
    model.encoder.layers[1] = _CustomLayer(D_MODEL, NHEAD, FF, dropout=0.0, batch_first=True)
    gated = lumos.gate(model, _tagger_inputs())
    assert type(gated.model.encoder) is nn.TransformerEncoder
    assert gated.skipped["encoder"].endswith("its layers include a _CustomLayer, not an nn.TransformerEncoderLayer")
    assert gated.skipped["encoder.layers.0"].endswith("inside `encoder`, kept whole")
    assert gated.skipped["encoder.layers.0.linear1"].startswith("inside `encoder`")
    with pytest.raises(TypeError, match="cannot convert this TransformerEncoder: its layers include a _CustomLayer"):
        TransformerEncoder.from_torch(model.encoder)
    transformer = nn.Transformer(D_MODEL, NHEAD, 1, 1, FF, custom_encoder=nn.Identity())
    with pytest.raises(TypeError, match="its encoder: a Identity, not an nn.TransformerEncoder"):
        Transformer.from_torch(transformer)


def test_torch_checkpoint_loads_into_gated_model():
    """A checkpoint of the user's torch model loads into the gated model: the attention layers map
    torch's packed projections; only the gates of the gated linears are missing from it."""
    torch.manual_seed(0)
    model = _Tagger().eval()
    torch.manual_seed(1)
    gated = lumos.gate(_Tagger(), _tagger_inputs())  # other weights
    result = gated.model.load_state_dict(_saved(model.state_dict()), strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == [f"encoder.layers.{i}.linear1.out_gate.{key}"
                                           for i in range(2) for key in ("lock_scale", "log_alpha")]
    for _, gate in lumos.gates_of(gated):
        gate.log_alpha.data.fill_(OPEN)
    inputs = _tagger_inputs(seed=2)
    torch.testing.assert_close(gated.eval()(*inputs), model(*inputs), atol=ATOL, rtol=RTOL)


class TokenLM(nn.Module):
    """A token-id language model as users write one: embedding, a torch TransformerEncoder, a
    head whose weight is the embedding's (``head.weight = emb.weight``)."""

    def __init__(self, vocab=40, d_model=D_MODEL):
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, NHEAD, FF, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.enc(self.emb(tokens)))


def test_a_token_id_model_with_a_tied_head_trains_to_its_target_and_compacts_exactly_tied():
    torch.manual_seed(0)
    tokens = torch.randint(0, 40, (128, 9))
    with pytest.raises(TypeError, match=r"lumos.gate: .*floating point.*features=False"):
        lumos.gate(TokenLM(), tokens[:4])  # an input feature gate would scale token ids
    gated = lumos.gate(TokenLM(), tokens[:4], features=False)
    assert "same parameter tensor as `emb`" in gated.skipped["head"]

    def loss(out, target):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))

    history = lumos.fit(gated, (tokens, tokens.roll(1, dims=1)), epochs=2, lr=3e-3, batch_size=32, target=0.6,
                        loss_fn=loss, seed=0, progress=False)
    assert history.target_met and abs(lumos.train.kept_fraction(gated) - 0.6) <= 0.02
    compacted = lumos.compact(gated, tokens[:4])
    assert compacted.head.weight is compacted.emb.weight
    gated.eval()
    with torch.no_grad():
        for shape in ((2, 5), (5, 13)):  # batch and sequence length away from the example's
            other = torch.randint(0, 40, shape)
            torch.testing.assert_close(compacted(other), gated(other), atol=ATOL, rtol=RTOL)
