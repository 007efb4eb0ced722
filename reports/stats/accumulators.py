"""Bounded-memory accumulators of the statistics report: fixed-bin histograms per source, a 2-D histogram, and a
label counter that stays exact up to a capacity and bounds its error past it."""
from __future__ import annotations

from collections import Counter

import numpy as np

MAX_SOURCES = 32            # distinct sample sources tracked separately; more are pooled as "other"
OTHER = "other"
TOP_K = 30                  # labels / attributes shown in the report
COUNTER_CAPACITY = 100_000  # distinct labels kept exactly; beyond that the rarest are pruned (bounded memory)


class Binned:
    """Counts per (source slot, bin) with bins fixed up front, so batches add up without keeping values.
    Values outside the range land in the first / last bin (the labels say '<=' / '>=')."""

    def __init__(self, edges: np.ndarray, log10: bool = False):
        self.edges = np.asarray(edges, dtype=np.float64)   # in value space
        self.log10 = log10
        self._cut = np.log10(self.edges) if log10 else self.edges
        bins = len(self.edges) - 1
        self.counts = np.zeros((MAX_SOURCES, bins), dtype=np.int64)
        self.n = np.zeros(MAX_SOURCES, dtype=np.int64)
        self.total = np.zeros(MAX_SOURCES, dtype=np.float64)
        self.min = np.full(MAX_SOURCES, np.inf)
        self.max = np.full(MAX_SOURCES, -np.inf)
        self.dropped = 0          # NaN / infinite values (never in a valid dataset; counted, not hidden)

    def add(self, values: np.ndarray, groups: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        groups = np.asarray(groups, dtype=np.int64)
        ok = np.isfinite(values) & ((values > 0) if self.log10 else True)
        self.dropped += int(values.size - ok.sum())
        values, groups = values[ok], groups[ok]
        if not values.size:
            return
        cut = np.log10(values) if self.log10 else values
        bins = self.counts.shape[1]
        index = np.clip(np.searchsorted(self._cut, cut, side="right") - 1, 0, bins - 1)
        self.counts += np.bincount(groups * bins + index, minlength=MAX_SOURCES * bins).reshape(MAX_SOURCES, bins)
        self.n += np.bincount(groups, minlength=MAX_SOURCES)
        self.total += np.bincount(groups, weights=values, minlength=MAX_SOURCES)
        for g in np.unique(groups):   # a handful of sources per batch
            chosen = values[groups == g]
            self.min[g] = min(self.min[g], chosen.min())
            self.max[g] = max(self.max[g], chosen.max())

    def summary(self, slots: dict[str, int]) -> dict:
        """JSON: edges, all-source counts and per-source counts, n / mean / min / max."""
        def stats(select: list[int]) -> dict:
            n = int(self.n[select].sum())
            return {"n": n, "mean": float(self.total[select].sum() / n) if n else None,
                    "min": float(self.min[select].min()) if n else None,
                    "max": float(self.max[select].max()) if n else None,
                    "counts": self.counts[select].sum(axis=0).tolist()}
        return {"edges": [float(e) for e in self.edges], "log10": self.log10, "dropped_non_finite": self.dropped,
                "all": stats(list(slots.values()) or [0]),
                "by_source": {name: stats([slot]) for name, slot in slots.items()}}


def int_edges(max_value: int) -> np.ndarray:
    """Bins 0, 1, ..., max_value (the last one holds everything >= max_value)."""
    return np.arange(max_value + 2, dtype=np.float64) - 0.5


class Grid2D:
    """A fixed-bin 2-D histogram (all sources together)."""

    def __init__(self, x_edges: np.ndarray, y_edges: np.ndarray):
        self.x_edges, self.y_edges = np.asarray(x_edges, float), np.asarray(y_edges, float)
        self.counts = np.zeros((len(self.x_edges) - 1, len(self.y_edges) - 1), dtype=np.int64)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = np.asarray(x, float), np.asarray(y, float)
        ok = np.isfinite(x) & np.isfinite(y)
        # clip into the outer bins so nothing is lost
        x = np.clip(x[ok], self.x_edges[0], np.nextafter(self.x_edges[-1], -np.inf))
        y = np.clip(y[ok], self.y_edges[0], np.nextafter(self.y_edges[-1], -np.inf))
        counts, _, _ = np.histogram2d(x, y, bins=[self.x_edges, self.y_edges])
        self.counts += counts.astype(np.int64)

    def summary(self) -> dict:
        return {"x_edges": self.x_edges.tolist(), "y_edges": self.y_edges.tolist(), "counts": self.counts.tolist()}


class BoundedCounter:
    """Counts strings exactly while there are at most `capacity` distinct ones; past 2x that the rarest are pruned
    back to `capacity`, and `error_bound` records the largest count pruned (no kept count is low by more)."""

    def __init__(self, capacity: int = COUNTER_CAPACITY):
        self.capacity = capacity
        self.counts: Counter[str] = Counter()
        self.error_bound = 0
        self.total = 0

    def update(self, values: list[str]) -> None:
        self.counts.update(values)
        self.total += len(values)
        if len(self.counts) > 2 * self.capacity:
            ranked = self.counts.most_common()
            # a label pruned now and seen again later lost at most this many counts (summed over prunings)
            self.error_bound += ranked[self.capacity][1]
            self.counts = Counter(dict(ranked[: self.capacity]))

    def summary(self, k: int = TOP_K) -> dict:
        return {"total": self.total, "distinct_kept": len(self.counts), "exact": self.error_bound == 0,
                "error_bound": self.error_bound, "top": [[name, n] for name, n in self.counts.most_common(k)]}
