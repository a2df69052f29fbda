"""The service on real sockets: uvicorn on 127.0.0.1 (OpenAI client, disconnects) and `sdexport serve` draining on
SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from fakes.serving import SlowPipeline, free_port, pixels, wait_ready
from sdexport.serve.app import create_app
from sdexport.serve.config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tiny_folder: Callable[[str], Path]) -> Path:
    return tiny_folder("tiny-sd15")


@pytest.fixture
def live(tiny_pipe: Callable[[str], Any]) -> Iterator[tuple[str, Any]]:
    """A real uvicorn on 127.0.0.1 and a free port in a thread, stopped at the end of the test."""
    app = create_app(SlowPipeline(tiny_pipe("tiny-sd15"), seconds=0.002), ServeConfig(warmup_steps=1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None,
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.config.port}"
    try:
        wait_ready(base, timeout=30)
        yield base, app
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()


def test_real_uvicorn_serves_the_openai_client_and_cancels_on_disconnect(live: tuple[str, Any],
                                                                        tiny_pipe: Callable[[str], Any]) -> None:
    base, app = live
    body = {"prompt": "a cat", "n": 1, "size": "64x64", "seed": 3, "num_inference_steps": 3}
    try:
        import openai
    except ImportError:  # the client library is optional: send what it sends
        answer = httpx.post(f"{base}/v1/images/generations", json={**body, "model": "sdexport",
                                                                    "response_format": "b64_json"}, timeout=60)
        images = [item["b64_json"] for item in answer.json()["data"]]
    else:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        result = client.images.generate(prompt="a cat", model="sdexport", n=1, size="64x64",
                                        response_format="b64_json", extra_body={"seed": 3, "num_inference_steps": 3})
        images = [item.b64_json for item in result.data]
    alone = tiny_pipe("tiny-sd15")("a cat", seed=3, num_inference_steps=3, output_type="np").images[0]
    np.testing.assert_array_equal(pixels(images[0]), alone)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection mid-generation
        httpx.post(f"{base}/v1/generate", json={"prompt": "a", "num_inference_steps": 500, "height": 32,
                                                "width": 32}, timeout=0.5)
    cancelled = app.state.service.metrics.batches.labels("cancelled")
    for _ in range(500):
        if cancelled._value.get() == 1 and not app.state.service.batcher.running:
            break
        time.sleep(0.01)
    assert cancelled._value.get() == 1 and not app.state.service.batcher.running


def _events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    kind = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield kind or "", json.loads(line.removeprefix("data: "))


def test_sigterm_stops_accepting_drains_the_request_in_flight_and_exits_0(folder: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "sdexport", "serve", str(folder), "--port", str(port),
                               "--warmup-steps", "1", "--drain-s", "30"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(base, alive=lambda: server.poll() is None)
        body = {"prompt": "a", "num_inference_steps": 400, "height": 32, "width": 32, "seed": 1, "stream": True}
        kinds: list[str] = []
        with httpx.stream("POST", f"{base}/v1/generate", json=body, timeout=60) as response:
            for kind, data in _events(response):
                kinds.append(kind)
                if kind == "step" and data["step"] == 2:
                    server.send_signal(signal.SIGTERM)
                    with pytest.raises(httpx.ConnectError):  # no new connections once draining
                        for _ in range(50):
                            httpx.get(f"{base}/healthz", timeout=1)
                            time.sleep(0.02)
        assert kinds[-1] == "result" and kinds.count("step") > 2
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert "Traceback" not in (server.stdout.read() if server.stdout else "")
