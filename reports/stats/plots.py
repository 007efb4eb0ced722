"""The statistics report's plots (matplotlib's Agg canvas, no pyplot state), each returned as a PNG data: URI,
one colour per source in every plot and in both columns of a comparison."""
from __future__ import annotations

import base64
import io

import numpy as np

from reports.stats.accumulators import OTHER


def _png(fig) -> str:
    """A matplotlib Figure as a data: URI (Agg canvas, no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)   # constrained layout: one draw (bbox_inches="tight" draws twice)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float = 4.4, height: float = 2.9):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# One colour per source in every plot and in both columns of a comparison.
SOURCE_COLOURS = {"coco": "#1f77b4", "coco+vg": "#17becf", "vg": "#2ca02c", "sbu": "#d62728", "cc": "#ff7f0e",
                  OTHER: "#7f7f7f"}
_EXTRA_COLOURS = ["#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39"]


def source_colour(name: str) -> str:
    import zlib

    return SOURCE_COLOURS.get(name) or _EXTRA_COLOURS[zlib.crc32(name.encode()) % len(_EXTRA_COLOURS)]


def _log_x(ax) -> None:
    """Log x axis with plain tick labels (1e-05, 0.01, 1): the default 10^x labels go through mathtext, slowly."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_hist(hist: dict, title: str, xlabel: str) -> str:
    """Stacked bars by source of a Binned summary."""
    fig = _figure()
    ax = fig.add_subplot()
    edges = np.asarray(hist["edges"])
    integer = not hist["log10"] and np.allclose(edges + 0.5, np.round(edges + 0.5))
    bottom = np.zeros(len(edges) - 1)
    for name, part in hist["by_source"].items():
        counts = np.asarray(part["counts"], float)
        if not counts.any():
            continue
        # one filled step polygon per source (stacked), not one patch per bar: a fraction of the draw time
        ax.stairs(bottom + counts, edges, baseline=bottom.copy(), fill=True, label=name, color=source_colour(name))
        bottom += counts
    if hist["log10"]:
        _log_x(ax)
    if integer:
        last = int(edges[-2] + 0.5)
        used = int(np.nonzero(bottom)[0].max()) if bottom.any() else 1
        ax.set_xlim(-0.5, min(last, max(used + 1, 5)) + 0.5)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel + (" (last bin: ≥)" if integer else ""))
    ax.set_ylabel("count")
    if len(hist["by_source"]) > 1 or integer:
        ax.legend(fontsize=7)
    return _png(fig)


def plot_grid(grid: dict, title: str, xlabel: str, ylabel: str, invert_y: bool = False) -> str:
    fig = _figure(4.4, 3.8)
    ax = fig.add_subplot()
    counts = np.asarray(grid["counts"], float).T   # rows = y
    x, y = grid["x_edges"], grid["y_edges"]
    # empty cells white, so a sparse distribution stays visible
    mesh = ax.pcolormesh(x, y, np.ma.masked_equal(counts, 0), cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, label="count")
    if invert_y:
        ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _png(fig)


def plot_bars(names: list[str], values: list[int], title: str, xlabel: str) -> str:
    fig = _figure(5.6, max(2.0, 0.22 * len(names) + 0.8))
    ax = fig.add_subplot()
    ax.barh(range(len(names))[::-1], values, color="#4c72b0")
    ax.set_yticks(range(len(names))[::-1], names, fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    return _png(fig)


def plot_values(values: list[float], title: str, xlabel: str, bins: int = 30) -> str:
    """Per-shard values: one bar per shard for a few shards, else their histogram."""
    fig = _figure()
    ax = fig.add_subplot()
    if len(values) <= 40:
        from matplotlib.ticker import MaxNLocator

        ax.bar(range(len(values)), values, color="#55a868")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("shard number")
        ax.set_ylabel(xlabel)
    else:
        ax.hist(values, bins=bins, color="#55a868", histtype="stepfilled")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("shards")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def plot_rejects(summary: dict) -> str:
    by = summary["rejects"]["by_reason_source"]
    reasons = sorted(by, key=lambda r: -sum(by[r].values()))
    sources = sorted({s for r in by.values() for s in r})
    fig = _figure(5.6, max(2.0, 0.3 * len(reasons) + 0.9))
    ax = fig.add_subplot()
    left = np.zeros(len(reasons))
    ys = np.arange(len(reasons))[::-1]
    for source in sources:
        vals = np.array([by[r].get(source, 0) for r in reasons], float)
        ax.barh(ys, vals, left=left, label=source, color=source_colour(source))
        left += vals
    ax.set_yticks(ys, reasons, fontsize=8)
    ax.set_xlabel("rejected input records")
    ax.set_title("rejects by reason and source", fontsize=10)
    ax.legend(fontsize=7)
    return _png(fig)
