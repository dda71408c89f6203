"""BudgetController: the Lagrangian weight on the L0 term that ends training at a target size."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..cost import check_cost, cost_model
from ..gates import LOG_ALPHA_MAX, LOG_ALPHA_MIN, gates_of, step_gates_
from .penalty import check_gated, kept_fraction

LAM_MAX = 1e3


def check_target(target, who: str) -> float:
    """``target`` as a float in (0, 1], or a clear error naming ``who`` (the function called)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or math.isnan(target) \
            or not 0.0 < target <= 1.0:
        raise ValueError(f"{who}: `target` must be a fraction in (0, 1], got {target!r}")
    return float(target)


def check_reachable(model: nn.Module, target: float, cost: str, who: str) -> float:
    """The smallest fraction of ``cost`` the gates can reach; a ``target`` below it is an error
    naming the layers lumos keeps whole."""
    costs = cost_model(model)
    minimum = costs.minimum[cost] / costs.dense[cost]
    if target < minimum:
        whole = sorted(costs.whole.items(), key=lambda kv: -kv[1])
        listed = ", ".join(f"{name} ({count:,} params)" for name, count in whole[:8]) or "none"
        skipped = getattr(model, "skipped", {})
        reasons = "; ".join(f"{name}: {why}" for name, why in list(skipped.items())[:8])
        raise ValueError(
            f"{who}: `target`={target} is below {minimum:.4f}, the smallest fraction of {cost} this "
            f"model can reach with every gate closed. Layers lumos keeps whole: {listed}"
            + (f". Layers left ungated: {reasons}" if reasons else "")
            + ". Ask for a larger target, or make those layers prunable (lumos gates nn.Linear, "
              "convolutions, nn.MultiheadAttention and lumos.nn.GINConv)."
        )
    return minimum


class BudgetController:
    r"""Lagrangian weight ``lam`` on the L0 term so that training ends at a target budget.

    The model minimises ``task + lam * E`` where ``E`` is the expected fraction of the dense
    cost kept under the gates' ``p_open`` (with ``relative``, ``lam`` is also multiplied by the
    detached task loss, so that it weighs relative changes of the loss whatever its scale).
    The run has three phases over ``total_steps``:

    1. warm-up (the first ``warmup`` of the steps): ``lam = 0``; the gates, which start open,
       stay at exactly 1 and the network trains densely;
    2. annealing (until ``anneal``): the budget goes from 1 to ``target`` (cosine) and ``lam``
       is a PI controller on the relative error ``e = clamp((E - budget) / budget, -1, 1)``:

       .. math::
           I \leftarrow \mathrm{clamp}(I + \eta\, e,\ 0,\ \lambda_{max}), \qquad
           \lambda = \mathrm{clamp}(I + k_p\, e,\ 0,\ \lambda_{max})

    3. fine-tuning (from ``lock``): the architecture is fixed: the units with the largest
       ``log_alpha`` whose model costs at most ``target`` (a bisection on a threshold of
       ``log_alpha``, with the exact cost of the eval masks) are set open (mask exactly 1), the
       others closed, ``lam`` is 0, and the remaining steps train the weights of that model.

    With ``lock=None`` the controller keeps tracking ``target`` to the end. Everything stays on
    the device: no step reads a value back to the host.

    Args:
        model: the gated model.
        target: fraction of the dense cost to keep, in (0, 1]; a target below the smallest
            fraction the gates can reach (layers kept whole) is an error naming those layers.
        total_steps: the optimiser steps the run will take (e.g. ``epochs * len(loader)``).
        cost: ``"params"`` (default), ``"flops"`` or ``"count"``.
        warmup, anneal: where the warm-up and the annealing end, as fractions of ``total_steps``.
        lock: when to fix the architecture, as a fraction of ``total_steps`` (default 0.6, the
            end of the annealing); None: never.
        dual_lr, kp: integral and proportional gains ``eta`` and ``k_p``.
        lam_max: the bound on ``lam``; a run that reaches it cannot meet its target
            (:attr:`saturated`).
        relative: scale the penalty by the detached task loss given to :meth:`penalty`.

    Usage (:meth:`step` after ``optimizer.step()`` also clamps the gates and moves their noise
    to the next step)::

        controller = lumos.BudgetController(gated, target=0.2, total_steps=epochs * len(loader))
        loss = task + controller.penalty(task)
        loss.backward(); optimizer.step(); controller.step()
    """

    def __init__(self, model: nn.Module, target: float, total_steps: int | None = None, cost: str = "params", *,
                 warmup: float = 0.2, anneal: float = 0.6, lock: float | None = 0.6, dual_lr: float = 1.0,
                 kp: float = 10.0, lam_max: float = LAM_MAX, relative: bool = True,
                 who: str = "lumos.BudgetController"):
        check_gated(model, who)
        check_cost(cost, who)
        target = check_target(target, who)
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"{who}: `total_steps` must be the number of optimiser steps the run will take "
                             f"(a positive int, e.g. epochs * len(loader)), got {total_steps!r}")
        for name, value in (("warmup", warmup), ("anneal", anneal), ("lock", 0.0 if lock is None else lock)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{who}: `{name}` must be a fraction of the run in [0, 1], got {value!r}")
        if anneal < warmup:
            raise ValueError(f"{who}: the budget must finish annealing (`anneal`={anneal}) after the dense "
                             f"warm-up (`warmup`={warmup})")
        for name, value in (("dual_lr", dual_lr), ("kp", kp), ("lam_max", lam_max)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (value == 0 and name == "lam_max"):
                raise ValueError(f"{who}: `{name}` must be a finite number >= 0 (lam_max > 0), got {value!r}")
        self.model, self.target, self.cost = model, target, cost
        self.min_fraction = check_reachable(model, target, cost, who)
        self.total_steps, self.warmup, self.anneal = total_steps, float(warmup), float(anneal)
        self.lock = None if lock is None else float(lock)
        self.dual_lr, self.kp, self.lam_max, self.relative = float(dual_lr), float(kp), float(lam_max), bool(relative)
        self.lock_step = None if lock is None else max(1, round(self.lock * total_steps))
        self.steps = 0
        self.locked = False
        device = gates_of(model)[0][1].log_alpha.device
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self._lam, self._integral, self._expected = zero.clone(), zero.clone(), zero + 1.0
        self._saturated = torch.zeros((), dtype=torch.bool, device=device)

    def budget(self, step: int | None = None) -> float:
        """The fraction to keep at ``step`` (default: now): 1 during the warm-up, then cosine
        down to ``target`` until ``anneal * total_steps``, then ``target``."""
        step = self.steps if step is None else step
        start, end = self.warmup * self.total_steps, self.anneal * self.total_steps
        t = min(max(step - start, 0.0) / max(end - start, 1.0), 1.0)
        return self.target + (1.0 - self.target) * 0.5 * (1.0 + math.cos(math.pi * t))

    def penalty(self, task_loss: torch.Tensor | None = None) -> torch.Tensor:
        """``lam * E`` (times the detached ``task_loss`` when ``relative``), differentiable in
        the gates; also keeps ``E`` for :meth:`step`."""
        costs = cost_model(self.model)
        expected = costs.expected(self.cost) / costs.dense[self.cost]
        self._expected = expected.detach().double()
        weight = self._lam
        if self.relative and task_loss is not None:
            weight = weight * task_loss.detach().to(weight.dtype)
        return (weight * expected).to(expected.dtype)

    @torch.no_grad()
    def step(self) -> None:
        """One controller step (the lock at its step), then :func:`lumos.step_gates_` (clamp,
        next noise)."""
        self.steps += 1
        if self.locked:
            pass
        elif self.steps < self.warmup * self.total_steps:
            self._lam = torch.zeros_like(self._lam)
        else:
            budget = self.budget()
            error = ((self._expected - budget) / budget).clamp(-1.0, 1.0)
            self._integral = (self._integral + self.dual_lr * error).clamp(0.0, self.lam_max)
            lam = self._integral + self.kp * error
            self._saturated |= lam >= self.lam_max
            self._lam = lam.clamp(0.0, self.lam_max)
        if self.lock_step is not None and not self.locked and self.steps >= self.lock_step:
            lock_to_budget(self.model, self.target, self.cost)
            self.locked = True
            self._lam = torch.zeros_like(self._lam)
        step_gates_(self.model)

    @property
    def lam(self) -> float:
        """The current weight (reads it back from the device)."""
        return float(self._lam)

    @property
    def kept(self) -> float:
        """The fraction of the dense cost the eval masks keep now (reads it back from the device)."""
        return kept_fraction(self.model, self.cost)

    @property
    def expected(self) -> float:
        """The expected fraction ``E`` at the last :meth:`penalty` call."""
        return float(self._expected)

    @property
    def saturated(self) -> bool:
        """Whether ``lam`` has hit ``lam_max``: the target is out of reach at this pressure."""
        return bool(self._saturated)

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume this controller exactly."""
        return {"lam": self._lam.clone(), "integral": self._integral.clone(), "expected": self._expected.clone(),
                "saturated": self._saturated.clone(), "locked": self.locked,
                "steps": self.steps, "target": self.target, "cost": self.cost, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        device = self._lam.device
        for name in ("lam", "integral", "expected", "saturated"):
            setattr(self, "_" + name, state[name].to(device))
        self.steps, self.locked = int(state["steps"]), bool(state["locked"])


@torch.no_grad()
def lock_to_budget(model: nn.Module, target: float, cost: str = "params") -> None:
    """Fix ``model``'s architecture at the largest one within ``target``: the ``k`` gate units with
    the largest ``log_alpha`` are set open (``LOG_ALPHA_MAX``, mask exactly 1), every other one
    closed (``LOG_ALPHA_MIN``), with the largest ``k`` whose model costs at most ``target`` of the
    dense ``cost`` (binary search on ``k`` with the exact cost of the eval masks; ties broken by
    unit order). A gate that keeps any unit now keeps at least its best one: ranking units
    across layers must not remove a layer that training kept (a closed layer on the input's
    path would make the model a constant). A fixed number of device ops, no read-back."""
    costs = cost_model(model)
    logits = [g.log_alpha for g in costs.gates]
    flat = torch.cat([t.detach() for t in logits])
    n = flat.numel()
    sizes = torch.tensor([g.n for g in costs.gates], device=flat.device)
    gate_of = torch.repeat_interleave(torch.arange(len(logits), device=flat.device), sizes)
    best = torch.full((len(logits),), -math.inf, dtype=flat.dtype, device=flat.device)
    best = best.scatter_reduce(0, gate_of, flat, "amax")
    alive = torch.zeros(len(logits), dtype=torch.long, device=flat.device)
    alive = alive.scatter_reduce(0, gate_of, costs.kept_units().long(), "amax")
    candidate = (flat == best[gate_of]) & (alive[gate_of] > 0)
    per_gate = torch.zeros(len(logits), dtype=torch.long, device=flat.device).index_add(0, gate_of, candidate.long())
    earlier_gates = torch.cumsum(per_gate, 0) - per_gate
    first_best = candidate & (torch.cumsum(candidate.long(), 0) - earlier_gates[gate_of] == 1)
    key = torch.where(first_best, torch.full_like(flat, math.inf), flat)  # each kept gate's best unit first
    order = torch.argsort(key, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=flat.device)
    limit = target * costs.dense[cost] * (1 + 1e-9)
    low = torch.zeros((), dtype=torch.long, device=flat.device)  # top-`low` fits (the minimum always does)
    high = torch.full((), n, dtype=torch.long, device=flat.device)
    for _ in range(n.bit_length() + 1):
        middle = (low + high + 1) // 2
        fits = costs.actual_tensor(cost, rank < middle) <= limit
        low, high = torch.where(fits, middle, low), torch.where(fits, high, middle - 1)
    ends = torch.where(rank < low, LOG_ALPHA_MAX, LOG_ALPHA_MIN).to(flat.dtype)
    torch._foreach_copy_(logits, list(ends.split([g.n for g in costs.gates])))

