"""Default shape ranges from the model's own config: a local folder of any VAE scale builds with no size flags."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sdexport.cli import main
from sdexport.engines.artifacts import describe, load_manifest
from sdexport.export.build import BuildConfig, build
from sdexport.specs import FAMILY_PRESETS, SHIPPED_PRESETS, TINY_PRESETS, ShapeRanges, family
from sdexport.specs.presets import TINY_RANGES, resolve_preset, source_ranges
from sdexport.specs.ranges import MAX_SPAN, native_ranges

SD15_UNET = {"sample_size": 64, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}
SD15_VAE = {"block_out_channels": [128, 256, 512, 512]}


def test_native_ranges_of_sd15_are_the_family_ranges() -> None:
    ranges, why = native_ranges(SD15_UNET, SD15_VAE, family("sd").default_ranges)
    assert ranges == family("sd").default_ranges
    assert why.startswith("from unet.sample_size 64 x vae scale 8 = 512 px native, 0.5x-2x in multiples of 64 px")


def test_native_ranges_of_a_2x_vae() -> None:
    unet = {"sample_size": 16, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}
    ranges, why = native_ranges(unet, {"block_out_channels": [32, 64]})
    assert (ranges.height, ranges.width) == ((16, 32, 64), (16, 32, 64))
    assert "from unet.sample_size 16 x vae scale 2 = 32 px native" in why


def test_native_ranges_of_a_non_square_sample_size_stay_on_the_latent_grid() -> None:
    unet = {"sample_size": [96, 64], "down_block_types": ["CrossAttnDownBlock2D"] * 3}
    ranges, why = native_ranges(unet, {"block_out_channels": [1, 2, 3, 4]})
    assert ranges.height == (384, 768, 1536) and ranges.width == (256, 512, 1024)
    assert all(v % 32 == 0 for v in (*ranges.height, *ranges.width)) and "96x64" in why


@pytest.mark.parametrize("sample_size", [None, 0, "64", [64]])
def test_an_unusable_sample_size_is_named(sample_size: object) -> None:
    with pytest.raises(ValueError, match=r"unet config sample_size=.*expected a positive integer"):
        native_ranges({"sample_size": sample_size, "down_block_types": ["DownBlock2D"]}, SD15_VAE)


def test_presets_keep_their_documented_ranges() -> None:
    for name, preset in {**FAMILY_PRESETS, **TINY_PRESETS, **SHIPPED_PRESETS}.items():
        ranges, why = source_ranges(resolve_preset(name), preset.family, {})
        assert ranges == preset.default_ranges and why == f"the {name} preset's documented ranges"
    assert TINY_PRESETS["tiny-sdxl"].default_ranges == TINY_RANGES


def test_given_ranges_override_only_their_fields() -> None:
    ranges, why = source_ranges(None, "sd", {"unet": SD15_UNET, "vae": SD15_VAE}, {"height": (256, 256, 512),
                                                                                "batch": None})
    assert ranges.height == (256, 256, 512) and ranges.width == (256, 512, 1024)
    assert why.startswith("given: height; batch, width, prompt_chunks from unet.sample_size 64")


def test_the_2x_folder_builds_with_no_size_flags(folder_2x: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "built"
    result = build(BuildConfig(model=str(folder_2x), out=out))
    manifest = result.manifest
    assert manifest["shape_ranges"] == {"batch": [1, 1, 4], "height": [16, 32, 64], "width": [16, 32, 64],
                                        "prompt_chunks": 3}
    assert manifest["shape_ranges_origin"].startswith("from unet.sample_size 16 x vae scale 2 = 32 px native")
    # ru_maxrss of the build (this test process), recorded per component: far under the 2 GB goal
    assert max(c["peak_rss_mib"] for c in manifest["components"].values()) < 2048
    assert "ranges from unet.sample_size 16 x vae scale 2" in describe(out, load_manifest(out, verify=True))
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "from unet.sample_size 16 x vae scale 2 = 32 px native" in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "pattern"), [
    (["--height", "32:64:8000000"], rf"height range \(32, 64, 8000000\): max 8000000 is over {MAX_SPAN} x the min "
                                    rf"32, the largest size a build validates for \(256\)"),
    (["--width", "16:16:4096"], r"width range \(16, 16, 4096\): max 4096 is over 8 x the min 16"),
    (["--prompt-chunks", "0"], r"prompt_chunks=0 must be an integer >= 1"),
    (["--height", "30:30:60"], r"height range \(30, 30, 60\): \[30, 30, 60\] not a multiple of 8"),
    (["--batch", "2:1:4"], r"batch range \(2, 1, 4\) must satisfy 1 <= min <= opt <= max"),
    (["--memory-budget", "lots"], r"memory budget 'lots' is not a size"),
    (["--memory-budget", "0GiB"], r"memory budget '0GiB' must be more than 0 bytes"),
])
def test_bad_build_sizes_are_refused_before_any_work(tmp_path: Path, flags: list[str], pattern: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    assert main(["build", "--model", "tiny-sd15", "--out", str(out), *flags]) == 1
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert "Traceback" not in err and not out.exists()


def test_prompt_chunks_given_are_honoured(tmp_path: Path) -> None:
    ranges, why = source_ranges(resolve_preset("tiny-sd15"), "sd", {}, {"prompt_chunks": 1})
    assert ranges.prompt_chunks == 1 and why.startswith("given: prompt_chunks")
    assert ShapeRanges.from_dict(json.loads(json.dumps(ranges.to_dict()))) == ranges
