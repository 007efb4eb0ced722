"""Text checks shared by every source: strict UTF-8 per record, whitespace normalization, empty texts.

JSON releases are parsed as one stream, so a single invalid byte would stop the parser for the whole file.
`Utf8MarkingReader` re-encodes the byte stream and turns each invalid byte sequence into INVALID_MARK, a Unicode
noncharacter; `clean_text` then rejects exactly the records whose text holds it, and the rest of the file goes on.
"""
from __future__ import annotations

import codecs
import io
from typing import IO

# U+FFFF is a noncharacter: it never appears in real text, so it can stand for "bytes that were not UTF-8".
INVALID_MARK = "\uffff"
_HANDLER = "xvlm-mark-invalid-utf8"


def _mark_invalid(err: UnicodeError) -> tuple[str, int]:
    if isinstance(err, UnicodeDecodeError):
        return INVALID_MARK, err.end
    raise err


codecs.register_error(_HANDLER, _mark_invalid)


class Utf8MarkingReader(io.RawIOBase):
    """A binary stream that yields the UTF-8 of `raw` with every invalid byte sequence replaced by INVALID_MARK.
    Counts the raw bytes and newlines consumed, so a parse error can name where in the file it happened."""

    def __init__(self, raw: IO[bytes], chunk_size: int = 1 << 16):
        super().__init__()
        self.raw = raw
        self.chunk_size = chunk_size
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors=_HANDLER)
        self.pending = b""
        self.offset = 0                  # bytes of `pending` already handed out
        self.eof = False
        # [start, end) raw byte range and the line numbers of the chunk read last (the parser errs inside it).
        self.chunk_start = self.chunk_end = 0
        self.line_start = self.line_end = 1

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        data = self.raw.read(self.chunk_size)
        self.chunk_start, self.line_start = self.chunk_end, self.line_end
        self.chunk_end += len(data)
        self.line_end += data.count(b"\n")
        if not data:
            self.eof = True
            self.pending, self.offset = self.decoder.decode(b"", final=True).encode("utf-8"), 0
            return
        self.pending, self.offset = self.decoder.decode(data).encode("utf-8"), 0

    def readinto(self, buffer) -> int:
        while self.offset >= len(self.pending) and not self.eof:
            self._fill()
        n = min(len(buffer), len(self.pending) - self.offset)
        buffer[:n] = self.pending[self.offset:self.offset + n]
        self.offset += n
        return n

    def position(self) -> str:
        """Where the parser was when it failed: the last chunk's line and byte range."""
        return (f"lines {self.line_start}-{self.line_end} (bytes {self.chunk_start}-{self.chunk_end})"
                if self.line_start != self.line_end else f"line {self.line_start} (bytes {self.chunk_start}-{self.chunk_end})")


def clean_text(text: object) -> tuple[str, str | None]:
    """(normalized text, None) or ("", reason code): whitespace runs collapse to one space, ends are stripped."""
    if not isinstance(text, str):
        return "", "malformed_line"
    if INVALID_MARK in text:
        return "", "invalid_utf8"
    cleaned = " ".join(text.split())
    if not cleaned:
        return "", "empty_text"
    return cleaned, None


def decode_strict(raw: bytes) -> str | None:
    """The UTF-8 text of one record's bytes, or None when they are not valid UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
