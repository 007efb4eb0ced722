"""Stage 1 of the shard build: stream every source's records into parquet tables (images, annotations, rejects)
in bounded-size batches, checking each record's text and box on the way, and count the inputs.

Layout under WORK_DIR/stage/: images/SOURCE.parquet, annotations/SOURCE.parquet, rejects/SOURCE.parquet and
stage.json (the StageResult). Memory stays at one batch per table whatever the release size.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import sources as source_registry
from pipeline.records import ImageRef, Reject
from pipeline.textclean import clean_text
import storage
from storage.errors import XvlmError

log = logging.getLogger(__name__)

STAGE_VERSION = 1
KIND_ORDER = {"image": 0, "caption": 1, "region": 2, "object": 3, "line": 4}

IMAGES_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("source_id", pa.string()), ("image_path", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("coco_id", pa.int64()),
    ("byte_offset", pa.int64()), ("byte_size", pa.int64()),
    ("file", pa.string()), ("where", pa.string()), ("seq", pa.int64()), ("normalized", pa.bool_()),
])
ANNOTATIONS_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("source_id", pa.string()), ("kind", pa.string()),
    ("text", pa.string()), ("x", pa.float64()), ("y", pa.float64()), ("w", pa.float64()), ("h", pa.float64()),
    ("attributes", pa.list_(pa.string())), ("file", pa.string()), ("where", pa.string()), ("seq", pa.int64()),
    ("group_of", pa.bool_()),
])
REJECTS_SCHEMA = pa.schema([
    ("source", pa.string()), ("kind", pa.string()), ("file", pa.string()), ("where", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()),
])
TABLES = {"images": IMAGES_SCHEMA, "annotations": ANNOTATIONS_SCHEMA, "rejects": REJECTS_SCHEMA}


@dataclass
class StageConfig:
    batch_rows: int = 50_000      # rows buffered per table before a parquet row group is written
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_rows < 1:
            raise XvlmError(f"batch_rows must be positive, got {self.batch_rows}")


@dataclass
class StageResult:
    """What staging read: per source, input records by kind and stage rejects by reason (and by kind)."""
    work_dir: str
    sources: dict[str, str]                                   # name -> path, as given
    inputs: dict[str, dict[str, int]] = field(default_factory=dict)          # source -> kind -> records
    rejects: dict[str, dict[str, int]] = field(default_factory=dict)         # source -> reason -> records
    rejects_by_kind: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> kind -> records
    tables: dict[str, list[str]] = field(default_factory=dict)               # table -> parquet files
    version: int = STAGE_VERSION

    def save(self, path: str) -> None:
        storage.write_text(path, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str) -> "StageResult":
        return cls(**json.loads(storage.read_text(path)))


def stage_dir(work_dir: str) -> str:
    return os.path.join(work_dir, "stage")


class _TableWriter:
    """Buffers rows of one table as columns and writes a row group every `batch_rows` rows (temp name, renamed
    on close so a killed run never leaves a table that looks complete)."""

    def __init__(self, path: str, schema: pa.Schema, batch_rows: int):
        self.path, self.schema, self.batch_rows = path, schema, batch_rows
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.tmp = path + ".tmp"
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        self.rows: list[tuple] = []

    def add(self, row: tuple) -> None:
        rows = self.rows
        rows.append(row)
        if len(rows) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            columns = [pa.array(values, type=f.type) for values, f in zip(zip(*self.rows), self.schema)]
            self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()
        os.replace(self.tmp, self.path)


def _check_box(bbox: list[float] | None) -> str | None:
    """A reason code when the box cannot be used at all (partly outside is the image stage's to clip)."""
    if bbox is None or len(bbox) != 4:
        return "malformed_line"
    x, y, w, h = bbox
    isfinite = math.isfinite
    if not (isfinite(x) and isfinite(y) and isfinite(w) and isfinite(h)) or w <= 0 or h <= 0:
        return "bad_box"
    return None


class _SampleKeys:
    """source_id -> sample key of one source, cached for the last few thousand images (annotations often follow
    their image); None for an id that gives no tar-safe key."""

    def __init__(self, module) -> None:
        self.module = module
        self.cache: dict[str, str] = {}

    def key_of(self, source_id: str) -> str | None:
        key = self.cache.get(source_id)
        if key is None:
            try:
                key = source_registry.sample_key(self.module, source_id)
            except (ValueError, TypeError):
                return None
            if not source_registry.SAFE_KEY.fullmatch(key):
                return None
            if len(self.cache) > 4096:
                self.cache.clear()
            self.cache[source_id] = key
        return key


def stage_source(name: str, path: str, work_dir: str, config: StageConfig) -> tuple[Counter, Counter, Counter]:
    """Stream one source into its three tables. Returns (inputs by kind, rejects by reason, rejects by kind)."""
    module = source_registry.get_source(name)
    out = stage_dir(work_dir)
    writers = {table: _TableWriter(os.path.join(out, table, f"{name}.parquet"), schema, config.batch_rows)
               for table, schema in TABLES.items()}
    inputs: Counter = Counter()
    reasons: Counter = Counter()
    reject_kinds: Counter = Counter()
    keys = _SampleKeys(module)

    def reject(kind: str, file: str, where: str, reason: str, detail: str = "") -> None:
        writers["rejects"].add((name, kind, file, where, reason, detail))
        reasons[reason] += 1
        reject_kinds[kind] += 1

    seq = 0
    bar = tqdm(desc=f"staging {name}", unit=" records", disable=not config.progress, mininterval=1.0)
    add_image, add_annotation = writers["images"].add, writers["annotations"].add
    no_box = (None, None, None, None)
    try:
        # The hot loop (millions of records): exact type checks and local names keep it lean.
        for record in module.iter_records(path):
            seq += 1
            if seq % 10_000 == 0:
                bar.update(10_000)
            cls = type(record)
            if cls is Reject:
                inputs[record.kind] += 1
                if record.source != name:
                    raise RuntimeError(f"source {name} yielded a reject of source {record.source}")
                reject(record.kind, record.file, record.where, record.reason, record.detail)
                continue
            kind = "image" if cls is ImageRef else record.kind
            inputs[kind] += 1
            file, _, where = record.ref.rpartition("#")
            source_id = record.source_id
            key = keys.cache.get(source_id) or keys.key_of(source_id)
            if key is None:
                reject(kind, file, where, "malformed_line", f"id {source_id!r:.80} gives no tar-safe sample key")
                continue
            if cls is ImageRef:
                add_image((key, name, source_id, record.image_path, record.width, record.height,
                           record.coco_id, record.byte_offset, record.byte_size, file, where, seq,
                           record.normalized))
                continue
            text, problem = clean_text(record.text)
            bbox = record.bbox
            if problem is None and kind != "caption":
                problem = _check_box(bbox)
            if problem is not None:
                reject(kind, file, where, problem, "" if problem != "bad_box" else f"bbox {bbox}")
                continue
            x, y, w, h = bbox if bbox is not None and kind != "caption" else no_box
            add_annotation((key, name, source_id, kind, text, x, y, w, h, record.attributes, file, where, seq,
                            record.group_of))
        bar.update(seq % 10_000)
    except BaseException:
        for writer in writers.values():
            writer.writer.close()
            os.remove(writer.tmp)
        raise
    finally:
        bar.close()
    for writer in writers.values():
        writer.close()
    return inputs, reasons, reject_kinds


def stage_sources(sources: dict[str, str], work_dir: str, config: StageConfig | None = None) -> StageResult:
    """Stage every source (name -> root path, local or s3://) under WORK_DIR/stage. WORK_DIR is a local folder."""
    config = config or StageConfig()
    if storage.local_path(work_dir) is None:
        raise XvlmError(f"the staging work dir must be a local folder, not {work_dir}")
    if not sources:
        raise XvlmError("no sources given: use --source NAME=PATH (e.g. --source coco=data/sample/coco)")
    for name in sources:
        source_registry.get_source(name)  # unknown names fail before any work
    out = stage_dir(work_dir)
    if os.path.isdir(out):
        shutil.rmtree(out)  # staging is cheap to redo and must not mix with an older run's tables
    result = StageResult(work_dir=work_dir, sources=dict(sorted(sources.items())))
    for name, path in sorted(sources.items()):
        log.info("staging %s from %s", name, path)
        inputs, reasons, kinds = stage_source(name, path, work_dir, config)
        result.inputs[name] = dict(sorted(inputs.items(), key=lambda kv: KIND_ORDER[kv[0]]))
        result.rejects[name] = dict(sorted(reasons.items()))
        result.rejects_by_kind[name] = dict(sorted(kinds.items(), key=lambda kv: KIND_ORDER[kv[0]]))
        log.info("staged %s: inputs %s, rejects %s", name, result.inputs[name], result.rejects[name] or "none")
    result.tables = {table: [os.path.join(out, table, f"{name}.parquet") for name in sorted(sources)]
                     for table in TABLES}
    result.save(os.path.join(out, "stage.json"))
    return result

