"""Objects365 v1 / v2: a COCO-style annotation file (images, annotations with bbox and category_id, categories) and
the images under train/.

Layout (as the release unpacks and as mmdetection reads it):

    ROOT/annotations/zhiyuan_objv2_train.json   v2: file_name "images/v1/patch8/objects365_v1_00420917.jpg"
    ROOT/train/patch8/objects365_v1_00420917.jpg     -> ROOT/train/PATCH/FILE (the last two parts of file_name)
    ROOT/annotations/objects365_train.json      v1: file_name "obj365_train_000000000139.jpg" -> ROOT/train/FILE

The annotation file is looked for in ROOT/annotations/, then ROOT/ and ROOT/train/; v2 is read when both are there
(it holds v1's images). Only the train file is read: the val files are held out. Each box becomes an object whose
text is its category name; `iscrowd: 1` boxes (a group of objects) are kept with the `group_of` flag. The file
(~25M boxes in v2) is parsed as a stream, three times (categories, images, annotations), as COCO's.
"""
from __future__ import annotations

import logging
from typing import Iterator

from pipeline.records import Annotation, ImageRef, Reject, make_ref
from pipeline.sources.jsonstream import iter_items
import storage
from storage.errors import XvlmError

log = logging.getLogger(__name__)

NAME = "objects365"
DESCRIPTION = "Objects365 root with annotations/zhiyuan_objv2_train.json (v2) or objects365_train.json (v1) and train/"
ANNOTATION_FILES = ("zhiyuan_objv2_train.json", "objects365_train.json")   # v2 first: it supersedes v1
FOLDERS = ("annotations", "", "train")


def sample_key(source_id: str) -> str:
    return f"objects365-{int(source_id)}"


def _is_int(value: object) -> bool:
    return type(value) is int


def _annotation_file(path: str) -> tuple[str, str]:
    """(full path, path relative to ROOT) of the train annotation file."""
    for name in ANNOTATION_FILES:
        for folder in FOLDERS:
            rel = f"{folder}/{name}" if folder else name
            full = storage.join(path, rel)
            if storage.exists(full):
                return full, rel
    raise XvlmError(f"{path} has no {' or '.join(ANNOTATION_FILES)} (looked in {', '.join(f or '.' for f in FOLDERS)}):"
                    f" point objects365=PATH at the Objects365 root (annotations/ and train/)")


def image_file(file_name: str) -> str | None:
    """Where an image of the annotation file lies under ROOT: train/PATCH/FILE for v2's "images/v1/patchN/FILE",
    train/FILE for v1's bare names; None for a name that leaves the folder."""
    parts = [p for p in file_name.replace("\\", "/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        return None
    if len(parts) >= 2 and parts[-2].startswith("patch"):
        return f"train/{parts[-2]}/{parts[-1]}"
    return f"train/{parts[-1]}"


def _categories(ann_path: str, rel: str) -> dict[int, str]:
    names: dict[int, str] = {}
    for index, cat in iter_items(ann_path, "categories.item", NAME, rel):
        if isinstance(cat, Reject):
            continue  # reported once, by the annotations pass
        if isinstance(cat, dict) and _is_int(cat.get("id")) and isinstance(cat.get("name"), str):
            names[cat["id"]] = cat["name"]
        else:
            log.warning("objects365: %s categories[%d] is malformed (%r); its boxes are rejected", rel, index, cat)
    return names


def _images(path: str, ann_path: str, rel: str) -> Iterator[ImageRef | Reject]:
    for index, item in iter_items(ann_path, "images.item", NAME, rel):
        if isinstance(item, Reject):
            continue  # reported once, by the annotations pass
        ok = isinstance(item, dict) and _is_int(item.get("id")) and isinstance(item.get("file_name"), str) \
            and _is_int(item.get("width")) and _is_int(item.get("height")) and item["width"] > 0 and item["height"] > 0
        file = image_file(item["file_name"]) if ok else None
        if file is None:
            yield Reject(NAME, "image", rel, f"images[{index}]", "malformed_line",
                         "an image entry needs an int id, a file_name inside the release and positive int width/height")
            continue
        yield ImageRef(NAME, str(item["id"]), storage.join(path, file), item["width"], item["height"],
                       ref=make_ref(rel, f"image {item['id']}"))


def _box(value: object) -> list[float] | None:
    if type(value) is not list or len(value) != 4:
        return None
    for v in value:
        if type(v) is not float and type(v) is not int:
            return None
    return value  # type: ignore[return-value]


def _objects(ann_path: str, rel: str, names: dict[int, str]) -> Iterator[Annotation | Reject]:
    # The hot loop (25M boxes in v2): plain type checks, no helper calls but the box check.
    for index, ann in iter_items(ann_path, "annotations.item", NAME, rel):
        if type(ann) is not dict:
            yield ann if isinstance(ann, Reject) else Reject(NAME, "object", rel, f"annotations[{index}]",
                                                             "malformed_line", "an annotation is not an object")
            continue
        ann_id, image_id = ann.get("id"), ann.get("image_id")
        where = f"annotation {ann_id}" if type(ann_id) is int else f"annotations[{index}]"
        box = _box(ann.get("bbox"))
        name = names.get(ann.get("category_id"))  # type: ignore[arg-type]
        if type(image_id) is not int or box is None or name is None:
            detail = "image_id is not an int" if type(image_id) is not int else \
                f"bbox is not [x, y, w, h]: {ann.get('bbox')!r:.80}" if box is None else \
                f"category_id {ann.get('category_id')!r:.40} is not in the file's categories"
            yield Reject(NAME, "object", rel, where, "malformed_line", detail)
            continue
        yield Annotation(NAME, str(image_id), "object", name, bbox=box, ref=f"{rel}#{where}",
                         group_of=bool(ann.get("iscrowd")))


def iter_records(path: str) -> Iterator[ImageRef | Annotation | Reject]:
    ann_path, rel = _annotation_file(path)
    names = _categories(ann_path, rel)
    if not names:
        log.warning("objects365: %s has no usable categories: every box is rejected", rel)
    yield from _images(path, ann_path, rel)
    yield from _objects(ann_path, rel, names)
