"""Precision per machine for the OpenVINO backend: what this CPU offers, and ``auto``, measured once and cached.

``auto`` opens each component at f32 and at every reduced precision this CPU's plugin offers (bf16, f16; int8
weight-only when ``nncf`` is installed), runs all of them on the same seeded inputs at the component's smallest
shape, and keeps the fastest whose every output stays within ``AUTO_TOLERANCE`` of f32 (relative RMS). The choice
is cached per component graph, CPU and OpenVINO version, so the probe runs once per machine.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdexport.engines.artifacts import atomic_write_json
from sdexport.engines.machine import cpu_name

log = logging.getLogger(__name__)

REDUCED = ("bf16", "f16", "int8")
"""The reduced precisions ``auto`` may pick, besides f32."""
AUTO_TOLERANCE = 1e-2
"""``auto`` accepts a precision when every output's RMS difference from f32 is at most 1% of f32's RMS."""
MIN_GAIN = 1.05
"""``auto`` keeps f32 unless a reduced precision is at least 5% faster per call."""
_CAPABILITY = {"BF16": "bf16", "FP16": "f16"}
Open = Callable[[str], Any]
"""precision -> an engine (anything with ``run(feeds)``) for the component being probed."""


@dataclass(frozen=True)
class Choice:
    """What ``auto`` picked for one component, and the measurements it picked from."""

    precision: str
    seconds: dict[str, float]
    error: dict[str, float]

    def describe(self) -> str:
        """One line: the pick, then each candidate's seconds per call and relative error."""
        cells = [f"{p} {s * 1e3:.1f} ms err {self.error.get(p, 0.0):.1e}" for p, s in self.seconds.items()]
        return f"{self.precision} ({'; '.join(cells)})"


def offered(capabilities: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The reduced precisions this CPU offers, from the CPU plugin's OPTIMIZATION_CAPABILITIES (and nncf for int8)."""
    found = [_CAPABILITY[c] for c in capabilities if c in _CAPABILITY]
    if "INT8" in capabilities and nncf_available():
        found.append("int8")
    return tuple(p for p in REDUCED if p in found)


def nncf_available() -> bool:
    """Whether int8 weight compression can run here (``pip install 'sdexport[int8]'``)."""
    try:
        import nncf  # noqa: F401
    except ImportError:
        return False
    return True


def sample_feeds(inputs: tuple[Any, ...], profile: Mapping[str, Mapping[str, list[int]]]) -> dict[str, np.ndarray]:
    """Seeded inputs at each input's smallest profile shape: normal floats, zero integers (token ids)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for tensor in inputs:
        shape = tuple(profile[tensor.name]["min"])
        if tensor.dtype.startswith("int"):
            feeds[tensor.name] = np.zeros(shape, dtype=tensor.dtype)
        else:
            feeds[tensor.name] = rng.standard_normal(shape).astype(tensor.dtype)
    return feeds


def relative_error(out: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> float:
    """The largest, over outputs, RMS(out - ref) / RMS(ref); inf when an output is not finite."""
    worst = 0.0
    for name, expected in ref.items():
        got = np.asarray(out[name], dtype=np.float64)
        if not np.isfinite(got).all():
            return float("inf")
        expected = np.asarray(expected, dtype=np.float64)
        scale = float(np.sqrt(np.mean(expected ** 2))) or 1.0
        worst = max(worst, float(np.sqrt(np.mean((got - expected) ** 2))) / scale)
    return worst


def _measure(engine: Any, feeds: Mapping[str, np.ndarray], repeats: int) -> tuple[list[float], dict[str, Any]]:
    out = engine.run(feeds)  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.run(feeds)
        times.append(time.perf_counter() - t0)
    return times, out


def choose(open_engine: Open, candidates: tuple[str, ...], feeds: Mapping[str, np.ndarray],
           repeats: int = 5) -> Choice:
    """Time f32 and each candidate on ``feeds``; the fastest within AUTO_TOLERANCE that is MIN_GAIN faster than
    f32, else f32. One engine is open at a time (a UNet copy per precision would not fit), and f32 is measured
    before and after the candidates so that a drift in machine load does not favour either side."""
    times, ref = _measure(open_engine("f32"), feeds, repeats)
    seconds: dict[str, float] = {}
    error: dict[str, float] = {}
    for precision in candidates:
        spent, out = _measure(open_engine(precision), feeds, repeats)
        seconds[precision] = float(np.median(spent))
        error[precision] = relative_error(out, ref)
    times += _measure(open_engine("f32"), feeds, repeats)[0] if candidates else []
    seconds = {"f32": float(np.median(times)), **seconds}
    fits = [p for p in candidates if error[p] <= AUTO_TOLERANCE and seconds[p] * MIN_GAIN <= seconds["f32"]]
    best = min(fits, key=seconds.__getitem__, default="f32")
    return Choice(best, seconds, error)


def cache_path() -> Path:
    """Where ``auto``'s choices are kept: $SDEXPORT_CACHE_DIR, else $XDG_CACHE_HOME/sdexport, else ~/.cache/sdexport."""
    root = os.environ.get("SDEXPORT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                         Path.home() / ".cache") / "sdexport"
    return Path(root) / "openvino-precision.json"


def machine_key(openvino_version: str) -> str:
    """CPU model and OpenVINO version: a choice measured on one machine is not reused on another."""
    return f"{cpu_name()}|openvino {openvino_version}"


def read_cache(path: Path | None = None) -> dict[str, Any]:
    """Every cached choice, keyed by machine then component key; {} when absent or unreadable."""
    path = path or cache_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_choice(machine: str, component_key: str, probe: Callable[[], Choice], path: Path | None = None) -> Choice:
    """The cached Choice for this machine and component, or ``probe()``'s, written to the cache atomically."""
    path = path or cache_path()
    data = read_cache(path)
    entry = data.get(machine, {}).get(component_key)
    if isinstance(entry, dict) and entry.get("precision") in ("f32", *REDUCED):
        return Choice(entry["precision"], dict(entry.get("seconds", {})), dict(entry.get("error", {})))
    choice = probe()
    data.setdefault(machine, {})[component_key] = asdict(choice)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data)
    except OSError as exc:
        log.warning("could not cache the precision choice in %s (%s); it will be probed again", path, exc)
    return choice
