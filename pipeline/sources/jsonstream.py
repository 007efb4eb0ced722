"""Streaming reads of the big JSON releases (COCO, VG): items under a prefix, one at a time, in bounded memory.

A syntax error ends the file (a JSON document has no record boundaries after one) but not the run: it becomes one
`malformed_line` Reject naming the lines and bytes where the parser stopped; everything before it was yielded.
"""
from __future__ import annotations

from typing import Iterator

import ijson

from pipeline.records import Reject
from pipeline.textclean import Utf8MarkingReader
from shards import storage


def iter_items(path: str, prefix: str, source: str, file: str) -> Iterator[tuple[int, object]]:
    """(index, item) for each item under `prefix` ("item" for a top-level array, "annotations.item" ...) of the
    JSON file at `path`; last (index, Reject) (kind "line", reason malformed_line) if the file stops parsing. Floats come back
    as float; text holding invalid UTF-8 comes back with textclean.INVALID_MARK in it."""
    with storage.open_read(path) as raw:
        reader = Utf8MarkingReader(raw)
        index = -1
        try:
            for index, item in enumerate(ijson.items(reader, prefix, use_float=True)):
                yield index, item
        except ijson.JSONError as err:
            message = err.args[0] if err.args else str(err)
            if isinstance(message, bytes):
                message = message.decode("utf-8", "replace")
            detail = " ".join(str(message).split())[:300]
            yield index + 1, Reject(source, "line", file, f"{prefix}: parse stopped after item {index + 1} at {reader.position()}",
                         "malformed_line", f"the rest of this file is not read: {detail}")
