"""Latency and memory of sdexport's runtime against diffusers eager, torch.compile and optimum, side by side.

    python benchmarks/bench_latency.py                      # tiny presets (default; a few minutes at most)
    python benchmarks/bench_latency.py --sd15-256 --sd15-512 # full SD 1.5 architecture, random weights (slow)
    python benchmarks/bench_latency.py --sdxl               # SDXL base at 512x512 and 768x768 (slow, ~17 GB to build)

Appends JSON lines to benchmarks/results/latency.jsonl, then renders the latest run of every suite into
benchmarks/results/latency.md, benchmarks/results/latency.png and the results section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from harness import session
from harness.cases import DEFAULT_SUITES, SUITES, with_overrides
from harness.models import folders_for
from harness.publish import publish
from harness.systems import SYSTEM_NAMES

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REGENERATE = "python benchmarks/bench_latency.py --sd15-256 --sd15-512"
OPT_IN = {"sd15_256": ("sd15-256",), "sd15_512": ("sd15-512",), "sdxl": ("sdxl-512", "sdxl-768")}


def parse(argv: list[str]) -> argparse.Namespace:
    """The command-line arguments of this script."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sd15-256", action="store_true", help="add the full SD 1.5 architecture at 256x256")
    ap.add_argument("--sd15-512", action="store_true", help="add the full SD 1.5 architecture at 512x512")
    ap.add_argument("--sdxl", action="store_true", help="add SDXL base at 512x512 and 768x768")
    ap.add_argument("--only", nargs="+", choices=sorted(SUITES), help="run exactly these suites")
    ap.add_argument("--systems", default=",".join(SYSTEM_NAMES), help="comma-separated systems")
    ap.add_argument("--steps", type=int, nargs="+", help="override every suite's steps")
    ap.add_argument("--batch", type=int, nargs="+", help="override every suite's batch sizes")
    ap.add_argument("--warmups", type=int, help="override warm-up runs per case")
    ap.add_argument("--repeats", type=int, help="override timed runs per case")
    ap.add_argument("--no-sgemm", action="store_true", help="skip the sgemm ceiling")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker process")
    ap.add_argument("--history", type=Path, default=RESULTS / "latency.jsonl")
    ap.add_argument("--no-readme", action="store_true", help="do not touch benchmarks/README.md")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    """Run the chosen suites, append their results and re-render the tables; returns the exit code."""
    args = parse(argv)
    opted = [suite for flag, suites in OPT_IN.items() if getattr(args, flag) for suite in suites]
    names = args.only or [*DEFAULT_SUITES, *opted]
    plans = []
    for name in names:
        suite = with_overrides(SUITES[name], tuple(args.steps or ()), tuple(args.batch or ()), args.warmups,
                               args.repeats)
        plans.append((suite, folders_for(suite.model, suite.random_weights)))
    t0 = time.time()
    session.run(plans, [s for s in args.systems.split(",") if s], args.history, sgemm=not args.no_sgemm,
                timeout=args.timeout, progress=lambda msg: print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True))
    text = publish(args.history, RESULTS / "latency.md", RESULTS / "latency.png",
                   None if args.no_readme else HERE / "README.md", REGENERATE)
    print(text)
    print(f"done in {time.time() - t0:.0f} s; history {args.history}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
