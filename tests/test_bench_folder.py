"""`python benchmarks/bench_folder.py FOLDER`: arguments, a real run on a tiny folder with our runtime, no torch at
import, and the harness outside the installed package."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import harness
import sdexport
from harness import child_environ, records
from harness.folder import add_arguments, folder_suite, run


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_arguments_and_defaults() -> None:
    args = parse("some/folder")
    assert args.steps == [4, 20] and args.batch == [1, 4] and args.repeats == 5
    assert args.systems == ["sdexport", "sdexport-openvino", "sdexport-openvino-bf16", "diffusers-eager",
                            "diffusers-eager-bf16", "diffusers-compile", "optimum-ort", "optimum-openvino"]
    assert parse("f", "--systems", "sdexport").systems == ["sdexport"]
    with pytest.raises(SystemExit):
        parse("f", "--systems", "tensorflow")


def test_importing_the_package_pulls_no_torch() -> None:
    code = ("import sys, harness, harness.session, harness.worker; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         env=child_environ())
    assert out.stdout.strip() == "[]"


def test_the_harness_is_not_in_the_installed_package() -> None:
    package = Path(sdexport.__file__).parent
    assert not (package / "bench").exists()
    assert Path(harness.__file__).resolve().parent == Path(__file__).resolve().parent.parent / "benchmarks" / "harness"


def test_the_script_runs_as_documented(tmp_path: Path) -> None:
    script = Path(harness.BENCHMARKS) / "bench_folder.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 2 and "has no manifest.json" in done.stderr
    assert "--ort-tuning" in subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                                            timeout=120, check=True).stdout


def test_folder_suite(tiny_folder: Callable[[str], Path]) -> None:
    suite, folders = folder_suite(tiny_folder("tiny-sd15"), [2, 3], [1], None, 0, 1)
    assert [(c.height, c.steps, c.batch) for c in suite.cases] == [(64, 2, 1), (64, 3, 1)]
    assert suite.model == "tiny-sd15" and folders.compiled == tiny_folder("tiny-sd15")


def test_run_bench_on_a_tiny_folder(tiny_folder: Callable[[str], Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.jsonl"
    args = parse(str(tiny_folder("tiny-sd15")), "--steps", "2", "--batch", "1", "2", "--systems", "sdexport",
                 "--warmups", "0", "--repeats", "2", "--no-sgemm", "--out", str(out), "--markdown",
                 str(tmp_path / "r.md"), "--chart", str(tmp_path / "r.png"))
    assert run(args) == 0
    lines = records.read(out)
    latency = [r for r in lines if r["kind"] == "latency"]
    assert [(r["case"]["batch"], r["status"]) for r in latency] == [(1, "ok"), (2, "ok")]
    m = latency[0]["metrics"]
    assert m["unet_evaluations"] == 3  # PNDM: one more evaluation than steps
    assert m["e2e_s"]["median"] > 0 and m["peak_rss_mib"] > 50 and m["load_s"] > 0
    assert m["unet_flops"] > 0 and m["unet_gflops_per_s"] > 0
    assert m["overhead_step_ms"]["median"] < 50
    assert latency[0]["case"]["scheduler"] == "PNDMScheduler" and latency[0]["env"]["cores"]
    flops = {r["case_key"]: r["flops"] for r in lines if r["kind"] == "flops"}
    assert flops["tiny-sd15-64x64-s2-b2"] == 2 * flops["tiny-sd15-64x64-s2-b1"]  # CFG rows double with batch
    assert "| sdexport |" in capsys.readouterr().out and (tmp_path / "r.png").stat().st_size > 0
    assert json.loads(out.read_text().splitlines()[0])["schema"] == records.SCHEMA


def test_run_bench_needs_a_manifest(tmp_path: Path) -> None:
    assert run(parse(str(tmp_path))) == 2
