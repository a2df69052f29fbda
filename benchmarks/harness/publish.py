"""Publishing results: the latest line per suite, system and case from a JSON lines history, rendered into the
markdown report, the PNG chart and the marked section of a README."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from harness import records
from harness.chart import render_png
from harness.report import best_sgemm, machine, machines, render

START, END = "<!-- bench:latest:start -->", "<!-- bench:latest:end -->"
FRESH = timedelta(days=1)
"""How far a case's newest run may lag its suite's newest run and still be shown."""


def _case(line: Mapping[str, Any]) -> tuple[Any, ...]:
    case = line.get("case", {})
    return line["suite"], case.get("height"), case.get("width"), case.get("steps"), case.get("batch"), machine(line)


def latest(lines: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Of each suite's case (size, steps, batch) on each machine, only its most recent run's lines (a later run of
    that case there replaces it whole, so ratios always compare systems measured side by side), for the cases
    measured within ``FRESH`` of the suite's newest run (older ones were measured by older code); plus each kept
    machine's best sgemm line and the flops lines of kept runs."""
    newest_run: dict[tuple[Any, ...], tuple[datetime, str]] = {}
    suite_newest: dict[str, datetime] = {}
    for line in lines:
        if line["kind"] == "latency":
            key, time = _case(line), datetime.fromisoformat(line["time"])
            if key not in newest_run or time > newest_run[key][0]:
                newest_run[key] = (time, line["run_id"])
            suite_newest[key[0]] = max(time, suite_newest.get(key[0], time))
    keep = {(key, run) for key, (time, run) in newest_run.items() if suite_newest[key[0]] - time <= FRESH}
    runs = {(key[0], run) for key, run in keep}
    out = [line for line in lines if (line["kind"] == "latency" and (_case(line), line["run_id"]) in keep)
           or (line["kind"] == "flops" and (line.get("suite"), line["run_id"]) in runs)]
    ceilings = [best_sgemm(lines, cpu) for cpu in machines(out)]
    return [best for best in ceilings if best] + out


def replace_section(text: str, body: str) -> str:
    """``text`` with the part between the bench markers replaced by ``body`` (appended when there are none)."""
    block = f"{START}\n{body.strip()}\n{END}"
    if START in text and END in text:
        return re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    return text.rstrip() + "\n\n" + block + "\n"


def publish(history: Path, markdown: Path, chart: Path, readme: Path | None = None,
            command: str = "") -> str:
    """Render the latest results of ``history`` into ``markdown`` and ``chart`` (and ``readme``'s section)."""
    lines = latest(records.read(history))
    render_png(lines, chart)
    text = render(lines, chart.name)
    markdown.write_text(f"# Latest benchmark results\n\n{text}\n")
    if readme is not None:
        relative = chart.relative_to(readme.parent) if chart.is_relative_to(readme.parent) else chart
        note = (f"Regenerate with `{command}` (without flags: the tiny suites only; a suite not run keeps its "
                "latest results).\n\n" if command else "")
        body = note + render(lines, str(relative))
        readme.write_text(replace_section(readme.read_text() if readme.exists() else "", body))
    return text
