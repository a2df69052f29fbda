"""sdexport synth on one machine: a 20-row table on the tiny SD 1.5 folder -> an imagefolder dataset."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fakes.synth_tables import metadata, snapshot, twenty_rows, write_table
from sdexport import __version__
from sdexport.cli import main
from sdexport.synth import Defaults, SynthConfig, synthesize
from sdexport.synth.seeds import derive_seed

STEPS = 3


def _config(folder: Path, table: Path, out: Path, **kwargs: Any) -> SynthConfig:
    return SynthConfig(folder=folder, prompts=table, out=out, per_prompt=2, batch=4, seed=7,
                       defaults=Defaults(steps=STEPS), **kwargs)


@pytest.fixture(scope="module")
def run(tiny_folder: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The 20-row table synthesised once (2 images per row, engine batches of 4)."""
    root = tmp_path_factory.mktemp("synth-local")
    table = write_table(root / "prompts.jsonl", twenty_rows())
    folder = tiny_folder("tiny-sd15")
    summary = synthesize(_config(folder, table, root / "out"))
    return {"folder": folder, "root": root, "table": table, "out": root / "out", "summary": summary}


def test_every_row_makes_its_images_with_complete_metadata(run: dict[str, Any]) -> None:
    summary, records = run["summary"], metadata(run["out"])
    assert (summary.rows, summary.bad_rows, summary.images, summary.written, summary.failed) == (20, 0, 40, 40, 0)
    assert len(records) == 40 and len({r["key"] for r in records}) == 40
    manifest = json.loads((run["folder"] / "manifest.json").read_text())
    by_row = {r["row"]: r for r in records if r["index"] == 0}
    assert sorted(by_row) == list(range(1, 21))
    first = by_row[1]
    assert first["id"] == "item_00" and first["file_name"] == "00000/item_00-0.png"
    assert first["prompt"] == "a red circle, number 0" and first["negative_prompt"] is None
    assert (first["width"], first["height"], first["steps"], first["task"]) == (64, 64, STEPS, "txt2img")
    assert first["guidance_scale"] == 7.5 and first["scheduler"] == "PNDMScheduler"
    assert first["source_hash"] == manifest["source"]["hash"] and first["model"] == "tiny-sd15"
    assert first["loras"] == [] and first["sdexport_version"] == __version__
    assert first["source"] == "batch-0"  # an extra column, carried untouched
    assert by_row[2]["id"] == "row000002"  # rows without an id are named by their row number
    assert (by_row[3]["width"], by_row[3]["height"]) == (32, 48)
    for record in records:
        picture = Image.open(run["out"] / "train" / record["file_name"])
        assert picture.size == (record["width"], record["height"])


def test_seeds_derive_from_run_seed_row_id_and_index(run: dict[str, Any]) -> None:
    seeds = {(r["row"], r["index"]): r["seed"] for r in metadata(run["out"])}
    assert seeds[(2, 0)] == 1001 and seeds[(2, 1)] == 1002  # a row's own seed: seed + index
    assert seeds[(1, 0)] == derive_seed(7, "item_00", 0) and seeds[(1, 1)] == derive_seed(7, "item_00", 1)
    assert seeds[(3, 1)] == derive_seed(7, "row000003", 1)
    assert len(set(seeds.values())) == 40
    assert derive_seed(8, "item_00", 0) != derive_seed(7, "item_00", 0)


def test_images_equal_direct_pipeline_calls_with_the_recorded_seeds(run: dict[str, Any],
                                                                    tiny_pipe: Callable[[str], Any]) -> None:
    pipe = tiny_pipe("tiny-sd15")
    records = metadata(run["out"])
    for record in records[::7] + [r for r in records if r["width"] == 32][:2]:
        direct = pipe(record["prompt"], seed=[record["seed"]], num_inference_steps=STEPS, width=record["width"],
                      height=record["height"], output_type="np").images[0]
        made = np.asarray(Image.open(run["out"] / "train" / record["file_name"]).convert("RGB"))
        # tolerance: 1 level of 255 on < 1% of the values. PNG is lossless and every image draws from its own seed's
        # stream; only ONNX Runtime's batch-size-dependent float32 kernels may differ (equal on the CI CPU)
        assert np.abs(made.astype(int) - direct).max() <= 1 and (made != direct).mean() < 0.01, record["key"]


def test_datasets_loads_the_output_as_an_imagefolder(run: dict[str, Any]) -> None:
    datasets = pytest.importorskip("datasets")
    data = datasets.load_dataset("imagefolder", data_dir=str(run["out"]), split="train")
    assert data.num_rows == 40
    row = data[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (64, 64)
    assert row["prompt"] == "a red circle, number 0" and row["key"] == "item_00-0" and row["source"] == "batch-0"


def test_rerun_is_a_no_op_and_dry_run_reports_the_plan(run: dict[str, Any], capsys: Any) -> None:
    before = snapshot(run["out"])
    again = synthesize(_config(run["folder"], run["table"], run["out"]))
    assert (again.already_done, again.written) == (40, 0)
    assert snapshot(run["out"]) == before
    code = main(["synth", str(run["folder"]), "--prompts", str(run["table"]), "--out", str(run["out"]),
                 "--per-prompt", "2", "--batch", "4", "--seed", "7", "--steps", str(STEPS), "--dry-run"])
    text = capsys.readouterr().out
    assert code == 0
    assert "txt2img 64x64, 3 steps, guidance default, scheduler default: 34 image(s) in 9 batch(es)" in text
    assert "txt2img 48x32, 3 steps" in text and "6 image(s) in 2 batch(es)" in text
    assert "40 already done, 0 to make" in text


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_csv_and_parquet_tables_give_the_same_dataset(run: dict[str, Any], suffix: str, tmp_path: Path) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    table = write_table(tmp_path / f"prompts{suffix}", twenty_rows())
    out = tmp_path / "out"
    synthesize(_config(run["folder"], table, out))
    assert snapshot(out) == snapshot(run["out"])


def test_webdataset_shards_hold_the_same_samples(run: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "wds"
    synthesize(_config(run["folder"], run["table"], out, format="webdataset", shard_size=16))
    tars = sorted(out.glob("train-*.tar"))
    assert [t.name for t in tars] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    pictures = {r["key"]: (run["out"] / "train" / r["file_name"]).read_bytes() for r in metadata(run["out"])}
    try:
        import webdataset
    except ImportError:
        samples = []
        for tar in tars:
            with tarfile.open(tar) as archive:
                names = archive.getnames()
                samples += [{"__key__": n[:-4], "png": archive.extractfile(n).read(),
                             "json": archive.extractfile(n[:-4] + ".json").read()} for n in names if n.endswith(".png")]
    else:
        samples = list(webdataset.WebDataset([str(t) for t in tars], shardshuffle=False))
    assert len(samples) == 40
    for sample in samples:
        assert sample["png"] == pictures[sample["__key__"]]
        assert json.loads(sample["json"])["key"] == sample["__key__"]
