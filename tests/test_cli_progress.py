"""The command line's progress bars: tqdm with an ETA on a terminal, plain lines (build) or nothing (steps) off it."""

from __future__ import annotations

import io
import sys

import pytest

from sdexport.cli_progress import BuildProgress, StepBar
from sdexport.progress import Step


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_step_bar_on_a_terminal_counts_steps_and_shows_an_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    bar = StepBar()
    for step, timestep in enumerate((999.0, 666.0, 333.0)):
        bar(step, 3, timestep, None)
    text = err.getvalue()
    assert "denoising" in text and "3/3" in text and "t=333" in text
    assert "<" in text  # tqdm's elapsed<remaining: the ETA
    assert bar.bar is None  # closed after the last step; a second request starts a new bar
    bar(0, 2, 999.0, None)
    assert bar.bar is not None and bar.bar.total == 2


def test_step_bar_off_a_terminal_draws_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bar = StepBar()
    for step in range(4):
        bar(step, 4, 10.0, None)
    assert err.getvalue() == ""


def test_build_progress_off_a_terminal_prints_each_message_as_a_line(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    progress = BuildProgress()
    progress(Step("unet: exporting (fp32)", "export", 0, 1))
    progress("out: built unet")
    assert err.getvalue() == "unet: exporting (fp32)\nout: built unet\n"


def test_build_progress_on_a_terminal_draws_one_bar_per_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    progress = BuildProgress()
    progress(Step("a: exporting", "export", 0, 2))
    progress(Step("b: exporting", "export", 1, 2))
    assert progress.bar is not None and progress.bar.n == 1
    progress(Step("a: validated", "validate", 1, 2))  # the export phase is over: its bar is drawn full
    progress(Step("b: validated", "validate", 2, 2))
    assert progress.bar is None  # the last phase reached its total
    progress("out: built a, b")
    text = err.getvalue()
    assert "export" in text and "2/2" in text and "validate" in text
    assert text.index("a: exporting") < text.index("b: validated") < text.index("out: built a, b")


@pytest.mark.parametrize("done,total", [(-1, 3), (4, 3), (0, 0)])
def test_step_refuses_impossible_positions(done: int, total: int) -> None:
    with pytest.raises(ValueError, match=f"done={done}, total={total}"):
        Step("x", "export", done, total)


def test_a_step_is_its_message() -> None:
    step = Step("unet: exporting", "export", 0, 2)
    assert step == "unet: exporting" and f"{step}" == "unet: exporting" and (step.phase, step.total) == ("export", 2)
