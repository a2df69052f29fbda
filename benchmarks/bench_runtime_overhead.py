"""Runtime overhead per denoising step (everything outside the UNet call) and end-to-end time, vs diffusers.

Both sides run the same tiny preset's weights, the same scheduler, latents, size and guidance in the same process:
ours is sdexport's Pipeline on the compiled folder (numpy + ONNX Runtime), the peer is the diffusers pipeline
(torch, CPU). A step's wall time is the interval between consecutive step callbacks; its engine time is the time
inside the UNet call (ONNX Runtime session / torch module forward); the difference is the loop's own overhead
(scheduler, guidance, batching, copies). Results: JSON lines in benchmarks/results/runtime.jsonl and a table.

    python benchmarks/bench_runtime_overhead.py --preset tiny-sd15 --preset tiny-sdxl --steps 20 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdexport.export.build import BuildConfig, build
from sdexport.export.load import inspect_source, load_source
from sdexport.export.parity import diffusers_pipeline
from sdexport.runtime.pipeline import Pipeline

RESULTS = Path(__file__).parent / "results" / "runtime.jsonl"


class StepClock:
    """Timestamps of step callbacks and the time spent inside the UNet per step."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.engine: list[float] = []

    def mark(self) -> None:
        self.marks.append(time.perf_counter())

    def overheads(self, engine: list[float]) -> tuple[list[float], list[float]]:
        """(wall per step, overhead per step) for steps 1..N-1 (step 0 has no previous callback)."""
        walls = [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return walls, [w - e for w, e in zip(walls, engine[1:], strict=False)]


def run_ours(pipe: Pipeline, kwargs: dict[str, Any], latents: np.ndarray) -> tuple[float, list[float], list[float]]:
    """One generation with sdexport's Pipeline: total seconds, step wall times, per-step overheads."""
    clock = StepClock()
    t0 = time.perf_counter()
    out = pipe(**kwargs, latents=latents, output_type="np_float", callback=lambda *a: clock.mark())
    total = time.perf_counter() - t0
    walls, overheads = clock.overheads(out.timings.unet)
    return total, walls, overheads


def run_diffusers(pipe: Any, kwargs: dict[str, Any], latents: np.ndarray) -> tuple[float, list[float], list[float]]:
    """One generation with diffusers (UNet forward timed): total seconds, step wall times, per-step overheads."""
    clock = StepClock()
    forward = pipe.unet.forward

    def timed(*args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        result = forward(*args, **kw)
        clock.engine.append(time.perf_counter() - t0)
        return result

    def on_step(_pipe: Any, _i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        clock.mark()
        return tensors

    pipe.unet.forward = timed
    try:
        t0 = time.perf_counter()
        pipe(**kwargs, latents=torch.from_numpy(latents), output_type="np", callback_on_step_end=on_step)
        total = time.perf_counter() - t0
    finally:
        pipe.unet.forward = forward
    walls, overheads = clock.overheads(clock.engine)
    return total, walls, overheads


def measure(name: str, runner: Callable[..., tuple[float, list[float], list[float]]], pipe: Any,
            kwargs: dict[str, Any], latents: np.ndarray, repeats: int) -> dict[str, float]:
    """Median per-step overhead, step time and end-to-end time of ``repeats`` runs of ``runner``."""
    runner(pipe, kwargs, latents)  # warm-up
    totals, walls, overheads = [], [], []
    for _ in range(repeats):
        total, wall, overhead = runner(pipe, kwargs, latents)
        totals.append(total)
        walls += wall
        overheads += overhead
    return {"system": name, "overhead_ms_per_step": 1e3 * statistics.median(overheads),
            "step_ms": 1e3 * statistics.median(walls), "end_to_end_s": statistics.median(totals)}


def bench_preset(preset: str, work: Path, steps: int, size: int, batch: int, repeats: int) -> list[dict[str, Any]]:
    """Build the preset, then measure ours and diffusers on it; one result row each."""
    folder = work / preset
    build(BuildConfig(model=preset, out=folder))
    ours = Pipeline.load(folder)
    source = load_source(inspect_source(preset))
    peer = diffusers_pipeline(source.pipe, ours.spec, "txt2img")
    kwargs = {"prompt": "a lighthouse at dawn", "num_inference_steps": steps, "height": size, "width": size,
              "num_images_per_prompt": batch}
    shape = (batch, 4, size // ours.spec.vae_scale_factor, size // ours.spec.vae_scale_factor)
    latents = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    rows = [measure("sdexport", run_ours, ours, kwargs, latents, repeats),
            measure("diffusers", run_diffusers, peer, kwargs, latents, repeats)]
    common = {"preset": preset, "steps": steps, "size": size, "batch": batch, "repeats": repeats,
              "scheduler": ours.scheduler.class_name, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "versions": {p: metadata.version(p) for p in ("onnxruntime", "torch", "diffusers", "numpy")},
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return [{**common, **row} for row in rows]


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table with ratios (ours / diffusers) per preset."""
    lines = ["| preset | size x batch, steps | system | overhead / step (ms) | step (ms) | end to end (s) |",
             "|---|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['preset']} | {row['size']}x{row['size']} x{row['batch']}, {row['steps']} | "
                     f"{row['system']} | {row['overhead_ms_per_step']:.3f} | {row['step_ms']:.2f} | "
                     f"{row['end_to_end_s']:.3f} |")
    by_preset: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_preset.setdefault(row["preset"], {})[row["system"]] = row
    lines.append("")
    for preset, systems in by_preset.items():
        ours, peer = systems["sdexport"], systems["diffusers"]
        lines.append(f"{preset}: overhead ratio {ours['overhead_ms_per_step'] / peer['overhead_ms_per_step']:.2f}x, "
                     f"end-to-end ratio {ours['end_to_end_s'] / peer['end_to_end_s']:.2f}x (sdexport / diffusers)")
    return "\n".join(lines)


def main() -> None:
    """Measure the requested presets, append JSON lines and print the table; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", help="tiny preset(s); default tiny-sd15 and tiny-sdxl")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sdexport-bench",
                    help="where the tiny folders are built (kept, incremental)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)  # ONNX Runtime uses one intra-op thread per core too
    rows = []
    for preset in args.preset or ["tiny-sd15", "tiny-sdxl"]:
        rows += bench_preset(preset, args.work, args.steps, args.size, args.batch, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
