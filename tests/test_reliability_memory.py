"""The build's memory estimate: refused before loading anything when a trace or validation shape would not fit."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import sdexport.export.build as build_module
from sdexport.cli import main
from sdexport.export import memory
from sdexport.export.build import BuildConfig, build
from sdexport.export.load import inspect_source
from sdexport.export.memory import MemoryBudgetError, available_memory, check_budget, parse_size
from sdexport.specs import ShapeRanges, family

SD_RANGES = {"height": (256, 512, 1024), "width": (256, 512, 1024)}  # the SD 1.5 family range: 128-512 latent px here
REFUSAL = (r"(unet|vae_decoder|vae_encoder): the (trace|validate) at shape \{'batch': \d+.*\} needs about "
           r"[\d.]+ GiB \([\d.]+ GiB of fp32 weights, [\d.]+ GiB of attention and activations\), over ")


@pytest.mark.parametrize(("text", "size"), [
    ("2GiB", 2 * 2**30), ("512MB", 512 * 10**6), ("1.5g", int(1.5 * 10**9)), ("64 KiB", 65536), (4096, 4096),
])
def test_sizes_parse(text: Any, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "2 parsecs", "-1GiB", "GiB", "0", 0, True])
def test_bad_sizes_are_named(text: Any) -> None:
    with pytest.raises(ValueError, match=re.escape(f"memory budget {text!r}")):
        parse_size(text)


def test_available_memory_is_memavailable() -> None:
    line = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable"))
    expected = int(line.split()[1]) * 1024
    assert abs(available_memory() - expected) < 2**30  # the machine's use moves between the two reads


def test_over_budget_is_refused_before_loading(folder_2x: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("weights were loaded before the memory check")

    monkeypatch.setattr(build_module, "load_source", no_load)
    out = tmp_path / "b"
    with pytest.raises(MemoryBudgetError, match=REFUSAL + r"the memory budget \(--memory-budget\) of 2.00 GiB. "
                       r"Shape ranges: height \[256, 512, 1024\].*smaller --height/--width minimums and --batch"):
        build(BuildConfig(model=str(folder_2x), out=out, ranges=SD_RANGES, memory_budget="2GiB"))
    assert not (out / "manifest.json").exists() and not list(out.glob("*/model.onnx"))


def test_the_suggested_flags_fit(folder_2x: Path) -> None:
    info = inspect_source(str(folder_2x))
    ranges = ShapeRanges(height=SD_RANGES["height"], width=SD_RANGES["width"])
    with pytest.raises(MemoryBudgetError) as caught:
        check_budget(info.configs, info.spec, list(info.spec.components), ranges, "2GiB")
    found = re.search(r"--height (\d+):(\d+):(\d+) --width (\d+):(\d+):(\d+) --batch 1 fits", str(caught.value))
    assert found, caught.value
    values = [int(v) for v in found.groups()]
    smaller = ShapeRanges(batch=(1, 1, 1), height=tuple(values[:3]), width=tuple(values[3:]))
    smaller.validate(info.spec.vae_scale_factor)
    assert max(e.total for e in check_budget(info.configs, info.spec, list(info.spec.components), smaller,
                                             "2GiB")) <= 2 * 2**30


def test_the_default_budget_is_the_available_memory(folder_2x: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda: 2**30)
    info = inspect_source(str(folder_2x))
    with pytest.raises(MemoryBudgetError, match=REFUSAL + r"the available memory \(MemAvailable\) of 1.00 GiB"):
        check_budget(info.configs, info.spec, ["unet"], ShapeRanges(**SD_RANGES))


def test_the_cli_names_the_fix(folder_2x: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["build", "--model", str(folder_2x), "--out", str(tmp_path / "b"), "--height", "256:512:1024",
                 "--width", "256:512:1024", "--memory-budget", "2GiB"])
    err = capsys.readouterr().err
    assert code == 1 and re.search(REFUSAL, err) and "--batch 1 fits" in err and "Traceback" not in err


def test_the_estimate_grows_with_the_shapes_and_the_weights(folder_2x: Path) -> None:
    info = inspect_source(str(folder_2x))
    small = check_budget(info.configs, info.spec, ["unet"], ShapeRanges(height=(16, 32, 64), width=(16, 32, 64)),
                         "64GiB")
    large = check_budget(info.configs, info.spec, ["unet"], ShapeRanges(**SD_RANGES), "64GiB")
    assert [e.phase for e in small] == ["trace", "validate", "validate"]
    assert all(b.activations > a.activations for a, b in zip(small, large, strict=True))
    sd15 = inspect_source("sd15", random_weights=True)
    # SD 1.5's UNet: 859.5 M parameters, fp32
    assert memory.weight_bytes(sd15.configs, "unet") == pytest.approx(4 * 859.52e6, rel=1e-3)
    assert family("sd").default_ranges == ShapeRanges(**SD_RANGES)


def test_a_build_within_budget_goes_ahead(tmp_path: Path) -> None:
    result = build(BuildConfig(model="tiny-sd15", out=tmp_path / "b", memory_budget="1GiB"))
    assert result.built and (tmp_path / "b" / "manifest.json").is_file()
