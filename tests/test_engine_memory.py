"""Engines hand memory back: the C heap's freed pages after opening (glibc), mapped weight pages once copied."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.memory import current_rss_mib
from sdexport.engines import memory
from sdexport.engines import ort as ort_engine

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
LINUX = platform.system() == "Linux"


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_release_heap_returns_freed_heap_pages_to_the_os() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    block = 64 << 10  # under glibc's mmap threshold: these live on the heap
    blocks = [libc.malloc(block) for _ in range(3200)]  # 200 MiB
    for b in blocks:
        ctypes.memset(b, 1, block)
    for b in blocks[::2]:  # every other block freed: holes glibc keeps, since the heap's top is still in use
        libc.free(b)
    before = current_rss_mib()
    assert memory.release_heap() is True
    after = current_rss_mib()
    for b in blocks[1::2]:
        libc.free(b)
    assert before is not None and after is not None
    assert before - after > 50, (before, after)  # about 100 MiB of freed holes go back


def test_engine_releases_the_heap_after_opening(tiny_folder: Callable[[str], Path], tiny_source: Callable[[str], Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    component = tiny_source("tiny-sd15").spec.components["vae_decoder"]
    graph = tiny_folder("tiny-sd15") / "vae_decoder" / "model.onnx"
    calls: list[int] = []
    monkeypatch.setattr(ort_engine, "release_heap", lambda: calls.append(1) or True)
    ort_engine.OrtEngine("vae_decoder", graph, component.inputs, component.outputs)
    assert calls == [1]


def resident_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            inside = len(head) == 6 and Path(head[5]) == path.resolve()
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.fixture
def mapped(tmp_path: Path) -> Any:
    """A 16 MiB file in its own folder, mapped and read through, so all its pages are resident."""
    folder = tmp_path / "weights"
    folder.mkdir()
    path = folder / "model.onnx.data"
    data = bytes(range(256)) * (16 << 12)
    path.write_bytes(data)
    (tmp_path / "elsewhere.data").write_bytes(data)
    with path.open("rb") as f, (tmp_path / "elsewhere.data").open("rb") as g:
        view, other = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ), mmap.mmap(g.fileno(), 0, prot=mmap.PROT_READ)
    assert view[:] == data and other[:] == data  # every page read
    yield path, view, other, data
    view.close()
    other.close()


@pytest.mark.skipif(not LINUX, reason="/proc/self/maps and madvise are Linux's")
def test_mapped_ranges_are_those_of_files_in_the_folder(mapped: Any) -> None:
    path, view, _other, _data = mapped
    ranges = memory.mapped_ranges(path.parent)
    assert sum(end - start for start, end in ranges) == 16 << 20  # the file in the folder, not the one beside it
    assert memory.mapped_ranges(path.parent / "absent") == []


@pytest.mark.skipif(not LINUX, reason="/proc/self/maps and madvise are Linux's")
def test_page_out_drops_the_resident_pages_and_keeps_the_contents(mapped: Any) -> None:
    path, view, other, data = mapped
    other_path = path.parent.parent / "elsewhere.data"
    assert resident_kib(path) >= 15 << 10
    advised = memory.page_out(path.parent)
    if advised == 0:
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux < 5.4)")
    assert advised == 16 << 20
    assert resident_kib(path) < 1 << 10  # under 1 MiB of 16 left resident
    assert resident_kib(other_path) >= 15 << 10  # another folder's file is left alone
    assert view[:] == data  # read again from the file, unchanged


@pytest.mark.skipif(not LINUX, reason="/proc/self/maps and madvise are Linux's")
def test_page_out_context_pages_out_while_entered_and_stops_its_thread(mapped: Any) -> None:
    path, view, _other, data = mapped
    pages = memory.PageOut(path.parent, interval=0.01)
    with pages, pages:  # re-entrant: one thread for both
        assert [t.name for t in threading.enumerate()].count("sdexport-page-out") == 1
        deadline = time.monotonic() + 5
        while resident_kib(path) > 1 << 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert resident_kib(path) < 1 << 10
        assert view[:] == data
    assert "sdexport-page-out" not in [t.name for t in threading.enumerate()]
    assert resident_kib(path) < 1 << 10  # paged out once more on the way out


@pytest.mark.skipif(not LINUX, reason="/proc/self/maps and madvise are Linux's")
def test_openvino_engine_holds_no_pages_of_its_weight_file(tiny_folder: Callable[[str], Path],
                                                           tiny_source: Callable[[str], Any]) -> None:
    pytest.importorskip("openvino")
    from sdexport.engines.openvino import OpenVinoEngine

    component = tiny_source("tiny-sd15").spec.components["vae_decoder"]
    graph = tiny_folder("tiny-sd15") / "vae_decoder" / "model.onnx"
    data = graph.with_name("model.onnx.data")
    engine = OpenVinoEngine("vae_decoder", graph, component.inputs, component.outputs)
    if not memory.mapped_ranges(graph.parent):
        pytest.fail("OpenVINO no longer maps the weight file: PageOut has nothing to do")
    assert resident_kib(data) <= 8, resident_kib(data)  # the weights are read, copied, and their pages handed back
    latent = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    first = engine.run({"latent": latent})
    assert resident_kib(data) <= 8, resident_kib(data)  # a run with new shapes copies again, and hands back again
    second = engine.run({"latent": latent})
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])  # the weights read back from the file are the same


def test_openvino_engine_releases_its_intermediate_memory_unless_busy(tiny_folder: Callable[[str], Path],
                                                                       tiny_source: Callable[[str], Any],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("openvino")
    from sdexport.engines.openvino import OpenVinoEngine

    component = tiny_source("tiny-sd15").spec.components["vae_decoder"]
    engine = OpenVinoEngine("vae_decoder", tiny_folder("tiny-sd15") / "vae_decoder" / "model.onnx",
                            component.inputs, component.outputs)
    latent = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    before = engine.run({"latent": latent})
    assert engine.release_memory() is True
    after = engine.run({"latent": latent})  # the buffers come back on the next run, the numbers are the same
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])

    class Busy:
        def release_memory(self) -> None:
            raise RuntimeError("Attempt to call release_memory() on a compiled model in a busy state")

    monkeypatch.setattr(engine, "compiled", Busy())
    assert engine.release_memory() is False  # another thread's run keeps its memory; no error reaches the caller


def test_openvino_keep_memory_option_keeps_the_intermediate_tensors(tiny_folder: Callable[[str], Path]) -> None:
    pytest.importorskip("openvino")
    from sdexport import Pipeline

    pipe = Pipeline.load(tiny_folder("tiny-sd15"), backend="openvino", engine_options={"keep_memory": True})
    released: list[str] = []
    for name, engine in pipe.engines.items():
        assert engine.keep_memory is True
        engine.compiled = type("Spy", (), {"release_memory": lambda self, name=name: released.append(name)})()
    assert pipe.engines["unet"].release_memory() is False and released == []
    default = Pipeline.load(tiny_folder("tiny-sd15"), backend="openvino")
    assert all(engine.keep_memory is False for engine in default.engines.values())


def test_the_pipeline_releases_the_unet_and_decoder_memory_once_per_generation(
        tiny_pipe: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = tiny_pipe("tiny-sd15")
    calls: list[str] = []
    for name in ("unet", "vae_decoder", "text_encoder"):
        monkeypatch.setattr(pipe.engines[name], "release_memory", lambda name=name: calls.append(name) or True,
                            raising=False)
    pipe("a red circle", num_inference_steps=3, seed=1, output_type="latent")
    pipe("a red circle", num_inference_steps=2, seed=1, output_type="latent")
    assert calls == ["unet", "unet"]  # no decode, nothing else released
    pipe("a red circle", num_inference_steps=2, seed=1, output_type="np")
    assert calls == ["unet", "unet", "unet", "vae_decoder"]  # the decoder after it decoded; the text encoder never


@pytest.mark.parametrize(("component", "pixels", "expected"), [
    ("unet", None, True), ("text_encoder", 1024 * 1024, True),  # the arena is faster for them at any size
    ("vae_decoder", 512 * 512, True), ("vae_encoder", 256 * 256, True),  # first decode faster, little more memory
    ("vae_decoder", 512 * 768, False), ("vae_encoder", 1024 * 1024, False),  # the chunks' overshoot grows
    ("vae_decoder", None, False),  # not known: the memory-safe choice
])
def test_auto_arena_gives_the_vae_the_arena_only_on_folders_built_around_small_images(
        component: str, pixels: int | None, expected: bool) -> None:
    from sdexport.engines.ort import arena_for

    assert arena_for(component, "auto", pixels) is expected
    assert arena_for(component, "on", pixels) is True
    assert arena_for(component, "off", pixels) is False


def test_onnxruntime_arena_follows_the_folders_opt_size_unless_asked(
        tiny_folder: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from sdexport.engines import ort as ort_engine
    from sdexport.engines.artifacts import opt_pixels, read_manifest
    from sdexport.runtime.pipeline import Pipeline

    folder = tiny_folder("tiny-sd15")
    ranges = read_manifest(folder)["shape_ranges"]
    assert opt_pixels(read_manifest(folder)) == ranges["height"][1] * ranges["width"][1] <= ort_engine.VAE_ARENA_PIXELS
    assert opt_pixels({}) is None and opt_pixels({"shape_ranges": {"height": [64]}}) is None
    arenas = {name: engine.options.enable_cpu_mem_arena for name, engine in Pipeline.load(folder).engines.items()}
    assert arenas == {"text_encoder": True, "unet": True, "vae_decoder": True, "vae_encoder": True}
    monkeypatch.setattr(ort_engine, "VAE_ARENA_PIXELS", ranges["height"][1] * ranges["width"][1] - 1)
    engines = Pipeline.load(folder).engines
    assert {n: e.options.enable_cpu_mem_arena for n, e in engines.items()} == {
        "text_encoder": True, "unet": True, "vae_decoder": False, "vae_encoder": False}
    shrink = "memory.enable_memory_arena_shrinkage"
    assert engines["unet"].run_options.get_run_config_entry(shrink) == "cpu:0"
    with pytest.raises(RuntimeError, match=shrink):  # no arena, nothing to shrink after a run
        engines["vae_decoder"].run_options.get_run_config_entry(shrink)
    for arena, expected in (("on", True), ("off", False)):
        pipe = Pipeline.load(folder, engine_options={"arena": arena})
        assert {e.options.enable_cpu_mem_arena for e in pipe.engines.values()} == {expected}, arena
    with pytest.raises(ValueError, match=r"arena='sometimes' is not one of \['auto', 'on', 'off'\]"):
        Pipeline.load(folder, engine_options={"arena": "sometimes"})
