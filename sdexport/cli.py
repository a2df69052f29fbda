"""Command line: argument parsing -> config -> one library call per command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from sdexport import __version__
from sdexport.errors import SdexportError, UsageError
from sdexport.specs import PRESETS

log = logging.getLogger("sdexport")


def _range(text: str) -> tuple[int, int, int]:
    """MIN:OPT:MAX or a single value (a static size)."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MIN:OPT:MAX or one integer") from exc
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MIN:OPT:MAX or one integer")
    return parts[0], parts[1], parts[2]


def _component_precision(text: str) -> tuple[str, str]:
    name, sep, precision = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected COMPONENT=fp16 or COMPONENT=fp32")
    return name, precision


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="export, validate and compile a pipeline into a folder")
    p.add_argument("--model", default="tiny-sd15",
                   help=f"a preset ({', '.join(PRESETS)}), a hub id or a local diffusers folder")
    p.add_argument("--out", type=Path, help="output folder (default: build/<model>)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="a LoRA to fuse into the UNet and text encoders; repeatable")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--component-precision", action="append", type=_component_precision, default=[],
                   metavar="COMPONENT=PRECISION", help="override one component's precision (e.g. vae_decoder=fp16)")
    p.add_argument("--batch", type=_range, help="images per call MIN:OPT:MAX")
    p.add_argument("--height", type=_range, help="pixel height MIN:OPT:MAX")
    p.add_argument("--width", type=_range, help="pixel width MIN:OPT:MAX")
    p.add_argument("--prompt-chunks", type=int, help="longest prompt in chunks of 77 tokens")
    p.add_argument("--random-weights", action="store_true",
                   help="instantiate a family preset's full-size architecture with random weights (no download)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin/.ckpt) weights you trust")
    p.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime",
                   help="tensorrt also builds engines from the graphs (needs an NVIDIA GPU)")
    t = p.add_argument_group("TensorRT (with --backend tensorrt)")
    t.add_argument("--shapes", choices=("static", "dynamic", "both"), default="static",
                   help="static shape buckets (fastest), one dynamic profile over the ranges, or both")
    t.add_argument("--bucket", action="append", default=[], metavar="WxH", help="a static size bucket; repeatable")
    t.add_argument("--refittable", action="store_true", help="refittable engines (LoRA hot swap without rebuild)")
    t.add_argument("--strip-weights", action="store_true", help="weightless plans, refitted from the graphs at load")
    t.add_argument("--workspace-gib", type=float, help="builder workspace limit")
    t.add_argument("--optimization-level", type=int, default=3, help="builder optimisation level 0..5")
    t.add_argument("--version-compatible", action="store_true", help="plans that load on later TensorRT versions")
    t.add_argument("--exclude-lean-runtime", action="store_true", help="with --version-compatible: smaller plans")
    t.add_argument("--hardware-compatibility", choices=("none", "same-cc", "ampere+"), default="none")
    t.add_argument("--timing-cache", type=Path, help="timing cache file to reuse across builds")
    t.add_argument("--trt-components", nargs="+", help="build engines for these components only")
    t.add_argument("--device", type=int, default=0, help="CUDA device to build on")
    t.add_argument("--build-timeout", type=float, help="seconds one engine build may take")


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="verify a compiled folder against its manifest and describe it")
    p.add_argument("folder", type=Path)
    p.add_argument("--json", action="store_true", help="print the manifest instead of the summary")


def _size_pair(text: str) -> tuple[int, int]:
    """HEIGHTxWIDTH (or TOP,LEFT) as two integers."""
    parts = text.replace(",", "x").split("x")
    try:
        first, second = (int(p) for p in parts)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two integers like 1024x1024 or 0,0") from exc
    return first, second


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate images with a compiled folder (no torch, no diffusers)")
    p.add_argument("folder", type=Path)
    p.add_argument("--prompt", required=True, action="append", help="repeat for a batch of prompts")
    p.add_argument("--negative-prompt")
    p.add_argument("--prompt-2", help="SDXL: the second text encoder's prompt (default: --prompt)")
    p.add_argument("--negative-prompt-2")
    p.add_argument("--image", type=Path, help="image-to-image / inpainting input (PNG/JPEG), or latents (.npy)")
    p.add_argument("--mask", type=Path, help="inpainting mask: white is repainted")
    p.add_argument("--out", type=Path, default=Path("out.png"),
                   help="PNG (several images: out-0.png, out-1.png, ...) or .npy to save the latents")
    p.add_argument("--steps", type=int, default=30, help="num_inference_steps")
    p.add_argument("--guidance-scale", type=float, help="default: the family's diffusers default")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--strength", type=float)
    p.add_argument("--denoising-start", type=float)
    p.add_argument("--denoising-end", type=float)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--num-images", type=int, default=1, help="num_images_per_prompt")
    p.add_argument("--seed", type=int, help="image i gets seed + i (default: random)")
    p.add_argument("--clip-skip", type=int)
    p.add_argument("--scheduler", help="a diffusers scheduler class name or alias (default: the folder's)")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--original-size", type=_size_pair, metavar="HxW")
    p.add_argument("--target-size", type=_size_pair, metavar="HxW")
    p.add_argument("--crops-coords-top-left", type=_size_pair, default=(0, 0), metavar="TOP,LEFT")
    p.add_argument("--aesthetic-score", type=float, default=6.0)
    p.add_argument("--negative-aesthetic-score", type=float, default=2.5)
    p.add_argument("--long-prompts", default="truncate", help="truncate (diffusers) or chunk (up to the folder's "
                   "prompt chunks)")
    p.add_argument("--rng", default="numpy", help="numpy, or torch: the same noise as diffusers' CPU generator")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--no-verify", action="store_true", help="check file sizes only, not sha256 (faster start)")
    p.add_argument("--no-progress", action="store_true")


def _progress_bar(enabled: bool) -> object:
    from sdexport.cli_progress import StepBar

    return StepBar() if enabled else None


def _cmd_run(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from sdexport.runtime.images import save_png
    from sdexport.runtime.pipeline import Pipeline

    options = {"threads": args.threads} if args.threads else {}
    pipe = Pipeline.load(args.folder, backend=args.backend, scheduler=args.scheduler, verify=not args.no_verify,
                         engine_options=options)
    image = None
    if args.image is not None:
        image = np.load(args.image) if args.image.suffix == ".npy" else Image.open(args.image)
    latent_out = args.out.suffix == ".npy"
    result = pipe(
        args.prompt if len(args.prompt) > 1 else args.prompt[0],
        args.negative_prompt, prompt_2=args.prompt_2, negative_prompt_2=args.negative_prompt_2, image=image,
        mask_image=Image.open(args.mask) if args.mask else None, height=args.height, width=args.width,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale,
        strength=args.strength, denoising_start=args.denoising_start, denoising_end=args.denoising_end,
        num_images_per_prompt=args.num_images, seed=args.seed, eta=args.eta, clip_skip=args.clip_skip,
        output_type="latent" if latent_out else "pil", original_size=args.original_size,
        target_size=args.target_size, crops_coords_top_left=args.crops_coords_top_left,
        aesthetic_score=args.aesthetic_score, negative_aesthetic_score=args.negative_aesthetic_score,
        long_prompts=args.long_prompts, rng=args.rng, callback=_progress_bar(not args.no_progress),
    )
    if latent_out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.out, result.images)
        print(f"latents {list(result.images.shape)} -> {args.out}")
    else:
        many = len(result.images) > 1
        for index, (picture, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
            path = args.out.with_name(f"{args.out.stem}-{index}{args.out.suffix}") if many else args.out
            save_png(picture, path, {**{k: v for k, v in result.parameters.items() if k != "seeds"}, "seed": seed})
            print(f"{path} (seed {seed})")
    t = result.timings
    print(f"text {t.text_encoder:.2f} s, {len(t.unet)} UNet steps {sum(t.unet):.2f} s, "
          f"VAE {t.vae_encoder + t.vae_decoder:.2f} s, total {t.total:.2f} s", file=sys.stderr)
    return 0


def _add_parity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parity", help="re-run the folder's source model in diffusers and print the differences")
    p.add_argument("folder", type=Path)
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the end-to-end runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _cmd_parity(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from sdexport.export.parity import run_parity

    report = run_parity(args.folder, steps=args.steps, seed=args.seed,
                        progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(asdict(report), indent=1) if args.json else report.table())
    return 0


def parser() -> argparse.ArgumentParser:
    """The sdexport argument parser."""
    ap = argparse.ArgumentParser(prog="sdexport", description="Stable Diffusion deployment compiler")
    ap.add_argument("--version", action="version", version=f"sdexport {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_build(sub)
    _add_info(sub)
    _add_run(sub)
    _add_parity(sub)
    _add_doctor(sub)
    return ap


def _trt_options(args: argparse.Namespace) -> object:
    from sdexport.engines.trt_build import TrtOptions
    from sdexport.engines.trt_profiles import Bucket

    return TrtOptions(
        shapes=args.shapes, buckets=tuple(Bucket.parse(b) for b in args.bucket) or None,
        workspace_gib=args.workspace_gib, optimization_level=args.optimization_level, refittable=args.refittable,
        strip_weights=args.strip_weights, version_compatible=args.version_compatible,
        exclude_lean_runtime=args.exclude_lean_runtime, hardware_compatibility=args.hardware_compatibility,
        timing_cache=args.timing_cache, components=tuple(args.trt_components) if args.trt_components else None,
        device=args.device, timeout_s=args.build_timeout,
    )


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="GPU, driver, CUDA, TensorRT / ONNX Runtime, and whether FOLDER can run here")
    p.add_argument("folder", type=Path, nargs="?")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", type=int, default=0)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from sdexport.engines.doctor import run_doctor

    code, text = run_doctor(args.folder, args.json, args.device)
    print(text)
    return code


def _cmd_build(args: argparse.Namespace) -> int:
    from sdexport.export.build import BuildConfig, build
    from sdexport.export.lora import LoraSpec
    from sdexport.specs import ShapeRanges, resolve_preset
    from sdexport.specs.presets import default_ranges_for

    ranges = None
    if args.batch or args.height or args.width or args.prompt_chunks:
        preset = resolve_preset(args.model)
        base = preset.default_ranges if preset else default_ranges_for("sd", tiny=False)
        ranges = ShapeRanges(
            batch=args.batch or base.batch, height=args.height or base.height, width=args.width or base.width,
            prompt_chunks=args.prompt_chunks or base.prompt_chunks,
        )
    out = args.out or Path("build") / Path(args.model.rstrip("/")).name
    config = BuildConfig(
        model=args.model, out=out, loras=[LoraSpec.parse(t) for t in args.lora], precision=args.precision,
        component_precision=dict(args.component_precision), ranges=ranges,
        random_weights=args.random_weights, allow_pickle=args.allow_pickle, backend=args.backend,
        trt=_trt_options(args) if args.backend == "tensorrt" else None,
    )
    from sdexport.cli_progress import BuildProgress

    progress = BuildProgress()
    try:
        build(config, progress=progress)
    finally:
        progress.close()
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from sdexport.engines.artifacts import describe, load_manifest

    manifest = load_manifest(args.folder, verify=True)
    print(json.dumps(manifest, indent=1) if args.json else describe(args.folder, manifest))
    return 0


COMMANDS = {
    "build": _cmd_build, "info": _cmd_info, "run": _cmd_run, "parity": _cmd_parity, "doctor": _cmd_doctor,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sdexport` console script; returns the exit code."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"sdexport: error: {exc}", file=sys.stderr)
        return 2
    except (SdexportError, ValueError) as exc:
        print(f"sdexport: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sdexport: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
