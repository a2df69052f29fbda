"""Where a generation's peak memory is: resident memory after loading and around every engine run, sampled.

    python benchmarks/bench_rss_timeline.py FOLDER                                 # 512 px, 2 steps, ONNX Runtime
    python benchmarks/bench_rss_timeline.py ~/.cache/sdexport/bench/sdxl-random/compiled --size 768 --steps 2

Loads the folder with the chosen backend, then generates once while a thread samples RSS every 50 ms and notes
which engine was running. Prints RSS (total / anonymous / file-backed, MiB) after the load and before and after each
engine run, the process's peak after loading (the load's), and the generation's sampled peak and where it was.
Nothing is written: this is for finding a peak, the latency benchmark measures it.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

from harness.memory import peak_rss_mib, rss_parts_mib
from sdexport import Pipeline


class Sampler:
    """Samples RSS every ``interval`` s on a thread and keeps the highest value with the engine running then."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.where = "between runs"
        self.peak = (0.0, "")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        rss = rss_parts_mib().get("rss", 0.0)
        if rss > self.peak[0]:
            self.peak = (rss, self.where)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _parts() -> str:
    return " ".join(f"{k} {v:.0f}" for k, v in rss_parts_mib().items())


def watch(pipe: Pipeline, sampler: Sampler) -> None:
    """Wrap every engine's ``run`` to report RSS around it and tell the sampler which engine runs."""
    for name, engine in pipe.engines.items():
        def run(feeds: Any, _run: Any = engine.run, _name: str = name) -> Any:
            sampler.where, before = _name, _parts()
            out = _run(feeds)
            sampler.sample()
            sampler.where = "between runs"
            print(f"{_name}: before [{before}] after [{_parts()}]", flush=True)
            return out
        engine.run = run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    t0 = time.perf_counter()
    pipe = Pipeline.load(args.folder, backend=args.backend)
    print(f"loaded in {time.perf_counter() - t0:.1f} s: [{_parts()}], load peak {peak_rss_mib():.0f}", flush=True)
    with Sampler() as sampler:
        watch(pipe, sampler)
        pipe(prompt="a photo", height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=7.5,
             seed=1)
    rss, where = sampler.peak
    print(f"generation peak {rss:.0f} MiB (sampled, during {where}); process peak {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
