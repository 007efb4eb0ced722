"""The one storage layer: every path that may be local or `s3://bucket/key` goes through here.

Reading source images, writing shards, streaming shards into the loader, and checkpoints all use these
functions; nothing else in the project talks to boto3. Writes are atomic: a local file appears under its final
name only complete (temp name + fsync + rename); an S3 object appears only on a single PUT or a completed
multipart upload (an interrupted one is aborted). boto3 runs with retry mode `standard` (the default, `legacy`,
retries less and without throttling backoff); the endpoint comes from `--endpoint-url` / `AWS_ENDPOINT_URL`
for S3-compatible stores, credentials from the standard chain (never printed).

On top of boto3's retries (which give up on a refused connection after ~8 s), every request to an endpoint that
has answered before in this process is retried with backoff for up to XVLM_S3_RETRY_S seconds (default 120): a
restart or short outage of the store does not end a training run. Wrong credentials, a missing bucket and an
endpoint that never answered are S3AccessError, an XvlmError whose one line says what to check.
"""
from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import IO, Iterator

from shards.errors import XvlmError

log = logging.getLogger(__name__)

MULTIPART_CHUNK = 16 * 1024 * 1024
# write_bytes: one PUT up to this size, a parallel multipart upload above. A checkpoint's 18 MB optimizer state
# went up faster as one PUT than as two parallel 16 MB parts (their create/complete round trips; checkpoint save
# 1.23-1.32x against 1.32-1.43x plain put_object, tools/bench_train.py). S3 takes single PUTs up to 5 GB.
SINGLE_PUT_MAX = 64 * 1024 * 1024
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()
_endpoint_override: str | None = None
_answered: set[str | None] = set()      # endpoints that answered a request in this process
RETRY_ENV = "XVLM_S3_RETRY_S"            # how long requests to an endpoint that answered before are retried
DEFAULT_RETRY_S = 120.0
# Error codes of S3 and S3-compatible stores for credentials that are wrong, expired or not allowed.
AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
              "TokenRefreshRequired", "InvalidClientTokenId", "Forbidden", "AllAccessDisabled", "AccountProblem",
              "403"}


class S3AccessError(XvlmError):
    """The store refused the credentials, has no such bucket, or cannot be reached: the message says what to check."""


def set_endpoint_url(url: str | None) -> None:
    """Use this S3 endpoint (e.g. from `--endpoint-url`) instead of AWS_ENDPOINT_URL / the AWS default."""
    global _endpoint_override
    _endpoint_override = url
    _clients.clear()


def is_s3(path: str) -> bool:
    return str(path).startswith("s3://")


def split_s3(path: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    if not is_s3(path):
        raise ValueError(f"not an s3:// path: {path}")
    rest = path[5:]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise XvlmError(f"s3 path without a bucket: {path!r} (expected s3://bucket/prefix)")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' for both local and s3 paths."""
    out = str(base)
    for part in parts:
        part = str(part)
        if not part:
            continue
        out = out.rstrip("/") + "/" + part.lstrip("/") if out else part
    return out


def _endpoint() -> str | None:
    return _endpoint_override or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_client():
    """A boto3 S3 client per (process, endpoint), shared by the process's threads (a client is thread-safe once
    made; making one, ~0.5 s of loading service models, is not, hence the lock): standard retries with backoff,
    connect/read timeouts, a pool of 32 connections."""
    import boto3
    from botocore.config import Config

    endpoint = _endpoint()
    key = (os.getpid(), endpoint)   # a forked child makes its own: connections must not cross processes
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            config = Config(
                retries={"mode": "standard", "max_attempts": int(os.environ.get("XVLM_S3_MAX_ATTEMPTS", "8"))},
                connect_timeout=10, read_timeout=60, max_pool_connections=32,
                s3={"addressing_style": "path"} if endpoint else None,
            )
            session = boto3.session.Session()
            try:
                client = session.client("s3", endpoint_url=endpoint, config=config)
            except ValueError as err:   # botocore: "Invalid endpoint: ..."
                raise S3AccessError(f"the S3 endpoint {endpoint!r} is not a URL ({err}): give --endpoint-url / "
                                    f"AWS_ENDPOINT_URL as http(s)://HOST:PORT") from None
            _clients[key] = client
    return client


def access_error(err: BaseException, path: str = "") -> str | None:
    """One line saying what to fix, for errors about credentials, buckets and endpoints (None for others)."""
    try:
        from botocore import exceptions as boto
    except ImportError:    # pragma: no cover - boto3 is a dependency
        return None
    endpoint = _endpoint() or "AWS's default endpoint"
    where = f" for {path}" if path else ""
    if isinstance(err, (boto.NoCredentialsError, boto.PartialCredentialsError)):
        return (f"no usable AWS credentials{where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
                f"or give the machine a role)")
    if isinstance(err, boto.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        bucket = split_s3(path)[0] if is_s3(path) else err.response.get("Error", {}).get("BucketName", "?")
        if code in AUTH_CODES or status == 403:
            return (f"S3 at {endpoint} refused the credentials{where} ({code or status}): check AWS_ACCESS_KEY_ID / "
                    f"AWS_SECRET_ACCESS_KEY / AWS_PROFILE, and that they may use bucket {bucket!r}")
        if code == "NoSuchBucket":
            return (f"bucket {bucket!r} does not exist at {endpoint}: create it, or fix the s3:// path or the "
                    f"endpoint (--endpoint-url / AWS_ENDPOINT_URL)")
        if code in {"PermanentRedirect", "301", "AuthorizationHeaderMalformed"} or status == 301:
            return (f"bucket {bucket!r} is in another region than {endpoint} expects{where}: set AWS_DEFAULT_REGION "
                    f"or the endpoint")
        return None
    if isinstance(err, (boto.EndpointConnectionError, boto.ConnectTimeoutError, boto.ConnectionClosedError)):
        return (f"cannot reach the S3 endpoint {endpoint}{where} ({type(err).__name__}): check --endpoint-url / "
                f"AWS_ENDPOINT_URL and that the store is up")
    return None


def _retry_seconds() -> float:
    return float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))


def s3_call(what: str, path: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, one S3 request, under this layer's policy: transient failures (refused connections,
    timeouts, 5xx, throttling) of an endpoint that answered before are retried with backoff for up to
    XVLM_S3_RETRY_S seconds; credential, bucket and endpoint errors become S3AccessError; others pass through."""
    endpoint = _endpoint()
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - classified below
            if _retryable(err) and endpoint in _answered and time.monotonic() - start < _retry_seconds():
                delay = min(16.0, 0.5 * 2 ** attempt)
                attempt += 1
                log.warning("s3 %s of %s failed (%s); retry %d in %.1fs", what, path, type(err).__name__, attempt,
                            delay)
                time.sleep(delay)
                continue
            message = access_error(err, path)
            if message:
                raise S3AccessError(message) from err
            raise
        _answered.add(endpoint)
        return result


def _retryable(err: Exception) -> bool:
    """Errors that a streaming read should retry by reopening at the current byte."""
    from botocore.exceptions import (ClientError, ConnectionError as BotoConnectionError, IncompleteReadError,
                                     ReadTimeoutError, ResponseStreamingError)
    from urllib3.exceptions import ProtocolError, ReadTimeoutError as U3ReadTimeout

    if isinstance(err, (BotoConnectionError, ReadTimeoutError, ProtocolError, U3ReadTimeout, ConnectionError,
                        TimeoutError, IncompleteRead, IncompleteReadError, ResponseStreamingError)):
        return True
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in {"SlowDown", "Throttling", "RequestTimeout", "InternalError", "ServiceUnavailable"} or status >= 500
    return False


class IncompleteRead(IOError):
    """The server closed a GET before the announced length."""


# ---------------------------------------------------------------------------------------------- reading


def read_bytes(path: str, start: int | None = None, end: int | None = None) -> bytes:
    """Whole file, or bytes [start, end) when given."""
    if is_s3(path):
        with open_read(path, start=start or 0, end=end) as f:
            # read() without a size would go 8 KB at a time through RawIOBase.readall: 16 MB reads are ~1.5x faster
            chunks = []
            while chunk := f.read(16 << 20):
                chunks.append(chunk)
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    with open(path, "rb") as f:
        if start:
            f.seek(start)
        if end is None:
            return f.read()
        return f.read(end - (start or 0))


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


class S3ReadStream(io.RawIOBase):
    """A streaming GET that survives dropped connections, 5xx and throttling: on error it reopens the object
    with a Range header at the byte where it stopped, with exponential backoff, up to `max_retries` times per
    failure. The stream is what `tarfile` / webdataset read from."""

    def __init__(self, path: str, start: int = 0, end: int | None = None, max_retries: int = 10,
                 backoff: float = 0.5, max_backoff: float = 20.0):
        super().__init__()
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

    def _open(self) -> None:
        from botocore.exceptions import ClientError

        attempt = 0
        while True:
            try:
                rng = None
                if self.pos or self.end is not None:
                    rng = f"bytes={self.pos}-" + ("" if self.end is None else str(self.end - 1))
                kwargs = {"Bucket": self.bucket, "Key": self.key}
                if rng:
                    kwargs["Range"] = rng
                if self.end is not None and self.end <= self.pos:
                    self._body = io.BytesIO(b"")
                    self._length = self.pos
                    return
                resp = s3_client().get_object(**kwargs)
                self._body = resp["Body"]
                self._length = self.pos + int(resp.get("ContentLength", 0))
                _answered.add(_endpoint())
                return
            except ClientError as err:
                code = str(err.response.get("Error", {}).get("Code", ""))
                if code in {"NoSuchKey", "404"}:
                    raise FileNotFoundError(f"{self.path}: no such object") from err
                message = access_error(err, self.path)
                if message:   # wrong credentials or no such bucket: not "no such file"
                    raise S3AccessError(message) from err
                if code == "InvalidRange":  # reading at the very end of the object
                    self._body = io.BytesIO(b"")
                    self._length = self.pos
                    return
                attempt = self._wait_or_raise(err, attempt)
            except Exception as err:  # noqa: BLE001 - classified by _retryable
                attempt = self._wait_or_raise(err, attempt)

    def _wait_or_raise(self, err: Exception, attempt: int) -> int:
        if not _retryable(err) or attempt >= self.max_retries or \
                (_endpoint() not in _answered and attempt >= 1):   # never answered: a wrong endpoint, say so soon
            message = access_error(err, self.path)
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
            except Exception as err:  # noqa: BLE001 - classified by _retryable
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


def open_read(path: str, start: int = 0, end: int | None = None, buffer_size: int = 1 << 20) -> IO[bytes]:
    """A buffered binary stream over a local file or an S3 object (retrying, resuming at the byte)."""
    if is_s3(path):
        return io.BufferedReader(S3ReadStream(path, start=start, end=end), buffer_size=buffer_size)
    f = open(path, "rb", buffering=buffer_size)
    if start:
        f.seek(start)
    return f


# ---------------------------------------------------------------------------------------------- metadata


def exists(path: str) -> bool:
    if is_s3(path):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(path)
        try:
            s3_call("HEAD", path, s3_client().head_object, Bucket=bucket, Key=key)
            return True
        except ClientError as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404 or \
                    err.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise
    return os.path.exists(path)


def size(path: str) -> int:
    if is_s3(path):
        bucket, key = split_s3(path)
        return int(s3_call("HEAD", path, s3_client().head_object, Bucket=bucket, Key=key)["ContentLength"])
    return os.path.getsize(path)


@dataclass(frozen=True)
class Entry:
    path: str
    size: int


def list_files(prefix: str, recursive: bool = True) -> list[Entry]:
    """Files under a folder / key prefix, sorted by path. A missing folder gives []."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        if key and not key.endswith("/"):
            key += "/"
        kwargs = {"Bucket": bucket, "Prefix": key}
        if not recursive:
            kwargs["Delimiter"] = "/"

        def listing() -> list[Entry]:
            pages = s3_client().get_paginator("list_objects_v2").paginate(**kwargs)
            return [Entry(f"s3://{bucket}/{obj['Key']}", int(obj["Size"])) for page in pages
                    for obj in page.get("Contents", [])]
        return sorted(s3_call("LIST", prefix, listing), key=lambda e: e.path)
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


def delete(path: str) -> None:
    """Delete a file/object; missing is fine."""
    if is_s3(path):
        bucket, key = split_s3(path)
        s3_call("DELETE", path, s3_client().delete_object, Bucket=bucket, Key=key)
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def delete_prefix(prefix: str) -> int:
    """Delete every file under a folder / prefix; returns how many."""
    entries = list_files(prefix)
    for e in entries:
        delete(e.path)
    if not is_s3(prefix) and os.path.isdir(prefix):
        for root, dirs, _files in os.walk(prefix, topdown=False):
            for d in dirs:
                try:
                    os.rmdir(os.path.join(root, d))
                except OSError:
                    pass
    return len(entries)


def makedirs(path: str) -> None:
    if not is_s3(path):
        os.makedirs(path, exist_ok=True)


# ---------------------------------------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _LocalAtomicWriter(io.RawIOBase):
    def __init__(self, path: str):
        super().__init__()
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        self.f = os.fdopen(fd, "wb")
        self.bytes_written = 0

    def writable(self) -> bool:
        return True

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


class _S3AtomicWriter(io.RawIOBase):
    """Buffers up to one chunk; small files become a single PUT, large ones a multipart upload that is
    completed on commit and aborted on error, so a reader never sees a partial object."""

    def __init__(self, path: str, chunk_size: int = MULTIPART_CHUNK, if_none_match: bool = False):
        super().__init__()
        self.path = path
        self.bucket, self.key = split_s3(path)
        self.chunk_size = chunk_size
        self.if_none_match = if_none_match
        self.buf = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict] = []
        self.bytes_written = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.buf += data
        self.bytes_written += len(data)
        while len(self.buf) >= self.chunk_size:
            self._upload_part(bytes(self.buf[: self.chunk_size]))
            del self.buf[: self.chunk_size]
        return len(data)

    def _upload_part(self, data: bytes) -> None:
        client = s3_client()
        if self.upload_id is None:
            self.upload_id = s3_call("create upload", self.path, client.create_multipart_upload, Bucket=self.bucket,
                                     Key=self.key)["UploadId"]
        number = len(self.parts) + 1
        resp = s3_call("upload part", self.path, client.upload_part, Bucket=self.bucket, Key=self.key,
                       UploadId=self.upload_id, PartNumber=number, Body=data)
        self.parts.append({"ETag": resp["ETag"], "PartNumber": number})

    def commit(self) -> None:
        client = s3_client()
        if self.upload_id is None:
            kwargs = {"Bucket": self.bucket, "Key": self.key, "Body": bytes(self.buf)}
            if self.if_none_match:
                kwargs["IfNoneMatch"] = "*"
            s3_call("PUT", self.path, client.put_object, **kwargs)
            return
        if self.buf:
            self._upload_part(bytes(self.buf))
            self.buf.clear()
        s3_call("complete upload", self.path, client.complete_multipart_upload, Bucket=self.bucket, Key=self.key,
                UploadId=self.upload_id, MultipartUpload={"Parts": self.parts})

    def abort(self) -> None:
        if self.upload_id is not None:
            try:
                s3_client().abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
            except Exception as err:  # noqa: BLE001 - best effort; stale uploads are also swept by prefix
                log.warning("could not abort multipart upload of %s: %s", self.path, err)


class AtomicWrite:
    """`with atomic_write(path) as f: f.write(...)`: the file appears under its name only if the block ends
    without an exception."""

    def __init__(self, path: str, if_none_match: bool = False):
        self.path = path
        self.writer = _S3AtomicWriter(path, if_none_match=if_none_match) if is_s3(path) else _LocalAtomicWriter(path)

    def __enter__(self):
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


def atomic_write(path: str, if_none_match: bool = False) -> AtomicWrite:
    return AtomicWrite(path, if_none_match=if_none_match)


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file atomically. On S3 a file up to SINGLE_PUT_MAX is one PUT (atomic by itself); a larger one
    goes up as a parallel multipart upload (s3transfer completes it only when every part is in, and aborts it on
    error: readers never see a partial object)."""
    if is_s3(path):
        bucket, key = split_s3(path)
        if len(data) <= SINGLE_PUT_MAX:
            s3_call("PUT", path, s3_client().put_object, Bucket=bucket, Key=key, Body=data)
            return
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK,
                                max_concurrency=8, use_threads=True)
        s3_call("upload", path, lambda: s3_client().upload_fileobj(io.BytesIO(data), bucket, key, Config=config))
        return
    with atomic_write(path) as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def put_if_absent(path: str, data: bytes) -> bool:
    """Create `path` with `data` only if it does not exist yet; returns False if it already existed.
    On S3 this is a conditional PUT (If-None-Match: *); locally an O_EXCL link of a complete temp file."""
    if is_s3(path):
        from botocore.exceptions import ClientError

        try:
            with atomic_write(path, if_none_match=True) as f:
                f.write(data)
            return True
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in {"PreconditionFailed", "ConditionalRequestConflict"} or status in (409, 412):
                return False
            raise
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
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


def abort_stale_uploads(prefix: str, older_than_s: float = 0.0) -> int:
    """Abort unfinished multipart uploads under an s3 prefix (left by a killed writer). Returns the count."""
    if not is_s3(prefix):
        return 0
    import datetime as dt

    bucket, key = split_s3(prefix)
    client = s3_client()
    now = dt.datetime.now(dt.timezone.utc)
    n = 0
    resp = s3_call("list uploads", prefix, client.list_multipart_uploads, Bucket=bucket, Prefix=key)
    for up in resp.get("Uploads", []) or []:
        started = up.get("Initiated")
        if started is not None and (now - started).total_seconds() < older_than_s:
            continue
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
            n += 1
        except Exception as err:  # noqa: BLE001 - best effort
            log.warning("could not abort stale upload %s: %s", up.get("Key"), err)
    return n


def iter_lines(path: str, encoding: str = "utf-8", errors: str = "strict") -> Iterator[tuple[int, bytes]]:
    """(line number from 1, raw line bytes without newline) of a local or S3 text file, streamed."""
    with open_read(path) as f:
        for number, raw in enumerate(f, start=1):
            yield number, raw.rstrip(b"\r\n")
