"""The ``lumos`` command: ``lumos demo``, ``lumos run WORKLOAD``, ``lumos bench``."""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

DESCRIPTION = """\
lumos shrinks scientific-ML models in one training run: L0 gates learn which input features
matter and how wide each layer should be, then the model is compacted into plain, smaller
PyTorch layers.

  lumos demo                 the whole pipeline on the built-in CFD flux surrogate (about 30 s on 2 CPU cores)
  lumos run cfd_flux ...     the same on a named built-in workload, with options
  lumos bench                dense vs compacted CPU latency of an MLP at 75% and 90% pruned
"""


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", type=float, default=0.2,
                        help="fraction of the dense model's cost to keep, in (0, 1] (default 0.2)")
    parser.add_argument("--cost", choices=("params", "flops", "count"), default="params",
                        help="what the target counts (default params)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the dense baseline (the gated model trains twice as many); "
                             "default: the workload's")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed (default 0)")
    parser.add_argument("--out", default="lumos-demo",
                        help="folder for report.md, report.json, report.png (default lumos-demo)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--nproc", type=int, default=1,
                        help="train data-parallel in N processes launched with torchrun (gloo on CPU, NCCL with "
                             "one GPU per process); the batch stays the same, split over them (default 1)")
    parser.add_argument("--checkpoint", metavar="DIR", default=None,
                        help="save each training phase to DIR/<phase>.pt every epoch (and every "
                             "--checkpoint-every steps); the same command run again resumes from there")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                        help="also checkpoint every K optimiser steps (needs --checkpoint)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: train under bfloat16 autocast (weights stay float32; default fp32)")
    parser.add_argument("--compile", action="store_true", help="train and validate through torch.compile")


def build_parser() -> argparse.ArgumentParser:
    from .workloads import available

    parser = argparse.ArgumentParser(prog="lumos", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the whole pipeline on cfd_flux and print one table",
                          description="Train a dense baseline and a gated model on the built-in cfd_flux "
                                      "workload (Euler flux surrogate with distractor inputs), compact, "
                                      "and print kept features, widths, params/FLOPs, validation R2 and "
                                      "CPU latency. Writes report.{md,json,png}.")
    _add_run_options(demo)
    run = sub.add_parser("run", help="the pipeline on a named built-in workload")
    run.add_argument("workload", choices=available(), help="built-in workload")
    _add_run_options(run)
    bench = sub.add_parser("bench", help="dense vs compacted CPU latency of an MLP at 75%% and 90%% pruned")
    bench.add_argument("--rows", type=int, default=4096, help="batch rows (default 4096)")
    bench.add_argument("--width", type=int, default=512, help="hidden width (default 512)")
    return parser


def _launch(nproc: int, argv: list[str]) -> int:
    """Run this command (less ``--nproc``: torchrun's environment tells each process its rank and
    the number of processes) in ``nproc`` processes under torchrun on this machine; its exit code."""
    worker_argv, skip = [], False
    for arg in argv:
        if skip or arg == "--nproc" or arg.startswith("--nproc="):
            skip = arg == "--nproc"
            continue
        worker_argv.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "lumos", *worker_argv]
    print(f"lumos: launching {nproc} processes: {shlex.join(command)}", file=sys.stderr)
    return subprocess.call(command)


def _run(args, name: str) -> int:
    from .train.distributed import launched_by_torchrun

    if not 0.0 < args.target <= 1.0:
        print(f"lumos: --target must be a fraction in (0, 1], got {args.target}", file=sys.stderr)
        return 2
    for option, value in (("--nproc", args.nproc), ("--checkpoint-every", args.checkpoint_every)):
        if value is not None and value < 1:
            print(f"lumos: {option} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.checkpoint_every is not None and args.checkpoint is None:
        print("lumos: --checkpoint-every needs --checkpoint DIR", file=sys.stderr)
        return 2
    if args.nproc > 1 and not launched_by_torchrun():
        return _launch(args.nproc, args.argv)
    from .pipeline import run_workload

    options = dict(precision=args.precision, compile=args.compile, checkpoint_every=args.checkpoint_every)
    result = run_workload(name, target=args.target, cost=args.cost, dense_epochs=args.epochs,
                          seed=args.seed, out_dir=args.out, progress=not args.no_progress,
                          checkpoint_dir=args.checkpoint, fit_options=options)
    if result is None:  # a data-parallel rank other than 0: rank 0 reports
        return 0
    print()
    print(result.table())
    print(f"\nreport: {args.out}/report.md, {args.out}/report.json, {args.out}/report.png")
    return 0


def _bench(args) -> int:
    import torch
    from torch import nn

    import lumos
    from .metrics import latency

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(12, args.width), nn.SiLU(), nn.Linear(args.width, args.width), nn.SiLU(),
                          nn.Linear(args.width, args.width), nn.SiLU(), nn.Linear(args.width, 3))
    x = torch.randn(args.rows, 12)
    print(f"MLP 12-{args.width}x3-3, {args.rows} rows, {torch.get_num_threads()} CPU threads")
    print(f"{'pruned':>8} {'dense ms':>10} {'compacted ms':>13} {'speedup':>8}")
    for pruned in (0.75, 0.9):
        gated = lumos.gate(dense, x[:8], features=False)
        g = torch.Generator().manual_seed(0)
        for _, gate in lumos.gates_of(gated):
            closed = torch.randperm(gate.n, generator=g)[: int(pruned * gate.n)]
            with torch.no_grad():
                gate.log_alpha.fill_(4.0)
                gate.log_alpha[closed] = -8.0
        compacted = lumos.compact(gated, x[:8])
        torch.testing.assert_close(compacted(x), gated.eval()(x), atol=1e-4, rtol=1e-4)
        t_dense, t_small = latency(dense, x)["median_ms"], latency(compacted, x)["median_ms"]
        print(f"{pruned:>8.0%} {t_dense:>10.3f} {t_small:>13.3f} {t_dense / t_small:>7.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "demo":
        return _run(args, "cfd_flux")
    if args.command == "run":
        return _run(args, args.workload)
    if args.command == "bench":
        return _bench(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
