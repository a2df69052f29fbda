"""Runs a suite: one worker process per system and batch size, then joins the results into result lines with
FLOPs, the sgemm ceiling, ratios to diffusers eager and the output difference to it."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness import child_environ
from harness import flops as flop_count
from harness.cases import Case, Suite
from harness.models import Folders
from harness.records import make_record
from harness.stats import ratio
from harness.systems import EAGER, EAGER_BF16, OPTIMUM, OPTIMUM_OV, OURS
from harness.worker import PREFIX

log = logging.getLogger(__name__)

NOMINAL_BACKEND = {OURS: "onnxruntime", "sdexport-openvino": "openvino", "sdexport-openvino-bf16": "openvino",
                   "sdexport-openvino-hybrid": "openvino", "sdexport-openvino-hybrid-bf16": "openvino",
                   EAGER: "torch-eager", EAGER_BF16: "torch-eager", "diffusers-compile": "torch-inductor",
                   OPTIMUM: "onnxruntime (optimum)", OPTIMUM_OV: "openvino (optimum-intel)"}


@dataclass
class Context:
    """What every suite of one invocation shares."""

    run_id: str
    env: dict[str, Any]
    systems: Sequence[str]
    unavailable: dict[str, str] = field(default_factory=dict)
    """system -> why it cannot run here (skipped, with the reason in the table)."""
    pythons: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    """system -> (interpreter, environment) when not this interpreter (optimum's venv)."""
    sgemm_gflops: float | None = None
    timeout: float = 3600.0
    flop_cache: Path | None = None
    progress: Callable[[str], None] = lambda msg: None


def _spawn(job: dict[str, Any], workdir: Path, python: str, env: Mapping[str, str] | None,
           timeout: float) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Run one worker; its results by case key, and an error when it died or timed out."""
    path = workdir / f"job-{job['system']}-b{job['cases'][0]['batch']}.json"
    path.write_text(json.dumps(job))
    proc = subprocess.Popen([python, "-m", "harness.worker", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_environ(env),
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        error = None if proc.returncode == 0 else f"worker exited with {proc.returncode}: " + (
            stderr.strip().splitlines() or ["no message"])[-1][:300]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        error = f"timed out after {timeout:.0f} s"
    results = {}
    for line in stdout.splitlines():
        if line.startswith(PREFIX):
            payload = json.loads(line[len(PREFIX):])
            results[payload["case"]] = payload
    return results, error


def _flops(folder: Path, case: Case, cache: Path | None) -> dict[str, Any]:
    """UNet FLOPs per evaluation for the case's architecture, size and batch (cached by the UNet's build key)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    key = f"{manifest['components']['unet'].get('key', folder)}-{case.batch}-{case.height}x{case.width}"
    store = json.loads(cache.read_text()) if cache and cache.exists() else {}
    if key not in store:
        store[key] = flop_count.count_unet(folder, case.batch, case.height, case.width)
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(store, indent=1, sort_keys=True))
    return store[key]


def _case_fields(case: Case, system: str, manifest: Mapping[str, Any], info: Mapping[str, Any] | None) -> dict:
    info = info or {}
    scheduler = manifest.get("scheduler_class") or "?"
    return {"model": case.model, "family": manifest["model"]["family"], "height": case.height, "width": case.width,
            "steps": case.steps, "batch": case.batch, "guidance_scale": case.guidance_scale,
            "backend": info.get("backend", NOMINAL_BACKEND[system]), "precision": info.get("precision", "fp32"),
            "scheduler": info.get("scheduler", scheduler)}


def _derive(records: list[dict[str, Any]], outputs: Path, flops: Mapping[str, dict], sgemm: float | None) -> None:
    """Add FLOP throughput, ratios to diffusers eager and the image difference to it, case by case."""
    eager = {r["case_key"]: r for r in records if r["system"] == EAGER and r["status"] == "ok"}
    for rec in records:
        if rec["status"] != "ok":
            continue
        m, key = rec["metrics"], rec["case_key"]
        count = flops.get(key, {}).get("flops")
        step = (m.get("unet_step_s") or {}).get("median")
        m["unet_flops"] = count
        m["unet_gflops_per_s"] = count / step / 1e9 if count and step else None
        m["unet_pct_of_sgemm"] = ratio(m["unet_gflops_per_s"], sgemm)
        ref = eager.get(key)
        m["e2e_ratio_vs_eager"] = ratio(m["e2e_s"]["median"], ref["metrics"]["e2e_s"]["median"]) if ref else None
        m["rss_ratio_vs_eager"] = ratio(m["peak_rss_mib"], ref["metrics"]["peak_rss_mib"]) if ref else None
        mine, theirs = outputs / f"{rec['system']}-{key}.npy", outputs / f"{EAGER}-{key}.npy"
        m["max_abs_diff_vs_eager"] = (float(np.abs(np.load(mine) - np.load(theirs)).max())
                                      if ref and mine.exists() and theirs.exists() else None)


def run_suite(suite: Suite, folders: Folders, ctx: Context) -> list[dict[str, Any]]:
    """Measure every available system on every case of ``suite``; returns validated latency result lines."""
    manifest = json.loads((folders.compiled / "manifest.json").read_text())
    config = json.loads((folders.compiled / manifest.get("scheduler_config", "scheduler/scheduler_config.json"))
                        .read_text())
    manifest = {**manifest, "scheduler_class": config.get("_class_name")}
    channels = int(manifest["model"].get("latent_channels", 4))
    scale = int(manifest["model"].get("vae_scale_factor", 8))
    raw: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sdexport-bench-") as tmp:
        workdir = Path(tmp)
        latents = {}
        for case in suite.cases:
            latents[case.key] = str(workdir / f"latents-{case.key}.npy")
            np.save(latents[case.key], case.latents(channels, scale))
        for batch in sorted({c.batch for c in suite.cases}):
            cases = [c for c in suite.cases if c.batch == batch]
            for system in ctx.systems:
                results, error = {}, ctx.unavailable.get(system)
                if error is None:
                    ctx.progress(f"{suite.name}: {system}, batch {batch}, steps {[c.steps for c in cases]}")
                    python, env = ctx.pythons.get(system, (sys.executable, None))
                    job = {"system": system, "paths": folders.as_paths(), "cases": [c.to_dict() for c in cases],
                           "warmups": suite.warmups, "repeats": suite.repeats, "latents": latents,
                           "output_dir": str(workdir)}
                    results, error = _spawn(job, workdir, python, env, ctx.timeout)
                for case in cases:
                    got = results.get(case.key) or {"status": "skipped" if system in ctx.unavailable else "failed",
                                                     "reason": error or "no result"}
                    raw.append({"system": system, "case_key": case.key, "case_obj": case, **got})
        flops = {}
        for case in suite.cases:
            try:
                flops[case.key] = _flops(folders.compiled, case, ctx.flop_cache)
            except Exception as exc:  # noqa: BLE001 - FLOPs are extra information, not a reason to lose the run
                log.warning("cannot count UNet FLOPs for %s: %s", case.key, exc)
        _derive(raw, workdir, flops, ctx.sgemm_gflops)
    out = []
    for rec in raw:
        case = rec.pop("case_obj")
        fields = {"system": rec["system"], "status": rec["status"], "suite": suite.name,
                  "case": _case_fields(case, rec["system"], manifest, rec.get("info")),
                  "repeats": suite.repeats, "warmups": suite.warmups}
        if rec["status"] == "ok":
            fields["metrics"] = rec["metrics"]
        else:
            fields["reason"] = rec.get("reason") or "unknown"
        out.append(make_record("latency", ctx.run_id, ctx.env, **fields))
    for key, count in flops.items():
        out.append(make_record("flops", ctx.run_id, ctx.env, suite=suite.name, case_key=key, **count))
    return out
