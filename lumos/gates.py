"""Learnable L0 gates: the hard-concrete distribution with semi-stochastic thresholds."""
from __future__ import annotations

import math

import torch
from torch import nn

from lumos_kernels import hard_concrete
from lumos_kernels.hard_concrete import BETA, GAMMA, T_LOW, T_UP, ZETA, check_gate_params, p_open

LOG_ALPHA_MIN = math.log(1e-2)
LOG_ALPHA_MAX = math.log(1e2)


def _new_seed() -> torch.Tensor:
    """A Philox key from torch's global RNG: ``torch.manual_seed`` (same on every DDP rank) fixes it.

    A tensor, not an int, so that ``torch.compile`` keeps the draw in its graph.
    """
    return torch.randint(0, 2**62, (), dtype=torch.int64)


class HardConcreteGate(nn.Module):
    r"""One learnable gate per prunable unit (feature, neuron, channel, head).

    Each unit ``j`` has a logit ``log_alpha[j]``; ``pi = p_open()`` is the probability that its
    gate is non-zero. The mask ``m`` returned by ``forward()`` is

    .. math::
        m_j = 1 \text{ if } \pi_j > t_u, \quad 0 \text{ if } \pi_j \le t_l, \quad
        z_j \text{ otherwise}

    where ``z`` is a hard-concrete sample in training and ``z_hat`` in eval. The same
    thresholds apply in both modes, so the eval model is the model that was trained.

    Args:
        n: number of gates.
        t_l: lower threshold on ``p_open`` (default 0.05): at or below it the gate is 0.
        t_u: upper threshold (default 0.95): above it the gate is 1. ``t_l=0, t_u=1`` gives the
            plain hard-concrete gate of Louizos et al.
        beta, gamma, zeta: temperature (2/3) and stretch interval (-0.1, 1.1).
        init_drop_rate: initial probability ``p`` of dropping a unit; ``log_alpha`` starts at
            ``log(1 - p) - log(p)`` plus N(0, ``init_noise``) noise (LUMOS reference: 0.5, 0.01).
        init_noise: standard deviation of that noise.
        noise_range: ``u ~ U(r, 1 - r)`` in training (LUMOS reference code's annealed variant;
            0 = full noise, 0.5 = non-random: ``sigmoid(log_alpha / beta)``, as in that code,
            which is not ``z_hat``). Change it during training with
            :class:`lumos.NoiseRangeSchedule` or by assigning the attribute.

    Shapes:
        forward() returns ``(n,)`` in the dtype of ``log_alpha`` (float32 unless converted),
        values in [0, 1].
    """

    def __init__(self, n: int, *, t_l: float = T_LOW, t_u: float = T_UP, beta: float = BETA,
                 gamma: float = GAMMA, zeta: float = ZETA, init_drop_rate: float = 0.5,
                 init_noise: float = 0.01, noise_range: float = 0.0, device=None):
        super().__init__()
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"HardConcreteGate: `n` must be a positive int, got {n!r}")
        if not 0.0 < init_drop_rate < 1.0:
            raise ValueError(f"HardConcreteGate: `init_drop_rate` must be in (0, 1), got {init_drop_rate}")
        check_gate_params(t_l, t_u, beta, gamma, zeta, noise_range)
        self.n = n
        self.t_l, self.t_u = float(t_l), float(t_u)
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        self.init_drop_rate, self.init_noise = float(init_drop_rate), float(init_noise)
        self.noise_range = float(noise_range)
        self.log_alpha = nn.Parameter(torch.empty(n, dtype=torch.float32, device=device))
        self._pending: torch.Tensor | None = None  # this step's mask, drawn by sample_gates()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        p = self.init_drop_rate
        with torch.no_grad():
            self.log_alpha.normal_(math.log(1 - p) - math.log(p), self.init_noise)

    def _sample(self, training: bool) -> torch.Tensor:
        return hard_concrete(self.log_alpha, seed=_new_seed() if training else 0, offset=0,
                             training=training, t_l=self.t_l, t_u=self.t_u, beta=self.beta,
                             gamma=self.gamma, zeta=self.zeta, noise_range=self.noise_range)

    def forward(self) -> torch.Tensor:
        """The mask: a fresh sample in training mode, :meth:`eval_mask` in eval mode.

        Inside a :class:`lumos.GatedModel` the training mask is drawn once per step for the
        whole model (:func:`sample_gates`) and every call in that step returns it: a layer
        called twice, or recomputed by activation checkpointing, sees the same mask.
        """
        if self.training and self._pending is not None:
            return self._pending
        return self._sample(self.training)

    def train(self, mode: bool = True) -> "HardConcreteGate":
        if not mode:
            self._pending = None
        return super().train(mode)

    def _hyper(self) -> tuple:
        return (self.t_l, self.t_u, self.beta, self.gamma, self.zeta, self.noise_range,
                self.log_alpha.device, self.log_alpha.dtype)

    def p_open(self) -> torch.Tensor:
        """``(n,)`` differentiable probability that each gate is non-zero (the expected L0)."""
        return p_open(self.log_alpha, self.beta, self.gamma, self.zeta)

    def z_hat(self) -> torch.Tensor:
        """``(n,)`` deterministic gate value ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``."""
        return (torch.sigmoid(self.log_alpha) * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    @torch.no_grad()
    def eval_mask(self) -> torch.Tensor:
        """``(n,)`` the mask used in eval mode: thresholded ``z_hat`` (no gradient)."""
        return self._sample(False)

    @torch.no_grad()
    def kept(self) -> torch.Tensor:
        """``(n,)`` bool: which units survive compaction (eval mask > 0)."""
        return self.eval_mask() > 0

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp ``log_alpha`` into [log 1e-2, log 1e2] in place (call after each optimiser step)."""
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def extra_repr(self) -> str:
        return f"n={self.n}, kept={int(self.kept().sum())}/{self.n}, t_l={self.t_l}, t_u={self.t_u}"


def gates_of(model: nn.Module) -> list[tuple[str, HardConcreteGate]]:
    """Every gate in ``model`` with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, HardConcreteGate)]


def sample_gates(gates: list[HardConcreteGate]) -> None:
    """Draw this training step's masks of all ``gates`` in one op call (one kernel launch on
    CUDA) per set of shared hyper-parameters; each gate's next ``forward()`` returns its part.

    The logits are concatenated into one flat buffer, the layout the fused Triton sampler
    expects; gradients flow back to each gate's ``log_alpha`` through the concatenation.
    """
    groups: dict[tuple, list[HardConcreteGate]] = {}
    for gate in gates:
        if gate.training:
            groups.setdefault(gate._hyper(), []).append(gate)
    for (t_l, t_u, beta, gamma, zeta, noise_range, _, _), members in groups.items():
        flat = torch.cat([g.log_alpha for g in members]) if len(members) > 1 else members[0].log_alpha
        masks = hard_concrete(flat, seed=_new_seed(), offset=0, training=True, t_l=t_l, t_u=t_u,
                              beta=beta, gamma=gamma, zeta=zeta, noise_range=noise_range)
        for gate, mask in zip(members, masks.split([g.n for g in members])):
            gate._pending = mask


def clamp_gates_(model: nn.Module) -> None:
    """Clamp every gate's ``log_alpha`` in ``model`` (what :func:`lumos.fit` does after each step)."""
    for _, gate in gates_of(model):
        gate.clamp_()
