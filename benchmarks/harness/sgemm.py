"""This CPU's sgemm ceiling: float32 matrix-multiply GFLOP/s of numpy's BLAS, ONNX Runtime's MLAS and torch.

``python -m harness.sgemm`` prints one JSON object. ``measure_ceiling`` runs that in a child process with
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset (they pin OpenBLAS to an older, slower kernel on this machine) and
records which kernel then ran (threadpoolctl).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from harness import child_environ
from harness.environment import BLAS_VARIABLES, blas_info
from harness.stats import summarize

SIZES = (1024, 2048, 4096)


def gflops(n: int, seconds: float) -> float:
    """GFLOP/s of one n x n x n product (2 n^3 FLOPs) taking ``seconds``."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    return 2.0 * n**3 / seconds / 1e9


def time_calls(call: Callable[[], Any], repeats: int, warmups: int = 1) -> list[float]:
    """Seconds of ``repeats`` calls of ``call`` after ``warmups`` untimed ones."""
    for _ in range(warmups):
        call()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def _matrices(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    return rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)


def numpy_call(n: int) -> Callable[[], Any]:
    """numpy ``a @ b`` in float32 (its BLAS sgemm)."""
    a, b = _matrices(n)
    out = np.empty((n, n), dtype=np.float32)
    return lambda: np.matmul(a, b, out=out)


def ort_call(n: int) -> Callable[[], Any]:
    """An ONNX Runtime session holding one MatMul (MLAS sgemm, as the UNet's kernels); needs the onnx package."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a, b = _matrices(n)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
        [onnx.numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"a": a})


def torch_call(n: int) -> Callable[[], Any]:
    """torch.mm in float32 (oneDNN / MKL)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a, b = (torch.from_numpy(m) for m in _matrices(n))
    out = torch.empty(n, n)
    return lambda: torch.mm(a, b, out=out)


BACKENDS: dict[str, tuple[str | None, Callable[[int], Callable[[], Any]]]] = {
    "numpy": (None, numpy_call),
    "onnxruntime": ("onnx", ort_call),
    "torch": ("torch", torch_call),
}


def measure(backends: Sequence[str] = tuple(BACKENDS), sizes: Sequence[int] = SIZES, repeats: int = 5) -> dict:
    """GFLOP/s (median and best of ``repeats``) per backend and size; a backend that cannot run says why."""
    results: dict[str, Any] = {}
    for name in backends:
        module, factory = BACKENDS[name]
        if module and importlib.util.find_spec(module) is None:
            results[name] = {"status": "skipped", "reason": f"{module} is not installed"}
            continue
        per_size = {}
        for n in sizes:
            times = summarize(time_calls(factory(n), repeats))
            per_size[str(n)] = {"median_gflops": gflops(n, times.median), "best_gflops": gflops(n, times.min),
                                "median_s": times.median, "spread": times.spread}
        best = max(per_size.values(), key=lambda r: r["median_gflops"])
        results[name] = {"status": "ok", "sizes": per_size, "gflops": best["median_gflops"]}
    ok = {k: v["gflops"] for k, v in results.items() if v["status"] == "ok"}
    return {"backends": results, "ceiling_gflops": max(ok.values()) if ok else None,
            "ceiling_backend": max(ok, key=ok.get) if ok else None, "blas": blas_info(), "threads": os.cpu_count()}


def clean_environ() -> dict[str, str]:
    """This process's environment without the OpenBLAS core-type pins."""
    return {k: v for k, v in os.environ.items() if k not in BLAS_VARIABLES}


def measure_ceiling(sizes: Sequence[int] = SIZES, repeats: int = 5, timeout: float = 900) -> dict[str, Any]:
    """``measure`` in a child process without the OpenBLAS pins; notes which pins were removed."""
    cmd = [sys.executable, "-m", "harness.sgemm", "--sizes", ",".join(map(str, sizes)),
           "--repeats", str(repeats)]
    done = subprocess.run(cmd, env=child_environ(clean_environ()), capture_output=True, text=True, timeout=timeout,
                          check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["unset_env"] = [k for k in BLAS_VARIABLES if k in os.environ]
    return result


def main(argv: list[str]) -> int:
    """``python -m harness.sgemm [--sizes 1024,2048] [--repeats 5]``: prints the JSON result."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m harness.sgemm")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    sys.stdout.write(json.dumps(measure(args.backends.split(","), sizes, args.repeats)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
