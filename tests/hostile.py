"""Hostile shard data for the fault-injection tests: samples whose members an attacker or a broken tool chose
(100k-deep JSON, lone surrogates, GNU sparse members, oversized members, image bombs, non-image bytes, NaN boxes),
written into a dataset made by shardkit with the manifest (bytes, sha256) and index (offsets) brought up to date,
so that only the hostile content is wrong."""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from shards.manifest import INDEX_SCHEMA, write_table
from shards.writer import RECORD, tar_header

BLOCK = 512


def regular(name: str, data: bytes) -> bytes:
    """A plain tar member: header and data padded to whole blocks."""
    return tar_header(name, len(data)) + data + b"\0" * (-len(data) % BLOCK)


def sparse(name: str, real_size: int, data: bytes = b"\xff" * 600) -> bytes:
    """An old-GNU sparse member ('S'): `data` stored at the end of a `real_size`-byte file of zeros. tarfile calls
    it a regular file (isreg() is true) and reads it back as `real_size` bytes."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode = tarfile.GNUTYPE_SPARSE, len(data), 0o644
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
    header[386:398] = b"%011o\0" % (real_size - len(data))     # sparse map: (offset, numbytes)
    header[398:410] = b"%011o\0" % len(data)
    header[482] = 0                                            # no extended sparse headers
    header[483:495] = b"%011o\0" % real_size                   # the expanded size
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data + b"\0" * (-len(data) % BLOCK)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) claims width x height: opening it reads only the header."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (more than Pillow's decompression-bomb limit)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def sample_json(key: str, **changes) -> bytes:
    meta = {"key": key, "source": "coco", "source_id": key.split("-", 1)[1], "width": 96, "height": 72,
            "captions": [f"{key} a red circle on the left"], "regions": [
                {"bbox": [4.0, 4.0, 30.0, 20.0], "text": "red circle", "kind": "object", "attributes": ["red"]}]}
    meta.update(changes)
    return json.dumps(meta).encode()


def _read(shard: str) -> list[tuple[str, dict[str, bytes]]]:
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(shard) as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(info).read()
    return samples


def replace_samples(dataset: str, replacements: dict[str, list[bytes] | dict[str, bytes]]) -> None:
    """Rewrite the shards holding the keys of `replacements`: a key's members become the given raw members (a list
    of `regular` / `sparse` outputs) or, for a dict {ext: bytes}, its members with those exts replaced. The
    manifest (bytes, sha256) and index (offsets) follow."""
    manifest_path = Path(dataset, "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    index = pq.read_table(os.path.join(dataset, "index.parquet")).to_pylist()
    offsets: dict[str, int] = {}
    for entry in manifest["shards"]:
        path = os.path.join(dataset, entry["name"])
        samples = _read(path)
        if not any(key in replacements for key, _ in samples):
            continue
        out = bytearray()
        for key, files in samples:
            offsets[key] = len(out)
            change = replacements.get(key)
            if isinstance(change, list):
                out += b"".join(change)
                continue
            files = {**files, **(change or {})}
            out += b"".join(regular(f"{key}.{ext}", files[ext]) for ext in ("jpg", "json", "txt") if ext in files)
        out += b"\0" * (2 * BLOCK)
        out += b"\0" * (-len(out) % RECORD)
        Path(path).write_bytes(bytes(out))
        entry.update(bytes=len(out), sha256=hashlib.sha256(bytes(out)).hexdigest())
    manifest_path.write_text(json.dumps(manifest))
    for row in index:
        row["offset"] = offsets.get(row["key"], row["offset"])
    write_table(os.path.join(dataset, "index.parquet"), index, INDEX_SCHEMA)
