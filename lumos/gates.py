"""Learnable L0 gates: the hard-concrete distribution with semi-stochastic thresholds, and
lumos' own generator of gate noise (:class:`GateSampler`)."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from lumos_kernels import dispatch, gate_uniform_rows, hard_concrete_parts
from lumos_kernels.hard_concrete import (BETA, GAMMA, T_LOW, T_UP, ZETA, as_int64, check_gate_params, p_open,
                                         splitmix64)

LOG_ALPHA_MIN = math.log(1e-2)
LOG_ALPHA_MAX = math.log(1e2)
# Gates start open: log_alpha = log(1 - p) - log(p) = log 9 puts p_open at 0.978, above t_u, so
# every mask is exactly 1 and a gated pretrained model computes what the user's model computes.
# The penalty walks a gate into the stochastic band only after the network has trained densely
# for a while (README, "The gates", has the experiment that chose this).
INIT_DROP_RATE = 0.1
# On the torch backend a sampler makes the uniforms of up to NOISE_TABLE_STEPS training steps in
# one pass (at most NOISE_TABLE_NUMBERS numbers): a step's dozen integer ops on a few thousand
# gates cost their dispatch, not their arithmetic.
NOISE_TABLE_STEPS = 64
NOISE_TABLE_NUMBERS = 1 << 18


def noise_key(seed: int, step: int) -> int:
    """The 64-bit noise key of training step ``step`` under ``seed`` (a pure function; a
    SplitMix64 hash, so that neighbouring seeds and steps give unrelated keys)."""
    return splitmix64(as_int64(seed) ^ splitmix64(step))


class GateSampler:
    """lumos' generator of gate noise for one set of gates (all the gates of a gated model).

    A training mask is a pure function of ``(log_alpha, seed, step, offset)``: gate unit ``i``
    of a gate bound at ``offset`` draws its uniform from
    :func:`lumos_kernels.gate_uniform` with key :func:`noise_key` ``(seed, step)`` at counter
    ``offset + i`` (SplitMix64: the same numbers on every backend and machine). Calling the
    model twice in a step, or recomputing a layer under activation checkpointing, gives the
    same mask; every DDP rank with the same ``seed`` and ``step`` draws the same masks without sharing torch's
    RNG state. :meth:`advance` moves to the next step (:func:`step_gates_` calls it after each
    optimiser step). The state to checkpoint is :meth:`state_dict` (``seed`` and ``step``).

    While a :class:`lumos.GatedModel` runs ``forward``, ``current`` holds that call's masks of
    every gate (by gate index), drawn in one :func:`lumos_kernels.hard_concrete_parts` call per
    set of shared gate hyper-parameters; outside a forward it is None and a gate draws its own
    mask (the same numbers). On the torch backend the uniforms of the next steps are made
    together (:data:`NOISE_TABLE_STEPS`) with :func:`lumos_kernels.gate_uniform_rows`: the same
    numbers, fewer tensor ops per step.

    Args:
        seed: any int (default 0).
        gates: the gates to bind, in the order that fixes their offsets.
    """

    def __init__(self, seed: int = 0, gates: Iterable["HardConcreteGate"] = ()):
        self.gates: list[HardConcreteGate] = []
        self._plan: list[tuple[tuple, list[int]]] | None = None  # (hyper-parameters, gate indices)
        self.current: list[torch.Tensor] | None = None
        self._table: tuple[int, int, torch.Tensor] | None = None  # (seed, first step, uniforms per step)
        self.seed, self.step = int(seed), 0
        self.scaled = False  # whether some gate's lock_scale may differ from 1 (see HardConcreteGate)
        self._key = torch.tensor(0, dtype=torch.int64)
        self.reseed(seed)
        for gate in gates:
            self.bind(gate)

    # -- noise state -------------------------------------------------------------------------
    def reseed(self, seed: int, step: int = 0) -> None:
        """Restart the noise sequence at ``step`` of ``seed``."""
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"GateSampler: `seed` must be an int, got {type(seed).__name__}")
        self.seed, self.step = seed, int(step)
        self._key = torch.tensor(as_int64(noise_key(self.seed, self.step)), dtype=torch.int64)

    def advance(self) -> None:
        """Move to the next training step's noise."""
        self.reseed(self.seed, self.step + 1)

    @property
    def key(self) -> torch.Tensor:
        """This step's noise key, a 0-dim int64 tensor (a tensor so that a compiled model
        reads it without recompiling each step)."""
        return self._key

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.reseed(int(state["seed"]), int(state["step"]))

    # -- gates -------------------------------------------------------------------------------
    def bind(self, gate: "HardConcreteGate") -> None:
        """Draw ``gate``'s noise from this sampler, at the next free offset."""
        offset = sum(g.n for g in self.gates)
        gate._sampler, gate._index, gate.offset = self, len(self.gates), offset
        self.gates.append(gate)
        self._plan, self._table = None, None

    def invalidate(self) -> None:
        """Forget the grouping of gates into sampling calls (a gate's ``noise_range`` changed)."""
        self._plan = None

    def _groups(self) -> list[tuple[tuple, list[int]]]:
        """Gates that can share one sampling call: same hyper-parameters and contiguous offsets."""
        if self._plan is None:
            plan: list[tuple[tuple, list[int]]] = []
            for index, gate in enumerate(self.gates):
                if plan and plan[-1][0] == gate._hyper():
                    plan[-1][1].append(index)
                else:
                    plan.append((gate._hyper(), [index]))
            self._plan = plan
        return self._plan

    def _uniforms(self, training: bool) -> torch.Tensor | None:
        """This step's uniforms of every gate (in offset order) from the table of the next
        steps, when the torch backend samples; else None (the Triton kernel makes its own)."""
        first = self.gates[0].log_alpha
        if not training or torch.compiler.is_compiling() or dispatch.backend_for("hard_concrete", first) != "torch":
            return None
        table = self._table
        if table is None or table[0] != self.seed or not 0 <= self.step - table[1] < len(table[2]) \
                or table[2].device != first.device:
            total = sum(g.n for g in self.gates)
            steps = max(1, min(NOISE_TABLE_STEPS, NOISE_TABLE_NUMBERS // total))
            start = self.step - self.step % steps
            keys = torch.tensor([as_int64(noise_key(self.seed, step)) for step in range(start, start + steps)],
                                dtype=torch.int64, device=first.device)
            table = self._table = (self.seed, start, gate_uniform_rows(keys, 0, total))
        return table[2][self.step - table[1]]

    def draw(self, training: bool) -> list[torch.Tensor]:
        """Every bound gate's mask for this step (training) or its eval mask, by gate index."""
        masks: list[torch.Tensor | None] = [None] * len(self.gates)
        uniforms = self._uniforms(training)
        for hyper, members in self._groups():
            for index, mask in zip(members, self._draw_group(hyper, members, training, uniforms)):
                masks[index] = mask
        return masks

    def mask_of(self, gate: "HardConcreteGate", training: bool) -> torch.Tensor:
        """``gate``'s mask drawn outside a model's forward (activation checkpointing recomputes a
        layer after it): its group sampled as :meth:`draw` samples it, so the numbers are the
        same bit for bit (a vector sampled alone may round an ulp apart)."""
        for hyper, members in self._groups():
            if gate._index in members:
                drawn = self._draw_group(hyper, members, training, self._uniforms(training))
                return drawn[members.index(gate._index)]
        raise ValueError("GateSampler.mask_of: the gate is not bound to this sampler")

    def _draw_group(self, hyper: tuple, members: list[int], training: bool,
                    uniforms: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        t_l, t_u, beta, gamma, zeta, noise_range = hyper
        gates = [self.gates[i] for i in members]
        start = gates[0].offset
        uniform = None if uniforms is None else uniforms[start:start + sum(g.n for g in gates)]
        masks = hard_concrete_parts([g.log_alpha for g in gates], seed=self._key if training else 0, offset=start,
                                    training=training, t_l=t_l, t_u=t_u, beta=beta, gamma=gamma, zeta=zeta,
                                    noise_range=noise_range, uniform=uniform)
        if not self.scaled:
            return masks
        return tuple(mask * gate.lock_scale.to(mask.dtype) for mask, gate in zip(masks, gates))


class HardConcreteGate(nn.Module):
    r"""One learnable gate per prunable unit (feature, neuron, channel, head).

    Each unit ``j`` has a logit ``log_alpha[j]``; ``pi = p_open()`` is the probability that its
    gate is non-zero. The mask ``m`` returned by ``forward()`` is

    .. math::
        m_j = 1 \text{ if } \pi_j > t_u, \quad 0 \text{ if } \pi_j \le t_l, \quad
        z_j \text{ otherwise}

    where ``z`` is a hard-concrete sample in training and ``z_hat`` in eval. The same
    thresholds apply in both modes, so the eval model is the model that was trained. The mask is
    then multiplied by the buffer ``lock_scale`` ``(n,)``: 1 until the budget lock
    (:class:`lumos.BudgetController`, :func:`lumos.train.budget.lock_to_budget`) pins the gates
    open or closed; a unit it keeps open then keeps its eval value there as a constant, so
    that pinning changes the architecture but not what the model computes.
    The training sample is a pure function of ``log_alpha`` and of this gate's
    :class:`GateSampler` (seed, step) and ``offset``: see :class:`GateSampler`.

    Args:
        n: number of gates.
        t_l: lower threshold on ``p_open`` (default 0.05): at or below it the gate is 0.
        t_u: upper threshold (default 0.95): above it the gate is 1. ``t_l=0, t_u=1`` gives the
            plain hard-concrete gate of Louizos et al.
        beta, gamma, zeta: temperature (2/3) and stretch interval (-0.1, 1.1).
        init_drop_rate: initial probability ``p`` of dropping a unit; ``log_alpha`` starts at
            ``log(1 - p) - log(p)`` plus N(0, ``init_noise``) noise. Default 0.1: ``p_open``
            0.978, above ``t_u``, so every gate starts exactly 1 (LUMOS reference: 0.5, which
            starts every gate inside the stochastic band).
        init_noise: standard deviation of that noise (0.01).
        noise_range: ``u ~ U(r, 1 - r)`` in training (LUMOS reference code's annealed variant;
            0 = full noise, 0.5 = non-random: ``sigmoid(log_alpha / beta)``, as in that code,
            which is not ``z_hat``). Change it during training with
            :class:`lumos.NoiseRangeSchedule` or by assigning the attribute.

    Shapes:
        forward() returns ``(n,)`` in the dtype of ``log_alpha`` (float32 unless converted),
        values in [0, 1].
    """

    def __init__(self, n: int, *, t_l: float = T_LOW, t_u: float = T_UP, beta: float = BETA,
                 gamma: float = GAMMA, zeta: float = ZETA, init_drop_rate: float = INIT_DROP_RATE,
                 init_noise: float = 0.01, noise_range: float = 0.0, device=None):
        super().__init__()
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"HardConcreteGate: `n` must be a positive int, got {n!r}")
        if not 0.0 < init_drop_rate < 1.0:
            raise ValueError(f"HardConcreteGate: `init_drop_rate` must be in (0, 1), got {init_drop_rate}")
        if not (math.isfinite(init_noise) and init_noise >= 0):
            raise ValueError(f"HardConcreteGate: `init_noise` must be a finite standard deviation >= 0, "
                             f"got {init_noise}")
        check_gate_params(t_l, t_u, beta, gamma, zeta, noise_range)
        self.n = n
        self.t_l, self.t_u = float(t_l), float(t_u)
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        self.init_drop_rate, self.init_noise = float(init_drop_rate), float(init_noise)
        self._noise_range = float(noise_range)
        self.log_alpha = nn.Parameter(torch.empty(n, dtype=torch.float32, device=device))
        self.register_buffer("lock_scale", torch.ones(n, dtype=torch.float32, device=device))
        GateSampler(0, [self])  # its own noise until a GatedModel binds it to the model's sampler
        self.reset_parameters()

    def reset_parameters(self) -> None:
        p = self.init_drop_rate
        with torch.no_grad():
            self.log_alpha.normal_(math.log(1 - p) - math.log(p), self.init_noise)
            self.lock_scale.fill_(1.0)

    @property
    def sampler(self) -> GateSampler:
        """The :class:`GateSampler` this gate draws its training noise from."""
        return self._sampler

    @property
    def noise_range(self) -> float:
        return self._noise_range

    @noise_range.setter
    def noise_range(self, value: float) -> None:
        check_gate_params(self.t_l, self.t_u, self.beta, self.gamma, self.zeta, value)
        self._noise_range = float(value)
        self._sampler.invalidate()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "lock_scale"
        if key not in state_dict and prefix + "log_alpha" in state_dict:  # saved before lock_scale existed
            state_dict = {**state_dict, key: torch.ones_like(self.lock_scale)}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not bool((self.lock_scale == 1).all()):
            self._sampler.scaled = True

    def _hyper(self) -> tuple:
        return (self.t_l, self.t_u, self.beta, self.gamma, self.zeta, self._noise_range)

    def _sample(self, training: bool) -> torch.Tensor:
        return self._sampler.mask_of(self, training)

    def forward(self) -> torch.Tensor:
        """The mask: this step's sample in training mode, :meth:`eval_mask` in eval mode.

        Inside a :class:`lumos.GatedModel`'s forward the mask comes from the model's one
        sampling call; otherwise it is drawn here, with the same numbers
        (:meth:`GateSampler.mask_of`).
        """
        current = self._sampler.current
        if current is not None:
            return current[self._index]
        return self._sample(self.training)

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


def model_sampler(model: nn.Module) -> GateSampler | None:
    """The sampler of a :class:`lumos.GatedModel` (or of one wrapped in DDP), else None."""
    sampler = getattr(model, "gate_sampler", None)
    if sampler is None and isinstance(getattr(model, "module", None), nn.Module):
        sampler = getattr(model.module, "gate_sampler", None)
    return sampler if isinstance(sampler, GateSampler) else None


def gate_logits(model: nn.Module) -> list[nn.Parameter]:
    """The ``log_alpha`` parameters of every gate in ``model`` (a GatedModel's list is cached)."""
    sampler = model_sampler(model)
    gates = sampler.gates if sampler is not None else [g for _, g in gates_of(model)]
    return [g.log_alpha for g in gates]


@torch.no_grad()
def eval_masks(gates: list[HardConcreteGate]) -> list[torch.Tensor]:
    """Each gate's :meth:`~HardConcreteGate.eval_mask`, with one sampling pass per sampler."""
    drawn = {id(g.sampler): g.sampler.draw(False) for g in gates}
    return [drawn[id(g.sampler)][g._index] for g in gates]


@torch.no_grad()
def pin_gates_(gates: list[HardConcreteGate], keep: torch.Tensor, when: torch.Tensor | None = None) -> None:
    """Pin every unit of ``gates`` open (``keep``, ``(sum n,)`` bool in gate order) or closed,
    without changing what the eval-mode model computes through the units kept: a kept unit's
    mask becomes exactly 1 times its ``lock_scale``, which takes the unit's eval value now (1 for
    a unit that was closed: it reopens whole). ``when``: a 0-dim bool tensor; the pinning happens
    only where it is true (no read-back, for accelerators)."""
    logits = [g.log_alpha for g in gates]
    sizes = [g.n for g in gates]
    before = torch.cat(eval_masks(gates)).to(logits[0].dtype)
    scale = torch.where(keep & (before > 0), before, torch.ones_like(before))
    pinned = torch.where(keep, LOG_ALPHA_MAX, LOG_ALPHA_MIN).to(logits[0].dtype)
    old_scale = torch.cat([g.lock_scale for g in gates])
    if when is not None:
        pinned = torch.where(when, pinned, torch.cat([t.detach() for t in logits]))
        scale = torch.where(when, scale, old_scale)
    torch._foreach_copy_(logits, list(pinned.split(sizes)))
    torch._foreach_copy_([g.lock_scale for g in gates], list(scale.to(old_scale.dtype).split(sizes)))
    for gate in gates:
        gate.sampler.scaled = True


def tensor_holders(root: nn.Module) -> dict[int, list[str]]:
    """``id`` of every parameter and buffer under ``root`` -> the names of the modules holding it
    directly (more than one: tied weights, ``decoder.weight = encoder.weight``)."""
    holders: dict[int, list[str]] = {}
    for name, module in root.named_modules():
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            holders.setdefault(id(t), []).append(name)
    return holders


@torch.no_grad()
def fold_gate_scales_(layer: nn.Module, masked_weight, in_dim: int | None) -> None:
    """Move the ``lock_scale`` of ``layer``'s output gate into its weight (``masked_weight(scale)``:
    the weight with each output unit's slice scaled) and bias, and its input gate's into the
    weight along ``in_dim`` (None: an input unit's weights are not one slice, its scale stays);
    set those scales to 1. The layer computes the same."""
    weight = layer.weight
    if layer.out_gate is not None:
        scale = layer.out_gate.lock_scale.to(weight.dtype)
        weight.copy_(masked_weight(scale))
        if layer.bias is not None:
            layer.bias.mul_(scale)
        layer.out_gate.lock_scale.fill_(1.0)
    if layer.in_gate is not None and in_dim is not None:
        shape = [1] * weight.dim()
        shape[in_dim] = -1
        weight.mul_(layer.in_gate.lock_scale.to(weight.dtype).reshape(shape))
        layer.in_gate.lock_scale.fill_(1.0)


@torch.no_grad()
def fold_lock_scales_(model: nn.Module) -> None:
    """Move every ``lock_scale`` that a layer of ``model`` can absorb into its weights (gated
    linear and convolution layers: :meth:`lumos.nn.GatedLinear.fold_lock_scales_`); the others
    (input feature gates, GIN columns, attention, a layer whose weight another module also
    holds, which folding would change for both) keep theirs; a gate several layers share is
    folded into each of them, or kept when one of them cannot fold. What the model computes
    does not change."""
    holders = tensor_holders(model)
    folding = [module for module in model.modules() if callable(getattr(module, "fold_lock_scales_", None))
               and all(len(holders[id(p)]) == 1 for p in module.parameters(recurse=False))]
    # a gate several layers share (lumos.gate's share_gates): folded into each of them, or into none
    users: dict[int, tuple[HardConcreteGate, list[nn.Module]]] = {}
    for module in model.modules():
        for gate in _layer_gates(module):
            users.setdefault(id(gate), (gate, []))[1].append(module)
    folds = {id(module) for module in folding}
    kept = {key for key, (_, layers) in users.items() if any(id(m) not in folds for m in layers)}
    scales = {key: gate.lock_scale.clone() for key, (gate, layers) in users.items() if len(layers) > 1}
    for module in folding:
        gates = _layer_gates(module)
        if any(id(g) in kept for g in gates):
            continue  # a user of this gate keeps its scale: so must every other
        for gate in gates:
            if id(gate) in scales:
                gate.lock_scale.copy_(scales[id(gate)])  # what an earlier user's fold reset to 1
        module.fold_lock_scales_()


def _layer_gates(module: nn.Module) -> list[HardConcreteGate]:
    """The input and output gates of a gated layer (none for other modules)."""
    return [g for g in (getattr(module, "in_gate", None), getattr(module, "out_gate", None))
            if isinstance(g, HardConcreteGate)]


@torch.no_grad()
def clamp_gates_(model: nn.Module) -> None:
    """Clamp every gate's ``log_alpha`` in ``model`` into [log 1e-2, log 1e2], in one call."""
    logits = gate_logits(model)
    if logits:
        torch._foreach_clamp_min_(logits, LOG_ALPHA_MIN)
        torch._foreach_clamp_max_(logits, LOG_ALPHA_MAX)


def step_gates_(model: nn.Module) -> None:
    """Finish a training step's gate bookkeeping; call after ``optimizer.step()``.

    Clamps every ``log_alpha`` into [log 1e-2, log 1e2] (:func:`clamp_gates_`) and moves the
    gates' :class:`GateSampler` to the next step's noise. (:meth:`lumos.BudgetController.step`
    calls it.)
    """
    clamp_gates_(model)
    sampler = model_sampler(model)
    samplers = [sampler] if sampler is not None else {id(g.sampler): g.sampler for _, g in gates_of(model)}.values()
    for each in samplers:
        each.advance()
