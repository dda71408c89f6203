"""What gated training costs and what it finds, on the tasks of ``tests/zoo_training.py``.

Three measurements:

- ``train-step-batch-256`` (pytest-benchmark): one training step of the 12-512x3-3 surrogate
  MLP of ``bench_compaction.py`` at batch 256, plain (forward, MSE, backward, Adam) against
  gated as :func:`lumos.fit` runs it (:func:`lumos.train_step` with a
  :class:`lumos.BudgetController`: one sampling call, one vectorised cost evaluation, the
  controller's update and the gates' clamp). Two gated variants: ``gated-in-band`` is the
  annealing phase, the costliest step (gates in the stochastic band, the penalty acting with
  ``lam > 0``, the eval masks' fraction measured for the lock); ``gated-outside-band`` the
  warm-up (gates open, ``lam = 0``); ``plain-compiled`` and ``gated-in-band-compiled`` run
  both forwards through ``torch.compile`` (``lumos.fit(compile=True)``). The figure is gated
  median / plain median (issue 10 asks for at most 1.15x)::

      python -m pytest bench/bench_training.py --benchmark-enable --benchmark-only \\
          --benchmark-columns=median,iqr,min,rounds -q

  and, timing three copies of each step in a random order every round, so that load from other
  processes, the order and where a copy's tensors land in memory hit every variant alike::

      OMP_NUM_THREADS=1 python bench/bench_training.py overhead

  (wall-time medians: the mean ratio over the copies and its range), and where the time goes, phase
  by phase (forward, penalty, backward, optimiser, controller), for the plain step, the gated
  step and :func:`floor_step`::

      OMP_NUM_THREADS=1 python bench/bench_training.py phases

- ``schedules``: the experiment that chose the gate schedule (README, "The gates"): each
  schedule x task x seed trained with ``lumos.fit(target=0.1)``, reporting the inputs kept
  (relevant ones lost, irrelevant ones kept), the final fraction of parameters and R^2::

      OMP_NUM_THREADS=1 python bench/bench_training.py schedules

- ``superres``: training on a model lumos was not built for (an SRResNet doing x2
  super-resolution of two fields, both needed), 10 seeds: the default, a gate per layer
  (``lumos.gate(..., share_gates=False)``, what lumos did before the residual stream's
  producers shared one gate), ``loss_cap=True`` and both (README, "How a run reaches its
  budget")::

      OMP_NUM_THREADS=1 python bench/bench_training.py superres [--seeds 0 1 2] [--epochs 40]

- ``residual``: shared gates against a gate per layer on two more residual models with known
  inputs, a ResNet of BasicBlocks regressing a field and a residual MLP on the ``schedules``
  tasks (README, "What an input gate can miss")::

      OMP_NUM_THREADS=1 python bench/bench_training.py residual [--seeds 0 1 2 3]

- ``compare``: lumos (gates, then fine-tuning of the compacted model) against Torch-Pruning's
  L1 magnitude pruning (dense training, global magnitude ranking to the same parameter count
  within 5%, the same fine-tuning) at about 10% and 5% of the parameters, same optimiser, epochs and batches
  for both (needs ``pip install torch-pruning``)::

      OMP_NUM_THREADS=1 python bench/bench_training.py compare
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lumos
from lumos.report import count_params
from lumos_kernels.hard_concrete import BETA, GAMMA, ZETA, log_alpha_bounds

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from bench_compaction import HIDDEN, N_FEATURES, N_OUTPUTS, TRAIN_BATCH, measure, run_info, surrogate_mlp  # noqa: E402
from zoo_training import TASKS, ResidualMLP, Task, field_product, field_resnet, two_field_superres  # noqa: E402

EPOCHS, LR, BATCH = 20, 1e-2, 256  # the one setting every task and schedule trains with
TARGET = 0.1
SEEDS = (0, 1, 2)
# The schedule lumos uses, and four variants that each change one part of it (an ablation).
# "reference init": the LUMOS reference code's drop rate 0.5, every gate inside the stochastic band.
SCHEDULES = {
    "default: open init, warm-up to 0.2, budget annealed to 0.5, lock": (dict(), dict()),
    "reference init (drop rate 0.5)": (dict(init_drop_rate=0.5), dict()),
    "no warm-up": (dict(), dict(warmup=0.0)),
    "no annealing (whole budget after the warm-up)": (dict(), dict(anneal=0.2)),
    "no lock": (dict(), dict(lock=None)),
}


def train_gated(task: Task, seed: int, target: float, gate_kwargs: dict | None = None,
                controller_options: dict | None = None, epochs: int = EPOCHS,
                lr: float = LR) -> tuple[nn.Module, lumos.History]:
    """``lumos.gate`` + ``lumos.fit(target=...)`` on ``task`` with the shared setting."""
    torch.manual_seed(seed)
    gated = lumos.gate(task.make_model(), task.train[0][:64], **(gate_kwargs or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a missed target shows in the table
        history = lumos.fit(gated, task.train, task.val, target=target, epochs=epochs, lr=lr, batch_size=BATCH,
                            metric=task.metric, seed=seed, progress=False, controller_options=controller_options)
    return gated, history


def kept_inputs(gated: lumos.GatedModel) -> list[int]:
    return gated.feature_gate.gate.kept().nonzero().flatten().tolist()


def schedule_row(name: str, task_name: str, seed: int, epochs: int = EPOCHS, lr: float = LR) -> dict:
    task = TASKS[task_name](0)
    gate_kwargs, options = SCHEDULES[name]
    gated, history = train_gated(task, seed, TARGET, gate_kwargs, options, epochs, lr)
    kept = set(kept_inputs(gated))
    return {"schedule": name, "task": task_name, "seed": seed,
            "lost": sorted(set(task.relevant) - kept), "extra": sorted(kept - set(task.relevant)),
            "fraction": lumos.kept_fraction(gated), "r2": lumos.evaluate(gated, task.val, metric=task.metric)[1]}


def schedules(epochs: int = EPOCHS, lr: float = LR, names: list[str] | None = None, seeds=SEEDS) -> None:
    print(f"lumos.fit(target={TARGET}, epochs={epochs}, lr={lr}, batch_size={BATCH}), seeds {tuple(seeds)}\n")
    print("| schedule | task | seed | relevant inputs lost | irrelevant inputs kept | fraction of params | val R2 |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name in names or SCHEDULES:
        for task_name in TASKS:
            for seed in seeds:
                r = schedule_row(name, task_name, seed, epochs, lr)
                rows.append(r)
                print(f"| {r['schedule']} | {r['task']} | {r['seed']} | {r['lost'] or '-'} | {r['extra'] or '-'} | "
                      f"{r['fraction']:.3f} | {r['r2']:.4f} |", flush=True)
    print(f"\n| schedule (lr {lr}) | runs losing a relevant input | runs keeping an irrelevant input | "
          f"runs within {TARGET} +- 0.02 | fraction | val R2 median (min) |")
    print("|---|---|---|---|---|---|")
    for name in names or SCHEDULES:
        mine = [r for r in rows if r["schedule"] == name]
        r2 = sorted(r["r2"] for r in mine)
        fractions = [r["fraction"] for r in mine]
        print(f"| {name} | {sum(bool(r['lost']) for r in mine)}/{len(mine)} | "
              f"{sum(bool(r['extra']) for r in mine)}/{len(mine)} | "
              f"{sum(abs(f - TARGET) <= 0.02 for f in fractions)}/{len(mine)} | "
              f"{min(fractions):.3f}-{max(fractions):.3f} | {r2[len(r2) // 2]:.3f} ({r2[0]:.3f}) |")


class Laps:
    """The phases of training steps, timed: :meth:`start` when a step begins, ``laps(name)`` when
    its phase ``name`` ends (``times[name]``: seconds, one entry per step). A step's phases are
    those of :data:`PHASES`; the optimiser's hooks mark the end of the backward and of the step."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}
        self._last = 0.0

    def start(self) -> None:
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.times.setdefault(name, []).append(now - self._last)
        self._last = now

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Mark ``backward`` (``zero_grad`` and ``backward``) at the optimiser's step, ``optimizer`` after it."""
        optimizer.register_step_pre_hook(lambda *_: self("backward"))
        optimizer.register_step_post_hook(lambda *_: self("optimizer"))


# forward (with the gates' sampling and the task loss), penalty (the L0 term), backward
# (zero_grad and backward), optimizer (its step), controller (the gates' clamp, the lock's
# measurement, the controller's update)
PHASES = ("forward", "penalty", "backward", "optimizer", "controller")


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               laps: Laps | None = None) -> torch.Tensor:
    """The step a user writes without lumos: forward, MSE, backward, Adam (``laps``: timed by phase)."""
    if laps is not None:
        laps.start()
    loss = F.mse_loss(model(x), y)
    if laps is not None:
        laps("forward")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def step_pair(in_band: bool = True, seed: int = 0, compiled: bool = False, laps: tuple[Laps, Laps] | None = None):
    """``(plain step, gated step)`` closures on the surrogate MLP at batch ``TRAIN_BATCH``.

    ``in_band``: the annealing phase, the costliest: every gate inside the stochastic band (so
    every step draws noise and every gate gets a task gradient) and the budget below the
    model's size, so the penalty acts (``lam > 0``, checked once) and the cost's gradient is
    computed; the gates' learning rate is 0 so that they stay in the band however many steps
    are timed (Adam does the same work at any learning rate). Otherwise the warm-up: every gate
    open, masks exactly 1, ``lam = 0``. ``compiled``: both forwards run through
    ``torch.compile`` (as ``lumos.fit(compile=True)`` runs the gated one). ``laps``: the plain
    and the gated step's :class:`Laps`, which time their :data:`PHASES` from the first step on
    (the gated step's through its loss function, the controller's methods and the optimiser's
    hooks: :func:`lumos.train_step` runs as it is).
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(TRAIN_BATCH, N_FEATURES, generator=generator)
    y = torch.randn(TRAIN_BATCH, N_OUTPUTS, generator=generator)
    torch.manual_seed(seed)
    dense = surrogate_mlp()
    gated = lumos.gate(dense, x[:8])
    plain_optimizer = torch.optim.Adam(dense.parameters(), lr=LR)
    groups = lumos.param_groups(gated, lr=LR)
    if in_band:
        for group in groups[1:]:
            group["lr"] = 0.0
    gated_optimizer = torch.optim.Adam(groups)
    controller = (lumos.BudgetController(gated, target=0.2, total_steps=10**6, warmup=0.0, anneal=0.0) if in_band
                  else lumos.BudgetController(gated, target=0.2, total_steps=10**6, warmup=0.5))
    if in_band:
        with torch.no_grad():
            for _, gate in lumos.gates_of(gated):
                gate.log_alpha.uniform_(-1.0, 1.0)
    plain_forward, gated_forward = (torch.compile(dense), torch.compile(gated)) if compiled else (dense, None)
    loss_fn = F.mse_loss
    plain_laps, gated_laps = laps if laps is not None else (None, None)
    if gated_laps is not None:
        loss_fn = _timed(F.mse_loss, gated_laps, "forward")
        controller.penalty = _timed(controller.penalty, gated_laps, "penalty")
        controller.step = _timed(controller.step, gated_laps, "controller")
        gated_laps.watch(gated_optimizer)
        plain_laps.watch(plain_optimizer)

    def gated_step() -> torch.Tensor:
        if gated_laps is not None:
            gated_laps.start()
        return lumos.train_step(gated, (x,), y, gated_optimizer, loss_fn=loss_fn, controller=controller,
                                forward=gated_forward)

    gated_step()
    if in_band:
        for name, gate in lumos.gates_of(gated):
            grad = gate.log_alpha.grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        gated_step()
        assert controller.lam > 0, "the bench's annealing step must carry the penalty"
    return (lambda: plain_step(plain_forward, plain_optimizer, x, y, plain_laps)), gated_step


def _timed(fn, laps: Laps, name: str):
    """``fn`` that marks the end of phase ``name`` when it returns."""
    def timed(*args, **kwargs):
        out = fn(*args, **kwargs)
        laps(name)
        return out
    return timed


def floor_step(seed: int = 0, laps: Laps | None = None):
    """The least an annealing-phase gated step can cost in eager PyTorch: the step of
    :func:`step_pair` (same MLP, data, Adam and gate learning rate 0) written by hand for this one
    model, with what issue 10 asks a step to do and nothing of lumos' generality:

    - one flat logit vector (one Adam parameter, stepped by the fused Adam as lumos' gate logits
      are, no concatenation or split of the logits);
    - one sampling: ``torch.rand`` noise (cheaper than lumos' counter-based SplitMix64 uniforms),
      the hard-concrete formula with the thresholds as the clamp's bounds, differentiated by
      autograd;
    - the masks on the input features and on each hidden layer's outputs;
    - one vectorised cost: every layer's expected widths from ``p_open`` in one matrix product,
      parameters ``sum_l E[in]_l E[out]_l + E[out]_l``, times a fixed ``lam``;
    - the measurement the lock needs: the eval masks' exact parameter count (one comparison, one
      float64 matrix product) and a PI update on Python floats; the clamp of the logits.

    Its ratio to the plain step bounds what any eager implementation of issue 10's step can reach
    on this model and machine. ``laps``: timed by phase (:data:`PHASES`)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(TRAIN_BATCH, N_FEATURES, generator=generator)
    y = torch.randn(TRAIN_BATCH, N_OUTPUTS, generator=generator)
    torch.manual_seed(seed)
    linears = [m for m in surrogate_mlp() if isinstance(m, nn.Linear)]
    widths = [N_FEATURES] + [HIDDEN] * (len(linears) - 1)  # the gated units: inputs, then each hidden layer
    logits = nn.Parameter(torch.empty(sum(widths)).uniform_(-1.0, 1.0))
    optimizer = torch.optim.Adam([{"params": [p for m in linears for p in m.parameters()], "lr": LR},
                                  {"params": [logits], "lr": 0.0, "fused": True, "foreach": False}])
    # [E[in] | E[out]] = p @ A + c: unit j of gate g feeds layer g and is an output of layer g - 1
    layers = len(linears)
    a = torch.zeros(sum(widths), 2 * layers, dtype=torch.float64)
    c = torch.zeros(2 * layers, dtype=torch.float64)
    start = 0
    for g, n in enumerate(widths):
        a[start:start + n, g] = 1.0
        if g > 0:
            a[start:start + n, layers + g - 1] = 1.0
        start += n
    c[2 * layers - 1] = N_OUTPUTS
    a32, c32 = a.float(), c.float()
    dense_params = float(sum(p.numel() for m in linears for p in m.parameters()))
    closed_max, open_min = log_alpha_bounds(dtype=torch.float32)
    shift = BETA * math.log(-GAMMA / ZETA)
    kept_above = max(closed_max, math.log(-GAMMA / ZETA))  # z_hat > 0 above logit(-gamma / (zeta - gamma))
    state = {"lam": 0.5, "integral": 0.5}

    def step() -> torch.Tensor:
        if laps is not None:
            laps.start()
        u = torch.rand(logits.shape)
        z = torch.sigmoid((torch.logit(u, eps=1e-6) + logits) * 1.5) * 1.2 - 0.1
        masks = z.clamp(logits.detach() >= open_min, logits.detach() > closed_max).split(widths)
        h = x * masks[0]
        for linear, m in zip(linears[:-1], masks[1:]):
            h = F.silu(linear(h) * m)
        task = F.mse_loss(linears[-1](h), y)
        if laps is not None:
            laps("forward")
        e_in, e_out = torch.addmm(c32, torch.sigmoid(logits - shift)[None], a32)[0].split(layers)
        cost = (e_in * e_out + e_out).sum() / dense_params
        loss = task + (state["lam"] * task.item()) * cost
        if laps is not None:
            laps("penalty")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            logits.clamp_(lumos.gates.LOG_ALPHA_MIN, lumos.gates.LOG_ALPHA_MAX)
            k_in, k_out = torch.addmm(c, (logits > kept_above).double()[None], a)[0].split(layers)
            kept = float((k_in * k_out + k_out).sum()) / dense_params
        state["kept"] = kept  # what the lock would compare with the target
        error = min(max((cost.item() - 0.2) / 0.2, -1.0), 1.0)
        state["integral"] = min(max(state["integral"] + error, 0.0), 1e3)
        state["lam"] = min(max(state["integral"] + 10.0 * error, 0.0), 1e3)
        if laps is not None:
            laps("controller")
        return task.detach()

    if laps is not None:
        laps.watch(optimizer)
    return step


@pytest.mark.parametrize("variant", ["plain", "gated-in-band", "gated-outside-band", "plain-compiled",
                                     "gated-in-band-compiled"])
def test_train_step_overhead(benchmark, variant):
    plain, gated = step_pair(in_band=not variant.startswith("gated-outside"), compiled=variant.endswith("compiled"))
    benchmark.group = f"train-step-batch-{TRAIN_BATCH}"
    benchmark.extra_info.update(variant=variant, batch=TRAIN_BATCH, **run_info(torch.zeros(1, N_FEATURES)))
    measure(benchmark, plain if variant.startswith("plain") else gated)


def op_count(fn) -> int:
    """Tensor ops one call of ``fn`` dispatches (torch's profiler, top-level and nested)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))


def interleaved(steps: dict, rounds: int, warm_up: int = 20, after_warm_up=None) -> dict[object, list[float]]:
    """Every step of ``steps`` (key -> closure) run ``warm_up`` times, ``after_warm_up()`` called,
    then ``rounds`` rounds that each run every step once in a random order (seeded), so that load
    from other processes and the order hit every step alike: the wall time of each call, by key."""
    for _ in range(warm_up):
        for fn in steps.values():
            fn()
    if after_warm_up is not None:
        after_warm_up()
    wall = {key: [] for key in steps}
    order, shuffle = list(steps), random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for key in order:
            start = time.perf_counter()
            steps[key]()
            wall[key].append(time.perf_counter() - start)
    return wall


def overhead(rounds: int = 200, instances: int = 3) -> None:
    """Gated over plain step time. Each variant is built ``instances`` times (the same numbers,
    other memory: the same step on another copy of the model runs up to 2% faster or slower, from
    where its tensors land) and every round times them all once in a random order, so that load
    from other processes and the order hit every variant alike. The ratio is each gated instance's
    median over the plain instances' median: mean and range over instances. In the band also
    :func:`floor_step`, the least an eager implementation can cost (and the gated step over it,
    which moves less with the machine's state than either ratio to the plain step), and both steps
    with their forwards through ``torch.compile`` (against the eager plain step too)."""
    print(f"batch {TRAIN_BATCH}, {torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.2f}, "
          f"{rounds} rounds of {instances} instances of each variant in random order", flush=True)
    for in_band, compiled in ((True, False), (False, False), (True, True)):
        steps = {}
        for i in range(instances):
            steps["plain", i], steps["gated", i] = step_pair(in_band, compiled=compiled)
            if in_band and not compiled:
                steps["floor", i] = floor_step()
            if compiled:
                steps["eager plain", i] = step_pair(in_band)[0]
        wall = interleaved(steps, rounds)
        median = {key: sorted(t)[len(t) // 2] for key, t in wall.items()}

        def across(name: str) -> float:  # the middle copy's median
            return sorted(median[name, i] for i in range(instances))[instances // 2]

        plain = across("plain")

        def step_ms(name: str) -> str:
            return f"{1e3 * sum(median[name, i] for i in range(instances)) / instances:.3f} ms"

        def ratio(name: str, over: float) -> str:
            ratios = [median[name, i] / over for i in range(instances)]
            return f"{sum(ratios) / instances:.3f}x ({min(ratios):.3f}-{max(ratios):.3f})"

        line = f"gates {'inside' if in_band else 'outside'} the band"
        line += ", both forwards through torch.compile" if compiled else ""
        line += f": plain step {1e3 * plain:.3f} ms, gated step {step_ms('gated')}, ratio {ratio('gated', plain)}"
        if in_band and not compiled:
            line += (f"; hand-written floor {step_ms('floor')}, ratio {ratio('floor', plain)}; "
                     f"gated / floor {ratio('gated', across('floor'))}")
        if compiled:
            eager = across("eager plain")
            line += f"; eager plain step {1e3 * eager:.3f} ms, gated / eager plain {ratio('gated', eager)}"
        print(line, flush=True)
        print("  aten ops per step: " + ", ".join(f"{name} {op_count(steps[name, 0])}"
                                                   for name in dict.fromkeys(name for name, _ in steps)), flush=True)


def phases(rounds: int = 300, instances: int = 3) -> None:
    """Where the gated step's time goes, next to the plain step's and the hand-written floor's
    (:func:`floor_step`): each step's :data:`PHASES`, timed inside the step, gates in the band.
    ``instances`` copies of each step, all timed once per round in a random order (as
    :func:`overhead`); a phase's time is the median over the rounds, averaged over the copies."""
    print(f"batch {TRAIN_BATCH}, {torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.2f}, "
          f"{rounds} rounds of {instances} instances of each step in random order, gates inside the band", flush=True)
    laps = {name: [Laps() for _ in range(instances)] for name in ("plain", "lumos", "floor")}
    steps = {}
    for i in range(instances):
        steps["plain", i], steps["lumos", i] = step_pair(True, laps=(laps["plain"][i], laps["lumos"][i]))
        steps["floor", i] = floor_step(laps=laps["floor"][i])

    def forget_warm_up() -> None:
        for lap in (lap for each in laps.values() for lap in each):
            lap.times.clear()

    interleaved(steps, rounds, after_warm_up=forget_warm_up)

    def ms(name: str, phase: str) -> float:
        medians = [sorted(lap.times[phase])[rounds // 2] for lap in laps[name] if phase in lap.times]
        return 1e3 * sum(medians) / instances if medians else 0.0

    table = {name: {phase: ms(name, phase) for phase in PHASES} for name in laps}
    total = {name: sum(row.values()) for name, row in table.items()}
    print("\n| phase | plain (ms) | lumos (ms) | floor (ms) | lumos - plain | floor - plain | lumos - floor |")
    print("|---|---|---|---|---|---|---|")
    for phase in PHASES + ("step",):
        p, g, f = ((total[name] if phase == "step" else table[name][phase]) for name in ("plain", "lumos", "floor"))
        print(f"| {phase} | {p:.3f} | {g:.3f} | {f:.3f} | {g - p:+.3f} | {f - p:+.3f} | {g - f:+.3f} |")
    print(f"\nsum of the phases' medians over the plain step's: lumos {total['lumos'] / total['plain']:.3f}x, "
          f"floor {total['floor'] / total['plain']:.3f}x, lumos over floor {total['lumos'] / total['floor']:.3f}x",
          flush=True)


FRACTIONS = (0.10, 0.05)  # of the dense parameters
PARAM_MATCH = 0.05  # Torch-Pruning's model is pruned to lumos' parameter count within 5%


def fine_tune(model: nn.Module, task: Task, seed: int) -> float:
    """``EPOCHS`` more epochs of the plain ``model`` (same setting), then its test R^2."""
    lumos.fit(model, task.train, task.val, epochs=EPOCHS, lr=LR, batch_size=BATCH, seed=seed, progress=False)
    return lumos.evaluate(model, task.test, metric=task.metric)[1]


def lumos_arm(task: Task, seed: int, fraction: float) -> tuple[int, float]:
    """Gated training to ``fraction`` of the parameters, compaction, fine-tuning: (params, test R^2)."""
    gated, _ = train_gated(task, seed, fraction)
    small = lumos.compact(gated)
    return count_params(small), fine_tune(small, task, seed)


def magnitude_pruned(dense: nn.Module, task: Task, params: int) -> nn.Module:
    """A copy of ``dense`` pruned by Torch-Pruning to ``params`` parameters within ``PARAM_MATCH``:
    L1 magnitude of each channel group, ranked across layers (``global_pruning``, so that each
    layer gets its own width as lumos' does, one channel at a time), at most 95% of any layer
    removed, the output layer kept."""
    import copy

    try:
        import torch_pruning as tp
    except ImportError as err:
        raise ImportError("bench_training.py compare needs Torch-Pruning: pip install torch-pruning") from err

    def prune(ratio: float) -> nn.Module:
        model = copy.deepcopy(dense)
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        tp.pruner.MagnitudePruner(model, task.train[0][:4], importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, global_pruning=True, max_pruning_ratio=0.95,
                                  ignored_layers=[last]).step()
        return model

    low, high = 0.0, 0.999
    for _ in range(40):  # bisection on the pruning ratio
        ratio = (low + high) / 2
        model = prune(ratio)
        count = count_params(model)
        if abs(count - params) <= PARAM_MATCH * params:
            return model
        low, high = (ratio, high) if count > params else (low, ratio)
    raise RuntimeError(f"Torch-Pruning could not reach {params} parameters within {PARAM_MATCH:.0%} (got {count})")


def compare_row(task_name: str, seed: int) -> list[dict]:
    """Both arms at every fraction of ``FRACTIONS`` for one task and seed."""
    task = TASKS[task_name](0)
    torch.manual_seed(seed)
    dense = task.make_model()
    lumos.fit(dense, task.train, task.val, epochs=EPOCHS, lr=LR, batch_size=BATCH, seed=seed, progress=False)
    dense_params = count_params(dense)
    rows = []
    for fraction in FRACTIONS:
        params, r2 = lumos_arm(task, seed, fraction)
        pruned = magnitude_pruned(dense, task, params)
        rows.append({"task": task_name, "seed": seed, "fraction": fraction, "dense_params": dense_params,
                     "lumos_params": params, "lumos_r2": r2, "tp_params": count_params(pruned),
                     "tp_r2": fine_tune(pruned, task, seed)})
    return rows


def compare(seeds=SEEDS) -> None:
    print(f"each arm: {EPOCHS} epochs (lumos: gated to the target; Torch-Pruning: dense), pruning (Torch-Pruning: "
          f"global L1 magnitude), {EPOCHS} epochs of fine-tuning; Adam lr={LR}, batch {BATCH}; test R2; "
          f"seeds {tuple(seeds)}\n")
    print("| task | target | seed | lumos params | lumos R2 | Torch-Pruning params | Torch-Pruning R2 |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for task_name in TASKS:
        for seed in seeds:
            for r in compare_row(task_name, seed):
                rows.append(r)
                print(f"| {r['task']} | {r['fraction']:.0%} | {r['seed']} | {r['lumos_params']} "
                      f"({r['lumos_params'] / r['dense_params']:.1%}) | {r['lumos_r2']:.4f} | {r['tp_params']} | "
                      f"{r['tp_r2']:.4f} |", flush=True)
    print("\n| task | target | lumos R2 (mean over seeds) | Torch-Pruning R2 (mean) | lumos >= Torch-Pruning |")
    print("|---|---|---|---|---|")
    for task_name in TASKS:
        for fraction in FRACTIONS:
            mine = [r for r in rows if r["task"] == task_name and r["fraction"] == fraction]
            ours = sum(r["lumos_r2"] for r in mine) / len(mine)
            theirs = sum(r["tp_r2"] for r in mine) / len(mine)
            print(f"| {task_name} | {fraction:.0%} | {ours:.4f} | {theirs:.4f} | {'yes' if ours >= theirs else 'NO'} |")


SUPERRES_ARMS = {  # name -> (lumos.gate keywords, BudgetController options)
    "default": ({}, {}),
    "share_gates=False": ({"share_gates": False}, {}),
    "loss_cap=True": ({}, {"loss_cap": True}),
    "share_gates=False,loss_cap=True": ({"share_gates": False}, {"loss_cap": True}),
}


def superres(seeds=tuple(range(10)), epochs: int = 40, arms=tuple(SUPERRES_ARMS)) -> None:
    """Training on a model lumos was not built for: an SRResNet (``tests/test_compact_channel_ops.py``)
    doing ``two_field_superres``, ``lumos.fit(target=0.3)``, Adam lr 2e-3, batch 32, 512 samples,
    in each of ``arms`` (:data:`SUPERRES_ARMS`): the inputs kept and the validation loss of each
    seed (a run is good when it keeps ``u`` and ``v``)."""
    from test_compact_channel_ops import SRResNet

    print(f"SRResNet(16 channels, 2 blocks), {epochs} epochs of 16 steps, target 0.3, seeds {tuple(seeds)}\n")
    print("| setting | seed | inputs kept | val loss | kept fraction |")
    print("|---|---|---|---|---|")
    good = {}
    for name in arms:
        gate_options, options = SUPERRES_ARMS[name]
        for seed in seeds:
            x, y = two_field_superres(512, seed)
            val = two_field_superres(128, seed + 50)
            torch.manual_seed(seed)
            gated = lumos.gate(SRResNet(16, 2), x[:8], feature_names=["u", "v", "noise"], feature_dim=1,
                               **gate_options)
            _fit_quietly(gated, (x, y), val, target=0.3, epochs=epochs, lr=2e-3, batch_size=32, seed=seed,
                         controller_options=options)
            kept = lumos.report(gated).kept_features
            good[name] = good.get(name, 0) + (set(kept) == {"u", "v"})
            print(f"| {name} | {seed} | {', '.join(kept) or 'none (constant)'} | "
                  f"{lumos.evaluate(gated, val)[0]:.4f} | {lumos.kept_fraction(gated):.3f} |", flush=True)
    print("\n" + "; ".join(f"{name}: exactly u and v kept in {n} of {len(seeds)}" for name, n in good.items()))


class _MaxLam(lumos.Callback):
    """Records the largest ``lam`` of a run."""

    def __init__(self):
        self.max = 0.0

    def on_step_end(self, loop, task_loss) -> None:
        self.max = max(self.max, loop.controller.lam)


def _fit_quietly(gated: nn.Module, train, val, **fit_options) -> float:
    """``lumos.fit(gated, train, val, progress=False, **fit_options)`` with its warnings silenced
    (a collapse or a kept distractor is what the table reports); returns the largest ``lam``."""
    lam = _MaxLam()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lumos.fit(gated, train, val, progress=False, callbacks=[lam], **fit_options)
    return lam.max


def residual(seeds=(0, 1, 2, 3)) -> None:
    """Shared gates against a gate per layer (``lumos.gate(..., share_gates=False)``) on residual
    models lumos was not built for, with known inputs: a ResNet of BasicBlocks regressing
    ``field_product`` (``u``, ``v`` needed, a noise channel; target 0.2, 40 epochs of 16 steps,
    Adam lr 2e-3, batch 32) and a residual MLP on the three tasks of ``schedules`` (target 0.1,
    ``EPOCHS`` epochs, lr ``LR``, batch ``BATCH``; seeds 0-2). Each row: the relevant inputs lost,
    the irrelevant ones kept, the validation loss or R2, the fraction of parameters, the largest
    ``lam``."""
    print("| model | share_gates | seed | relevant lost | irrelevant kept | val | fraction | max lam |")
    print("|---|---|---|---|---|---|---|---|")
    for share in (True, False):
        for seed in seeds:
            x, y = field_product(512, seed)
            val = field_product(128, seed + 50)
            torch.manual_seed(seed)
            gated = lumos.gate(field_resnet(), x[:8], feature_names=["u", "v", "noise"], feature_dim=1,
                               share_gates=share)
            lam = _fit_quietly(gated, (x, y), val, target=0.2, epochs=40, lr=2e-3, batch_size=32, seed=seed)
            kept = set(lumos.report(gated).kept_features)
            print(f"| ResNet (BasicBlocks) | {share} | {seed} | {sorted({'u', 'v'} - kept) or '-'} | "
                  f"{sorted(kept - {'u', 'v'}) or '-'} | loss {lumos.evaluate(gated, val)[0]:.4f} | "
                  f"{lumos.kept_fraction(gated):.3f} | {lam:.1f} |", flush=True)
        for task_name in TASKS:
            for seed in SEEDS:
                task = TASKS[task_name](seed)
                torch.manual_seed(seed)
                gated = lumos.gate(ResidualMLP(task.train[0].shape[1], task.train[1].shape[1]), task.train[0][:8],
                                   share_gates=share)
                lam = _fit_quietly(gated, task.train, task.val, target=TARGET, epochs=EPOCHS, lr=LR,
                                   batch_size=BATCH, seed=seed)
                kept = set(kept_inputs(gated))
                print(f"| residual MLP, {task_name} | {share} | {seed} | {sorted(set(task.relevant) - kept) or '-'} | "
                      f"{sorted(kept - set(task.relevant)) or '-'} | "
                      f"R2 {lumos.evaluate(gated, task.val, metric=task.metric)[1]:.4f} | "
                      f"{lumos.kept_fraction(gated):.3f} | {lam:.1f} |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["schedules", "compare", "overhead", "phases", "superres", "residual"])
    parser.add_argument("--epochs", type=int, default=None, help=f"schedules ({EPOCHS}), superres (40): epochs per run")
    parser.add_argument("--lr", type=float, default=LR, help="schedules: learning rate")
    parser.add_argument("--schedule", action="append", choices=list(SCHEDULES), help="schedules: only these")
    parser.add_argument("--arm", action="append", choices=list(SUPERRES_ARMS), help="superres: only these")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"schedules, compare ({' '.join(map(str, SEEDS))}), superres (0-9), residual (0-3): the seeds")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else list(SEEDS)
    if args.what == "schedules":
        schedules(args.epochs or EPOCHS, args.lr, args.schedule, seeds)
    elif args.what == "compare":
        compare(seeds)
    elif args.what == "residual":
        residual(args.seeds if args.seeds is not None else (0, 1, 2, 3))
    elif args.what == "superres":
        superres(args.seeds if args.seeds is not None else tuple(range(10)), args.epochs or 40,
                 args.arm or tuple(SUPERRES_ARMS))
    elif args.what == "phases":
        phases()
    else:
        overhead()


if __name__ == "__main__":
    main()
