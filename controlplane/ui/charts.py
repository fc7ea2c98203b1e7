"""Charts drawn on the server as inline SVG: no chart library, no script.

Each function returns :class:`markupsafe.Markup`; every piece of text it
embeds goes through :func:`markupsafe.escape` first. Shapes are sized with
SVG attributes (``width``, ``points``), never inline ``style``, which the
console's Content-Security-Policy forbids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT = 480, 120
_PAD_LEFT, _PAD_BOTTOM, _PAD_TOP = 56, 18, 8
#: a line chart draws at most this many points (the rest are averaged into them)
MAX_POINTS = 240


def _downsample(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return list(points)
    step = len(points) / MAX_POINTS
    out = []
    for i in range(MAX_POINTS):
        chunk = points[int(i * step):max(int((i + 1) * step), int(i * step) + 1)]
        out.append((sum(p[0] for p in chunk) / len(chunk), sum(p[1] for p in chunk) / len(chunk)))
    return out


def _label(value: float) -> str:
    # Never scientific notation: "3,050" reads better than "3.05e+03" on an axis.
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def line_chart(title: str, unit: str, points: Sequence[tuple[float, float]]) -> Markup:
    """``points`` (Unix time, value), oldest first, as a line over time; a note when empty."""
    name = escape(title)
    if not points:
        return Markup('<figure class="chart"><figcaption>{}</figcaption>'
                      '<p class="muted">no data in this window</p></figure>').format(name)
    pts = _downsample(points)
    t0, t1 = pts[0][0], pts[-1][0]
    low = min(0.0, min(v for _, v in pts))
    high = max(v for _, v in pts)
    high = high if high > low else low + 1.0
    inner_w, inner_h = WIDTH - _PAD_LEFT - 4, HEIGHT - _PAD_BOTTOM - _PAD_TOP

    def xy(t: float, v: float) -> str:
        x = _PAD_LEFT + (inner_w * (t - t0) / (t1 - t0) if t1 > t0 else inner_w)
        y = _PAD_TOP + inner_h * (1 - (v - low) / (high - low))
        return f"{x:.1f},{y:.1f}"

    polyline = " ".join(xy(t, v) for t, v in pts)
    last = pts[-1][1]
    summary = f"{title}: latest {_label(last)} {unit}, range {_label(low)} to {_label(high)}"
    return Markup(
        '<figure class="chart"><figcaption>{name} <span class="muted">({unit}, latest {last})'
        '</span></figcaption><svg viewBox="0 0 {w} {h}" role="img" aria-label="{summary}">'
        '<line class="axis" x1="{pl}" y1="{pt}" x2="{pl}" y2="{base}"/>'
        '<line class="axis" x1="{pl}" y1="{base}" x2="{w}" y2="{base}"/>'
        '<text class="tick" x="{tx}" y="{ty_hi}" text-anchor="end">{hi}</text>'
        '<text class="tick" x="{tx}" y="{base}" text-anchor="end">{lo}</text>'
        '<polyline class="series" points="{polyline}"/></svg></figure>'
    ).format(
        name=name, unit=escape(unit), last=_label(last), w=WIDTH, h=HEIGHT, summary=summary,
        pl=_PAD_LEFT, pt=_PAD_TOP, base=HEIGHT - _PAD_BOTTOM, tx=_PAD_LEFT - 4,
        ty_hi=_PAD_TOP + 8, hi=_label(high), lo=_label(low), polyline=polyline,
    )


@dataclass(frozen=True)
class GateBar:
    """One gate's measured value against its threshold, as the engine recorded it."""

    gate: str
    verdict: str
    measured: float | None
    threshold: float | None
    tier: str | None
    note: str


def gate_chart(gate: GateBar) -> Markup:
    """A bar for the measured value with a mark at the threshold, coloured by verdict."""
    measured, threshold = gate.measured, gate.threshold
    scale = max(abs(measured or 0.0), abs(threshold or 0.0)) * 1.25 or 1.0
    width = 240

    def x(v: float) -> float:
        return max(0.0, min(width, width * v / scale))

    bar = x(measured) if measured is not None else 0.0
    mark = (Markup('<line class="threshold" x1="{x}" y1="0" x2="{x}" y2="20"/>').format(
        x=f"{x(threshold):.1f}") if threshold is not None else Markup(""))
    label = (f"{gate.gate}: measured {_label(measured) if measured is not None else 'n/a'}, "
             f"threshold {_label(threshold) if threshold is not None else 'n/a'}, {gate.verdict}")
    return Markup(
        '<svg class="gate gate-{verdict}" viewBox="0 0 {w} 20" width="{w}" height="20" '
        'role="img" aria-label="{label}"><rect class="track" x="0" y="4" width="{w}" height="12"/>'
        '<rect class="bar" x="0" y="4" width="{bar}" height="12"/>{mark}</svg>'
    ).format(verdict=escape(gate.verdict), w=width, label=label, bar=f"{bar:.1f}", mark=mark)


def progress_bar(done: int, total: int, label: str) -> Markup:
    """``done`` of ``total`` as a bar with its percentage in words beside it."""
    pct = 100.0 * done / total if total else 0.0
    return Markup(
        '<span class="progress"><svg viewBox="0 0 100 10" width="160" height="12" role="img" '
        'aria-label="{label}: {done} of {total}"><rect class="track" x="0" y="0" width="100" '
        'height="10"/><rect class="bar" x="0" y="0" width="{pct}" height="10"/></svg> '
        '<span class="pct">{whole} %</span></span>'
    ).format(label=label, done=done, total=total, pct=f"{pct:.1f}", whole=f"{pct:.0f}")
