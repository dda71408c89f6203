"""bf16 autocast and torch.compile in lumos.fit: the trained gated MLP and CNN compact exactly."""
import math
import warnings

import pytest
import torch
from torch import nn

import lumos

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FP32_ATOL, FP32_RTOL = 1e-5, 1e-5  # compacted vs gated eval, both float32
# Both models under bf16 autocast: each product rounds its operands to bf16 (8 bits of mantissa,
# relative error 2^-9) and the compacted model groups the sums differently (closed channels folded
# into biases): they agree to a few bf16 ulps of the output's scale.
BF16_TOL = 3e-2


def _mlp_problem():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = torch.stack([x[:, 0] * x[:, 1], torch.sin(x[:, 2])], 1)
    model = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 2))
    return lumos.gate(model, x[:16]), x, y


def _cnn_problem():
    torch.manual_seed(0)
    x = torch.randn(96, 3, 8, 8)
    y = torch.stack([x[:, 0].mean((1, 2)), x[:, 1].abs().mean((1, 2))], 1)
    y = (y - y.mean(0)) / y.std(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                          nn.Conv2d(12, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(12, 2))
    return lumos.gate(model, x[:8], feature_dim=1), x, y


PROBLEMS = {"mlp": _mlp_problem, "cnn": _cnn_problem}


def _assert_compacts_exactly(gated, x, precision):
    compacted = lumos.compact(gated)  # its own self-check runs too
    gated.eval()
    torch.testing.assert_close(compacted(x), gated(x), atol=FP32_ATOL, rtol=FP32_RTOL)
    assert sum(p.numel() for p in compacted.parameters()) == lumos.report(gated).params_after
    if precision == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            small, full = compacted(x).float(), gated(x).float()
        scale = float(full.abs().max())
        torch.testing.assert_close(small, full, atol=BF16_TOL * scale, rtol=BF16_TOL)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_bf16_training_gives_a_model_that_compacts_exactly(name):
    gated, x, y = PROBLEMS[name]()
    dtypes = set()
    layer = next(m for m in gated.modules() if isinstance(m, (lumos.nn.GatedLinear, lumos.nn.GatedConv2d)))
    hook = layer.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype) if module.training else None)
    history = lumos.fit(gated, (x, y), val=(x[:32], y[:32]), epochs=6, lr=3e-3, batch_size=32, target=0.4,
                        precision="bf16", seed=0, progress=False)
    hook.remove()  # compaction keeps a hooked layer whole
    assert dtypes == {torch.bfloat16}  # the products really ran in bf16
    assert all(p.dtype == torch.float32 for p in gated.parameters())  # the weights stayed float32
    assert all(math.isfinite(row["val_loss"]) for row in history.epochs)
    assert 0.3 < lumos.kept_fraction(gated) <= 0.42
    _assert_compacts_exactly(gated, x, "bf16")


class Losses(lumos.Callback):
    def __init__(self, losses: list):
        self.losses = losses

    def on_step_end(self, loop, task_loss):
        self.losses.append(float(task_loss))


@pytest.mark.slow
@pytest.mark.parametrize("name, precision", [("mlp", "fp32"), ("cnn", "bf16")])
def test_compiled_training_gives_a_model_that_compacts_exactly(name, precision):
    """torch.compile (inductor: C++ on CPU) of the gated model in training and validation."""
    import torch._dynamo

    torch._dynamo.reset()
    settings = dict(epochs=4, lr=3e-3, batch_size=32, target=0.4, precision=precision, seed=0, progress=False)
    eager_losses, compiled_losses = [], []
    gated, x, y = PROBLEMS[name]()
    lumos.fit(gated, (x, y), val=(x[:32], y[:32]), callbacks=[Losses(eager_losses)], **settings)
    gated, x, y = PROBLEMS[name]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lumos.fit(gated, (x, y), val=(x[:32], y[:32]), compile=True, callbacks=[Losses(compiled_losses)], **settings)
    # dynamo warns when it traces through a cache (log_alpha_bounds' is skipped under compile)
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # training and eval graphs
    assert not torch._dynamo.utils.counters["graph_break"]  # the gate sampling is traced whole
    # the first step computes the same loss; later ones drift apart as the compiled kernels sum in
    # another order and Adam amplifies differences of gradients near zero
    assert compiled_losses[0] == pytest.approx(eager_losses[0], rel=1e-5)
    eager = gated.eval()(x)
    compiled = torch.compile(gated)(x)  # the compiled eval model is the eager one
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    _assert_compacts_exactly(gated, x, precision)
    torch._dynamo.reset()


def test_precision_is_checked():
    gated, x, y = _mlp_problem()
    with pytest.raises(ValueError, match="`precision`='fp16' needs loss scaling"):
        lumos.fit(gated, (x, y), epochs=1, precision="fp16", progress=False)
    with pytest.raises(ValueError, match="`precision` must be one of"):
        lumos.fit(gated, (x, y), epochs=1, precision="float32", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_bf16_training_on_cuda_compacts_exactly(name):
    gated, x, y = PROBLEMS[name]()
    gated = gated.cuda()
    lumos.fit(gated, (x.cuda(), y.cuda()), epochs=4, lr=3e-3, batch_size=32, target=0.4, precision="bf16",
              seed=0, progress=False)
    gated = gated.cpu()
    _assert_compacts_exactly(gated, x, "fp32")
