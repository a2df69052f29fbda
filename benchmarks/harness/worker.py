"""A worker process: load one system, measure a list of cases, print one JSON result per case.

Run as ``python -m harness.worker JOB.json`` (by the runner, one process per system and batch size, so each
process's peak memory is its own). Imports only the standard library, numpy and the system measured.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from harness.cases import Case
from harness.memory import peak_rss_mib, reset_peak
from harness.timing import aggregate

PREFIX = "SDEXPORT-BENCH "
"""Marks result lines on stdout, so that libraries printing there cannot corrupt them."""


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters): why a system could not run."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")
    return text if len(text) <= 300 else text[:297] + "..."


def emit(payload: dict[str, Any]) -> None:
    """Write one result line to stdout, the channel the runner reads (this runs in the child process)."""
    sys.stdout.write(PREFIX + json.dumps(payload, allow_nan=False) + "\n")
    sys.stdout.flush()


def measure_case(runner: Any, case: Case, latents: np.ndarray, warmups: int, repeats: int,
                 output: Path | None) -> dict[str, Any]:
    """First run, warm-ups, then ``repeats`` timed runs of one case; metrics plus this case's peak RSS."""
    reset_peak()
    load_before = os.getloadavg()[0]
    first, images = runner.run(case, latents)
    for _ in range(warmups):
        runner.run(case, latents)
    runs = [runner.run(case, latents)[0] for _ in range(max(1, repeats))]
    if output is not None:
        np.save(output, images)
    # the machine's 1-minute load average around the case: above the core count, other work shared the CPU
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return {**aggregate(first, runs, case.batch), "case_peak_rss_mib": peak_rss_mib(), "load_average": load}


def run_job(job: dict[str, Any]) -> None:
    """Load the job's system and emit one result per case (status ok or failed with the reason)."""
    from harness.systems import open_runner

    cases = [Case.from_dict(c) for c in job["cases"]]
    t0 = time.perf_counter()
    try:
        runner = open_runner(job["system"], job["paths"], job.get("options"))
    except Exception as exc:  # noqa: BLE001 - any failure to load is a result ("cannot run: why")
        logging.getLogger(__name__).debug("load failed:\n%s", traceback.format_exc())
        for case in cases:
            emit({"case": case.key, "status": "failed", "reason": f"load: {describe_error(exc)}"})
        return
    load_s = time.perf_counter() - t0
    load_peak = peak_rss_mib()
    out_dir = Path(job["output_dir"]) if job.get("output_dir") else None
    for index, case in enumerate(cases):
        latents = np.load(job["latents"][case.key])
        output = out_dir / f"{job['system']}-{case.key}.npy" if out_dir else None
        try:
            metrics = measure_case(runner, case, latents, job["warmups"], job["repeats"], output)
        except Exception as exc:  # noqa: BLE001 - a failed case is reported, the next one still runs
            emit({"case": case.key, "status": "failed", "reason": describe_error(exc)})
            continue
        metrics.update(load_s=load_s, cold=index == 0, load_peak_rss_mib=load_peak,
                       peak_rss_mib=max(load_peak, metrics["case_peak_rss_mib"]))
        emit({"case": case.key, "status": "ok", "metrics": metrics, "info": runner.info()})


def main(argv: list[str]) -> int:
    """Entry point: ``python -m harness.worker JOB.json``."""
    if len(argv) != 1:
        sys.stderr.write("usage: python -m harness.worker JOB.json\n")
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_job(json.loads(Path(argv[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
