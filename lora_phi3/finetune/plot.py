"""Training curves as an SVG file: :func:`write_training_plot` draws loss (and accuracy) vs step.

Why SVG rather than matplotlib: the runtime dependencies are fixed to torch, safetensors,
transformers and numpy, and matplotlib would add ~40 MB plus pillow, fonttools, kiwisolver and more
to every install of a library that draws one chart per run. SVG is a W3C standard (plain UTF-8 XML)
that any browser shows, and the standard library alone can write it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from xml.sax.saxutils import escape

from ..atomic import write_bytes_atomic

logger = logging.getLogger(__name__)

__all__ = ["write_training_plot", "nice_ticks", "Panel", "WIDTH", "MARGIN", "PANEL_HEIGHTS"]

WIDTH = 760  # px, the whole image
MARGIN = {"left": 72, "right": 24, "top": 44, "bottom": 48}  # px around each panel's plot area
PANEL_HEIGHTS = {"loss": 340, "accuracy": 230}  # px per panel, margins included
TRAIN, EVAL, ACCURACY = "#1f77b4", "#d62728", "#2ca02c"  # series colours

Point = tuple[float, float]


def _num(value: object) -> float | None:
    """``value`` as a float if it is a finite number; None for None, NaN, inf, bools, text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _series(records: list[dict], kind: str, key: str) -> list[Point]:
    """(step, value) of the ``kind`` records with a finite ``key`` and step, sorted by step."""
    points = []
    for record in records:
        if record.get("type") == kind:
            x, y = _num(record.get("step")), _num(record.get(key))
            if x is not None and y is not None:
                points.append((x, y))
    return sorted(points, key=lambda p: p[0])


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About ``n`` round ticks (1, 2, 2.5 or 5 times a power of ten) from <= ``lo`` to >= ``hi``.

    An empty range (``lo == hi``) is widened around its value first, so the result always has at
    least two distinct ticks. ``integer`` keeps the spacing a whole number (for steps).
    """
    if hi - lo <= 1e-9 * max(1.0, abs(lo), abs(hi)):
        pad = 1.0 if integer else max(abs(lo) * 0.05, 1e-3)
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    factors = (1, 2, 5, 10) if integer and mag < 10 else (1, 2, 2.5, 5, 10)
    step = next(f * mag for f in factors if f * mag >= raw * (1 - 1e-9))
    step = max(step, 1.0) if integer else step
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, max(last, first + 1) + 1)]


@dataclass(frozen=True)
class Panel:
    """A plot area ``width`` x ``height`` px with its top-left corner at (``left``, ``top``),
    showing steps ``x0..x1`` left to right and values ``y0..y1`` bottom to top."""

    left: float
    top: float
    width: float
    height: float
    x0: float
    x1: float
    y0: float
    y1: float

    def px(self, x: float, y: float) -> Point:
        """The pixel position of the data point (``x``, ``y``)."""
        return (self.left + (x - self.x0) / (self.x1 - self.x0) * self.width,
                self.top + (self.y1 - y) / (self.y1 - self.y0) * self.height)


def _text(x: float, y: float, text: str, **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}"{extra}>{escape(text)}</text>'


def _draw_panel(panel: Panel, title: str, ylabel: str, xticks: list[float],
                yticks: list[float], ylabels: list[str],
                series: list[tuple[str, str, list[Point], bool]]) -> list[str]:
    """SVG elements of one panel: frame, grid, ticks, labels, title, legend and the series
    (label, colour, points, markers)."""
    p, right, bottom = panel, panel.left + panel.width, panel.top + panel.height
    out = [f'<rect class="plot-area" x="{p.left}" y="{p.top}" width="{p.width}" '
           f'height="{p.height}" fill="white" stroke="#888"/>']
    for value, label in zip(yticks, ylabels):
        y = p.px(p.x0, value)[1]
        out.append(f'<line x1="{p.left}" y1="{y:.2f}" x2="{right}" y2="{y:.2f}" stroke="#e5e5e5"/>')
        out.append(_text(p.left - 6, y + 4, label, text_anchor="end"))
    for value in xticks:
        x = p.px(value, p.y0)[0]
        out.append(f'<line x1="{x:.2f}" y1="{bottom}" x2="{x:.2f}" y2="{bottom + 5}" stroke="gray"/>')
        out.append(_text(x, bottom + 18, f"{value:.0f}", text_anchor="middle"))
    out.append(_text(p.left + p.width / 2, bottom + 38, "optimizer step", text_anchor="middle"))
    cy = p.top + p.height / 2
    out.append(_text(18, cy, ylabel, text_anchor="middle", transform=f"rotate(-90 18 {cy:.1f})"))
    out.append(_text(p.left, p.top - 16, title, font_size="15", font_weight="bold"))
    x = right
    for label, color, _, markers in reversed(series):  # legend, right-aligned above the plot
        x -= 7 * len(label) + 40
        y = p.top - 20
        out.append(f'<line x1="{x}" y1="{y}" x2="{x + 22}" y2="{y}" stroke="{color}" '
                   f'stroke-width="2"/>')
        if markers:
            out.append(f'<circle cx="{x + 11}" cy="{y}" r="3" fill="{color}"/>')
        out.append(_text(x + 28, y + 4, label))
    for label, color, points, markers in series:
        cls = label.replace(" ", "-")
        coords = [p.px(px, py) for px, py in points]
        out.append(f'<polyline class="{cls}" fill="none" stroke="{color}" stroke-width="2" '
                   f'points="{" ".join(f"{a:.2f},{b:.2f}" for a, b in coords)}"/>')
        if markers or len(points) == 1:  # a one-point line draws nothing: mark it
            out += [f'<circle class="{cls}" cx="{a:.2f}" cy="{b:.2f}" r="3.5" fill="{color}"/>'
                    for a, b in coords]
    return out


def write_training_plot(records: list[dict], path: str | os.PathLike, *,
                        title: str = "Fine-tuning loss") -> bool:
    """Write an SVG of train/eval loss vs step (and eval exact-match accuracy, when measured).

    ``records`` are ``metrics.jsonl`` records; values that are missing, None, NaN or infinite
    are skipped. Returns True when ``path`` was written (atomically), False when there was
    nothing finite to draw (then nothing is written).
    """
    train = _series(records, "train", "loss")
    evals = _series(records, "eval", "eval_loss")
    accuracy = _series(records, "eval", "eval_accuracy")
    if not (train or evals or accuracy):
        logger.debug("no finite loss or accuracy in %d records: no plot written", len(records))
        return False
    steps = [x for x, _ in train + evals + accuracy]
    x0, x1 = min(steps), max(steps)
    x1 = x1 if x1 > x0 else x0 + 1
    xticks = [t for t in nice_ticks(x0, x1, integer=True) if x0 - 1e-9 <= t <= x1 + 1e-9]
    losses = [y for _, y in train + evals] or [0.0, 1.0]
    yticks = nice_ticks(min(losses), max(losses))
    width = WIDTH - MARGIN["left"] - MARGIN["right"]
    panel_h = {k: h - MARGIN["top"] - MARGIN["bottom"] for k, h in PANEL_HEIGHTS.items()}
    loss = Panel(MARGIN["left"], MARGIN["top"], width, panel_h["loss"], x0, x1,
                 yticks[0], yticks[-1])
    series = [s for s in (("train loss", TRAIN, train, False), ("eval loss", EVAL, evals, True))
              if s[2]]
    body = _draw_panel(loss, title, "cross-entropy (nats / label token)", xticks, yticks,
                       [f"{t:g}" for t in yticks], series)
    height = PANEL_HEIGHTS["loss"]
    if accuracy:
        acc = Panel(MARGIN["left"], height + MARGIN["top"], width, panel_h["accuracy"], x0, x1,
                    0.0, 1.0)
        ticks = [0.0, 0.25, 0.5, 0.75, 1.0]
        body += _draw_panel(acc, "Eval exact-match accuracy", "exact match", xticks, ticks,
                            [f"{t * 100:g}%" for t in ticks],
                            [("eval accuracy", ACCURACY, accuracy, True)])
        height += PANEL_HEIGHTS["accuracy"]
    svg = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
           f"<title>{escape(title)}</title>",
           f'<rect width="{WIDTH}" height="{height}" fill="white"/>', *body, "</svg>", ""]
    write_bytes_atomic(path, "\n".join(svg).encode("utf-8"))
    logger.debug("wrote training plot %s", path)
    return True
