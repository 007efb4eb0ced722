"""COCO (2014 / 2017 layout): annotations/captions_SPLIT.json + instances_SPLIT.json, images in SPLIT/FILE_NAME.

One image per image id with its five captions and its object boxes (category names are the object texts);
iscrowd=1 annotations are rejected as `crowd_box`, as X-VLM skips them. Only the train splits are read when there
are any (val/test are held out for evaluation); a folder with no train split is read whole.
"""
from __future__ import annotations

import logging
import re
from typing import Iterator

from pipeline.records import Annotation, ImageRef, Reject, make_ref
from pipeline.sources.jsonstream import iter_items
import storage
from storage.errors import XvlmError

log = logging.getLogger(__name__)

NAME = "coco"
DESCRIPTION = "COCO root with annotations/captions_*.json, instances_*.json and the SPLIT/ image folders"
_FILE = re.compile(r"(captions|instances)_(\w+)\.json$")


def sample_key(source_id: str) -> str:
    return f"coco-{int(source_id):012d}"


def _splits(path: str) -> dict[str, dict[str, str]]:
    """split -> {"captions": path, "instances": path} of the annotation files to read."""
    found: dict[str, dict[str, str]] = {}
    for entry in storage.list_files(storage.join(path, "annotations"), recursive=False):
        match = _FILE.search(entry.path.rsplit("/", 1)[-1])
        if match:
            found.setdefault(match.group(2), {})[match.group(1)] = entry.path
    if not found:
        raise XvlmError(f"{path}/annotations has no captions_*.json or instances_*.json: point coco=PATH at the "
                        f"COCO root (the folder holding annotations/ and train2017/)")
    train = {split: files for split, files in found.items() if split.startswith("train")}
    if train:
        skipped = sorted(set(found) - set(train))
        if skipped:
            log.info("coco: reading the train split(s) %s; held out: %s", sorted(train), skipped)
        return dict(sorted(train.items()))
    log.info("coco: no train split under %s; reading %s", path, sorted(found))
    return dict(sorted(found.items()))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _box(value: object) -> list[float] | None:
    if not isinstance(value, list) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    return [float(v) for v in value]


def _where(ann: dict, index: int) -> str:
    return f"annotation {ann['id']}" if _is_int(ann.get("id")) else f"annotations[{index}]"


def _images(path: str, ann_path: str, rel: str, split: str,
            listed: dict[int, tuple]) -> Iterator[ImageRef | Reject]:
    for index, item in iter_items(ann_path, "images.item", NAME, rel):
        if isinstance(item, Reject):
            continue  # a file that does not parse is reported once, by its annotations pass

        ok = isinstance(item, dict) and _is_int(item.get("id")) and isinstance(item.get("file_name"), str) \
            and _is_int(item.get("width")) and _is_int(item.get("height")) \
            and item["width"] > 0 and item["height"] > 0 and "/" not in item["file_name"] and item["file_name"]
        if not ok:
            yield Reject(NAME, "image", rel, f"images[{index}]", "malformed_line",
                         "an image entry needs an int id, a file_name and positive int width/height")
            continue
        image_id = item["id"]
        listing = (split, item["file_name"], item["width"], item["height"])
        if listed.get(image_id) == listing:
            continue  # the captions and instances files list the same images: one image, counted once
        listed.setdefault(image_id, listing)
        yield ImageRef(NAME, str(image_id), storage.join(path, split, item["file_name"]), item["width"],
                       item["height"], coco_id=image_id, ref=make_ref(rel, f"image {image_id}"))


def _captions(ann_path: str, rel: str) -> Iterator[Annotation | Reject]:
    for index, ann in iter_items(ann_path, "annotations.item", NAME, rel):
        if isinstance(ann, Reject):
            yield ann
            continue
        if not isinstance(ann, dict) or not _is_int(ann.get("image_id")) or "caption" not in ann:
            yield Reject(NAME, "caption", rel, f"annotations[{index}]", "malformed_line",
                         "a caption annotation needs an int image_id and a caption")
            continue
        yield Annotation(NAME, str(ann["image_id"]), "caption", ann["caption"], ref=make_ref(rel, _where(ann, index)))


def _categories(ann_path: str, rel: str) -> dict[int, str]:
    names: dict[int, str] = {}
    # Categories come last in the real files; a separate pass keeps memory flat instead of holding annotations.
    # A parse error here shows again in the annotations pass, which reports it.
    for index, cat in iter_items(ann_path, "categories.item", NAME, rel):
        if isinstance(cat, Reject):
            continue
        if isinstance(cat, dict) and _is_int(cat.get("id")) and isinstance(cat.get("name"), str):
            names[cat["id"]] = cat["name"]
        else:
            log.warning("coco: %s categories[%d] is malformed (%r); its objects are rejected", rel, index, cat)
    return names


def _objects(ann_path: str, rel: str) -> Iterator[Annotation | Reject]:
    names = _categories(ann_path, rel)
    for index, ann in iter_items(ann_path, "annotations.item", NAME, rel):
        if isinstance(ann, Reject):
            yield ann
            continue
        if not isinstance(ann, dict) or not _is_int(ann.get("image_id")):
            yield Reject(NAME, "object", rel, f"annotations[{index}]", "malformed_line",
                         "an instance annotation needs an int image_id")
            continue
        where = _where(ann, index)
        if ann.get("iscrowd"):
            yield Reject(NAME, "object", rel, where, "crowd_box", f"image {ann['image_id']}")
            continue
        box = _box(ann.get("bbox"))
        if box is None:
            yield Reject(NAME, "object", rel, where, "malformed_line", f"bbox is not [x, y, w, h]: {ann.get('bbox')!r:.80}")
            continue
        name = names.get(ann.get("category_id"))  # type: ignore[arg-type]
        if name is None:
            yield Reject(NAME, "object", rel, where, "malformed_line",
                         f"category_id {ann.get('category_id')!r:.40} is not in the file's categories")
            continue
        yield Annotation(NAME, str(ann["image_id"]), "object", name, bbox=box, ref=make_ref(rel, where))


def iter_records(path: str) -> Iterator[ImageRef | Annotation | Reject]:
    listed: dict[int, tuple] = {}
    for split, files in _splits(path).items():
        for kind in ("captions", "instances"):
            if kind not in files:
                log.warning("coco: no %s_%s.json under %s/annotations", kind, split, path)
                continue
            ann_path = files[kind]
            rel = f"annotations/{kind}_{split}.json"
            yield from _images(path, ann_path, rel, split, listed)
            yield from (_captions(ann_path, rel) if kind == "captions" else _objects(ann_path, rel))
