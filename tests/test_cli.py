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
