"""Build one training sample from a shard sample (image + KEY.json): an image-text sample (one caption drawn), or a
region sample (anchor crop, whole-image caption row + box rows with targets and patch masks). Pure functions of
(image, json, rng, config): the same generator state gives the same tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from shards import augment, boxes, text
from shards import format as shard_format
from shards.loader_config import LoaderConfig

PHRASE_CAPTION = 1_000     # caption indexes from here on are region phrases used as captions (shards/plan.py)

# Errors Pillow raises for bytes it cannot decode (truncated, not an image, too many pixels).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
TEXT_FIELDS = ("text_ids", "text_atts", "text_ids_masked", "masked_pos", "masked_ids")


class SkipSample(Exception):
    """This shard sample cannot give a training sample; `reason` is a short code for the skip counters:
    no_caption, no_region, corrupt_image, too_many_pixels, size_mismatch, bad_json."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Row:
    """One text of a region sample, before tokenizing: its pre_caption'd text and its box in the source image
    (None for the whole-image caption). Objects also keep their bare name and attributes, for the one random
    attribute X-VLM puts in front of the name."""
    text: str
    box: boxes.Box | None
    name: str = ""
    attributes: tuple[str, ...] = ()
    anchor: bool = False          # the box the crop was drawn around


# ---------------------------------------------------------------- shard json

def parse_meta(meta: dict | bytes | str) -> dict:
    """The KEY.json of a shard sample as a dict; parsed with bounded size and nesting (a hostile sample is a
    counted skip, never a RecursionError that every resume would meet again)."""
    if isinstance(meta, dict):
        return _checked(meta)
    try:
        parsed = shard_format.load_json(meta, "KEY.json", max_bytes=shard_format.MAX_SAMPLE_JSON_BYTES)
    except shard_format.SampleError as exc:
        raise SkipSample("bad_json", str(exc)) from exc
    if not isinstance(parsed, dict):
        raise SkipSample("bad_json", f"expected an object, got {type(parsed).__name__}")
    return _checked(parsed)


def _checked(meta: dict) -> dict:
    """The json's structure, checked so that a malformed sample is a counted skip, not a crash mid-epoch."""
    if not isinstance(meta.get("captions", []), list):
        raise SkipSample("bad_json", "`captions` is not a list")
    regions = meta.get("regions", [])
    if not isinstance(regions, list) or not all(isinstance(r, dict) for r in regions):
        raise SkipSample("bad_json", "`regions` is not a list of objects")
    for name in ("width", "height"):
        value = meta.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value <= 0 or value != int(value)):
            raise SkipSample("bad_json", f"`{name}` is not a positive integer: {value!r}")
    return meta


def region_text(region: dict) -> str:
    """A region's raw text; objects get their attributes in front ("white backpack"), once each."""
    name = str(region.get("text") or "")
    if region.get("kind") != "object":
        return name
    present = set(name.lower().split())
    attributes: list[str] = []
    for attr in region.get("attributes") or []:
        attr = str(attr).strip()
        if attr and attr.lower() not in present:
            attributes.append(attr)
            present.add(attr.lower())
    return " ".join(attributes + [name])


def object_name(region: dict) -> str:
    """An object's name without the attributes the builder put in front of it ("white backpack" with attributes
    ["white"] -> "backpack"); the text itself when it does not start with them."""
    name = str(region.get("text") or "")
    attributes = [str(a) for a in region.get("attributes") or [] if str(a).strip()]
    prefix = " ".join(attributes)
    if attributes and name.startswith(prefix + " "):
        return name[len(prefix) + 1:]
    return name


def usable_box(bbox: Any, width: int, height: int) -> boxes.Box | None:
    """The bbox clipped to the image; None when malformed, empty or outside."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None
    return boxes.intersection((x, y, w, h), (0, 0, width, height))


def _captions(meta: dict, config: LoaderConfig) -> list[str]:
    out = []
    for caption in meta.get("captions") or []:
        try:
            out.append(text.pre_caption(str(caption), config.max_words, config.pre_caption))
        except text.EmptyText:
            continue
    return out


def phrase_captions(meta: dict, config: LoaderConfig) -> list[str]:
    """The sample's region phrases (boxes of kind "region") as whole-image captions, as ALBEF's VG captions: the
    pre_caption'd distinct ones, largest box first (ties in json order), at most config.phrase_captions."""
    phrases = []
    for order, region in enumerate(meta.get("regions") or []):
        if region.get("kind") != "region":
            continue
        try:
            x, y, w, h = (float(v) for v in region.get("bbox"))
            area = w * h if math.isfinite(w * h) else 0.0
        except (TypeError, ValueError):
            area = 0.0
        phrases.append((-area, order, str(region.get("text") or "")))
    out: list[str] = []
    for _, _, raw in sorted(phrases):
        try:
            phrase = text.pre_caption(raw, config.max_words, config.pre_caption)
        except text.EmptyText:
            continue
        if phrase not in out:
            out.append(phrase)
        if len(out) == config.phrase_captions:
            break
    return out


def _caption(meta: dict, index: int, config: LoaderConfig) -> str:
    """Caption `index` of the sample, pre_caption'd (one image-text entry per caption, as X-VLM's files)."""
    captions = meta.get("captions") or []
    if not 0 <= index < len(captions):
        raise SkipSample("no_caption", f"sample {meta.get('key')!r} has {len(captions)} captions, not {index + 1}")
    try:
        return text.pre_caption(str(captions[index]), config.max_words, config.pre_caption)
    except text.EmptyText as exc:
        raise SkipSample("no_caption", f"caption {index} of {meta.get('key')!r} is empty after pre_caption") from exc


def _open_checked(image: bytes | Image.Image, meta: dict, config: LoaderConfig) -> Image.Image:
    try:
        opened = augment.open_image(image)
    except DECODE_ERRORS as exc:
        raise SkipSample("corrupt_image", f"{type(exc).__name__}: {exc}") from exc
    # Checked on the header, before any decoding: a 144 Mpx JPEG would cost ~13 s of one worker's time.
    if opened.size[0] * opened.size[1] > config.max_pixels:
        raise SkipSample("too_many_pixels", f"image is {opened.size[0]}x{opened.size[1]}, more than max_pixels "
                                            f"{config.max_pixels}")
    want = (meta.get("width"), meta.get("height"))
    if None not in want and tuple(opened.size) != (int(want[0]), int(want[1])):
        raise SkipSample("size_mismatch", f"image is {opened.size[0]}x{opened.size[1]}, json says {want[0]}x{want[1]}")
    return opened


def _pixels(view, image: bytes | Image.Image, opened: Image.Image, crop: boxes.Crop, flipped: bool,
            rng: np.random.Generator, config: LoaderConfig) -> torch.Tensor | np.ndarray:
    # draft() shrinks the image object in place: only use it on an image we opened ourselves from bytes
    own = not isinstance(image, Image.Image)
    try:
        return view(opened, crop, flipped, rng, config, use_draft=own)
    except DECODE_ERRORS as exc:
        raise SkipSample("corrupt_image", f"{type(exc).__name__}: {exc}") from exc


def _token_ids(phrase: str, config: LoaderConfig) -> list[int] | None:
    """[CLS] + WordPiece ids, or None for a text the tokenizer reduces to nothing (e.g. only control or
    zero-width characters, which pre_caption keeps but BERT's text cleaning drops)."""
    try:
        return text.token_ids(phrase, text.load_vocab(config.tokenizer), config.max_tokens)
    except text.EmptyText:
        return None


def _encode_rows(ids: list[list[int]], rng: np.random.Generator, config: LoaderConfig) -> dict[str, torch.Tensor]:
    encoded = text.encode_rows_with(ids, text.load_vocab(config.tokenizer), rng, config)
    return {name: torch.from_numpy(encoded[name]) for name in TEXT_FIELDS}


# ---------------------------------------------------------------- image-text

def image_text_sample(image: bytes | Image.Image, meta: dict | bytes | str, rng: np.random.Generator,
                      config: LoaderConfig, normalise: bool = True, caption_index: int | None = None) -> dict[str, Any]:
    """One image-text sample: caption `caption_index` (an image-text entry per caption, as X-VLM; from
    PHRASE_CAPTION on, the region phrases used as captions, `phrase_captions`), or with None a caption drawn at random; RandomResizedCrop + flip (left/right words swapped with swap_left_right) + RandAugment.
    Text fields are 1-D ([T], [M]); `image` is float32 [3, R, R]. With normalise=False the sample has `pixels`
    instead (uint8 [R, R, 3] RGB before normalisation), which the collate functions normalise straight into the
    batch tensor. Raises SkipSample."""
    meta = parse_meta(meta)
    if caption_index is not None and caption_index >= PHRASE_CAPTION:
        phrases = phrase_captions(meta, config)
        if caption_index - PHRASE_CAPTION >= len(phrases):
            raise SkipSample("no_caption", f"sample {meta.get('key')!r} has {len(phrases)} distinct region phrases, "
                                           f"not {caption_index - PHRASE_CAPTION + 1}")
        caption = phrases[caption_index - PHRASE_CAPTION]
    elif caption_index is not None:
        caption = _caption(meta, caption_index, config)
    else:
        captions = _captions(meta, config)
        if not captions:
            raise SkipSample("no_caption", f"sample {meta.get('key')!r} has no caption left after pre_caption")
        caption = captions[int(rng.integers(len(captions)))]
    opened = _open_checked(image, meta, config)
    width, height = opened.size
    crop = boxes.random_resized_crop(width, height, rng, config.crop_scale, config.crop_ratio)
    flipped = bool(rng.random() < config.hflip_prob)
    if flipped and config.swap_left_right:
        caption = text.swap_left_right(caption)
    ids = _token_ids(caption, config)
    if ids is None:
        raise SkipSample("no_caption", f"caption {caption!r} has no WordPiece tokens")
    view = augment.image_text_view if normalise else augment.image_text_pixels
    pixels = _pixels(view, image, opened, crop, flipped, rng, config)
    rows = _encode_rows([ids], rng, config)
    return {"kind": "image_text", "key": str(meta.get("key", "")), "source": str(meta.get("source", "")),
            ("image" if normalise else "pixels"): pixels, **{name: value[0] for name, value in rows.items()},
            "text": caption, "crop": crop, "flipped": flipped}


# ---------------------------------------------------------------- region-text

def _region_rows(meta: dict, width: int, height: int, config: LoaderConfig,
                 kinds: tuple[str, ...] | None = None) -> tuple[list[Row], int]:
    """Usable box rows of the given kinds (all with None): text pre_caption'd (every attribute in front of an
    object's name), box clipped to the image; and the count of unusable ones."""
    rows, unusable = [], 0
    for region in meta.get("regions") or []:
        if kinds is not None and region.get("kind") not in kinds:
            continue
        box = usable_box(region.get("bbox"), width, height)
        try:
            phrase = text.pre_caption(region_text(region), config.max_words, config.pre_caption)
        except text.EmptyText:
            phrase = None
        if box is None or phrase is None:
            unusable += 1
            continue
        attributes = tuple(str(a) for a in region.get("attributes") or [] if str(a).strip()) \
            if region.get("kind") == "object" else ()
        rows.append(Row(phrase, box, object_name(region), attributes))
    return rows, unusable


def _row_text(row: Row, rng: np.random.Generator, config: LoaderConfig) -> str | None:
    """The text of a box row: with object_attributes "one" (X-VLM), an object gets one attribute drawn at random in
    front of its name; None when that text empties under pre_caption."""
    if config.object_attributes == "all" or not row.attributes:
        return row.text
    attribute = row.attributes[int(rng.integers(len(row.attributes)))]
    try:
        return text.pre_caption(f"{attribute} {row.name}", config.max_words, config.pre_caption)
    except text.EmptyText:
        return None


def _choose_rows(candidates: list[Row], anchor_index: int, crop: boxes.Box, captions: list[str],
                 rng: np.random.Generator, config: LoaderConfig) -> tuple[list[Row], int]:
    """The sample's rows, at most max_regions: the whole-image caption first (one drawn, when the sample has any),
    then the boxes in random order that lie more than min_region_inside inside the crop (the anchor always does).
    With region_anchor_first (ours) the anchor comes right after the caption. Returns the rows and the count of
    object rows whose drawn text emptied."""
    rows: list[Row] = []
    if captions:
        rows.append(Row(captions[int(rng.integers(len(captions)))], None))
    order = rng.permutation(len(candidates)).tolist()
    if config.region_anchor_first:
        order = [anchor_index] + [i for i in order if i != anchor_index]
    emptied = 0
    for index in order:
        if len(rows) >= config.max_regions:
            break
        row = candidates[index]
        if index == anchor_index or boxes.inside_fraction(row.box, crop) > config.min_region_inside:
            phrase = _row_text(row, rng, config)
            if phrase is None:
                emptied += 1
                continue
            rows.append(Row(phrase, row.box, anchor=index == anchor_index))
    return rows, emptied


def region_sample(image: bytes | Image.Image, meta: dict | bytes | str, rng: np.random.Generator,
                  config: LoaderConfig, normalise: bool = True, kinds: tuple[str, ...] | None = None) -> dict[str, Any]:
    """One region sample: a random anchor box, a random crop containing it (or, with 1 - region_crop_prob, the
    whole picture), flip, resize to R x R; rows = the whole-image caption first (when there is one), then the boxes
    more than min_region_inside inside the crop in random order (the anchor among them; first with
    region_anchor_first), up to max_regions rows. `kinds` restricts the boxes to those kinds ("object", "region"),
    as X-VLM's separate object and region files. Row fields are [K, ...]; `image` is float32 [3, R, R] (`pixels`
    with normalise=False, as image_text_sample). Raises SkipSample."""
    meta = parse_meta(meta)
    opened = _open_checked(image, meta, config)
    width, height = opened.size
    candidates, unusable = _region_rows(meta, width, height, config, kinds)
    if not candidates:
        raise SkipSample("no_region", f"sample {meta.get('key')!r} has no usable box with text")
    captions = _captions(meta, config)

    anchor_index = int(rng.integers(len(candidates)))
    # the whole picture instead (what grounding evaluation sees) with 1 - region_crop_prob; X-VLM always crops,
    # and then draws nothing more here
    if config.region_crop_prob >= 1.0 or rng.random() < config.region_crop_prob:
        crop = boxes.anchor_crop(candidates[anchor_index].box, width, height, rng)
    else:
        crop = (0, 0, width, height)
    flipped = bool(rng.random() < config.hflip_prob)
    rows, emptied = _choose_rows(candidates, anchor_index, crop, captions, rng, config)
    unusable += emptied

    res, grid = config.image_res, config.grid
    targets, masks, is_image, texts, ids, anchor_row = [], [], [], [], [], -1
    for row in rows:
        phrase = text.swap_left_right(row.text) if flipped and config.swap_left_right else row.text
        row_ids = _token_ids(phrase, config)
        if row_ids is None:
            unusable += 1
            continue
        if row.anchor:
            anchor_row = len(texts)
        texts.append(phrase)
        ids.append(row_ids)
        if row.box is None:
            targets.append([0.5, 0.5, 1.0, 1.0])
            masks.append(np.ones(grid * grid, np.float32))
            is_image.append(True)
            continue
        out_box = boxes.box_in_output(row.box, crop, flipped, res, res)
        targets.append(boxes.target_bbox(out_box, res))
        masks.append(boxes.patch_mask(out_box, res, grid))
        is_image.append(False)

    if not texts:
        raise SkipSample("no_region", f"sample {meta.get('key')!r}: no row has WordPiece tokens")
    view = augment.region_view if normalise else augment.region_pixels
    pixels = _pixels(view, image, opened, crop, flipped, rng, config)
    encoded = _encode_rows(ids, rng, config)
    return {"kind": "region", "key": str(meta.get("key", "")), "source": str(meta.get("source", "")),
            ("image" if normalise else "pixels"): pixels, **encoded,
            "patch_mask": torch.from_numpy(np.stack(masks)),
            "target_bbox": torch.tensor(targets, dtype=torch.float32),
            "is_image": torch.tensor(is_image, dtype=torch.bool),
            "texts": texts, "crop": crop, "flipped": flipped, "unusable_regions": unusable, "anchor_row": anchor_row}
