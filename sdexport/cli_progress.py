"""Progress bars of the command line (tqdm): per denoising step for ``sdexport run``, per build phase for
``sdexport build``. The library never imports this module; it reports progress through callbacks."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from sdexport.progress import Step


def _interactive() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


class StepBar:
    """``callback(step, total, timestep, latents)`` of ``Pipeline.__call__`` drawing a bar with an ETA on stderr.

    Off a terminal (logs, pipes) it draws nothing: carriage-return redraws would only clutter the file.
    """

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __call__(self, step: int, total: int, timestep: float, latents: Any) -> None:
        """Advance to ``step + 1`` of ``total``; close the bar after the last step."""
        if self.bar is None:
            self.bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr, disable=not _interactive(),
                            dynamic_ncols=True, leave=True)
        self.bar.set_postfix_str(f"t={timestep:.0f}", refresh=False)
        self.bar.update(step + 1 - self.bar.n)
        if step + 1 >= total:
            self.close()

    def close(self) -> None:
        """Finish the current bar (if any); the next call starts a new one."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class BuildProgress:
    """``progress(msg)`` of ``build``: one bar with an ETA per phase (on a terminal), messages as lines above it.

    Off a terminal every message is one plain line, so build logs read as before.
    """

    def __init__(self) -> None:
        self.interactive = _interactive()
        self.bar: tqdm | None = None
        self.phase: str | None = None

    def __call__(self, message: str) -> None:
        """Show ``message``; a :class:`~sdexport.progress.Step` also moves its phase's bar."""
        if not self.interactive:
            print(message, file=sys.stderr, flush=True)
            return
        if isinstance(message, Step):
            if message.phase != self.phase:
                self.close(finished=True)  # a new phase starts once the previous one is done
                self.bar = tqdm(total=message.total, desc=message.phase, unit="component", file=sys.stderr,
                                dynamic_ncols=True, leave=True)
                self.phase = message.phase
            self.bar.update(message.done - self.bar.n)
        tqdm.write(str(message), file=sys.stderr)
        if self.bar is not None and self.bar.n >= self.bar.total:
            self.close()

    def close(self, finished: bool = False) -> None:
        """Finish the current phase's bar (``finished``: drawn full first)."""
        if self.bar is not None:
            if finished:
                self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
        self.bar, self.phase = None, None
