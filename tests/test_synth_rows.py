"""sdexport synth input checks: bad rows go to errors.jsonl with their row numbers and never stop the run."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fakes.synth_tables import metadata, write_table
from sdexport.cli import main
from sdexport.synth import Defaults, SynthConfig, SynthError, synthesize
from sdexport.synth.plan import make_plan
from sdexport.synth.rows import Limits, check_rows
from sdexport.synth.table import TableRow

LIMITS = Limits(height=(32, 64, 256), width=(32, 64, 256), multiple=8, inpaint_only=False)


def _rows(*values: dict[str, Any]) -> list[TableRow]:
    return [TableRow(n, v) for n, v in enumerate(values, start=1)]


def test_each_bad_value_is_named_with_its_row(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = _rows({"prompt": "ok"}, {"negative_prompt": "no prompt"}, {"prompt": "x", "width": 60},
                 {"prompt": "x", "height": 512}, {"prompt": "x", "steps": 0}, {"prompt": "x", "image": "broken.png"},
                 {"prompt": "x", "image": "missing.png"}, {"prompt": "x", "mask": "m.png"},
                 {"prompt": "x", "scheduler": "nope"}, {"prompt": "x", "file_name": "mine.png"},
                 {"prompt": "x", "id": "a/b"}, {"prompt": "x", "id": "same"}, {"prompt": "y", "id": "same"},
                 {"prompt": "x", "seed": -1}, {"prompt": "x", "guidance_scale": "high"})
    jobs, errors = check_rows(rows, tmp_path, Defaults(), LIMITS)
    assert [j.row for j in jobs] == [1, 12]
    found = {e.row: e.error for e in errors}
    assert sorted(found) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15]
    assert "prompt is missing" in found[2]
    assert "width=60" in found[3] and "multiples of 8" in found[3]
    assert "height=512" in found[4] and "32..256" in found[4]
    assert "steps=0" in found[5]
    assert "broken.png" in found[6] and "cannot read" in found[6]
    assert "missing.png" in found[7]
    assert "mask is given without image" in found[8]
    assert "unknown scheduler 'nope'" in found[9]
    assert "['file_name']" in found[10]
    assert "id='a/b'" in found[11]
    assert "already used by row 12" in found[13]
    assert "seed=-1" in found[14] and "guidance_scale='high'" in found[15]


def test_csv_cells_are_parsed_and_defaults_fill_empty_columns(tmp_path: Path) -> None:
    rows = _rows({"prompt": "a", "width": "48", "steps": "7", "guidance_scale": "3.5", "seed": "12", "scheduler": None},
                 {"prompt": "b", "scheduler": "euler"})
    jobs, errors = check_rows(rows, tmp_path, Defaults(negative_prompt="blurry", steps=5, scheduler="ddim"), LIMITS)
    assert errors == []
    assert (jobs[0].width, jobs[0].height, jobs[0].steps, jobs[0].guidance_scale, jobs[0].seed) == (48, 64, 7, 3.5, 12)
    assert jobs[0].scheduler == "DDIMScheduler" and jobs[1].scheduler == "EulerDiscreteScheduler"
    assert jobs[1].negative_prompt == "blurry" and jobs[1].steps == 5


def test_plan_groups_by_shape_and_is_independent_of_what_is_done(tmp_path: Path) -> None:
    rows = _rows(*[{"prompt": f"p{i}", "width": 32 if i % 2 else 64} for i in range(5)])
    jobs, _ = check_rows(rows, tmp_path, Defaults(steps=2), LIMITS)
    plan = make_plan(jobs, per_prompt=3, batch_size=4, run_seed=0, shard_size=5)
    assert [[i.key for i in b.items] for b in plan.batches][:2] == [
        ["row000001-0", "row000001-1", "row000001-2", "row000003-0"],
        ["row000003-1", "row000003-2", "row000005-0", "row000005-1"]]
    assert {b.items[0].job.width for b in plan.batches[:3]} == {64}
    assert all(len({i.job.width for i in b.items}) == 1 for b in plan.batches)
    assert [i.position for i in plan.items] == list(range(15)) and plan.items[5].shard == 1


def test_bad_rows_are_reported_and_the_good_ones_still_made(tiny_folder: Callable[[str], Path],
                                                           tmp_path: Path) -> None:
    table = tmp_path / "prompts.jsonl"
    table.write_text('{"prompt": "a cat"}\n{"prompt": ""}\n\n{oops\n{"prompt": "a dog", "width": 33}\n'
                     '{"prompt": "a cow", "id": "cow"}\n')
    out = tmp_path / "out"
    summary = synthesize(SynthConfig(tiny_folder("tiny-sd15"), table, out, defaults=Defaults(steps=2)))
    assert (summary.rows, summary.bad_rows, summary.written) == (5, 3, 2)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["row"] for e in errors] == [2, 4, 5]  # JSONL rows are line numbers; the blank line 3 is skipped
    assert "not valid JSON" in errors[1]["error"] and "width=33" in errors[2]["error"]
    assert [r["key"] for r in metadata(out)] == ["row000001-0", "cow-0"]


def test_fail_fast_stops_at_the_first_bad_row(tiny_folder: Callable[[str], Path], tmp_path: Path,
                                              capsys: Any) -> None:
    table = write_table(tmp_path / "p.csv", [{"prompt": "a cat"}, {"prompt": "a dog", "steps": "-3"}])
    args = ["synth", str(tiny_folder("tiny-sd15")), "--prompts", str(table), "--out", str(tmp_path / "out"),
            "--steps", "2", "-q"]
    assert main([*args, "--fail-fast"]) == 1
    assert "row 2: steps='-3' is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "out" / "train" / "metadata.jsonl").exists()
    with pytest.raises(SynthError, match="unknown table format '.txt'"):
        synthesize(SynthConfig(tiny_folder("tiny-sd15"), tmp_path / "p.txt", tmp_path / "o"))
    with pytest.raises(SynthError, match=r"batch=9 is not allowed: .* built for 1\.\.4 images per call"):
        synthesize(SynthConfig(tiny_folder("tiny-sd15"), table, tmp_path / "o", batch=9))


def test_a_failed_batch_is_reported_per_row_and_the_run_goes_on(tiny_folder: Callable[[str], Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from sdexport.runtime.result import RequestError
    from sdexport.synth import run

    def flaky(pipe: Any, batch: Any) -> Any:
        if any("fails" in item.job.prompt for item in batch.items):
            raise RequestError("prompt rejected by the test")
        return real(pipe, batch)

    real = run.run_batch
    monkeypatch.setattr(run, "run_batch", flaky)
    table = write_table(tmp_path / "p.jsonl", [{"prompt": "a cat"}, {"prompt": "this fails", "width": 32},
                                               {"prompt": "a dog"}])
    config = SynthConfig(tiny_folder("tiny-sd15"), table, tmp_path / "out", defaults=Defaults(steps=2))
    summary = synthesize(config)
    assert (summary.written, summary.failed, summary.bad_rows) == (2, 1, 1)
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"row": 2, "id": "row000002", "error": "generation failed: prompt rejected by the test"}]
    with pytest.raises(SynthError, match="row 2: generation failed"):
        synthesize(SynthConfig(tiny_folder("tiny-sd15"), table, tmp_path / "out2", fail_fast=True,
                               defaults=Defaults(steps=2)))


def test_synth_runs_with_torch_diffusers_transformers_onnx_blocked(tiny_folder: Callable[[str], Path],
                                                                  tmp_path: Path) -> None:
    from test_runtime_loading import BLOCKER

    table = write_table(tmp_path / "p.csv", [{"prompt": "a cat"}, {"prompt": "a dog", "seed": "3"}])
    argv = ["synth", str(tiny_folder("tiny-sd15")), "--prompts", str(table), "--out", str(tmp_path / "out"),
            "--steps", "2", "--format", "webdataset", "-q"]
    code = BLOCKER + ("from sdexport.cli import main\n"
                      f"code = main({argv!r})\n"
                      "print(json.dumps([code, sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [0, []]
    assert len(metadata(tmp_path / "out")) == 2


def test_writer_thread_keeps_order_and_surfaces_its_errors() -> None:
    from sdexport.synth.writer import WriterThread

    seen: list[int] = []
    writer = WriterThread(seen.append, depth=2)
    for number in range(50):
        writer.put(number)
    writer.close()
    assert seen == list(range(50))

    def broken(number: int) -> None:
        if number == 3:
            raise OSError("disk full")

    writer = WriterThread(broken, depth=1)
    with pytest.raises(OSError, match="disk full"):
        for number in range(100):
            writer.put(number)
        writer.close()
