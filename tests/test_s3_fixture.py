"""The SeaweedFS fixture is a real S3 server: put, multipart upload, list, ranged get, delete with boto3 —
and the project's storage layer round-trips through it."""
from __future__ import annotations

import os
import socket

import boto3
import pytest
from botocore.config import Config

import storage
from storage import s3 as s3_backend
from storage.s3_errors import split_s3

pytestmark = pytest.mark.s3


def _client(s3):
    return boto3.client("s3", endpoint_url=s3.endpoint, config=Config(retries={"mode": "standard"},
                                                                       s3={"addressing_style": "path"}))


def test_boto3_round_trip(s3):
    c = _client(s3)
    c.put_object(Bucket=s3.bucket, Key="rt/small.bin", Body=b"hello")
    assert c.get_object(Bucket=s3.bucket, Key="rt/small.bin")["Body"].read() == b"hello"

    big = os.urandom(20 * 1024 * 1024)
    up = c.create_multipart_upload(Bucket=s3.bucket, Key="rt/big.bin")
    parts = []
    for i, start in enumerate(range(0, len(big), 8 * 1024 * 1024), start=1):
        r = c.upload_part(Bucket=s3.bucket, Key="rt/big.bin", UploadId=up["UploadId"], PartNumber=i,
                          Body=big[start:start + 8 * 1024 * 1024])
        parts.append({"ETag": r["ETag"], "PartNumber": i})
    c.complete_multipart_upload(Bucket=s3.bucket, Key="rt/big.bin", UploadId=up["UploadId"],
                                MultipartUpload={"Parts": parts})
    assert c.head_object(Bucket=s3.bucket, Key="rt/big.bin")["ContentLength"] == len(big)

    keys = [o["Key"] for o in c.list_objects_v2(Bucket=s3.bucket, Prefix="rt/")["Contents"]]
    assert keys == ["rt/big.bin", "rt/small.bin"]

    ranged = c.get_object(Bucket=s3.bucket, Key="rt/big.bin", Range="bytes=1000-1999")["Body"].read()
    assert ranged == big[1000:2000]

    c.delete_object(Bucket=s3.bucket, Key="rt/big.bin")
    c.delete_object(Bucket=s3.bucket, Key="rt/small.bin")
    assert "Contents" not in c.list_objects_v2(Bucket=s3.bucket, Prefix="rt/")


def _listening_sockets() -> list[tuple[str, int]]:
    """(ip, port) of every listening TCP socket on the machine, from /proc/net/tcp{,6}."""
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(name):
            continue
        for line in open(name).read().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state != "0A":  # LISTEN
                continue
            ip_hex, port_hex = local.split(":")
            if len(ip_hex) == 8:
                ip = socket.inet_ntop(socket.AF_INET, bytes.fromhex(ip_hex)[::-1])
            else:
                ip = socket.inet_ntop(socket.AF_INET6, b"".join(bytes.fromhex(ip_hex[i:i + 8])[::-1]
                                                              for i in range(0, 32, 8)))
            out.append((ip, int(port_hex, 16)))
    return out


def test_server_listens_on_loopback_only(s3):
    ours = set(s3.ports.values())
    listening = [(ip, port) for ip, port in _listening_sockets() if port in ours]
    assert any(port == s3.ports["s3.port"] for _ip, port in listening)
    for ip, port in listening:
        assert ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1"), f"port {port} listens on {ip}"


def test_storage_layer_round_trip(s3_prefix):
    data = os.urandom(40 * 1024 * 1024 + 123)  # larger than one multipart chunk
    path = storage.join(s3_prefix, "a", "blob.bin")
    with storage.atomic_write(path) as f:
        for i in range(0, len(data), 5_000_000):
            f.write(data[i:i + 5_000_000])
    assert storage.exists(path) and storage.size(path) == len(data)
    assert storage.read_bytes(path, 7, 107) == data[7:107]
    with storage.open_read(path, start=len(data) - 10) as f:
        assert f.read() == data[-10:]
    assert [e.path for e in storage.list_files(s3_prefix)] == [path]
    storage.delete(path)
    assert not storage.exists(path)


def test_write_bytes_single_put_and_parallel_multipart(s3_prefix, monkeypatch):
    """Up to SINGLE_PUT_MAX one PUT; above, a multipart upload of MULTIPART_CHUNK parts. Both read back whole."""
    monkeypatch.setattr(s3_backend, "SINGLE_PUT_MAX", 6 * 1024 * 1024)
    monkeypatch.setattr(s3_backend, "MULTIPART_CHUNK", 5 * 1024 * 1024)   # S3's smallest part
    client = storage.backend_for(s3_prefix).client()
    for size, parts in ((6 * 1024 * 1024, 0), (6 * 1024 * 1024 + 1, 2)):
        data = os.urandom(size)
        path = storage.join(s3_prefix, f"wb-{size}.bin")
        storage.write_bytes(path, data)
        assert storage.read_bytes(path) == data
        bucket, key = split_s3(path)
        etag = client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        # a multipart object's ETag ends in -<number of parts>
        assert (etag.rsplit("-", 1)[1] if "-" in etag else "0") == str(parts), etag


def test_atomic_write_failure_leaves_nothing(s3_prefix, tmp_path):
    for base in (s3_prefix, str(tmp_path)):
        path = storage.join(base, "partial.bin")
        with pytest.raises(RuntimeError):
            with storage.atomic_write(path) as f:
                f.write(os.urandom(20 * 1024 * 1024))  # a multipart upload is in flight on S3
                raise RuntimeError("killed")
        assert not storage.exists(path)
        assert storage.list_files(base) == []


def test_put_if_absent(s3_prefix, tmp_path):
    for base in (s3_prefix, str(tmp_path)):
        path = storage.join(base, "COMMITTED")
        assert storage.put_if_absent(path, b"first") is True
        assert storage.put_if_absent(path, b"second") is False
        assert storage.read_bytes(path) == b"first"
