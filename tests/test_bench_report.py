"""Benchmark reporting: markdown tables, goals, the Pillow chart and the README section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from harness import records
from harness.chart import COLORS, bars, render_png
from harness.publish import END, START, latest, publish, replace_section
from harness.report import COLUMNS, best_sgemm, goals, rebase, render, row
from harness.stats import summarize

ENV = {"cpu": "test cpu", "cores": 2, "versions": {"numpy": "2"}, "cpu_flags": ["avx2"], "memory_mib": 1024}


def line(system: str, e2e: float, model: str = "tiny-sd15", run: str = "r1", suite: str | None = None,
         time: str = "2026-01-01T00:00:00+00:00", **metrics: Any) -> dict[str, Any]:
    case = {"model": model, "family": "sd", "backend": "onnxruntime", "precision": "fp32", "height": 64,
            "width": 64, "steps": 4, "batch": 1, "guidance_scale": 7.5, "scheduler": "PNDMScheduler"}
    m = {"load_s": 1.0, "first_s": 0.5, "e2e_s": summarize([e2e * 0.9, e2e, e2e * 1.1]).to_dict(),
         "images_per_s": 1 / e2e, "peak_rss_mib": 100.0, **metrics}
    rec = records.make_record("latency", run, ENV, system=system, status="ok", suite=suite or model, case=case,
                              metrics=m, warmups=1, repeats=3)
    rec["time"] = time
    return rec


def skipped(system: str, reason: str) -> dict[str, Any]:
    rec = line(system, 1.0)
    rec.pop("metrics")
    rec.update(status="skipped", reason=reason)
    return rec


def test_row_formats_metrics_and_reasons() -> None:
    ok = row(line("sdexport", 0.25, e2e_ratio_vs_eager=0.2, unet_pct_of_sgemm=0.5, max_abs_diff_vs_eager=2e-6))
    assert len(ok) == len(COLUMNS)
    assert ok[2] == "0.250 (0.237-0.263)" and ok[3] == "0.20" and "50%" in ok and "2.0e-06" in ok
    bad = row(skipped("optimum-ort", "pip install failed"))
    assert bad[2] == "skipped: pip install failed" and len(bad) == len(COLUMNS)


def test_goals_met_and_missed() -> None:
    lines = [line("sdexport", 0.2, e2e_ratio_vs_eager=0.4, overhead_step_ms=summarize([0.3]).to_dict(),
                  rss_ratio_vs_eager=0.5, unet_pct_of_sgemm=0.1),
             line("sdexport", 2.0, model="sd15", e2e_ratio_vs_eager=0.95, rss_ratio_vs_eager=1.2,
                  overhead_step_ms=summarize([1.5]).to_dict(), unet_pct_of_sgemm=0.85)]
    by_name = {g.name: g for g in goals(lines)}
    assert by_name["end-to-end <= 0.5x diffusers eager (tiny presets)"].met is True
    full = by_name["end-to-end <= 0.9x diffusers eager (full-size architectures)"]
    assert full.met is False and "0.95x" in full.detail and "**MISSED**" in full.line()
    assert by_name["runtime overhead per step < 1 ms"].met is False
    assert by_name["peak RSS below diffusers eager"].met is False
    assert by_name["UNet >= 80% of sgemm GFLOP/s (full-size)"].met is True
    assert by_name["UNet >= 80% of sgemm GFLOP/s (tiny presets, overhead-bound)"].met is False


def test_goals_not_measured_without_data() -> None:
    assert all(g.met is None for g in goals([]))


def test_render_markdown_has_tables_and_goals() -> None:
    lines = [line("sdexport", 0.2, e2e_ratio_vs_eager=0.2), line("diffusers-eager", 1.0, e2e_ratio_vs_eager=1.0),
             skipped("diffusers-compile", "torch.compile failed: no compiler")]
    text = render(lines, chart="latency.png")
    assert "![end-to-end latency relative to diffusers eager](latency.png)" in text
    assert "### tiny-sd15" in text and "| sdexport |" in text.replace("| 64x64, 4 steps, batch 1 ", "")
    assert "skipped: torch.compile failed: no compiler" in text
    assert text.index("| sdexport |") < text.index("| diffusers-eager |") < text.index("| diffusers-compile |")
    assert "### Goals" in text and "test cpu" in text


def test_chart_bars_and_png(tmp_path: Path) -> None:
    lines = [line("sdexport", 0.2, e2e_ratio_vs_eager=0.25), line("diffusers-eager", 0.8, e2e_ratio_vs_eager=1.0),
             skipped("optimum-ort", "no venv")]
    [(label, entries)] = bars(lines)
    assert "eager 0.80 s" in label
    assert entries == [("sdexport", 0.25, "0.25x"), ("diffusers-eager", 1.0, "1.00x"), ("optimum-ort", None, "skipped")]
    path = render_png(lines, tmp_path / "c.png", title="t")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    ours = np.all(pixels == COLORS["sdexport"], axis=-1)
    eager = np.all(pixels == COLORS["diffusers-eager"], axis=-1)
    # bar length is proportional to the ratio (legend swatches are 13 px wide; bars are longer)
    ours_len = ours.sum(axis=1).max()
    eager_len = eager.sum(axis=1).max()
    assert eager_len > 100 and abs(ours_len / eager_len - 0.25) < 0.03


def test_latest_keeps_each_suites_newest_run() -> None:
    old = line("sdexport", 1.0, run="old", time="2026-01-01T00:00:00+00:00")
    new = line("sdexport", 0.5, run="new", time="2026-01-02T00:00:00+00:00")
    other = line("sdexport", 3.0, model="sd15", run="old", time="2026-01-01T00:00:00+00:00")
    sg1 = dict(records.make_record("sgemm", "old", ENV, ceiling_gflops=1.0), time="2026-01-01T00:00:00+00:00")
    sg2 = dict(records.make_record("sgemm", "new", ENV, ceiling_gflops=2.0), time="2026-01-03T00:00:00+00:00")
    kept = latest([old, new, other, sg1, sg2])
    assert new in kept and other in kept and old not in kept
    assert [r for r in kept if r["kind"] == "sgemm"] == [sg2]


def test_a_later_run_of_another_batch_keeps_the_suites_other_cases() -> None:
    batch1 = line("sdexport", 1.0, run="b1", time="2026-01-02T00:00:00+00:00")
    batch4 = line("sdexport", 2.0, run="b4", time="2026-01-02T06:00:00+00:00")
    batch4["case"] = {**batch4["case"], "batch": 4}
    again = line("sdexport", 0.9, run="b4-again", time="2026-01-02T12:00:00+00:00")
    again["case"] = {**again["case"], "batch": 4}
    kept = latest([batch1, batch4, again])
    assert batch1 in kept and again in kept and batch4 not in kept  # per case, the newest run
    text = render(kept)
    assert "run b1, " in text and "run b4-again, " in text
    stale = line("sdexport", 1.0, run="stale", time="2025-12-31T00:00:00+00:00")
    stale["case"] = {**stale["case"], "steps": 20}
    assert stale not in latest([stale, batch1, again])  # two days older than the suite's newest run: old code


def test_rebase_uses_the_best_sgemm_ceiling() -> None:
    backends = {"numpy": {"status": "ok", "gflops": 90.0}, "torch": {"status": "skipped", "reason": "absent"}}
    slow = records.make_record("sgemm", "a", ENV, ceiling_gflops=100.0, ceiling_backend="numpy", backends=backends)
    fast = records.make_record("sgemm", "b", ENV, ceiling_gflops=400.0, ceiling_backend="numpy", backends=backends)
    rec = line("sdexport", 1.0, unet_gflops_per_s=300.0, unet_pct_of_sgemm=3.0)
    rebased = rebase([slow, rec, fast])
    assert rebased[1]["metrics"]["unet_pct_of_sgemm"] == pytest.approx(0.75)
    assert rec["metrics"]["unet_pct_of_sgemm"] == 3.0  # the input is not modified
    assert best_sgemm([slow, fast]) is fast and best_sgemm([]) is None
    text = render([slow, rec, fast])
    assert "**400 GFLOP/s**" in text and "75%" in text and "torch (absent)" in text


def test_replace_section_and_publish(tmp_path: Path) -> None:
    assert replace_section("intro", "x") == f"intro\n\n{START}\nx\n{END}\n"
    text = f"a\n{START}\nold\n{END}\nb\n"
    assert replace_section(text, "new") == f"a\n{START}\nnew\n{END}\nb\n"
    history = tmp_path / "h.jsonl"
    records.append(history, [line("sdexport", 0.2, e2e_ratio_vs_eager=0.2), line("diffusers-eager", 1.0)])
    readme = tmp_path / "README.md"
    readme.write_text(f"# Bench\n\n{START}\n{END}\n\nfooter\n")
    publish(history, tmp_path / "latency.md", tmp_path / "latency.png", readme, "python bench.py")
    body = readme.read_text()
    assert body.startswith("# Bench") and body.rstrip().endswith("footer")
    assert "Regenerate with `python bench.py`" in body and "](latency.png)" in body
    assert (tmp_path / "latency.png").exists() and "| sdexport |" in (tmp_path / "latency.md").read_text()


def test_each_machine_keeps_its_own_cases_and_ceiling() -> None:
    amx = {**ENV, "cpu": "cpu b", "cpu_flags": ["avx2", "amx_bf16"]}
    here = line("sdexport", 1.0, run="a", time="2026-01-02T00:00:00+00:00", unet_gflops_per_s=50.0)
    there = line("sdexport", 0.5, run="b", time="2026-01-02T06:00:00+00:00", unet_gflops_per_s=50.0)
    there["env"] = amx
    ceiling_a = dict(records.make_record("sgemm", "a", ENV, ceiling_gflops=100.0, ceiling_backend="numpy",
                                         backends={}), time="2026-01-02T00:00:00+00:00")
    ceiling_b = dict(records.make_record("sgemm", "b", amx, ceiling_gflops=200.0, ceiling_backend="numpy",
                                         backends={}), time="2026-01-02T06:00:00+00:00")
    kept = latest([here, there, ceiling_a, ceiling_b])
    assert here in kept and there in kept  # the same case on another CPU does not replace it
    assert ceiling_a in kept and ceiling_b in kept
    pct = {r["run_id"]: r["metrics"]["unet_pct_of_sgemm"] for r in rebase(kept) if r["kind"] == "latency"}
    assert pct == {"a": pytest.approx(0.5), "b": pytest.approx(0.25)}  # each against its own machine's ceiling
    text = render(kept)
    assert text.index("on **cpu b (avx2, amx_bf16)**") < text.index("on **test cpu (avx2)**")  # newest first
    assert len({label for label, _ in bars(kept)}) == 2


def test_a_run_without_sgemm_reuses_the_ceiling_of_its_own_machine(tmp_path: Path) -> None:
    from harness.session import previous_ceiling

    history = tmp_path / "latency.jsonl"
    assert previous_ceiling(history, ENV) is None  # no history yet
    other = {**ENV, "cpu": "other cpu"}
    records.append(history, [dict(records.make_record("sgemm", "a", ENV, ceiling_gflops=100.0, ceiling_backend="numpy",
                                                      backends={}), time="2026-01-01T00:00:00+00:00"),
                             dict(records.make_record("sgemm", "b", other, ceiling_gflops=400.0,
                                                      ceiling_backend="numpy", backends={}),
                                  time="2026-01-02T00:00:00+00:00")])
    assert previous_ceiling(history, ENV) == 100.0  # not the newer line of another CPU
    assert previous_ceiling(history, {**ENV, "cpu_flags": ["avx2", "amx_bf16"]}) is None
