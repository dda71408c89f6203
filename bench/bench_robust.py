"""What long runs cost: data-parallel training speed and checkpoint writes (issue 11).

- ``scaling``: ``lumos.fit`` of the demo's gated model (cfd_flux, 12-256x3-3, 20,000 rows,
  global batch 256, target 0.2) in one process and under torchrun with N gloo processes on
  CPU; training steps per second over the epochs after the first (validation not counted)::

      python bench/bench_robust.py scaling --nproc 1 2 --epochs 3

  Each process runs ``--threads`` torch threads (default 1, as torchrun sets it).

- ``checkpoint``: the size of a ``lumos.fit`` checkpoint of that model mid-run (weights, gate
  logits, Adam state, controller, best weights so far) and the median time of the atomic write
  (temp file, fsync, rename, fsync of the folder)::

      python bench/bench_robust.py checkpoint --repeats 20

  ``python -m pytest bench/bench_robust.py --benchmark-only`` times the same write with
  pytest-benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lumos
from lumos.train.checkpoint import save_atomic
from lumos.workloads import load

TARGET = 0.2


def _gated_demo_model():
    """The demo's gated model (cfd_flux, full size) and its workload."""
    work = load("cfd_flux", seed=0)
    torch.manual_seed(0)
    gated = lumos.gate(work.make_model(hidden=(256, 256, 256)), work.train[0][:64], feature_names=work.feature_names)
    return gated, work


def _scaling_worker(args) -> None:
    """One process of a ``scaling`` run (under torchrun when N > 1); rank 0 writes the figures."""
    torch.set_num_threads(args.threads)
    gated, work = _gated_demo_model()
    history = lumos.fit(gated, work.train, work.val, loss_fn=work.loss_fn, epochs=args.epochs, lr=1e-3,
                        batch_size=256, target=TARGET, seed=0, progress=False)
    steps = -(-work.train[0].shape[0] // 256)
    timed = [row["seconds"] for row in history.epochs[1:]]
    if os.environ.get("RANK", "0") == "0":
        Path(args.out).write_text(json.dumps({"steps_per_epoch": steps, "epoch_seconds": timed,
                                              "steps_per_second": steps / statistics.median(timed)}))


def scaling(args) -> list[dict]:
    rows = []
    for nproc in args.nproc:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "figures.json"
            worker = [__file__, "_scaling_worker", "--epochs", str(args.epochs), "--threads", str(args.threads),
                      "--out", str(out)]
            command = [sys.executable, *worker] if nproc == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *worker]
            started = time.perf_counter()
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            figures = json.loads(out.read_text())
        rows.append({"processes": nproc, "threads_per_process": args.threads, **figures,
                     "wall_seconds": time.perf_counter() - started})
        print(f"{nproc} process(es) x {args.threads} thread(s): {figures['steps_per_second']:.1f} steps/s "
              f"(epochs after the first: {', '.join(f'{s:.2f}' for s in figures['epoch_seconds'])} s)", flush=True)
    return rows


def checkpoint_payload() -> dict:
    """What ``lumos.fit`` writes for the demo's gated model at the end of its first epoch (79
    steps): train that epoch with a checkpoint and read the file back."""
    gated, work = _gated_demo_model()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.pt"
        lumos.fit(gated, work.train, loss_fn=work.loss_fn, epochs=1, batch_size=256, target=TARGET, seed=0,
                  progress=False, checkpoint=path)
        return torch.load(path, weights_only=True)


def checkpoint(args) -> dict:
    payload = checkpoint_payload()
    seconds = []
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        path = Path(folder) / "run.pt"
        for _ in range(args.repeats):
            started = time.perf_counter()
            save_atomic(payload, path)
            seconds.append(time.perf_counter() - started)
        size = path.stat().st_size
    result = {"bytes": size, "median_write_ms": 1e3 * statistics.median(seconds),
              "min_write_ms": 1e3 * min(seconds), "repeats": args.repeats, "folder": args.folder or tempfile.gettempdir()}
    print(f"checkpoint of the demo's gated model: {size / 2**20:.2f} MiB, atomic write median "
          f"{result['median_write_ms']:.1f} ms (min {result['min_write_ms']:.1f} ms, {args.repeats} writes to "
          f"{result['folder']})")
    return result


def test_checkpoint_write(benchmark, tmp_path):
    payload = checkpoint_payload()
    benchmark(save_atomic, payload, tmp_path / "run.pt")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    scale = sub.add_parser("scaling")
    scale.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    scale.add_argument("--epochs", type=int, default=3)
    scale.add_argument("--threads", type=int, default=1)
    worker = sub.add_parser("_scaling_worker")
    worker.add_argument("--epochs", type=int)
    worker.add_argument("--threads", type=int)
    worker.add_argument("--out")
    write = sub.add_parser("checkpoint")
    write.add_argument("--repeats", type=int, default=20)
    write.add_argument("--folder", default=None, help="where to write (default: the temp folder)")
    for command in (scale, write):
        command.add_argument("--json", default=None, help="also write the figures and the command to this file")
    args = parser.parse_args(argv)
    if args.command == "_scaling_worker":
        return _scaling_worker(args)
    result = scaling(args) if args.command == "scaling" else checkpoint(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "python bench/bench_robust.py " + " ".join(sys.argv[1:]),
                                               "torch": torch.__version__, "cpus": os.cpu_count(),
                                               "result": result}, indent=2))


if __name__ == "__main__":
    main()
