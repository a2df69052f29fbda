"""Per-step cost of ControlNet over plain generation: sdexport's runtime against diffusers eager, in the same run.

    python benchmarks/bench_controlnet.py                  # SD 1.5 architecture, random weights, 256x256
    python benchmarks/bench_controlnet.py --model tiny-sd15 --size 64    # a quick check of the script itself

Both systems run the same weights: a random-weights SD 1.5 pipeline and a ControlNet made from its UNet
(``ControlNetModel.from_unet``). Each system generates with classifier-free guidance, plain and with the ControlNet;
the per-step time is the median over every step of the timed runs. Appends JSON lines to
benchmarks/results/controlnet.jsonl and writes benchmarks/results/controlnet.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from harness.environment import environment

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROMPT = "a lighthouse on a cliff at dawn"


def parse(argv: list[str]) -> argparse.Namespace:
    """The command-line arguments of this script."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", help="a family preset (random weights) or a tiny preset")
    ap.add_argument("--size", type=int, default=256, help="pixel height and width")
    ap.add_argument("--steps", type=int, default=6, help="denoising steps per run")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per system and mode (after one warm-up)")
    ap.add_argument("--root", type=Path, default=Path.home() / ".cache" / "sdexport-bench" / "controlnet",
                    help="where the ControlNet and the compiled folders are kept between runs")
    ap.add_argument("--history", type=Path, default=RESULTS / "controlnet.jsonl")
    ap.add_argument("--markdown", type=Path, default=RESULTS / "controlnet.md")
    return ap.parse_args(argv)


def prepare(model: str, size: int, root: Path) -> tuple[Any, Path, Path, Path]:
    """(the loaded source, the ControlNet folder, the plain compiled folder, the ControlNet compiled folder)."""
    import diffusers

    from sdexport.export.build import BuildConfig, build
    from sdexport.export.controlnet import ControlNetSpec
    from sdexport.export.load import inspect_source, load_source
    from sdexport.specs import ShapeRanges, resolve_preset

    preset = resolve_preset(model)
    random_weights = preset is not None and not preset.tiny
    source = load_source(inspect_source(model, random_weights))
    net = root / f"{model}-controlnet"
    if not (net / "config.json").is_file():
        diffusers.ControlNetModel.from_unet(source.pipe.unet).save_pretrained(net)
    ranges = ShapeRanges(batch=(1, 1, 1), height=(size, size, size), width=(size, size, size), prompt_chunks=1)
    plain, controlled = root / f"{model}-{size}", root / f"{model}-{size}-controlnet"
    build(BuildConfig(model=model, out=plain, ranges=ranges, random_weights=random_weights))
    if not controlled.exists():
        shutil.copytree(plain, controlled)  # the text encoder and the VAE are reused, not exported again
    build(BuildConfig(model=model, out=controlled, ranges=ranges, random_weights=random_weights,
                      controlnets=[ControlNetSpec(str(net))]))
    return source, net, plain, controlled


def _control_image(size: int) -> Any:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.stack([x % 256, y % 256, (x * y) % 256], axis=-1).astype(np.uint8))


def time_sdexport(folder: Path, steps: int, repeats: int, image: Any) -> list[float]:
    """Per-step seconds of every timed run of the runtime on ``folder`` (with ``image`` as the control image)."""
    from sdexport.runtime.pipeline import Pipeline

    pipe = Pipeline.load(folder)
    kwargs = {"num_inference_steps": steps, "output_type": "latent", **({"image": image} if image else {})}
    pipe(PROMPT, seed=0, **kwargs)
    per_step: list[float] = []
    for run in range(repeats):
        per_step += pipe(PROMPT, seed=run, **kwargs).timings.steps
    return per_step


def time_diffusers(oracle: Any, steps: int, repeats: int, image: Any) -> list[float]:
    """Per-step seconds of every timed run of a diffusers pipeline (callback to callback)."""
    import torch

    marks: list[float] = []

    def mark(_pipe: Any, _i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        marks.append(time.perf_counter())
        return tensors

    kwargs = {"num_inference_steps": steps, "output_type": "latent", **({"image": image} if image else {})}
    with torch.inference_mode():
        oracle(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
        per_step: list[float] = []
        for run in range(repeats):
            marks.clear()
            start = time.perf_counter()
            oracle(PROMPT, generator=torch.Generator().manual_seed(run), callback_on_step_end=mark, **kwargs)
            per_step += [b - a for a, b in zip([start, *marks[:-1]], marks, strict=True)][1:]
    return per_step


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Median per-step milliseconds per (system, mode)."""
    import diffusers

    from sdexport.export.controlnet import controlnet_pipeline
    from sdexport.export.parity import diffusers_pipeline
    from sdexport.runtime.pipeline import Pipeline

    args.root.mkdir(parents=True, exist_ok=True)
    source, net, plain, controlled = prepare(args.model, args.size, args.root)
    image = _control_image(args.size)
    spec = Pipeline.load(controlled, verify=False).spec
    oracles = {"plain": diffusers_pipeline(source.pipe, spec, "txt2img"),
               "controlnet": controlnet_pipeline(source.pipe, spec, [diffusers.ControlNetModel.from_pretrained(net)])}
    out: dict[str, Any] = {}
    for mode, folder in (("plain", plain), ("controlnet", controlled)):
        picture = image if mode == "controlnet" else None
        out[f"sdexport/{mode}"] = statistics.median(time_sdexport(folder, args.steps, args.repeats, picture)) * 1e3
        out[f"diffusers-eager/{mode}"] = statistics.median(
            time_diffusers(oracles[mode], args.steps, args.repeats, picture)) * 1e3
    return out


def render(record: dict[str, Any]) -> str:
    """The markdown table of one run."""
    ms = record["per_step_ms"]
    env = record["environment"]
    lines = [f"# ControlNet per-step cost ({record['model']}, {record['size']}x{record['size']}, CFG on, "
             f"{record['steps']} steps x {record['repeats']} runs)", "",
             f"Machine: {env.get('cpu', '?')}, load average at start {record['load_start']}, at end "
             f"{record['load_end']}.", "",
             "| system | plain ms/step | ControlNet ms/step | ControlNet overhead |", "|---|---:|---:|---:|"]
    for system in ("sdexport", "diffusers-eager"):
        base, control = ms[f"{system}/plain"], ms[f"{system}/controlnet"]
        lines.append(f"| {system} | {base:.0f} | {control:.0f} | x{control / base:.2f} |")
    speedup = ms["diffusers-eager/controlnet"] / ms["sdexport/controlnet"]
    lines += ["", f"sdexport vs diffusers eager with the ControlNet: x{speedup:.2f} faster per step.", ""]
    return "\n".join(lines)


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main(argv: list[str]) -> int:
    """Measure, append the record, write the markdown; returns the exit code."""
    args = parse(argv)
    load_start = _load()
    per_step = measure(args)
    record = {"kind": "controlnet", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": args.model,
              "size": args.size, "steps": args.steps, "repeats": args.repeats, "per_step_ms": per_step,
              "load_start": load_start, "load_end": _load(), "environment": environment()}
    args.history.parent.mkdir(parents=True, exist_ok=True)
    with args.history.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    text = render(record)
    args.markdown.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
