"""Throughput and failure rate as inline SVG: no script, no CDN, works offline."""

from __future__ import annotations

import datetime as dt
from typing import Any

from markupsafe import Markup, escape

__all__ = ["render_chart"]

WIDTH, HEIGHT = 760, 200
LEFT, RIGHT, TOP, BOTTOM = 48, 44, 12, 28


def _nice_max(value: int) -> int:
    if value <= 5:
        return 5
    magnitude = 10 ** (len(str(value)) - 1)
    for step in (1, 2, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return value


def render_chart(series: dict[str, Any]) -> Markup:
    """Stacked bars (accepted, failed recipients per bucket) and a failure-rate line."""
    buckets = series["buckets"]
    n = max(1, len(buckets))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    peak = _nice_max(max((b["sent"] + b["failed"] for b in buckets), default=0))
    slot = plot_w / n
    bar_w = max(1.0, slot * 0.8)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'class="chart" role="img" aria-label="recipients accepted and failed over time">',
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" '
        'class="axis"/>',
        f'<text x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end" class="tick">{peak}</text>',
        f'<text x="{LEFT - 6}" y="{TOP + plot_h}" text-anchor="end" class="tick">0</text>',
        f'<text x="{LEFT + plot_w + 6}" y="{TOP + 4}" class="tick">100%</text>',
        f'<text x="{LEFT + plot_w + 6}" y="{TOP + plot_h}" class="tick">0%</text>',
    ]
    points = []
    label_every = max(1, n // 6)
    for i, b in enumerate(buckets):
        x = LEFT + i * slot + (slot - bar_w) / 2
        sent_h = plot_h * b["sent"] / peak
        failed_h = plot_h * b["failed"] / peak
        when = dt.datetime.fromisoformat(b["t"])
        title = escape(
            f"{when:%Y-%m-%d %H:%M} UTC: {b['sent']} accepted, {b['failed']} failed "
            f"({b['failure_rate'] * 100:.1f}% failed)"
        )
        parts.append(
            f"<g><title>{title}</title>"
            f'<rect class="sent" x="{x:.1f}" y="{TOP + plot_h - sent_h:.1f}" '
            f'width="{bar_w:.1f}" height="{sent_h:.1f}"/>'
            f'<rect class="failed" x="{x:.1f}" y="{TOP + plot_h - sent_h - failed_h:.1f}" '
            f'width="{bar_w:.1f}" height="{failed_h:.1f}"/></g>'
        )
        cx = LEFT + i * slot + slot / 2
        points.append(f"{cx:.1f},{TOP + plot_h - plot_h * b['failure_rate']:.1f}")
        if i % label_every == 0:
            fmt = "%H:%M" if series["bucket_s"] < 86400 else "%m-%d"
            parts.append(
                f'<text x="{cx:.1f}" y="{HEIGHT - 8}" text-anchor="middle" class="tick">'
                f"{when.strftime(fmt)}</text>"
            )
    if points:
        parts.append(f'<polyline class="rate" points="{" ".join(points)}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))
