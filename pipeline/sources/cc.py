"""Conceptual Captions: (a) img2dataset webdataset output — NNNNN.tar + NNNNN.parquet, rows with status success,
the image inside the tar — or (b) the caption TSV (caption TAB url, no header) + images/ROW.jpg.

The TSV is read record by record with the csv module's rules, as the downloaders (pandas) number its rows: a quoted
field may hold tabs and newlines, blank lines are not records. ROW counts records from 0, so neither a blank line
nor a caption split over two lines shifts the pairing of captions and images.

The mode follows the folder: .tar / .parquet files in it mean (a), a .tsv means (b). Tars are read as streams,
member by member, never extracted: a member with an absolute or '..' path, or a link, is rejected as
`unsafe_tar_member` and its bytes are never used; an image's ImageRef carries its byte range in the tar.

CC12M is read by the same code (`iter_release` with its `Release`: source name, TSV name, column order).
"""
from __future__ import annotations

import csv
import io
import logging
import tarfile
from dataclasses import dataclass
from typing import Iterator

from pipeline.records import Annotation, ImageRef, Reject, make_ref
from pipeline.sources import safe_id
from shards.tar_stream import unsafe_member, unsafe_name
from pipeline.textclean import decode_strict
import storage
from storage.errors import XvlmError

log = logging.getLogger(__name__)

NAME = "cc"
DESCRIPTION = "img2dataset webdataset output (NNNNN.tar + NNNNN.parquet) or Train_GCC-training.tsv + images/ROW.jpg"
TRAIN_TSV = "Train_GCC-training.tsv"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Release:
    """A caption release read by this module: CC3M here, CC12M (pipeline/sources/cc12m.py) with its own values."""
    name: str              # the source name in records and rejects
    train_tsv: str         # the TSV's name in the release
    url_column: int        # 1: caption<TAB>url (CC3M); 0: url<TAB>caption (CC12M)


CC3M = Release(NAME, TRAIN_TSV, 1)


def sample_key(source_id: str) -> str:
    # img2dataset keys are 9 digits; TSV rows are padded the same so both sort by number.
    return f"cc-{source_id.zfill(9)}" if source_id.isdigit() else f"cc-{source_id}"


def _rel(path: str, root: str) -> str:
    return path[len(root.rstrip("/")) + 1:] if path.startswith(root.rstrip("/") + "/") else path


# ---------------------------------------------------------------------------------------------- img2dataset


@dataclass(frozen=True)
class Member:
    name: str
    offset: int
    size: int
    unsafe: str | None   # why the member must not be used, or None


def scan_tar(path: str) -> tuple[dict[str, Member], list[Member], str | None]:
    """Every member of a tar, header by header: (first member per name, unsafe members, error or None).
    Nothing is extracted. A local tar is read by seeking from header to header; an S3 tar as one stream."""
    members: dict[str, Member] = {}
    unsafe: list[Member] = []
    try:
        with storage.open_read(path) as f, tarfile.open(fileobj=f, mode="r:" if storage.local_path(path) else "r|") as tar:
            for info in tar:
                if info.isdir() and unsafe_name(info.name) is None:
                    continue  # a plain folder entry holds no data
                member = Member(info.name, info.offset_data, info.size, unsafe_member(info))
                if member.unsafe:
                    unsafe.append(member)
                members.setdefault(info.name, member)
                tar.members = []  # tarfile keeps every TarInfo otherwise (30k per img2dataset shard)
    except (tarfile.TarError, OSError, EOFError) as err:
        return members, unsafe, f"{type(err).__name__}: {err}"
    return members, unsafe, None


def _text_column(table, name: str) -> list[bytes | None]:
    import pyarrow as pa

    if name not in table.column_names:
        return [None] * table.num_rows
    column = table.column(name)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = column.cast(pa.binary() if pa.types.is_string(column.type) else pa.large_binary())
    return column.to_pylist()


def _img2dataset_shard(root: str, parquet_path: str, tar_path: str | None,
                       release: Release = CC3M) -> Iterator[ImageRef | Annotation | Reject]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rel = _rel(parquet_path, root)
    try:
        table = pq.read_table(pa.BufferReader(storage.read_bytes(parquet_path)))
    except Exception as err:  # noqa: BLE001 - any unreadable parquet is one counted reject, the rest goes on
        yield Reject(release.name, "line", rel, "whole file", "malformed_line", f"unreadable parquet: {err}"[:300])
        return
    for column in ("key", "status"):
        if column not in table.column_names:
            yield Reject(release.name, "line", rel, "whole file", "malformed_line", f"no {column!r} column (not img2dataset output?)")
            return
    members, unsafe, error = scan_tar(tar_path) if tar_path else ({}, [], "no tar beside the parquet")
    tar_rel = _rel(tar_path, root) if tar_path else rel[:-len(".parquet")] + ".tar"
    if error:
        yield Reject(release.name, "line", tar_rel, "whole file" if not members else f"after member {len(members)}",
                     "malformed_line", f"tar not readable to its end: {error}"[:300])
    keys = _text_column(table, "key")
    statuses = table.column("status").to_pylist()
    captions = _text_column(table, "caption")
    errors = table.column("error_message").to_pylist() if "error_message" in table.column_names else [None] * len(keys)
    widths = table.column("width").to_pylist() if "width" in table.column_names else [None] * len(keys)
    heights = table.column("height").to_pylist() if "height" in table.column_names else [None] * len(keys)
    used: set[str] = set()
    for row, (raw_key, status, caption, message, width, height) in enumerate(
            zip(keys, statuses, captions, errors, widths, heights)):
        key = decode_strict(raw_key) if isinstance(raw_key, bytes) else None
        where = f"row {row}" + (f" key {key}" if key else "")
        if not key:
            detail = "row without a key" if raw_key is None or isinstance(raw_key, bytes) else \
                f"key is {type(raw_key).__name__} {raw_key!r:.40}, not a string (not img2dataset output?)"
            yield Reject(release.name, "image", rel, where, "malformed_line", detail)
            if caption is not None:
                yield Reject(release.name, "caption", rel, where, "no_image_record", detail)
            continue
        if status != "success":
            detail = f"status {status!r:.60}" + (f": {message}" if isinstance(message, str) and message else "")
            yield Reject(release.name, "image", rel, where, "status_not_success", detail[:300])
            if caption is not None:
                yield Reject(release.name, "caption", rel, where, "status_not_success", detail[:300])
            continue
        source_id = safe_id(key)
        member = next((members[f"{key}.{ext}"] for ext in IMAGE_EXTENSIONS if f"{key}.{ext}" in members), None)
        if member is None or member.unsafe:
            reason, detail = ("missing_image", f"no {key}.jpg/png/webp in {tar_rel}") if member is None else \
                ("unsafe_tar_member", f"{tar_rel}: {member.name!r:.120} is {member.unsafe}")
            if member is not None:
                used.add(member.name)
            yield Reject(release.name, "image", rel, where, reason, detail)
            if caption is not None:  # the row's caption goes with its image
                yield Reject(release.name, "caption", rel, where, reason, detail)
            continue
        used.add(member.name)
        # img2dataset writes the stored image's size; pandas makes it float when a shard has failures.
        ok_size = all(isinstance(v, (int, float)) and v == v and v > 0 and float(v).is_integer()
                      for v in (width, height))
        yield ImageRef(release.name, source_id, f"{tar_path}#{member.name}", int(width) if ok_size else None,
                       int(height) if ok_size else None, ref=make_ref(rel, where),
                       byte_offset=member.offset, byte_size=member.size)
        if caption is None:
            continue  # no caption: the image alone is rejected as no_annotations when grouped
        text = decode_strict(caption) if isinstance(caption, bytes) else None
        if not isinstance(caption, bytes):
            yield Reject(release.name, "caption", rel, where, "malformed_line",
                         f"caption is {type(caption).__name__} {caption!r:.60}, not a string")
        elif text is None:
            yield Reject(release.name, "caption", rel, where, "invalid_utf8", f"{caption[:120]!r}")
        else:
            yield Annotation(release.name, source_id, "caption", text, ref=make_ref(rel, where))
    # Unsafe members that are no sample's image: counted, never read.
    for member in unsafe:
        if member.name not in used:
            yield Reject(release.name, "line", tar_rel, f"member {member.name}"[:200], "unsafe_tar_member",
                         f"{member.unsafe}; not read")


def _img2dataset(root: str, entries: list[storage.Entry], release: Release = CC3M) -> Iterator[ImageRef | Annotation | Reject]:
    parquets = {e.path[:-len(".parquet")]: e.path for e in entries if e.path.endswith(".parquet")}
    tars = {e.path[:-len(".tar")]: e.path for e in entries if e.path.endswith(".tar")}
    for stem in sorted(set(parquets) | set(tars)):
        if stem not in parquets:
            yield Reject(release.name, "line", _rel(tars[stem], root), "whole file", "malformed_line",
                         "no .parquet beside this tar (img2dataset writes both); its samples are not read")
            continue
        yield from _img2dataset_shard(root, parquets[stem], tars.get(stem), release)


# ---------------------------------------------------------------------------------------------- TSV


def _tsv_file(entries: list[storage.Entry], release: Release = CC3M) -> str:
    tsvs = [e.path for e in entries if e.path.endswith(".tsv")]
    for path in tsvs:
        if path.rsplit("/", 1)[-1] == release.train_tsv:
            return path
    if len(tsvs) == 1:
        return tsvs[0]
    raise XvlmError(f"several caption TSVs and no {release.train_tsv}: {[t.rsplit('/', 1)[-1] for t in tsvs]}; "
                    f"point {release.name}=PATH at a folder with one TSV and its images/ folder")


MAX_RECORD_LINES = 8      # a record spanning more lines has an unclosed quote that swallowed the lines after it


def _valid_text(field: str) -> str | None:
    """A field read with surrogateescape, or None when its bytes were not UTF-8."""
    try:
        field.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return field


def _tsv(root: str, tsv_path: str, release: Release = CC3M) -> Iterator[ImageRef | Annotation | Reject]:
    rel = _rel(tsv_path, root)
    csv.field_size_limit(1 << 20)
    with storage.open_read(tsv_path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text, delimiter="\t")
        row, first_line = -1, 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as err:      # e.g. a field over the size limit: one record, counted
                row += 1
                yield Reject(release.name, "line", rel, f"line {first_line}", "malformed_line", f"unreadable record: {err}")
                first_line = reader.line_num + 1
                continue
            where, lines = f"line {first_line}", reader.line_num - first_line + 1
            first_line = reader.line_num + 1
            if not fields:
                continue                   # a blank line is not a record: it takes no row number
            row += 1                       # images/ROW.jpg counts records from 0 (no header)
            yield from _tsv_record(root, rel, row, where, lines, fields, release)


def _tsv_record(root: str, rel: str, row: int, where: str, lines: int, fields: list[str],
                release: Release = CC3M) -> Iterator[ImageRef | Annotation | Reject]:
    u = release.url_column
    url = _valid_text(fields[u]).strip() if len(fields) == 2 and _valid_text(fields[u]) is not None else None
    if len(fields) != 2 or not url or not url.startswith(("http://", "https://")) or lines > MAX_RECORD_LINES:
        layout = "caption<TAB>url" if u == 1 else "url<TAB>caption"
        why = f"an unclosed quote joined {lines} lines into this record" if lines > MAX_RECORD_LINES else \
            f"expected '{layout}', got {len(fields)} field(s)"
        shown = "\t".join(fields).encode("utf-8", "surrogateescape")[:120]
        yield Reject(release.name, "line", rel, where, "malformed_line", f"{why}: {shown!r}")
        return
    source_id = str(row)
    yield ImageRef(release.name, source_id, storage.join(root, "images", f"{row}.jpg"), ref=make_ref(rel, where))
    caption = _valid_text(fields[1 - u])
    if caption is None:
        yield Reject(release.name, "caption", rel, where, "invalid_utf8",
                     f"{fields[1 - u].encode('utf-8', 'surrogateescape')[:120]!r}")
    else:
        yield Annotation(release.name, source_id, "caption", caption, ref=make_ref(rel, where))


def iter_release(path: str, release: Release) -> Iterator[ImageRef | Annotation | Reject]:
    """The records of a caption release at `path`: img2dataset output when the folder holds .tar / .parquet files,
    else its caption TSV with images/ROW.jpg."""
    entries = storage.list_files(path, recursive=False)
    if any(e.path.endswith((".tar", ".parquet")) for e in entries):
        yield from _img2dataset(path, entries, release)
    elif any(e.path.endswith(".tsv") for e in entries):
        yield from _tsv(path, _tsv_file(entries, release), release)
    else:
        raise XvlmError(f"{path} holds neither img2dataset output (NNNNN.tar + NNNNN.parquet) nor a caption TSV: "
                        f"point {release.name}=PATH at one of them (sample data: {release.name}/ for the TSV, "
                        f"{release.name}/img2dataset for webdataset)")


def iter_records(path: str) -> Iterator[ImageRef | Annotation | Reject]:
    yield from iter_release(path, CC3M)
