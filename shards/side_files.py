"""A dataset's parquet side files (index.parquet, rejects.parquet), opened and checked: the one reader of them for
the loader (shards/dataset.py), `xvlm verify`, `xvlm stats` and `xvlm show`. A file that is not parquet or lacks
one of the format's columns is refused with the same one-line XvlmError everywhere; a missing file is a
FileNotFoundError, which each reader words for its purpose.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

import storage
from shards.manifest import INDEX_SCHEMA, REJECTS_SCHEMA, REQUIRED_INDEX_COLUMNS, DatasetManifest
from storage.errors import XvlmError

SCHEMAS = {"index": INDEX_SCHEMA, "rejects": REJECTS_SCHEMA}


def _kind(t: pa.DataType) -> str:
    """A column type as a reader uses it: any integer width is an int, any list layout a list of its items."""
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return f"list<{_kind(t.value_type)}>"
    return str(t)


def check_columns(schema: pa.Schema, columns: list[str], where: str, expected: pa.Schema = INDEX_SCHEMA) -> None:
    """Raise XvlmError unless a side file's schema has `columns` with the format's types (`expected`: INDEX_SCHEMA
    for index.parquet, which must also have REQUIRED_INDEX_COLUMNS; REJECTS_SCHEMA for rejects.parquet)."""
    problems = []
    if expected is INDEX_SCHEMA:
        columns = REQUIRED_INDEX_COLUMNS + [c for c in columns if c not in REQUIRED_INDEX_COLUMNS]
    for name in columns:
        if name not in schema.names:
            problems.append(f"no column {name!r}")
            continue
        want, got = expected.field(name).type, schema.field(name).type
        if _kind(want) != _kind(got):
            problems.append(f"column {name!r} is {got}, the format says {want}")
    if problems:
        raise XvlmError(f"{where} does not have this shard format's columns ({'; '.join(problems)}); rebuild the "
                        f"dataset")


def open_parquet(local: str | io.BytesIO, where: str) -> pq.ParquetFile:
    """A parquet file opened for reading; XvlmError when the bytes are not parquet (damaged or another file),
    FileNotFoundError when there is none."""
    try:
        return pq.ParquetFile(local)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError) as err:
        raise XvlmError(f"{where} is not a readable parquet file ({type(err).__name__}: {err}); rebuild the "
                        f"dataset") from None


def iter_batches(parquet: pq.ParquetFile, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
    """Record batches of a parquet file with bounded memory. One `iter_batches` reader over a whole file keeps
    memory for every list-column batch it decoded (pyarrow 26: ~0.8 MB per 65k-row batch, so ~120 MB on a
    10M-row index, growing with the file); a fresh reader per group of row groups frees it as it goes."""
    meta = parquet.metadata
    group: list[int] = []
    rows = 0
    for i in range(meta.num_row_groups):
        group.append(i)
        rows += meta.row_group(i).num_rows
        if rows >= batch_size:
            yield from parquet.iter_batches(batch_size=batch_size, columns=columns, row_groups=group)
            group, rows = [], 0
    if group:
        yield from parquet.iter_batches(batch_size=batch_size, columns=columns, row_groups=group)


@dataclass
class SideFile:
    """One opened, checked side file: `path` as the dataset names it, `local` a local copy for seeking readers."""
    path: str
    local: str
    parquet: pq.ParquetFile

    @property
    def rows(self) -> int:
        return self.parquet.metadata.num_rows

    def batches(self, columns: list[str], batch_size: int = 262_144) -> Iterator[pa.RecordBatch]:
        return iter_batches(self.parquet, columns, batch_size)

    def read(self, columns: list[str]) -> pa.Table:
        """The whole of `columns`; XvlmError when pages behind a readable footer are damaged."""
        try:
            return self.parquet.read(columns=columns)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise XvlmError(f"{self.path} cannot be read ({type(err).__name__}: {err}); rebuild the dataset") from None


@contextlib.contextmanager
def open_side_file(manifest: DatasetManifest, which: str, columns: list[str]) -> Iterator[SideFile]:
    """The dataset's index ("index") or rejects ("rejects") file, checked for `columns` with the format's types
    (the index also for REQUIRED_INDEX_COLUMNS). A remote file is copied to a local temp file for the block."""
    path = {"index": manifest.index_path, "rejects": manifest.rejects_path}[which]
    with storage.local_copy(path, suffix=".parquet") as local:
        parquet = open_parquet(local, path)
        check_columns(parquet.schema_arrow, columns, path, SCHEMAS[which])
        yield SideFile(path, local, parquet)
