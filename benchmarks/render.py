"""Re-render benchmarks/results/latency.md, latency.png and the README section from the recorded JSON lines.

    python benchmarks/render.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench_latency import REGENERATE, RESULTS

from harness.publish import publish

HERE = Path(__file__).resolve().parent


def main() -> int:
    """Re-render the results from the recorded JSON lines; returns the exit code."""
    print(publish(RESULTS / "latency.jsonl", RESULTS / "latency.md", RESULTS / "latency.png", HERE / "README.md",
                  REGENERATE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
