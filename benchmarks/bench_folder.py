"""Latency and memory of one compiled folder against diffusers eager, torch.compile and optimum on its weights.

    python benchmarks/bench_folder.py FOLDER [--systems sdexport,diffusers-eager] [--steps 4 20] [--batch 1 4]
        [--size HEIGHT WIDTH] [--out results.jsonl] [--markdown report.md] [--chart chart.png] [--ort-tuning]

FOLDER is any folder built with ``sdexport build``; the peers run on the weights its manifest names as the source.
Appends JSON lines to ``--out`` (default ./sdexport-bench.jsonl) and prints the markdown report.
"""

from __future__ import annotations

import argparse
import sys

from harness.folder import add_arguments, run


def main(argv: list[str]) -> int:
    """Parse ``argv`` and measure the folder; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
