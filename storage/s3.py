"""The S3 backend (boto3; any S3-compatible store): one instance per endpoint, holding its clients.

boto3 runs with retry mode `standard` (the default, `legacy`, retries less and without throttling backoff); the
endpoint is the instance's (`--endpoint-url`), else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS's; credentials
come from the standard chain (never printed). An object appears only on a single PUT or a completed multipart
upload (an interrupted one is aborted, and `clean_interrupted_writes` aborts those a killed writer left).

On top of boto3's retries (which give up on a refused connection after ~8 s), every request to an endpoint that
has answered before in this process is retried with backoff for up to XVLM_S3_RETRY_S seconds (default 120): a
restart or short outage of the store does not end a training run. Wrong credentials, a missing bucket and an
endpoint that never answered are S3AccessError, an XvlmError whose one line says what to check.
"""
from __future__ import annotations

import datetime as dt
import io
import logging
import os
import threading
import time
from typing import IO

from storage.backend import AtomicWriter, Backend, Entry
from storage.s3_errors import (S3AccessError, access_error, is_missing, is_precondition_failed, retryable,
                               split_s3)
from storage.s3_stream import S3ReadStream

log = logging.getLogger(__name__)

MULTIPART_CHUNK = 16 * 1024 * 1024
# write_bytes: one PUT up to this size, a parallel multipart upload above. A checkpoint's 18 MB optimizer state
# went up faster as one PUT than as two parallel 16 MB parts (their create/complete round trips; checkpoint save
# 1.23-1.32x against 1.32-1.43x plain put_object, bench/bench_train.py). S3 takes single PUTs up to 5 GB.
SINGLE_PUT_MAX = 64 * 1024 * 1024
RETRY_ENV = "XVLM_S3_RETRY_S"            # how long requests to an endpoint that answered before are retried
DEFAULT_RETRY_S = 120.0
# Endpoints that answered a request in this process: what this process has learnt about the stores, shared by
# every backend instance (a new instance for the same endpoint keeps retrying through an outage).
_ANSWERED: set[str | None] = set()


def _retry_seconds() -> float:
    return float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))


class S3Backend(Backend):
    """`s3://bucket/key` paths at one endpoint (None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS's default)."""

    def __init__(self, endpoint_url: str | None = None):
        self.endpoint_url = endpoint_url
        self._clients: dict[tuple, object] = {}
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str | None:
        """The endpoint requests go to (the environment is read each time: a test server may set it later)."""
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def client(self):
        """A boto3 S3 client per (process, endpoint), shared by the process's threads (a client is thread-safe once
        made; making one, ~0.5 s of loading service models, is not, hence the lock): standard retries with backoff,
        connect/read timeouts, a pool of 32 connections."""
        import boto3
        from botocore.config import Config

        endpoint = self.endpoint
        key = (os.getpid(), endpoint)   # a forked child makes its own: connections must not cross processes
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                config = Config(
                    retries={"mode": "standard", "max_attempts": int(os.environ.get("XVLM_S3_MAX_ATTEMPTS", "8"))},
                    connect_timeout=10, read_timeout=60, max_pool_connections=32,
                    s3={"addressing_style": "path"} if endpoint else None,
                )
                try:
                    client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
                except ValueError as err:   # botocore: "Invalid endpoint: ..."
                    raise S3AccessError(f"the S3 endpoint {endpoint!r} is not a URL ({err}): give --endpoint-url / "
                                        f"AWS_ENDPOINT_URL as http(s)://HOST:PORT") from None
                self._clients[key] = client
        return client

    def answered(self) -> None:
        _ANSWERED.add(self.endpoint)

    def has_answered(self) -> bool:
        return self.endpoint in _ANSWERED

    def describe_error(self, err: BaseException, path: str = "") -> str | None:
        return access_error(err, self.endpoint, path)

    def call(self, what: str, path: str, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`, one S3 request, under this backend's policy: transient failures (refused
        connections, timeouts, 5xx, throttling) of an endpoint that answered before are retried with backoff for up
        to XVLM_S3_RETRY_S seconds; credential, bucket and endpoint errors become S3AccessError; others pass."""
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - classified below
                if retryable(err) and self.has_answered() and time.monotonic() - start < _retry_seconds():
                    delay = min(16.0, 0.5 * 2 ** attempt)
                    attempt += 1
                    log.warning("s3 %s of %s failed (%s); retry %d in %.1fs", what, path, type(err).__name__,
                                attempt, delay)
                    time.sleep(delay)
                    continue
                message = self.describe_error(err, path)
                if message:
                    raise S3AccessError(message) from err
                raise
            self.answered()
            return result

    # ------------------------------------------------------------------------------------------ reading
    def local_path(self, path: str) -> str | None:
        return None

    def open_read(self, path: str, start: int = 0, end: int | None = None, buffer_size: int = 1 << 20) -> IO[bytes]:
        return io.BufferedReader(S3ReadStream(self, path, start=start, end=end), buffer_size=buffer_size)

    def read_bytes(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        with self.open_read(path, start=start or 0, end=end) as f:
            # read() without a size would go 8 KB at a time through RawIOBase.readall: 16 MB reads are ~1.5x faster
            chunks = []
            while chunk := f.read(16 << 20):
                chunks.append(chunk)
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # ------------------------------------------------------------------------------------------ metadata
    def exists(self, path: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(path)
        try:
            self.call("HEAD", path, self.client().head_object, Bucket=bucket, Key=key)
            return True
        except ClientError as err:
            if is_missing(err):
                return False
            raise

    def size(self, path: str) -> int:
        bucket, key = split_s3(path)
        return int(self.call("HEAD", path, self.client().head_object, Bucket=bucket, Key=key)["ContentLength"])

    def list_files(self, prefix: str, recursive: bool = True) -> list[Entry]:
        bucket, key = split_s3(prefix)
        if key and not key.endswith("/"):
            key += "/"
        kwargs = {"Bucket": bucket, "Prefix": key}
        if not recursive:
            kwargs["Delimiter"] = "/"

        def listing() -> list[Entry]:
            pages = self.client().get_paginator("list_objects_v2").paginate(**kwargs)
            return [Entry(f"s3://{bucket}/{obj['Key']}", int(obj["Size"])) for page in pages
                    for obj in page.get("Contents", [])]
        return sorted(self.call("LIST", prefix, listing), key=lambda e: e.path)

    # ------------------------------------------------------------------------------------------ writing
    def atomic_writer(self, path: str, if_none_match: bool = False) -> AtomicWriter:
        return S3AtomicWriter(self, path, if_none_match=if_none_match)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Up to SINGLE_PUT_MAX one PUT (atomic by itself); larger, a parallel multipart upload (s3transfer
        completes it only when every part is in, and aborts it on error: readers never see a partial object)."""
        bucket, key = split_s3(path)
        if len(data) <= SINGLE_PUT_MAX:
            self.call("PUT", path, self.client().put_object, Bucket=bucket, Key=key, Body=data)
            return
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK,
                                max_concurrency=8, use_threads=True)
        self.call("upload", path, lambda: self.client().upload_fileobj(io.BytesIO(data), bucket, key, Config=config))

    def put_if_absent(self, path: str, data: bytes) -> bool:
        """A conditional PUT (If-None-Match: *): the commit marker of checkpoints."""
        from botocore.exceptions import ClientError

        writer = S3AtomicWriter(self, path, if_none_match=True)
        try:
            writer.write(data)
            writer.commit()
            return True
        except ClientError as err:
            writer.abort()
            if is_precondition_failed(err):
                return False
            raise

    def makedirs(self, path: str) -> None:
        """Key prefixes need no folders."""

    # ------------------------------------------------------------------------------------------ deleting
    def delete(self, path: str) -> None:
        bucket, key = split_s3(path)
        self.call("DELETE", path, self.client().delete_object, Bucket=bucket, Key=key)

    def delete_tree(self, prefix: str, remove_folder: bool = False) -> int:
        entries = self.list_files(prefix)
        for e in entries:
            self.delete(e.path)
        return len(entries)

    def clean_interrupted_writes(self, folder: str, older_than_s: float = 0.0) -> int:
        """Abort the unfinished multipart uploads under `folder`/ (left by a killed writer)."""
        bucket, key = split_s3(folder.rstrip("/") + "/")
        client = self.client()
        now = dt.datetime.now(dt.timezone.utc)
        n = 0
        resp = self.call("list uploads", folder, client.list_multipart_uploads, Bucket=bucket, Prefix=key)
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


class S3AtomicWriter(AtomicWriter):
    """Buffers up to one chunk; small files become a single PUT, large ones a multipart upload that is
    completed on commit and aborted on error, so a reader never sees a partial object."""

    def __init__(self, backend: S3Backend, path: str, chunk_size: int | None = None, if_none_match: bool = False):
        super().__init__()
        self.backend = backend
        self.path = path
        self.bucket, self.key = split_s3(path)
        self.chunk_size = chunk_size or MULTIPART_CHUNK
        self.if_none_match = if_none_match
        self.buf = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict] = []
        self.bytes_written = 0

    def write(self, data) -> int:
        self.buf += data
        self.bytes_written += len(data)
        while len(self.buf) >= self.chunk_size:
            self._upload_part(bytes(self.buf[: self.chunk_size]))
            del self.buf[: self.chunk_size]
        return len(data)

    def _upload_part(self, data: bytes) -> None:
        client = self.backend.client()
        if self.upload_id is None:
            self.upload_id = self.backend.call("create upload", self.path, client.create_multipart_upload,
                                               Bucket=self.bucket, Key=self.key)["UploadId"]
        number = len(self.parts) + 1
        resp = self.backend.call("upload part", self.path, client.upload_part, Bucket=self.bucket, Key=self.key,
                                 UploadId=self.upload_id, PartNumber=number, Body=data)
        self.parts.append({"ETag": resp["ETag"], "PartNumber": number})

    def commit(self) -> None:
        client = self.backend.client()
        if self.upload_id is None:
            kwargs = {"Bucket": self.bucket, "Key": self.key, "Body": bytes(self.buf)}
            if self.if_none_match:
                kwargs["IfNoneMatch"] = "*"
            self.backend.call("PUT", self.path, client.put_object, **kwargs)
            return
        if self.buf:
            self._upload_part(bytes(self.buf))
            self.buf.clear()
        self.backend.call("complete upload", self.path, client.complete_multipart_upload, Bucket=self.bucket,
                          Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": self.parts})

    def abort(self) -> None:
        if self.upload_id is not None:
            try:
                self.backend.client().abort_multipart_upload(Bucket=self.bucket, Key=self.key,
                                                             UploadId=self.upload_id)
            except Exception as err:  # noqa: BLE001 - best effort; stale uploads are also swept by prefix
                log.warning("could not abort multipart upload of %s: %s", self.path, err)
