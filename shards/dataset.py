"""Open a built dataset (local folder or `s3://` prefix) for reading: manifest, format version, shards, index;
whatever is wrong with it is raised as an XvlmError before training starts.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

import storage
from storage.errors import XvlmError
from shards.format import valid_key
from shards.manifest import DatasetManifest, ShardEntry, read_dataset_manifest
from shards.side_files import open_side_file

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
    manifest: DatasetManifest
    shards: list[ShardIndex] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def fingerprint(self) -> str:
        """Identifies the exact shard contents (names + sha256); a resume refuses a changed dataset."""
        h = hashlib.sha256()
        for s in self.manifest.shards:
            h.update(f"{s.name}:{s.samples}:{s.sha256};".encode())
        return h.hexdigest()[:16]


def _index_table(manifest: DatasetManifest) -> pa.Table:
    """The index columns the loader needs, checked for the format's types and for nulls."""
    try:
        with open_side_file(manifest, "index", _INDEX_COLUMNS) as index:
            table = index.read(_INDEX_COLUMNS)
    except FileNotFoundError as err:
        raise XvlmError(f"dataset {manifest.path} has no {manifest.index_name}; rebuild the dataset") from err
    nulls = [name for name in _INDEX_COLUMNS if table.column(name).null_count]
    if nulls:
        raise XvlmError(f"{manifest.index_path} has empty values in {nulls}; rebuild the dataset")
    return table


def _check_offsets(manifest: DatasetManifest, entry: ShardEntry, offsets: np.ndarray, keys: list[str]) -> None:
    """Sample offsets must lie inside the shard and be distinct, keys be tar-safe: the loader reads the byte
    ranges between consecutive offsets, so a damaged index must not send it anywhere else."""
    bad = ""
    if len(offsets) and (offsets[0] < 0 or offsets[-1] >= entry.bytes):
        bad = f"an offset outside its {entry.bytes} bytes"
    elif np.any(np.diff(offsets) <= 0):
        bad = "two samples at one offset"
    elif not all(valid_key(k) for k in keys):
        bad = "a key with characters other than letters, digits, '_' and '-'"
    if bad:
        raise XvlmError(f"dataset {manifest.path}: {manifest.index_name} gives shard {entry.name} {bad}; the index "
                        f"is damaged, rebuild the dataset")


def open_dataset(path: str) -> Dataset:
    """Read and check manifest.json and index.parquet of the dataset at `path` (a folder or s3:// prefix)."""
    manifest = read_dataset_manifest(path)
    path = manifest.path
    if manifest.samples == 0:
        raise XvlmError(f"dataset {path} is empty (its manifest lists {len(manifest.shards)} shard(s) and 0 samples); "
                        f"check the build summary and rejects.parquet for why nothing was written")
    table = _index_table(manifest)
    by_shard: dict[str, list[int]] = {}
    for row, shard in enumerate(table.column("shard").to_pylist()):
        by_shard.setdefault(shard, []).append(row)
    cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in _INDEX_COLUMNS}
    dataset = Dataset(path=path, manifest=manifest)
    for entry in manifest.shards:
        rows = np.asarray(by_shard.get(entry.name, []), dtype=np.int64)
        if len(rows) != entry.samples:
            raise XvlmError(f"dataset {path}: {manifest.index_name} has {len(rows)} rows for shard {entry.name} but "
                            f"the manifest says {entry.samples} samples; the dataset is inconsistent, rebuild it")
        if entry.samples == 0:
            continue
        offsets = cols["offset"][rows].astype(np.int64)
        order = np.argsort(offsets, kind="stable")  # tar order
        rows, offsets = rows[order], offsets[order]
        keys = [str(k) for k in cols["key"][rows]]
        _check_offsets(manifest, entry, offsets, keys)
        dataset.shards.append(ShardIndex(
            name=entry.name, path=storage.join(path, entry.name), samples=entry.samples, bytes=entry.bytes,
            offsets=offsets, keys=keys, sources=[str(s) for s in cols["source"][rows]],
            has_caption=cols["num_captions"][rows] > 0,
            has_region=(cols["num_regions"][rows] + cols["num_objects"][rows]) > 0,
            num_captions=cols["num_captions"][rows].astype(np.int64),
            num_regions=cols["num_regions"][rows].astype(np.int64),
            num_objects=cols["num_objects"][rows].astype(np.int64)))
    log.info("dataset %s: %d samples in %d shards (format %s)", path, dataset.samples, len(dataset.shards),
             manifest.format_version)
    return dataset


def open_datasets(paths: list[str]) -> list[Dataset]:
    """Open several datasets; all are checked before any is used."""
    if not paths:
        raise XvlmError("no dataset given: pass one or more dataset folders / s3:// prefixes built by "
                        "`xvlm build-shards`")
    return [open_dataset(p) for p in paths]
