"""Pure box arithmetic for region samples: crops that contain an anchor box, clip/shift/flip/scale, the fraction
of a box inside a crop, the (cx, cy, w, h)/R target and the patch mask on the vision tower's final grid.

Boxes are (x, y, w, h) floats in pixels, x to the right, y down; crops are integer (x0, y0, w0, h0).
"""
from __future__ import annotations

import math

import numpy as np

Box = tuple[float, float, float, float]
Crop = tuple[int, int, int, int]

# Box edges computed through float scaling land a hair off the grid lines (31.999999 / 32.0000001); without
# this tolerance such a box would claim a whole extra row or column of patches.
_GRID_EPS = 1e-6


def anchor_crop(anchor: Box, width: int, height: int, rng: np.random.Generator) -> Crop:
    """X-VLM's region crop: a random integer crop of the (width x height) image that contains the anchor box:
    x0 ~ U{0..floor(x)}, x1 ~ U{min(ceil(x+w), W)..W}, same for y."""
    x, y, w, h = anchor
    x0 = int(rng.integers(0, math.floor(x) + 1))
    y0 = int(rng.integers(0, math.floor(y) + 1))
    x1 = int(rng.integers(min(math.ceil(x + w), width), width + 1))
    y1 = int(rng.integers(min(math.ceil(y + h), height), height + 1))
    return x0, y0, x1 - x0, y1 - y0


def random_resized_crop(width: int, height: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Crop:
    """torchvision's RandomResizedCrop.get_params with a numpy Generator: up to 10 tries of an area fraction in
    `scale` and a log-uniform aspect in `ratio`, else the central crop with the aspect clamped to `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return x0, y0, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def intersection(box: Box, crop: Crop) -> Box | None:
    """The part of the box inside the crop, in image coordinates; None when they do not overlap."""
    x, y, w, h = box
    cx, cy, cw, ch = crop
    xx, yy = max(cx, x), max(cy, y)
    xm, ym = min(cx + cw, x + w), min(cy + ch, y + h)
    if xm <= xx or ym <= yy:
        return None
    return xx, yy, xm - xx, ym - yy


def inside_fraction(box: Box, crop: Crop) -> float:
    """Fraction of the box's area that lies inside the crop (0 for a box of no area)."""
    part = intersection(box, crop)
    if part is None or box[2] <= 0 or box[3] <= 0:
        return 0.0
    return (part[2] * part[3]) / (box[2] * box[3])


def clip_shift(box: Box, crop: Crop) -> Box | None:
    """The box clipped to the crop, in the crop's coordinates."""
    part = intersection(box, crop)
    if part is None:
        return None
    return part[0] - crop[0], part[1] - crop[1], part[2], part[3]


def hflip(box: Box, width: float) -> Box:
    """The box in the horizontally mirrored image of the given width."""
    x, y, w, h = box
    return width - x - w, y, w, h


def scale(box: Box, sx: float, sy: float) -> Box:
    """The box after resizing the image by (sx, sy)."""
    x, y, w, h = box
    return x * sx, y * sy, w * sx, h * sy


def box_in_output(box: Box, crop: Crop, flipped: bool, out_w: float, out_h: float) -> Box | None:
    """Where a box of the source image lands after crop (clip + shift), optional mirror, and resizing the crop
    to (out_w x out_h) — aspect not kept. None when it lies outside the crop."""
    part = clip_shift(box, crop)
    if part is None:
        return None
    if flipped:
        part = hflip(part, crop[2])
    return scale(part, out_w / crop[2], out_h / crop[3])


def target_bbox(box: Box, image_res: float) -> list[float]:
    """(cx, cy, w, h) / R, the box-regression target."""
    x, y, w, h = box
    return [(x + w / 2) / image_res, (y + h / 2) / image_res, w / image_res, h / image_res]


def patch_span(lo: float, size: float, stride: float, grid: int) -> tuple[int, int]:
    """[first, last) grid cells a box edge range covers: floor(lo/s), max(first+1, ceil((lo+size)/s)), clamped
    to the grid so every box keeps at least one cell."""
    first = min(max(math.floor(lo / stride + _GRID_EPS), 0), grid - 1)
    last = max(first + 1, min(math.ceil((lo + size) / stride - _GRID_EPS), grid))
    return first, last


def patch_mask(box: Box, image_res: float, grid: int) -> np.ndarray:
    """float32 [grid*grid], row-major (y then x): 1 on the final-grid patches the box covers."""
    stride = image_res / grid
    x0, x1 = patch_span(box[0], box[2], stride, grid)
    y0, y1 = patch_span(box[1], box[3], stride, grid)
    mask = np.zeros((grid, grid), np.float32)
    mask[y0:y1, x0:x1] = 1.0
    return mask.reshape(-1)
