"""Memory an engine hands back to the OS: glibc's freed heap, and weight files a runtime keeps mapped but has copied.

Both are Linux facilities reached through ctypes (no dependency); elsewhere every call is a no-op that says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

MADV_PAGEOUT = 21
"""madvise(2) advice (Linux >= 5.4): reclaim the range's pages now; clean file pages are simply dropped and read
again from the file if touched, so the mapping's contents never change."""
MAPS = Path("/proc/self/maps")


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    if hasattr(libc, "madvise"):
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def release_heap() -> bool:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``); False where there is no such call.

    Opening an ONNX Runtime session parses and rewrites the graph in many small allocations that glibc keeps after
    they are freed: SD 1.5's fused UNet holds 3636 MiB after opening, 3349 MiB after this, the VAE decoder 399 ->
    250 MiB.
    """
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    return bool(trim(0)) if trim is not None else False


def mapped_ranges(folder: Path, maps: Path = MAPS) -> list[tuple[int, int]]:
    """Start and end addresses of this process's mappings of files directly inside ``folder``."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return []
    folder = Path(folder).resolve()
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5].removesuffix(" (deleted)")).parent == folder:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def page_out(folder: Path) -> int:
    """Ask the kernel to reclaim this process's resident pages of files mapped from ``folder``; bytes advised.

    0 where madvise or MADV_PAGEOUT is missing (not Linux, Linux < 5.4): the pages then stay, nothing else changes.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise"):
        return 0
    advised = 0
    for start, end in mapped_ranges(folder):
        if libc.madvise(start, end - start, MADV_PAGEOUT) == 0:
            advised += end - start
        else:
            log.debug("madvise(MADV_PAGEOUT) on %#x-%#x failed (errno %d)", start, end, ctypes.get_errno())
    return advised


class PageOut:
    """While entered (re-entrant, by any threads), page out ``folder``'s mapped files every ``interval`` seconds.

    OpenVINO maps a graph's weight file, reads each weight once to repack it into its own memory when it compiles
    and on a run with new shapes, and keeps the mapping; every page it read stays resident beside the copy. Paging
    out while it repacks bounds what it holds: SD 1.5's UNet at 256 px peaks at 3673 MiB instead of 6951.
    """

    def __init__(self, folder: Path, interval: float = 0.05) -> None:
        self.folder = Path(folder)
        self.interval = interval
        self._lock = threading.Lock()
        self._users = 0
        self._running: tuple[threading.Thread, threading.Event] | None = None

    def __enter__(self) -> PageOut:
        with self._lock:
            self._users += 1
            if self._running is None:
                stop = threading.Event()
                thread = threading.Thread(target=self._loop, args=(stop,), name="sdexport-page-out", daemon=True)
                self._running = (thread, stop)
                thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        with self._lock:
            self._users -= 1
            running = self._running if self._users == 0 else None
            if running is not None:
                self._running = None
        if running is not None:
            thread, stop = running
            stop.set()
            thread.join()
            page_out(self.folder)

    def _loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            page_out(self.folder)
