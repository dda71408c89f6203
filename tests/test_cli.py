"""The lumos command line: help texts, argument errors, and ``lumos run`` end to end."""
import sys

import pytest

from lumos import workloads
from lumos.cli import main


def _help(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_lists_commands(capsys):
    text = _help(capsys)
    for command in ("demo", "run", "bench", "latency"):
        assert command in text


def test_demo_help_explains_options(capsys):
    text = _help(capsys, "demo")
    for option in ("--target", "--cost", "--size", "--epochs", "--fine-tune-epochs", "--seed", "--out"):
        assert option in text


def test_demo_runs_the_demo_size_by_default_and_run_offers_only_small_and_full():
    from lumos.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo"]).size == "demo"
    assert parser.parse_args(["run", "cfd_flux"]).size == "full"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "md_forces", "--size", "demo"])


def test_run_help_describes_every_workload_in_one_line(capsys):
    text = " ".join(_help(capsys, "run").split())  # argparse may wrap lines
    for name in workloads.available():
        assert f"{name} {' '.join(workloads.describe(name).split())}" in text


def test_bench_help_names_methods_sizes_and_the_latency_command(capsys):
    text = " ".join(_help(capsys, "bench").split())
    for needle in ("--size", "--out", "--seeds", "--targets", "Torch-Pruning", "lumos[pruning]",
                   "results.md", "lumos latency"):
        assert needle in text, needle
    assert "--rows" in _help(capsys, "latency")


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--target", "1.5"], "--target"),
    (["run", "cfd_flux", "--epochs", "0"], "--epochs"),
    (["run", "cfd_flux", "--fine-tune-epochs", "-1"], "--fine-tune-epochs"),
    (["bench", "cfd_flux", "nope"], "unknown workload"),
    (["bench", "--targets", "0"], "--targets"),
])
def test_bad_arguments_are_refused(capsys, argv, needle):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["run", "no_such_workload"], ["bench", "--size", "huge"]])
def test_argparse_refuses_unknown_choices(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_run_lists_only_the_files_it_wrote_without_matplotlib(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "run"
    assert main(["run", "cfd_flux", "--size", "small", "--out", str(out), "--no-progress",
                 "--epochs", "2", "--fine-tune-epochs", "1"]) == 0
    text = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    written = text.split("written: ")[-1]
    assert "report.md" in written and "report.json" in written and ".png" not in written
    assert "no report.png" in text and "no training.png" in text
    assert "faster" in text or "slower" in text


def test_run_help_explains_the_long_run_options(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for option in ("--nproc", "--checkpoint", "--checkpoint-every", "--precision", "--compile"):
        assert option in text


def test_nproc_relaunches_the_same_command_under_torchrun(monkeypatch, capsys):
    import subprocess
    import sys

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    launched = []
    monkeypatch.setattr(subprocess, "call", lambda command: launched.append(command) or 0)
    assert main(["run", "cfd_flux", "--nproc", "2", "--epochs", "1", "--checkpoint", "ck", "--nproc=2"]) == 0
    assert launched == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                         "-m", "lumos", "run", "cfd_flux", "--epochs", "1", "--checkpoint", "ck"]]
    assert "launching 2 processes" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--checkpoint-every", "10"], "--checkpoint-every needs --checkpoint"),
])
def test_long_run_options_are_checked(capsys, argv, message):
    assert main(["run", "cfd_flux", *argv]) == 2
    assert message in capsys.readouterr().err
