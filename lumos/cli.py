"""The ``lumos`` command: ``lumos demo``, ``lumos run WORKLOAD``, ``lumos bench``, ``lumos latency``."""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

DESCRIPTION = """\
lumos shrinks scientific-ML models in one training run: L0 gates learn which input features
matter and how wide each layer should be, then the model is compacted into plain, smaller
PyTorch layers.

  lumos demo                 the whole pipeline on the built-in CFD flux surrogate (no download)
  lumos run WORKLOAD ...     the same on any built-in workload, with options (lumos run --help lists them)
  lumos bench [WORKLOAD ...] lumos vs dense vs L1 / Torch-Pruning / unstructured pruning on the workloads
  lumos latency              dense vs compacted CPU latency of an MLP at 75% and 90% pruned
"""


def _workload_lines() -> str:
    from .workloads import available, describe

    width = max(len(name) for name in available())
    return "\n".join(f"  {name.ljust(width)}  {describe(name)}" for name in available())


def _add_run_options(parser: argparse.ArgumentParser, default_out: str, default_size: str = "full",
                     sizes=("small", "full")) -> None:
    parser.add_argument("--target", type=float, default=0.2,
                        help="fraction of the dense model's cost to keep, in (0, 1] (default 0.2)")
    parser.add_argument("--cost", choices=("params", "flops", "count"), default="params",
                        help="what the target counts (default params)")
    parser.add_argument("--size", choices=sizes, default=default_size,
                        help=f"workload size: {', '.join(sizes)} (small: seconds, for tests; default {default_size})")
    parser.add_argument("--epochs", type=int, default=None,
                        help="E: the gated model trains 2E epochs, the dense one 2E + F (the same budget); "
                             "default: the workload's")
    parser.add_argument("--fine-tune-epochs", type=int, default=None,
                        help="F: epochs of fine-tuning after compaction, 0 skips it; default: the workload's")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed (default 0)")
    parser.add_argument("--out", default=default_out,
                        help=f"folder for report.md, report.json, report.png, training.png (default {default_out})")
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
    from .evaluation.bench import BASELINES
    from .workloads import available

    parser = argparse.ArgumentParser(prog="lumos", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the whole pipeline on cfd_flux and print one table",
                          description="Train a dense baseline and a gated model on the built-in cfd_flux "
                                      "workload (Euler flux surrogate with distractor inputs), compact, fine-tune, "
                                      "and print kept features, widths, params/FLOPs, test R2, CPU latency, "
                                      "peak memory and training time. Writes report.{md,json} and, with "
                                      "matplotlib, report.png and training.png. The default size, demo "
                                      "(10,000 rows, a 256x256 MLP), takes seconds of CPU time; full is "
                                      "lumos run cfd_flux --size full.")
    _add_run_options(demo, "lumos-demo", default_size="demo", sizes=("small", "demo", "full"))
    run = sub.add_parser("run", help="the pipeline on a named built-in workload",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Dense baseline, gated training to --target, compaction and fine-tuning on "
                                     "a built-in workload; writes report.{md,json} and, with matplotlib, "
                                     "report.png and training.png (loss, metric and kept fraction per epoch).\n\n"
                                     "workloads:\n" + _workload_lines())
    run.add_argument("workload", choices=available(), metavar="WORKLOAD", help="one of: " + ", ".join(available()))
    _add_run_options(run, "lumos-run")
    bench = sub.add_parser("bench", help="lumos vs dense vs peer pruning methods on the built-in workloads",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Every workload (or those named) with the dense model, lumos, L1-norm "
                                       "structured pruning, Torch-Pruning (DepGraph, L1; needs "
                                       "'pip install lumos[pruning]', else reported as skipped) and unstructured "
                                       "masks, all at lumos' kept-parameter fraction and the same training "
                                       "budget. Writes results.md, results.json and, with matplotlib, results.png "
                                       "(metric vs kept parameters). --size small takes minutes on 2 CPU cores, "
                                       "full about 40 minutes per seed for all six (one thread, measured on a "
                                       "loaded 2-core machine).\n\nThe MLP latency table this command printed before "
                                       "is now 'lumos latency'.\n\nworkloads:\n" + _workload_lines())
    bench.add_argument("workloads", nargs="*", metavar="WORKLOAD", help="workloads to run (default: all)")
    bench.add_argument("--size", choices=("small", "full"), default="small", help="workload size (default small)")
    bench.add_argument("--out", default="lumos-bench", help="folder for the results (default lumos-bench)")
    bench.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run (default 0)")
    bench.add_argument("--targets", type=float, nargs="+", default=[0.2],
                       help="lumos targets, fractions of the parameters to keep (default 0.2)")
    bench.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES), metavar="METHOD",
                       help="peer methods to run beside dense and lumos, any of " + ", ".join(BASELINES)
                            + " (default all; none: only dense and lumos, e.g. to check feature selection on "
                              "more seeds)")
    bench.add_argument("--repeats", type=int, default=50, help="timed forwards per model (default 50)")
    bench.add_argument("--note", default="", help="a line printed under the title of results.md")
    bench.add_argument("--progress", action="store_true", help="show per-epoch progress bars")
    bench.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                       help="run nothing: merge these results.json files (e.g. workloads run one at a time) "
                            "into one results.md, .json and .png in --out; each run keeps its command, date, "
                            "wall time and load average")
    latency = sub.add_parser("latency", help="dense vs compacted CPU latency of an MLP at 75%% and 90%% pruned")
    latency.add_argument("--rows", type=int, default=4096, help="batch rows (default 4096)")
    latency.add_argument("--width", type=int, default=512, help="hidden width (default 512)")
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
    for option, value, least in (("--epochs", args.epochs, 1), ("--fine-tune-epochs", args.fine_tune_epochs, 0),
                                 ("--nproc", args.nproc, 1), ("--checkpoint-every", args.checkpoint_every, 1)):
        if value is not None and value < least:
            print(f"lumos: {option} must be >= {least}, got {value}", file=sys.stderr)
            return 2
    if args.checkpoint_every is not None and args.checkpoint is None:
        print("lumos: --checkpoint-every needs --checkpoint DIR", file=sys.stderr)
        return 2
    if args.nproc > 1 and not launched_by_torchrun():
        return _launch(args.nproc, args.argv)
    from .compact import CompactionError
    from .pipeline import run_workload

    options = dict(precision=args.precision, compile=args.compile, checkpoint_every=args.checkpoint_every)
    try:
        result = run_workload(name, size=args.size, target=args.target, cost=args.cost, epochs=args.epochs,
                              fine_tune_epochs=args.fine_tune_epochs, seed=args.seed, out_dir=args.out,
                              progress=not args.no_progress, checkpoint_dir=args.checkpoint, fit_options=options)
    except CompactionError as err:  # e.g. the gated model predicts a constant: say so, no traceback
        print(f"lumos {args.command}: {err}", file=sys.stderr)
        return 1
    if result is None:  # a data-parallel rank other than 0: rank 0 reports
        return 0
    print()
    print(result.table())
    print(f"\nwritten: {', '.join(result.files)}")
    return 0


def _merge(args) -> int:
    from .evaluation.results import merge_results, to_markdown, write_results

    if args.workloads:
        print(f"lumos bench: --merge runs nothing; drop the workload names {', '.join(args.workloads)}",
              file=sys.stderr)
        return 2
    parts = []
    for path in args.merge:
        try:
            parts.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as err:
            print(f"lumos bench: --merge: cannot read {path} as a results.json: {err}", file=sys.stderr)
            return 2
        if not isinstance(parts[-1], dict) or "rows" not in parts[-1]:
            print(f"lumos bench: --merge: {path} has no 'rows'; expected a results.json of lumos bench",
                  file=sys.stderr)
            return 2
    try:
        results = merge_results(parts, command="lumos " + shlex.join(args.argv), note=args.note)
    except ValueError as err:
        print(f"lumos bench: --merge: {err}", file=sys.stderr)
        return 2
    files = write_results(results, args.out)
    print(to_markdown(results))
    print(f"written: {', '.join(files)}")
    return 0


def _bench(args) -> int:
    from .evaluation.bench import run_bench
    from .workloads import available

    if args.merge:
        return _merge(args)
    unknown = [name for name in args.workloads if name not in available()]
    if unknown:
        print(f"lumos bench: unknown workload(s) {', '.join(unknown)}; known: {', '.join(available())}",
              file=sys.stderr)
        return 2
    bad = [t for t in args.targets if not 0.0 < t <= 1.0]
    if bad or args.repeats < 1:
        print(f"lumos bench: --targets must be fractions in (0, 1] and --repeats >= 1, got {args.targets}, "
              f"{args.repeats}", file=sys.stderr)
        return 2
    results = run_bench(args.workloads or None, size=args.size, seeds=args.seeds, targets=args.targets,
                        baselines_to_run=args.baselines, out_dir=args.out, repeats=args.repeats, note=args.note,
                        command="lumos " + shlex.join(args.argv), progress=args.progress)
    from .evaluation.results import to_markdown

    print(to_markdown(results))
    print(f"written: {', '.join(results['files'])}")
    return 0


def _latency(args) -> int:
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
    if args.command == "latency":
        return _latency(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
