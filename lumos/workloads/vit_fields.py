r"""``vit_fields``: classify the diffusion regime of two co-evolving 2-D fields (ViT, accuracy).

The ViT row of the LUMOS paper, on physics fields instead of MRI images. A periodic square
domain holds a temperature field ``T`` and a concentration field ``c``, both starting from
independent white-noise fluctuations and diffusing for the same unknown time ``t``,

.. math::
    \partial_t T = D_T \nabla^2 T, \qquad \partial_t c = D_c \nabla^2 c
    \quad\Longrightarrow\quad \hat u(k, t) = \hat u(k, 0)\, e^{-D k^2 t}

(solved exactly in Fourier space). The class is the regime of the Lewis number
``Le = D_T / D_c``: 0 for ``Le < 1/2`` (mass diffusion dominates), 1 for ``1/2 <= Le <= 2``
(comparable), 2 for ``Le > 2`` (heat diffusion dominates), with ``log10 Le`` uniform in
[-1, 1] (classes of about 35%, 30%, 35%) and ``tau_c = D_c t`` log-uniform in [0.1, 3] cell^2,
so how smooth ``T`` is says little about ``Le`` until it is compared with ``c``: on 3000 fields of
size ``small`` the best thresholds on the log mean squared x-difference of ``T`` alone classify
64%, of ``c`` alone 35% (the majority share), of ``T``'s minus ``c``'s 90%. Each field is
recorded by an auto-ranging sensor (scaled to unit variance: the initial amplitude is unknown)
with white sensor noise of std 0.05. Because ``t`` is unknown, neither field alone gives the class: only
the comparison of how far each has smoothed does, so both channels are relevant.
``distractor_k`` is a field of an unrelated experiment, diffused for its own ``tau`` drawn as
``T``'s is: the same statistics as ``T``, independent of the class.

Inputs ``(n, 2 + n_distractors, size, size)`` float32; labels ``(n,)`` int64.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..metrics import accuracy
from .base import Workload, fit_defaults, size_params, split_rows, uniform
from .spectral import apply_transfer, wavenumbers

CHANNELS = ["temperature", "concentration"]
CLASS_NAMES = ["Le<0.5", "0.5<=Le<=2", "Le>2"]
LOG10_LE = (-1.0, 1.0)
LOG_TAU_C = (math.log(0.1), math.log(3.0))
SENSOR_NOISE = 0.05


def diffused_fields(tau: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, size, size)`` float64: white noise diffused for ``tau = D t`` (``(n,)``), scaled to unit
    variance per field, plus white sensor noise."""
    k2 = wavenumbers((size, size)) ** 2
    noise = torch.randn(len(tau), size, size, generator=gen, dtype=torch.float64)
    fields = apply_transfer(noise, torch.exp(-tau.double().reshape(-1, 1, 1) * k2), dims=2)
    fields = (fields - fields.mean((1, 2), keepdim=True)) / fields.std((1, 2), keepdim=True)
    return fields + SENSOR_NOISE * torch.randn(fields.shape, generator=gen, dtype=torch.float64)


def regime(log10_le: torch.Tensor) -> torch.Tensor:
    """Class ``(n,)`` int64 of each ``log10 Le``: 0 below log10(1/2), 2 above log10(2), else 1."""
    bound = math.log10(2.0)
    return (log10_le >= -bound).long() + (log10_le > bound).long()


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``h + attn(ln1(h))``, then ``h + mlp(ln2(h))``."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.mlp(self.ln2(h))


class ViT(nn.Module):
    """Vision transformer without position embeddings: Conv2d patch embedding (kernel = stride =
    ``patch``), a class token, pre-LN encoder blocks, a final LayerNorm and a linear head.

    No position embeddings: the fields are statistically homogeneous on a periodic domain, so the
    class does not depend on where a patch lies; a learned table would only give the model
    positions to memorise its few training fields by, and it would be ``((S / patch)^2 + 1) *
    dim`` parameters that no gate can remove (at size ``small`` 1,040 of 8,483; with the patch
    embedding, norms, biases and head, which no gate removes either, 25% of the model, so a 20%
    budget could only be met by closing every attention head).

    Shapes: input ``(B, C, S, S)`` with ``S`` a multiple of ``patch`` (any such ``S``), output
    ``(B, n_classes)``.
    """

    def __init__(self, in_channels: int, patch: int = 4, dim: int = 64, heads: int = 4,
                 depth: int = 2, mlp: int = 128, n_classes: int = 3):
        super().__init__()
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1)
        return self.head(self.norm(self.blocks(h))[:, 0])


SIZES = {
    "small": dict(n_train=512, n_val=256, n_test=256, image_size=32, n_distractors=1, patch=4, dim=16, heads=4,
                  depth=2, mlp=64, epochs=12, fine_tune_epochs=3, lr=1e-3, batch_size=16),
    "full": dict(n_train=3072, n_val=768, n_test=768, image_size=32, n_distractors=1, patch=4, dim=64, heads=4,
                 depth=2, mlp=128, epochs=20, fine_tune_epochs=5, lr=1e-3, batch_size=64),
}


def load(size: str = "full", *, seed: int = 0, **overrides) -> Workload:
    """Build the workload; same arguments give bitwise-identical tensors.

    Args:
        size: ``"small"`` (512 training fields of 32x32, a two-block ViT of width 16) or
            ``"full"`` (3072 fields of 32x32, width 64), see :data:`SIZES`.
        seed: data seed.
        **overrides: any entry of :data:`SIZES`.

    Shapes: inputs ``(n, 2 + n_distractors, size, size)`` float32, labels ``(n,)`` int64.
    """
    params = size_params(SIZES, size, overrides, "lumos.workloads.vit_fields.load")
    side, patch, n_train, n_val = params["image_size"], params["patch"], params["n_train"], params["n_val"]
    if side % patch:
        raise ValueError(f"lumos.workloads.vit_fields.load: `image_size` {side} is not a multiple of `patch` {patch}")
    n = n_train + n_val + params["n_test"]
    gen = torch.Generator().manual_seed(seed)
    log10_le = uniform(n, LOG10_LE, gen)
    tau_c = torch.exp(uniform(n, LOG_TAU_C, gen))
    channels = [diffused_fields(10 ** log10_le * tau_c, side, gen), diffused_fields(tau_c, side, gen)]
    for _ in range(params["n_distractors"]):
        tau = 10 ** uniform(n, LOG10_LE, gen) * torch.exp(uniform(n, LOG_TAU_C, gen))
        channels.append(diffused_fields(tau, side, gen))
    x = torch.stack(channels, dim=1).float()
    y = regime(log10_le)
    train, val, test = split_rows(x, y, n_train, n_val)

    def make_model(dim=params["dim"], heads=params["heads"], depth=params["depth"], mlp=params["mlp"]) -> ViT:
        """The dense ViT for these fields."""
        return ViT(x.shape[1], patch, dim, heads, depth, mlp, len(CLASS_NAMES))

    return Workload(
        name="vit_fields",
        description="Lewis-number regime of two diffusing 2-D fields (temperature, concentration), ViT, accuracy",
        train=train, val=val, test=test,
        feature_names=CHANNELS + [f"distractor_{k}" for k in range(params["n_distractors"])],
        informative_features=list(CHANNELS),
        target_names=list(CLASS_NAMES),
        make_model=make_model,
        loss_fn=nn.functional.cross_entropy,
        metric=accuracy,
        metric_name="accuracy",
        fit_defaults=fit_defaults(params),
        feature_dim=1,
        size=size,
        seed=seed,
        unit="field",
    )
