"""The shard format's constants and the sample-JSON check shared by the writer, `xvlm verify` and the loader.

The format itself is described in shards/FORMAT.md; bump FORMAT_VERSION whenever a reader would need to change.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np

FORMAT_VERSION = "1.0"

MANIFEST_NAME = "manifest.json"     # written last: the dataset's commit marker
INDEX_NAME = "index.parquet"        # one row per written sample
REJECTS_NAME = "rejects.parquet"    # one row per rejected input record
DEFAULT_SHARD_PREFIX = "shard"
# The long side of a stored image unless `xvlm build-shards --max-image-side` says otherwise (the builder's default,
# and what readers assume of a manifest that does not record it).
DEFAULT_MAX_IMAGE_SIDE = 512
# Member extensions of one sample, in the order they appear in the tar.
MEMBER_EXTENSIONS = ("jpg", "json", "txt")

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")   # no dots: WebDataset splits KEY.EXT at the first dot
_SHARD_RE = re.compile(r"^(?P<prefix>[A-Za-z0-9_-]+)-(?P<number>\d{6})\.tar$")
REGION_KINDS = ("region", "object")

# Bounds a reader holds hostile data to. A stored JPEG is at most --max-image-side (512 by default) and a sample's
# JSON a few KB even for a Visual Genome image with hundreds of boxes; the limits leave room for 8k-pixel images.
MAX_MEMBER_BYTES = 64 * 1024 * 1024         # a tar member above this is refused unread
MAX_SAMPLE_JSON_BYTES = 4 * 1024 * 1024     # KEY.json
MAX_JSON_DEPTH = 16                         # nesting of [ and {: a sample JSON needs 4, a manifest 5


class SampleError(ValueError):
    """A sample's JSON does not follow the format."""


def shard_name(prefix: str, number: int) -> str:
    """`PREFIX-000042.tar`."""
    return f"{prefix}-{number:06d}.tar"


def parse_shard_name(name: str) -> tuple[str, int] | None:
    """(prefix, number) of a shard file name, or None when the name is not one."""
    m = _SHARD_RE.match(name)
    return (m.group("prefix"), int(m.group("number"))) if m else None


def valid_key(key: str) -> bool:
    return bool(_KEY_RE.match(key))


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)   # a JSON string, escapes included


def json_depth(data: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """The deepest nesting of arrays and objects in JSON bytes, without parsing them (so without recursion):
    strings are cut out, then the running count of opening minus closing brackets is taken. Exact above `limit`;
    at or below it, an upper bound (JSON with few brackets is not scanned)."""
    brackets = data.count(b"[") + data.count(b"{")
    if brackets <= limit:
        return brackets        # it cannot nest deeper than the brackets it has
    outside = np.frombuffer(_JSON_STRING.sub(b'""', data), np.uint8)
    step = ((outside == ord("[")) | (outside == ord("{"))).astype(np.int64) \
        - ((outside == ord("]")) | (outside == ord("}"))).astype(np.int64)
    return int(np.cumsum(step).max(initial=0))


def load_json(data: bytes | str, what: str, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> object:
    """JSON bytes parsed with a bound on size and nesting: hostile JSON (megabytes of text, 100k nested arrays) is
    a SampleError naming `what`, never a RecursionError or a memory bomb."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if len(data) > max_bytes:
        raise SampleError(f"{what} is {len(data)} bytes, more than the {max_bytes} allowed")
    depth = json_depth(data, max_depth)
    if depth > max_depth:
        raise SampleError(f"{what} nests arrays / objects {depth} deep, more than the {max_depth} allowed")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:   # UnicodeDecodeError is a ValueError
        raise SampleError(f"{what} is not UTF-8 JSON: {err}") from None


def sample_text(meta: dict) -> str:
    """The `KEY.txt` member: the first caption, else the first region text."""
    if meta.get("captions"):
        return meta["captions"][0]
    if meta.get("regions"):
        return meta["regions"][0]["text"]
    return ""


def sample_problems(meta: object) -> list[str]:
    """Everything wrong with one sample's JSON (empty list when it is valid)."""
    if not isinstance(meta, dict):
        return [f"sample JSON is a {type(meta).__name__}, not an object"]
    problems: list[str] = []
    for name, kind in (("key", str), ("source", str), ("source_id", str), ("width", int), ("height", int),
                       ("captions", list), ("regions", list)):
        if name not in meta:
            problems.append(f"missing field {name!r}")
        elif not isinstance(meta[name], kind) or (kind is int and isinstance(meta[name], bool)):
            problems.append(f"field {name!r} is {type(meta[name]).__name__}, expected {kind.__name__}")
    if problems:
        return problems
    if not valid_key(meta["key"]):
        problems.append(f"key {meta['key']!r} has characters other than letters, digits, '_' and '-'")
    if "coco_id" in meta and (not isinstance(meta["coco_id"], int) or isinstance(meta["coco_id"], bool)):
        problems.append("field 'coco_id' is not an integer")
    width, height = meta["width"], meta["height"]
    if width <= 0 or height <= 0:
        problems.append(f"image size {width}x{height} is not positive")
    for i, caption in enumerate(meta["captions"]):
        if not isinstance(caption, str) or not caption.strip():
            problems.append(f"captions[{i}] is empty or not a string")
    for i, region in enumerate(meta["regions"]):
        problems.extend(f"regions[{i}]: {p}" for p in _region_problems(region, width, height))
    if not meta["captions"] and not meta["regions"]:
        problems.append("sample has neither captions nor regions")
    return problems


def _region_problems(region: object, width: int, height: int) -> list[str]:
    if not isinstance(region, dict):
        return ["not an object"]
    problems = []
    text = region.get("text")
    if not isinstance(text, str) or not text.strip():
        problems.append("text is empty or not a string")
    if region.get("kind") not in REGION_KINDS:
        problems.append(f"kind {region.get('kind')!r} is not one of {REGION_KINDS}")
    attributes = region.get("attributes", [])
    if not isinstance(attributes, list) or not all(isinstance(a, str) for a in attributes):
        problems.append("attributes is not a list of strings")
    bbox = region.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
        return problems + [f"bbox {bbox!r} is not 4 finite numbers"]
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        problems.append(f"bbox {bbox} has no area")
    # Boxes are rounded to 2 decimals when written; allow that much slack at the image border.
    if x < 0 or y < 0 or x + w > width + 0.01 or y + h > height + 0.01:
        problems.append(f"bbox {bbox} is not inside the {width}x{height} image")
    return problems


def validate_sample(meta: object) -> None:
    """Raise SampleError listing every problem of one sample's JSON."""
    problems = sample_problems(meta)
    if problems:
        key = meta.get("key", "?") if isinstance(meta, dict) else "?"
        raise SampleError(f"sample {key}: " + "; ".join(problems))
