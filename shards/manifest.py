"""The dataset's side files: manifest.json (written last: the commit marker), index.parquet and rejects.parquet.

The manifest carries the format version, how the dataset was built, per-source counts of input records
(by record kind) split into written and rejected-by-reason, and per shard its sample count, bytes and sha256.
"""
from __future__ import annotations

import io
import json
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from shards import storage
from shards.format import FORMAT_VERSION, INDEX_NAME, MANIFEST_NAME, REJECTS_NAME

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("offset", pa.int64()),               # byte offset of the sample's first tar header in the shard
    ("source", pa.string()),
    ("width", pa.int32()),                # of the stored jpg
    ("height", pa.int32()),
    ("jpeg_bytes", pa.int64()),
    ("passthrough", pa.bool_()),          # the source bytes were stored untouched
    ("num_captions", pa.int32()),
    ("num_regions", pa.int32()),          # kind == "region"
    ("num_objects", pa.int32()),          # kind == "object"
    ("caption_lengths", pa.list_(pa.int32())),       # words per caption
    ("box_area_fractions", pa.list_(pa.float32())),  # box area / image area, per region in order
    ("captions", pa.list_(pa.string())),             # caption texts (for text statistics without opening shards)
    ("region_texts", pa.list_(pa.string())),         # text of every region/object, in regions order
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # [x, y, w, h] in stored pixels, in regions order
    ("object_labels", pa.list_(pa.string())),        # text of kind == "object" regions (the bare label)
    ("attributes", pa.list_(pa.string())),           # every attribute of the sample's objects
])
REJECTS_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("kind", pa.string()),                # image | caption | region | object | line
    ("file", pa.string()),
    ("where", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
])


@dataclass
class SourceCounts:
    """Per record kind: inputs, written, rejected by reason; plus boxes clipped to their image."""
    inputs: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    written: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rejected: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    clipped_boxes: int = 0

    def add_written(self, kind: str, n: int = 1) -> None:
        self.inputs[kind] += n
        self.written[kind] += n

    def add_rejected(self, kind: str, reason: str, n: int = 1) -> None:
        self.inputs[kind] += n
        self.rejected[kind][reason] += n

    def merge(self, other: "SourceCounts") -> None:
        for kind, n in other.inputs.items():
            self.inputs[kind] += n
        for kind, n in other.written.items():
            self.written[kind] += n
        for kind, reasons in other.rejected.items():
            for reason, n in reasons.items():
                self.rejected[kind][reason] += n
        self.clipped_boxes += other.clipped_boxes

    def balanced(self) -> bool:
        """inputs = written + rejected, for every record kind."""
        kinds = set(self.inputs) | set(self.written) | set(self.rejected)
        return all(self.inputs.get(k, 0) == self.written.get(k, 0) + sum(self.rejected.get(k, {}).values())
                   for k in kinds)

    def to_json(self) -> dict:
        return {
            "inputs": dict(sorted(self.inputs.items())),
            "written": dict(sorted(self.written.items())),
            "rejected": {k: dict(sorted(v.items())) for k, v in sorted(self.rejected.items()) if v},
            "clipped_boxes": self.clipped_boxes,
        }

    @classmethod
    def from_json(cls, data: dict) -> "SourceCounts":
        counts = cls()
        for kind, n in data.get("inputs", {}).items():
            counts.inputs[kind] += n
        for kind, n in data.get("written", {}).items():
            counts.written[kind] += n
        for kind, reasons in data.get("rejected", {}).items():
            for reason, n in reasons.items():
                counts.rejected[kind][reason] += n
        counts.clipped_boxes = int(data.get("clipped_boxes", 0))
        return counts


def merge_counts(parts: list[dict[str, SourceCounts]]) -> dict[str, SourceCounts]:
    total: dict[str, SourceCounts] = {}
    for part in parts:
        for source, counts in part.items():
            total.setdefault(source, SourceCounts()).merge(counts)
    return dict(sorted(total.items()))


@dataclass
class Manifest:
    """manifest.json. `shards` entries: {"name", "samples", "bytes", "sha256"}."""
    build: dict                               # {"command": [...], "config": {...}}
    sources: dict[str, SourceCounts]
    shards: list[dict]
    format_version: str = FORMAT_VERSION

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "build": self.build,
            "totals": {"samples": sum(s["samples"] for s in self.shards), "shards": len(self.shards),
                       "bytes": sum(s["bytes"] for s in self.shards)},
            "sources": {name: counts.to_json() for name, counts in sorted(self.sources.items())},
            "shards": self.shards,
            "files": {"index": INDEX_NAME, "rejects": REJECTS_NAME},
        }

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        return cls(build=data["build"], shards=data["shards"], format_version=data["format_version"],
                   sources={k: SourceCounts.from_json(v) for k, v in data["sources"].items()})


def manifest_bytes(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n").encode("utf-8")


def read_manifest(out_dir: str) -> Manifest:
    return Manifest.from_json(json.loads(storage.read_bytes(storage.join(out_dir, MANIFEST_NAME))))


def table_bytes(rows: list[dict] | pa.Table, schema: pa.Schema) -> bytes:
    """A parquet file's bytes, written without timestamps so equal rows give equal bytes."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_table(path: str, rows: list[dict] | pa.Table, schema: pa.Schema) -> None:
    storage.write_bytes(path, table_bytes(rows, schema))


def write_dataset_files(out_dir: str, index: pa.Table, rejects: pa.Table, manifest: Manifest) -> None:
    """index.parquet and rejects.parquet, then manifest.json last: once it exists, the dataset is complete."""
    write_table(storage.join(out_dir, INDEX_NAME), index, INDEX_SCHEMA)
    write_table(storage.join(out_dir, REJECTS_NAME), rejects, REJECTS_SCHEMA)
    storage.write_bytes(storage.join(out_dir, MANIFEST_NAME), manifest_bytes(manifest))
