"""`xvlm verify`: check a built dataset end to end — every shard against the manifest (presence, size, sha256,
sample count), every tar member name, every sample's JSON against the format, every image decodable, every box
inside its image, index.parquet and rejects.parquet against the manifest — and list every problem found.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import os
import tarfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

import storage
from storage.errors import XvlmError
from shards.format import (INDEX_NAME, MANIFEST_NAME, MAX_SAMPLE_JSON_BYTES, MEMBER_EXTENSIONS, REJECTS_NAME,
                           SampleError, load_json, sample_problems, sample_text)
from shards.loader_config import LoaderConfig
from shards.manifest import REJECTS_SCHEMA, DatasetManifest, ShardEntry, read_dataset_manifest
from shards.side_files import check_columns, iter_batches, open_parquet
from shards.tar_stream import member_problem

log = logging.getLogger(__name__)

INDEX_CHECK_COLUMNS = ["key", "shard", "offset", "num_captions", "num_regions", "num_objects"]
REJECT_COLUMNS = ["source", "kind", "file", "where", "reason", "detail"]

DESCRIPTION = (
    "Check a dataset built by `xvlm build-shards` (a folder or an s3:// prefix) and list every problem:\n"
    "  - manifest.json: readable, a known format version, inputs = written + rejected for every source;\n"
    "  - every shard the manifest lists: present, of the recorded size and sha256, with the recorded sample count;\n"
    "  - every tar member: a plain file with a safe relative name KEY.jpg / KEY.json / KEY.txt;\n"
    "  - every sample: its JSON valid against the format (shards/format.py), its image a decodable RGB JPEG of\n"
    "    the size the JSON states (Pillow, decompression-bomb and truncation checks on), every box inside it,\n"
    "    KEY.txt equal to the first text, and its index.parquet row (key, byte offset, counts) matching;\n"
    "  - rejects.parquet: readable, and its counts equal the manifest's.\n"
    "Given a training run folder (the --out of `xvlm train`) instead, it checks every committed checkpoint: each\n"
    "file its COMMITTED marker lists present with the recorded size and sha256, the marker naming its own step; and\n"
    "says which checkpoint `--resume auto` would continue from.\n"
    "Exits 0 when everything holds, 1 when there is a problem (the list says which shard / sample and what)."
)
EPILOG = (
    "examples:\n"
    "  xvlm verify data/shards\n"
    "  xvlm verify s3://bucket/xvlm/v1 --workers 8 --endpoint-url http://127.0.0.1:8333\n"
    "  xvlm verify data/shards --no-images      # skip image decoding (sizes, hashes, JSON and boxes only)\n"
    "  xvlm verify runs/tiny                    # a training run: its checkpoints against their markers\n"
    "see docs/reports.md."
)


@dataclass(frozen=True)
class Problem:
    where: str        # "manifest.json", "shard-000001.tar", "shard-000001.tar: coco-000000000139"
    kind: str         # short code: missing_shard, size, sha256, sample_count, tar, member_name, schema, image, ...
    detail: str

    def line(self) -> str:
        return f"{self.where}: [{self.kind}] {self.detail}"


@dataclass
class VerifyOptions:
    dataset: str
    images: bool = True           # decode every image
    workers: int = 4              # shards checked in parallel (threads: I/O and Pillow decoding release the GIL)
    progress: bool = True
    max_listed: int = 200         # problems printed in full; all are counted

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise XvlmError(f"--workers must be positive, got {self.workers}")


@dataclass
class VerifyResult:
    dataset: str
    shards: int = 0
    samples: int = 0              # samples read from the shards
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------------------------------------- one shard


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


# ---------------------------------------------------------------------------------------------- the dataset


def _check_accounting(manifest: DatasetManifest, problems: list[Problem]) -> None:
    """inputs = written + rejected, per source and record kind."""
    for source, counts in sorted(manifest.sources.items()):
        for kind in sorted(set(counts.inputs) | set(counts.written) | set(counts.rejected)):
            rejected = sum(counts.rejected.get(kind, {}).values())
            inputs, written = counts.inputs.get(kind, 0), counts.written.get(kind, 0)
            if inputs != written + rejected:
                problems.append(Problem(MANIFEST_NAME, "accounting", f"{source} {kind}: {inputs} inputs != {written} "
                                                                     f"written + {rejected} rejected"))


def _check_index(local: str, manifest: DatasetManifest, problems: list[Problem]) -> None:
    parquet = open_parquet(local, manifest.index_path)
    check_columns(parquet.schema_arrow, INDEX_CHECK_COLUMNS, manifest.index_path)
    per_shard: Counter = Counter()
    for batch in iter_batches(parquet, ["shard"], 262_144):
        counts = pc.value_counts(batch.column("shard"))
        for item in counts.to_pylist():
            per_shard[item["values"]] += item["counts"]
    listed = {e.name for e in manifest.shards}
    for shard, n in sorted(per_shard.items()):
        if shard not in listed:
            problems.append(Problem(INDEX_NAME, "index", f"{n} rows point at shard {shard!r}, which the manifest "
                                                         f"does not list"))


def _check_rejects(path: str, manifest: DatasetManifest, problems: list[Problem]) -> None:
    try:
        with storage.local_copy(path) as local:
            parquet = open_parquet(local, path)
            check_columns(parquet.schema_arrow, REJECT_COLUMNS, path, REJECTS_SCHEMA)
            counted: Counter = Counter()
            for batch in iter_batches(parquet, ["source", "kind", "reason"], 262_144):
                grouped = pa.Table.from_batches([batch]).group_by(["source", "kind", "reason"]).aggregate(
                    [("reason", "count")])
                for row in grouped.to_pylist():
                    counted[(row["source"], row["kind"], row["reason"])] += row["reason_count"]
    except FileNotFoundError:
        problems.append(Problem(REJECTS_NAME, "missing_file", f"{path} does not exist"))
        return
    except XvlmError as err:   # not parquet, or not the format's columns: reported with the same message
        problems.append(Problem(REJECTS_NAME, "rejects", str(err)))
        return
    except Exception as err:  # noqa: BLE001 - any parquet failure is the file's problem, reported
        problems.append(Problem(REJECTS_NAME, "rejects", f"unreadable: {type(err).__name__}: {err}"))
        return
    expected: Counter = Counter()
    for source, counts in manifest.sources.items():
        for kind, reasons in counts.rejected.items():
            for reason, n in reasons.items():
                if n:
                    expected[(source, kind, reason)] += n
    for key in sorted(set(expected) | set(counted)):
        if expected[key] != counted[key]:
            problems.append(Problem(REJECTS_NAME, "rejects", f"{'/'.join(key)}: {counted[key]} rows, the manifest "
                                                             f"counts {expected[key]}"))


def verify(options: VerifyOptions) -> VerifyResult:
    """Every check; never stops at the first problem."""
    manifest = read_dataset_manifest(options.dataset)   # a damaged manifest: the same error as every reader
    path = manifest.path
    result = VerifyResult(dataset=path)
    problems = result.problems
    _check_accounting(manifest, problems)
    entries = list(manifest.shards)
    result.shards = len(entries)
    index_path = manifest.index_path
    _check_rejects(manifest.rejects_path, manifest, problems)
    total_bytes = sum(e.bytes for e in entries)
    with contextlib.ExitStack() as stack:
        try:
            index_local = stack.enter_context(storage.local_copy(index_path))
        except FileNotFoundError:
            problems.append(Problem(INDEX_NAME, "missing_file", f"{index_path} does not exist"))
            index_local = None
        if index_local is not None:
            try:
                _check_index(index_local, manifest, problems)
            except XvlmError:
                raise
            except Exception as err:  # noqa: BLE001 - reported as the index's problem
                problems.append(Problem(INDEX_NAME, "index", f"unreadable: {type(err).__name__}: {err}"))
                index_local = None
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="verify",
                   disable=not options.progress, mininterval=0.5, dynamic_ncols=True)
        lock = threading.Lock()

        def on_bytes(n: int) -> None:
            with lock:
                bar.update(n)

        def one(entry: ShardEntry) -> tuple[int, list[Problem]]:
            try:
                return check_shard(storage.join(path, entry.name), entry, index_local, options, on_bytes)
            except Exception as err:  # noqa: BLE001 - storage errors after retries: the shard's problem
                return 0, [Problem(entry.name, "read_error", f"{type(err).__name__}: {err}")]

        with ThreadPoolExecutor(max_workers=options.workers) as pool:
            for samples, found in pool.map(one, entries):   # map keeps the manifest's order in the output
                result.samples += samples
                problems.extend(found)
        bar.close()
    # shards on disk that the manifest does not list (e.g. from another build into the same folder)
    listed = {e.name for e in entries}
    for item in storage.list_files(path, recursive=False):
        name = item.path.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".tar") and name not in listed:
            problems.append(Problem(name, "extra_shard", "a .tar file in the dataset that the manifest does not list"))
    return result


def report_lines(result: VerifyResult, max_listed: int = 200) -> list[str]:
    """The printed report: one line per problem (grouped by place, in order), then a one-line verdict."""
    lines = []
    if result.problems:
        lines.append(f"PROBLEMS in {result.dataset}:")
        for problem in result.problems[:max_listed]:
            lines.append("  " + problem.line())
        if len(result.problems) > max_listed:
            lines.append(f"  ... and {len(result.problems) - max_listed} more (--max-listed to see them)")
        kinds = Counter(p.kind for p in result.problems)
        places = len({p.where.split(": ", 1)[0] for p in result.problems})
        lines.append(f"FAILED: {len(result.problems)} problem(s) in {places} file(s): "
                     + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    else:
        lines.append(f"OK: {result.dataset}: {result.shards} shards, {result.samples} samples; every check passed")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATASET|RUN",
                        help="dataset folder or s3://bucket/prefix (with manifest.json), or a training run folder "
                             "(--out of `xvlm train`) or one of its checkpoint folders")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                        help="shards checked in parallel (default min(4, CPUs))")
    parser.add_argument("--no-images", action="store_true",
                        help="do not decode images (still checks hashes, sizes, names, JSON and boxes)")
    parser.add_argument("--max-listed", type=int, default=200, metavar="N",
                        help="problems printed in full (all are counted; default 200)")
    parser.add_argument("--endpoint-url", default=None, metavar="URL",
                        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.endpoint_url:
        storage.set_endpoint_url(args.endpoint_url)
    from tools import verify_run

    if not storage.exists(storage.join(args.dataset, MANIFEST_NAME)) and verify_run.is_run(args.dataset):
        checked = verify_run.verify_run(args.dataset, progress=not args.no_progress)
        for line in verify_run.report_lines(checked, args.max_listed):
            print(line)
        return 0 if checked.ok and checked.committed else 1
    options = VerifyOptions(dataset=args.dataset, images=not args.no_images, workers=args.workers,
                            progress=not args.no_progress, max_listed=args.max_listed)
    result = verify(options)
    for line in report_lines(result, options.max_listed):
        print(line)
    return 0 if result.ok else 1
