"""sdexport synth --task inpaint on the tiny 9-channel SD 1.5 inpainting folder: original, mask and result per row."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fakes.synth_tables import metadata, write_table
from sdexport.synth import Defaults, SynthConfig, synthesize


def test_inpaint_rows_give_object_removal_pairs(tiny_folder: Callable[[str], Path], tiny_pipe: Callable[[str], Any],
                                                picture: Image.Image, mask: Image.Image, tmp_path: Path) -> None:
    picture.save(tmp_path / "photo.png")
    mask.save(tmp_path / "hole.png")
    (tmp_path / "masks").mkdir()
    mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "masks" / "flipped.png")
    rows = [{"prompt": "remove the object", "image": "photo.png", "mask": "hole.png", "width": 48, "height": 48},
            {"prompt": "an empty table", "image": "photo.png", "mask": "masks/flipped.png", "width": 48,
             "height": 48},
            {"prompt": "no mask here", "image": "photo.png"}]
    table = write_table(tmp_path / "edits.jsonl", rows)
    out = tmp_path / "pairs"
    summary = synthesize(SynthConfig(tiny_folder("tiny-sd15-inpaint"), table, out, task="inpaint", batch=2,
                                     defaults=Defaults(steps=3)))
    assert (summary.written, summary.bad_rows) == (2, 1)
    assert "the inpaint task needs the image and mask columns" in (out / "errors.jsonl").read_text()
    records = metadata(out)
    assert [r["task"] for r in records] == ["inpaint", "inpaint"]
    pipe = tiny_pipe("tiny-sd15-inpaint")
    for record, row in zip(records, rows, strict=False):
        files = {k: out / "train" / record[k] for k in ("file_name", "original_file_name", "mask_file_name")}
        assert {p.name for p in files.values()} == {f"{record['key']}.png", f"{record['key']}.original.png",
                                                    f"{record['key']}.mask.png"}
        assert all(Image.open(p).size == (48, 48) for p in files.values())
        direct = pipe(row["prompt"], image=picture, mask_image=Image.open(tmp_path / row["mask"]), width=48,
                      height=48, num_inference_steps=3, seed=[record["seed"]], output_type="np").images[0]
        made = np.asarray(Image.open(files["file_name"]).convert("RGB"))
        # tolerance: 1 level of 255 on < 1% of the values (lossless PNG, per-image noise streams; only batch-size-
        # dependent float32 kernels may differ)
        assert np.abs(made.astype(int) - direct).max() <= 1 and (made != direct).mean() < 0.01
    datasets = pytest.importorskip("datasets")
    data = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert {"image", "original", "mask", "prompt"} <= set(data.column_names) and data.num_rows == 2
    assert np.array_equal(np.asarray(data[0]["original"]),
                          np.asarray(picture.convert("RGB").resize((48, 48), Image.Resampling.LANCZOS)))
