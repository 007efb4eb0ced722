"""RefCOCO, RefCOCO+ and RefCOCOg training refs: `refs(*).p` + `instances.json` per dataset, as the refer toolkit
(lichengunc/refer) lays out its data folder; the images are COCO train2014 pictures.

    ROOT/refcoco/refs(unc).p     + ROOT/refcoco/instances.json
    ROOT/refcoco+/refs(unc).p    + ROOT/refcoco+/instances.json
    ROOT/refcocog/refs(umd).p    + ROOT/refcocog/instances.json     (refs(google).p when there is no umd split)
    ROOT/images/mscoco/images/train2014/COCO_train2014_000000581857.jpg

Each sentence of a ref becomes a region: its text (the `raw` sentence, else `sent`) with the box of the ref's
`ann_id` in instances.json, on the image with that COCO id. Only refs of the `train` split are read into
pretraining: the sentences of val / testA / testB / test refs are rejected as `held_out_split`.

The refs files are pickles: they are read with shards.safe_pickle.load_plain, which allows only plain containers
and scalars and never runs code from the file; anything else (a class, a global, a reduce) stops the build with an
error naming what was refused. A ref whose ann_id is not in instances.json, or that is not a dict with the needed
fields, is a counted `malformed_line`.

`JOIN_BY_COCO_ID`: a RefCOCO image that is an image of the staged `coco` source (COCO 2017 train holds every
train2014 image, under the same id) joins that COCO sample: one sample with COCO's captions and objects and the
referring expressions. A RefCOCO image whose COCO image is not in the build is a sample of its own
(`refcoco-000000581857`), read from ROOT/images/... (or rejected there as missing_image).
"""
from __future__ import annotations

import logging
from typing import Iterator

from pipeline.records import Annotation, ImageRef, Reject, make_ref
from pipeline.sources.jsonstream import iter_items
from pipeline.textclean import INVALID_MARK
import storage
from storage.errors import XvlmError
from shards.downstream import read_refs_list

log = logging.getLogger(__name__)

NAME = "refcoco"
DESCRIPTION = "refer data folder: refcoco/, refcoco+/, refcocog/ with refs(*).p + instances.json, images/mscoco/images/train2014/"
JOIN_BY_COCO_ID = "coco"
# dataset folder -> refs files in order of preference (one split of each dataset is read: they hold the same refs)
DATASETS = {"refcoco": ("refs(unc).p", "refs(google).p"), "refcoco+": ("refs(unc).p",),
            "refcocog": ("refs(umd).p", "refs(google).p")}
IMAGES = "images/mscoco/images/train2014"


def sample_key(source_id: str) -> str:
    return f"refcoco-{int(source_id):012d}"


def _is_int(value: object) -> bool:
    return type(value) is int


def _text(sentence: dict) -> str | None:
    for field in ("raw", "sent"):
        text = sentence.get(field)
        if isinstance(text, str) and text.strip():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return INVALID_MARK       # bytes that were not UTF-8: the stage rejects it as invalid_utf8
            return text
    return sentence.get("raw") if isinstance(sentence.get("raw"), str) else None


def _train_refs(refs: list, rel: str) -> Iterator[tuple[dict | None, str, Reject | None]]:
    """(ref, where, None) for usable refs, or (None, where, Reject) for a ref that is not one."""
    for index, ref in enumerate(refs):
        ref_id = ref.get("ref_id") if isinstance(ref, dict) else None
        where = f"ref {ref_id}" if _is_int(ref_id) else f"refs[{index}]"
        ok = isinstance(ref, dict) and _is_int(ref.get("ann_id")) and _is_int(ref.get("image_id")) \
            and isinstance(ref.get("sentences"), list) and isinstance(ref.get("split"), str)
        if not ok:
            yield None, where, Reject(NAME, "line", rel, where, "malformed_line",
                                      "a ref needs an int ann_id and image_id, a split and a sentences list")
            continue
        yield ref, where, None


def _instances(path: str, rel: str, anns_needed: set[int], images_needed: set[int]):
    """(ann_id -> (image_id, bbox), image_id -> (file_name, width, height), parse rejects) for the ids asked for
    only. Anything else in the file is not an input record of this source; a ref whose ann or image is missing or
    malformed here is rejected with its sentences."""
    anns: dict[int, tuple[int, list[float]]] = {}
    images: dict[int, tuple[str, int, int]] = {}
    rejects: list[Reject] = []
    for _, ann in iter_items(path, "annotations.item", NAME, rel):
        if isinstance(ann, dict) and _is_int(ann.get("id")) and ann["id"] in anns_needed \
                and _is_int(ann.get("image_id")):
            box = ann.get("bbox")
            if isinstance(box, list) and len(box) == 4 and all(type(v) in (int, float) for v in box):
                anns[ann["id"]] = (ann["image_id"], [float(v) for v in box])
        elif isinstance(ann, Reject):
            rejects.append(ann)     # the file stopped parsing: what came before it is used
    for _, image in iter_items(path, "images.item", NAME, rel):
        if isinstance(image, dict) and _is_int(image.get("id")) and image["id"] in images_needed \
                and isinstance(image.get("file_name"), str) \
                and "/" not in image["file_name"] and _is_int(image.get("width")) and _is_int(image.get("height")) \
                and image["width"] > 0 and image["height"] > 0:
            images[image["id"]] = (image["file_name"], image["width"], image["height"])
    return anns, images, rejects


def _dataset(root: str, folder: str, refs_name: str, listed: set[int]) -> Iterator[ImageRef | Annotation | Reject]:
    rel, inst_rel = f"{folder}/{refs_name}", f"{folder}/instances.json"
    inst_path = storage.join(root, inst_rel)
    if not storage.exists(inst_path):
        raise XvlmError(f"{root}/{inst_rel} does not exist: the refs of {folder} need the instances.json of the "
                        f"refer release beside them")
    refs = read_refs_list(storage.join(root, rel), rel)
    train = [(ref, where) for ref, where, _ in _train_refs(refs, rel) if ref is not None and ref["split"] == "train"]
    anns, images, rejects = _instances(inst_path, inst_rel, {ref["ann_id"] for ref, _ in train},
                                       {ref["image_id"] for ref, _ in train})
    yield from rejects
    for image_id, (file_name, width, height) in sorted(images.items()):
        if image_id not in listed:      # refcoco and refcoco+ share images: list each once
            listed.add(image_id)
            yield ImageRef(NAME, str(image_id), storage.join(root, IMAGES, file_name), width, height,
                           coco_id=image_id, ref=make_ref(inst_rel, f"image {image_id}"))
    log.info("refcoco: %s: %d refs, %d of the train split, on %d images", rel, len(refs), len(train), len(images))
    for ref, where, reject in _train_refs(refs, rel):
        if reject is not None:
            yield reject
            continue
        yield from _sentences(ref, where, rel, anns)


def _sentences(ref: dict, where: str, rel: str, anns: dict) -> Iterator[Annotation | Reject]:
    held_out = ref["split"] != "train"
    found = anns.get(ref["ann_id"])
    for k, sentence in enumerate(ref["sentences"]):
        sent_where = f"{where} sentence {k}"
        if held_out:
            yield Reject(NAME, "region", rel, sent_where, "held_out_split", f"split {ref['split']!r:.20}")
            continue
        text = _text(sentence) if isinstance(sentence, dict) else None
        if text is None:
            yield Reject(NAME, "region", rel, sent_where, "malformed_line", "a sentence needs a raw or sent text")
        elif found is None:
            yield Reject(NAME, "region", rel, sent_where, "malformed_line",
                         f"ann_id {ref['ann_id']} is not in instances.json (no box for this ref)")
        elif found[0] != ref["image_id"]:
            yield Reject(NAME, "region", rel, sent_where, "malformed_line",
                         f"ann_id {ref['ann_id']} is on image {found[0]}, the ref says image {ref['image_id']}")
        else:
            yield Annotation(NAME, str(ref["image_id"]), "region", text, bbox=list(found[1]),
                             ref=make_ref(rel, sent_where))


def iter_records(path: str) -> Iterator[ImageRef | Annotation | Reject]:
    chosen = []
    for folder, candidates in DATASETS.items():
        name = next((c for c in candidates if storage.exists(storage.join(path, folder, c))), None)
        if name is not None:
            chosen.append((folder, name))
    if not chosen:
        raise XvlmError(f"{path} holds none of refcoco/refs(unc).p, refcoco+/refs(unc).p, refcocog/refs(umd).p: "
                        f"point refcoco=PATH at the refer toolkit's data folder")
    listed: set[int] = set()
    for folder, name in chosen:
        yield from _dataset(path, folder, name, listed)
