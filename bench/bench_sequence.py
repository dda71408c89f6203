"""Training and compaction of a model lumos was not built for: a Transformer sequence regressor.

``tests/zoo_training.py``'s ``SequenceRegressor`` (a linear embedding, a 2-layer pre-norm GELU
``nn.TransformerEncoder``, a reused in-place ReLU) on ``sequence_product`` (6 inputs, the target
needs ``x0`` and ``x1``, the other four are distractors), 512 training sequences of length 12;
``lumos.fit(target=0.3)``, Adam lr 3e-3, batch 64. Each row: the inputs kept, the validation
loss, the parameters kept, the input gates' logits at the step the gates lock (a logit above
``lumos.cost.kept_bound``, -2.40 for the default gates, keeps its input through the lock; fit's
test at the end of that epoch may still close it), and the largest relative difference between the
gated model and its compacted copy on batches and lengths other than the example's::

    OMP_NUM_THREADS=1 python bench/bench_sequence.py [--seeds 0 1] [--epochs 30]
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

import lumos

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from zoo_training import SequenceRegressor, sequence_product  # noqa: E402

NAMES = [f"x{i}" for i in range(6)]
OTHER_SIZES = ((1, 5), (7, 12), (3, 31))  # (batch, length)


class InputLogitsAtLock(lumos.Callback):
    """The feature gate's logits at the last step before the controller locked the gates."""

    def __init__(self):
        self.logits = None

    def on_step_end(self, loop, task_loss) -> None:
        loop.controller.lam  # noqa: B018 -- reading lam also reads whether the lock happened
        if not loop.controller.locked:
            self.logits = loop.model.feature_gate.gate.log_alpha.detach().clone()


def compaction_error(gated: torch.nn.Module, compact: torch.nn.Module) -> float:
    """Largest ``max |gated - compact| / max |gated|`` over :data:`OTHER_SIZES`."""
    gated.eval()
    worst = 0.0
    for batch, length in OTHER_SIZES:
        x = torch.randn(batch, length, len(NAMES))
        with torch.no_grad():
            a, c = gated(x), compact(x)
        worst = max(worst, float((a - c).abs().max() / a.abs().max()))
    return worst


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    print("| seed | inputs kept | val loss | parameters kept | input logits at the lock (x0..x5) | "
          "compaction error |")
    print("|---|---|---|---|---|---|")
    for seed in args.seeds:
        x, y = sequence_product(512, seed)
        val = sequence_product(128, seed + 50)
        torch.manual_seed(seed)
        dense_params = sum(p.numel() for p in SequenceRegressor().parameters())
        torch.manual_seed(seed)
        gated = lumos.gate(SequenceRegressor(), x[:4], feature_names=NAMES)
        probe = InputLogitsAtLock()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lumos.fit(gated, (x, y), val, epochs=args.epochs, lr=3e-3, batch_size=64, target=0.3, seed=seed,
                      progress=False, callbacks=[probe])
        compact = lumos.compact(gated, x[:4])
        kept = sum(p.numel() for p in compact.parameters())
        logits = " ".join(f"{v:.2f}" for v in probe.logits.tolist())
        print(f"| {seed} | {', '.join(lumos.report(gated, x[:4]).kept_features)} | "
              f"{lumos.evaluate(gated, val)[0]:.4f} | {kept}/{dense_params} | {logits} | "
              f"{compaction_error(gated, compact):.1e} |", flush=True)


if __name__ == "__main__":
    main()
