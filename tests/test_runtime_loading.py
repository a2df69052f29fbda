"""Loading verifies the folder (hashes, stray files) and needs no torch, diffusers, transformers or onnx."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from sdexport.errors import ArtifactError
from sdexport.runtime.pipeline import Pipeline

BLOCKER = textwrap.dedent('''
    import importlib.abc, json, sys
    BLOCKED = ("torch", "diffusers", "transformers", "onnx")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
''')

SCRIPT = BLOCKER + textwrap.dedent('''
    import numpy as np
    from PIL import Image
    from sdexport import Pipeline

    folder, out = sys.argv[1], sys.argv[2]
    pipe = Pipeline.load(folder)
    made = pipe("a red circle", num_inference_steps=2, seed=1, height=72, width=56)
    made.images[0].save(out)
    picture = Image.new("RGB", (56, 72), (200, 40, 90))
    mask = Image.new("L", (56, 72), 255)
    pipe("a cat", image=picture, strength=0.6, num_inference_steps=2, seed=1, output_type="np")
    pipe("a cat", image=picture, mask_image=mask, num_inference_steps=2, seed=1, output_type="np")
    try:
        pipe("a cat", num_inference_steps=2, rng="torch")
        torch_error = ""
    except ValueError as exc:
        torch_error = str(exc)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"loaded": loaded, "torch_error": torch_error, "size": list(made.images[0].size)}))
''')


def test_runtime_generates_with_torch_diffusers_transformers_onnx_blocked(tiny_folder: Callable[[str], Path],
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_folder("tiny-sdxl")), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [] and report["size"] == [56, 72] and out.is_file()
    assert "needs torch installed" in report["torch_error"]


def test_runtime_imports_without_fcntl_filelock_or_tqdm() -> None:
    """Windows has no fcntl; filelock (build lock) and tqdm (CLI bars) are not the runtime's to need."""
    code = BLOCKER.replace('("torch", "diffusers", "transformers", "onnx")',
                           '("torch", "diffusers", "transformers", "onnx", "fcntl", "filelock", "tqdm")') + (
        "import sdexport.runtime.pipeline, sdexport.engines.artifacts, sdexport.engines.ort, sdexport.cli\n"
        "import sdexport.engines.tensorrt.runtime\n"
        "from sdexport import Pipeline\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))\n")
    assert "fcntl" in code
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.fixture
def copied(tiny_folder: Callable[[str], Path], tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(tiny_folder("tiny-sd15"), target)
    return target


def test_edited_file_is_caught_by_its_hash(copied: Path) -> None:
    merges = copied / "tokenizer" / "merges.txt"
    text = merges.read_text()
    merges.write_text(text.replace("i n", "i m", 1))  # same size, different content
    with pytest.raises(ArtifactError, match=r"merges\.txt does not match its sha256"):
        Pipeline.load(copied)
    Pipeline.load(copied, verify=False)  # sizes only: opt-out of hashing for a fast start


def test_truncated_file_is_caught_without_hashing(copied: Path) -> None:
    config = copied / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text())))
    with pytest.raises(ArtifactError, match=r"scheduler_config\.json has \d+ bytes, the manifest says"):
        Pipeline.load(copied, verify=False)


def test_unlisted_file_next_to_a_graph_is_refused(copied: Path) -> None:
    (copied / "unet" / "weights.data").write_bytes(b"weights nobody vouched for")
    with pytest.raises(ArtifactError, match=r"weights\.data is not listed in the manifest"):
        Pipeline.load(copied)


def test_unfinished_folder_is_refused(copied: Path) -> None:
    (copied / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Pipeline.load(copied)


def test_unknown_backend_names_the_choices(tiny_folder: Callable[[str], Path]) -> None:
    with pytest.raises(ValueError, match=r"backend 'cuda-magic' is not available; choose one of .*'onnxruntime'"):
        Pipeline.load(tiny_folder("tiny-sd15"), backend="cuda-magic")


def test_engines_open_largest_first_and_keep_the_specs_order(tiny_folder: Callable[[str], Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a graph holds a transient beside its weights: the largest opens while nothing else is resident."""
    from sdexport.runtime import backends

    folder = tiny_folder("tiny-sdxl")
    manifest = json.loads((folder / "manifest.json").read_text())
    sizes = {name: sum(f.stat().st_size for f in (folder / name).iterdir()) for name in manifest["components"]}
    opened: list[str] = []
    real = backends.open_engine
    monkeypatch.setattr(backends, "open_engine", lambda c, b, o: opened.append(c.name) or real(c, b, o))
    pipe = Pipeline.load(folder)
    assert opened == sorted(sizes, key=lambda n: -sizes[n]), (opened, sizes)
    assert len(set(sizes.values())) == len(sizes)  # an order to check
    assert list(pipe.engines) == list(manifest["components"])
