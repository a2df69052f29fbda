"""The folders a suite is measured on, built once and cached: our compiled folder, the same weights as a diffusers
folder (for the torch peers) and optimum's ONNX export of it.

``python -m harness.models diffusers MODEL OUT [--random-weights]`` saves a source as a diffusers folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import child_environ
from sdexport.engines.artifacts import QUANTIZED

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where built folders live between runs: $SDEXPORT_BENCH_CACHE or ~/.cache/sdexport/bench."""
    return Path(os.environ.get("SDEXPORT_BENCH_CACHE", Path.home() / ".cache" / "sdexport" / "bench"))


@dataclass(frozen=True)
class Folders:
    """The folders holding one model's weights, one per kind of system."""

    compiled: Path
    diffusers: Path
    optimum: Path
    optimum_openvino: Path

    def as_paths(self) -> dict[str, str]:
        """The worker's ``paths`` mapping."""
        return {"compiled": str(self.compiled), "diffusers": str(self.diffusers), "optimum": str(self.optimum),
                "optimum_openvino": str(self.optimum_openvino)}


def folders_for(model: str, random_weights: bool, root: Path | None = None, compiled: Path | None = None) -> Folders:
    """The cache locations for ``model`` (``compiled`` given: an existing folder of ours)."""
    base = (root or cache_root()) / (model + ("-random" if random_weights else ""))
    return Folders(compiled or base / "compiled", base / "diffusers", base / "optimum", base / "optimum-openvino")


def _run(cmd: list[str], what: str, timeout: float) -> None:
    log.warning("%s: %s", what, " ".join(cmd))
    done = subprocess.run(cmd, env=child_environ(), capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def ensure_compiled(model: str, random_weights: bool, out: Path, height: tuple[int, int, int],
                    width: tuple[int, int, int], timeout: float = 3600) -> Path:
    """``sdexport build`` the model into ``out`` unless a finished folder (with a manifest) is already there."""
    if (out / "manifest.json").exists():
        return out
    cmd = [sys.executable, "-m", "sdexport", "build", "--model", model, "--out", str(out),
           "--height", ":".join(map(str, height)), "--width", ":".join(map(str, width))]
    _run(cmd + (["--random-weights"] if random_weights else []), f"building {model}", timeout)
    return out


def ensure_quantized(folder: Path, timeout: float = 7200) -> Path:
    """``sdexport quantize`` the compiled folder's UNet (default calibration) unless its manifest already lists one."""
    manifest = json.loads((folder / "manifest.json").read_text())
    if QUANTIZED not in manifest["components"]["unet"]:
        _run([sys.executable, "-m", "sdexport", "quantize", str(folder)], f"quantising {folder}", timeout)
    return folder


def ensure_diffusers(model: str, random_weights: bool, out: Path, timeout: float = 3600) -> Path:
    """Save the source of ``model`` (the same weights sdexport compiles) as a diffusers folder, once."""
    if not (out / "model_index.json").exists():
        cmd = [sys.executable, "-m", "harness.models", "diffusers", model, str(out)]
        _run(cmd + (["--random-weights"] if random_weights else []), f"saving {model} as a diffusers folder",
             timeout)
    legacy_text_encoder_keys(out)
    return out


def legacy_text_encoder_keys(folder: Path) -> None:
    """Give saved CLIP text encoders the ``text_model.`` key prefix (once; marked by a file).

    transformers 5 saves CLIPTextModel weights without it; transformers 4 (optimum's venv) then silently
    initialises the text encoder at random instead of loading it. Both versions load the prefixed form.
    """
    from safetensors.numpy import load_file, save_file

    marker = folder / ".sdexport-legacy-keys"
    if marker.exists():
        return
    for name in ("text_encoder", "text_encoder_2"):
        for path in sorted((folder / name).glob("*.safetensors")):
            tensors = load_file(path)
            if all(k.startswith(("text_model.", "text_projection.")) for k in tensors):
                continue
            renamed = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
                       for k, v in tensors.items()}
            save_file(renamed, path, metadata={"format": "pt"})
    marker.write_text("text encoder keys carry the text_model. prefix\n")


def source_of(compiled: Path) -> tuple[str, bool, Path | None]:
    """(model id, random weights, local diffusers folder or None) of a compiled folder, from its manifest."""
    source: dict[str, Any] = json.loads((compiled / "manifest.json").read_text()).get("source", {})
    kind = source.get("kind")
    if kind == "folder" and source.get("path"):
        return source["id"], False, Path(source["path"])
    return source.get("id", ""), kind == "random", None


def save_diffusers(model: str, random_weights: bool, out: Path) -> None:
    """Load the source exactly as ``sdexport build`` does and ``save_pretrained`` it (safetensors) into ``out``."""
    from sdexport.export.load import inspect_source, load_source

    source = load_source(inspect_source(model, random_weights=random_weights))
    tmp = out.with_name(out.name + ".partial")
    source.pipe.save_pretrained(str(tmp), safe_serialization=True)
    # transformers 5 saves tokenizer.json only; older transformers (optimum's venv) also need vocab.json/merges.txt
    for name, folder in source.tokenizer_dirs.items():
        for file in Path(folder).iterdir():
            if file.is_file() and (tmp / name).is_dir() and not (tmp / name / file.name).exists():
                shutil.copy2(file, tmp / name / file.name)
    tmp.rename(out)


def main(argv: list[str]) -> int:
    """Entry point of ``python -m harness.models``."""
    ap = argparse.ArgumentParser(prog="python -m harness.models")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("diffusers", help="save a model's source weights as a diffusers folder")
    p.add_argument("model")
    p.add_argument("out", type=Path)
    p.add_argument("--random-weights", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    save_diffusers(args.model, args.random_weights, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
