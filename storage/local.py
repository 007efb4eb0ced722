"""The local file system backend: atomic writes by temp file + fsync + rename, create-if-absent by an O_EXCL link.

Temp files are named `.NAME.XXXX.tmp` beside their target; `clean_interrupted_writes` removes the ones a killed
writer left (nobody else needs to know the naming)."""
from __future__ import annotations

import os
import tempfile
import uuid
from typing import IO

from storage.backend import AtomicWriter, Backend, Entry

TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_temp_name(name: str) -> bool:
    """A file name of this backend's temp files (`.NAME.XXXX.tmp`)."""
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


class LocalAtomicWriter(AtomicWriter):
    def __init__(self, path: str):
        super().__init__()
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.path.basename(path)}.", suffix=TEMP_SUFFIX,
                                        dir=directory)
        self.f = os.fdopen(fd, "wb")
        self.bytes_written = 0

    def write(self, data) -> int:
        n = self.f.write(data)
        self.bytes_written += n
        return n

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(self.tmp, self.path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            try:
                os.remove(self.tmp)
            except FileNotFoundError:
                pass


class LocalBackend(Backend):
    """Plain paths (and file://-less relative ones) on this machine."""

    def local_path(self, path: str) -> str | None:
        return path

    def open_read(self, path: str, start: int = 0, end: int | None = None, buffer_size: int = 1 << 20) -> IO[bytes]:
        f = open(path, "rb", buffering=buffer_size)
        if start:
            f.seek(start)
        return f

    def read_bytes(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        with open(path, "rb") as f:
            if start:
                f.seek(start)
            if end is None:
                return f.read()
            return f.read(end - (start or 0))

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def list_files(self, prefix: str, recursive: bool = True) -> list[Entry]:
        if not os.path.isdir(prefix):
            return []
        out = []
        if recursive:
            for root, _dirs, files in os.walk(prefix):
                for name in files:
                    p = os.path.join(root, name)
                    out.append(Entry(p, os.path.getsize(p)))
        else:
            for name in os.listdir(prefix):
                p = os.path.join(prefix, name)
                if os.path.isfile(p):
                    out.append(Entry(p, os.path.getsize(p)))
        return sorted(out, key=lambda e: e.path)

    def atomic_writer(self, path: str, if_none_match: bool = False) -> AtomicWriter:
        return LocalAtomicWriter(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        writer = LocalAtomicWriter(path)
        try:
            writer.write(data)
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    def put_if_absent(self, path: str, data: bytes) -> bool:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f"{TEMP_PREFIX}{os.path.basename(path)}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if path exists: atomic create-if-absent
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def delete(self, path: str) -> None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

    def delete_tree(self, prefix: str, remove_folder: bool = False) -> int:
        entries = self.list_files(prefix)
        for e in entries:
            self.delete(e.path)
        if os.path.isdir(prefix):
            for root, dirs, _files in os.walk(prefix, topdown=False):
                for d in dirs:
                    try:
                        os.rmdir(os.path.join(root, d))
                    except OSError:
                        pass
            if remove_folder:
                try:
                    os.rmdir(prefix)
                except OSError:  # already gone, or a file appeared meanwhile
                    pass
        return len(entries)

    def clean_interrupted_writes(self, folder: str) -> int:
        removed = 0
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if is_temp_name(name):
                    os.remove(os.path.join(folder, name))
                    removed += 1
        return removed
