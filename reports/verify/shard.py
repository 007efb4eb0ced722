"""Checking one shard in one read: its bytes through sha256 and a counter, every tar member against the one
tar-member rule, every sample's JSON against the format, its image decoded, its index.parquet row compared."""
from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter

import pyarrow.parquet as pq
from PIL import Image

import storage
from reports.verify.problems import Problem, VerifyOptions
from shards.format import MAX_SAMPLE_JSON_BYTES, MEMBER_EXTENSIONS, SampleError, load_json, sample_problems, sample_text
from shards.loader_config import LoaderConfig
from shards.manifest import ShardEntry
from shards.tar_stream import member_problem

INDEX_CHECK_COLUMNS = ["key", "shard", "offset", "num_captions", "num_regions", "num_objects"]


class _HashingReader(io.RawIOBase):
    """Reads a stream through sha256 and a byte counter (the tar reader sees the same bytes that are hashed)."""

    def __init__(self, stream, on_bytes=None):
        super().__init__()
        self.stream = stream
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha256.update(data)
        self.size += n
        if self.on_bytes and n:
            self.on_bytes(n)
        return n


def check_image(data: bytes, meta: dict | None) -> list[str]:
    """Problems of one stored image: not decodable (Pillow's bomb and truncation checks stay on), more pixels than
    the loader takes (it would skip the sample), not an RGB JPEG, or not the size its JSON states (then its boxes are
    not where the JSON says)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > LoaderConfig.max_pixels:
                return [f"image of {image.width}x{image.height} pixels exceeds the loader's max_pixels "
                        f"{LoaderConfig.max_pixels} (the loader skips it; not decoded here)"]
            image.load()
            problems = []
            if image.format != "JPEG":
                problems.append(f"image is {image.format}, not JPEG")
            if image.mode != "RGB":
                problems.append(f"image mode is {image.mode}, not RGB")
            if isinstance(meta, dict) and isinstance(meta.get("width"), int) and isinstance(meta.get("height"), int) \
                    and image.size != (meta["width"], meta["height"]):
                problems.append(f"image is {image.width}x{image.height} but the JSON says "
                                f"{meta['width']}x{meta['height']}")
            return problems
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        return [f"image does not decode: {type(err).__name__}: {err}"]


def _index_rows(index_local: str | None, shard: str) -> list[dict] | None:
    """This shard's index rows, in tar order (row-group statistics let parquet skip the other shards)."""
    if index_local is None:
        return None
    table = pq.read_table(index_local, columns=INDEX_CHECK_COLUMNS, filters=[("shard", "==", shard)])
    return table.sort_by("offset").to_pylist()


def _sample_problems(where: str, files: dict[str, bytes], offset: int, row: dict | None,
                     options: VerifyOptions) -> list[Problem]:
    out: list[Problem] = []
    key = where.rsplit(": ", 1)[-1]
    missing = [ext for ext in MEMBER_EXTENSIONS if ext not in files]
    if missing:
        out.append(Problem(where, "members", f"missing member(s) {', '.join(key + '.' + e for e in missing)}"))
    meta = None
    if "json" in files:
        try:
            meta = load_json(files["json"], f"{key}.json", max_bytes=MAX_SAMPLE_JSON_BYTES)
        except SampleError as err:
            out.append(Problem(where, "schema", str(err)))
    if meta is not None:
        for p in sample_problems(meta):
            out.append(Problem(where, "schema", p))
        if isinstance(meta, dict) and meta.get("key") != key:
            out.append(Problem(where, "schema", f"JSON key {meta.get('key')!r} differs from the member name {key!r}"))
        if isinstance(meta, dict) and "txt" in files and not sample_problems(meta):
            if files["txt"].decode("utf-8", "replace") != sample_text(meta):
                out.append(Problem(where, "schema", f"{key}.txt is not the first caption / region text"))
    if options.images and "jpg" in files:
        out.extend(Problem(where, "image", p) for p in check_image(files["jpg"], meta))
    if row is not None:
        if row["key"] != key:
            out.append(Problem(where, "index", f"index.parquet has key {row['key']!r} at this position"))
        if row["offset"] != offset:
            out.append(Problem(where, "index", f"index.parquet says byte offset {row['offset']}, the sample starts "
                                               f"at {offset}"))
        if isinstance(meta, dict) and isinstance(meta.get("regions"), list) and isinstance(meta.get("captions"), list):
            kinds = Counter(r.get("kind") for r in meta["regions"] if isinstance(r, dict))
            have = (len(meta["captions"]), kinds.get("region", 0), kinds.get("object", 0))
            want = (row["num_captions"], row["num_regions"], row["num_objects"])
            if have != want:
                out.append(Problem(where, "index", f"index.parquet counts captions/regions/objects {want}, "
                                                   f"the JSON has {have}"))
    return out


def check_shard(path: str, entry: ShardEntry, index_local: str | None, options: VerifyOptions,
                on_bytes=None) -> tuple[int, list[Problem]]:
    """Read one shard once: hash, size, member names, samples. Returns (samples read, problems)."""
    name = entry.name
    problems: list[Problem] = []
    if not storage.exists(path):
        return 0, [Problem(name, "missing_shard", f"listed in the manifest but {path} does not exist")]
    actual_size = storage.size(path)
    if actual_size != entry.bytes:
        problems.append(Problem(name, "size", f"{actual_size} bytes, the manifest says {entry.bytes}"
                                + (" (truncated)" if actual_size < entry.bytes else "")))
    rows = _index_rows(index_local, name)
    if rows is not None and len(rows) != entry.samples:
        problems.append(Problem(name, "index", f"index.parquet has {len(rows)} rows for this shard, the manifest "
                                               f"says {entry.samples} samples"))
    samples = 0
    with storage.open_read(path) as raw:
        reader = _HashingReader(raw, on_bytes)
        stream = io.BufferedReader(reader, buffer_size=1 << 20)
        current: str | None = None
        files: dict[str, bytes] = {}
        start = 0

        def finish() -> None:
            nonlocal samples
            row = rows[samples] if rows is not None and samples < len(rows) else None
            problems.extend(_sample_problems(f"{name}: {current}", files, start, row, options))
            samples += 1

        tar = None
        try:
            tar = tarfile.open(fileobj=stream, mode="r|")
            for info in tar:
                why = member_problem(info)
                if why:
                    problems.append(Problem(name, "member_name", why))
                    continue
                key, _, ext = info.name.partition(".")
                if key != current:
                    if current is not None:
                        finish()
                    current, files, start = key, {}, info.offset
                elif ext in files:
                    problems.append(Problem(f"{name}: {key}", "members", f"member {info.name} appears twice"))
                member = tar.extractfile(info)
                files[ext] = member.read() if member is not None else b""
                if len(files[ext]) != info.size:
                    raise EOFError(f"member {info.name} is cut short")
            if current is not None:
                finish()
                current = None
            stopped = tar.offset
        except (tarfile.TarError, EOFError, OSError) as err:
            stopped = tar.offset if tar is not None else 0
            problems.append(Problem(name, "tar", f"tar data unreadable near byte {stopped}: {type(err).__name__}: "
                                                 f"{err}" + (f" (sample {current} lost)" if current else "")))
        stream.read()   # the rest of the shard through the hash
    # After the archive's end marker only zero padding may follow (at most a 10 KiB tar record and a bit);
    # anything else means tarfile stopped at a damaged header and the samples behind it were not read.
    tail = reader.size - stopped
    if not any(p.kind == "tar" for p in problems) and tail > 0:
        if tail > 64 * 1024 or any(storage.read_bytes(path, stopped, reader.size)):
            problems.append(Problem(name, "tar", f"the tar archive ends at byte {stopped} but {tail} more bytes "
                                                 f"with data follow (a damaged tar header?)"))
    digest = reader.sha256.hexdigest()
    if digest != entry.sha256:
        problems.append(Problem(name, "sha256", f"sha256 is {digest}, the manifest says {entry.sha256}"))
    if samples != entry.samples:
        problems.append(Problem(name, "sample_count", f"{samples} samples read, the manifest says {entry.samples}"))
    return samples, problems
