"""The writer thread: PNG encoding, durable writes and metadata lines overlap the next batch's generation."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_DONE = object()


class WriterThread:
    """Runs ``consume(item)`` for every item put, in order, on one background thread; errors surface in the caller."""

    def __init__(self, consume: Callable[[Any], None], depth: int = 8) -> None:
        self._consume = consume
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="sdexport-synth-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is None:
                try:
                    self._consume(item)
                except BaseException as exc:  # re-raised in the generating thread by put() / close()
                    self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, item: Any) -> None:
        """Queue one item (blocks while the queue is full); raises the writer's error if it failed."""
        self._check()
        self._queue.put(item)

    def close(self) -> None:
        """Wait until everything queued is written; raise the writer's error if any."""
        self._queue.put(_DONE)
        self._thread.join()
        self._check()
