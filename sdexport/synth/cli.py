"""The ``sdexport synth`` subcommand: flags -> SynthConfig -> synthesize, with a tqdm bar (images/s, ETA)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sdexport.engines import backends
from sdexport.runtime.args import DEFAULTS
from sdexport.synth.rows import TASKS
from sdexport.synth.sinks import FORMATS

EXAMPLES = """examples:
  sdexport synth build/sd15 --prompts prompts.jsonl --out data/ --per-prompt 4 --batch 4
  sdexport synth build/sdxl-inpaint --prompts edits.jsonl --out pairs/ --task inpaint
  sdexport synth build/sdxl --prompts prompts.parquet --out data/ --ray auto --gpus-per-worker 1

Run the same command again to resume: finished images (checked by their hash) are skipped."""


def add_synth_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``synth`` on the main parser's subcommands."""
    p = sub.add_parser("synth", help="generate a dataset from a prompt table (resumable; Ray optional)",
                       description="Generate a Hugging Face imagefolder (or WebDataset) dataset from a JSONL, CSV or "
                       "Parquet table: one row per job with prompt and optional id, negative_prompt, seed, width, "
                       "height, steps, guidance_scale, scheduler, image, mask; other columns go into the metadata.",
                       epilog=EXAMPLES)
    p.add_argument("folder", type=Path, help="a compiled folder (sdexport build)")
    p.add_argument("--prompts", type=Path, required=True, help="the table: .jsonl, .csv or .parquet")
    p.add_argument("--out", type=Path, required=True, help="the dataset folder (created; re-run to resume)")
    p.add_argument("--per-prompt", type=int, default=1, help="images per row")
    p.add_argument("--batch", type=int, help="images per engine call (default: the folder's optimum batch)")
    p.add_argument("--task", choices=TASKS, default="auto", help="auto: from the image / mask columns")
    p.add_argument("--format", choices=FORMATS, default="imagefolder", help="output format")
    p.add_argument("--seed", type=int, default=0, help="run seed; image seeds derive from (seed, row id, index)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard folder / tar")
    defaults = p.add_argument_group("defaults for empty columns")
    defaults.add_argument("--negative-prompt", help="negative prompt")
    defaults.add_argument("--width", type=int, help="pixel width (default: the image's, else the folder's optimum)")
    defaults.add_argument("--height", type=int, help="pixel height (default: the image's, else the folder's optimum)")
    defaults.add_argument("--steps", type=int, default=DEFAULTS["num_inference_steps"], help="denoising steps")
    defaults.add_argument("--guidance-scale", type=float, help="guidance scale (default: the family's)")
    defaults.add_argument("--scheduler", help="scheduler class name or alias (default: the folder's)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first bad row or failed batch")
    p.add_argument("--dry-run", action="store_true", help="print the plan and what is already done; generate nothing")
    p.add_argument("--backend", choices=list(backends()), default="onnxruntime",
                   help="engine backend (sdexport doctor lists them)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--no-verify", action="store_true", help="check the folder's file sizes only, not sha256")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ray = p.add_argument_group("Ray Data (pip install 'sdexport[ray]')")
    ray.add_argument("--ray", metavar="ADDRESS", help="local (fresh instance on loopback), auto or HOST:PORT")
    ray.add_argument("--workers", type=int, help="generation actors (default: GPUs / gpus-per-worker, else 1)")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (1 on GPU clusters)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0,
                     help="CPUs per actor; below the node's CPUs, or the read stage starves")


def synth_config(args: argparse.Namespace) -> Any:
    """The SynthConfig of parsed ``synth`` arguments."""
    from sdexport.synth import Defaults, RayOptions, SynthConfig

    ray = None if args.ray is None else RayOptions(args.ray, args.workers, args.gpus_per_worker, args.cpus_per_worker)
    return SynthConfig(
        folder=args.folder, prompts=args.prompts, out=args.out, per_prompt=args.per_prompt, batch=args.batch,
        task=args.task, format=args.format, seed=args.seed, shard_size=args.shard_size,
        defaults=Defaults(args.negative_prompt, args.width, args.height, args.steps, args.guidance_scale,
                          args.scheduler),
        fail_fast=args.fail_fast, dry_run=args.dry_run, backend=args.backend,
        engine_options={"threads": args.threads} if args.threads else {}, verify=not args.no_verify, ray=ray)


def cmd_synth(args: argparse.Namespace) -> int:
    """Run ``sdexport synth``; the summary goes to stderr, the plan of a dry run to stdout."""
    from tqdm import tqdm

    from sdexport.synth import synthesize

    config = synth_config(args)
    show = not (args.quiet or args.no_progress or config.dry_run)
    bar = tqdm(desc="synth", unit="img", file=sys.stderr, dynamic_ncols=True, disable=not show)

    def progress(done: int, total: int) -> None:
        """Move the bar to ``done`` of ``total`` images."""
        if bar.total != total:
            bar.reset(total=total)
            bar.update(done)
        else:
            bar.update(done - bar.n)

    try:
        summary = synthesize(config, progress=progress)
    finally:
        bar.close()
    if config.dry_run:
        sys.stdout.write(summary.plan_text() + "\n")
    elif not args.quiet:
        sys.stderr.write(summary.text() + "\n")
    return 0
