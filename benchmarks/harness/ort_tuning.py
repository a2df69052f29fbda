"""ONNX Runtime tuning: the effect of each session option on the UNet, each variant in a fresh process.

Variants change one thing from sdexport's defaults (``sdexport.engines.ort.session_options``): intra/inter-op
threads, thread spinning, execution mode, graph optimisation level, memory arena, memory pattern, denormals, and
IO binding. ``python -m harness.ort_tuning VARIANT GRAPH FEEDS.npz REPEATS`` measures one variant.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness import child_environ
from harness.cases import Case
from harness.memory import peak_rss_mib
from harness.stats import ratio, summarize


@dataclass(frozen=True)
class Variant:
    """One setting to try: session-option attributes, config entries, and whether to run through IO binding."""

    name: str
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, str] = field(default_factory=dict)
    io_binding: bool = False
    rows: bool = False
    """Run the batch as one slice per core at once (``parallel=rows``; with ``intra_op_num_threads=1``)."""


VARIANTS: tuple[Variant, ...] = (
    Variant("baseline", "sdexport defaults: ORT_ENABLE_ALL, intra-op threads = cores, inter-op 1, sequential, "
            "memory arena on and shrunk after each run, memory pattern on, spinning stopped after each run"),
    Variant("intra_1", "intra_op_num_threads=1", {"intra_op_num_threads": 1}),
    Variant("intra_0", "intra_op_num_threads=0 (ONNX Runtime picks: physical cores)", {"intra_op_num_threads": 0}),
    Variant("no_spinning", "session.intra_op.allow_spinning=0 (threads sleep instead of spin-waiting)",
            config={"session.intra_op.allow_spinning": "0"}),
    Variant("keep_spinning", "session.force_spinning_stop=0 (threads keep spinning after a run ends)",
            config={"session.force_spinning_stop": "0"}),
    Variant("parallel_inter_2", "execution_mode=ORT_PARALLEL, inter_op_num_threads=2",
            {"execution_mode": "ORT_PARALLEL", "inter_op_num_threads": 2}),
    Variant("opt_disable", "graph_optimization_level=ORT_DISABLE_ALL", {"graph_optimization_level": "ORT_DISABLE_ALL"}),
    Variant("opt_basic", "graph_optimization_level=ORT_ENABLE_BASIC", {"graph_optimization_level": "ORT_ENABLE_BASIC"}),
    Variant("opt_extended", "graph_optimization_level=ORT_ENABLE_EXTENDED (no NCHWc layout)",
            {"graph_optimization_level": "ORT_ENABLE_EXTENDED"}),
    Variant("arena", "enable_cpu_mem_arena=True", {"enable_cpu_mem_arena": True}),
    Variant("no_mem_pattern", "enable_mem_pattern=False", {"enable_mem_pattern": False}),
    Variant("denormal_zero", "session.set_denormal_as_zero=1", config={"session.set_denormal_as_zero": "1"}),
    Variant("io_binding", "run_with_iobinding: inputs bound once as OrtValues, output allocated by ORT",
            io_binding=True),
    Variant("rows", "rows in parallel: intra_op_num_threads=1, the batch split into one slice per core, the slices "
            "run at once from one thread each (the engine's parallel=rows)", {"intra_op_num_threads": 1}, rows=True),
)
BY_NAME = {v.name: v for v in VARIANTS}


def session_options(variant: Variant) -> Any:
    """sdexport's default SessionOptions with ``variant`` applied (enum options given by name)."""
    import onnxruntime as ort

    from sdexport.engines.ort import session_options as defaults

    opts = defaults()
    for key, value in variant.options.items():
        if key == "graph_optimization_level":
            value = getattr(ort.GraphOptimizationLevel, value)
        elif key == "execution_mode":
            value = getattr(ort.ExecutionMode, value)
        setattr(opts, key, value)
    for key, value in variant.config.items():
        opts.add_session_config_entry(key, value)
    return opts


class _RowEngine:
    """A session behind the Engine protocol, one slice per core: what ``parallel=rows`` hands ``EngineRunner``."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.names = [o.name for o in session.get_outputs()]
        self.row_parallel = os.cpu_count() or 1

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        return dict(zip(self.names, self.session.run(self.names, dict(feeds)), strict=True))


def row_runner(session: Any, feeds: Mapping[str, np.ndarray]) -> Callable[[], Any]:
    """A no-argument call running ``session`` on one slice of ``feeds`` per core at once, through the runtime's own
    ``EngineRunner``."""
    from sdexport.runtime.backends import EngineRunner

    run = EngineRunner(_RowEngine(session), max_batch=next(iter(feeds.values())).shape[0])
    return lambda: run(feeds)


def runner(session: Any, feeds: Mapping[str, np.ndarray], io_binding: bool, rows: bool = False) -> Callable[[], Any]:
    """A no-argument call running ``session`` once on ``feeds`` (plain ``run``, through IO binding, or in rows)."""
    if rows:
        return row_runner(session, feeds)
    if not io_binding:
        return lambda: session.run(None, dict(feeds))
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    for out in session.get_outputs():
        binding.bind_output(out.name, "cpu")

    def call() -> Any:
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    return call


def measure_variant(variant: Variant, graph: Path, feeds: Mapping[str, np.ndarray], repeats: int) -> dict:
    """Session creation, first run and ``repeats`` timed runs of one variant, with this process's peak RSS."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    session = ort.InferenceSession(str(graph), sess_options=session_options(variant),
                                   providers=["CPUExecutionProvider"])
    create_s = time.perf_counter() - t0
    call = runner(session, feeds, variant.io_binding, variant.rows)
    t0 = time.perf_counter()
    call()
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"create_s": create_s, "first_s": first_s, "times": times, "peak_rss_mib": peak_rss_mib()}


def _spawn(variant: Variant, graph: Path, feeds_path: Path, repeats: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "harness.ort_tuning", variant.name, str(graph), str(feeds_path), str(repeats)]
    done = subprocess.run(cmd, env=child_environ(), capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def combine(name: str, rounds: Sequence[dict], baseline: dict | None) -> dict[str, Any]:
    """One variant's result over all rounds: pooled run times, median creation time, worst peak RSS."""
    errors = [r["error"] for r in rounds if "error" in r]
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return {"variant": name, "status": "failed", "reason": errors[0] if errors else "no result"}
    runs = summarize([t for r in ok for t in r["times"]])
    out = {"variant": name, "status": "ok", "run_s": runs.to_dict(),
           "create_s": statistics.median(r["create_s"] for r in ok),
           "first_s": statistics.median(r["first_s"] for r in ok),
           "peak_rss_mib": max(r["peak_rss_mib"] for r in ok)}
    if baseline and baseline.get("status") == "ok":
        out["speedup_vs_baseline"] = ratio(baseline["run_s"]["median"], runs.median)
        out["rss_vs_baseline"] = ratio(out["peak_rss_mib"], baseline["peak_rss_mib"])
    return out


def recommend(results: Sequence[Mapping[str, Any]], threshold: float = 1.03) -> list[str]:
    """Variants faster than the baseline by at least ``threshold`` whose IQR does not overlap the baseline's."""
    base = next((r for r in results if r["variant"] == "baseline" and r["status"] == "ok"), None)
    if base is None:
        return []
    out = []
    for r in results:
        if r["variant"] == "baseline" or r["status"] != "ok":
            continue
        if (r.get("speedup_vs_baseline") or 0) >= threshold and r["run_s"]["p75"] < base["run_s"]["p25"]:
            out.append(r["variant"])
    return out


def run_experiment(folder: Path, case: Case, variants: Sequence[str] | None = None, rounds: int = 3,
                   repeats: int = 10, timeout: float = 3600.0, run_id: str | None = None,
                   progress: Callable[[str], None] | None = None, component: str = "unet") -> list[dict[str, Any]]:
    """Measure every variant on one component of ``folder`` at ``case``'s size and batch (the UNet gets the 2 x
    batch rows of CFG); ``rounds`` passes over the variants in rotating order so that drift in the machine's load
    spreads evenly. Returns result lines."""
    from harness import flops, records
    from harness.environment import environment

    chosen = [BY_NAME[n] for n in (variants or BY_NAME)]
    graph = flops.component_graph(folder, component)
    rows = case.batch * (2 if component == "unet" else 1)
    with tempfile.TemporaryDirectory(prefix="sdexport-ort-tuning-") as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **flops.component_feeds(folder, component, rows, case.height, case.width))
        raw: dict[str, list[dict]] = {v.name: [] for v in chosen}
        for r in range(rounds):
            order = chosen[r % len(chosen):] + chosen[:r % len(chosen)]
            for variant in order:
                if progress:
                    progress(f"ORT tuning round {r + 1}/{rounds}: {variant.name}")
                raw[variant.name].append(_spawn(variant, graph, feeds_path, repeats, timeout))
    base = combine("baseline", raw["baseline"], None) if "baseline" in raw else None
    results = [combine(name, rounds_, base) for name, rounds_ in raw.items()]
    best = recommend(results)
    env, run_id = environment(), run_id or records.new_run_id()
    return [records.make_record("ort_tuning", run_id, env, model=case.model, component=component, rows=rows,
                                height=case.height, width=case.width, batch=case.batch, rounds=rounds,
                                repeats=repeats, recommended=r["variant"] in best,
                                description=BY_NAME[r["variant"]].description, **r) for r in results]


def render_table(lines: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one table per (model, component, size, batch), of the latest run of each, best variant first."""
    from harness.report import table

    tuning = [r for r in lines if r["kind"] == "ort_tuning"]
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in tuning:
        key = (r["model"], r.get("component", "unet"), r["height"], r["width"], r["batch"], r.get("rows"))
        groups.setdefault(key, []).append(r)
    out = []
    for (model, component, height, width, batch, rows_), group in groups.items():
        run = max(group, key=lambda r: r["time"])["run_id"]
        rows = sorted((r for r in group if r["run_id"] == run),
                      key=lambda r: -(r.get("speedup_vs_baseline") or 0) if r["status"] == "ok" else 1)
        first = rows[0]
        out += [f"### {model} {component}, {height}x{width}, batch {batch} ({rows_ or 2 * batch} rows)", "",
                f"{first['rounds']} rounds x {first['repeats']} runs per variant, each variant in a fresh process, "
                f"rounds in rotating order; run {run}", ""]
        body = []
        for r in rows:
            if r["status"] != "ok":
                body.append([r["variant"], r["description"], f"failed: {r['reason']}", "-", "-", "-", "-", "-"])
                continue
            run_s = r["run_s"]
            body.append([r["variant"], r["description"],
                         f"{run_s['median'] * 1e3:.1f} ({run_s['p25'] * 1e3:.1f}-{run_s['p75'] * 1e3:.1f})",
                         f"{r.get('speedup_vs_baseline') or 0:.2f}x", f"{r['peak_rss_mib']:.0f}",
                         f"{r['create_s']:.2f}", f"{r['first_s'] * 1e3:.0f}", "yes" if r["recommended"] else ""])
        out += [table(body, ("variant", "setting", "run ms (IQR)", "speed-up vs baseline", "peak RSS MiB",
                             "session s", "first run ms", "better")), ""]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    """Child entry: measure one variant and write its JSON to stdout, the channel the parent reads."""
    name, graph, feeds_path, repeats = argv
    with np.load(feeds_path) as data:
        feeds = {k: data[k] for k in data.files}
    sys.stdout.write(json.dumps(measure_variant(BY_NAME[name], Path(graph), feeds, int(repeats))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
