"""Fused attention, the memory arena and OpenVINO precisions on the CPU, against diffusers' torch module, interleaved.

    python benchmarks/bench_attention.py                                  # tiny-sd15 UNet (seconds)
    python benchmarks/bench_attention.py --model sd15 --size 512          # full SD 1.5 UNet, batch 2 (one CFG call)
    python benchmarks/bench_attention.py --model sd15 --size 512 --component vae_decoder --batch 1

Variants: the folder's portable graph or its fused graph (attention as MultiHeadAttention) x the CPU memory arena
(off, on, on with kSameAsRequested growth, on with shrinkage after every run), and the diffusers module in torch
eager; and OpenVINO on the portable graph at f32, bf16 and int8 weights and on the fused graph at f32 and bf16
(there OpenVINO reads MultiHeadAttention as ScaledDotProductAttention); and optimum-intel's own IR (converted from
torch; exported by `bench_latency.py --systems optimum-openvino`) at the same compile settings. Every variant runs
in its own process (so its peak RSS is its own: load + calls), round after round in turn. The first call (a
warm-up, left out of the median) is reported apart: ONNX Runtime plans a shape's memory on it, and without the
arena it page-faults every activation afresh.
Appends JSON lines to benchmarks/results/attention.jsonl and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness.environment import environment
from harness.memory import current_rss_mib, peak_rss_mib, reset_peak
from harness.models import ensure_compiled, ensure_diffusers, folders_for

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (graph, arena): graph "portable" | "fused"; arena "off" | "on" | "same" (kSameAsRequested) | "shrink";
# or ("openvino" | "openvino-fused", precision): the portable or the fused graph on OpenVINO at that precision
# (int8: nncf-compressed weights)
VARIANTS = {
    "portable, arena off": ("portable", "off"), "portable, arena on": ("portable", "on"),
    "fused, arena off": ("fused", "off"), "fused, arena on": ("fused", "on"),
    "fused, arena kSameAsRequested": ("fused", "same"), "fused, arena shrink per run": ("fused", "shrink"),
    "openvino f32": ("openvino", "f32"), "openvino bf16": ("openvino", "bf16"),
    "openvino int8": ("openvino", "int8"),
    "openvino f32, fused": ("openvino-fused", "f32"), "openvino bf16, fused": ("openvino-fused", "bf16"),
    "optimum-intel IR, openvino f32": ("optimum-ir", "f32"),
    "diffusers torch eager": ("torch", ""),
}


def _ort_runner(folder: Path, component: Any, graph: str, arena: str) -> Any:
    """A callable running the component on ONNX Runtime with the variant's graph and arena settings."""
    import onnxruntime as ort

    from sdexport.engines.ort import OrtEngine, session_options

    opts = session_options()
    opts.enable_cpu_mem_arena = arena != "off"
    if arena == "same":
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # 1: kSameAsRequested
        opts.add_session_config_entry("session.use_env_allocators", "1")
    engine = OrtEngine(component.name, folder / component.name / "model.onnx", component.inputs, component.outputs,
                       options=opts, fused=graph == "fused")
    run_options = ort.RunOptions()
    if arena == "shrink":
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    names = [t.name for t in component.outputs]

    def call(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return engine.session.run(names, {t.name: feeds[t.name] for t in component.inputs}, run_options)[0]

    return call


def _openvino_runner(folder: Path, component: Any, precision: str, fused: bool) -> Any:
    """A callable running the component's portable or fused graph on OpenVINO at ``precision``."""
    from sdexport.engines.artifacts import FUSED_GRAPH
    from sdexport.engines.openvino import OpenVinoEngine, compile_config

    graph = folder / component.name / (FUSED_GRAPH if fused else "model.onnx")
    engine = OpenVinoEngine(component.name, graph, component.inputs, component.outputs, compile_config(precision),
                            int8_weights=precision == "int8")
    name = component.outputs[0].name
    return lambda feeds: engine.run(feeds)[name]


def _optimum_ir_runner(ir_root: Path, component: Any, precision: str) -> Any:
    """A callable running optimum-intel's IR of the component on OpenVINO, fed our inputs (its timestep: int64 [1])."""
    import openvino as ov

    from sdexport.engines.openvino import compile_config

    xml = ir_root / component.name / "openvino_model.xml"
    if not xml.is_file():
        raise FileNotFoundError(f"{xml} not found: export it with python benchmarks/bench_latency.py --only "
                                "sd15-256 --systems optimum-openvino")
    compiled = ov.Core().compile_model(xml, "CPU", compile_config(precision))
    request = compiled.create_infer_request()

    def call(feeds: dict[str, np.ndarray]) -> np.ndarray:
        values = [feeds[t.name] for t in component.inputs]  # both graphs list their inputs in the same order
        inputs = {}
        for port, value in zip(compiled.inputs, values, strict=True):
            rows = port.get_partial_shape()[0]
            value = value[:1] if value.ndim == 1 and rows.is_static and rows.get_length() == 1 else value
            inputs[port.get_any_name()] = value.astype(port.get_element_type().to_dtype())
        request.infer(inputs)
        return request.get_output_tensor(0).data.copy()

    return call


def _torch_runner(diffusers_folder: Path, spec: Any, component: Any) -> Any:
    """A callable running diffusers' own module (loaded alone from the diffusers folder) in torch eager."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdexport.export.onnx import torch_outputs
    from sdexport.export.wrappers import wrap

    torch.set_num_threads(os.cpu_count() or 1)
    if component.name == "unet":
        pipe = argparse.Namespace(unet=UNet2DConditionModel.from_pretrained(diffusers_folder / "unet"))
    else:
        pipe = argparse.Namespace(vae=AutoencoderKL.from_pretrained(diffusers_folder / "vae"))
    wrapper = wrap(pipe, spec, component)
    return lambda feeds: torch_outputs(wrapper, component, feeds)[0]


def _spec(folder: Path) -> Any:
    from sdexport.engines.artifacts import read_manifest
    from sdexport.specs import ModelSpec

    return ModelSpec.from_dict(read_manifest(folder)["model"])


def worker(args: argparse.Namespace) -> int:
    """One variant in this process: load, one warm-up call (timed apart), timed calls; writes a JSON result and the
    output."""
    spec = _spec(args.folder)
    component = spec.components[args.component]
    feeds = dict(np.load(args.feeds))
    t0 = time.perf_counter()
    graph, arena = VARIANTS[args.worker]
    if graph == "torch":
        call = _torch_runner(args.diffusers, spec, component)
    elif graph == "optimum-ir":
        call = _optimum_ir_runner(args.folder.parent / "optimum-openvino", component, arena)
    elif graph.startswith("openvino"):
        call = _openvino_runner(args.folder, component, arena, fused=graph == "openvino-fused")
    else:
        call = _ort_runner(args.folder, component, graph, arena)
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss_mib()
    reset_peak()  # the peak below is the calls' (on top of the loaded weights), not the load's transient
    t = time.perf_counter()
    out = call(feeds)  # the warm-up: the session's first call at this shape, reported apart
    first_s = time.perf_counter() - t
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        out = call(feeds)
        times.append(time.perf_counter() - t)
    np.save(args.out.with_suffix(".npy"), out)
    result = {"variant": args.worker, "times": times, "first_s": first_s, "load_s": load_s,
              "rss_loaded_mib": rss_loaded,
              "peak_rss_mib": peak_rss_mib()}
    args.out.write_text(json.dumps(result))
    return 0


def _spawn(args: argparse.Namespace, variant: str, feeds: Path, work: Path) -> dict[str, Any]:
    out = work / f"{abs(hash(variant))}.json"
    cmd = [sys.executable, __file__, "--worker", variant, "--folder", str(args.folder), "--diffusers",
           str(args.diffusers), "--component", args.component, "--feeds", str(feeds), "--out", str(out),
           "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    if done.returncode != 0:
        return {"variant": variant, "error": done.stderr.strip()[-1500:]}
    result = json.loads(out.read_text())
    result["output"] = np.load(out.with_suffix(".npy"))
    return result


def summarise(variant: str, rounds: list[dict[str, Any]], reference: np.ndarray | None) -> dict[str, Any]:
    """One table row: median and best seconds per call over every round, the worst peak RSS, |diff| vs torch."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return {"variant": variant, "error": rounds[-1]["error"]}
    times = [t for r in ok for t in r["times"]]
    row = {"variant": variant, "median_s": statistics.median(times), "best_s": min(times), "calls": len(times),
           "load_s": statistics.median(r["load_s"] for r in ok),
           "first_s": statistics.median(r["first_s"] for r in ok),
           "rss_loaded_mib": max(r["rss_loaded_mib"] or 0 for r in ok),
           "peak_rss_mib": max(r["peak_rss_mib"] for r in ok)}
    if reference is not None:
        row["max_abs_diff_vs_torch"] = float(np.abs(ok[-1]["output"] - reference).max())
    return row


def render(rows: list[dict[str, Any]], title: str) -> str:
    """A markdown table of the rows, with ratios to torch eager (time) and to the old default (arena off)."""
    ref = next((r for r in rows if r["variant"] == "diffusers torch eager" and "error" not in r), None)
    lines = [title, "", "| variant | median s / call (best) | x torch | first call s | peak RSS in calls MiB | "
             "x torch RSS | load s | max abs diff vs torch |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][-200:]!r} | | | | | | |")
            continue
        x = f"{r['median_s'] / ref['median_s']:.2f}" if ref else "-"
        xr = f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}" if ref else "-"
        diff = f"{r['max_abs_diff_vs_torch']:.1e}" if "max_abs_diff_vs_torch" in r else "-"
        lines.append(f"| {r['variant']} | {r['median_s']:.3f} ({r['best_s']:.3f}) | {x} | {r['first_s']:.2f} | "
                     f"{r['peak_rss_mib']:.0f} | {xr} | {r['load_s']:.1f} | {diff} |")
    return "\n".join(lines) + "\n"


def orchestrate(args: argparse.Namespace) -> int:
    """Prepare the folders and feeds, run every variant round after round, record and print the table."""
    from sdexport.export.onnx import dummy_inputs

    tiny = args.model.startswith("tiny-")
    folders = folders_for(args.model, not tiny)
    bounds = (64, 64, 128) if tiny else (256, 256, 512)
    args.folder = ensure_compiled(args.model, not tiny, folders.compiled, bounds, bounds)
    args.diffusers = ensure_diffusers(args.model, not tiny, folders.diffusers)
    component = _spec(args.folder).components[args.component]
    side = args.size // 8
    env = {"batch": args.batch, "latent_height": side, "latent_width": side, "sequence": 77,
           "image_height": args.size, "image_width": args.size}
    variants = args.variants or list(VARIANTS)
    rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    context = {"model": args.model, "component": args.component, "size": args.size, "batch": args.batch,
               "repeats": args.repeats, "rounds": args.rounds, "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        feeds = Path(tmp) / "feeds.npz"
        values = dummy_inputs(component, env, seed=0)
        if "timestep" in values:  # one integer timestep for every row, as in a CFG call (and optimum's int64 input)
            values["timestep"] = np.full_like(values["timestep"], np.round(values["timestep"][0]))
        np.savez(feeds, **values)
        for i in range(args.rounds):
            for variant in variants:
                t = time.time()
                rounds[variant].append(_spawn(args, variant, feeds, Path(tmp)))
                print(f"round {i + 1} {variant}: {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    torch_ok = [r for r in rounds.get("diffusers torch eager", []) if "error" not in r]
    reference = torch_ok[-1]["output"] if torch_ok else None
    rows = [summarise(v, rounds[v], reference) for v in variants]
    context["load_avg_end"] = os.getloadavg()
    env_info = environment()
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "attention.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "attention", **context, "environment": env_info, "rows": rows}) + "\n")
    title = (f"{args.model} {args.component}, {args.size}x{args.size}, batch {args.batch}; {args.rounds} rounds x "
             f"{args.repeats} timed calls per variant; CPU {env_info['cpu']}; load average "
             f"{context['load_avg_start'][0]:.2f} at start, {context['load_avg_end'][0]:.2f} at end")
    sys.stdout.write(render(rows, title))
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd15", choices=("tiny-sd15", "tiny-sdxl", "sd15", "sdxl"))
    ap.add_argument("--component", default="unet", choices=("unet", "vae_decoder"))
    ap.add_argument("--size", type=int, default=None, help="pixel height = width (default 64 tiny, 512 full size)")
    ap.add_argument("--batch", type=int, default=2, help="2: one classifier-free-guidance UNet call")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per variant and round (10 tiny, 2 full)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    for name in ("--folder", "--diffusers", "--feeds", "--out"):
        ap.add_argument(name, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tiny = args.model.startswith("tiny-")
    args.size = args.size or (64 if tiny else 512)
    args.repeats = args.repeats or (10 if tiny else 2)
    if args.worker:
        return worker(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
