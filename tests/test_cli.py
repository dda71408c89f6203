"""The lumos command line: help texts and argument errors."""
import pytest

from lumos.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "run", "bench"):
        assert command in text


def test_demo_help_explains_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for option in ("--target", "--cost", "--epochs", "--seed", "--out"):
        assert option in text


def test_bad_target_is_refused(capsys):
    assert main(["demo", "--target", "1.5"]) == 2
    assert "--target" in capsys.readouterr().err


def test_unknown_workload_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "no_such_workload"])
    assert exit_info.value.code == 2


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
