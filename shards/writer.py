"""ShardWriter: one WebDataset tar shard with byte-for-byte deterministic contents, visible only when complete.

Every member gets fixed metadata (mtime 0, uid/gid 0, empty user/group names, mode 0o644) and a sample's
members are written in the order KEY.jpg, KEY.json, KEY.txt, so the same samples give the same bytes on every
run and machine. The tar streams through `storage.atomic_write` (temp file + rename, or one PUT / a completed
multipart upload on S3): a crash leaves no shard under the final name.
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass

import storage
from shards.format import sample_text, valid_key, validate_sample


def sample_json_bytes(meta: dict) -> bytes:
    """The canonical encoding of a sample's JSON (sorted keys, no spaces) so equal samples give equal bytes."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


BLOCK = 512
RECORD = 20 * BLOCK       # tar files are padded to whole records, as GNU tar and Python's tarfile do


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


# A ustar header with every fixed field filled in (mode 0644, uid/gid 0, mtime 0, regular file, empty names);
# only the name, size and checksum change per member. Building it from tarfile.TarInfo costs ~100 us per member,
# which is most of the pass-through cost; the result is byte-identical (checked in tests/test_build_writer.py).
_TEMPLATE = bytearray(_member("x", 0).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
_TEMPLATE[0:100] = bytes(100)
_TEMPLATE[148:156] = b"        "


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte header of a regular-file member with the fixed metadata above."""
    raw = name.encode("ascii")
    if len(raw) > 100 or size >= 8 ** 11:
        # Long names or huge members need a pax extended header: let tarfile build it.
        return _member(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    header = bytearray(_TEMPLATE)
    header[0:len(raw)] = raw
    header[124:136] = b"%011o\0" % size
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


class _HashingSink:
    """File-like sink that forwards writes and keeps the sha256 and byte count of everything written."""

    def __init__(self, target):
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self.target.write(data)
        return len(data)


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records about one finished shard."""
    name: str
    samples: int
    bytes: int
    sha256: str


class ShardWriter:
    """`with ShardWriter(path) as w: w.write(key, jpeg, meta)`; the shard appears only if the block succeeds.

    `write` returns the byte offset of the sample's first tar header (for index.parquet)."""

    def __init__(self, path: str, validate: bool = True):
        self.path = path
        self.validate = validate
        self.samples = 0
        self.info: ShardInfo | None = None
        self._atomic = storage.atomic_write(path)
        self._sink: _HashingSink | None = None

    def __enter__(self) -> "ShardWriter":
        self._sink = _HashingSink(self._atomic.__enter__())
        return self

    def write(self, key: str, jpeg: bytes, meta: dict) -> int:
        if not valid_key(key) or meta.get("key") != key:
            raise ValueError(f"bad sample key {key!r} (meta key {meta.get('key')!r})")
        if self.validate:
            validate_sample(meta)
        offset = self._sink.size
        parts = []
        for ext, data in (("jpg", jpeg), ("json", sample_json_bytes(meta)), ("txt", sample_text(meta).encode("utf-8"))):
            parts += [tar_header(f"{key}.{ext}", len(data)), data, bytes(-len(data) % BLOCK)]
        self._sink.write(b"".join(parts))   # one hash update and one write per sample
        self.samples += 1
        return offset

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                end = self._sink.size + 2 * BLOCK          # two zero blocks end the archive
                self._sink.write(bytes(2 * BLOCK + (-end) % RECORD))
            except BaseException as err:
                self._atomic.__exit__(type(err), err, err.__traceback__)
                raise
        self._atomic.__exit__(exc_type, exc, tb)
        if exc_type is None:
            name = self.path.rstrip("/").rsplit("/", 1)[-1]
            self.info = ShardInfo(name=name, samples=self.samples, bytes=self._sink.size,
                                  sha256=self._sink.sha256.hexdigest())
