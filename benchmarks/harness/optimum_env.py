"""A private virtual environment for optimum's ONNX Runtime pipeline, whose pins conflict with ours."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import venv
from collections.abc import Sequence
from pathlib import Path

import sdexport
from harness import child_environ

log = logging.getLogger(__name__)

TORCH_PIN = "torch==2.13.0"
"""The CPU build on this machine's disk; an unpinned torch would pull a multi-GB CUDA build."""
REQUIREMENTS = ("optimum-onnx[onnxruntime]==0.1.0", "diffusers<0.36", "transformers<4.58")
"""optimum-onnx 0.1.0 needs transformers<4.58 and optimum~=2.1; diffusers<0.36 matches that transformers."""
STAMP = ".sdexport-requirements"


class PeerUnavailable(RuntimeError):
    """A peer cannot run here; the message says why (it goes into the results table)."""


def requirements_key() -> str:
    """A hash of what the environment must contain; a changed pin rebuilds it."""
    return hashlib.sha256("\n".join((sys.version, TORCH_PIN, *REQUIREMENTS)).encode()).hexdigest()[:16]


def python_of(root: Path) -> Path:
    """The interpreter of the environment at ``root``."""
    return root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _pip(python: Path, args: Sequence[str], log_file: Path) -> None:
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    log.info("optimum venv: %s", " ".join(cmd))
    with log_file.open("a") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
        raise PeerUnavailable(f"pip install {' '.join(args)} failed: {' / '.join(tail)} (log: {log_file})")


def ensure_env(root: Path) -> Path:
    """Create (once) the venv at ``root`` with torch pinned first, then optimum-onnx; returns its python."""
    root = Path(root)
    python = python_of(root)
    stamp = root / STAMP
    if python.exists() and stamp.exists() and stamp.read_text().strip() == requirements_key():
        return python
    log.warning("creating optimum's virtual environment in %s (one-off, a few minutes)", root)
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    constraints = root / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    log_file = root / "pip.log"
    _pip(python, [TORCH_PIN], log_file)
    _pip(python, ["-c", str(constraints), *REQUIREMENTS], log_file)
    stamp.write_text(requirements_key() + "\n")
    return python


def source_path() -> str:
    """The folder holding the ``sdexport`` package, put on the venv's PYTHONPATH (the package is not installed)."""
    return str(Path(sdexport.__file__).resolve().parent.parent)


def venv_environ() -> dict[str, str]:
    """The environment for processes in the venv: sdexport and this harness importable, no user site, same threads."""
    env = child_environ()
    env["PYTHONPATH"] = os.pathsep.join((source_path(), env["PYTHONPATH"]))
    env["PYTHONNOUSERSITE"] = "1"
    return env


def export_folder(python: Path, diffusers_folder: Path, out: Path, timeout: float) -> None:
    """Export ``diffusers_folder`` with optimum into ``out`` (skipped when ``out`` has a model_index.json)."""
    if (out / "model_index.json").exists():
        return
    tmp = out.with_name(out.name + ".partial")
    cmd = [str(python), "-m", "harness.systems.optimum", "export", str(diffusers_folder), str(tmp)]
    try:
        done = subprocess.run(cmd, env=venv_environ(), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PeerUnavailable(f"optimum's ONNX export did not finish in {timeout:.0f} s") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PeerUnavailable(f"optimum's ONNX export failed: {last[:300]}")
    tmp.rename(out)
