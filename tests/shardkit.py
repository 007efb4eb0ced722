"""Small datasets in the exact shard format (shards/FORMAT.md) for loader tests, written with the project's own
ShardWriter and manifest code, plus helpers to damage them (corrupt a sample, truncate a shard)."""
from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

import storage
from shards.format import shard_name
from shards.manifest import INDEX_SCHEMA, REJECTS_SCHEMA, Manifest, SourceCounts, write_dataset_files
from shards.writer import ShardWriter

COLORS = ["red", "blue", "green", "yellow", "white", "black"]
SHAPES = ["circle", "square", "triangle"]


def make_sample(key: str, source: str, rng: np.random.Generator, size: tuple[int, int] = (96, 72),
                captions: bool | int = True, regions: int = 2, noise: bool = False,
                phrases: bool = True) -> tuple[bytes, dict]:
    """A JPEG with coloured boxes and its sample JSON (`captions` captions, True = 1, and region/object boxes inside
    the image; every other box is a region phrase unless `phrases` is false: objects only, as COCO); `noise` fills
    the background with noise, which makes large (slow to stream) JPEGs."""
    width, height = size
    if noise:
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    else:
        image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    meta_regions = []
    for i in range(regions):
        w, h = float(rng.integers(8, width // 2)), float(rng.integers(8, height // 2))
        x, y = float(rng.integers(0, width - int(w))), float(rng.integers(0, height - int(h)))
        color, shape = COLORS[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))]
        draw.rectangle([x, y, x + w, y + h], fill=color)
        kind = "object" if i % 2 or not phrases else "region"
        text = shape if kind == "object" else f"a {color} {shape} on the left"
        meta_regions.append({"bbox": [x, y, w, h], "text": text, "kind": kind,
                             "attributes": [color] if kind == "object" else []})
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95 if noise else 85)
    meta = {"key": key, "source": source, "source_id": key.split("-", 1)[1], "width": width, "height": height,
            "captions": [f"{key} a picture of shapes on the right"] + [f"{key} caption {i}" for i in range(1, int(captions))]
            if captions else [], "regions": meta_regions}
    return buf.getvalue(), meta


def make_dataset(out: str, samples: int = 40, per_shard: int = 10, sources: tuple[str, ...] = ("coco",),
                 seed: int = 0, size: tuple[int, int] = (96, 72), format_version: str | None = None,
                 noise: bool = False, captionless: tuple[str, ...] = (), boxless: tuple[str, ...] = (),
                 captions: dict[str, int] | None = None, objects_only: tuple[str, ...] = ()) -> str:
    """Write `samples` samples (keys SOURCE-000000..., sorted) into shards of `per_shard`; returns `out`.
    Samples of the `captionless` sources have regions only (like Visual Genome images outside COCO), those of the
    `boxless` sources captions only (like SBU), those of the `objects_only` sources object boxes and no region
    phrases (like COCO); `captions` gives a source's captions per sample (default 1)."""
    rng = np.random.default_rng(seed)
    storage.makedirs(out)
    keys = sorted(f"{sources[i % len(sources)]}-{i:06d}" for i in range(samples))
    rows, shard_entries, counts = [], [], {s: SourceCounts() for s in sources}
    for number, first in enumerate(range(0, samples, per_shard)):
        name = shard_name("shard", number)
        with ShardWriter(storage.join(out, name)) as writer:
            for key in keys[first:first + per_shard]:
                source = key.split("-", 1)[0]
                jpeg, meta = make_sample(key, source, rng, size=size, noise=noise,
                                         captions=0 if source in captionless else (captions or {}).get(source, 1),
                                         regions=0 if source in boxless else 2, phrases=source not in objects_only)
                offset = writer.write(key, jpeg, meta)
                counts[source].add_written("image")
                rows.append({"key": key, "shard": name, "offset": offset, "source": source, "width": size[0],
                             "height": size[1], "jpeg_bytes": len(jpeg), "passthrough": True,
                             "num_captions": len(meta["captions"]),
                             "num_regions": sum(r["kind"] == "region" for r in meta["regions"]),
                             "num_objects": sum(r["kind"] == "object" for r in meta["regions"]),
                             "caption_lengths": [len(c.split()) for c in meta["captions"]],
                             "box_area_fractions": [r["bbox"][2] * r["bbox"][3] / (size[0] * size[1])
                                                    for r in meta["regions"]]})
        info = writer.info
        shard_entries.append({"name": info.name, "samples": info.samples, "bytes": info.bytes, "sha256": info.sha256})
    manifest = Manifest(build={"command": ["tests/shardkit.py"], "config": {}}, sources=counts, shards=shard_entries)
    if format_version is not None:
        manifest.format_version = format_version
    write_dataset_files(out, pa.Table.from_pylist(rows, schema=INDEX_SCHEMA),
                        pa.Table.from_pylist([], schema=REJECTS_SCHEMA), manifest)
    return out


def corrupt_member(dataset_dir: str, shard: str, key: str, ext: str = "jpg") -> None:
    """Overwrite the bytes of one member's data (same length) with garbage: the tar stays well-formed."""
    path = os.path.join(dataset_dir, shard)
    data = bytearray(open(path, "rb").read())
    name = f"{key}.{ext}".encode()
    at = data.find(name)
    assert at >= 0, f"{key}.{ext} not in {shard}"
    header = at - (at % 512)
    size = int(data[header + 124:header + 136].split(b"\0")[0].strip() or b"0", 8)
    start = header + 512
    data[start:start + size] = b"\xff" * size
    open(path, "wb").write(bytes(data))


def corrupt_header(dataset_dir: str, shard: str, key: str, ext: str = "json") -> None:
    """Break the checksum of one member's tar header: tarfile stops reading there."""
    path = os.path.join(dataset_dir, shard)
    data = bytearray(open(path, "rb").read())
    at = data.find(f"{key}.{ext}".encode())
    header = at - (at % 512)
    data[header + 148:header + 156] = b"9999999\0"
    open(path, "wb").write(bytes(data))


def truncate_shard(dataset_dir: str, shard: str, keep_fraction: float = 0.5) -> None:
    path = os.path.join(dataset_dir, shard)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep_fraction))


def upload(local_dir: str, prefix: str) -> str:
    """Copy a dataset folder to an s3:// prefix (manifest last, as the builder does); returns the prefix."""
    names = sorted(os.listdir(local_dir), key=lambda n: n == "manifest.json")
    for name in names:
        with open(os.path.join(local_dir, name), "rb") as f:
            storage.write_bytes(storage.join(prefix, name), f.read())
    return prefix
