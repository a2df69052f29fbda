"""Per-step cost of an IP-Adapter over plain generation, sdexport vs diffusers eager, measured in the same run.

Default: the SD 1.5 architecture with random weights at 256x256 and a random plain IP-Adapter (4 image tokens,
1024-wide image embeds as IP-Adapter SD 1.5's ViT-H encoder makes them; the vision tower itself is small, it runs
once per request and is not part of the per-step cost). Four systems run the same latents, prompt and image:
sdexport plain folder, sdexport IP-Adapter folder, diffusers plain, diffusers with ``load_ip_adapter``. A step's
time is the interval between consecutive step callbacks (median over repeats); the table gives the IP-Adapter's
per-step overhead on each side. Results: JSON lines in benchmarks/results/ip_adapter.jsonl and a table.

    python benchmarks/bench_ip_adapter.py                          # sd15 random weights, 256 px (slow to build)
    python benchmarks/bench_ip_adapter.py --model tiny-sd15 --size 64 --steps 6 --repeats 2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdexport.export.build import BuildConfig, build
from sdexport.export.ip_adapter import write_random_ip_adapter
from sdexport.export.load import inspect_source, load_source
from sdexport.export.parity import diffusers_pipeline
from sdexport.runtime.pipeline import Pipeline
from sdexport.specs import ShapeRanges

RESULTS = Path(__file__).parent / "results" / "ip_adapter.jsonl"
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=224,
              patch_size=32, projection_dim=1024)


def _steps_ours(pipe: Pipeline, kwargs: dict[str, Any], latents: np.ndarray) -> list[float]:
    marks: list[float] = []
    pipe(**kwargs, latents=latents, output_type="latent", callback=lambda *a: marks.append(time.perf_counter()))
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def _steps_diffusers(pipe: Any, kwargs: dict[str, Any], latents: np.ndarray) -> list[float]:
    marks: list[float] = []

    def on_step(_pipe: Any, _i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        marks.append(time.perf_counter())
        return tensors

    pipe(**kwargs, latents=torch.from_numpy(latents), output_type="latent", callback_on_step_end=on_step)
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def _median_step_ms(run: Any, pipe: Any, kwargs: dict[str, Any], latents: np.ndarray, repeats: int) -> float:
    run(pipe, kwargs, latents)  # warm-up
    steps: list[float] = []
    for _ in range(repeats):
        steps += run(pipe, kwargs, latents)
    return 1e3 * statistics.median(steps)


def _folders(model: str, random_weights: bool, work: Path, size: int) -> tuple[Path, Path, Path]:
    """(plain folder, IP-Adapter folder, adapter weights); the adapter folder reuses the plain one's graphs."""
    ranges = ShapeRanges(batch=(1, 1, 1), height=(size, size, size), width=(size, size, size))
    plain, adapted = work / f"{model}-{size}", work / f"{model}-{size}-ip"
    build(BuildConfig(model=model, out=plain, ranges=ranges, random_weights=random_weights))
    unet = load_source(inspect_source(model, random_weights), modules=frozenset({"unet"})).pipe.unet
    weights = write_random_ip_adapter(work / "ip-adapter", unet, VISION, seed=0)
    del unet
    if not adapted.exists():
        shutil.copytree(plain, adapted)  # text encoder and VAE graphs are reused, only the UNet is rebuilt
    build(BuildConfig(model=model, out=adapted, ranges=ranges, random_weights=random_weights, ip_adapter=weights))
    return plain, adapted, weights


def bench(model: str, random_weights: bool, work: Path, size: int, steps: int, repeats: int) -> list[dict[str, Any]]:
    """The four systems on one model; one row each."""
    plain, adapted, weights = _folders(model, random_weights, work, size)
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size, size, 3), dtype=np.uint8))
    kwargs = {"prompt": "a lighthouse at dawn", "num_inference_steps": steps, "height": size, "width": size}
    ours_plain, ours_ip = Pipeline.load(plain), Pipeline.load(adapted)
    factor = ours_plain.spec.vae_scale_factor
    latents = np.random.default_rng(0).standard_normal((1, 4, size // factor, size // factor), dtype=np.float32)
    rows = [("sdexport", "plain", _median_step_ms(_steps_ours, ours_plain, kwargs, latents, repeats)),
            ("sdexport", "ip-adapter", _median_step_ms(_steps_ours, ours_ip, {**kwargs, "ip_adapter_image": picture},
                                                       latents, repeats))]
    del ours_plain, ours_ip
    source = load_source(inspect_source(model, random_weights))
    peer = diffusers_pipeline(source.pipe, inspect_source(model, random_weights).spec, "txt2img")
    rows.append(("diffusers-eager", "plain", _median_step_ms(_steps_diffusers, peer, kwargs, latents, repeats)))
    peer.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name)
    rows.append(("diffusers-eager", "ip-adapter", _median_step_ms(
        _steps_diffusers, peer, {**kwargs, "ip_adapter_image": picture}, latents, repeats)))
    common = {"model": model, "random_weights": random_weights, "size": size, "steps": steps, "repeats": repeats,
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "load_average": os.getloadavg()[0],
              "versions": {p: metadata.version(p) for p in ("onnxruntime", "torch", "diffusers", "numpy")},
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return [{**common, "system": system, "variant": variant, "step_ms": ms} for system, variant, ms in rows]


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: step time plain / with the adapter, the adapter's overhead, per system."""
    by_system: dict[str, dict[str, float]] = {}
    for row in rows:
        by_system.setdefault(row["system"], {})[row["variant"]] = row["step_ms"]
    lines = ["| system | plain step (ms) | IP-Adapter step (ms) | IP-Adapter overhead |", "|---|---:|---:|---:|"]
    for system, ms in by_system.items():
        extra = ms["ip-adapter"] / ms["plain"] - 1
        lines.append(f"| {system} | {ms['plain']:.1f} | {ms['ip-adapter']:.1f} | {100 * extra:+.1f} % |")
    ours, peer = by_system["sdexport"], by_system["diffusers-eager"]
    lines += ["", f"IP-Adapter step: sdexport / diffusers eager = {ours['ip-adapter'] / peer['ip-adapter']:.2f}x "
              f"(plain: {ours['plain'] / peer['plain']:.2f}x); load average {rows[0]['load_average']:.1f} on "
              f"{rows[0]['cores']} cores"]
    return "\n".join(lines)


def _arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd15", help="a family preset (random weights) or a tiny preset")
    for flag, default in (("--size", 256), ("--steps", 10), ("--repeats", 3)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sdexport-bench-ip",
                    help="where the folders are built (kept, incremental)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON lines file the rows are appended to")
    return ap.parse_args()


def main() -> None:
    """Build, measure, append JSON lines and print the table."""
    args = _arguments()
    torch.set_num_threads(os.cpu_count() or 1)  # ONNX Runtime uses one intra-op thread per core too
    rows = bench(args.model, not args.model.startswith("tiny-"), args.work, args.size, args.steps, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    with args.out.open("a") as f:
        f.write(lines)
    print(table(rows))


if __name__ == "__main__":
    main()
