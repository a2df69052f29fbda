"""A PNG bar chart (Pillow, no matplotlib): each system's end-to-end time relative to diffusers eager, per case."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from harness.report import case_label, machine
from harness.systems import EAGER, SYSTEM_NAMES

COLORS = {"sdexport": (31, 119, 180), "diffusers-eager": (150, 150, 150), "diffusers-compile": (255, 127, 14),
          "optimum-ort": (44, 160, 44), "optimum-openvino": (148, 103, 189),
          "sdexport-openvino": (23, 190, 207), "sdexport-openvino-bf16": (188, 189, 34),
          "diffusers-eager-bf16": (227, 119, 194), "sdexport-openvino-hybrid": (140, 86, 75),
          "sdexport-openvino-hybrid-bf16": (214, 39, 40)}
WIDTH, LEFT, RIGHT, BAR, GAP, TOP = 1100, 330, 60, 14, 12, 70


def bars(lines: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[tuple[str, float | None, str]]]]:
    """Per case (in order): its label and (system, ratio to eager or None, text) for each system."""
    latency = [r for r in lines if r["kind"] == "latency"]
    groups: dict[str, dict[str, Mapping[str, Any]]] = {}
    several = len({machine(r) for r in latency}) > 1
    for r in latency:
        label = f"{r['case']['model']} {case_label(r['case'])}"
        amx = " with AMX" if "amx_bf16" in (r["env"].get("cpu_flags") or []) else ""
        label += f" on {r['env'].get('cpu')}{amx}" if several else ""
        groups.setdefault(label, {})[r["system"]] = r
    out = []
    for label, by_system in groups.items():
        eager = by_system.get(EAGER)
        if eager and eager["status"] == "ok":
            label += f" (eager {eager['metrics']['e2e_s']['median']:.2f} s)"
        entries = []
        for system in SYSTEM_NAMES:
            r = by_system.get(system)
            if r is None:
                continue
            value = r["metrics"].get("e2e_ratio_vs_eager") if r["status"] == "ok" else None
            text = f"{value:.2f}x" if value is not None else ("n/a" if r["status"] == "ok" else r["status"])
            entries.append((system, value, text))
        out.append((label, entries))
    return out


def render_png(lines: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Draw the chart into ``path``; returns it."""
    groups = bars(lines)
    n_bars = sum(len(entries) for _, entries in groups)
    height = TOP + n_bars * BAR + len(groups) * GAP + 40
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    big = ImageFont.load_default(size=15)
    top = max([v for _, entries in groups for _, v, _ in entries if v is not None] + [1.0])
    scale = (WIDTH - LEFT - RIGHT) / (top * 1.1)
    draw.text((10, 8), title or "End-to-end time relative to diffusers eager (lower is faster)", fill="black",
              font=big)
    x = 10
    for system, color in COLORS.items():
        draw.rectangle([x, 34, x + 12, 46], fill=color)
        draw.text((x + 16, 33), system, fill="black", font=font)
        x += 30 + int(draw.textlength(system, font=font))
    y = TOP
    for label, entries in groups:
        draw.text((10, y + (len(entries) * BAR) // 2 - 7), label, fill="black", font=font)
        for system, value, text in entries:
            x0 = LEFT
            if value is not None:
                draw.rectangle([x0, y + 1, x0 + max(1, int(value * scale)), y + BAR - 2], fill=COLORS[system])
                x0 += int(value * scale)
            draw.text((x0 + 4, y), text, fill="black", font=font)
            y += BAR
        y += GAP
    one = LEFT + int(scale)
    draw.line([one, TOP - 6, one, y], fill=(200, 0, 0), width=1)
    draw.text((one - 8, TOP - 20), "1.0", fill=(200, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
