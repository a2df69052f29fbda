"""Per-step scheduler overhead: sdexport's runtime schedulers on numpy vs diffusers' schedulers on torch CPU.

Both sides run the same loop (``scale_model_input`` + ``step``) over the same timesteps with a fixed model
output and pre-drawn noise (diffusers' ``randn_tensor`` is patched to return it), so only scheduler arithmetic
and bookkeeping are timed. Per-request setup (``plan()`` vs ``set_timesteps()``) is reported separately.
Times are the best of ``--repeats`` runs (robust to other load on the machine); numpy runs single-threaded
elementwise code, torch uses ``--torch-threads`` (default: torch's own default).

    python benchmarks/bench_schedulers.py [--steps 30] [--repeats 7] [--shape 2,4,128,128] [--torch-threads 1]

Prints a markdown table and appends one JSON line per scheduler to ``benchmarks/results/schedulers.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch

from sdexport.runtime.schedulers import load_scheduler
from sdexport.runtime.schedulers.registry import resolve_name
from sdexport.specs import PRESETS

SDXL = dict(PRESETS["sdxl"].configs()["scheduler"])  # the shipped scheduler_config.json
SCHEDULERS = [
    "ddpm",
    "ddim",
    "pndm",
    "euler",
    "euler_a",
    "heun",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde",
    "unipc",
    "lms",
    "lcm",
    "euler_beta",
    "dpm2",
    "dpm2_a",
    "dpmpp_2s",
    "dpmpp_3s",
    "deis",
    "edm_euler",
    "edm_dpmpp_2m",
    "tcd",
    "sa_solver",
    "dpmpp_sde",
]
OVERRIDES = {"euler_beta": ("euler", {"use_beta_sigmas": True})}
"""Benchmark names that are a scheduler alias plus config overrides."""
STEP_KWARGS = {"tcd": {"eta": 0.3}}
"""Per-request arguments (``plan(**kw)`` here, ``step(**kw)`` in diffusers), e.g. TCD's gamma."""
RESULTS = Path(__file__).parent / "results" / "schedulers.jsonl"


def _best_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_ours(name: str, steps: int, model_output: np.ndarray, noise: np.ndarray, repeats: int) -> dict:
    """Best per-step time and plan time of sdexport's scheduler ``name``."""
    alias, overrides = OVERRIDES.get(name, (name, {}))
    sched = load_scheduler(SDXL, alias, overrides)
    kwargs = STEP_KWARGS.get(name, {})
    setup = _best_time(lambda: sched.plan(steps, **kwargs), repeats)
    plan = sched.plan(steps, **kwargs)

    def loop() -> None:
        x, run = model_output * np.float32(plan.init_noise_sigma), plan.start()
        for i in range(len(plan)):
            plan.scale_model_input(x, i)
            x = run.step(model_output, i, x, noise=noise if plan.needs_noise[i] else None).prev_sample

    loop()  # warm-up
    return {"evals": len(plan), "loop_s": _best_time(loop, repeats), "setup_s": setup}


def bench_diffusers(name: str, steps: int, model_output: np.ndarray, noise: np.ndarray, repeats: int) -> dict:
    """Best per-step time and set_timesteps time of diffusers' scheduler ``name`` on torch."""
    name, overrides = OVERRIDES.get(name, (name, {}))
    alias = resolve_name(name)
    cls = getattr(diffusers, alias.cls.class_name)
    sched = cls.from_config(SDXL, **{**alias.preset, **overrides})
    kwargs = STEP_KWARGS.get(name, {})
    module = sys.modules[cls.__module__]
    noise_t = torch.from_numpy(noise)
    if hasattr(module, "randn_tensor"):
        module.randn_tensor = lambda *a, **k: noise_t
    out_t = torch.from_numpy(model_output)
    setup = _best_time(lambda: sched.set_timesteps(steps), repeats)

    def loop() -> None:
        sched.set_timesteps(steps)
        x = out_t * sched.init_noise_sigma
        for t in sched.timesteps:
            sched.scale_model_input(x, t)
            x = sched.step(out_t, t, x, **kwargs).prev_sample

    loop()
    return {"evals": None, "loop_s": _best_time(loop, repeats) - setup, "setup_s": setup}


def main() -> None:
    """Measure every requested scheduler on both sides and print the table; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shape", default="2,4,128,128")
    parser.add_argument("--only", nargs="*", default=SCHEDULERS)
    parser.add_argument("--torch-threads", type=int, default=None)
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    rng = np.random.default_rng(0)
    model_output = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "load_avg_1m": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "shape": list(shape),
        "steps": args.steps,
        "repeats": args.repeats,
        "config": "sdxl",
    }
    print(
        f"shape {shape}, {args.steps} steps, SDXL config, torch threads {env['torch_threads']}, "
        f"best of {args.repeats}\n"
    )
    print(
        "| scheduler | model evals | ours ms/step | diffusers ms/step | speed-up "
        "| ours plan ms | diffusers set_timesteps ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as log:
        for name in args.only:
            ours = bench_ours(name, args.steps, model_output, noise, args.repeats)
            ref = bench_diffusers(name, args.steps, model_output, noise, args.repeats)
            n = ours["evals"]
            ours_ms, ref_ms = 1e3 * ours["loop_s"] / n, 1e3 * ref["loop_s"] / n
            row = {
                **env,
                "scheduler": name,
                "model_evals": n,
                "ours_ms_per_step": ours_ms,
                "diffusers_ms_per_step": ref_ms,
                "speedup": ref_ms / ours_ms,
                "ours_plan_ms": 1e3 * ours["setup_s"],
                "diffusers_set_timesteps_ms": 1e3 * ref["setup_s"],
            }
            log.write(json.dumps(row) + "\n")
            print(
                f"| {name} | {n} | {ours_ms:.3f} | {ref_ms:.3f} | {ref_ms / ours_ms:.2f}x | "
                f"{row['ours_plan_ms']:.3f} | {row['diffusers_set_timesteps_ms']:.3f} |"
            )


if __name__ == "__main__":
    main()
