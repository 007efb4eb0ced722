"""Open a built dataset (local folder or `s3://` prefix) for reading: manifest, format version, shards, index;
whatever is wrong with it is raised as an XvlmError before training starts.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from shards import storage
from shards.errors import XvlmError
from shards.format import FORMAT_VERSION, INDEX_NAME, MANIFEST_NAME

log = logging.getLogger(__name__)

# Index columns the loader needs (FORMAT.md, "index.parquet").
_INDEX_COLUMNS = ["key", "shard", "offset", "source", "num_captions", "num_regions", "num_objects"]


@dataclass
class ShardIndex:
    """One shard of a dataset with the per-sample arrays of its index rows (in tar order)."""
    name: str
    path: str
    samples: int
    bytes: int
    offsets: np.ndarray          # int64 [samples]: byte offset of each sample's first tar header
    keys: list[str]
    sources: list[str]
    has_caption: np.ndarray      # bool [samples]
    has_region: np.ndarray       # bool [samples]: at least one region or object box
    num_captions: np.ndarray     # int64 [samples]: whole-image captions
    num_regions: np.ndarray      # int64 [samples]: boxes of kind "region" (region phrases)
    num_objects: np.ndarray      # int64 [samples]: boxes of kind "object"

    def end_offset(self, i: int) -> int:
        """Byte where sample i ends (the next sample's header, or the shard's end-of-archive blocks)."""
        return int(self.offsets[i + 1]) if i + 1 < self.samples else self.bytes


@dataclass
class Dataset:
    """A built dataset: its manifest and shards, ready for streaming."""
    path: str
    manifest: dict
    shards: list[ShardIndex] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def fingerprint(self) -> str:
        """Identifies the exact shard contents (names + sha256); a resume refuses a changed dataset."""
        h = hashlib.sha256()
        for s in self.manifest["shards"]:
            h.update(f"{s['name']}:{s['samples']}:{s.get('sha256', '')};".encode())
        return h.hexdigest()[:16]


def _major(version: str) -> str:
    return str(version).split(".", 1)[0]


def open_dataset(path: str) -> Dataset:
    """Read and check manifest.json and index.parquet of the dataset at `path` (a folder or s3:// prefix)."""
    path = str(path).rstrip("/")
    manifest_path = storage.join(path, MANIFEST_NAME)
    try:
        raw = storage.read_bytes(manifest_path)
    except FileNotFoundError:
        raw = None
    if raw is None:
        if storage.list_files(path):
            raise XvlmError(f"dataset {path} has no {MANIFEST_NAME}: the build did not finish (the manifest is "
                            f"written last). Re-run `xvlm build-shards` with the same --out to complete it.")
        raise XvlmError(f"dataset {path} does not exist (no {MANIFEST_NAME} there). Build it with "
                        f"`xvlm build-shards --out {path} ...` or fix the path.")
    try:
        manifest = json.loads(raw)
    except ValueError as err:
        raise XvlmError(f"{manifest_path} is not valid JSON ({err}); rebuild the dataset") from err
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version is None:
        raise XvlmError(f"{manifest_path} has no format_version: not an xvlm dataset manifest")
    if _major(version) != _major(FORMAT_VERSION):
        raise XvlmError(f"dataset {path} has shard format version {version}, this loader reads version "
                        f"{FORMAT_VERSION} (major {_major(FORMAT_VERSION)}); rebuild the dataset with this "
                        f"version of `xvlm build-shards` or use a matching xvlm-pipeline release")
    entries = manifest.get("shards") or []
    total = sum(int(s.get("samples", 0)) for s in entries)
    if total == 0:
        raise XvlmError(f"dataset {path} is empty (its manifest lists {len(entries)} shard(s) and 0 samples); "
                        f"check the build summary and rejects.parquet for why nothing was written")
    index_name = manifest.get("files", {}).get("index", INDEX_NAME)
    index_path = storage.join(path, index_name)
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(index_path)), columns=_INDEX_COLUMNS)
    except FileNotFoundError as err:
        raise XvlmError(f"dataset {path} has no {index_name}; rebuild the dataset") from err
    by_shard: dict[str, list[int]] = {}
    for row, shard in enumerate(table.column("shard").to_pylist()):
        by_shard.setdefault(shard, []).append(row)
    cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in _INDEX_COLUMNS}
    dataset = Dataset(path=path, manifest=manifest)
    for entry in entries:
        rows = np.asarray(by_shard.get(entry["name"], []), dtype=np.int64)
        if len(rows) != int(entry["samples"]):
            raise XvlmError(f"dataset {path}: {index_name} has {len(rows)} rows for shard {entry['name']} but the "
                            f"manifest says {entry['samples']} samples; the dataset is inconsistent, rebuild it")
        offsets = cols["offset"][rows].astype(np.int64)
        order = np.argsort(offsets, kind="stable")  # tar order
        rows, offsets = rows[order], offsets[order]
        if entry["samples"] == 0:
            continue
        dataset.shards.append(ShardIndex(
            name=entry["name"], path=storage.join(path, entry["name"]), samples=int(entry["samples"]),
            bytes=int(entry["bytes"]), offsets=offsets, keys=[str(k) for k in cols["key"][rows]],
            sources=[str(s) for s in cols["source"][rows]],
            has_caption=cols["num_captions"][rows] > 0,
            has_region=(cols["num_regions"][rows] + cols["num_objects"][rows]) > 0,
            num_captions=cols["num_captions"][rows].astype(np.int64),
            num_regions=cols["num_regions"][rows].astype(np.int64),
            num_objects=cols["num_objects"][rows].astype(np.int64)))
    log.info("dataset %s: %d samples in %d shards (format %s)", path, dataset.samples, len(dataset.shards), version)
    return dataset


def open_datasets(paths: list[str]) -> list[Dataset]:
    """Open several datasets; all are checked before any is used."""
    if not paths:
        raise XvlmError("no dataset given: pass one or more dataset folders / s3:// prefixes built by "
                        "`xvlm build-shards`")
    return [open_dataset(p) for p in paths]
