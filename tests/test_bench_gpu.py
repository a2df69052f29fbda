"""benchmarks/bench_gpu.py without a GPU: argument errors, the refusal to measure, and its table."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from sdexport.engines.tensorrt import compat

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_gpu.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def _module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    done = _run("--folder", str(tmp_path), "--systems", "sdexport-trt,tensorflow")
    assert done.returncode == 2 and "unknown system(s) ['tensorflow']" in done.stderr
    done = _run("--folder", str(tmp_path), "--systems", "diffusers-cuda")
    assert done.returncode == 2 and "diffusers-cuda needs --diffusers" in done.stderr


def test_without_a_gpu_nothing_is_measured(tmp_path: Path) -> None:
    env = compat.probe_environment()
    if env.gpus:
        pytest.skip(f"this machine has a GPU ({env.gpus[0].name}): the script measures instead")
    out = tmp_path / "gpu.jsonl"
    done = _run("--folder", str(tmp_path), "--systems", "sdexport-trt", "--out", str(out))
    assert done.returncode == 2
    assert "no usable NVIDIA GPU" in done.stderr and "nothing measured" in done.stderr
    assert not out.exists()


def test_table_gives_ratios_to_diffusers_and_the_reason_a_system_failed() -> None:
    bench = _module()
    total = {"median": 2.0}
    rows = [{"system": "sdexport-trt", "total": {"median": 1.0}, "batch": 2, "max_abs_diff": 0.0123,
             "stages": {"unet": 0.0305, "overhead": 0.00012}},
            {"system": "sdexport-ort-cuda", "error": "CUDAExecutionProvider is not available"},
            {"system": "diffusers-cuda", "total": total, "batch": 2, "stages": {}}]
    table = bench._table(rows).splitlines()
    assert table[2] == "| sdexport-trt | 1.000 | 0.50x | 2.00 | 30.5 | 0.12 | 0.012 |  |"
    assert table[3] == "| sdexport-ort-cuda |  |  |  |  |  |  | CUDAExecutionProvider is not available |"
    assert table[4] == "| diffusers-cuda | 2.000 | 1.00x | 1.00 |  |  |  |  |"
