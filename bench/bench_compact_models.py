"""What compaction buys for convolutional models on CPU: original vs compacted at 75% of channels pruned.

Two models, each timed as ``dense(x)`` (the original), ``gated.eval()(x)`` (what a user runs
without :func:`lumos.compact`) and ``compacted(x)`` under ``torch.inference_mode()``:

- ``vgg``: a VGG-like classifier, conv-BN-ReLU blocks 32-32 | 64-64 | 128 with max pooling,
  flatten, FC 2048-256-10, on a batch of 32 RGB images 32x32;
- ``unet``: a three-level U-Net, widths 16-32-64 with a 128 bottleneck, ConvTranspose2d
  upsampling and concatenated skips, on a batch of 4 one-channel 64x64 images.

Every gated convolution (all but the output layer) has a seeded random 75% of its output
channels closed and the rest open; the input channels stay. Closed channels after BatchNorm
hold non-zero constants, so the compacted VGG also pays for the exact border terms of its
zero-padded convolutions (one one-channel conv per layer). Dense over compacted median is the
speedup. Each setup checks once, before timing, that the compacted output equals the gated
eval output. torch's thread count is left alone and recorded in ``extra_info``.

Run::

    python -m pytest bench/bench_compact_models.py --benchmark-only -q \\
        --benchmark-columns=median,iqr,min,rounds

On a machine whose cores are busy with other work, ``OMP_NUM_THREADS=1`` gives steadier times.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lumos
from bench_compaction import measure, n_params, run_info

PRUNED_FRACTION = 0.75
KEEP_LOGIT, CLOSE_LOGIT = 4.0, -8.0  # p_open above t_u (gate exactly 1) / at most t_l (exactly 0)
ATOL = RTOL = 1e-4  # float32 convolutions, compacted vs gated eval


def _conv_bn_relu(n_in: int, n_out: int) -> list[nn.Module]:
    return [nn.Conv2d(n_in, n_out, 3, padding=1), nn.BatchNorm2d(n_out), nn.ReLU()]


class VGG(nn.Module):
    """VGG-like classifier. Shapes: input ``(N, 3, 32, 32)``, output ``(N, 10)``."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(3, 32), *_conv_bn_relu(32, 32), nn.MaxPool2d(2),
            *_conv_bn_relu(32, 64), *_conv_bn_relu(64, 64), nn.MaxPool2d(2),
            *_conv_bn_relu(64, 128), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.ReLU(),
                                        nn.Linear(256, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def _double_conv(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(n_in, n_out, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(n_out, n_out, 3, padding=1), nn.ReLU())


class UNet(nn.Module):
    """Three-level U-Net. Shapes: input ``(N, 1, 64, 64)``, output ``(N, 1, 64, 64)``."""

    def __init__(self, widths=(16, 32, 64, 128)):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.enc1, self.enc2, self.enc3 = _double_conv(1, w1), _double_conv(w1, w2), _double_conv(w2, w3)
        self.bottom = _double_conv(w3, w4)
        self.up3, self.dec3 = nn.ConvTranspose2d(w4, w3, 2, stride=2), _double_conv(2 * w3, w3)
        self.up2, self.dec2 = nn.ConvTranspose2d(w3, w2, 2, stride=2), _double_conv(2 * w2, w2)
        self.up1, self.dec1 = nn.ConvTranspose2d(w2, w1, 2, stride=2), _double_conv(2 * w1, w1)
        self.head = nn.Conv2d(w1, 1, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        b = self.bottom(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([self.up3(b), e3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


MODELS = {
    "vgg": (VGG, (32, 3, 32, 32)),
    "unet": (UNet, (4, 1, 64, 64)),
}
GATED_CONVS = (lumos.nn.GatedConv2d, lumos.nn.GatedConvTranspose2d)


@torch.no_grad()
def _randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Trained-looking BatchNorm statistics: a closed channel then holds a non-zero constant."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)
            m.bias.uniform_(-0.5, 0.5, generator=generator)


@torch.no_grad()
def prune_channels(gated: nn.Module, fraction: float, generator: torch.Generator) -> None:
    """Open every gate, then close a random ``fraction`` of each gated conv's output channels."""
    for _, gate in lumos.gates_of(gated):
        gate.log_alpha.fill_(KEEP_LOGIT)
    for layer in gated.modules():
        if isinstance(layer, GATED_CONVS):
            n = layer.out_gate.n
            closed = torch.randperm(n, generator=generator)[:round(fraction * n)]
            layer.out_gate.log_alpha[closed] = CLOSE_LOGIT


@pytest.fixture(scope="module", params=sorted(MODELS))
def pruned_models(request):
    """Dense, gated (eval) and compacted model at 75% of channels pruned, checked once."""
    name = request.param
    factory, shape = MODELS[name]
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    dense = factory()
    _randomize_norms(dense, generator)
    dense.eval()
    x = torch.randn(*shape, generator=generator)
    gated = lumos.gate(dense, x[:2], feature_dim=1)
    prune_channels(gated, PRUNED_FRACTION, generator)
    gated.eval()
    compacted = lumos.compact(gated, x[:2])
    with torch.inference_mode():
        torch.testing.assert_close(compacted(x), gated(x), atol=ATOL, rtol=RTOL)
    assert n_params(compacted) == lumos.report(gated).params_after
    info = {
        "model": name,
        "pruned_fraction": PRUNED_FRACTION,
        "input_shape": list(shape),
        "dense_params": n_params(dense),
        "compacted_params": n_params(compacted),
        "kept_param_fraction": n_params(compacted) / n_params(dense),
        **run_info(x),
    }
    return {"dense": dense, "gated_eval": gated, "compacted": compacted, "x": x, "info": info}


@pytest.mark.parametrize("kind", ["dense", "gated_eval", "compacted"])
def test_inference_latency_of_cnn(benchmark, pruned_models, kind):
    model, x, info = pruned_models[kind], pruned_models["x"], pruned_models["info"]
    benchmark.group = f"{info['model']}-{round(100 * info['pruned_fraction'])}%-channels-pruned"
    benchmark.extra_info.update(info, variant=kind)
    with torch.inference_mode():
        measure(benchmark, model, x)
