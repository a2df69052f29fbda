"""Latency and memory benchmarks of compiled folders against diffusers, torch.compile and optimum.

This package lives next to the benchmark scripts, outside the installed ``sdexport`` package; the scripts in
``benchmarks/`` import it as ``harness``. Importing it pulls neither torch nor diffusers: the peers are loaded inside
their own worker processes, started as ``python -m harness.<module>`` with :func:`child_environ`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent
"""The ``benchmarks/`` folder: the parent of this package, put on a child process's PYTHONPATH."""


def child_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``benchmarks/`` first on PYTHONPATH.

    A child started as ``python -m harness.worker`` then imports this package wherever the parent was started from.
    """
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCHMARKS), env.get("PYTHONPATH")) if p)
    return env
