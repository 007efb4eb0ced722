"""The pictures `xvlm show` draws of a sample: as stored (every box of its JSON), and as the loader's own sample
builders deliver it (the region view with its anchor crop, flip and resize; the image-text view)."""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from reports.show.draw import DrawnBox, draw_sample
from reports.show.read import ShardSample
from shards.loader_config import LoaderConfig
from storage.errors import XvlmError


def _region_label(region: dict) -> str:
    attributes = region.get("attributes") or []
    extra = f" (attributes: {', '.join(attributes)})" if attributes else ""
    return f"{region.get('kind', '?')}: {region.get('text', '')}{extra}"


def _drawable_box(region: object) -> tuple[float, float, float, float] | None:
    """A region's bbox as 4 finite numbers with a positive size, or None (NaN, strings, negative sizes...)."""
    bbox = region.get("bbox") if isinstance(region, dict) else None
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < 1e6
            for v in bbox):
        return None
    return tuple(float(v) for v in bbox) if bbox[2] > 0 and bbox[3] > 0 else None


def _open_stored(sample: ShardSample) -> Image.Image:
    """The stored image, decoded; XvlmError when it is not an image or has more pixels than the loader takes."""
    try:
        image = Image.open(io.BytesIO(sample.jpg))   # Pillow's bomb and truncation checks stay on
        if image.width * image.height > LoaderConfig.max_pixels:
            raise XvlmError(f"image is {image.width}x{image.height}, more than the loader's max_pixels "
                            f"{LoaderConfig.max_pixels}")
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise XvlmError(f"image does not decode ({type(err).__name__}: {err})") from None
    return image


def raw_view(sample: ShardSample) -> Image.Image:
    """The stored image with every box of its JSON (a box that is not 4 finite numbers is listed, not drawn)."""
    image = _open_stored(sample)
    meta = sample.meta
    regions = [r for r in meta.get("regions") or [] if isinstance(r, dict)] \
        if isinstance(meta.get("regions"), list) else []
    boxes = [DrawnBox(box, _region_label(r)) for r in regions if (box := _drawable_box(r)) is not None]
    lines = [f"{sample.key} ({meta.get('source')}, id {meta.get('source_id')}) - stored {image.width}x{image.height}, "
             f"{sample.shard} @ byte {sample.offset}"]
    lines += [f"not drawn, bbox is not 4 finite numbers with a size: {r.get('bbox')!r:.60} ({_region_label(r)})"
              for r in regions if _drawable_box(r) is None]
    captions = meta.get("captions") if isinstance(meta.get("captions"), list) else []
    lines += [f"caption: {c}" for c in captions]
    if not captions:
        lines.append("(no caption)")
    return draw_sample(image, boxes, lines)


def tensor_to_image(tensor) -> Image.Image:
    """Undo the loader's CLIP normalisation of a float [3, H, W] tensor."""
    from shards.augment import CLIP_MEAN, CLIP_STD

    array = tensor.detach().cpu().numpy().astype(np.float64)
    array = array * np.asarray(CLIP_STD)[:, None, None] + np.asarray(CLIP_MEAN)[:, None, None]
    return Image.fromarray(np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0), "RGB")


def region_boxes(sample: dict, image_res: int) -> tuple[list[DrawnBox], list[str]]:
    """The loader's region rows as drawn boxes (from its (cx, cy, w, h)/R targets) and the whole-image rows."""
    boxes, captions = [], []
    for text, target, is_image in zip(sample["texts"], sample["target_bbox"].tolist(), sample["is_image"].tolist()):
        if is_image:
            captions.append(text)
            continue
        cx, cy, w, h = (v * image_res for v in target)
        boxes.append(DrawnBox((cx - w / 2, cy - h / 2, w, h), text))
    return boxes, captions


def augmented_views(shard_sample: ShardSample, config, seed: int) -> dict[str, Image.Image | str]:
    """{"region": PNG image or why not, "image_text": ...}: the loader's own sample builders, drawn."""
    from shards import samples
    from shards.plan import rng_for

    out: dict[str, Image.Image | str] = {}
    res = config.image_res
    try:
        sample = samples.region_sample(shard_sample.jpg, shard_sample.meta, rng_for(seed, shard_sample.key, "region"),
                                       config)
        boxes, captions = region_boxes(sample, res)
        lines = [f"{shard_sample.key} - loader region view: crop {sample['crop']} of the stored image, "
                 f"flipped {'yes' if sample['flipped'] else 'no'}, resized to {res}x{res}"]
        lines += [f"caption: {c}" for c in captions]
        out["region"] = draw_sample(tensor_to_image(sample["image"]), boxes, lines)
    except samples.SkipSample as skip:
        out["region"] = f"no region view: the loader skips it ({skip})"
    try:
        sample = samples.image_text_sample(shard_sample.jpg, shard_sample.meta,
                                           rng_for(seed, shard_sample.key, "image_text"), config)
        lines = [f"{shard_sample.key} - loader image-text view: crop {sample['crop']}, flipped "
                 f"{'yes' if sample['flipped'] else 'no'}, resized to {res}x{res}", f"caption: {sample['text']}"]
        out["image_text"] = draw_sample(tensor_to_image(sample["image"]), [], lines)
    except samples.SkipSample as skip:
        out["image_text"] = f"no image-text view: the loader skips it ({skip})"
    return out
