"""Private virtual environments for the optimum peers (optimum-onnx on ONNX Runtime, optimum-intel on OpenVINO),
whose pins conflict with ours: one venv per peer, built once and reused while its requirements stay the same."""

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
INTEL_REQUIREMENTS = ("optimum-intel[openvino,diffusers]==2.2.0", "transformers<5.6")
"""optimum-intel 2.2 needs transformers<5.6, openvino>=2026.0 and nncf."""
PEER_REQUIREMENTS = {"optimum-ort": REQUIREMENTS, "optimum-openvino": INTEL_REQUIREMENTS}
"""The benchmarked system each venv is for -> what it installs (after the pinned torch)."""
PEER_REMOVALS = {"optimum-openvino": ("torchvision",)}
"""Uninstalled after the install: optimum-intel pulls torchvision, whose index wheel does not match the pinned CPU
torch (``operator torchvision::nms does not exist``), and transformers imports it whenever it is present; the
diffusion pipelines never need it."""
STAMP = ".sdexport-requirements"


class PeerUnavailable(RuntimeError):
    """A peer cannot run here; the message says why (it goes into the results table)."""


def requirements_key(requirements: Sequence[str] = REQUIREMENTS) -> str:
    """A hash of what the environment must contain; a changed pin rebuilds it."""
    return hashlib.sha256("\n".join((sys.version, TORCH_PIN, *requirements)).encode()).hexdigest()[:16]


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


def ensure_env(root: Path, requirements: Sequence[str] = REQUIREMENTS, remove: Sequence[str] = ()) -> Path:
    """Create (once) the venv at ``root`` with torch pinned first, then ``requirements``, then uninstall
    ``remove``; returns its python."""
    root = Path(root)
    python = python_of(root)
    stamp = root / STAMP
    key = requirements_key((*requirements, *(f"-{name}" for name in remove)))
    if python.exists() and stamp.exists() and stamp.read_text().strip() == key:
        return python
    log.warning("creating a peer's virtual environment in %s (one-off, a few minutes)", root)
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    constraints = root / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    log_file = root / "pip.log"
    _pip(python, [TORCH_PIN], log_file)
    _pip(python, ["-c", str(constraints), *requirements], log_file)
    if remove:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *remove], capture_output=True, check=False)
    stamp.write_text(key + "\n")
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


def export_folder(python: Path, diffusers_folder: Path, out: Path, timeout: float,
                  module: str = "harness.systems.optimum") -> None:
    """Export ``diffusers_folder`` with an optimum peer (``python -m MODULE export``) into ``out`` (skipped when
    ``out`` has a model_index.json)."""
    if (out / "model_index.json").exists():
        return
    tmp = out.with_name(out.name + ".partial")
    cmd = [str(python), "-m", module, "export", str(diffusers_folder), str(tmp)]
    try:
        done = subprocess.run(cmd, env=venv_environ(), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PeerUnavailable(f"{module} export did not finish in {timeout:.0f} s") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PeerUnavailable(f"{module} export failed: {last[:300]}")
    tmp.rename(out)
