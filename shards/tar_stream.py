"""Read a range of samples of one tar shard from a byte stream starting at an indexed offset, one result per
planned sample: a RawSample, or a Skipped for damage (corrupt, unsafe or truncated) that never stops the stream.
"""
from __future__ import annotations

import logging
import posixpath
import tarfile
import time
from dataclasses import dataclass
from typing import Iterator

import storage
from shards.dataset import ShardIndex
from shards import format as shard_format
from shards.format import MEMBER_EXTENSIONS, valid_key

log = logging.getLogger(__name__)

# Skip reasons (stable strings; the loader's counters use them).
CORRUPT = "corrupt_sample"        # bad tar header / member data, missing jpg or json, unreadable content
TRUNCATED = "truncated_shard"     # the shard ends before this sample
UNSAFE = "unsafe_member"          # not a plain KEY.EXT file: a link, a sparse file, a folder in the name, too large
READ_ERROR = "read_error"         # storage kept failing after its retries and ours

READ_RETRIES = 3                  # reopenings at the failed sample (after 1, 2, 4 s) before it is skipped


@dataclass
class RawSample:
    """The undecoded members of one sample: files maps extension ('jpg', 'json', 'txt') to bytes."""
    index: int                    # sample number within the shard
    key: str
    files: dict[str, bytes]


@dataclass
class Skipped:
    index: int
    key: str
    reason: str
    detail: str = ""


def unsafe_name(name: str) -> str | None:
    """Why a tar member's name must not be used as a path, or None: absolute, or with a '..' part."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in posixpath.normpath(name).split("/") or ".." in name.replace("\\", "/").split("/"):
        return "a path with '..'"
    return None


def unsafe_member(info: tarfile.TarInfo) -> str | None:
    """Why a member of any tar we read (a release's img2dataset tars, our shards) must not be read, or None: the one
    tar-member rule. An absolute or '..' path, a link, anything but a regular file, or a sparse file (tarfile reads
    a GNU sparse member as its expanded size: 0.6 MB of shard became 3 GiB in memory)."""
    name_problem = unsafe_name(info.name)
    if name_problem:
        return name_problem
    if info.issym() or info.islnk():
        return f"a link to {info.linkname!r:.80}"
    if not info.isreg():
        return f"not a regular file (tar type {info.type!r})"
    if info.issparse():
        return "a sparse file"
    return None


def member_problem(info: tarfile.TarInfo) -> str:
    """Why a shard's tar member must not be read, or '' when it may (the loader, `xvlm verify`, `xvlm show`): the
    tar-member rule (`unsafe_member`), then the shard format's own: named KEY.EXT with a safe key and a format
    extension (no folder), of at most MAX_MEMBER_BYTES (so reading one never holds more than that)."""
    name = info.name
    unsafe = unsafe_member(info)
    if unsafe:
        return f"member {name!r} is {unsafe}"
    if "/" in name or "\\" in name:
        return f"member name {name!r} is absolute or has a folder or '..'"
    key, dot, ext = name.partition(".")
    if not dot or not valid_key(key) or ext not in MEMBER_EXTENSIONS:
        return f"member name {name!r} is not KEY.jpg / KEY.json / KEY.txt with KEY of [A-Za-z0-9_-]"
    if info.size > shard_format.MAX_MEMBER_BYTES:
        return f"member {name!r} holds {info.size} bytes, more than the {shard_format.MAX_MEMBER_BYTES} allowed"
    return ""


def iter_range(shard: ShardIndex, start: int, count: int, needed: set[int] | None = None,
               open_read=None) -> Iterator[RawSample | Skipped]:
    """Samples start .. start+count-1 of `shard`, in tar order. With `needed`, only those sample numbers are
    yielded (others are read past without being returned). Never raises for damaged data."""
    open_read = open_read or storage.open_read
    stop = start + count
    pos = start
    size_checked = False
    read_failures = 0
    while pos < stop:
        if needed is not None:
            while pos < stop and pos not in needed:
                pos += 1
            if pos >= stop:
                return
        last = stop - 1
        if needed is not None:
            last = max(i for i in needed if pos <= i < stop)
        failure = ""
        try:
            with open_read(shard.path, start=int(shard.offsets[pos]), end=shard.end_offset(last)) as stream:
                for item in _iter_stream(shard, stream, pos, last + 1):
                    if isinstance(item, int):  # the stream broke inside sample `item`
                        pos = item
                        break
                    if needed is None or item.index in needed:
                        yield item
                    pos = item.index + 1
                else:
                    pos = last + 1
                    continue
        except FileNotFoundError as err:
            for i in range(pos, stop):
                if needed is None or i in needed:
                    yield Skipped(i, shard.keys[i], TRUNCATED, f"shard missing: {err}")
            return
        except Exception as err:  # noqa: BLE001 - storage gave up after its own retries
            failure = f"{type(err).__name__}: {err}"
        if pos >= stop:
            return
        if failure and read_failures < READ_RETRIES:
            # A second line of defence behind the storage layer's byte-level retries: reopen at this sample.
            delay = 2.0 ** read_failures
            read_failures += 1
            log.warning("reading %s at sample %d failed (%s); reopening there in %.0fs", shard.name, pos, failure,
                        delay)
            time.sleep(delay)
            continue
        read_failures = 0
        # The stream broke at sample `pos`: is the shard shorter than the manifest says (truncated)?
        if not size_checked:
            size_checked = True
            try:
                actual = storage.size(shard.path)
            except Exception:  # noqa: BLE001 - cannot tell; treat as one corrupt sample
                actual = shard.bytes
            if actual < shard.bytes:
                for i in range(pos, stop):
                    if shard.end_offset(i) > actual and (needed is None or i in needed):
                        yield Skipped(i, shard.keys[i], TRUNCATED,
                                      f"{shard.name} has {actual} of {shard.bytes} bytes")
                stop = min(stop, next((i for i in range(pos, stop) if shard.end_offset(i) > actual), stop))
                if pos >= stop:
                    return
        if needed is None or pos in needed:
            yield Skipped(pos, shard.keys[pos], READ_ERROR if failure else CORRUPT,
                          failure or f"unreadable tar data at byte {int(shard.offsets[pos])} of {shard.name}")
        pos += 1  # reopen at the next sample's indexed offset


def _iter_stream(shard: ShardIndex, stream, first: int, stop: int) -> Iterator[RawSample | Skipped | int]:
    """Samples first..stop-1 from a stream positioned at sample `first`. Yields an int, the number of the
    damaged sample, when the tar data breaks; the caller skips it and reopens at the next one."""
    pos = first
    files: dict[str, bytes] = {}
    unsafe = ""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")
    except (tarfile.TarError, EOFError):
        yield pos
        return

    def finish() -> RawSample | Skipped:
        key = shard.keys[pos]
        if unsafe:
            return Skipped(pos, key, UNSAFE, unsafe)
        if "jpg" not in files or "json" not in files:
            return Skipped(pos, key, CORRUPT, f"members {sorted(files)} (need jpg and json)")
        return RawSample(pos, key, dict(files))

    try:
        for info in tar:
            key, _, ext = info.name.partition(".")
            if key != shard.keys[pos]:
                if not files and not unsafe:
                    # a member of an unexpected sample before any of the expected one: the data is off
                    yield pos
                    return
                yield finish()
                pos += 1
                files, unsafe = {}, ""
                if pos >= stop or key != shard.keys[pos]:
                    if pos < stop:
                        yield pos
                    return
            why = member_problem(info)
            if why:
                unsafe = unsafe or why
                continue
            member = tar.extractfile(info)
            files[ext] = member.read() if member is not None else b""
            if len(files[ext]) != info.size:
                raise EOFError(f"member {info.name} cut short")
        # The archive ended: a sample is complete only with all its members (the last one of the range ends
        # the stream normally; anything else means the data broke at `pos`).
        if pos < stop and not unsafe and set(MEMBER_EXTENSIONS) <= set(files):
            yield finish()
            pos += 1
        elif pos < stop and unsafe:
            yield finish()
            pos += 1
        if pos < stop:
            yield pos
    except (tarfile.TarError, EOFError):   # damaged tar data; storage errors go up to iter_range
        yield pos
