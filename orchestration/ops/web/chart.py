"""The overview's throughput chart: the last hour in bins, drawn as SVG on the server.

:func:`hourly_throughput` asks :func:`orchestration.ops.status.throughput` for the
tasks that came to rest in the last 5, 10, ... 60 minutes; the difference of two
windows is one bin. :func:`bar_chart` turns the bins into rectangles a template draws
(``templates/_chart.html``): no script, no chart library, every label escaped.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from orchestration.ops.status import throughput
from orchestration.store.db import Database

BIN_MIN = 5
HOUR_MIN = 60
WIDTH, HEIGHT = 1100, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 8, 12, 26


@dataclass(frozen=True, slots=True)
class Bin:
    """Tasks that came to rest between ``start_min`` and ``end_min`` minutes ago."""

    start_min: int
    end_min: int
    counts: dict[str, int]  # state -> tasks

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def hourly_throughput(db: Database, *, now: datetime | None = None) -> tuple[list[Bin], list[str]]:
    """The last hour in ``BIN_MIN``-minute bins, oldest first, and the states counted.

    One query (the status report's). Raises DatabaseUnavailable.
    """
    windows = tuple(range(BIN_MIN, HOUR_MIN + 1, BIN_MIN))
    found = throughput(db, windows_min=windows, now=now)
    states = list(found.finished)
    bins = []
    for i, window in enumerate(windows):
        counts = {
            state: found.finished[state][i] - (found.finished[state][i - 1] if i else 0)
            for state in states
        }
        bins.append(Bin(window, window - BIN_MIN, counts))
    bins.reverse()
    return bins, states


@dataclass(frozen=True, slots=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    state: str
    title: str


@dataclass(frozen=True, slots=True)
class Tick:
    x: float
    y: float
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    rects: list[Rect]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    plot_left: float
    plot_right: float
    total: int
    states: list[str]


def _nice_top(peak: int) -> int:
    """The y axis's top: ``peak`` rounded up to 1, 2 or 5 times a power of ten."""
    top = 1
    while True:
        for step in (1, 2, 5):
            if step * top >= peak:
                return step * top
        top *= 10


def bar_chart(bins: list[Bin], states: list[str]) -> Chart:
    """Stacked bars, one per bin, one colour per state (the CSS's ``.s-<state>``)."""
    plot_w = WIDTH - _LEFT - _RIGHT
    plot_h = HEIGHT - _TOP - _BOTTOM
    top = _nice_top(max((b.total for b in bins), default=0))
    slot = plot_w / max(len(bins), 1)
    bar_w = slot * 0.72
    rects: list[Rect] = []
    x_ticks: list[Tick] = []
    for i, b in enumerate(bins):
        x = _LEFT + i * slot + (slot - bar_w) / 2
        y = float(_TOP + plot_h)
        when = f"{b.start_min}-{b.end_min} min ago" if b.end_min else f"last {b.start_min} min"
        for state in states:
            n = b.counts.get(state, 0)
            if not n:
                continue
            h = plot_h * n / top
            y -= h
            title = f"{n} {state}, {when}"
            rects.append(Rect(round(x, 1), round(y, 1), round(bar_w, 1), round(h, 1), state, title))
        if i % 3 == 0 or i == len(bins) - 1:
            label = "now" if i == len(bins) - 1 else f"-{b.start_min}m"
            x_ticks.append(Tick(round(x + bar_w / 2, 1), HEIGHT - 8, label))
    values = sorted({0, top, *([top // 2] if top % 2 == 0 else [])})
    y_ticks = [Tick(_LEFT - 6, round(_TOP + plot_h - plot_h * v / top, 1), str(v)) for v in values]
    return Chart(
        WIDTH,
        HEIGHT,
        rects,
        x_ticks,
        y_ticks,
        _LEFT,
        WIDTH - _RIGHT,
        sum(b.total for b in bins),
        states,
    )
