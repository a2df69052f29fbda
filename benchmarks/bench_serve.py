"""Closed-loop load on `sdexport serve`: images/s and p50/p95/p99 latency with dynamic batching on and off.

Each case starts `sdexport serve FOLDER` in its own process on 127.0.0.1 (batching on: --max-batch 4; off:
--max-batch 1), then N client threads (1, 4, 16) each send POST /v1/images/generations back to back for a fixed
time. The peer measured in the same run is a direct `Pipeline` call in this process with the same arguments; the
server's overhead per request (HTTP, JSON, PNG + base64) is the median paired difference between the same request
through the idle server and the direct call, interleaved so both see the same machine load. Results: JSON lines in
benchmarks/results/serve.jsonl and a table on stdout.

    python benchmarks/bench_serve.py                          # tiny-sd15 (built once into the bench cache)
    python benchmarks/bench_serve.py --sd15-256 --seconds 60  # + the full SD 1.5 architecture at 256x256
    python benchmarks/bench_serve.py --folder build/sdxl --size 1024x1024 --steps 20
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from harness import child_environ
from harness.environment import environment
from harness.models import cache_root, ensure_compiled
from sdexport.runtime.pipeline import Pipeline
from sdexport.serve.codec import png_bytes

RESULTS = Path(__file__).resolve().parent / "results" / "serve.jsonl"
SCHEMA = "sdexport-bench-serve/1"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(folder: Path, max_batch: int, window_ms: float) -> tuple[subprocess.Popen[bytes], str]:
    """`sdexport serve` in its own process; returns it and its base URL once /readyz answers 200."""
    port = _port()
    cmd = [sys.executable, "-m", "sdexport", "-q", "serve", str(folder), "--port", str(port), "--max-batch",
           str(max_batch), "--batch-window-ms", str(window_ms), "--max-queue", "64", "--warmup-steps", "2",
           "--timeout-s", "86400"]  # closed loop: every request is answered, however long the queue
    server = subprocess.Popen(cmd, env=child_environ(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return server, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"`{' '.join(cmd)}` did not become ready")


def closed_loop(base: str, clients: int, seconds: float, body: dict[str, Any]) -> dict[str, Any]:
    """``clients`` threads sending back to back for ``seconds``; latencies of the answered requests, errors."""
    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            seed = index * 100000
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                answer = http.post(f"{base}/v1/images/generations", json={**body, "seed": seed})
                with lock:
                    (latencies.append(time.perf_counter() - t0) if answer.status_code == 200
                     else errors.append(answer.status_code))
                seed += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    return {"requests": len(latencies), "errors": len(errors), "error_codes": sorted(set(errors)),
            "images_per_s": len(latencies) * body["n"] / wall, "wall_s": wall, **percentiles(latencies)}


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50 / p95 / p99 in seconds (None without values)."""
    if not values:
        return {"p50_s": None, "p95_s": None, "p99_s": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50_s": float(p50), "p95_s": float(p95), "p99_s": float(p99)}


def paired_overhead(base: str, pipe: Pipeline, body: dict[str, Any], repeats: int) -> dict[str, float]:
    """The peer, interleaved with the server so both see the same machine load: medians of a direct Pipeline call,
    of the same request through the idle server (one client), of their paired difference, and of PNG + base64."""
    args = {"num_inference_steps": body["num_inference_steps"], "height": body["height"], "width": body["width"]}
    request = {k: v for k, v in body.items() if k not in ("height", "width")}
    pipe("warm-up", seed=0, **args)
    calls, served, encodes = [], [], []
    with httpx.Client(timeout=600) as http:
        for index in range(repeats):
            t0 = time.perf_counter()
            result = pipe(body["prompt"], seed=index, **args)
            calls.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            base64.b64encode(png_bytes(result.images[0], result.parameters))
            encodes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            http.post(f"{base}/v1/images/generations", json={**request, "seed": index}).raise_for_status()
            served.append(time.perf_counter() - t0)
    return {"direct_s": statistics.median(calls), "server_s": statistics.median(served),
            "overhead_s": statistics.median(s - d for s, d in zip(served, calls, strict=True)),
            "encode_s": statistics.median(encodes)}


def _record(run_id: str, kind: str, case: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"schema": SCHEMA, "kind": kind, "run_id": run_id,
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "env": environment(),
            **case, **fields}


def emit(out: Path, line: dict[str, Any]) -> dict[str, Any]:
    """Append one result line to ``out`` at once (a long run that is stopped keeps what it measured)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as stream:
        stream.write(json.dumps(line) + "\n")
    if line["kind"] == "serve":
        sys.stdout.write(_row(line) + "\n")
        sys.stdout.flush()
    return line


def bench_folder(folder: Path, name: str, args: argparse.Namespace, run_id: str) -> list[dict[str, Any]]:
    """Every (batching, clients) case of one folder, then the overhead line."""
    pipe_ranges = json.loads((folder / "manifest.json").read_text())["shape_ranges"]
    height, width = (args.size or (pipe_ranges["height"][1], pipe_ranges["width"][1]))
    body = {"prompt": "a lighthouse on a cliff at dusk", "n": 1, "size": f"{width}x{height}",
            "num_inference_steps": args.steps}
    case = {"model": name, "folder": str(folder), "height": height, "width": width, "steps": args.steps}
    lines = []
    for batching in (True, False):
        server, base = start_server(folder, args.max_batch if batching else 1, args.window_ms)
        try:
            for clients in args.clients:
                stats = closed_loop(base, clients, args.seconds, body)
                lines.append(emit(args.out, _record(run_id, "serve", case, batching=batching, clients=clients,
                                                    **stats)))
            if not batching and args.repeats:
                peer = paired_overhead(base, Pipeline.load(folder), {**body, "height": height, "width": width},
                                       args.repeats)
                lines.append(emit(args.out, _record(run_id, "serve_overhead", case, **peer)))
        finally:
            server.terminate()
            server.wait(timeout=120)
    return lines


def _row(r: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f}"

    return (f"| {r['model']} | {r['height']}x{r['width']} | {r['steps']} | {'on' if r['batching'] else 'off'} | "
            f"{r['clients']} | {r['images_per_s']:.2f} | {ms(r['p50_s'])} | {ms(r['p95_s'])} | {ms(r['p99_s'])} | "
            f"{r['errors']} |")


def table(lines: list[dict[str, Any]]) -> str:
    """The run as a markdown table: throughput and latency per case, ratios batching on / off, overhead."""
    head = ("| model | size | steps | batching | clients | images/s | p50 ms | p95 ms | p99 ms | errors |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    rows = [_row(r) for r in lines if r["kind"] == "serve"]
    out = [head, *rows, ""]
    for r in lines:
        if r["kind"] == "serve" and r["batching"]:
            off = next(o for o in lines if o["kind"] == "serve" and not o["batching"] and o["model"] == r["model"]
                       and o["clients"] == r["clients"])
            out.append(f"- {r['model']}, {r['clients']} clients: batching gives "
                       f"{r['images_per_s'] / max(off['images_per_s'], 1e-9):.2f}x the images/s")
    for r in lines:
        if r["kind"] == "serve_overhead" and r["overhead_s"] is not None:
            out.append(f"- {r['model']}: direct Pipeline call {r['direct_s'] * 1000:.1f} ms, the same request "
                       f"through the idle server {r['server_s'] * 1000:.1f} ms (medians, interleaved): overhead "
                       f"{r['overhead_s'] * 1000:.1f} ms per request, of which PNG + base64 "
                       f"{r['encode_s'] * 1000:.1f} ms")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the cases (each JSON line appended as it is measured), then print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", type=Path, action="append", default=[], help="a compiled folder (repeatable)")
    ap.add_argument("--sd15-256", action="store_true", help="also the full SD 1.5 architecture (random weights)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=15.0, help="duration of each case")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=lambda t: tuple(int(v) for v in t.split("x"))[::-1], help="WIDTHxHEIGHT")
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--window-ms", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=20,
                    help="interleaved direct / served calls of the peer (0: no overhead line)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    folders = [(f, f.name) for f in args.folder]
    if not folders or args.sd15_256:
        root = cache_root()
        if not args.folder:
            folders.append((ensure_compiled("tiny-sd15", False, root / "serve-tiny-sd15", (32, 64, 256),
                                            (32, 64, 256)), "tiny-sd15"))
        if args.sd15_256:
            folders.append((ensure_compiled("sd15", True, root / "sd15-random" / "serve-compiled-256",
                                            (256, 256, 256), (256, 256, 256)), "sd15-256"))
    named = {folder.resolve(): (folder, name) for folder, name in folders}  # once each; a preset's name wins
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    lines = [line for folder, name in named.values() for line in bench_folder(folder, name, args, run_id)]
    sys.stdout.write(table(lines) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    raise SystemExit(main())
