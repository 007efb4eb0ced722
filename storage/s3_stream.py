"""A streaming S3 GET that survives dropped connections, 5xx and throttling by reopening the object at the byte
where it stopped (what `tarfile` and the loader read shards from)."""
from __future__ import annotations

import io
import logging
import time
from typing import TYPE_CHECKING

from storage.s3_errors import IncompleteRead, S3AccessError, access_error, error_code, retryable, split_s3

if TYPE_CHECKING:
    from storage.s3 import S3Backend

log = logging.getLogger(__name__)


class S3ReadStream(io.RawIOBase):
    """Bytes [start, end) of one object. On error it reopens the object with a Range header at the byte where it
    stopped, with exponential backoff, up to `max_retries` times per failure."""

    def __init__(self, backend: S3Backend, path: str, start: int = 0, end: int | None = None, max_retries: int = 10,
                 backoff: float = 0.5, max_backoff: float = 20.0):
        super().__init__()
        self.backend = backend
        self.path = path
        self.bucket, self.key = split_s3(path)
        self.pos = start
        self.end = end
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.retries_total = 0
        self._body = None
        self._length: int | None = None
        self._open()

    def _request(self) -> dict:
        kwargs = {"Bucket": self.bucket, "Key": self.key}
        if self.pos or self.end is not None:
            kwargs["Range"] = f"bytes={self.pos}-" + ("" if self.end is None else str(self.end - 1))
        return kwargs

    def _empty(self) -> None:
        self._body = io.BytesIO(b"")
        self._length = self.pos

    def _open(self) -> None:
        from botocore.exceptions import ClientError

        attempt = 0
        while True:
            try:
                if self.end is not None and self.end <= self.pos:
                    return self._empty()
                resp = self.backend.client().get_object(**self._request())
                self._body = resp["Body"]
                self._length = self.pos + int(resp.get("ContentLength", 0))
                self.backend.answered()
                return
            except ClientError as err:
                code, _status = error_code(err)
                if code in {"NoSuchKey", "404"}:
                    raise FileNotFoundError(f"{self.path}: no such object") from err
                message = access_error(err, self.backend.endpoint, self.path)
                if message:   # wrong credentials or no such bucket: not "no such file"
                    raise S3AccessError(message) from err
                if code == "InvalidRange":  # reading at the very end of the object
                    return self._empty()
                attempt = self._wait_or_raise(err, attempt)
            except Exception as err:  # noqa: BLE001 - classified by retryable
                attempt = self._wait_or_raise(err, attempt)

    def _wait_or_raise(self, err: Exception, attempt: int) -> int:
        if not retryable(err) or attempt >= self.max_retries or \
                (not self.backend.has_answered() and attempt >= 1):   # never answered: a wrong endpoint, say so soon
            message = access_error(err, self.backend.endpoint, self.path)
            if message:
                raise S3AccessError(message) from err
            raise err
        delay = min(self.max_backoff, self.backoff * (2 ** attempt))
        log.warning("s3 read %s at byte %d failed (%s); retry %d in %.1fs", self.path, self.pos,
                    type(err).__name__, attempt + 1, delay)
        self.retries_total += 1
        time.sleep(delay)
        return attempt + 1

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        attempt = 0
        want = len(buffer)
        if self.end is not None:
            want = min(want, self.end - self.pos)
        if want <= 0:
            return 0
        while True:
            try:
                data = self._body.read(want)
                if not data and self._length is not None and self.pos < self._length:
                    raise IncompleteRead(f"{self.path}: connection closed at byte {self.pos} of {self._length}")
                n = len(data)
                buffer[:n] = data
                self.pos += n
                return n
            except Exception as err:  # noqa: BLE001 - classified by retryable
                attempt = self._wait_or_raise(err, attempt)
                self._close_body()
                self._open()

    def _close_body(self) -> None:
        try:
            if self._body is not None:
                self._body.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass

    def close(self) -> None:
        self._close_body()
        super().close()
