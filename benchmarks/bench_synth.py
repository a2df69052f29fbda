"""Throughput of ``sdexport synth`` (engine batches + overlapped writing) against a naive one-image-at-a-time
Pipeline loop that saves each PNG, on the same rows and seeds; optionally on Ray Data with 2 CPU actors.

Every system makes the same images (same prompts, sizes, steps and per-image seeds; checked pixel for pixel) and
includes loading the folder in its wall time. Ray's start-up (``ray.init``) is reported separately. Results: JSON
lines in benchmarks/results/synth.jsonl and a markdown table.

    python benchmarks/bench_synth.py                                   # tiny-sd15, 64 rows (built on first use)
    python benchmarks/bench_synth.py --folder FOLDER --size 256 --steps 4 --ray
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.environment import environment
from harness.records import new_run_id
from sdexport.runtime.images import save_png
from sdexport.runtime.pipeline import Pipeline
from sdexport.synth import Defaults, RayOptions, SynthConfig, synthesize

RESULTS = Path(__file__).parent / "results" / "synth.jsonl"
SUBJECTS = ("a lighthouse at dawn", "a red bicycle", "a bowl of fruit", "a snowy forest", "a city street at night",
            "a cat on a sofa", "an old map", "a mountain lake")


def write_rows(path: Path, rows: int, size: int) -> Path:
    """A JSONL table of ``rows`` prompts at one size."""
    path.write_text("".join(json.dumps({"prompt": f"{SUBJECTS[i % len(SUBJECTS)]}, study {i}", "width": size,
                                        "height": size}) + "\n" for i in range(rows)))
    return path


def naive(folder: Path, records: list[dict[str, Any]], out: Path, threads: int | None) -> float:
    """Load the folder, then one Pipeline call and one PNG per image, in order; wall seconds."""
    t0 = time.perf_counter()
    pipe = Pipeline.load(folder, engine_options={"threads": threads} if threads else {})
    for record in records:
        result = pipe(record["prompt"], seed=[record["seed"]], num_inference_steps=record["steps"],
                      width=record["width"], height=record["height"])
        save_png(result.images[0], out / f"{record['key']}.png", {"seed": record["seed"]})
    return time.perf_counter() - t0


def timed_synth(config: SynthConfig) -> tuple[float, int]:
    """Wall seconds and images written of one synth run."""
    t0 = time.perf_counter()
    summary = synthesize(config)
    return time.perf_counter() - t0, summary.written


def same_pixels(synth_out: Path, naive_out: Path, records: list[dict[str, Any]]) -> bool:
    """Whether every synth image equals the naive loop's."""
    return all(np.array_equal(np.asarray(Image.open(synth_out / "train" / r["file_name"])),
                              np.asarray(Image.open(naive_out / f"{r['key']}.png"))) for r in records)


def ray_run(config: SynthConfig) -> tuple[float, float, int]:
    """(ray.init seconds, synth wall seconds, images) on a fresh loopback Ray instance with 2 CPUs."""
    import ray

    for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                       "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(key, value)
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter() - t0
    try:
        seconds, written = timed_synth(config)
    finally:
        ray.shutdown()
    return started, seconds, written


def measure(folder: Path, work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The three systems on one folder; one result row each."""
    table = write_rows(work / "rows.jsonl", args.rows, args.size)
    options = {"threads": args.threads} if args.threads else {}

    def config(name: str, **kw: Any) -> SynthConfig:
        """The synth run writing into ``work/name``."""
        return SynthConfig(folder, table, work / name, batch=args.batch, defaults=Defaults(steps=args.steps),
                           engine_options=options, **kw)

    rows: list[dict[str, Any]] = []
    seconds, written = timed_synth(config("synth"))
    records = [json.loads(line) for line in (work / "synth" / "train" / "metadata.jsonl").read_text().splitlines()]
    rows.append({"system": "synth", "seconds": seconds, "images": written, "batch": args.batch})
    (work / "naive").mkdir()
    seconds = naive(folder, records, work / "naive", args.threads)
    rows.append({"system": "naive-loop", "seconds": seconds, "images": len(records), "batch": 1,
                 "same_pixels_as_synth": same_pixels(work / "synth", work / "naive", records)})
    if args.ray:
        ray_options = RayOptions("local", workers=2, cpus_per_worker=0.5)
        started, seconds, written = ray_run(SynthConfig(
            folder, table, work / "ray", batch=args.batch, defaults=Defaults(steps=args.steps),
            engine_options={"threads": 1}, ray=ray_options))
        rows.append({"system": "synth-ray-2-cpu-actors", "seconds": seconds, "images": written, "batch": args.batch,
                     "ray_init_s": started, "actor_threads": 1})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table with images/s and the ratio to the naive loop."""
    base = next(r for r in rows if r["system"] == "naive-loop")
    lines = ["| folder | system | batch | images | wall s | images/s | x naive loop |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        rate = r["images"] / r["seconds"]
        lines.append(f"| {r['folder']} | {r['system']} | {r['batch']} | {r['images']} | {r['seconds']:.2f} | "
                     f"{rate:.2f} | {rate / (base['images'] / base['seconds']):.2f} |")
    return "\n".join(lines)


def main() -> None:
    """Measure, append JSON lines, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, help="a compiled folder (default: tiny-sd15, built under --work)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--size", type=int, default=64, help="pixel height and width")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="synth's images per engine call")
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ONNX Runtime's)")
    ap.add_argument("--ray", action="store_true", help="also run synth on a local Ray instance with 2 CPU actors")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sdexport-bench-synth")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    folder = args.folder
    if folder is None:
        from sdexport.export.build import BuildConfig, build

        folder = args.work / "tiny-sd15"
        build(BuildConfig(model="tiny-sd15", out=folder))
    run_id, env = new_run_id(), environment()
    with tempfile.TemporaryDirectory(dir=args.work if args.work.is_dir() else None) as scratch:
        rows = measure(folder, Path(scratch), args)
    source = json.loads((folder / "manifest.json").read_text()).get("source", {})
    label = f"{source.get('id', folder.name)}{'-random' if source.get('kind') == 'random' else ''}-{args.size}"
    common = {"run_id": run_id, "env": env, "folder": label, "rows": args.rows, "size": args.size,
              "steps": args.steps}
    rows = [{**common, **row, "images_per_s": row["images"] / row["seconds"]} for row in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    sys.stdout.write(table(rows) + f"\n\nload average at start: {env['load_average']}\n")


if __name__ == "__main__":
    main()
