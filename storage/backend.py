"""The interface every storage backend implements (one per URL scheme), and the atomic-write context manager
they share. Callers never see a backend: they call storage's functions with a path."""
from __future__ import annotations

import abc
import io
from dataclasses import dataclass
from typing import IO


@dataclass(frozen=True)
class Entry:
    """A file found by `list_files`: its full path (same scheme as the listed folder) and size in bytes."""
    path: str
    size: int


class AtomicWriter(io.RawIOBase):
    """A writable stream whose bytes appear under the final name only on `commit()`; `abort()` leaves nothing."""

    bytes_written: int = 0

    def writable(self) -> bool:
        return True

    @abc.abstractmethod
    def commit(self) -> None: ...

    @abc.abstractmethod
    def abort(self) -> None: ...


class AtomicWrite:
    """`with atomic_write(path) as f: f.write(...)`: the file appears under its name only if the block ends
    without an exception."""

    def __init__(self, writer: AtomicWriter):
        self.writer = writer

    def __enter__(self) -> AtomicWriter:
        return self.writer

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.writer.commit()
            except BaseException:
                self.writer.abort()
                raise
        else:
            self.writer.abort()


class Backend(abc.ABC):
    """Reading, writing, listing and deleting the files of one URL scheme. Writes are atomic; a commit marker is
    written with `put_if_absent` (create only if absent); `clean_interrupted_writes` removes what a killed writer
    left behind (temp files, unfinished uploads), whose names only the backend knows."""

    @abc.abstractmethod
    def local_path(self, path: str) -> str | None:
        """The path on this machine's file system (for libraries that need one), or None for a remote store."""

    # reading
    @abc.abstractmethod
    def open_read(self, path: str, start: int = 0, end: int | None = None,
                  buffer_size: int = 1 << 20) -> IO[bytes]: ...

    @abc.abstractmethod
    def read_bytes(self, path: str, start: int | None = None, end: int | None = None) -> bytes: ...

    # metadata
    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def size(self, path: str) -> int: ...

    @abc.abstractmethod
    def list_files(self, prefix: str, recursive: bool = True) -> list[Entry]:
        """Files under a folder / key prefix, sorted by path; a missing folder gives []."""

    # writing
    @abc.abstractmethod
    def atomic_writer(self, path: str, if_none_match: bool = False) -> AtomicWriter: ...

    @abc.abstractmethod
    def write_bytes(self, path: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def put_if_absent(self, path: str, data: bytes) -> bool:
        """Create `path` with `data` only if it does not exist yet; False if it already existed."""

    @abc.abstractmethod
    def makedirs(self, path: str) -> None: ...

    # deleting
    @abc.abstractmethod
    def delete(self, path: str) -> None:
        """Delete a file / object; missing is fine."""

    @abc.abstractmethod
    def delete_tree(self, prefix: str, remove_folder: bool = False) -> int:
        """Delete every file under a folder / prefix (and, locally, its empty sub-folders; with `remove_folder`
        the folder itself); returns how many files."""

    @abc.abstractmethod
    def clean_interrupted_writes(self, folder: str) -> int:
        """Remove what killed writers left in `folder` (temp files, unfinished uploads); returns how many."""
