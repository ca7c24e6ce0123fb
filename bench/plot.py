"""Dependency-free SVG bar charts for the benchmarks (a helper, not a benchmark).

Each chart is a row of panels; a panel has its own title, unit and scale, and
holds groups of labelled bars::

    from plot import Bar, Panel, write_svg

    write_svg("bench/results/x.svg", "IPC", [
        Panel("round trip p50", "us", [
            ("p50", [Bar("gunicorn-ext", 41.0, ours=True), Bar("socketpair floor", 33.0)]),
        ]),
    ])

A value of ``None`` draws an empty slot labelled "n/a" (a baseline that could
not be measured). Bars marked ``ours=True`` get the accent colour.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

__all__ = ["Bar", "Panel", "bar_chart_svg", "write_svg", "format_value"]

_OURS = "#d9534f"
_BASE = ["#5b7fa6", "#8fb0cf", "#9aa5b1", "#e0a458", "#7aa974", "#c3ccd5"]
_FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"


@dataclass
class Bar:
    label: str
    value: float | None
    ours: bool = False


@dataclass
class Panel:
    title: str
    unit: str
    groups: Sequence[tuple[str, Sequence[Bar]]] = field(default_factory=list)


def format_value(v: float | None) -> str:
    """Short human form: 41.2, 1.23k, 215k, 1.5M; "n/a" for None."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.0f}k"
    if a >= 1e3:
        return f"{v / 1e3:.3g}k"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * exp >= v:
            return m * exp
    return 10 * exp


def _panel_svg(p: Panel, x0: float, width: float, height: float,
               colors: dict[str, str]) -> list[str]:
    out: list[str] = []
    top, bottom, left = 40.0, 70.0, 52.0
    plot_w = width - left - 12
    plot_h = height - top - bottom
    values = [b.value for _, bars in p.groups for b in bars if b.value is not None]
    vmax = _nice_max(max(values) * 1.1 if values else 1.0)
    out.append(f"<text x='{x0 + width / 2:.1f}' y='20' text-anchor='middle' {_FONT} "
               f"font-size='14' font-weight='bold'>{escape(p.title)}</text>")
    out.append(f"<text x='{x0 + 6:.1f}' y='{top - 8:.1f}' {_FONT} font-size='11' "
               f"fill='#555'>{escape(p.unit)}</text>")
    # Axis and grid lines.
    for i in range(5):
        v = vmax * i / 4
        y = top + plot_h - plot_h * i / 4
        out.append(f"<line x1='{x0 + left:.1f}' y1='{y:.1f}' x2='{x0 + left + plot_w:.1f}' "
                   f"y2='{y:.1f}' stroke='#e3e3e3'/>")
        out.append(f"<text x='{x0 + left - 5:.1f}' y='{y + 4:.1f}' text-anchor='end' {_FONT} "
                   f"font-size='10' fill='#555'>{format_value(v)}</text>")
    out.append(f"<line x1='{x0 + left:.1f}' y1='{top + plot_h:.1f}' x2='{x0 + left + plot_w:.1f}' "
               f"y2='{top + plot_h:.1f}' stroke='#333'/>")
    ngroups = max(len(p.groups), 1)
    gw = plot_w / ngroups
    for gi, (glabel, bars) in enumerate(p.groups):
        gx = x0 + left + gi * gw
        nb = max(len(bars), 1)
        bw = min(gw * 0.8 / nb, 60.0)
        start = gx + (gw - bw * nb) / 2
        for bi, bar in enumerate(bars):
            bx = start + bi * bw
            color = _OURS if bar.ours else colors[bar.label]
            cx = bx + bw / 2
            if bar.value is not None:
                h = plot_h * max(bar.value, 0.0) / vmax
                y = top + plot_h - h
                out.append(f"<rect x='{bx + 2:.1f}' y='{y:.1f}' width='{bw - 4:.1f}' "
                           f"height='{h:.1f}' fill='{color}'><title>{escape(bar.label)}: "
                           f"{bar.value:g} {escape(p.unit)}</title></rect>")
                ty = y - 4
            else:
                ty = top + plot_h - 4
            out.append(f"<text x='{cx:.1f}' y='{ty:.1f}' text-anchor='middle' {_FONT} "
                       f"font-size='10'>{format_value(bar.value)}</text>")
            # Bar label, rotated under the axis.
            ly = top + plot_h + 10
            out.append(f"<text x='{cx:.1f}' y='{ly:.1f}' text-anchor='end' {_FONT} font-size='10' "
                       f"transform='rotate(-35 {cx:.1f} {ly:.1f})'>{escape(bar.label)}</text>")
        if glabel:
            out.append(f"<text x='{gx + gw / 2:.1f}' y='{height - 6:.1f}' text-anchor='middle' "
                       f"{_FONT} font-size='11' font-weight='bold'>{escape(glabel)}</text>")
    return out


def bar_chart_svg(title: str, panels: Sequence[Panel], panel_width: float = 320.0,
                  height: float = 320.0) -> str:
    """The SVG text of a row of bar-chart panels under a title."""
    title_h = 28.0
    width = panel_width * max(len(panels), 1)
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' "
        f"height='{height + title_h:.0f}' viewBox='0 0 {width:.0f} {height + title_h:.0f}'>",
        "<rect width='100%' height='100%' fill='white'/>",
        f"<text x='{width / 2:.1f}' y='19' text-anchor='middle' {_FONT} font-size='15' "
        f"font-weight='bold'>{escape(title)}</text>",
        f"<g transform='translate(0 {title_h:.0f})'>",
    ]
    # A baseline keeps its colour in every panel.
    colors: dict[str, str] = {}
    for p in panels:
        for _, bars in p.groups:
            for bar in bars:
                if not bar.ours and bar.label not in colors:
                    colors[bar.label] = _BASE[len(colors) % len(_BASE)]
    for i, p in enumerate(panels):
        parts.extend(_panel_svg(p, i * panel_width, panel_width, height, colors))
    parts.append("</g></svg>")
    return "\n".join(parts) + "\n"


def write_svg(path: str | os.PathLike[str], title: str, panels: Sequence[Panel],
              **kw: float) -> str:
    """Write the chart to ``path`` (directories created); return the path."""
    return save_svg(path, bar_chart_svg(title, panels, **kw))


def save_svg(path: str | os.PathLike[str], svg: str) -> str:
    """Write ``svg`` to ``path`` atomically (directories created); return the path."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(svg)
    os.replace(tmp, path)
    return os.fspath(path)
