"""Streaming reads of the big JSON releases (COCO, VG): items under a prefix, one at a time, in bounded memory.

A syntax error ends the file (a JSON document has no record boundaries after one) but not the run: it becomes one
`malformed_line` Reject naming the lines and bytes where the parser stopped; everything before it was yielded.

A string escape for half of a UTF-16 pair (`"\udfff"`) is valid JSON that names no character: the fast C parser
stops at it, so the file is read on from that item with ijson's Python parser, which keeps such strings, and each
lone surrogate becomes textclean.INVALID_MARK — its record is then rejected like one holding invalid UTF-8.
"""
from __future__ import annotations

import logging
import re
from typing import Iterator

import ijson

from pipeline.records import Reject
from pipeline.textclean import INVALID_MARK, Utf8MarkingReader
import storage

log = logging.getLogger(__name__)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _marked(item: object) -> object:
    """The item with every lone surrogate in its strings (keys too) replaced by INVALID_MARK."""
    if isinstance(item, str):
        return _SURROGATE.sub(INVALID_MARK, item)
    if isinstance(item, dict):
        return {_marked(k): _marked(v) for k, v in item.items()}
    if isinstance(item, list):
        return [_marked(v) for v in item]
    return item


def iter_items(path: str, prefix: str, source: str, file: str) -> Iterator[tuple[int, object]]:
    """(index, item) for each item under `prefix` ("item" for a top-level array, "annotations.item" ...) of the
    JSON file at `path`; last (index, Reject) (kind "line", reason malformed_line) if the file stops parsing. Floats come back
    as float; text holding invalid UTF-8 or lone surrogates comes back with textclean.INVALID_MARK in it."""
    done = 0      # items yielded so far: a second pass with the Python parser skips them
    for parser in (ijson, ijson.get_backend("python")):
        slow = parser is not ijson
        if slow:
            log.warning("%s: a string escape names half of a UTF-16 pair after item %d of %s; reading on with the "
                        "slower Python JSON parser (its records are rejected as invalid_utf8)", file, done, prefix)
        try:
            for index, item in _items(path, prefix, source, file, parser):
                if index >= done:
                    done = index + 1
                    yield index, (_marked(item) if slow and not isinstance(item, Reject) else item)
            return
        except UnicodeDecodeError:
            if slow:
                raise
            continue


def _items(path: str, prefix: str, source: str, file: str, parser) -> Iterator[tuple[int, object]]:
    with storage.open_read(path) as raw:
        reader = Utf8MarkingReader(raw)
        index = -1
        try:
            for index, item in enumerate(parser.items(reader, prefix, use_float=True)):
                yield index, item
        except ijson.JSONError as err:
            message = err.args[0] if err.args else str(err)
            if isinstance(message, bytes):
                message = message.decode("utf-8", "replace")
            detail = " ".join(str(message).split())[:300]
            yield index + 1, Reject(source, "line", file, f"{prefix}: parse stopped after item {index + 1} at {reader.position()}",
                         "malformed_line", f"the rest of this file is not read: {detail}")
