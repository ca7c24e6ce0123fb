"""Dependency-free SVG line charts for the benchmarks (a helper, not a benchmark).

bench/plot.py draws bar charts; this draws series over time, with shaded
intervals and vertical markers::

    from plot_lines import Series, Span, Marker, write_line_svg

    write_line_svg("bench/results/x.svg", "requests/s during a reload", [
        Series("gunicorn-ext", xs, ys, ours=True),
        Series("plain Gunicorn (HUP)", xs2, ys2),
    ], x_label="s", y_label="req/s",
       spans=[Span(4.0, 7.1, "gunicorn-ext")], markers=[Marker(4.0, "reload")])

A span or a marker naming a series takes that series' colour. Series marked
``ours=True`` get the accent colour of bench/plot.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

from plot import format_value, save_svg  # the same number format as the bar charts

__all__ = ["Series", "Span", "Marker", "line_chart_svg", "write_line_svg"]

_OURS = "#d9534f"
_BASE = ["#5b7fa6", "#7aa974", "#e0a458", "#9aa5b1", "#8fb0cf"]
_FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"


@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    ours: bool = False
    #: x positions of events drawn as ticks under the axis (e.g. failed requests).
    events: Sequence[float] = field(default_factory=list)
    events_label: str = ""
    #: Draw as a step line (counts per bucket) rather than straight segments.
    step: bool = False


@dataclass
class Span:
    x0: float
    x1: float
    series: str = ""  # colour of that series; grey if empty or unknown
    label: str = ""


@dataclass
class Marker:
    x: float
    label: str
    series: str = ""


def _nice_step(span: float, ticks: int = 5) -> float:
    if span <= 0:
        return 1.0
    raw = span / ticks
    exp = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * exp >= raw:
            return m * exp
    return 10 * exp


def line_chart_svg(title: str, series: Sequence[Series], *, x_label: str = "", y_label: str = "",
                   spans: Sequence[Span] = (), markers: Sequence[Marker] = (),
                   width: float = 860.0, height: float = 400.0, subtitle: str = "") -> str:
    """The SVG text of one line chart (y axis from 0)."""
    colors: dict[str, str] = {}
    for s in series:
        colors[s.label] = _OURS if s.ours else _BASE[sum(1 for c in colors.values()
                                                         if c != _OURS) % len(_BASE)]
    left, right, top, bottom = 64.0, 20.0, 58.0 if subtitle else 44.0, 78.0
    pw, ph = width - left - right, height - top - bottom
    xs_all = [x for s in series for x in s.xs] + [sp.x1 for sp in spans] + [m.x for m in markers]
    ys_all = [y for s in series for y in s.ys]
    xmin = min(0.0, min(xs_all)) if xs_all else 0.0
    xmax = max(xs_all) if xs_all else 1.0
    if xmax <= xmin:
        xmax = xmin + 1.0
    ystep = _nice_step(max(ys_all) * 1.08 if ys_all and max(ys_all) > 0 else 1.0)
    ymax = ystep * math.ceil((max(ys_all) * 1.08 if ys_all and max(ys_all) > 0 else 1.0) / ystep)

    def X(x: float) -> float:
        return left + pw * (x - xmin) / (xmax - xmin)

    def Y(y: float) -> float:
        return top + ph - ph * max(y, 0.0) / ymax

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}' "
        f"viewBox='0 0 {width:.0f} {height:.0f}'>",
        "<rect width='100%' height='100%' fill='white'/>",
        f"<text x='{width / 2:.1f}' y='20' text-anchor='middle' {_FONT} font-size='15' "
        f"font-weight='bold'>{escape(title)}</text>",
    ]
    if subtitle:
        out.append(f"<text x='{width / 2:.1f}' y='38' text-anchor='middle' {_FONT} font-size='11' "
                   f"fill='#555'>{escape(subtitle)}</text>")
    # Shaded intervals first, under everything.
    for sp in spans:
        c = colors.get(sp.series, "#9aa5b1")
        x0, x1 = X(sp.x0), X(sp.x1)
        out.append(f"<rect x='{x0:.1f}' y='{top:.1f}' width='{max(x1 - x0, 1.0):.1f}' "
                   f"height='{ph:.1f}' fill='{c}' fill-opacity='0.10'><title>"
                   f"{escape(sp.label)}</title></rect>")
    # Grid and axes.
    y = 0.0
    while y <= ymax + 1e-9:
        py = Y(y)
        out.append(f"<line x1='{left:.1f}' y1='{py:.1f}' x2='{left + pw:.1f}' y2='{py:.1f}' "
                   f"stroke='#e6e6e6'/>")
        out.append(f"<text x='{left - 6:.1f}' y='{py + 4:.1f}' text-anchor='end' {_FONT} "
                   f"font-size='10' fill='#555'>{format_value(y)}</text>")
        y += ystep
    xstep = _nice_step(xmax - xmin, 10)
    x = math.ceil(xmin / xstep) * xstep
    while x <= xmax + 1e-9:
        px = X(x)
        out.append(f"<line x1='{px:.1f}' y1='{top + ph:.1f}' x2='{px:.1f}' y2='{top + ph + 4:.1f}' "
                   f"stroke='#333'/>")
        out.append(f"<text x='{px:.1f}' y='{top + ph + 16:.1f}' text-anchor='middle' {_FONT} "
                   f"font-size='10' fill='#555'>{format_value(x)}</text>")
        x += xstep
    out.append(f"<line x1='{left:.1f}' y1='{top + ph:.1f}' x2='{left + pw:.1f}' y2='{top + ph:.1f}' "
               f"stroke='#333'/>")
    out.append(f"<line x1='{left:.1f}' y1='{top:.1f}' x2='{left:.1f}' y2='{top + ph:.1f}' "
               f"stroke='#333'/>")
    if x_label:
        out.append(f"<text x='{left + pw / 2:.1f}' y='{top + ph + 32:.1f}' text-anchor='middle' "
                   f"{_FONT} font-size='11' fill='#333'>{escape(x_label)}</text>")
    if y_label:
        out.append(f"<text x='14' y='{top + ph / 2:.1f}' text-anchor='middle' {_FONT} "
                   f"font-size='11' fill='#333' transform='rotate(-90 14 {top + ph / 2:.1f})'>"
                   f"{escape(y_label)}</text>")
    # Vertical markers.
    # Labels of markers close together go on successive lines.
    placed: list[float] = []
    for m in sorted(markers, key=lambda m: m.x):
        c = colors.get(m.series, "#333")
        px = X(m.x)
        row = sum(1 for q in placed if px - q < 6.0 * len(m.label) + 8)
        placed.append(px)
        out.append(f"<line x1='{px:.1f}' y1='{top:.1f}' x2='{px:.1f}' y2='{top + ph:.1f}' "
                   f"stroke='{c}' stroke-dasharray='4 3'/>")
        out.append(f"<text x='{px + 4:.1f}' y='{top + 12 + 13 * row:.1f}' {_FONT} font-size='10' "
                   f"fill='{c}'>{escape(m.label)}</text>")
    # Series.
    for s in series:
        c = colors[s.label]
        pts: list[str] = []
        prev_y: float | None = None
        for xv, yv in zip(s.xs, s.ys, strict=False):
            if s.step and prev_y is not None:
                pts.append(f"{X(xv):.1f},{Y(prev_y):.1f}")
            pts.append(f"{X(xv):.1f},{Y(yv):.1f}")
            prev_y = yv
        if pts:
            out.append(f"<polyline points='{' '.join(pts)}' fill='none' stroke='{c}' "
                       f"stroke-width='{2.0 if s.ours else 1.6}' stroke-linejoin='round'>"
                       f"<title>{escape(s.label)}</title></polyline>")
        for ev in s.events:
            px = X(ev)
            out.append(f"<line x1='{px:.1f}' y1='{top + ph - 8:.1f}' x2='{px:.1f}' "
                       f"y2='{top + ph:.1f}' stroke='{c}' stroke-width='2'/>")
    # Legend under the axis.
    lx, ly = left, height - 14
    for s in series:
        c = colors[s.label]
        text = s.label + (f" ({len(s.events)} {s.events_label})" if s.events_label else "")
        out.append(f"<line x1='{lx:.1f}' y1='{ly - 4:.1f}' x2='{lx + 22:.1f}' y2='{ly - 4:.1f}' "
                   f"stroke='{c}' stroke-width='3'/>")
        out.append(f"<text x='{lx + 27:.1f}' y='{ly:.1f}' {_FONT} font-size='11'>"
                   f"{escape(text)}</text>")
        lx += 40 + 6.2 * len(text)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_line_svg(path: str | os.PathLike[str], title: str, series: Sequence[Series],
                   **kw: object) -> str:
    """Write the chart to ``path`` (directories created); return the path."""
    return save_svg(path, line_chart_svg(title, series, **kw))  # type: ignore[arg-type]


if __name__ == "__main__":  # `make bench` runs bench/*.py; this one is a helper
    print("bench/plot_lines.py: SVG line-chart helper, nothing to run")
