"""Latency and memory benchmarks of compiled folders against diffusers, torch.compile and optimum (``sdexport bench``).

Importing this package pulls neither torch nor diffusers: the peers are loaded inside their own worker processes.
"""

from __future__ import annotations

import argparse

__all__ = ["add_bench_arguments", "run_bench"]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``sdexport bench`` to ``parser``."""
    from sdexport.bench.command import add_bench_arguments as add

    add(parser)


def run_bench(args: argparse.Namespace) -> int:
    """Run ``sdexport bench`` with parsed ``args``; returns the exit code."""
    from sdexport.bench.command import run_bench as run

    return run(args)
