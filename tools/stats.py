"""`xvlm stats`: a self-contained HTML statistics report (+ a JSON summary) of a built dataset, computed from
index.parquet, manifest.json and rejects.parquet only — no shard is opened and no image decoded.

Memory stays bounded whatever the index size: only the needed columns are read, in record batches, into
fixed-bin histograms and bounded label counters (tools/bench_stats.py measures it on a 10M-row index).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import html
import io
import json
import logging
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from shards import storage
from shards.errors import XvlmError
from shards.manifest import REJECTS_SCHEMA, DatasetManifest, check_columns, open_parquet, read_dataset_manifest

log = logging.getLogger(__name__)

REPORT_VERSION = 1
MAX_SOURCES = 32            # distinct sample sources tracked separately; more are pooled as "other"
OTHER = "other"
TOP_K = 30                  # labels / attributes shown in the report
COUNTER_CAPACITY = 100_000  # distinct labels kept exactly; beyond that the rarest are pruned (bounded memory)
EXAMPLES_PER_REASON = 3     # reject examples kept per (source, reason)

# Columns of FORMAT 1.0's index.parquet that the report reads.
BASE_COLUMNS = ["source", "width", "height", "jpeg_bytes", "passthrough", "num_captions", "num_regions",
                "num_objects", "caption_lengths", "box_area_fractions"]
# Optional columns, used when the index has them (proposed for the builder; see docs/reports.md):
# captions / region_texts: list<string>; boxes: list<[x, y, w, h]> in stored pixels, in regions order;
# object_labels: list<string> (text of kind=object regions); attributes: list<string> (all of the sample's).
OPTIONAL_COLUMNS = ["captions", "region_texts", "boxes", "object_labels", "attributes"]
REJECT_COLUMNS = ["source", "kind", "file", "where", "reason", "detail"]

DESCRIPTION = (
    "Write a self-contained HTML statistics report (plots embedded as PNG, readable offline) and a JSON summary\n"
    "of a dataset built by `xvlm build-shards`, from its index.parquet, manifest.json and rejects.parquet only\n"
    "(no image is decoded, so it takes seconds even for millions of samples; memory stays bounded).\n"
    "Shows per-source counts of images, captions, regions and objects; captions and boxes per image; text\n"
    "lengths in words and tokens; box areas, aspect ratios and centres; image sizes; the most frequent object\n"
    "labels and attributes; rejects by reason and source with examples; shard sizes. DATASET may be a folder\n"
    "or an s3:// prefix. --compare puts a second dataset side by side."
)
EPILOG = (
    "examples:\n"
    "  xvlm stats data/shards                                   # writes report.html and report.json\n"
    "  xvlm stats data/shards --out /tmp/r.html --json /tmp/r.json\n"
    "  xvlm stats s3://bucket/xvlm/v2 --compare s3://bucket/xvlm/v1 --out compare.html\n"
    "  xvlm stats data/shards --tokenizer data/sample/tokenizer  # WordPiece token counts (needs caption texts\n"
    "                                                            # in the index; else whitespace counts)\n"
    "see docs/reports.md for every section of the report and the JSON fields."
)


# ---------------------------------------------------------------------------------------------- accumulators


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


# ---------------------------------------------------------------------------------------------- one dataset


@dataclass
class DatasetStats:
    """Everything the report shows about one dataset, accumulated batch by batch."""
    path: str
    manifest: DatasetManifest
    max_side: int
    slots: dict[str, int] = field(default_factory=dict)          # source -> row of the per-source arrays
    images: np.ndarray = field(default_factory=lambda: np.zeros(MAX_SOURCES, np.int64))
    captions: np.ndarray = field(default_factory=lambda: np.zeros(MAX_SOURCES, np.int64))
    regions: np.ndarray = field(default_factory=lambda: np.zeros(MAX_SOURCES, np.int64))
    objects: np.ndarray = field(default_factory=lambda: np.zeros(MAX_SOURCES, np.int64))
    passthrough: np.ndarray = field(default_factory=lambda: np.zeros(MAX_SOURCES, np.int64))
    index_columns: list[str] = field(default_factory=list)
    token_method: str = ""
    notes: list[str] = field(default_factory=list)
    rejects: Counter = field(default_factory=Counter)           # (source, kind, reason) -> n
    reject_examples: dict = field(default_factory=dict)         # (source, reason) -> [row, ...]
    eval_leaks: Counter = field(default_factory=Counter)        # (evaluation split, source) -> images dropped

    def __post_init__(self) -> None:
        self.captions_per_image = Binned(int_edges(10))
        self.regions_per_image = Binned(int_edges(50))
        self.objects_per_image = Binned(int_edges(50))
        self.caption_words = Binned(int_edges(64))
        self.caption_tokens = Binned(int_edges(64))
        self.region_words = Binned(int_edges(32))
        self.region_tokens = Binned(int_edges(32))
        self.box_area = Binned(np.logspace(-5, 0, 41), log10=True)
        self.box_aspect = Binned(np.logspace(-2, 2, 41), log10=True)   # w / h in pixels
        self.box_centres = Grid2D(np.linspace(0, 1, 33), np.linspace(0, 1, 33))
        side = max(64, int(math.ceil(self.max_side / 32.0)) * 32)
        self.image_sizes = Grid2D(np.linspace(0, side, 33), np.linspace(0, side, 33))
        self.long_side = Binned(np.linspace(0, side, 33))
        self.image_aspect = Binned(np.logspace(-1, 1, 41), log10=True)
        self.jpeg_kb = Binned(np.logspace(0, 4, 41), log10=True)
        self.labels = BoundedCounter()
        self.attributes = BoundedCounter()

    def slot(self, source: str) -> int:
        if source not in self.slots:
            if len(self.slots) >= MAX_SOURCES - 1:
                source = OTHER
            self.slots.setdefault(source, len(self.slots))
        return self.slots[source]


def _groups_of(batch: pa.RecordBatch, stats: DatasetStats) -> np.ndarray:
    """The per-row source slot, via the batch's dictionary of distinct sources (a few strings per batch)."""
    encoded = pc.dictionary_encode(batch.column("source").fill_null("?"))
    mapping = np.array([stats.slot(str(s)) for s in encoded.dictionary.to_pylist()], dtype=np.int64)
    return mapping[encoded.indices.to_numpy(zero_copy_only=False)] if len(mapping) else np.zeros(0, np.int64)


def _list_values(column: pa.Array, groups: np.ndarray) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """A list column's flat values, each value's source slot and its row in the batch."""
    values = pc.list_flatten(column)
    parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False).astype(np.int64)
    return values, groups[parents], parents


def _strings(array: pa.Array) -> list[str]:
    return [s for s in array.to_pylist() if s]


def _word_counts(texts: pa.Array) -> np.ndarray:
    return np.array([len(t.split()) if t else 0 for t in texts.to_pylist()], dtype=np.int64)


class TokenCounter:
    """WordPiece token counts of texts as the loader tokenizes them (pre_caption, no [CLS] / truncation)."""

    def __init__(self, folder: str):
        from shards import text

        self.text = text
        self.tokenizer = text.load_vocab(folder).tokenizer

    def __call__(self, texts: list[str]) -> np.ndarray:
        cleaned = []
        for t in texts:
            try:
                if not t:
                    raise self.text.EmptyText("no text")
                cleaned.append(self.text.pre_caption(t, max_words=10_000))
            except self.text.EmptyText:
                cleaned.append("")
        if not cleaned:
            return np.zeros(0, np.int64)
        ids = self.tokenizer(cleaned, add_special_tokens=False)["input_ids"]
        return np.array([len(i) for i in ids], dtype=np.int64)


def _add_index_batch(batch: pa.RecordBatch, stats: DatasetStats, tokens: TokenCounter | None) -> None:
    names = set(batch.schema.names)
    groups = _groups_of(batch, stats)

    def ints(name: str) -> np.ndarray:
        return batch.column(name).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)

    num_captions, num_regions, num_objects = ints("num_captions"), ints("num_regions"), ints("num_objects")
    stats.images += np.bincount(groups, minlength=MAX_SOURCES)
    stats.captions += np.bincount(groups, weights=num_captions, minlength=MAX_SOURCES).astype(np.int64)
    stats.regions += np.bincount(groups, weights=num_regions, minlength=MAX_SOURCES).astype(np.int64)
    stats.objects += np.bincount(groups, weights=num_objects, minlength=MAX_SOURCES).astype(np.int64)
    stats.captions_per_image.add(num_captions, groups)
    stats.regions_per_image.add(num_regions, groups)
    stats.objects_per_image.add(num_objects, groups)
    stats.passthrough += np.bincount(groups, weights=batch.column("passthrough").fill_null(False)
                                     .to_numpy(zero_copy_only=False).astype(np.int64), minlength=MAX_SOURCES
                                     ).astype(np.int64)

    width, height = ints("width").astype(np.float64), ints("height").astype(np.float64)
    stats.image_sizes.add(width, height)
    stats.long_side.add(np.maximum(width, height), groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        stats.image_aspect.add(width / height, groups)
    stats.jpeg_kb.add(ints("jpeg_bytes") / 1024.0, groups)

    lengths, length_groups, _ = _list_values(batch.column("caption_lengths"), groups)
    lengths = lengths.to_numpy(zero_copy_only=False)
    stats.caption_words.add(lengths, length_groups)
    if "captions" in names:
        texts, text_groups, _ = _list_values(batch.column("captions"), groups)
        counted = tokens(texts.to_pylist()) if tokens else _word_counts(texts)
        stats.caption_tokens.add(counted, text_groups)
    else:
        stats.caption_tokens.add(lengths, length_groups)   # whitespace tokens = words

    areas, area_groups, _ = _list_values(batch.column("box_area_fractions"), groups)
    stats.box_area.add(areas.to_numpy(zero_copy_only=False), area_groups)

    if "region_texts" in names:
        texts, text_groups, _ = _list_values(batch.column("region_texts"), groups)
        stats.region_words.add(_word_counts(texts), text_groups)
        counted = tokens(texts.to_pylist()) if tokens else _word_counts(texts)
        stats.region_tokens.add(counted, text_groups)
    if "boxes" in names:
        boxes, box_groups, parents = _list_values(batch.column("boxes"), groups)
        flat = pc.list_flatten(boxes).to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, 4)
        w_img, h_img = width[parents], height[parents]
        x, y, w, h = flat.T
        with np.errstate(divide="ignore", invalid="ignore"):
            stats.box_aspect.add(w / h, box_groups)
            stats.box_centres.add((x + w / 2) / w_img, (y + h / 2) / h_img)
    if "object_labels" in names:
        stats.labels.update(_strings(pc.list_flatten(batch.column("object_labels"))))
    if "attributes" in names:
        stats.attributes.update(_strings(pc.list_flatten(batch.column("attributes"))))


def iter_batches(parquet: pq.ParquetFile, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
    """Record batches of a parquet file with bounded memory. One `iter_batches` reader over a whole file keeps
    memory for every list-column batch it decoded (pyarrow 26: ~0.8 MB per 65k-row batch, so ~120 MB on a
    10M-row index, growing with the file); a fresh reader per group of row groups frees it as it goes."""
    meta = parquet.metadata
    group: list[int] = []
    rows = 0
    for i in range(meta.num_row_groups):
        group.append(i)
        rows += meta.row_group(i).num_rows
        if rows >= batch_size:
            yield from parquet.iter_batches(batch_size=batch_size, columns=columns, row_groups=group)
            group, rows = [], 0
    if group:
        yield from parquet.iter_batches(batch_size=batch_size, columns=columns, row_groups=group)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path for a parquet file: itself, or an S3 object streamed to a temp file (parquet readers seek)."""
    if not storage.is_s3(path):
        yield path
        return
    fd, tmp = tempfile.mkstemp(prefix="xvlm-stats-", suffix=".parquet")
    try:
        with os.fdopen(fd, "wb") as out, storage.open_read(path) as src:
            while chunk := src.read(8 << 20):
                out.write(chunk)
        yield tmp
    finally:
        os.remove(tmp)


def collect(path: str, tokenizer: str | None = None, batch_size: int = 65_536, progress: bool = True) -> DatasetStats:
    """Read one dataset's side files into a DatasetStats."""
    manifest = read_dataset_manifest(path)
    path = manifest.path
    stats = DatasetStats(path=path, manifest=manifest, max_side=_max_side(manifest))
    index_path, rejects_path = manifest.index_path, manifest.rejects_path
    tokens = TokenCounter(tokenizer) if tokenizer else None
    try:
        with local_copy(index_path) as local:
            parquet = open_parquet(local, index_path)
            present = set(parquet.schema_arrow.names)
            columns = BASE_COLUMNS + [c for c in OPTIONAL_COLUMNS if c in present]
            check_columns(parquet.schema_arrow, columns, index_path)
            stats.index_columns = columns
            bar = tqdm(total=parquet.metadata.num_rows, unit=" rows", desc=f"stats {os.path.basename(path)}",
                       disable=not progress, mininterval=0.5, dynamic_ncols=True)
            for batch in iter_batches(parquet, columns, batch_size):
                _add_index_batch(batch, stats, tokens)
                bar.update(batch.num_rows)
            bar.close()
    except FileNotFoundError:
        raise XvlmError(f"{index_path} does not exist; the dataset is incomplete, rebuild it") from None
    except (pa.ArrowException, OSError) as err:   # pages damaged behind a readable footer
        raise XvlmError(f"{index_path} cannot be read ({type(err).__name__}: {err}); rebuild the dataset") from None
    _token_notes(stats, tokenizer)
    _read_rejects(rejects_path, stats, batch_size)
    indexed = int(stats.images.sum())
    listed = manifest.samples
    if indexed != listed:
        stats.notes.append(f"index.parquet has {indexed} rows but the manifest lists {listed} samples: "
                           f"the dataset is inconsistent (run `xvlm verify {path}`)")
    return stats


def _max_side(manifest: DatasetManifest) -> int:
    """The build's --max-image-side (the image-size plots' range), 1024 when the manifest does not say."""
    config = manifest.build.get("config")
    image = config.get("image") if isinstance(config, dict) else None
    side = image.get("max_side") if isinstance(image, dict) else None
    return side if isinstance(side, int) and not isinstance(side, bool) and 0 < side <= 1 << 16 else 1024


def _token_notes(stats: DatasetStats, tokenizer: str | None) -> None:
    has_texts = "captions" in stats.index_columns
    if tokenizer and has_texts:
        stats.token_method = f"WordPiece tokens of the pre_caption'd text ({tokenizer}), without [CLS]"
    elif has_texts:
        stats.token_method = "whitespace tokens (no --tokenizer given)"
    else:
        stats.token_method = ("whitespace tokens = words: index.parquet has no caption texts, so WordPiece "
                              "counts cannot be computed without opening the shards")
        if tokenizer:
            stats.notes.append(f"--tokenizer {tokenizer} ignored: the index has no text columns")
    if "region_texts" not in stats.index_columns:
        stats.notes.append("region text lengths: index.parquet has no `region_texts` column")
    if "boxes" not in stats.index_columns:
        stats.notes.append("box aspect ratios and centres: index.parquet has no `boxes` column (only box area "
                           "fractions)")
    if "object_labels" not in stats.index_columns or "attributes" not in stats.index_columns:
        stats.notes.append("object labels / attributes: index.parquet has no `object_labels` / `attributes` columns")


def _count_eval_leaks(table: pa.Table, stats: DatasetStats) -> None:
    """Images dropped by --exclude-eval, per evaluation split (the first word of an eval_leak detail)."""
    leaks = table.filter(pc.and_(pc.equal(table["reason"], "eval_leak"), pc.equal(table["kind"], "image")))
    for source, detail in zip(leaks["source"].to_pylist(), leaks["detail"].to_pylist()):
        stats.eval_leaks[(str(detail).split(" ", 1)[0], source)] += 1


def _read_rejects(path: str, stats: DatasetStats, batch_size: int) -> None:
    try:
        with local_copy(path) as local:
            parquet = open_parquet(local, path)
            check_columns(parquet.schema_arrow, REJECT_COLUMNS, path, REJECTS_SCHEMA)
            for batch in iter_batches(parquet, REJECT_COLUMNS, batch_size):
                table = pa.Table.from_batches([batch])
                grouped = table.group_by(["source", "kind", "reason"]).aggregate([("reason", "count")])
                for row in grouped.to_pylist():
                    stats.rejects[(row["source"], row["kind"], row["reason"])] += row["reason_count"]
                _count_eval_leaks(table, stats)
                # examples: the first few rows of each (source, reason), read row by row only while needed
                for source, reason in {(s, r) for s, _, r in stats.rejects}:
                    have = stats.reject_examples.setdefault((source, reason), [])
                    if len(have) >= EXAMPLES_PER_REASON:
                        continue
                    mask = pc.and_(pc.equal(table["source"], source), pc.equal(table["reason"], reason))
                    for row in table.filter(mask).slice(0, EXAMPLES_PER_REASON - len(have)).to_pylist():
                        have.append(row)
    except FileNotFoundError:
        stats.notes.append(f"{path} does not exist: rejects are shown from the manifest's counts only")
    except (pa.ArrowException, OSError) as err:
        raise XvlmError(f"{path} cannot be read ({type(err).__name__}: {err}); rebuild the dataset") from None


# ---------------------------------------------------------------------------------------------- summary


def summarize(stats: DatasetStats) -> dict:
    """The JSON summary of one dataset (everything the report plots, as numbers)."""
    m = stats.manifest
    slots = stats.slots
    per_source = {name: {"images": int(stats.images[i]), "captions": int(stats.captions[i]),
                         "regions": int(stats.regions[i]), "objects": int(stats.objects[i]),
                         "passthrough_images": int(stats.passthrough[i])} for name, i in sorted(slots.items())}
    totals = {k: sum(v[k] for v in per_source.values())
              for k in ("images", "captions", "regions", "objects", "passthrough_images")}
    reasons: dict[str, dict[str, int]] = {}
    for (source, kind, reason), n in sorted(stats.rejects.items()):
        reasons.setdefault(reason, {}).setdefault(source, 0)
        reasons[reason][source] += n
    shards = m.shards
    return {
        "dataset": stats.path,
        "format_version": m.format_version,
        "build_command": m.build.get("command"),
        "index_columns": stats.index_columns,
        "samples": {"by_source": per_source, "total": totals},
        "records": {name: counts.to_json() for name, counts in sorted(m.sources.items())},
        "per_image": {"captions": stats.captions_per_image.summary(slots),
                      "regions": stats.regions_per_image.summary(slots),
                      "objects": stats.objects_per_image.summary(slots)},
        "text": {"token_method": stats.token_method,
                 "caption_words": stats.caption_words.summary(slots),
                 "caption_tokens": stats.caption_tokens.summary(slots),
                 "region_words": stats.region_words.summary(slots) if "region_texts" in stats.index_columns else None,
                 "region_tokens": stats.region_tokens.summary(slots) if "region_texts" in stats.index_columns else None},
        "boxes": {"area_fraction": stats.box_area.summary(slots),
                  "aspect_ratio": stats.box_aspect.summary(slots) if "boxes" in stats.index_columns else None,
                  "centres": stats.box_centres.summary() if "boxes" in stats.index_columns else None},
        "images": {"sizes": stats.image_sizes.summary(), "long_side": stats.long_side.summary(slots),
                   "aspect_ratio": stats.image_aspect.summary(slots), "jpeg_kb": stats.jpeg_kb.summary(slots)},
        "labels": stats.labels.summary() if "object_labels" in stats.index_columns else None,
        "attributes": stats.attributes.summary() if "attributes" in stats.index_columns else None,
        "rejects": {"total": int(sum(stats.rejects.values())),
                    "by_reason_source": reasons,
                    "by_source_kind_reason": [[s, k, r, n] for (s, k, r), n in sorted(stats.rejects.items())],
                    "examples": {f"{s}/{r}": rows for (s, r), rows in sorted(stats.reject_examples.items())},
                    "eval_leak_images": [[split, s, n] for (split, s), n in sorted(stats.eval_leaks.items())]},
        "shards": {"count": len(shards), "bytes": [s.bytes for s in shards][:10_000],
                   "samples": [s.samples for s in shards][:10_000],
                   "total_bytes": sum(s.bytes for s in shards)},
        "notes": list(stats.notes),
    }


# ---------------------------------------------------------------------------------------------- plots


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


# ---------------------------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px;color:#222;
     max-width:1800px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}
h3{font-size:14px;margin:10px 0 4px}
.sub{color:#666;font-size:12px;word-break:break-all}
.cols{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap} .col{flex:1;min-width:420px}
.plots{display:flex;flex-wrap:wrap;gap:8px} .plots img{max-width:100%;border:1px solid #eee}
table{border-collapse:collapse;font-size:12px;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 7px}
th{background:#f3f3f3;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#fff8e1;border-left:3px solid #f0b400;padding:4px 8px;font-size:12px;margin:4px 0}
.bad{color:#b00020;font-weight:600} .ok{color:#1b7f3b;font-weight:600}
code{font-size:11px;background:#f6f6f6;padding:1px 3px}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(n: object) -> str:
    return f"{n:,}" if isinstance(n, int) else _e(n)


def _table(header: list[str], rows: list[list[object]], cls: str = "") -> str:
    out = [f'<table class="{cls}"><tr>' + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="n">{_num(v)}</td>' if isinstance(v, (int, float)) and
                                    not isinstance(v, bool) else f"<td>{_e(v)}</td>" for v in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _mean(h: dict | None) -> str:
    return "-" if not h or h["all"]["mean"] is None else f"{h['all']['mean']:.2f}"


def _section_counts(s: dict) -> str:
    rows = []
    for name, c in s["samples"]["by_source"].items():
        n = c["images"] or 1
        rows.append([name, c["images"], c["captions"], c["regions"], c["objects"], round(c["captions"] / n, 2),
                     round((c["regions"] + c["objects"]) / n, 2)])
    t = s["samples"]["total"]
    n = t["images"] or 1
    rows.append(["total", t["images"], t["captions"], t["regions"], t["objects"], round(t["captions"] / n, 2),
                 round((t["regions"] + t["objects"]) / n, 2)])
    samples = _table(["sample source", "images", "captions", "regions", "objects", "captions/image",
                      "boxes/image"], rows, "counts")
    acc_rows = []
    for name, src in s["records"].items():
        inputs, written, rejected = src.get("inputs", {}), src.get("written", {}), src.get("rejected", {})
        for kind in sorted(inputs):
            rej = sum((rejected.get(kind) or {}).values())
            ok = inputs[kind] == written.get(kind, 0) + rej
            acc_rows.append([name, kind, inputs[kind], written.get(kind, 0), rej, "ok" if ok else "MISMATCH"])
        if src.get("clipped_boxes"):
            acc_rows.append([name, "boxes clipped to the image", src["clipped_boxes"], "", "", ""])
    records = _table(["input source", "record kind", "inputs", "written", "rejected", "inputs = written + rejected"],
                     acc_rows, "records")
    return (f"<h3>Samples in the shards (from index.parquet)</h3>{samples}"
            f"<h3>Input records (from manifest.json)</h3>{records}")


def _section_rejects(s: dict) -> str:
    r = s["rejects"]
    if not r["total"]:
        return "<p>No input record was rejected.</p>"
    parts = [_img(plot_rejects(s), "rejects by reason and source")]
    rows = [[src, kind, reason, n] for src, kind, reason, n in r["by_source_kind_reason"]]
    parts.append(_table(["source", "record kind", "reason", "rejected"], rows, "rejects"))
    ex_rows = [[key.split("/", 1)[0], row["kind"], row["reason"], row["file"], row["where"], row["detail"][:160]]
               for key, rows_ in r["examples"].items() for row in rows_]
    parts.append("<h3>Examples</h3>" + _table(["source", "kind", "reason", "file", "where", "detail"], ex_rows,
                                              "examples"))
    if r.get("eval_leak_images"):
        parts.append("<h3>Evaluation images removed (--exclude-eval)</h3>" + _table(
            ["evaluation split", "source", "images dropped"], r["eval_leak_images"], "eval-leaks"))
    return "".join(parts)


def _section_labels(s: dict) -> str:
    out = []
    for key, title in (("labels", "object labels"), ("attributes", "attributes")):
        part = s[key]
        if part is None:
            out.append(f'<div class="note">Most frequent {title}: not available — index.parquet has no '
                       f'`{"object_labels" if key == "labels" else "attributes"}` column.</div>')
            continue
        if not part["top"]:
            out.append(f"<p>No {title} in this dataset.</p>")
            continue
        names, values = [n for n, _ in part["top"]], [v for _, v in part["top"]]
        exact = "exact" if part["exact"] else f"approximate (each count may be low by up to {part['error_bound']})"
        out.append(_img(plot_bars(names, values, f"top {len(names)} {title} of {part['total']:,}", "count"), title))
        out.append(f'<div class="sub">{part["distinct_kept"]:,} distinct kept; counts {exact}</div>')
        out.append(_table([title[:-1] if title.endswith("s") else title, "count"], [[n, v] for n, v in part["top"]]))
    return "".join(out)


def render_column(s: dict) -> dict[str, str]:
    """The HTML of each section for one dataset."""
    per = s["per_image"]
    text = s["text"]
    boxes = s["boxes"]
    images = s["images"]
    sections = {
        "counts": _section_counts(s),
        "per_image": '<div class="plots">' + "".join([
            _img(plot_hist(per["captions"], f"captions per image (mean {_mean(per['captions'])})", "captions"), "captions per image"),
            _img(plot_hist(per["regions"], f"region boxes per image (mean {_mean(per['regions'])})", "regions"), "regions per image"),
            _img(plot_hist(per["objects"], f"object boxes per image (mean {_mean(per['objects'])})", "objects"), "objects per image"),
        ]) + "</div>",
    }
    text_plots = [_img(plot_hist(text["caption_words"], f"caption length in words (mean {_mean(text['caption_words'])})",
                                 "words"), "caption words"),
                  _img(plot_hist(text["caption_tokens"], f"caption length in tokens (mean {_mean(text['caption_tokens'])})",
                                 "tokens"), "caption tokens")]
    if text["region_words"] is not None:
        text_plots.append(_img(plot_hist(text["region_words"], "region / object text length in words", "words"), "region words"))
        text_plots.append(_img(plot_hist(text["region_tokens"], "region / object text length in tokens", "tokens"), "region tokens"))
    sections["text"] = (f'<div class="sub">tokens: {_e(text["token_method"])}</div><div class="plots">'
                        + "".join(text_plots) + "</div>")
    box_plots = [_img(plot_hist(boxes["area_fraction"], "box area / image area", "fraction (log scale)"), "box area")]
    if boxes["aspect_ratio"] is not None:
        box_plots.append(_img(plot_hist(boxes["aspect_ratio"], "box aspect ratio (w / h)", "w / h (log scale)"), "box aspect"))
        box_plots.append(_img(plot_grid(boxes["centres"], "box centres (fraction of width / height)", "x", "y",
                                        invert_y=True), "box centres"))
    sections["boxes"] = '<div class="plots">' + "".join(box_plots) + "</div>"
    t = s["samples"]["total"]
    sections["images"] = ('<div class="plots">' + "".join([
        _img(plot_grid(images["sizes"], "stored image sizes", "width (px)", "height (px)"), "image sizes"),
        _img(plot_hist(images["long_side"], "long side of the stored image", "pixels"), "long side"),
        _img(plot_hist(images["aspect_ratio"], "image aspect ratio (w / h)", "w / h (log scale)"), "image aspect"),
        _img(plot_hist(images["jpeg_kb"], "stored JPEG size", "KiB (log scale)"), "jpeg size"),
    ]) + f'</div><div class="sub">{t["passthrough_images"]:,} of {t["images"]:,} images stored as their source '
         f'bytes (pass-through), the rest re-encoded</div>')
    sections["labels"] = _section_labels(s)
    sections["rejects"] = _section_rejects(s)
    sh = s["shards"]
    shard_rows = [[sh["count"], sh["total_bytes"],
                   round(sh["total_bytes"] / sh["count"] / 1e6, 2) if sh["count"] else 0]]
    shard_html = _table(["shards", "bytes", "mean MB per shard"], shard_rows)
    if sh["bytes"]:
        shard_html += '<div class="plots">' + _img(plot_values([b / 1e6 for b in sh["bytes"]], "shard sizes", "MB"),
                                                   "shard sizes") + _img(
            plot_values(sh["samples"], "samples per shard", "samples"), "samples per shard") + "</div>"
    sections["shards"] = shard_html
    notes = "".join(f'<div class="note">{_e(n)}</div>' for n in s["notes"])
    sections["notes"] = notes or '<div class="sub">none</div>'
    return sections


SECTIONS = [("counts", "Counts per source"), ("per_image", "Captions and boxes per image"),
            ("text", "Text lengths"), ("boxes", "Boxes"), ("images", "Images"),
            ("labels", "Most frequent object labels and attributes"), ("rejects", "Rejected input records"),
            ("shards", "Shards"), ("notes", "Notes and limitations")]


def render_html(summaries: list[dict]) -> str:
    """One self-contained page: inline CSS, plots as data: URIs, no script, no external resource."""
    columns = [render_column(s) for s in summaries]
    title = "xvlm dataset report" if len(summaries) == 1 else "xvlm dataset comparison"
    head = "".join(f'<div class="col"><h1>{_e(os.path.basename(s["dataset"].rstrip("/")) or s["dataset"])}</h1>'
                   f'<div class="sub">{_e(s["dataset"])} · format {_e(s["format_version"])} · '
                   f'{s["samples"]["total"]["images"]:,} samples in {s["shards"]["count"]:,} shards</div>'
                   f'<div class="sub">built with: <code>{_e(" ".join(s["build_command"] or []))}</code></div></div>'
                   for s in summaries)
    body = [f'<div class="cols">{head}</div>']
    body.append('<div class="sub">Sections: ' + " · ".join(f'<a href="#{k}">{_e(t)}</a>' for k, t in SECTIONS)
                + "</div>")
    for key, heading in SECTIONS:
        cells = "".join(f'<div class="col">{c[key]}</div>' for c in columns)
        body.append(f'<h2 id="{key}">{_e(heading)}</h2><div class="cols">{cells}</div>')
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body.append(f'<p class="sub">generated by xvlm stats (report version {REPORT_VERSION}) on {generated}</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ---------------------------------------------------------------------------------------------- CLI


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATASET", help="dataset folder or s3://bucket/prefix (with manifest.json)")
    parser.add_argument("--out", default="report.html", metavar="HTML",
                        help="the HTML report to write, local or s3:// (default report.html)")
    parser.add_argument("--json", dest="json_out", default=None, metavar="JSON",
                        help="the JSON summary to write (default: --out with .json instead of .html)")
    parser.add_argument("--compare", default=None, metavar="OTHER",
                        help="a second dataset to show side by side (e.g. the previous build)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="BERT WordPiece tokenizer folder for token counts; without it tokens are counted by "
                             "whitespace. WordPiece needs caption texts in index.parquet")
    parser.add_argument("--batch-size", type=int, default=65_536, metavar="ROWS",
                        help="index rows read at a time (bounds memory; default 65536)")
    parser.add_argument("--endpoint-url", default=None, metavar="URL",
                        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.endpoint_url:
        storage.set_endpoint_url(args.endpoint_url)
    options = StatsOptions(dataset=args.dataset, out=args.out, json_out=args.json_out, compare=args.compare,
                           tokenizer=args.tokenizer, batch_size=args.batch_size, progress=not args.no_progress)
    document = write_report(options)
    for s in document["datasets"]:
        t = s["samples"]["total"]
        print(f"{s['dataset']}: {t['images']:,} images, {t['captions']:,} captions, {t['regions']:,} regions, "
              f"{t['objects']:,} objects, {s['rejects']['total']:,} rejected records")
        for note in s["notes"]:
            print(f"  note: {note}")
    print(f"wrote {options.out} and {options.json_path}")
    return 0
