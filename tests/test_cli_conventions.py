"""CLI conventions: -v / -q before or after the subcommand, help for every option, exit codes in --help."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from sdexport import cli


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("argv", [["-v", "info", "f"], ["info", "f", "-v"], ["info", "-v", "f"],
                                  ["--verbose", "doctor"], ["doctor", "--verbose"]])
def test_verbose_is_accepted_before_and_after_the_subcommand(argv: list[str]) -> None:
    args = cli.parser().parse_args(argv)
    assert args.verbose is True and not hasattr(args, "quiet")


def test_verbose_after_run() -> None:
    args = cli.parser().parse_args(["run", "folder", "--prompt", "x", "-v"])
    assert args.verbose is True and args.prompt == ["x"]


def test_quiet_after_the_subcommand_reaches_main(tmp_path: Path, capsys: Any) -> None:
    assert cli.main(["info", str(tmp_path / "missing"), "-q"]) == 1
    assert "sdexport: error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["-v", "info", "f", "-q"], ["info", "f", "-v", "-q"]])
def test_verbose_and_quiet_exclude_each_other(argv: list[str], capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "-q/--quiet" in capsys.readouterr().err


def test_every_option_of_every_subcommand_has_help() -> None:
    commands = _subparsers()
    assert {"build", "info", "run", "parity", "doctor"} <= set(commands)
    missing = [(name, action.dest) for name, sub in commands.items() for action in sub._actions
               if not action.help or not action.help.strip()]
    assert missing == []


def test_options_with_a_default_show_it_in_help() -> None:
    text = " ".join(_subparsers()["build"].format_help().split())
    assert "--optimization-level OPTIMIZATION_LEVEL builder optimisation level 0..5 (default: 3)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_exit_codes_are_documented_in_top_level_help() -> None:
    text = cli.parser().format_help()
    assert "exit codes:" in text
    flat = " ".join(text.split())
    for code, meaning in cli.EXIT_CODES.items():
        assert f" {code} {meaning}" in flat
    assert set(cli.EXIT_CODES) == {0, 1, 2, 130}


def test_usage_errors_exit_with_2(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "folder"])  # --prompt is required
    assert exit_info.value.code == 2
    assert "--prompt" in capsys.readouterr().err
