"""Reading one dataset's side files (index.parquet, manifest.json, rejects.parquet) batch by batch into a
DatasetStats: no shard is opened and no image decoded, memory stays bounded whatever the index size."""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from reports.stats.accumulators import MAX_SOURCES, OTHER, Binned, BoundedCounter, Grid2D, int_edges
from shards.format import DEFAULT_MAX_IMAGE_SIDE
from shards.manifest import DatasetManifest, read_dataset_manifest
from shards.side_files import check_columns, open_side_file
from storage.errors import XvlmError

EXAMPLES_PER_REASON = 3     # reject examples kept per (source, reason)
# Columns of FORMAT 1.0's index.parquet that the report reads.
BASE_COLUMNS = ["source", "width", "height", "jpeg_bytes", "passthrough", "num_captions", "num_regions",
                "num_objects", "caption_lengths", "box_area_fractions"]
# Optional columns, used when the index has them (see docs/reports.md): captions / region_texts: list<string>;
# boxes: list<[x, y, w, h]> in stored pixels, in regions order; object_labels: list<string> (text of kind=object
# regions); attributes: list<string> (all of the sample's).
OPTIONAL_COLUMNS = ["captions", "region_texts", "boxes", "object_labels", "attributes"]
REJECT_COLUMNS = ["source", "kind", "file", "where", "reason", "detail"]


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


def collect(path: str, tokenizer: str | None = None, batch_size: int = 65_536, progress: bool = True) -> DatasetStats:
    """Read one dataset's side files into a DatasetStats."""
    manifest = read_dataset_manifest(path)
    path = manifest.path
    stats = DatasetStats(path=path, manifest=manifest, max_side=_max_side(manifest))
    _read_index(manifest, stats, TokenCounter(tokenizer) if tokenizer else None, batch_size, progress)
    _token_notes(stats, tokenizer)
    _read_rejects(manifest, stats, batch_size)
    indexed = int(stats.images.sum())
    listed = manifest.samples
    if indexed != listed:
        stats.notes.append(f"index.parquet has {indexed} rows but the manifest lists {listed} samples: "
                           f"the dataset is inconsistent (run `xvlm verify {path}`)")
    return stats


def _read_index(manifest: DatasetManifest, stats: DatasetStats, tokens: TokenCounter | None, batch_size: int,
                progress: bool) -> None:
    index_path = manifest.index_path
    try:
        with open_side_file(manifest, "index", BASE_COLUMNS) as index:
            present = set(index.parquet.schema_arrow.names)
            columns = BASE_COLUMNS + [c for c in OPTIONAL_COLUMNS if c in present]
            check_columns(index.parquet.schema_arrow, columns, index_path)   # the optional ones' types too
            stats.index_columns = columns
            bar = tqdm(total=index.rows, unit=" rows", desc=f"stats {os.path.basename(stats.path)}",
                       disable=not progress, mininterval=0.5, dynamic_ncols=True)
            for batch in index.batches(columns, batch_size):
                _add_index_batch(batch, stats, tokens)
                bar.update(batch.num_rows)
            bar.close()
    except FileNotFoundError:
        raise XvlmError(f"{index_path} does not exist; the dataset is incomplete, rebuild it") from None
    except (pa.ArrowException, OSError) as err:   # pages damaged behind a readable footer
        raise XvlmError(f"{index_path} cannot be read ({type(err).__name__}: {err}); rebuild the dataset") from None


def _max_side(manifest: DatasetManifest) -> int:
    """The build's --max-image-side (the image-size plots' range); the builder's default when the manifest does
    not say."""
    config = manifest.build.get("config")
    image = config.get("image") if isinstance(config, dict) else None
    side = image.get("max_side") if isinstance(image, dict) else None
    return side if isinstance(side, int) and not isinstance(side, bool) and 0 < side <= 1 << 16 else DEFAULT_MAX_IMAGE_SIDE


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


def _read_rejects(manifest: DatasetManifest, stats: DatasetStats, batch_size: int) -> None:
    path = manifest.rejects_path
    try:
        with open_side_file(manifest, "rejects", REJECT_COLUMNS) as rejects:
            for batch in rejects.batches(REJECT_COLUMNS, batch_size):
                _add_rejects_batch(pa.Table.from_batches([batch]), stats)
    except FileNotFoundError:
        stats.notes.append(f"{path} does not exist: rejects are shown from the manifest's counts only")
    except (pa.ArrowException, OSError) as err:
        raise XvlmError(f"{path} cannot be read ({type(err).__name__}: {err}); rebuild the dataset") from None


def _count_eval_leaks(table: pa.Table, stats: DatasetStats) -> None:
    """Images dropped by --exclude-eval, per evaluation split (the first word of an eval_leak detail)."""
    leaks = table.filter(pc.and_(pc.equal(table["reason"], "eval_leak"), pc.equal(table["kind"], "image")))
    for source, detail in zip(leaks["source"].to_pylist(), leaks["detail"].to_pylist()):
        stats.eval_leaks[(str(detail).split(" ", 1)[0], source)] += 1


def _add_rejects_batch(table: pa.Table, stats: DatasetStats) -> None:
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