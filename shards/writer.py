"""ShardWriter: one WebDataset tar shard with byte-for-byte deterministic contents, visible only when complete.

Every member gets fixed metadata (mtime 0, uid/gid 0, empty user/group names, mode 0o644) and a sample's
members are written in the order KEY.jpg, KEY.json, KEY.txt, so the same samples give the same bytes on every
run and machine. The tar streams through `storage.atomic_write` (temp file + rename, or one PUT / a completed
multipart upload on S3): a crash leaves no shard under the final name.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass

from shards import storage
from shards.format import sample_text, valid_key, validate_sample


def sample_json_bytes(meta: dict) -> bytes:
    """The canonical encoding of a sample's JSON (sorted keys, no spaces) so equal samples give equal bytes."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


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
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> "ShardWriter":
        self._sink = _HashingSink(self._atomic.__enter__())
        # Stream mode: no seeking, so the same code writes to a local temp file or an S3 upload.
        self._tar = tarfile.open(fileobj=self._sink, mode="w|", format=tarfile.PAX_FORMAT)
        return self

    def write(self, key: str, jpeg: bytes, meta: dict) -> int:
        if not valid_key(key) or meta.get("key") != key:
            raise ValueError(f"bad sample key {key!r} (meta key {meta.get('key')!r})")
        if self.validate:
            validate_sample(meta)
        offset = self._tar.offset
        for ext, data in (("jpg", jpeg), ("json", sample_json_bytes(meta)), ("txt", sample_text(meta).encode("utf-8"))):
            self._tar.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self.samples += 1
        return offset

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._tar.close()   # writes the end-of-archive blocks into the sink
            except BaseException as err:
                self._atomic.__exit__(type(err), err, err.__traceback__)
                raise
        else:
            # Abandon the tar without writing its end blocks into the aborted upload (tarfile would try on close
            # or garbage collection).
            self._tar.fileobj.closed = True
            self._tar.closed = True
        self._atomic.__exit__(exc_type, exc, tb)
        if exc_type is None:
            name = self.path.rstrip("/").rsplit("/", 1)[-1]
            self.info = ShardInfo(name=name, samples=self.samples, bytes=self._sink.size,
                                  sha256=self._sink.sha256.hexdigest())
