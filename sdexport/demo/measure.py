"""Measure the demo model's accuracy through diffusers and through sdexport's runtime, on the same prompts and seeds.

    python -m sdexport.demo.measure --diffusers sdexport/demo/model --sdexport /tmp/demo-build
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sdexport.demo import GUIDANCE
from sdexport.demo.evaluate import Score, prompt_list, read, score
from sdexport.demo.shapes import IMAGE_SIZE, caption

log = logging.getLogger(__name__)
Generate = Callable[[str, int], Any]


def diffusers_generator(folder: Path, steps: int, guidance: float, threads: int) -> Generate:
    """prompt, seed -> picture, from the diffusers StableDiffusionPipeline of ``folder`` (its default scheduler)."""
    import diffusers
    import torch

    torch.set_num_threads(threads)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def generate(prompt: str, seed: int) -> Any:
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=IMAGE_SIZE, width=IMAGE_SIZE,
                    generator=torch.Generator().manual_seed(seed)).images[0]

    return generate


def sdexport_generator(folder: Path, steps: int, guidance: float, threads: int, rng: str = "torch") -> Generate:
    """prompt, seed -> picture, from a compiled folder through ``sdexport.Pipeline`` (diffusers' noise by default)."""
    from sdexport import Pipeline

    pipe = Pipeline.load(folder, engine_options={"threads": threads})

    def generate(prompt: str, seed: int) -> Any:
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=IMAGE_SIZE, width=IMAGE_SIZE,
                    seed=seed, rng=rng).images[0]

    return generate


def run(generate: Generate, combos: Sequence[tuple[str, str, str]], first_seed: int) -> tuple[Score, list[tuple]]:
    """Generate one picture per combination (seeds first_seed, first_seed + 1, ...); the score and every reading."""
    images = [generate(caption(*combo), first_seed + i) for i, combo in enumerate(combos)]
    return score(images, combos), [read(image).combo for image in images]


def main(argv: Sequence[str] | None = None) -> int:
    """Score the folders given and, with both, how often they read the same."""
    p = argparse.ArgumentParser(prog="python -m sdexport.demo.measure", description=__doc__.splitlines()[0])
    p.add_argument("--diffusers", type=Path, help="the demo's diffusers folder")
    p.add_argument("--sdexport", type=Path, help="the folder `sdexport build --model <diffusers folder>` wrote")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=1, help="CPU threads of torch / ONNX Runtime")
    p.add_argument("--guidance", type=float, default=GUIDANCE,
                   help="default %(default)s, the scale the demo model is made for")
    p.add_argument("--seed", type=int, default=1000, help="seed of the first picture; the others count up")
    p.add_argument("--trained-per-combo", type=int, default=2, help="pictures per trained combination (80)")
    p.add_argument("--held-out-per-combo", type=int, default=10, help="pictures per held-out combination (10)")
    args = p.parse_args(argv)
    if args.diffusers is None and args.sdexport is None:
        p.error("give --diffusers FOLDER, --sdexport FOLDER or both")
    combos = prompt_list(args.trained_per_combo, args.held_out_per_combo)
    readings = {}
    for name, folder, make in (("diffusers", args.diffusers, diffusers_generator),
                               ("sdexport", args.sdexport, sdexport_generator)):
        if folder is not None:
            result, readings[name] = run(make(folder, args.steps, args.guidance, args.threads), combos, args.seed)
            sys.stdout.write(f"{name}: {len(combos)} pictures, {args.steps} steps, guidance {args.guidance}: "
                             f"{result.summary()}\n")
    if len(readings) == 2:
        same = sum(a == b for a, b in zip(readings["diffusers"], readings["sdexport"], strict=True))
        sys.stdout.write(f"same reading through both: {same}/{len(combos)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
