"""The dataset's side files: manifest.json (written last: the commit marker), index.parquet and rejects.parquet,
and the one reader that checks the manifest (`read_dataset_manifest`) for the loader, `xvlm verify`, `xvlm stats`
and `xvlm show`: bad metadata is refused with the same clear error everywhere (the parquet side files are read
through shards/side_files.py).

The manifest carries the format version, how the dataset was built, per-source counts of input records
(by record kind) split into written and rejected-by-reason, and per shard its sample count, bytes and sha256.
"""
from __future__ import annotations

import io
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

import storage
from storage.errors import XvlmError
from shards.format import (FORMAT_VERSION, INDEX_NAME, MANIFEST_NAME, REJECTS_NAME, SampleError, load_json,
                           parse_shard_name)

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
# The index columns every dataset of this format has: readers refuse an index without them (whichever they read).
REQUIRED_INDEX_COLUMNS = ["key", "shard", "offset", "source", "width", "height", "jpeg_bytes", "passthrough",
                          "num_captions", "num_regions", "num_objects", "caption_lengths", "box_area_fractions"]
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
    """index.parquet, rejects.parquet and the dataset card (README.md), then manifest.json last: once it exists, the
    dataset is complete."""
    from shards.hf_card import write_dataset_card

    write_table(storage.join(out_dir, INDEX_NAME), index, INDEX_SCHEMA)
    write_table(storage.join(out_dir, REJECTS_NAME), rejects, REJECTS_SCHEMA)
    write_dataset_card(out_dir, manifest)
    storage.write_bytes(storage.join(out_dir, MANIFEST_NAME), manifest_bytes(manifest))


# ---------------------------------------------------------------------------------------------- reading, checked

MAX_MANIFEST_BYTES = 256 * 1024 * 1024    # ~1.5M shards; a larger manifest.json is refused unread
_SIDE_FILE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.parquet$")   # index / rejects: a plain name beside it
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_LISTED = 8                            # problems named in the error; all are counted


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it."""
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class DatasetManifest:
    """A dataset's manifest.json, checked: every field a reader uses has its type, every name is a plain file name
    beside the manifest (none can point elsewhere with '/' or '..')."""
    path: str                                 # the dataset folder or s3:// prefix
    format_version: str
    shards: tuple[ShardEntry, ...]
    sources: dict[str, SourceCounts]
    build: dict
    index_name: str = INDEX_NAME
    rejects_name: str = REJECTS_NAME
    raw: dict = field(default_factory=dict, repr=False)   # the JSON as read (reports show parts of it)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def index_path(self) -> str:
        return storage.join(self.path, self.index_name)

    @property
    def rejects_path(self) -> str:
        return storage.join(self.path, self.rejects_name)


def _major(version: str) -> str:
    return str(version).split(".", 1)[0]


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shard_entry(i: int, entry: object, problems: list[str]) -> ShardEntry | None:
    if not isinstance(entry, dict):
        problems.append(f"shards[{i}] is a {type(entry).__name__}, not an object")
        return None
    found = len(problems)
    name = entry.get("name")
    if not isinstance(name, str) or parse_shard_name(name) is None:
        problems.append(f"shards[{i}] has no valid name (PREFIX-NNNNNN.tar, no folder): {name!r:.80}")
    for key in ("samples", "bytes"):
        if not _count(entry.get(key)):
            problems.append(f"shards[{i}].{key} is {entry.get(key)!r:.40}, not a count")
    if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
        problems.append(f"shards[{i}].sha256 is {entry.get('sha256')!r:.80}, not 64 hex digits")
    if len(problems) > found:
        return None
    return ShardEntry(name, entry["samples"], entry["bytes"], entry["sha256"])


def _source_problems(name: str, counts: object) -> list[str]:
    if not isinstance(counts, dict):
        return [f"sources.{name} is not an object"]
    problems = []
    for part in ("inputs", "written"):
        value = counts.get(part, {})
        if not isinstance(value, dict) or not all(_count(n) for n in value.values()):
            problems.append(f"sources.{name}.{part} is not a mapping of record kind to count")
    rejected = counts.get("rejected", {})
    if not isinstance(rejected, dict) or not all(
            isinstance(r, dict) and all(_count(n) for n in r.values()) for r in rejected.values()):
        problems.append(f"sources.{name}.rejected is not a mapping of record kind to {{reason: count}}")
    if not _count(counts.get("clipped_boxes", 0)):
        problems.append(f"sources.{name}.clipped_boxes is not a count")
    return problems


def parse_manifest(raw: bytes, path: str) -> DatasetManifest:
    """Check manifest.json's bytes; raise one XvlmError naming every problem (up to MAX_LISTED) and what to do."""
    where = storage.join(path, MANIFEST_NAME)
    try:
        data = load_json(raw, where, max_bytes=MAX_MANIFEST_BYTES)
    except SampleError as err:
        raise XvlmError(f"{err}; rebuild the dataset (or restore its manifest.json)") from None
    if not isinstance(data, dict):
        raise XvlmError(f"{where} holds a JSON {type(data).__name__}, not a dataset manifest; rebuild the dataset")
    version = data.get("format_version")
    if not isinstance(version, str):
        raise XvlmError(f"{where} has no format_version: not an xvlm dataset manifest")
    if _major(version) != _major(FORMAT_VERSION):
        raise XvlmError(f"dataset {path} has shard format version {version}, this xvlm reads version "
                        f"{FORMAT_VERSION} (major {_major(FORMAT_VERSION)}); rebuild the dataset with this version "
                        f"of `xvlm build-shards` or use a matching xvlm-pipeline release")
    problems: list[str] = []
    entries = data.get("shards")
    shards: list[ShardEntry] = []
    if not isinstance(entries, list):
        problems.append(f"`shards` is {type(entries).__name__}, not a list")
    else:
        shards = [e for i, item in enumerate(entries) if (e := _shard_entry(i, item, problems)) is not None]
    seen: set[str] = set()
    for entry in shards:
        if entry.name in seen:
            problems.append(f"shard {entry.name} is listed twice")
        seen.add(entry.name)
    sources = data.get("sources", {})
    if not isinstance(sources, dict):
        problems.append("`sources` is not an object")
        sources = {}
    for name, counts in sources.items():
        problems.extend(_source_problems(name, counts))
    build = data.get("build", {})
    if not isinstance(build, dict):
        problems.append("`build` is not an object")
    files = data.get("files", {})
    names = {"index": INDEX_NAME, "rejects": REJECTS_NAME}
    if not isinstance(files, dict):
        problems.append("`files` is not an object")
    else:
        for key in names:
            value = files.get(key, names[key])
            if not isinstance(value, str) or not _SIDE_FILE.match(value) or ".." in value:
                problems.append(f"files.{key} is {value!r:.80}, not a .parquet file name beside the manifest")
            else:
                names[key] = value
    if problems:
        listed = "; ".join(problems[:MAX_LISTED]) + (f"; and {len(problems) - MAX_LISTED} more"
                                                      if len(problems) > MAX_LISTED else "")
        raise XvlmError(f"{where} is damaged ({len(problems)} problem(s)): {listed}. Rebuild the dataset (or restore "
                        f"its manifest.json)")
    return DatasetManifest(path=path, format_version=version, shards=tuple(shards), build=build,
                           sources={k: SourceCounts.from_json(v) for k, v in sources.items()},
                           index_name=names["index"], rejects_name=names["rejects"], raw=data)


def read_dataset_manifest(path: str) -> DatasetManifest:
    """The checked manifest of the dataset at `path` (a folder or s3:// prefix); XvlmError when there is none or it
    is damaged."""
    path = str(path).rstrip("/")
    try:
        raw = storage.read_bytes(storage.join(path, MANIFEST_NAME), end=MAX_MANIFEST_BYTES + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raw = None
    if raw is None:
        if storage.list_files(path):
            raise XvlmError(f"dataset {path} has no {MANIFEST_NAME}: the build did not finish (the manifest is "
                            f"written last). Re-run `xvlm build-shards` with the same --out to complete it.")
        raise XvlmError(f"dataset {path} does not exist (no {MANIFEST_NAME} there). Build it with "
                        f"`xvlm build-shards --out {path} ...` or fix the path.")
    return parse_manifest(raw, path)
