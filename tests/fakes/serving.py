"""Helpers of the serve tests: an app running in process, decoded answers, a free port, a held pipeline."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
from PIL import Image


@contextlib.asynccontextmanager
async def serving(app: Any, ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan (load, warm up) and yield an in-process client; waits for readiness if ``ready``."""
    async with app.router.lifespan_context(app):
        if ready:
            for _ in range(1000):
                service = app.state.service
                if (service is not None and service.ready) or app.state.failure:
                    break
                await asyncio.sleep(0.01)
            assert app.state.failure is None, app.state.failure
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
            yield client


def pixels(b64_png: str) -> np.ndarray:
    """The uint8 [H, W, 3] pixels of a base64 PNG."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))).convert("RGB"))


def png_b64(picture: Image.Image) -> str:
    """A picture as base64 PNG."""
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def until(check: Any, timeout: float = 10.0) -> None:
    """Wait until ``check()`` is true (polling every 10 ms); fail after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout} s")


def wait_ready(base: str, timeout: float = 90.0, alive: Any = lambda: True) -> None:
    """Poll ``base``/readyz over HTTP until it answers 200 (while ``alive()``); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{base} did not become ready within {timeout} s")


class HeldPipeline:
    """A Pipeline whose ``generate`` first waits for ``release`` (set it to let calls through); counts calls."""

    def __init__(self, pipe: Any) -> None:
        self.pipe, self.release, self.calls = pipe, threading.Event(), 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def generate(self, args: Any) -> Any:
        """Wait for release, then generate."""
        self.calls += 1
        self.release.wait(30)
        return self.pipe.generate(args)


class SlowPipeline:
    """A Pipeline whose every denoising step takes at least ``seconds`` more (so only cancelling ends it early)."""

    def __init__(self, pipe: Any, seconds: float = 0.01) -> None:
        self.pipe, self.seconds = pipe, seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def generate(self, args: Any) -> Any:
        """Generate with a slower step callback."""
        callback = args.callback

        def slow(*step: Any) -> Any:
            time.sleep(self.seconds)
            return callback(*step) if callback is not None else None

        return self.pipe.generate(dataclasses.replace(args, callback=slow))
