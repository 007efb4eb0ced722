"""Readers of X-VLM's downstream files (the retrieval and RefCOCO+ grounding sets its fine-tuning scripts read), local
or s3://, and the one way to read their images. Storage layer only: no model, no tokenizer.

API (docs/downstream.md has the formats and the official file:line they follow):

* ``read_retrieval_train(ann) -> list[RetrievalPair]``: coco_train.json / flickr30k_train.json, one entry per caption
  ``{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": "...", "image_id": "coco_391895"}``
  (dataset/re_dataset.py:15-45). ``RetrievalPair(image, caption, image_id: str)``.
* ``read_retrieval_eval(ann) -> RetrievalEvalSet``: *_val.json / *_test.json, one entry per image with its list of
  captions (re_dataset.py:48-68). ``RetrievalEvalSet(name, images, texts, text_image, image_texts)``: text t describes
  image ``text_image[t]``; image i has texts ``image_texts[i]`` (the official txt2img / img2txt).
* ``read_grounding(ann, refs=None, instances=None) -> GroundingRefs`` (a ``list[GroundingRef]`` with ``.skipped``):
  X-VLM's refcoco+_{train,val,test,testA,testB}.json entries ``{"image", "text", "ref_id"}``, each ref's box and split
  taken from the refer release by ref_id (``refs(unc).p`` + ``instances.json``: refTools/refer_python3.py:56-114,
  Grounding_bbox.py / dataset/utils.py:258-290). By default both lie in ``<ann's folder>/refcoco+/`` (the official
  ``refcoco_data`` layout). ``GroundingRef(image, text, ref_id, box (x, y, w, h) pixels, split, width, height)``.
* ``load_downstream_image(root, rel) -> PIL.Image`` (lazily decoded, Pillow's bomb / truncation checks on) and
  ``read_pixels(root, rel, res) -> (uint8 [res, res, 3], (width, height))`` (the whole image resized, aspect not kept,
  as the official test transform). A missing or unreadable image raises ``ImageProblem`` (``.reason`` is
  ``missing_image``, ``unreadable_image`` or ``corrupt_image``): the caller counts it and goes on.

Bad input: a file that is not X-VLM's format -> ``XvlmError`` naming the file and the entry. Refs whose ref_id has no
box in the refs file / instances (``ref_without_box``) and boxes outside their image or empty (``box_outside_image``)
are counted skips in ``GroundingRefs.skipped`` (and logged); a file with no usable entry is an XvlmError (an empty
split). ``refs(unc).p`` is read with shards.safe_pickle.load_plain: a pickle with a class in it is refused, never run.
"""
from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field

import storage
from storage.errors import XvlmError

log = logging.getLogger(__name__)

MAX_ANN_BYTES = 1 << 30          # COCO's largest annotation file is ~450 MB
MAX_REFS_BYTES = 1 << 30
REFS_NAME = "refs(unc).p"
INSTANCES_NAME = "instances.json"
REFER_FOLDER = "refcoco+"        # Grounding_bbox.yaml refcoco_data + REFER(..., 'refcoco+', 'unc')
GROUNDING_SPLITS = ("val", "testA", "testB")    # the splits dataset/utils.py:277-288 reports


# ---------------------------------------------------------------------------------------------- shared


def file_stem(path: str) -> str:
    """coco_test.json -> coco_test (the set's name in results)."""
    stem = path.rstrip("/").rsplit("/", 1)[-1]
    return stem[:-5] if stem.endswith(".json") else stem


def read_json(path: str, what: str, max_bytes: int = MAX_ANN_BYTES) -> object:
    """A JSON file through storage; XvlmError (saying what the file should be) when missing, huge or not JSON."""
    if not storage.exists(path):
        raise XvlmError(f"{path} does not exist ({what})")
    size = storage.size(path)
    if size > max_bytes:
        raise XvlmError(f"{path} is {size} bytes, more than {what} can be; is it the right file?")
    try:
        return json.loads(storage.read_bytes(path))
    except (ValueError, UnicodeDecodeError) as err:
        raise XvlmError(f"{path} is not JSON ({str(err)[:120]}); expected {what}") from None


def read_entries(path: str, what: str) -> list[dict]:
    """X-VLM's annotation files are JSON lists of objects: the list, or XvlmError naming the first bad entry."""
    entries = read_json(path, what)
    if not isinstance(entries, list):
        raise XvlmError(f"{path} holds a JSON {type(entries).__name__}, not the list of entries of {what}")
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise XvlmError(f"{path} entry {k} is a {type(entry).__name__}, not an object ({what})")
    if not entries:
        raise XvlmError(f"{path} lists no entries: an empty split ({what})")
    return entries


def _text_field(path: str, k: int, entry: dict, key: str, what: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise XvlmError(f"{path} entry {k}: \"{key}\" is {value!r:.60}, not a non-empty string ({what})")
    return value


def safe_relative(rel: str) -> str | None:
    """An image path of an annotation file as a relative path under the image root, or None when it would leave
    the root (absolute, or `..` after normalisation)."""
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if norm.startswith("/") or norm == ".." or norm.startswith("../"):
        return None
    return norm


# ---------------------------------------------------------------------------------------------- retrieval

RETRIEVAL_TRAIN = "a retrieval training file (coco_train.json: [{\"image\", \"caption\", \"image_id\"}, ...])"
RETRIEVAL_EVAL = "a retrieval evaluation file (coco_test.json: [{\"image\", \"caption\": [...]}, ...])"


@dataclass(frozen=True)
class RetrievalPair:
    """One caption of a retrieval training file; image_id groups the captions of one image (same-image positives)."""
    image: str
    caption: str
    image_id: str


def read_retrieval_train(ann: str) -> list[RetrievalPair]:
    """coco_train.json / flickr30k_train.json: one RetrievalPair per entry, in file order."""
    pairs = []
    for k, entry in enumerate(read_entries(ann, RETRIEVAL_TRAIN)):
        image = _text_field(ann, k, entry, "image", RETRIEVAL_TRAIN)
        caption = entry.get("caption")
        if not isinstance(caption, str):
            raise XvlmError(f"{ann} entry {k}: \"caption\" is a {type(caption).__name__}, not a string "
                            f"({RETRIEVAL_TRAIN}; lists of captions are the _val/_test format)")
        image_id = entry.get("image_id")
        if isinstance(image_id, bool) or not isinstance(image_id, (str, int)) or str(image_id) == "":
            raise XvlmError(f"{ann} entry {k}: \"image_id\" is {image_id!r:.60}, not a string or integer "
                            f"({RETRIEVAL_TRAIN})")
        pairs.append(RetrievalPair(image, caption, str(image_id)))
    return pairs


@dataclass
class RetrievalEvalSet:
    """A retrieval evaluation split: images (paths under the image root), texts (raw captions, in file order),
    text_image[t] = the image text t describes, image_texts[i] = the texts of image i."""
    name: str
    images: list[str]
    texts: list[str]
    text_image: list[int]
    image_texts: list[list[int]]


def read_retrieval_eval(ann: str) -> RetrievalEvalSet:
    """coco_{val,test}.json / flickr30k_{val,test}.json, numbered as re_dataset.py:60-68 numbers them."""
    images: list[str] = []
    texts: list[str] = []
    text_image: list[int] = []
    image_texts: list[list[int]] = []
    for k, entry in enumerate(read_entries(ann, RETRIEVAL_EVAL)):
        images.append(_text_field(ann, k, entry, "image", RETRIEVAL_EVAL))
        captions = entry.get("caption")
        if not isinstance(captions, list):
            raise XvlmError(f"{ann} entry {k}: \"caption\" is a {type(captions).__name__}, not a list of captions "
                            f"({RETRIEVAL_EVAL}; one caption per entry is the _train format)")
        if not captions:
            raise XvlmError(f"{ann} entry {k} ({entry['image']}) has an empty caption list: every evaluation image "
                            f"needs at least one caption")
        ids = []
        for j, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise XvlmError(f"{ann} entry {k}: caption {j} is a {type(caption).__name__}, not a string")
            ids.append(len(texts))
            texts.append(caption)
            text_image.append(k)
        image_texts.append(ids)
    return RetrievalEvalSet(file_stem(ann), images, texts, text_image, image_texts)


# ---------------------------------------------------------------------------------------------- grounding

GROUNDING = "an X-VLM grounding file (refcoco+_val.json: [{\"image\", \"text\", \"ref_id\"}, ...])"


@dataclass(frozen=True)
class GroundingRef:
    """One referring expression: its image, text, ref_id, the ref's box (x, y, w, h in the image's pixels, from the
    refer release's instances), the ref's split (train / val / testA / testB) and the image's size."""
    image: str
    text: str
    ref_id: int
    box: tuple[float, float, float, float]
    split: str
    width: int = 0
    height: int = 0


class GroundingRefs(list):
    """A list of GroundingRef with the counted skips: `skipped` = {reason: count}."""

    def __init__(self, refs=(), skipped: dict[str, int] | None = None) -> None:
        super().__init__(refs)
        self.skipped: dict[str, int] = dict(skipped or {})


@dataclass
class _Refer:
    """What evaluation needs of the refer release: per ref_id its split, box and image size (or why none)."""
    split: dict[int, str] = field(default_factory=dict)
    box: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)
    size: dict[int, tuple[int, int]] = field(default_factory=dict)


def read_refs_list(path: str, what: str) -> list:
    """The list a refer release's `refs(*).p` pickle holds, read with shards.safe_pickle.load_plain (plain containers
    and scalars only; a class, a global or a reduce is refused, never run). `what` names the file in errors. Shared
    by the RefCOCO pretraining source (pipeline/sources/refcoco.py) and the RefCOCO+ fine-tuning files here."""
    from shards.safe_pickle import UnsafePickleError, load_plain

    size = storage.size(path)
    if size > MAX_REFS_BYTES:
        raise XvlmError(f"{what} is {size} bytes, more than a refs file can be ({MAX_REFS_BYTES}); "
                        "is it the right file?")
    try:
        refs = load_plain(storage.read_bytes(path), what=what)
    except UnsafePickleError as err:
        raise XvlmError(f"{err}. Nothing was run or read from it; use the refs file of the refer release") from None
    if not isinstance(refs, list):
        raise XvlmError(f"{what} holds a {type(refs).__name__}, not the list of refs of the refer release")
    return refs


def _load_refs(path: str) -> list[dict]:
    if not storage.exists(path):
        raise XvlmError(f"{path} does not exist: the refer release's refs file (give --refs, or put it at "
                        f"<annotation folder>/{REFER_FOLDER}/{REFS_NAME} as X-VLM's refcoco_data)")
    refs = read_refs_list(path, path)
    for k, ref in enumerate(refs):
        if not isinstance(ref, dict) or not all(isinstance(ref.get(key), int) and not isinstance(ref.get(key), bool)
                                                for key in ("ref_id", "ann_id", "image_id")):
            raise XvlmError(f"{path} ref {k} is not a refer ref (a dict with integer ref_id, ann_id, image_id)")
    return refs


def _number_box(value: object) -> tuple[float, float, float, float] | None:
    if not isinstance(value, list) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _load_refer(refs_path: str, instances_path: str) -> _Refer:
    refs = _load_refs(refs_path)
    instances = read_json(instances_path, "the refer release's instances.json ({\"images\", \"annotations\", ...})")
    if not isinstance(instances, dict) or not isinstance(instances.get("images"), list) \
            or not isinstance(instances.get("annotations"), list):
        raise XvlmError(f"{instances_path} is not the refer release's instances.json (an object with \"images\" and "
                        f"\"annotations\" lists)")
    boxes = {a["id"]: _number_box(a.get("bbox")) for a in instances["annotations"]
             if isinstance(a, dict) and isinstance(a.get("id"), int)}
    sizes = {im["id"]: (im.get("width"), im.get("height")) for im in instances["images"]
             if isinstance(im, dict) and isinstance(im.get("id"), int)}
    refer = _Refer()
    for ref in refs:
        ref_id = ref["ref_id"]
        refer.split[ref_id] = str(ref.get("split", ""))
        box = boxes.get(ref["ann_id"])
        size = sizes.get(ref["image_id"])
        if box is not None:
            refer.box[ref_id] = box
        if size is not None and all(isinstance(v, int) and v > 0 for v in size):
            refer.size[ref_id] = size  # type: ignore[assignment]
    return refer


def _box_inside(box: tuple[float, float, float, float], size: tuple[int, int]) -> bool:
    """The box has area and lies within its image (the check of dataset/grounding_dataset.py:101)."""
    x, y, w, h = box
    return w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= size[0] and y + h <= size[1]


def read_grounding(ann: str, refs: str | None = None, instances: str | None = None) -> GroundingRefs:
    """X-VLM's refcoco+_*.json with each entry's box and split from the refer release (by ref_id), in file order.

    refs defaults to `<ann's folder>/refcoco+/refs(unc).p`, instances to `instances.json` beside refs. An entry
    whose ref_id has no box (not in the refs file, or its annotation not in instances.json) is skipped as
    `ref_without_box`; a box with no area or outside its image as `box_outside_image`; both counted in `.skipped`
    and logged."""
    folder = ann.rstrip("/").rsplit("/", 1)[0] if "/" in ann.rstrip("/") else "."
    refs = refs or storage.join(folder, REFER_FOLDER, REFS_NAME)
    refer_folder = refs.rsplit("/", 1)[0] if "/" in refs else "."
    instances = instances or storage.join(refer_folder, INSTANCES_NAME)     # the refer release keeps them together
    entries = read_entries(ann, GROUNDING)
    refer = _load_refer(refs, instances)
    out = GroundingRefs()
    for k, entry in enumerate(entries):
        image = _text_field(ann, k, entry, "image", GROUNDING)
        text = _text_field(ann, k, entry, "text", GROUNDING)
        ref_id = entry.get("ref_id")
        if not isinstance(ref_id, int) or isinstance(ref_id, bool):
            raise XvlmError(f"{ann} entry {k}: \"ref_id\" is {ref_id!r:.60}, not an integer ({GROUNDING})")
        box, size = refer.box.get(ref_id), refer.size.get(ref_id)
        if box is None or size is None:
            _skip(out, "ref_without_box", f"{ann} entry {k}: ref_id {ref_id} has no box in {refs} + {instances}")
            continue
        if not _box_inside(box, size):
            _skip(out, "box_outside_image", f"{ann} entry {k}: ref_id {ref_id}'s box {box} is empty or outside its "
                                            f"{size[0]}x{size[1]} image")
            continue
        out.append(GroundingRef(image, text, ref_id, box, refer.split.get(ref_id, ""), size[0], size[1]))
    if not out:
        raise XvlmError(f"{ann}: none of its {len(entries)} entries has a usable box in {refs} + {instances} "
                        f"(left out: {out.skipped}); are they the refer release of the same dataset (refcoco+)?")
    if out.skipped:
        log.warning("%s: left out %s", ann, ", ".join(f"{n} x {r}" for r, n in sorted(out.skipped.items())))
    return out


def _skip(refs: GroundingRefs, reason: str, detail: str) -> None:
    refs.skipped[reason] = refs.skipped.get(reason, 0) + 1
    if refs.skipped[reason] <= 5:
        log.warning("leaving out (%s): %s", reason, detail)


# ---------------------------------------------------------------------------------------------- images


class ImageProblem(Exception):
    """An image that cannot be used: `reason` is missing_image, unreadable_image (no permission) or corrupt_image
    (the caller counts it)."""

    def __init__(self, reason: str, path: str, detail: str = "") -> None:
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason, self.path = reason, path


def load_downstream_image(root: str, rel: str):
    """The image `rel` (a path from an annotation file) under `root`, local or s3://, opened lazily with Pillow's
    decompression-bomb and truncation checks on. ImageProblem when missing, outside the root or unreadable."""
    from shards.augment import open_image
    from shards.samples import DECODE_ERRORS

    norm = safe_relative(rel)
    if norm is None:
        raise ImageProblem("missing_image", rel, "the path leaves the image root")
    path = storage.join(root, norm)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise ImageProblem("missing_image", path) from None
    except IsADirectoryError:
        raise ImageProblem("missing_image", path, "a folder") from None
    except PermissionError as err:
        raise ImageProblem("unreadable_image", path, str(err)[:120]) from None
    try:
        return open_image(data)
    except DECODE_ERRORS as err:
        raise ImageProblem("corrupt_image", path, f"{type(err).__name__}: {str(err)[:120]}") from None


def read_pixels(root: str, rel: str, res: int):
    """(uint8 [res, res, 3] RGB pixels of the whole image resized bicubic, aspect not kept, (width, height)):
    the official test transform's Resize((res, res)). ImageProblem when it cannot be read."""
    from shards.augment import crop_resize
    from shards.samples import DECODE_ERRORS

    image = load_downstream_image(root, rel)
    try:
        width, height = image.size
        return crop_resize(image, (0, 0, width, height), res, res), (width, height)
    except DECODE_ERRORS as err:
        raise ImageProblem("corrupt_image", storage.join(root, rel), f"{type(err).__name__}: {str(err)[:120]}") \
            from None
