"""The console's charts: messages per second as inline SVG, drawn on the server (no script,
no library). Numbers and fate names are the only values drawn."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

__all__ = ["chart", "sparkline"]

_e = html.escape


_COLOURS = {"handled": "#2f855a", "retried": "#b7791f", "parked": "#c53030", "settled": "#2b6cb0"}


def chart(series: Mapping[str, Sequence[float]], *, minutes: int, width: int = 640, height: int = 160) -> str:
    """Lines of messages per second, oldest left, drawn as inline SVG (no script, no library)."""
    pad_left, pad_bottom, pad_top = 44, 18, 8
    plot_w, plot_h = width - pad_left - 8, height - pad_bottom - pad_top
    top = max((max(values) for values in series.values() if values), default=0.0)
    scale = _nice(top)
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>messages per second, last {minutes} min</title>',
        f'<line x1="{pad_left}" y1="{pad_top}" x2="{pad_left}" y2="{pad_top + plot_h}" stroke="#999"/>',
        f'<line x1="{pad_left}" y1="{pad_top + plot_h}" x2="{pad_left + plot_w}" y2="{pad_top + plot_h}" '
        'stroke="#999"/>',
        f'<text x="{pad_left - 4}" y="{pad_top + 10}" text-anchor="end" font-size="11">'
        f"{_num(scale)}/s</text>",
        f'<text x="{pad_left - 4}" y="{pad_top + plot_h}" text-anchor="end" font-size="11">0</text>',
        f'<text x="{pad_left}" y="{height - 4}" font-size="11">−{minutes} min</text>',
        f'<text x="{pad_left + plot_w}" y="{height - 4}" text-anchor="end" font-size="11">now</text>',
    ]
    for fate, values in series.items():
        if not values:
            continue
        n = len(values)
        points = " ".join(
            f"{pad_left + (plot_w * i / max(1, n - 1)):.1f},{pad_top + plot_h - plot_h * v / scale:.1f}"
            for i, v in enumerate(values)
        )
        colour = _COLOURS.get(fate, "#555")
        parts.append(
            f'<polyline class="line {_e(fate)}" fill="none" stroke="{colour}" stroke-width="2" '
            f'points="{points}"/>'
        )
    if not series:
        parts.append(
            f'<text x="{pad_left + plot_w / 2}" y="{pad_top + plot_h / 2}" text-anchor="middle" '
            'font-size="12" fill="#777">no messages yet</text>'
        )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><span class="swatch {_e(f)}"></span>{_e(f)} '
        f"{_num(values[-1] if values else 0)}/s now, {_num(sum(values) / max(1, len(values)))}/s avg</span>"
        for f, values in series.items()
    )
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def sparkline(values: Sequence[float], width: int = 120, height: int = 24) -> str:
    if not values or not any(values):
        return '<span class="muted">idle</span>'
    top, n = max(values), len(values)
    points = " ".join(
        f"{width * i / max(1, n - 1):.1f},{height - 2 - (height - 4) * v / top:.1f}"
        for i, v in enumerate(values)
    )
    return (
        f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg"><polyline fill="none" stroke="#2b6cb0" stroke-width="1.5" '
        f'points="{points}"/></svg> <span class="muted">{_num(values[-1])}/s</span>'
    )


def _nice(top: float) -> float:
    """The chart's ceiling: 1, 2 or 5 times a power of ten, at least `top`."""
    if top <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(top))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= top)


def _num(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
