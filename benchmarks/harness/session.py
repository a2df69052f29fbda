"""One benchmark invocation: check which systems can run, prepare their folders, measure the sgemm ceiling and
every suite, and append the result lines."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness import records
from harness.cases import Suite
from harness.environment import environment
from harness.models import Folders, cache_root, ensure_compiled, ensure_diffusers, ensure_quantized
from harness.optimum_env import (
    PEER_REMOVALS,
    PEER_REQUIREMENTS,
    PeerUnavailable,
    ensure_env,
    export_folder,
    venv_environ,
)
from harness.report import machine
from harness.runner import Context, run_suite
from harness.sgemm import measure_ceiling
from harness.systems import (
    COMPILE,
    OPTIMUM,
    OURS_BACKENDS,
    QUANTIZED_SYSTEMS,
    SYSTEM_NAMES,
    TORCH_SYSTEMS,
    VENV_SYSTEMS,
)

log = logging.getLogger(__name__)


def torch_missing() -> str | None:
    """Why the torch peers cannot run in this interpreter, or None."""
    missing = [m for m in ("torch", "diffusers", "transformers") if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed (pip install 'sdexport[export]')" if missing else None


def check_systems(systems: Sequence[str]) -> dict[str, str]:
    """Systems that cannot run at all here, with the reason (before any folder is prepared)."""
    unknown = [s for s in systems if s not in SYSTEM_NAMES]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEM_NAMES)}")
    reasons: dict[str, str] = {}
    missing = torch_missing()
    for system in systems:
        if system in (*TORCH_SYSTEMS, *VENV_SYSTEMS) and missing:
            reasons[system] = missing  # the optimum peers' folders are exported from the torch weights too
        elif system == COMPILE and shutil.which("g++") is None and shutil.which("c++") is None:
            reasons[system] = "torch.compile (inductor) needs a C++ compiler; none found"
    return reasons


def prepare(suite: Suite, folders: Folders, ctx: Context, venv_root: Path) -> None:
    """Build what the suite's systems need (once; cached); a peer whose preparation fails is marked unavailable."""
    ensure_compiled(suite.model, suite.random_weights, folders.compiled, suite.build_height, suite.build_width)
    if any(s in QUANTIZED_SYSTEMS for s in ctx.systems):
        ctx.progress(f"{suite.name}: sdexport quantize (once)")
        ensure_quantized(folders.compiled)
    peers = [s for s in ctx.systems if s not in OURS_BACKENDS and s not in ctx.unavailable]
    if not peers:
        return
    if not folders.diffusers.exists():
        ctx.progress(f"{suite.name}: saving the source weights as a diffusers folder")
    ensure_diffusers(suite.model, suite.random_weights, folders.diffusers)
    for system in (s for s in peers if s in VENV_SYSTEMS):
        out = folders.optimum if system == OPTIMUM else folders.optimum_openvino
        try:
            python = ensure_env(venv_root / f"{system}-venv", PEER_REQUIREMENTS[system],
                                PEER_REMOVALS.get(system, ()))
            ctx.progress(f"{suite.name}: {system} export (once)")
            export_folder(python, folders.diffusers, out, ctx.timeout, VENV_SYSTEMS[system])
            ctx.pythons[system] = (str(python), venv_environ())
        except (PeerUnavailable, OSError) as exc:
            ctx.unavailable[system] = str(exc)


def previous_ceiling(history: Path, env: dict[str, Any]) -> float | None:
    """The latest sgemm ceiling ``history`` recorded on the machine ``env`` describes (None: none there)."""
    here = machine({"env": env})
    previous = [r for r in records.read(history, kind="sgemm") if machine(r) == here] if Path(history).exists() else []
    return max(previous, key=lambda r: r["time"])["ceiling_gflops"] if previous else None


def run(plans: Sequence[tuple[Suite, Folders]], systems: Sequence[str], out: Path, sgemm: bool = True,
        timeout: float = 3600.0, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure ``plans`` with ``systems`` and append every result line to ``out``; returns the lines."""
    ctx = Context(records.new_run_id(), environment(), list(systems), check_systems(systems), timeout=timeout,
                  flop_cache=cache_root() / "flops.json", progress=progress or (lambda msg: None))
    lines: list[dict[str, Any]] = []
    if sgemm:
        ctx.progress("measuring the sgemm ceiling")
        result = measure_ceiling()
        ctx.sgemm_gflops = result["ceiling_gflops"]
        lines.append(records.make_record("sgemm", ctx.run_id, ctx.env, **result))
        records.append(out, lines[-1:])
    else:
        ctx.sgemm_gflops = previous_ceiling(out, ctx.env)
    for suite, folders in plans:
        prepare(suite, folders, ctx, cache_root())
        suite_lines = run_suite(suite, folders, ctx)
        records.append(out, suite_lines)
        lines.extend(suite_lines)
    return lines
