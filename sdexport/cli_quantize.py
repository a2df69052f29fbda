"""`sdexport quantize`: its flags, and the calibration prompts they choose (the work is ``openvino_quantize``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from sdexport.errors import UsageError


def _say(quiet: bool) -> Callable[[str], None]:
    return (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))


def add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``quantize`` on the main parser's subcommands."""
    p = sub.add_parser("quantize", help="make an int8 (hybrid) UNet for the openvino backend, calibrated on the "
                       "folder's own calls",
                       description="Draw calibration pictures with the folder's f32 OpenVINO pipeline, record the "
                       "chosen components' calls and quantise them with nncf (convolutions int8 in weights and "
                       "activations, other layers int8 weights): the IR goes into the folder, listed in its "
                       "manifest. Run it with --backend openvino --openvino-precision hybrid (or hybrid-bf16). "
                       "Needs pip install 'sdexport[int8]'.")
    p.add_argument("folder", type=Path, help="a compiled folder (sdexport build)")
    p.add_argument("--component", action="append", help="component to quantise (repeatable; default: unet)")
    p.add_argument("--prompts", type=Path, help="calibration prompts, one per line (default: a built-in varied "
                   "list; the demo model's own captions for the demo model)")
    p.add_argument("--pictures", type=int, default=8, help="calibration pictures to draw (prompts cycled)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per calibration picture")
    p.add_argument("--guidance", type=float, help="guidance scale (default: 7.5; the demo model's 2 for it)")
    p.add_argument("--samples", type=int, default=32, help="recorded calls nncf calibrates on, evenly spread")
    p.add_argument("--height", type=int, help="calibration picture height (default: the folder's)")
    p.add_argument("--width", type=int, help="calibration picture width (default: the folder's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first calibration picture (then +1 each)")
    p.add_argument("--threads", type=int, help="OpenVINO inference threads while calibrating")


def cmd_quantize(args: argparse.Namespace) -> int:
    """Run ``sdexport quantize``: read the prompts, then ``quantize_folder``."""
    from sdexport.demo import GUIDANCE
    from sdexport.engines import artifacts
    from sdexport.engines.openvino_quantize import PROMPTS, QuantizeConfig, quantize_folder

    demo = artifacts.read_manifest(args.folder)["source"]["id"] == "demo"
    if args.prompts is not None:
        try:
            prompts = tuple(line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines())
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--prompts {args.prompts}: cannot read it ({exc})") from None
        prompts = tuple(p for p in prompts if p)
    elif demo:
        from sdexport.demo.shapes import caption, trained_combos

        prompts = tuple(caption(*combo) for combo in trained_combos())
    else:
        prompts = PROMPTS
    if (args.height is None) != (args.width is None):
        raise UsageError("give --height and --width together, or neither (the folder's size)")
    guidance = args.guidance if args.guidance is not None else GUIDANCE if demo else 7.5
    config = QuantizeConfig(tuple(args.component or ("unet",)), prompts, args.pictures, args.steps, guidance,
                            args.samples, (args.height, args.width) if args.height else None, args.seed,
                            args.threads, _say(args.quiet))
    for name, entry in quantize_folder(args.folder, config).items():
        print(f"{args.folder}/{entry['graph']}: {name} quantised ({entry['method']}, {entry['samples']} calls)")
    return 0
