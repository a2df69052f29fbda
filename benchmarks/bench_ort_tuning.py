"""ONNX Runtime tuning experiment: each session option's effect on a network, measured variant by variant.

    python benchmarks/bench_ort_tuning.py                    # tiny-sd15 UNet (seconds)
    python benchmarks/bench_ort_tuning.py --model sd15 --size 256   # full SD 1.5 UNet (slow; built once)
    python benchmarks/bench_ort_tuning.py --model sd15 --size 512 --component vae_decoder   # memory-bound VAE

Appends to benchmarks/results/ort_tuning.jsonl and renders benchmarks/results/ort_tuning.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from harness import records
from harness.cases import SUITES, Case
from harness.models import ensure_compiled, folders_for
from harness.ort_tuning import BY_NAME, render_table, run_experiment

RESULTS = Path(__file__).resolve().parent / "results"
SUITE_OF = {"tiny-sd15": "tiny-sd15", "tiny-sdxl": "tiny-sdxl", "sd15": "sd15-256", "sdxl": "sdxl-512"}


def main(argv: list[str]) -> int:
    """Run the session-option experiment on one network and render its table; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd15", choices=sorted(SUITE_OF))
    ap.add_argument("--size", type=int, help="pixel height = width (default: the suite's)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--component", default="unet", choices=("unet", "vae_decoder", "text_encoder"),
                    help="the network to tune (the VAE decoder dominates peak memory at 512x512)")
    ap.add_argument("--variants", nargs="+", choices=sorted(BY_NAME), help="default: all")
    ap.add_argument("--rounds", type=int, help="passes over the variants (default 3 tiny, 2 full size)")
    ap.add_argument("--repeats", type=int, help="timed runs per variant and round (default 20 tiny, 3 full size)")
    ap.add_argument("--history", type=Path, default=RESULTS / "ort_tuning.jsonl")
    args = ap.parse_args(argv)
    suite = SUITES[SUITE_OF[args.model]]
    tiny = args.model.startswith("tiny-")
    size = args.size or suite.cases[0].height
    folder = folders_for(suite.model, suite.random_weights).compiled
    ensure_compiled(suite.model, suite.random_weights, folder, suite.build_height, suite.build_width)
    t0 = time.time()
    lines = run_experiment(folder, Case(suite.model, size, size, 1, args.batch), args.variants,
                           rounds=args.rounds or (3 if tiny else 2), repeats=args.repeats or (20 if tiny else 3),
                           progress=lambda msg: print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True),
                           component=args.component)
    records.append(args.history, lines)
    text = render_table(records.read(args.history, kind="ort_tuning"))
    (RESULTS / "ort_tuning.md").write_text("# ONNX Runtime tuning (latest run per model and size)\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
