"""Precision per machine: seconds per picture, difference from f32 and the demo model's quality score, interleaved.

    python benchmarks/bench_precision.py                         # the demo model (built into a temporary folder)
    python benchmarks/bench_precision.py --folder build/demo --per-combo 2 --steps 25
    python benchmarks/bench_precision.py --folder build/sd15-256 --unet-only --size 256   # UNet calls only

Variants: ONNX Runtime f32 (sdexport's default backend), OpenVINO f32, and OpenVINO at every reduced precision the
CPU plugin offers (bf16, f16; int8 weights when nncf is installed) plus ``auto``, and ``hybrid`` / ``hybrid-bf16``
when the folder's UNet has an int8 IR (``sdexport quantize``; the demo folder built here gets one, calibrated on the
trained captions only). All variants stay loaded and take
turns picture by picture (or call by call), so a change in machine load hits all of them alike. Appends a JSON line
to benchmarks/results/precision.jsonl and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from harness.environment import environment
from harness.flops import unet_feeds
from sdexport import Pipeline
from sdexport.demo import GUIDANCE
from sdexport.demo.evaluate import prompt_list, score
from sdexport.demo.shapes import IMAGE_SIZE, caption

RESULTS = Path(__file__).resolve().parent / "results"


def variants(folder: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (backend, engine options): ORT f32, OpenVINO f32, each reduced precision offered here, auto, and the
    hybrid int8 UNet (with bf16 elsewhere when offered) when the folder has one (``sdexport quantize``)."""
    import openvino as ov

    from sdexport.engines.artifacts import QUANTIZED, read_manifest
    from sdexport.engines.openvino_precision import offered

    reduced = offered(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    hybrid = QUANTIZED in read_manifest(folder)["components"]["unet"]
    extra = (("hybrid", *(("hybrid-bf16",) if "bf16" in reduced else ())) if hybrid else ())
    out = {"onnxruntime f32": ("onnxruntime", {}), "openvino f32": ("openvino", {"precision": "f32"})}
    out.update({f"openvino {p}": ("openvino", {"precision": p}) for p in (*reduced, "auto", *extra)})
    return out


def _pictures(pipes: dict[str, Any], combos: list[tuple[str, str, str]], steps: int, guidance: float,
              seed: int) -> tuple[dict[str, list[np.ndarray]], dict[str, list[float]]]:
    images: dict[str, list[np.ndarray]] = {name: [] for name in pipes}
    seconds: dict[str, list[float]] = {name: [] for name in pipes}
    for i, combo in enumerate(combos):
        names = list(pipes) if i % 2 == 0 else list(reversed(pipes))  # alternate who goes first
        for name in names:
            t0 = time.perf_counter()
            result = pipes[name](caption(*combo), num_inference_steps=steps, guidance_scale=guidance,
                                 height=IMAGE_SIZE, width=IMAGE_SIZE, seed=seed + i, output_type="np")
            seconds[name].append(time.perf_counter() - t0)
            images[name].append(np.asarray(result.images[0], dtype=np.float64))
    return images, seconds


def demo_rows(pipes: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per variant: median seconds per picture, mean / max pixel difference from OpenVINO f32, demo accuracy."""
    combos = prompt_list(args.per_combo, args.per_combo)
    images, seconds = _pictures(pipes, combos, args.steps, args.guidance, args.seed)
    ref = np.stack(images["openvino f32"])
    rows = []
    for name, pictures in images.items():
        diff = np.abs(np.stack(pictures) - ref)
        result = score([p.astype(np.uint8) for p in pictures], combos)
        rows.append({"variant": name, "median_s": float(np.median(seconds[name])), "pictures": len(pictures),
                     "mean_diff_255": float(diff.mean()), "max_diff_255": float(diff.max()),
                     "trained_accuracy": result.trained, "held_out_accuracy": result.held_out,
                     "precisions": {c: getattr(e, "precision", "f32") for c, e in pipes[name].engines.items()}})
    return rows


def unet_rows(pipes: dict[str, Any], folder: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per variant: median seconds per UNet call (CFG batch) and the relative RMS difference from OpenVINO f32."""
    rng = np.random.default_rng(0)  # seeded normal latents and text states (zeros would hide precision errors)
    feeds = {k: v if k == "timestep" else rng.standard_normal(v.shape).astype(v.dtype)
             for k, v in unet_feeds(folder, 1, args.size, args.size).items()}
    times: dict[str, list[float]] = {name: [] for name in pipes}
    outputs: dict[str, Any] = {}
    for name, pipe in pipes.items():
        outputs[name] = pipe.engines["unet"].run(feeds)  # warm-up
    for _ in range(args.repeats):
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            pipe.engines["unet"].run(feeds)
            times[name].append(time.perf_counter() - t0)
    from sdexport.engines.openvino_precision import relative_error

    return [{"variant": name, "median_s": float(np.median(t)), "calls": len(t),
             "relative_error": relative_error(outputs[name], outputs["openvino f32"]),
             "precision": getattr(pipes[name].engines["unet"], "precision", "f32")} for name, t in times.items()]


def _folder(args: argparse.Namespace, scratch: Path) -> Path:
    if args.folder is not None:
        return args.folder
    from sdexport.demo.shapes import caption, trained_combos
    from sdexport.engines.openvino_quantize import QuantizeConfig, quantize_folder
    from sdexport.export.build import BuildConfig, build

    build(BuildConfig(model="demo", out=scratch / "demo"))
    if not args.no_quantize:  # calibrated on trained captions only: the held-out score stays a fair test
        quantize_folder(scratch / "demo", QuantizeConfig(prompts=tuple(caption(*c) for c in trained_combos()),
                                                         guidance=args.guidance, threads=args.threads))
    return scratch / "demo"


def _table(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k not in ("precisions",)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    fmt: Callable[[Any], str] = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines += ["| " + " | ".join(fmt(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    """Run every variant on one folder and record the result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, help="a compiled folder (default: build the demo model)")
    p.add_argument("--no-quantize", action="store_true", help="leave out the hybrid int8 variants (demo model)")
    p.add_argument("--unet-only", action="store_true", help="time UNet calls only (models other than the demo)")
    p.add_argument("--size", type=int, default=256, help="image size of the UNet calls (--unet-only)")
    p.add_argument("--repeats", type=int, default=3, help="UNet calls per variant (--unet-only)")
    p.add_argument("--per-combo", type=int, default=1, help="demo pictures per shape/colour combination")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=GUIDANCE,
                   help="default %(default)s, the scale the demo model is made for")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = _folder(args, Path(scratch))
        pipes = {name: Pipeline.load(folder, backend=backend, engine_options={"threads": args.threads, **options})
                 for name, (backend, options) in variants(folder).items()}
        rows = unet_rows(pipes, folder, args) if args.unet_only else demo_rows(pipes, args)
    record = {"kind": "precision", "folder": str(args.folder or "demo"), "unet_only": args.unet_only,
              "size": args.size if args.unet_only else IMAGE_SIZE, "steps": args.steps, "threads": args.threads,
              "environment": environment(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "precision.jsonl").open("a") as out:
        out.write(json.dumps(record) + "\n")
    print(f"CPU: {record['environment']['cpu']} {record['environment']['cpu_flags']}, "
          f"load {record['environment'].get('load_average')}")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
