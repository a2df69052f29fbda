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


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="verify a compiled folder against its manifest and describe it")
    p.add_argument("folder", type=Path)
    p.add_argument("--json", action="store_true", help="print the manifest instead of the summary")


def parser() -> argparse.ArgumentParser:
    """The sdexport argument parser."""
    ap = argparse.ArgumentParser(prog="sdexport", description="Stable Diffusion deployment compiler")
    ap.add_argument("--version", action="version", version=f"sdexport {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_build(sub)
    _add_info(sub)
    return ap


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
        random_weights=args.random_weights, allow_pickle=args.allow_pickle,
    )
    build(config, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from sdexport.engines.artifacts import describe, load_manifest

    manifest = load_manifest(args.folder, verify=True)
    print(json.dumps(manifest, indent=1) if args.json else describe(args.folder, manifest))
    return 0


COMMANDS = {"build": _cmd_build, "info": _cmd_info}


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
