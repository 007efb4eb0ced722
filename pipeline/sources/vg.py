"""Visual Genome 1.2: image_data.json, region_descriptions.json and attributes.json (or objects.json), images in
VG_100K/ and VG_100K_2/.

Region phrases become regions; objects become objects whose text is their attributes then their name
("white backpack"). attributes.json holds every object of objects.json plus its attributes, so it is read
instead of objects.json when present (objects.json alone gives objects without attributes).
"""
from __future__ import annotations

import logging
from typing import Iterator

from pipeline.records import Annotation, ImageRef, Reject, make_ref
from pipeline.sources.jsonstream import iter_items
from pipeline.textclean import INVALID_MARK
import storage
from storage.errors import XvlmError

log = logging.getLogger(__name__)

NAME = "vg"
DESCRIPTION = "Visual Genome root with image_data.json, region_descriptions.json, attributes.json/objects.json, VG_100K*/"
IMAGE_FOLDERS = ("VG_100K", "VG_100K_2")
# A VG image whose coco_id is an image of the staged `coco` source is part of that COCO sample (pipeline/group.py).
JOIN_BY_COCO_ID = "coco"


def sample_key(source_id: str) -> str:
    return f"vg-{int(source_id)}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _image_file(image_id: int, url: object) -> str:
    """VG_100K/ID.jpg or VG_100K_2/ID.jpg, as the image URL says (images.zip and images2.zip unpack to these)."""
    if isinstance(url, str):
        parts = url.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] in IMAGE_FOLDERS and parts[-1] == f"{image_id}.jpg":
            return f"{parts[-2]}/{parts[-1]}"
    return f"VG_100K/{image_id}.jpg"


def _images(path: str) -> Iterator[ImageRef | Reject]:
    rel = "image_data.json"
    for index, item in iter_items(storage.join(path, rel), "item", NAME, rel):
        if isinstance(item, Reject):
            yield item
            continue
        image_id = item.get("image_id", item.get("id")) if isinstance(item, dict) else None
        ok = _is_int(image_id) and _is_int(item.get("width")) and _is_int(item.get("height")) \
            and item["width"] > 0 and item["height"] > 0 and (item.get("coco_id") is None or _is_int(item["coco_id"]))
        if not ok:
            yield Reject(NAME, "image", rel, f"item {index}", "malformed_line",
                         "an image entry needs an int image_id, positive int width/height and an int or null coco_id")
            continue
        yield ImageRef(NAME, str(image_id), storage.join(path, _image_file(image_id, item.get("url"))),
                       item["width"], item["height"], coco_id=item.get("coco_id"),
                       ref=make_ref(rel, f"image {image_id}"))


def _box(item: dict, w: str, h: str) -> list[float] | None:
    values = [item.get("x"), item.get("y"), item.get(w), item.get(h)]
    for v in values:  # the hot loop of the biggest files: plain checks, no generator
        if type(v) is not int and type(v) is not float:
            return None
    return values  # type: ignore[return-value]


def _regions(path: str) -> Iterator[Annotation | Reject]:
    rel = "region_descriptions.json"
    for index, item in iter_items(storage.join(path, rel), "item", NAME, rel):
        if isinstance(item, Reject):
            yield item
            continue
        if not isinstance(item, dict) or not isinstance(item.get("regions"), list):
            yield Reject(NAME, "line", rel, f"item {index}", "malformed_line", "an entry needs a regions list")
            continue
        outer_id = item.get("id")
        for k, region in enumerate(item["regions"]):
            # The hot loop of the biggest file (5.4M regions): plain type checks, no helper calls.
            if type(region) is dict:
                image_id, region_id = region.get("image_id", outer_id), region.get("region_id")
                box, phrase = _box(region, "width", "height"), region.get("phrase")
            else:
                image_id = region_id = box = phrase = None
            where = f"region {region_id}" if type(region_id) is int else f"item {index} region {k}"
            if type(image_id) is not int or box is None or phrase is None:
                yield Reject(NAME, "region", rel, where, "malformed_line",
                             "a region needs an int image_id, a phrase and numeric x, y, width, height")
                continue
            yield Annotation(NAME, str(image_id), "region", phrase, bbox=box, ref=f"{rel}#{where}")


def _object_text(obj: dict) -> tuple[str, list[str]] | None:
    """("white backpack", ["white"]) from VG's names + attributes; None when the object has no name."""
    names = obj.get("names")
    name = names[0] if isinstance(names, list) and names else obj.get("name")
    if not isinstance(name, str):
        return None
    attributes: list[str] = []
    raw = obj.get("attributes") or []
    if not isinstance(raw, list):
        return None
    for attribute in raw:
        if not isinstance(attribute, str):
            return None
        cleaned = " ".join(attribute.split())
        if cleaned and cleaned not in attributes:
            attributes.append(cleaned)
    # Invalid UTF-8 anywhere in the text rejects the object (clean_text sees the mark in the joined text).
    marked = [a for a in attributes if INVALID_MARK in a]
    text = " ".join(attributes + [name]) if not marked else INVALID_MARK
    return text, attributes


def _objects(path: str) -> Iterator[Annotation | Reject]:
    rel = "attributes.json"
    field = "attributes"
    if not storage.exists(storage.join(path, rel)):
        rel, field = "objects.json", "objects"
        log.info("vg: no attributes.json under %s; objects come from objects.json, without attributes", path)
    for index, item in iter_items(storage.join(path, rel), "item", NAME, rel):
        if isinstance(item, Reject):
            yield item
            continue
        if not isinstance(item, dict) or not isinstance(item.get(field), list):
            yield Reject(NAME, "line", rel, f"item {index}", "malformed_line", f"an entry needs an {field} list")
            continue
        image_id = item.get("image_id", item.get("id"))
        for k, obj in enumerate(item[field]):
            object_id = obj.get("object_id") if isinstance(obj, dict) else None
            where = f"object {object_id}" if _is_int(object_id) else f"item {index} object {k}"
            box = _box(obj, "w", "h") if isinstance(obj, dict) else None
            named = _object_text(obj) if isinstance(obj, dict) else None
            if not _is_int(image_id) or box is None or named is None:
                yield Reject(NAME, "object", rel, where, "malformed_line",
                             "an object needs an int image_id, a name, string attributes and numeric x, y, w, h")
                continue
            text, attributes = named
            yield Annotation(NAME, str(image_id), "object", text, bbox=box, attributes=attributes,
                             ref=make_ref(rel, where))


def iter_records(path: str) -> Iterator[ImageRef | Annotation | Reject]:
    if not storage.exists(storage.join(path, "image_data.json")):
        raise XvlmError(f"{path} has no image_data.json: point vg=PATH at the Visual Genome root "
                        f"(image_data.json, region_descriptions.json, attributes.json, VG_100K/)")
    yield from _images(path)
    if storage.exists(storage.join(path, "region_descriptions.json")):
        yield from _regions(path)
    else:
        log.warning("vg: no region_descriptions.json under %s: no region phrases", path)
    if storage.exists(storage.join(path, "attributes.json")) or storage.exists(storage.join(path, "objects.json")):
        yield from _objects(path)
    else:
        log.warning("vg: no attributes.json or objects.json under %s: no objects", path)
