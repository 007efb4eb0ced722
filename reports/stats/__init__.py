"""`xvlm stats`: a self-contained HTML statistics report (+ a JSON summary) of a built dataset, computed from
index.parquet, manifest.json and rejects.parquet only — no shard is opened and no image decoded.

Memory stays bounded whatever the index size: only the needed columns are read, in record batches, into
fixed-bin histograms and bounded label counters (bench/bench_stats.py measures it on a 10M-row index).
The parts: accumulators.py (histograms, counters), collect.py (reading a dataset), summary.py (the JSON),
plots.py and html.py (the page).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import storage
from reports.stats.accumulators import Binned, BoundedCounter, Grid2D, int_edges
from reports.stats.collect import DatasetStats, collect
from reports.stats.html import REPORT_VERSION, SECTIONS, render_html
from reports.stats.summary import summarize
from storage.errors import XvlmError

__all__ = ["Binned", "BoundedCounter", "Grid2D", "int_edges", "DatasetStats", "collect", "summarize", "SECTIONS",
           "render_html", "REPORT_VERSION", "StatsOptions", "write_report"]


@dataclass
class StatsOptions:
    dataset: str
    out: str = "report.html"
    json_out: str | None = None        # default: --out with .json
    compare: str | None = None
    tokenizer: str | None = None
    batch_size: int = 65_536
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise XvlmError(f"--batch-size must be positive, got {self.batch_size}")
        if self.tokenizer and not os.path.isdir(self.tokenizer):
            raise XvlmError(f"--tokenizer {self.tokenizer!r} is not a folder (a BERT WordPiece tokenizer folder)")

    @property
    def json_path(self) -> str:
        if self.json_out:
            return self.json_out
        stem = self.out[:-5] if self.out.lower().endswith(".html") else self.out
        return stem + ".json"


def write_report(options: StatsOptions) -> dict:
    """Collect, summarize and write the HTML and JSON; returns the JSON document."""
    paths = [options.dataset] + ([options.compare] if options.compare else [])
    summaries = [summarize(collect(p, options.tokenizer, options.batch_size, options.progress)) for p in paths]
    document = {"report_version": REPORT_VERSION, "datasets": summaries}
    storage.write_text(options.out, render_html(summaries))
    storage.write_text(options.json_path, json.dumps(document, indent=1, sort_keys=True) + "\n")
    return document
