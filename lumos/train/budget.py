"""BudgetController: the Lagrangian weight on the L0 term that ends training at a target size."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..cost import check_cost, cost_model, kept_bound
from ..gates import fold_lock_scales_, gate_logits, gates_of, pin_gates_, step_gates_
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
    detached task loss, so that it weighs relative changes of the loss whatever its scale; with
    ``loss_cap``, never by more than the loss at the end of the warm-up).
    The run has three phases over ``total_steps``:

    1. warm-up (the first ``warmup`` of the steps): ``lam = 0``; the gates, which start open,
       stay at exactly 1 and the network trains densely;
    2. annealing (until ``anneal``): the budget goes from 1 to ``target`` (cosine) and ``lam``
       is a PI controller on the relative error ``e = clamp((K_h - budget) / budget, -1, 1)``.
       ``K`` is the fraction the eval masks keep, smoothed
       (:meth:`lumos.cost.CostModel.soft_kept`: it moves as soon as the gates move, where the
       eval masks only change when a gate crosses its threshold), and ``K_h = K + h (K - K')``
       its value ``h`` steps ahead at its last step's rate (``K'``: the previous step's):

       .. math::
           I \leftarrow \mathrm{clamp}(I + \eta\, e,\ 0,\ \lambda_{max}), \qquad
           \lambda = \mathrm{clamp}(I + k_p\, e,\ 0,\ \lambda_{max})

       The look-ahead is for the optimiser's momentum: with Adam (``beta1 = 0.9``) a logit keeps
       moving for about ``beta1 / (1 - beta1) = 9`` steps after its gradient stops, so a
       controller that reacts to ``K`` alone releases the pressure too late, and the gates
       overshoot below the budget; the units that cross the lower threshold on the way never
       come back (their mask is exactly 0, with no gradient);

    3. lock: the first time the fraction the eval masks keep is at most ``target`` (watched
       from when the budget is within twice the target, each step comparing every logit with
       its gate's :func:`lumos.cost.kept_bound`: the eval masks' units without their rounding
       at the boundary), the architecture is fixed: that model
       (of the last two measured, the one closer to ``target``) has its kept gates pinned open
       and the others closed, ``lam`` drops to 0 and the remaining steps train its weights.
       Pinning keeps what the model computes (:func:`lumos.gates.pin_gates_`): a kept unit
       inside the stochastic band keeps its eval value as a constant ``lock_scale`` instead of
       jumping to 1 (measured on ``molecules`` full, seed 0: pinning to 1 took the validation
       R2 from 0.76 to -40, and Adam's second moments, filled by that step's gradients, held
       the model near R2 0 for the remaining 20 epochs). On CPU that scale is then moved into
       the weights of gated linear and convolution layers
       (:func:`lumos.gates.fold_lock_scales_`), so that the unit learns at full speed. If that
       has not happened by ``lock``, :func:`lock_to_budget` fixes the largest model within
       ``target`` by ranking ``log_alpha``.

    With ``lock=None`` the controller keeps tracking ``target`` to the end. On an accelerator
    everything stays on the device: no step reads a value back to the host. On CPU, where
    reading a tensor's value costs nothing, the controller's scalars are Python floats (the
    same float64 numbers, without a dozen 0-dim tensor ops per step).

    Args:
        model: the gated model.
        target: fraction of the dense cost to keep, in (0, 1]; a target below the smallest
            fraction the gates can reach (layers kept whole) is an error naming those layers.
        total_steps: the optimiser steps the run will take (e.g. ``epochs * len(loader)``).
        cost: ``"params"`` (default), ``"flops"`` or ``"count"``.
        warmup, anneal: where the warm-up and the annealing end, as fractions of ``total_steps``
            (0.2, 0.5).
        lock: the latest point to fix the architecture, as a fraction of ``total_steps`` (0.75);
            None: never fix it, track ``target`` to the end.
        dual_lr, kp: integral and proportional gains ``eta`` and ``k_p``.
        lookahead: ``h``, the steps ahead the error is taken (9: Adam's or SGD's momentum of
            0.9; 0 for an optimiser without momentum).
        lam_max: the bound on ``lam``; a run that reaches it cannot meet its target
            (:attr:`saturated`).
        relative: scale the penalty by the detached task loss given to :meth:`penalty`.
        loss_cap: cap that scale at the task loss of the end of the warm-up (default False; see
            :meth:`_loss_scale` for what it changes, measured).

    Usage (:meth:`step` after ``optimizer.step()`` also clamps the gates and moves their noise
    to the next step)::

        controller = lumos.BudgetController(gated, target=0.2, total_steps=epochs * len(loader))
        loss = task + controller.penalty(task)
        loss.backward(); optimizer.step(); controller.step()
    """

    host_scalars_on_cpu = True  # False: keep the PI state in tensors on CPU too, as on an accelerator (tests)

    def __init__(self, model: nn.Module, target: float, total_steps: int | None = None, cost: str = "params", *,
                 warmup: float = 0.2, anneal: float = 0.5, lock: float | None = 0.75, dual_lr: float = 1.0,
                 kp: float = 10.0, lookahead: float = 9.0, lam_max: float = LAM_MAX, relative: bool = True,
                 loss_cap: bool = False, who: str = "lumos.BudgetController"):
        check_gated(model, who)
        check_cost(cost, who)
        target = check_target(target, who)
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"{who}: `total_steps` must be the number of optimiser steps the run will take "
                             f"(a positive int, e.g. epochs * len(loader)), got {total_steps!r}")
        for name, value in (("warmup", warmup), ("anneal", anneal), ("lock", 0.0 if lock is None else lock)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{who}: `{name}` must be a fraction of the run in [0, 1], got {value!r}")
        if anneal < warmup or (lock is not None and lock < anneal):
            raise ValueError(f"{who}: need warmup <= anneal <= lock, got warmup={warmup}, anneal={anneal}, "
                             f"lock={lock}")
        for name, value in (("dual_lr", dual_lr), ("kp", kp), ("lookahead", lookahead), ("lam_max", lam_max)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (value == 0 and name == "lam_max"):
                raise ValueError(f"{who}: `{name}` must be a finite number >= 0 (lam_max > 0), got {value!r}")
        self.model, self.target, self.cost = model, target, cost
        self.min_fraction = check_reachable(model, target, cost, who)
        self.total_steps, self.warmup, self.anneal = total_steps, float(warmup), float(anneal)
        self.lock = None if lock is None else float(lock)
        self.dual_lr, self.kp, self.lam_max, self.relative = float(dual_lr), float(kp), float(lam_max), bool(relative)
        self.loss_cap = bool(loss_cap)
        self.lookahead = float(lookahead)
        self.lock_step = None if lock is None else max(1, round(self.lock * total_steps))
        self.steps = 0
        self.locked = False
        device = gates_of(model)[0][1].log_alpha.device
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self._expected, self._kept = zero + 1.0, zero + 1.0
        # The PI state (lam, integral, soft_kept and its previous value, saturated): 0-dim float64
        # tensors on an accelerator, so that no step reads a value back; Python floats on CPU, where
        # reading a tensor's value costs nothing and a dozen 0-dim tensor ops cost more than the rest
        # of the controller (the same IEEE float64 arithmetic: the same numbers).
        self._on_host = device.type == "cpu" and self.host_scalars_on_cpu
        if self._on_host:
            self._lam, self._integral, self._soft_kept, self._saturated = 0.0, 0.0, 1.0, False
        else:
            self._lam, self._integral, self._soft_kept = zero.clone(), zero.clone(), zero + 1.0
            self._saturated = torch.zeros((), dtype=torch.bool, device=device)
        self._soft_before = self._soft_kept  # None (a checkpoint without it): no rate at the next step
        self._locked = torch.zeros((), dtype=torch.bool, device=device)
        self._loss_ref = None  # the warm-up's task loss, which caps the penalty's scale (_loss_scale)
        self._units: torch.Tensor | None = None  # kept units measured at the last penalty() after the annealing
        self._last = (self._kept, None)  # the measurement before that

    def budget(self, step: int | None = None) -> float:
        """The fraction to keep at ``step`` (default: now): 1 during the warm-up, then cosine
        down to ``target`` until ``anneal * total_steps``, then ``target``."""
        step = self.steps if step is None else step
        start, end = self.warmup * self.total_steps, self.anneal * self.total_steps
        t = min(max(step - start, 0.0) / max(end - start, 1.0), 1.0)
        return self.target + (1.0 - self.target) * 0.5 * (1.0 + math.cos(math.pi * t))

    def penalty(self, task_loss: torch.Tensor | None = None) -> torch.Tensor:
        """``lam * E`` (times the detached ``task_loss`` when ``relative``), differentiable in
        the gates; also keeps ``E`` for :meth:`step`. On CPU, while ``lam`` is exactly 0 (the
        warm-up, after the lock, or while the budget does not bind), it is a constant 0 without
        a graph: its gradient is exactly 0, and the step skips the cost's backward."""
        costs = cost_model(self.model)
        graph = torch.is_grad_enabled() and not (self._on_host and self._lam == 0.0)
        measure = self._measures_kept()
        with torch.set_grad_enabled(graph):  # one vectorised evaluation
            expected, soft_kept, *units = costs.expected_and_soft_kept(self.cost, normalize=True, units=measure)
        self._expected = expected.detach() if graph else expected
        self._soft_kept = soft_kept.item() if self._on_host else soft_kept.double()  # the controller computes in float64
        if measure:
            self._measure(costs, units[0])
        weight = self._lam
        if self.relative and task_loss is not None:
            weight = weight * self._loss_scale(task_loss.item() if self._on_host else task_loss.detach())
        if not self._on_host:
            return weight.to(expected.dtype) * expected  # the weight carries no gradient: one product in the graph
        if expected.dtype not in (torch.float32, torch.float64):  # torch would multiply by the float unrounded
            weight = torch.tensor(weight, dtype=torch.float64).to(expected.dtype).item()
        return expected * weight  # torch rounds the float to float32 first, as weight.to(float32) does

    @torch.no_grad()
    def _measure(self, costs, units: torch.Tensor) -> None:
        """Record the eval masks' fraction of the dense cost with these kept ``units``, keeping the
        previous measurement. On CPU, units the same as last time's have the same cost: one
        comparison instead of the evaluation (the units change only when a logit crosses its
        threshold)."""
        self._last = (self._kept, self._units)
        if self._on_host and self._units is not None and torch.equal(units, self._units):
            return
        self._kept, self._units = costs.actual_tensor(self.cost, units) / costs.dense[self.cost], units

    def _loss_scale(self, task):
        """The detached task loss that scales the penalty (``relative``); with ``loss_cap``, capped
        at the loss the network reached by the end of the warm-up (an average of its last steps,
        about ten, then frozen; without a warm-up, the first step's loss).

        While gates are inside the stochastic band the loss rises, and a penalty that rises with it
        closes more gates, which raises the loss again. On an SRResNet (x2 super-resolution of a
        two-field flow, target 0.3, 640 steps, seeds 0-29) with a gate per layer
        (``lumos.gate(..., share_gates=False)``), whose residual stream the penalty could not
        shrink, that loop ended with a needed input closed in 4 runs and a constant model in
        16 (9 good); capped, 9 and 0 (20 good; ``bench/results/training-superres-cpu.md``).
        With shared gates (the default) every
        run keeps both inputs, capped or not (seeds 0-9 capped). On the
        built-in workloads (``bench/results/workloads-cpu-losscap.md``) the cap cost accuracy on
        em_denoise (16.7 / 5.4 / 11.3% against 12.8 / 4.8 / 9.2%) and kept a distractor on
        molecules seed 1: so it is an option, not the default."""
        if not self.loss_cap:
            return task
        warm = self._loss_ref is None or self.steps < self.warmup * self.total_steps
        if self._on_host:
            if warm:
                self._loss_ref = task if self._loss_ref is None else 0.9 * self._loss_ref + 0.1 * task
            return min(task, self._loss_ref)  # a NaN loss stays NaN (the run's divergence check names it)
        task = task.double()
        if warm:
            self._loss_ref = task.clone() if self._loss_ref is None else self._loss_ref * 0.9 + task * 0.1
        return torch.where(task > self._loss_ref, self._loss_ref, task)

    def _measures_kept(self) -> bool:
        """Once the budget is within twice the target and until the lock, the eval masks' fraction
        is measured, so that the lock catches the step where it crosses the target."""
        return (self.lock_step is not None and not self.locked and self.steps >= self.warmup * self.total_steps
                and self.budget() <= 2 * self.target)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> None:
        """One controller step (and the lock, when due), then :func:`lumos.step_gates_` (clamp,
        next noise).

        ``closure``: as in ``torch.optim.Optimizer.step``, a function that computes the task loss
        of the current batch again (e.g. ``lambda: loss_fn(gated(x), y)``; called without
        gradients). When the lock happens on CPU it decides how the kept units are pinned: at
        their eval values or at exactly 1, whichever gives the lower loss (see
        :func:`pin_to_lower_loss_`). Without it, or on an accelerator (where the lock reads
        nothing back), the eval values are kept."""
        self.steps += 1
        soft = self._soft_kept
        before = soft if self._soft_before is None else self._soft_before
        self._soft_before = soft
        if self.locked:
            pass
        elif self.steps < self.warmup * self.total_steps:
            self._lam = _zero(self._lam)
        else:
            budget = self.budget()
            ahead = soft + self.lookahead * (soft - before)  # where the optimiser's momentum carries the gates
            error = _clamp((ahead - budget) / budget, -1.0, 1.0)
            self._integral = _clamp(self._integral + self.dual_lr * error, 0.0, self.lam_max)
            lam = self._integral + self.kp * error
            self._saturated |= lam >= self.lam_max
            self._lam = _clamp(lam, 0.0, self.lam_max)
            if self._units is not None:
                self._lock_when_within_target(closure)
        if self.lock_step is not None and not self.locked and self.steps >= self.lock_step:
            if not bool(self._locked):  # the deadline, one read-back: fix the largest model within target
                lock_to_budget(self.model, self.target, self.cost, closure=closure)
            self.locked = True
        if self.locked:
            self._lam = _zero(self._lam)
        step_gates_(self.model)

    def _lock_when_within_target(self, closure: Callable[[], torch.Tensor] | None) -> None:
        """On the device, no read-back: the first time the eval masks keep at most ``target``, pin
        that model (of the last two measured, the one closer to ``target``); ``lam`` is 0 from then.
        On CPU, where a read-back costs nothing, a step that does not lock returns at once."""
        if self._on_host:
            if bool(self._locked):
                self._lam = 0.0
                return
            if not bool(self._kept <= self.target):
                return
        lock_now = ~self._locked & (self._kept <= self.target)
        units = self._units
        last_kept, last_units = self._last
        if last_units is not None:
            closer = (last_kept - self.target).abs() < (self._kept - self.target).abs()
            units = torch.where(closer, last_units, units)
        if self._on_host:
            pin_to_lower_loss_(cost_model(self.model).gates, units, closure)
            fold_lock_scales_(self.model)
        else:
            pin_gates_(cost_model(self.model).gates, units, lock_now)
        self._locked |= lock_now
        # on CPU only a step that locks gets here
        self._lam = 0.0 if self._on_host else torch.where(self._locked, torch.zeros_like(self._lam), self._lam)

    @property
    def lam(self) -> float:
        """The current weight (reads it back from the device, and with it whether the lock happened)."""
        self.locked = self.locked or bool(self._locked)
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
        return {"lam": _as_state(self._lam), "integral": _as_state(self._integral), "expected": self._expected.clone(),
                "soft_before": None if self._soft_before is None else _as_state(self._soft_before),
                "kept": self._kept.clone(), "saturated": _as_state(self._saturated),
                "locked_on_device": self._locked.clone(),
                "units": self._units, "last": self._last, "locked": self.locked,
                "loss_ref": None if self._loss_ref is None else _as_state(self._loss_ref),
                "steps": self.steps, "target": self.target, "cost": self.cost, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        device = self._expected.device
        for name in ("expected", "kept"):
            setattr(self, "_" + name, state[name].to(device))
        for name in ("lam", "integral", "saturated"):
            setattr(self, "_" + name, state[name].item() if self._on_host else state[name].to(device))
        before = state.get("soft_before")  # absent from checkpoints written before the look-ahead
        self._soft_before = None if before is None else before.item() if self._on_host else before.to(device)
        self._locked = state["locked_on_device"].to(device)
        self._units, self._last = state["units"], state["last"]
        self.steps, self.locked = int(state["steps"]), bool(state["locked"])
        ref = state.get("loss_ref")  # absent from checkpoints written before the cap
        self._loss_ref = None if ref is None else ref.item() if self._on_host else ref.to(device)


def gate_logit_group(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict | None:
    """The first parameter group of ``optimizer`` holding any of ``model``'s gate logits, or None."""
    logits = {id(logit) for logit in gate_logits(model)}
    return next((g for g in optimizer.param_groups if any(id(p) in logits for p in g["params"])), None)


def momentum_lookahead(optimizer: torch.optim.Optimizer, model: nn.Module, who: str = "lumos.fit") -> float:
    """``BudgetController``'s ``lookahead`` for ``optimizer``: ``b / (1 - b)``, the steps a logit
    keeps moving after its gradient stops, for the momentum ``b`` of the parameter group holding
    ``model``'s gate logits (``betas[0]`` of Adam and its kin, ``momentum`` of SGD or RMSprop);
    0 for a group with neither (no momentum). Adam's default 0.9 gives 9. An optimizer without
    the gate logits, which could never reach a target, or with a momentum outside [0, 1) for
    them, is an error naming ``who``."""
    group = gate_logit_group(optimizer, model)
    if group is not None:
        momentum = float(group["betas"][0] if "betas" in group else group.get("momentum", 0.0))
        if not 0.0 <= momentum < 1.0:  # torch.optim.SGD accepts momentum=1 and above
            raise ValueError(f"{who}: `optimizer` moves the gate logits with momentum {momentum}; a logit "
                             "then never stops moving once its gradient does, so no target could be held: "
                             "use a momentum in [0, 1) for the gate logits' group")
        return round(momentum / (1.0 - momentum), 9)  # 0.9 gives 9.0, not 9.000000000000002
    raise ValueError(f"{who}: `optimizer` does not hold the model's gate logits, so no gate could close "
                     "towards `target`; build it over lumos.param_groups(model, lr) or model.parameters()")


def anneal_too_short(controller: BudgetController, optimizer: torch.optim.Optimizer) -> tuple[str, int] | None:
    """``(why, steps)`` when ``controller``'s annealing phase is too short for the gates to close in
    it (``steps``: the fewest ``total_steps`` long enough), else None.

    Adam (and its kin, the groups with ``betas``) moves a parameter by about its learning rate per
    step, so over the annealing phase a gate logit travels at most about ``steps * gate_lr``; a
    gate must travel from its logit now (the median over the model's gates) to the bound where its
    eval mask is 0 (:func:`lumos.cost.kept_bound`) for the model to shrink. When it cannot, the
    budget runs ahead of the gates, ``lam`` climbs to its bound and every gate falls at once at the
    end of the phase (an SRResNet of 29k parameters at 160 steps, target 0.3: validation loss
    0.069 and 0.102 on two seeds against 0.034 at 640 steps; with a gate per layer one of its two
    needed inputs closed on both, 0.24). None for optimizers
    without ``betas`` (their step scales with the gradient: no such bound)."""
    group = gate_logit_group(optimizer, controller.model)
    if group is None or "betas" not in group:
        return None
    gates = [gate for _, gate in gates_of(controller.model)]
    steps = (controller.anneal - controller.warmup) * controller.total_steps
    with torch.no_grad():
        travel = torch.cat([gate.log_alpha.detach().flatten().double().cpu() - kept_bound(gate, torch.float64)
                            for gate in gates]).median().item()
    reach = steps * float(group["lr"])
    if reach >= travel:
        return None
    why = (f"the budget anneals over {steps:.0f} optimiser steps, and with Adam a gate logit moves about its "
           f"learning rate ({float(group['lr']):g}) per step: {reach:.1f} logit units, short of the {travel:.1f} "
           "a gate travels to close. The controller then raises lam until every gate falls at once, which can "
           "close needed inputs or a whole layer")
    return why, math.ceil(controller.total_steps * travel / reach)


def _clamp(value, low: float, high: float):
    """``value`` (a float, or a 0-dim tensor) clamped into [low, high]; NaN stays NaN, as in torch.clamp."""
    if isinstance(value, torch.Tensor):
        return value.clamp(low, high)
    return value if math.isnan(value) else min(max(value, low), high)


def _zero(value):
    """0 of ``value``'s kind (a float, or a 0-dim tensor)."""
    return torch.zeros_like(value) if isinstance(value, torch.Tensor) else 0.0


def _as_state(value) -> torch.Tensor:
    """A controller scalar (a float, bool or 0-dim tensor) as the tensor a checkpoint holds."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    return torch.tensor(value, dtype=torch.bool if isinstance(value, bool) else torch.float64)


@torch.no_grad()
def pin_to_lower_loss_(gates: list, keep: torch.Tensor, closure: Callable[[], torch.Tensor] | None) -> None:
    """:func:`lumos.gates.pin_gates_` with the kept units at their eval values or at exactly 1,
    whichever gives the lower ``closure()`` loss (ties, NaN or no ``closure``: the eval values).

    Neither choice is right for every model: a unit inside the stochastic band was on in some
    training steps and off in others. Setting many such units to 1 at once can give the
    downstream layers inputs far larger than any training step did (molecules, full, seed 0:
    validation R2 from 0.76 to -40); keeping their eval values keeps the eval-mode model, which
    can itself be far from the network training saw (late_quadratic at Adam lr 1e-3: eval-mode
    R2 0.01 just before the lock, 0.73 with every kept unit at 1). The batch decides."""
    pin_gates_(gates, keep)
    if closure is None:
        return
    # the logits are pinned alike either way: the two choices differ in the kept units' scales only
    scales = [g.lock_scale for g in gates]
    eval_values = [scale.clone() for scale in scales]
    loss_eval_values = float(closure())
    for scale in scales:
        scale.fill_(1.0)
    if not float(closure()) < loss_eval_values:
        torch._foreach_copy_(scales, eval_values)


@torch.no_grad()
def lock_to_budget(model: nn.Module, target: float, cost: str = "params",
                   closure: Callable[[], torch.Tensor] | None = None) -> None:
    """Fix ``model``'s architecture at the largest one within ``target``: the ``k`` gate units with
    the largest ``log_alpha`` are pinned open, every other one closed
    (:func:`lumos.gates.pin_gates_`: a kept unit keeps its eval value as its ``lock_scale``, or
    is set to exactly 1 where that gives ``closure`` a lower loss: :func:`pin_to_lower_loss_`),
    with the largest ``k`` whose model costs at most ``target`` of the dense ``cost`` (binary search on ``k`` with the exact cost of the eval masks; ties broken by
    unit order). A gate that keeps any unit now keeps at least its best one, even where that
    exceeds ``target``: ranking units across layers must not remove a layer that training kept
    (a closed layer on the input's path would make the model a constant). A fixed number of
    device ops, no read-back."""
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
    # top-`low` is kept: at least each kept gate's best unit, even above the target (a constant model
    # fits any budget but is useless; fit then warns that the run ended above its target)
    low = first_best.sum()
    high = torch.full((), n, dtype=torch.long, device=flat.device)
    for _ in range(n.bit_length() + 1):
        middle = (low + high + 1) // 2
        fits = costs.actual_tensor(cost, rank < middle) <= limit
        low, high = torch.where(fits, middle, low), torch.where(fits, high, middle - 1)
    pin_to_lower_loss_(costs.gates, rank < low, closure)
    fold_lock_scales_(model)

