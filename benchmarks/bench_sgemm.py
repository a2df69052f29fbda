"""This CPU's sgemm ceiling (numpy/OpenBLAS, ONNX Runtime/MLAS, torch), the reference for UNet GFLOP/s.

    python benchmarks/bench_sgemm.py [--sizes 1024 2048 4096] [--repeats 5]

Runs without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (in the child process only) and names the OpenBLAS kernel.
Appends to benchmarks/results/sgemm.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness import records
from harness.environment import environment
from harness.report import sgemm_lines
from harness.sgemm import SIZES, measure_ceiling

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str]) -> int:
    """Measure the sgemm ceiling, append it to the history and print it; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--history", type=Path, default=RESULTS / "sgemm.jsonl")
    args = ap.parse_args(argv)
    result = measure_ceiling(args.sizes, args.repeats)
    line = records.make_record("sgemm", records.new_run_id(), environment(), **result)
    records.append(args.history, [line])
    print("\n".join(sgemm_lines(line)))
    print(json.dumps(result["backends"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
