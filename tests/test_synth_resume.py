"""sdexport synth resumes: SIGKILL at random points, damaged files, and the re-run gives the same bytes."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fakes.synth_tables import metadata, snapshot, twenty_rows, write_table
from sdexport.synth import Defaults, SynthConfig, synthesize

ROOT = Path(__file__).resolve().parents[1]
PER_PROMPT, BATCH, STEPS = 3, 4, 3


def _config(folder: Path, table: Path, out: Path, fmt: str) -> SynthConfig:
    return SynthConfig(folder, table, out, per_prompt=PER_PROMPT, batch=BATCH, format=fmt, shard_size=25,
                       defaults=Defaults(steps=STEPS))


def _command(folder: Path, table: Path, out: Path, fmt: str) -> list[str]:
    return [sys.executable, "-m", "sdexport", "synth", str(folder), "--prompts", str(table), "--out", str(out),
            "--per-prompt", str(PER_PROMPT), "--batch", str(BATCH), "--steps", str(STEPS), "--format", fmt,
            "--shard-size", "25", "-q"]


def _lines(out: Path, fmt: str) -> int:
    path = out / ("train/metadata.jsonl" if fmt == "imagefolder" else "metadata.jsonl")
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _kill_after(command: list[str], out: Path, fmt: str, target: int, delay: float) -> int:
    """Start the CLI, SIGKILL it ``delay`` s after its metadata reaches ``target`` lines; the lines at the kill."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while process.poll() is None and _lines(out, fmt) < target and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode in (-signal.SIGKILL, 0), process.stderr.read().decode() if process.stderr else ""
    return _lines(out, fmt)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 20-row prompt table."""
    return write_table(tmp_path_factory.mktemp("synth-resume") / "prompts.jsonl", twenty_rows())


@pytest.fixture(scope="module")
def reference(tiny_folder: Callable[[str], Path], table: Path) -> Callable[[str], Path]:
    """``reference(fmt)`` -> the output of one uninterrupted run in that format (made once)."""
    made: dict[str, Path] = {}

    def get(fmt: str) -> Path:
        if fmt not in made:
            made[fmt] = table.parent / f"reference-{fmt}"
            synthesize(_config(tiny_folder("tiny-sd15"), table, made[fmt], fmt))
        return made[fmt]

    return get


@pytest.mark.parametrize("fmt", ["imagefolder", "webdataset"])
def test_sigkill_at_random_points_then_resume_gives_identical_output(
        fmt: str, tiny_folder: Callable[[str], Path], table: Path, reference: Callable[[str], Path],
        tmp_path: Path) -> None:
    folder = tiny_folder("tiny-sd15")
    total = len(metadata(reference(fmt)))
    out = tmp_path / "killed"
    rng = random.Random(15 if fmt == "imagefolder" else 16)
    targets = sorted(rng.sample(range(1, total - 5), 2))
    seen = [_kill_after(_command(folder, table, out, fmt), out, fmt, t, rng.uniform(0, 0.03)) for t in targets]
    assert any(0 < n < total for n in seen), seen  # at least one kill left a partial dataset
    finished = subprocess.run(_command(folder, table, out, fmt), env={**os.environ, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    records = metadata(out)
    assert len(records) == total and len({r["key"] for r in records}) == total  # no duplicates
    assert snapshot(out) == snapshot(reference(fmt))


def test_damaged_files_are_redone_and_stale_lines_dropped(tiny_folder: Callable[[str], Path], table: Path,
                                                         reference: Callable[[str], Path], tmp_path: Path) -> None:
    folder, out = tiny_folder("tiny-sd15"), tmp_path / "out"
    shutil.copytree(reference("imagefolder"), out)
    records = metadata(out)
    split = out / "train"
    (split / records[3]["file_name"]).write_bytes(b"\x89PNG truncated")  # a torn image
    (split / records[4]["file_name"]).unlink()  # an image lost after its line
    (split / "00000" / ".stray.png.abc.tmp").write_bytes(b"partial")  # a temporary file of a killed write
    text = (split / "metadata.jsonl").read_text()
    (split / "metadata.jsonl").write_text(text + text.splitlines()[0] + "\n" + '{"key": "row0000')  # dup + cut line
    again = synthesize(_config(folder, table, out, "imagefolder"))
    assert (again.already_done, again.written) == (len(records) - 2, 2)
    assert snapshot(out) == snapshot(reference("imagefolder"))


def test_a_torn_tar_shard_is_cut_back_and_completed(tiny_folder: Callable[[str], Path], table: Path,
                                                    reference: Callable[[str], Path], tmp_path: Path) -> None:
    folder, out = tiny_folder("tiny-sd15"), tmp_path / "out"
    shutil.copytree(reference("webdataset"), out)
    shard = out / "train-00001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 700])  # killed in the middle of a member
    summary: Any = synthesize(_config(folder, table, out, "webdataset"))
    assert 0 < summary.written < 25
    assert snapshot(out) == snapshot(reference("webdataset"))
