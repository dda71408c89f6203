"""A ``lumos.fit`` run in its own process, for the tests that SIGKILL it, run it again, or launch it
with torchrun (one process per rank):

    python tests/fit_worker.py OUT [--checkpoint FILE] [--every K] [--pause-at STEP] [--dropout]
    python -m torch.distributed.run --nproc-per-node 2 tests/fit_worker.py OUT ...

Trains a gated MLP on 600 rows of the built-in ``cfd_flux`` workload (global batch 64, target
0.3, gates started inside the stochastic band so every mask is a random draw) and saves, to
``OUT`` (``OUT.rank<r>`` under torchrun): the final state_dict, the task loss of every step,
every mask every gate drew, the compacted model's state_dict and the history. It prints
``step N`` after each step; with ``--pause-at N`` it prints ``paused rank <r> pid <pid>`` after
step N and sleeps, for the test to kill it there.
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import lumos
from lumos.workloads import load


def launch(*args, nproc: int = 1, pause_at: int | None = None, kill_rank: int = 0) -> subprocess.CompletedProcess:
    """Run this worker with ``args`` (under torchrun with ``nproc`` > 1) and wait for it. With
    ``pause_at``, SIGKILL rank ``kill_rank`` once it has paused after that step (torchrun then
    stops the other ranks). Returns the finished process, its output merged into ``stdout``."""
    worker = [str(Path(__file__).resolve()), *map(str, args)]
    command = [sys.executable, *worker] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *worker]
    if pause_at is None:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        return done
    lines = []
    with subprocess.Popen(command + ["--pause-at", str(pause_at)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        for line in process.stdout:
            lines.append(line)
            paused = re.search(rf"paused rank {kill_rank} pid (\d+)\n", line)
            if paused:
                os.kill(int(paused.group(1)), signal.SIGKILL)
                break
        lines.extend(process.stdout)
        process.wait(timeout=120)
    assert process.returncode != 0, "".join(lines)[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, "".join(lines), "")


def say(text: str) -> None:
    """Write ``text`` and its newline in one write: the ranks under torchrun share one pipe, and a
    line written in one piece (under PIPE_BUF bytes) is never split by another rank's output."""
    os.write(sys.stdout.fileno(), f"{text}\n".encode())


class Recorder(lumos.Callback):
    def __init__(self, losses: list, pause_at: int | None):
        self.losses, self.pause_at = losses, pause_at

    def on_step_end(self, loop, task_loss):
        self.losses.append(float(task_loss))
        say(f"step {loop.step}")
        if loop.step == self.pause_at:
            say(f"paused rank {os.environ.get('RANK', 0)} pid {os.getpid()}")
            time.sleep(600)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--checkpoint")
    parser.add_argument("--every", type=int)
    parser.add_argument("--pause-at", type=int)
    parser.add_argument("--dropout", action="store_true")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = load("cfd_flux", n_train=600, n_val=200, n_test=8, seed=0)
    torch.manual_seed(0)
    model = work.make_model(hidden=(32, 32))
    if args.dropout:
        model = nn.Sequential(*model[:2], nn.Dropout(0.1), *model[2:])
    gated = lumos.gate(model, work.train[0][:64], feature_names=work.feature_names)
    with torch.no_grad():
        for _, gate in lumos.gates_of(gated):
            gate.log_alpha.uniform_(-1.0, 2.0)  # inside the band: every training mask is a random draw
    masks, losses = [], []
    for _, gate in lumos.gates_of(gated):
        gate.register_forward_hook(lambda module, inputs, mask: masks.append(mask.detach().clone())
                                   if module.training else None)
    history = lumos.fit(gated, work.train, work.val, loss_fn=work.loss_fn, metric=work.metric, epochs=args.epochs,
                        lr=3e-3, batch_size=64, target=0.3, seed=0, progress=False,
                        callbacks=[Recorder(losses, args.pause_at)], checkpoint=args.checkpoint,
                        checkpoint_every=args.every)
    compacted = lumos.compact(gated)
    rank = os.environ.get("RANK")
    out = args.out if rank is None else f"{args.out}.rank{rank}"
    torch.save({"state": gated.state_dict(), "losses": losses, "masks": masks, "compacted": compacted.state_dict(),
                "history": history.epochs, "resumed_from": history.resumed_from,
                "compacted_out": compacted(work.val[0]).detach()}, out)
    say("done")


if __name__ == "__main__":
    sys.exit(main())
