"""Finding samples through index.parquet (by key, or N at random) and reading only their tar members, from their
byte offset in their shard (a ranged read on S3)."""
from __future__ import annotations

import tarfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import storage
from shards.format import MAX_SAMPLE_JSON_BYTES, SampleError, load_json
from shards.manifest import DatasetManifest
from shards.side_files import SideFile, open_side_file
from shards.tar_stream import member_problem
from storage.errors import XvlmError


@dataclass
class ShardSample:
    key: str
    shard: str
    offset: int
    jpg: bytes
    meta: dict
    txt: str


COLUMNS = ["key", "shard", "offset"]


def find_rows(manifest: DatasetManifest, keys: list[str] | None = None, random_n: int = 0,
              seed: int = 0) -> list[dict]:
    """Index rows (key, shard, offset) of the given keys (in the order given) or of N random samples."""
    try:
        with open_side_file(manifest, "index", COLUMNS) as index:
            return _rows_by_key(index, keys, manifest.path) if keys else _random_rows(index, random_n, seed)
    except FileNotFoundError:
        raise XvlmError(f"{manifest.index_path} does not exist; is {manifest.path} a dataset built by "
                        f"`xvlm build-shards`?") from None


def _rows_by_key(index: SideFile, keys: list[str], dataset: str) -> list[dict]:
    found: dict[str, dict] = {}
    wanted = set(keys)
    for batch in index.batches(COLUMNS):
        for row in batch.filter(_is_in(batch, wanted)).to_pylist():
            found[row["key"]] = row
    missing = [k for k in keys if k not in found]
    if missing:
        raise XvlmError(f"key(s) {', '.join(missing)} not in {index.path}; keys look like "
                        f"coco-000000000139 (see index.parquet or `xvlm show {dataset} --random 5`)")
    return [found[k] for k in keys]


def _random_rows(index: SideFile, random_n: int, seed: int) -> list[dict]:
    total = index.rows
    if total == 0:
        raise XvlmError(f"{index.path} has no rows: the dataset is empty")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(total, size=min(random_n, total), replace=False).tolist())
    rows, start, pick = [], 0, 0
    for batch in index.batches(COLUMNS):
        while pick < len(chosen) and chosen[pick] < start + batch.num_rows:
            rows.append(batch.slice(chosen[pick] - start, 1).to_pylist()[0])
            pick += 1
        start += batch.num_rows
    return rows


def _is_in(batch, wanted: set[str]):
    return pc.is_in(batch.column("key"), value_set=pa.array(sorted(wanted), pa.string()))


def read_sample(manifest: DatasetManifest, row: dict) -> ShardSample:
    """The members of one sample, read from its byte offset in its shard (a ranged read on S3)."""
    dataset = manifest.path
    entry = next((s for s in manifest.shards if s.name == row["shard"]), None)
    if entry is None or not isinstance(row["offset"], int) or not 0 <= row["offset"] < entry.bytes:
        raise XvlmError(f"index.parquet puts sample {row['key']!r} at byte {row['offset']} of {row['shard']!r}, "
                        f"which the manifest does not list or is not that long; run `xvlm verify {dataset}`")
    path = storage.join(dataset, entry.name)
    files: dict[str, bytes] = {}
    try:
        with storage.open_read(path, start=int(row["offset"])) as stream:
            tar = tarfile.open(fileobj=stream, mode="r|")
            for info in tar:
                key, _, ext = info.name.partition(".")
                if key != row["key"]:
                    break
                why = member_problem(info)
                if why:
                    raise XvlmError(f"{row['shard']}: {why}; run `xvlm verify {dataset}`")
                member = tar.extractfile(info)
                files[ext] = member.read() if member is not None else b""
                if len(files) == 3:
                    break
    except FileNotFoundError:
        raise XvlmError(f"shard {path} does not exist; run `xvlm verify {dataset}`") from None
    except (tarfile.TarError, EOFError) as err:
        raise XvlmError(f"cannot read sample {row['key']} at byte {row['offset']} of {path} ({err}); "
                        f"run `xvlm verify {dataset}`") from None
    if "jpg" not in files or "json" not in files:
        raise XvlmError(f"sample {row['key']} at byte {row['offset']} of {path} has members {sorted(files)}, "
                        f"not jpg + json; run `xvlm verify {dataset}`")
    try:
        meta = load_json(files["json"], f"{row['key']}.json in {path}", max_bytes=MAX_SAMPLE_JSON_BYTES)
    except SampleError as err:
        raise XvlmError(f"{err}; run `xvlm verify {dataset}`") from None
    if not isinstance(meta, dict):
        raise XvlmError(f"{row['key']}.json in {path} is not a JSON object; run `xvlm verify {dataset}`")
    return ShardSample(row["key"], row["shard"], int(row["offset"]), files["jpg"], meta,
                       files.get("txt", b"").decode("utf-8", "replace"))
