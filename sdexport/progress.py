"""Progress messages of long library calls: plain strings that may also say how far a phase has come."""

from __future__ import annotations


class Step(str):
    """A progress message (a ``str``, so any ``progress(msg)`` callback can print it) plus its position.

    ``phase`` names the stage (``"export"``, ``"validate"``, ``"tensorrt"``), ``done`` counts its finished items
    out of ``total``; a front end can draw a bar with an ETA per phase from these.
    """

    phase: str
    done: int
    total: int

    def __new__(cls, text: str, phase: str, done: int, total: int) -> Step:
        """``Step("unet: exporting (fp32)", "export", 1, 3)``: item 2 of 3 starts, 1 is finished."""
        if total < 1 or not 0 <= done <= total:
            raise ValueError(f"progress position done={done}, total={total}: need 0 <= done <= total and total >= 1")
        step = super().__new__(cls, text)
        step.phase, step.done, step.total = phase, done, total
        return step
