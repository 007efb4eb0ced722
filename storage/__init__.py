"""The ground floor: every path the project reads or writes, local or `s3://bucket/key`, goes through here.

One backend per URL scheme (storage/local.py; storage/s3.py on boto3) behind one interface (storage/backend.py);
callers pass paths and never ask which backend serves them. Writes are atomic (temp name + rename locally, one PUT
or a completed multipart upload on S3); `put_if_absent` writes commit markers; `clean_interrupted_writes` removes
what a killed writer left. The project's user-facing error type, XvlmError, lives here too (storage/errors.py).
Nothing outside this package talks to boto3.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator

from storage.backend import AtomicWrite, Backend, Entry
from storage.errors import XvlmError
from storage.local import LocalBackend

__all__ = ["Entry", "XvlmError", "join", "set_endpoint_url", "local_path", "local_copy", "describe_error",
           "read_bytes", "read_text", "open_read", "iter_lines", "exists", "size", "list_files", "atomic_write",
           "write_bytes", "write_text", "put_if_absent", "makedirs", "delete", "delete_tree",
           "clean_interrupted_writes"]

_backends: dict[str, Backend] = {"": LocalBackend()}


def _scheme(path: str) -> str:
    head, sep, _ = str(path).partition("://")
    return head if sep and head.isalnum() else ""


def backend_for(path: str) -> Backend:
    """The backend that serves `path` (made on first use: the S3 one imports boto3)."""
    scheme = _scheme(path)
    found = _backends.get(scheme)
    if found is None:
        if scheme != "s3":
            raise XvlmError(f"{path}: unsupported storage scheme {scheme}:// (use a local path or s3://bucket/key)")
        from storage.s3 import S3Backend

        found = _backends[scheme] = S3Backend()
    return found


def set_endpoint_url(url: str | None) -> None:
    """Serve s3:// paths from this endpoint (e.g. `--endpoint-url`), or with None from AWS_ENDPOINT_URL / AWS's
    default; a fresh backend, so no client made with older settings or credentials is reused."""
    from storage.s3 import S3Backend

    _backends["s3"] = S3Backend(url)


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' for both local and s3 paths."""
    out = str(base)
    for part in parts:
        part = str(part)
        if not part:
            continue
        out = out.rstrip("/") + "/" + part.lstrip("/") if out else part
    return out


def local_path(path: str) -> str | None:
    """`path` on this machine's file system (usable with os, pyarrow, tensorboard...), or None when a remote store
    serves it (then reads wait on the network, and only this package's functions reach it)."""
    return backend_for(path).local_path(str(path))


@contextlib.contextmanager
def local_copy(path: str, suffix: str = "") -> Iterator[str]:
    """A local file with `path`'s bytes for readers that seek (parquet): the file itself, or a remote object streamed
    to a temp file that is removed afterwards."""
    local = local_path(path)
    if local is not None:
        yield local
        return
    fd, tmp = tempfile.mkstemp(prefix="xvlm-copy-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as out, open_read(path) as src:
            while chunk := src.read(8 << 20):
                out.write(chunk)
        yield tmp
    finally:
        os.remove(tmp)


def describe_error(err: BaseException, path: str = "") -> str | None:
    """One line saying what to fix for a store's credential, bucket or endpoint error (None for other errors)."""
    if "s3" not in _backends:
        return None
    return _backends["s3"].describe_error(err, path)   # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- reading


def read_bytes(path: str, start: int | None = None, end: int | None = None) -> bytes:
    """Whole file, or bytes [start, end) when given."""
    return backend_for(path).read_bytes(path, start, end)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def open_read(path: str, start: int = 0, end: int | None = None, buffer_size: int = 1 << 20) -> IO[bytes]:
    """A buffered binary stream over bytes [start, end) of a file (on S3: retrying, resuming at the byte)."""
    return backend_for(path).open_read(path, start, end, buffer_size)


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, raw line bytes without newline) of a text file, streamed."""
    with open_read(path) as f:
        for number, raw in enumerate(f, start=1):
            yield number, raw.rstrip(b"\r\n")


def exists(path: str) -> bool:
    return backend_for(path).exists(path)


def size(path: str) -> int:
    return backend_for(path).size(path)


def list_files(prefix: str, recursive: bool = True) -> list[Entry]:
    """Files under a folder / key prefix, sorted by path. A missing folder gives []."""
    return backend_for(prefix).list_files(prefix, recursive)


# ---------------------------------------------------------------------------------------------- writing


def atomic_write(path: str, if_none_match: bool = False) -> AtomicWrite:
    """`with atomic_write(path) as f: f.write(...)`: the file appears under its name only if the block ends
    without an exception (`if_none_match`: on S3, a conditional PUT that fails if the object exists)."""
    return AtomicWrite(backend_for(path).atomic_writer(path, if_none_match=if_none_match))


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file atomically."""
    backend_for(path).write_bytes(path, data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def put_if_absent(path: str, data: bytes) -> bool:
    """Create `path` with `data` only if it does not exist yet; returns False if it already existed (a commit
    marker: on S3 a conditional PUT, If-None-Match: *; locally an O_EXCL link of a complete temp file)."""
    return backend_for(path).put_if_absent(path, data)


def makedirs(path: str) -> None:
    backend_for(path).makedirs(path)


# ---------------------------------------------------------------------------------------------- deleting


def delete(path: str) -> None:
    """Delete a file/object; missing is fine."""
    backend_for(path).delete(path)


def delete_tree(prefix: str, remove_folder: bool = False) -> int:
    """Delete every file under a folder / prefix (with `remove_folder`, a local folder itself too); returns how
    many files."""
    return backend_for(prefix).delete_tree(prefix, remove_folder)


def clean_interrupted_writes(folder: str) -> int:
    """Remove what killed writers left directly in `folder` (local temp files) or under it (unfinished S3
    multipart uploads); returns how many."""
    return backend_for(folder).clean_interrupted_writes(folder)
