"""lumos layers run through the lumos_kernels ops on the Triton backend (CPU interpreter here).

The Triton and torch backends draw the same SplitMix64 numbers, so a gated model gives the same
outputs and gradients on both (masks differ by at most an ulp inside the band).
"""
import pytest
import torch
from torch import nn

import lumos
import lumos_kernels
from lumos_kernels import dispatch

pytestmark = pytest.mark.skipif(not dispatch.triton_interpreted() and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA GPU to run Triton kernels")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(atol=1e-4, rtol=1e-4)


def _gated_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 33), nn.SiLU(), nn.Linear(33, 17), nn.ReLU(), nn.Linear(17, 3))
    x = torch.randn(10, 7)
    gated = lumos.gate(model, x).to(DEVICE)
    with torch.no_grad():
        for _, gate in lumos.gates_of(gated):
            gate.log_alpha.uniform_(-3, 3)
    return gated, x.to(DEVICE)


def _step(gated, x, backend, monkeypatch):
    monkeypatch.setenv("LUMOS_BACKEND", backend)
    gated.zero_grad()
    torch.manual_seed(123)  # same gate seeds on both backends
    out = gated(x)
    loss = out.square().mean() + 0.01 * lumos.penalty(gated, "params", normalize=True)
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in gated.named_parameters()}


def test_gated_mlp_training_step_same_on_triton_and_torch(monkeypatch):
    gated, x = _gated_mlp()
    out_t, grads_t = _step(gated, x, "triton", monkeypatch)
    out_r, grads_r = _step(gated, x, "torch", monkeypatch)
    torch.testing.assert_close(out_t, out_r, **TOL)
    for name in grads_r:
        torch.testing.assert_close(grads_t[name], grads_r[name], **TOL, msg=name)


def test_gated_mlp_eval_same_on_triton_and_torch(monkeypatch):
    gated, x = _gated_mlp()
    gated.eval()
    monkeypatch.setenv("LUMOS_BACKEND", "triton")
    out_t = gated(x)
    monkeypatch.setenv("LUMOS_BACKEND", "torch")
    torch.testing.assert_close(out_t, gated(x), **TOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph_of_gated_mlp(training, monkeypatch):
    monkeypatch.setenv("LUMOS_BACKEND", "triton")
    gated, x = _gated_mlp()
    gated.train(training)
    compiled = torch.compile(gated, fullgraph=True)
    torch.manual_seed(7)
    # inductor draws random numbers its own way unless told to fall back to eager's generator
    with torch._inductor.config.patch(fallback_random=True):
        got = compiled(x)
    torch.manual_seed(7)
    want = gated(x)
    torch.testing.assert_close(got, want, **TOL)
    got.sum().backward()
    assert all(p.grad is not None for name, p in gated.named_parameters() if "log_alpha" not in name)


def test_gated_gin_layer_same_on_triton_and_torch(monkeypatch):
    torch.manual_seed(0)
    conv = lumos.nn.GINConv(6, nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5)), edge_dim=3,
                            train_eps=True)
    gated = lumos.nn.GatedGINConv.from_gin(conv).to(DEVICE)
    with torch.no_grad():
        gated.aggr.column_gate.log_alpha.uniform_(-2, 2)
    x = torch.randn(9, 6, device=DEVICE)
    edge_index = torch.randint(0, 9, (2, 23), device=DEVICE)
    edge_attr = torch.randn(23, 3, device=DEVICE)
    results = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv("LUMOS_BACKEND", backend)
        gated.zero_grad()
        torch.manual_seed(5)
        out = gated(x, edge_index, edge_attr)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in gated.named_parameters()}))
    (out_t, grads_t), (out_r, grads_r) = results
    torch.testing.assert_close(out_t, out_r, **TOL)
    for name in grads_r:
        torch.testing.assert_close(grads_t[name], grads_r[name], **TOL, msg=name)


def test_strided_gate_and_bias_vectors_are_read_through_their_strides(monkeypatch):
    torch.manual_seed(1)
    x, w = torch.randn(5, 7, device=DEVICE), torch.randn(6, 7, device=DEVICE)
    b, m_in, m_out = (torch.randn(12, device=DEVICE)[::2], torch.rand(14, device=DEVICE)[::2],
                      torch.rand(12, device=DEVICE)[::2])
    monkeypatch.setenv("LUMOS_BACKEND", "triton")
    got = lumos_kernels.masked_linear(x, w, b, m_in, m_out)
    torch.testing.assert_close(got, (x * m_in) @ (w * m_out[:, None]).T + b * m_out, **TOL)
    csr = lumos_kernels.to_csr(torch.randint(0, 5, (2, 9), device=DEVICE), 5)
    feats, emb, m = torch.randn(5, 4, device=DEVICE), torch.randn(9, 4, device=DEVICE), torch.rand(8, device=DEVICE)[::2]
    got = lumos_kernels.masked_message_passing(feats, csr.rowptr, csr.col, emb, m, 0.5)
    monkeypatch.setenv("LUMOS_BACKEND", "torch")
    torch.testing.assert_close(got, lumos_kernels.masked_message_passing(feats, csr.rowptr, csr.col, emb, m, 0.5), **TOL)


def test_16_bit_gin_keeps_its_dtype_on_both_backends(monkeypatch):
    layer = lumos.nn.GatedGINConv.from_gin(
        lumos.nn.GINConv(4, nn.Sequential(nn.Linear(4, 3)), edge_dim=2)).to(DEVICE, torch.bfloat16)
    x = torch.randn(6, 4, device=DEVICE, dtype=torch.bfloat16)
    edge_index = torch.randint(0, 6, (2, 10), device=DEVICE)
    edge_attr = torch.randn(10, 2, device=DEVICE, dtype=torch.bfloat16)
    for backend in ("torch", "triton"):
        monkeypatch.setenv("LUMOS_BACKEND", backend)
        assert layer(x, edge_index, edge_attr).dtype == torch.bfloat16, backend


# ------------------------------------------------------------------ in-place ops after gated layers

class _SmallVGG(nn.Module):
    """Conv-ReLU(inplace)-pool stack then an FC head with ReLU(inplace), as torchvision's VGG writes it."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(inplace=inplace), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(12 * 2 * 2, 16), nn.ReLU(inplace=inplace), nn.Dropout(0.0),
                                        nn.Linear(16, 16), nn.ReLU(inplace=inplace), nn.Linear(16, 3))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _train_step_grads(gated, inputs, backend, monkeypatch):
    monkeypatch.setenv("LUMOS_BACKEND", backend)
    gated.zero_grad()
    torch.manual_seed(11)  # the same gate masks for both models
    out = gated(*inputs)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in gated.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vgg_with_inplace_relus_trains_like_out_of_place(backend, monkeypatch):
    """GatedConv2d / GatedLinear outputs fed to ReLU(inplace=True): same outputs and gradients."""
    x = torch.randn(4, 3, 8, 8)
    results = []
    for inplace in (True, False):
        torch.manual_seed(0)
        model = _SmallVGG(inplace)
        gated = lumos.gate(model, x, feature_dim=1).to(DEVICE)
        kinds = {type(m).__name__ for m in gated.modules()}
        assert {"GatedConv2d", "GatedLinear"} <= kinds
        results.append(_train_step_grads(gated, (x.to(DEVICE),), backend, monkeypatch))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gated_gin_output_modified_in_place_trains_like_out_of_place(backend, monkeypatch):
    """In-place ReLUs inside the GIN MLP and on the aggregation's and the layer's outputs."""
    x = torch.randn(9, 6, device=DEVICE)
    edge_index = torch.randint(0, 9, (2, 23), device=DEVICE)
    edge_attr = torch.randn(23, 3, device=DEVICE)
    results = []
    for inplace in (True, False):
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.ReLU(inplace=inplace), lumos.nn.GatedLinear(6, 12), nn.ReLU(inplace=inplace),
                            nn.Linear(12, 5))
        conv = lumos.nn.GINConv(6, mlp, edge_dim=3, train_eps=True)
        gated = lumos.nn.GatedGINConv.from_gin(conv).to(DEVICE)
        with torch.no_grad():
            gated.aggr.column_gate.log_alpha.uniform_(-2, 2)

        class _Head(nn.Module):
            def __init__(self, conv):
                super().__init__()
                self.conv = conv

            def forward(self, x, edge_index, edge_attr):
                out = self.conv(x, edge_index, edge_attr)
                return out.relu_() if inplace else out.relu()

        results.append(_train_step_grads(_Head(gated), (x, edge_index, edge_attr), backend, monkeypatch))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=0, msg=name)
