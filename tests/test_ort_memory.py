"""The ONNX Runtime engine gives the C heap's freed pages back to the OS after opening a session (glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.memory import current_rss_mib
from sdexport.engines import ort as ort_engine

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


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
    assert ort_engine.release_heap() is True
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
