"""Result lines -> a markdown report: environment, sgemm ceiling, one table per suite, and the goals met or missed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from harness.systems import OURS, SYSTEM_NAMES

COLUMNS = ("case", "system", "end-to-end s (IQR)", "x eager", "UNet ms/eval (best)", "text ms", "VAE dec ms",
           "overhead ms/step", "img/s", "peak RSS MiB", "x eager RSS", "first s", "load s", "UNet GFLOP/s",
           "% sgemm", "max abs diff vs eager", "load avg")


def _num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"


def _ms(summary: Mapping[str, Any] | None, digits: int = 1) -> str:
    return _num(summary["median"] * 1e3, digits) if summary else "-"


def case_label(case: Mapping[str, Any]) -> str:
    """``64x64, 4 steps, batch 1``."""
    return f"{case['height']}x{case['width']}, {case['steps']} steps, batch {case['batch']}"


def row(record: Mapping[str, Any]) -> list[str]:
    """One table row of a latency record (a skipped / failed one says why)."""
    label, system = case_label(record["case"]), record["system"]
    if record["status"] != "ok":
        return [label, system, f"{record['status']}: {record['reason']}", *["-"] * (len(COLUMNS) - 3)]
    m = record["metrics"]
    e2e = m["e2e_s"]
    pct = m.get("unet_pct_of_sgemm")
    diff = m.get("max_abs_diff_vs_eager")
    return [
        label, system, f"{e2e['median']:.3f} ({e2e['p25']:.3f}-{e2e['p75']:.3f})", _num(m.get("e2e_ratio_vs_eager")),
        _ms(m.get("unet_step_s")) + (f" ({m['unet_step_s']['min'] * 1e3:.1f})" if m.get("unet_step_s") else ""),
        _ms(m.get("text_encoder_s")), _ms(m.get("vae_decoder_s")),
        _num((m.get("overhead_step_ms") or {}).get("median"), 3) if m.get("overhead_step_ms") else "-",
        _num(m.get("images_per_s")), _num(m.get("peak_rss_mib"), 0), _num(m.get("rss_ratio_vs_eager")),
        _num(m.get("first_s")), _num(m.get("load_s")), _num(m.get("unet_gflops_per_s"), 1),
        f"{pct * 100:.0f}%" if pct is not None else "-", f"{diff:.1e}" if diff is not None else "-",
        "-".join(f"{x:.1f}" for x in m["load_average"]) if m.get("load_average") else "-",
    ]


def table(rows: Iterable[Sequence[str]], header: Sequence[str] = COLUMNS) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _order(record: Mapping[str, Any]) -> tuple:
    c = record["case"]
    return (c["height"], c["batch"], c["steps"], SYSTEM_NAMES.index(record["system"]))


@dataclass(frozen=True)
class Goal:
    """One target of the issue and where this run stands against it."""

    name: str
    met: bool | None
    detail: str

    def line(self) -> str:
        """A markdown bullet: met / MISSED / not measured."""
        verdict = {True: "met", False: "**MISSED**", None: "not measured"}[self.met]
        return f"- {self.name}: {verdict} ({self.detail})"


def _worst(values: list[tuple[float, str]], best_is_low: bool = True) -> tuple[float, str] | None:
    return (max(values) if best_is_low else min(values)) if values else None


def goals(lines: Sequence[Mapping[str, Any]]) -> list[Goal]:
    """The issue's targets, judged on our runtime's worst case in ``lines``."""
    ours = [r for r in lines if r["kind"] == "latency" and r["system"] == OURS and r["status"] == "ok"]

    def collect(metric: str, pick: Any, tiny: bool | None = None) -> list[tuple[float, str]]:
        out = []
        for r in ours:
            if tiny is not None and r["case"]["model"].startswith("tiny-") != tiny:
                continue
            value = pick(r["metrics"].get(metric))
            if value is not None:
                out.append((value, f"{r['case']['model']} {case_label(r['case'])}"))
        return out

    same = lambda v: v  # noqa: E731
    median = lambda v: v["median"] if v else None  # noqa: E731
    out = []
    for name, limit, tiny in (("end-to-end <= 0.5x diffusers eager (tiny presets)", 0.5, True),
                              ("end-to-end <= 0.9x diffusers eager (full-size architectures)", 0.9, False)):
        worst = _worst(collect("e2e_ratio_vs_eager", same, tiny))
        out.append(Goal(name, None if worst is None else worst[0] <= limit,
                        f"worst {worst[0]:.2f}x at {worst[1]}" if worst else "no case with both systems"))
    worst = _worst(collect("overhead_step_ms", median))
    out.append(Goal("runtime overhead per step < 1 ms", None if worst is None else worst[0] < 1.0,
                    f"worst median {worst[0]:.3f} ms at {worst[1]}" if worst else "no case"))
    worst = _worst(collect("rss_ratio_vs_eager", same))
    out.append(Goal("peak RSS below diffusers eager", None if worst is None else worst[0] < 1.0,
                    f"worst {worst[0]:.2f}x at {worst[1]}" if worst else "no case with both systems"))
    for label, tiny in (("full-size", False), ("tiny presets, overhead-bound", True)):
        worst = _worst(collect("unet_pct_of_sgemm", same, tiny), best_is_low=False)
        out.append(Goal(f"UNet >= 80% of sgemm GFLOP/s ({label})", None if worst is None else worst[0] >= 0.8,
                        f"lowest {worst[0] * 100:.0f}% at {worst[1]}" if worst else "no case"))
    return out


def environment_lines(env: Mapping[str, Any]) -> list[str]:
    """A short description of the machine and libraries."""
    versions = ", ".join(f"{k} {v}" for k, v in sorted(env.get("versions", {}).items()))
    gpus = ", ".join(env.get("gpus") or []) or "none"
    return [f"- CPU: {env.get('cpu')} ({env.get('cores')} cores; {', '.join(env.get('cpu_flags') or [])}), "
            f"{env.get('memory_mib')} MiB RAM, GPU: {gpus}",
            f"- {env.get('os')}, Python {env.get('python')}; {versions}"]


def sgemm_lines(record: Mapping[str, Any]) -> list[str]:
    """The sgemm ceiling per backend and which BLAS kernel ran."""
    parts = [f"{name} {r['gflops']:.0f}" if r["status"] == "ok" else f"{name} ({r['reason']})"
             for name, r in record["backends"].items()]
    kernel = ", ".join(f"{b.get('internal_api')} {b.get('version')} {b.get('architecture')} kernel, "
                       f"{b.get('num_threads')} threads" for b in record.get("blas", [])) or "threadpoolctl absent"
    unset = ", ".join(record.get("unset_env") or []) or "none set"
    return [f"- sgemm ceiling: **{record['ceiling_gflops']:.0f} GFLOP/s** ({record['ceiling_backend']}, best "
            f"measurement, run {record['run_id']}); GFLOP/s by backend: {'; '.join(parts)}",
            f"- numpy BLAS: {kernel}; OpenBLAS pins unset: {unset}"]


def machine(line: Mapping[str, Any]) -> str:
    """The CPU a line was measured on, name and instruction-set flags: ceilings and ratios hold per machine."""
    env = line.get("env", {})
    return f"{env.get('cpu')} ({', '.join(env.get('cpu_flags') or [])})"


def machines(lines: Sequence[Mapping[str, Any]]) -> list[str]:
    """The machines ``lines`` were measured on, the one of the newest line first."""
    return list(dict.fromkeys(machine(r) for r in sorted(lines, key=lambda r: r.get("time", ""), reverse=True)))


def best_sgemm(lines: Sequence[Mapping[str, Any]], on: str | None = None) -> Mapping[str, Any] | None:
    """The sgemm line with the highest ceiling (of machine ``on`` if given): other work on the machine only ever
    lowers measured GFLOP/s."""
    measured = [r for r in lines if r["kind"] == "sgemm" and r.get("ceiling_gflops")
                and (on is None or machine(r) == on)]
    return max(measured, key=lambda r: r["ceiling_gflops"]) if measured else None


def rebase(lines: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``lines`` with every UNet's % of sgemm recomputed against the best ceiling measured on its own machine."""
    ceilings = {cpu: best_sgemm(lines, cpu) for cpu in machines([r for r in lines if r["kind"] == "sgemm"])}
    out: list[Mapping[str, Any]] = []
    for r in lines:
        achieved = r.get("metrics", {}).get("unet_gflops_per_s") if r["kind"] == "latency" else None
        best = ceilings.get(machine(r))
        if achieved and best:
            r = {**r, "metrics": {**r["metrics"], "unet_pct_of_sgemm": achieved / best["ceiling_gflops"]}}
        out.append(r)
    return out


def suite_lines(suite: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One suite's section: a table per machine it was measured on (newest machine first), naming the runs."""
    out = [f"### {suite}", ""]
    for cpu in machines(rows):
        part = sorted((r for r in rows if machine(r) == cpu), key=_order)
        first = part[0]
        runs = {r["run_id"]: r["env"].get("load_average") for r in part}
        where = "; ".join(f"run {run}, load average at its start {load}" for run, load in runs.items())
        out += [f"{first['case']['model']} ({first['case']['family']}) on **{cpu}**, scheduler "
                f"{first['case']['scheduler']}, {first['warmups']} warm-up + {first['repeats']} timed runs per "
                f"case (median, interquartile range); {where}", "", table(row(r) for r in part), ""]
    return out


def render(lines: Sequence[Mapping[str, Any]], chart: str | None = None) -> str:
    """The markdown report of ``lines`` (UNet throughput against the best sgemm ceiling of its machine)."""
    lines = rebase(lines)
    latency = [r for r in lines if r["kind"] == "latency"]
    if not latency:
        return "No latency results.\n"
    newest = max(latency, key=lambda r: r.get("time", ""))
    out = ["### Environment (the newest run; each suite names its own CPU)", "", *environment_lines(newest["env"])]
    for cpu in machines(latency):
        best = best_sgemm(lines, cpu)
        out += ([f"- on {cpu}:"] + [f"  {text}" for text in sgemm_lines(best)]) if best else []
    out += ["- fp32; prompt-conditioned with CFG (guidance 7.5); the same initial latents for every system", ""]
    if chart:
        out += [f"![end-to-end latency relative to diffusers eager]({chart})", ""]
    out += ["### Goals (our runtime's worst case)", "", *[g.line() for g in goals(lines)], ""]
    for suite in dict.fromkeys(r["suite"] for r in latency):
        out += suite_lines(suite, [r for r in latency if r["suite"] == suite])
    return "\n".join(out)
