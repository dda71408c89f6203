"""Can the lock tell a useless input from a needed one? Two ablations of each kept input at the
moment the gates lock: closing it, and shuffling it across rows.

``lumos.fit(target=0.2)`` on a built-in workload at size small; at the step the controller locks
the gates, each input the lock kept is closed in turn (its logit pinned closed, as the lock pins a
unit) and the validation loss compared, image by image (or row by row), with the input open.
Three criteria on closing (README, "What an input gate can miss", has the conclusion: none
separates):

- ``dL/L``: the relative rise of the validation loss;
- ``z``: that rise over its standard error across samples (a paired test);
- ``objective``: the rise over the penalty that closing the input saves at the lock's ``lam``
  (``lam * loss * parameters saved`` for the default relative penalty): below 1, the L0
  objective itself says close it.

Then the input shuffled across validation rows instead of closed, three shufflings, z over 32
groups of rows (:func:`lumos.train.input_test.permutation_test`): ``shuffled dL/L`` and
``shuffled z`` average the three shuffled losses (classic permutation importance, what fit's
test did first); ``averaged dL/L`` and ``averaged z`` take the loss of the three shuffled
predictions' average (the input integrated out), the statistic fit's test at the end of that
epoch uses: it closes an input below ``averaged z`` 2. The fit here runs that test too
(``History.inputs_dropped``, the last column).

Run (about 3 minutes on 2 cores at size small; em_denoise at size full, one seed, about 6)::

    OMP_NUM_THREADS=1 python bench/bench_lock_ablation.py [--workloads em_denoise cosmo3d cfd_flux]
        [--seeds 0 1 2] [--size small|full]
"""
from __future__ import annotations

import argparse
import math

import torch

import lumos
from lumos import workloads
from lumos.evaluation.training import train
from lumos.gates import LOG_ALPHA_MIN
from lumos.train import as_data
from lumos.train.input_test import permutation_test
from lumos.pipeline import example_inputs

TARGET = 0.2


class AblateAtLock(lumos.Callback):
    """At the first step where ``loop.controller`` is locked, the ablation rows of every kept
    input (``rows``), with the ``lam`` of the step that locked."""

    def __init__(self, work: workloads.Workload):
        self.work, self.rows, self.lam = work, None, 0.0

    def on_step_end(self, loop, task_loss) -> None:
        controller = loop.controller
        if self.rows is not None or controller is None:
            return
        lam = controller.lam  # reading it also reads whether the lock happened
        if not controller.locked:
            self.lam = lam
            return
        self.rows = ablate_inputs(loop.model, self.work, self.lam, controller.relative)


@torch.no_grad()
def sample_losses(model: torch.nn.Module, work: workloads.Workload) -> torch.Tensor:
    """``(n,)`` the workload's loss of each validation sample, ``model`` in eval mode."""
    inputs, target = work.val
    was_training = model.training
    model.eval()
    try:
        pred = model(inputs)
    finally:
        model.train(was_training)
    return torch.stack([work.loss_fn(pred[i:i + 1], target[i:i + 1]) for i in range(target.shape[0])]).double()


@torch.no_grad()
def ablate_inputs(gated: torch.nn.Module, work: workloads.Workload, lam: float, relative: bool) -> list[dict]:
    """One row per kept input: its name, ``dL/L``, ``z`` and ``objective`` (module docstring)."""
    gate = gated.feature_gate.gate
    open_losses, fraction = sample_losses(gated, work), lumos.kept_fraction(gated)
    loss = float(open_losses.mean())
    kept = gate.kept().tolist()
    val = as_data(work.val, "val", "bench_lock_ablation", torch.float32, True)
    shuffled = permutation_test(gated, val, work.loss_fn, average_outputs=False)
    averaged = permutation_test(gated, val, work.loss_fn)
    rows = []
    for j, name in enumerate(work.feature_names):
        if not kept[j]:
            continue
        saved_logit = gate.log_alpha[j].clone()
        gate.log_alpha[j] = LOG_ALPHA_MIN
        diff = sample_losses(gated, work) - open_losses
        saved = fraction - lumos.kept_fraction(gated)
        gate.log_alpha[j] = saved_logit
        price = lam * saved * (loss if relative else 1.0)
        rows.append({"input": name, "relevant": name in work.informative_features,
                     "dL/L": float(diff.mean()) / loss,
                     "z": float(diff.mean() / (diff.std() / math.sqrt(diff.numel()))),
                     "objective": float(diff.mean()) / price if price > 0 else math.inf,
                     "shuffled dL/L": shuffled[j]["rise"], "shuffled z": shuffled[j]["z"],
                     "averaged dL/L": averaged[j]["rise"], "averaged z": averaged[j]["z"]})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["em_denoise", "cosmo3d", "cfd_flux"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", choices=["small", "full"], default="small")
    args = parser.parse_args(argv)
    print(f"size {args.size}, target {TARGET}; each input the lock kept, closed alone on the validation split\n")
    print("| workload | seed | lam at the lock | input | relevant | dL/L | z | objective | shuffled dL/L | shuffled z "
          "| averaged dL/L | averaged z | fit closed it |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in args.workloads:
        for seed in args.seeds:
            work = workloads.load(name, size=args.size, seed=seed)
            torch.manual_seed(seed)
            gated = lumos.gate(work.make_model(), example_inputs(work), feature_names=work.feature_names,
                               feature_dim=work.feature_dim)
            probe = AblateAtLock(work)
            phase = train(gated, work, 2 * work.fit_defaults["epochs"], name="gated", seed=seed, target=TARGET,
                          fit_options={"callbacks": [probe]})
            closed = {item["name"] for item in phase.history.inputs_dropped or []}
            for row in probe.rows or []:
                print(f"| {name} | {seed} | {probe.lam:.2f} | {row['input']} | {'yes' if row['relevant'] else 'no'} | "
                      f"{row['dL/L']:+.4f} | {row['z']:+.2f} | {row['objective']:.3g} | {row['shuffled dL/L']:+.4f} | "
                      f"{row['shuffled z']:+.2f} | {row['averaged dL/L']:+.4f} | {row['averaged z']:+.2f} | "
                      f"{'yes' if row['input'] in closed else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
