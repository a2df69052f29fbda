"""``python benchmarks/bench_folder.py FOLDER``: measure any compiled folder; its arguments and the call into the
harness (no torch imported here)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.cases import Case, Suite
from harness.models import Folders, folders_for, source_of
from harness.systems import QUANTIZED_SYSTEMS, SYSTEM_NAMES


def _systems(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SYSTEM_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEM_NAMES)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``bench_folder.py``."""
    parser.add_argument("folder", type=Path, help="a compiled folder (sdexport build)")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 20], help="num_inference_steps values")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="num_images_per_prompt values")
    parser.add_argument("--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="pixel size (default: the folder's optimal size)")
    parser.add_argument("--systems", type=_systems, default=[s for s in SYSTEM_NAMES if s not in QUANTIZED_SYSTEMS],
                        help=f"comma-separated, from {','.join(SYSTEM_NAMES)} (peers that cannot run here are "
                             "reported as skipped with the reason; a hybrid system first runs `sdexport quantize` "
                             "on FOLDER, which adds an int8 UNet to it)")
    parser.add_argument("--warmups", type=int, default=1, help="untimed runs before the measured ones")
    parser.add_argument("--repeats", type=int, default=5, help="measured runs per case")
    parser.add_argument("--out", type=Path, default=Path("sdexport-bench.jsonl"), help="JSON lines to append to")
    parser.add_argument("--markdown", type=Path, help="also write the markdown report here")
    parser.add_argument("--chart", type=Path, help="also draw the PNG chart here")
    parser.add_argument("--no-sgemm", action="store_true", help="skip the sgemm ceiling measurement")
    parser.add_argument("--ort-tuning", action="store_true",
                        help="also measure ONNX Runtime session options on the folder's UNet")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker process")


def folder_suite(folder: Path, steps: list[int], batches: list[int], size: tuple[int, int] | None,
                 warmups: int, repeats: int) -> tuple[Suite, Folders]:
    """The suite and folders that measure one compiled folder (its source gives the peers' weights)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    model, random_weights, local = source_of(folder)
    height, width = size or (manifest["shape_ranges"]["height"][1], manifest["shape_ranges"]["width"][1])
    cached = folders_for(model or folder.name, random_weights, compiled=folder)
    folders = Folders(folder, local or cached.diffusers, cached.optimum, cached.optimum_openvino)
    cases = tuple(Case(model or folder.name, height, width, s, b) for b in batches for s in steps)
    suite = Suite(folder.name, model, random_weights, cases, warmups, repeats, (height,) * 3, (width,) * 3,
                  f"{folder} at {height}x{width}")
    return suite, folders


def run(args: argparse.Namespace) -> int:
    """Measure ``args.folder``; prints the markdown report; returns the exit code."""
    from harness import records, report, session

    folder = args.folder
    if not (folder / "manifest.json").exists():
        sys.stderr.write(f"bench_folder.py: {folder} has no manifest.json; build it with `sdexport build`\n")
        return 2
    suite, folders = folder_suite(folder, args.steps, args.batch, tuple(args.size) if args.size else None,
                                  args.warmups, args.repeats)
    progress = lambda msg: sys.stderr.write(msg + "\n")  # noqa: E731
    lines = session.run([(suite, folders)], args.systems, args.out, sgemm=not args.no_sgemm, timeout=args.timeout,
                        progress=progress)
    if args.ort_tuning:
        from harness import ort_tuning

        tuned = ort_tuning.run_experiment(folder, suite.cases[0], progress=progress)
        records.append(args.out, tuned)
        lines += tuned
    chart = None
    if args.chart:
        from harness.chart import render_png

        chart = str(render_png(lines, args.chart))
    text = report.render(lines, chart)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
