"""GPU latency: sdexport's TensorRT engines and GPU denoising loop against diffusers on CUDA, in the same run.

Every system generates the same prompt from the same initial latents with the same scheduler, steps and guidance,
each in its own child process (so GPU memory is its own), with warm-ups before the timed runs:

    sdexport-trt            Pipeline.load(folder, backend="tensorrt"): CUDA graphs, the loop on CuPy arrays
    sdexport-trt-hostloop   the same engines, engine option device_loop=False (numpy loop: a host trip per step)
    sdexport-ort-cuda       Pipeline.load(folder) with ONNX Runtime's CUDAExecutionProvider
    diffusers-cuda          DiffusionPipeline.from_pretrained(DIFFUSERS, torch_dtype=float16).to("cuda")

    python benchmarks/bench_gpu.py --folder build/sdxl-trt --diffusers stabilityai/stable-diffusion-xl-base-1.0 \\
        --size 1024 1024 --steps 30 --batch 1 --repeats 5

``--folder`` is a folder built with ``--precision fp16 --backend tensorrt`` from the weights ``--diffusers`` names
(a hub id or a local diffusers folder). The table gives the median end-to-end time, its ratio to diffusers-cuda,
images/s, per-stage medians for sdexport (GPU time from CUDA events) and the largest pixel difference from
diffusers' image. Results are appended as JSON lines to benchmarks/results/gpu.jsonl. Without a usable NVIDIA GPU
the script says why and exits with status 2; nothing is measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness import records
from harness.stats import ratio, summarize

RESULTS = Path(__file__).parent / "results" / "gpu.jsonl"
SYSTEMS = ("sdexport-trt", "sdexport-trt-hostloop", "sdexport-ort-cuda", "diffusers-cuda")
PEER = "diffusers-cuda"
PROMPT = "a photograph of an astronaut riding a horse on the moon"


def _ours(system: str, folder: str) -> Any:
    from sdexport.runtime.pipeline import Pipeline

    if system == "sdexport-ort-cuda":
        return Pipeline.load(folder, engine_options={"providers": ["CUDAExecutionProvider"]})
    return Pipeline.load(folder, backend="tensorrt", engine_options={"device_loop": system == "sdexport-trt"})


def _measure(system: str, args: argparse.Namespace, latents: np.ndarray) -> dict[str, Any]:
    """Load ``system``, warm up, time ``args.repeats`` generations; returns timings and the last images."""
    t0 = time.perf_counter()
    common = {"height": args.size[0], "width": args.size[1], "num_inference_steps": args.steps,
              "guidance_scale": args.guidance, "num_images_per_prompt": args.batch}
    if system == PEER:
        import torch
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.diffusers, torch_dtype=torch.float16).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        start = torch.from_numpy(latents).to("cuda", torch.float16)

        def generate() -> tuple[np.ndarray, dict[str, Any]]:
            out = pipe(PROMPT, latents=start.clone(), output_type="np", **common)
            torch.cuda.synchronize()
            return np.asarray(out.images, dtype=np.float32), {}
    else:
        pipe = _ours(system, args.folder)

        def generate() -> tuple[np.ndarray, dict[str, Any]]:
            out = pipe(PROMPT, latents=latents, output_type="np_float", **common)
            t = out.timings
            return np.asarray(out.images), {"text_encoder": t.text_encoder, "unet": float(np.median(t.unet)),
                                            "vae_decoder": t.vae_decoder,
                                            "overhead": float(np.median(np.subtract(t.steps, t.unet)))}
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    images, _ = generate()
    first = time.perf_counter() - t0
    for _ in range(args.warmups):
        generate()
    totals, stages = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        images, stage = generate()
        totals.append(time.perf_counter() - t0)
        stages.append(stage)
    per_stage = {k: summarize([s[k] for s in stages]).median for k in (stages[0] if stages else {})}
    return {"system": system, "load_s": load, "first_s": first, "total": summarize(totals).__dict__,
            "stages": per_stage, "images": images}


def _worker(args: argparse.Namespace) -> int:
    latents = np.load(args.latents)
    result = _measure(args.worker, args, latents)
    np.save(args.images, result.pop("images"))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def _table(rows: list[dict[str, Any]]) -> str:
    peer = next((r for r in rows if r["system"] == PEER and "total" in r), None)
    lines = ["| system | median s | x diffusers-cuda | images/s | UNet ms/eval | overhead ms/step | "
             "max abs diff vs diffusers | note |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [row["system"]] + [""] * 7
        if "total" not in row:
            cells[7] = row["error"]
        else:
            median, stages, diff = row["total"]["median"], row["stages"], row.get("max_abs_diff")
            x = ratio(median, peer["total"]["median"]) if peer else None
            cells[1:4] = [f"{median:.3f}", "" if x is None else f"{x:.2f}x", f"{row['batch'] / median:.2f}"]
            cells[4] = f"{stages['unet'] * 1000:.1f}" if "unet" in stages else ""
            cells[5] = f"{stages['overhead'] * 1000:.2f}" if "overhead" in stages else ""
            cells[6] = "" if diff is None else f"{diff:.3f}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _run_workers(systems: list[str], argv: list[str], latents: np.ndarray,
                 batch: int) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Measure each system in its own child process (this script with ``--worker``); its row and its images."""
    rows: list[dict[str, Any]] = []
    images: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/latents.npy", latents)
        for system in systems:
            cmd = [sys.executable, __file__, *argv, "--worker", system, "--latents", f"{tmp}/latents.npy",
                   "--images", f"{tmp}/{system}.npy"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                last = done.stderr.strip().splitlines()[-1:]
                rows.append({"system": system, "error": last[0] if last else f"exit status {done.returncode}"})
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            images[system] = np.load(f"{tmp}/{system}.npy")
            rows.append(dict(row, batch=batch))
    return rows, images


def main(argv: list[str] | None = None) -> int:
    """Measure the systems on the folder (or, with the hidden ``--worker``, be one system's child process)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--folder", required=True, help="a compiled folder with TensorRT engines (fp16)")
    ap.add_argument("--diffusers", help="hub id or local diffusers folder of the same weights (diffusers-cuda)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {', '.join(SYSTEMS)}")
    ap.add_argument("--size", type=int, nargs=2, default=(1024, 1024), metavar=("HEIGHT", "WIDTH"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--warmups", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--latents", help=argparse.SUPPRESS)
    ap.add_argument("--images", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args)
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        ap.error(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    if PEER in systems and not args.diffusers:
        ap.error("diffusers-cuda needs --diffusers (a hub id or a local diffusers folder of the same weights)")
    from sdexport.engines.doctor import diagnose
    from sdexport.engines.tensorrt.compat import probe_environment

    env = probe_environment()
    if not env.gpus:
        sys.stderr.write(f"bench_gpu: no usable NVIDIA GPU ({env.gpu_error}); nothing measured\n")
        return 2
    manifest = json.loads((Path(args.folder) / "manifest.json").read_text())
    channels = 4  # txt2img latents; the folder's VAE scale gives their size
    scale = int(manifest["model"].get("vae_scale_factor", 8))
    shape = (args.batch, channels, args.size[0] // scale, args.size[1] // scale)
    latents = np.random.default_rng(args.seed).standard_normal(shape, dtype=np.float32)
    rows, images = _run_workers(systems, argv if argv is not None else sys.argv[1:], latents, args.batch)
    for row in rows:
        if PEER in images and row["system"] in images:
            row["max_abs_diff"] = float(np.abs(images[row["system"]] - images[PEER]).max())
    run_id = records.new_run_id()
    machine = diagnose(Path(args.folder), env=env).to_dict()
    case = {"folder": str(args.folder), "size": list(args.size), "steps": args.steps, "batch": args.batch,
            "guidance": args.guidance, "seed": args.seed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as handle:
        for row in rows:
            handle.write(json.dumps({"kind": "gpu-latency", "run_id": run_id, "time": time.time(), "case": case,
                                     "environment": machine, **row}) + "\n")
    sys.stdout.write(_table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
