"""Box arithmetic of region samples against hand-computed cases: crops, clip/shift/flip/scale, targets, patch masks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from shards import boxes


def grid_cells(mask: np.ndarray, grid: int) -> set[tuple[int, int]]:
    return {(int(y), int(x)) for y, x in zip(*np.nonzero(mask.reshape(grid, grid)))}


def test_intersection_and_inside_fraction():
    box = (10.0, 10.0, 20.0, 20.0)
    assert boxes.intersection(box, (20, 0, 100, 100)) == (20, 10.0, 10.0, 20.0)
    assert boxes.inside_fraction(box, (20, 0, 100, 100)) == pytest.approx(0.5)
    assert boxes.inside_fraction(box, (0, 0, 100, 100)) == pytest.approx(1.0)
    assert boxes.inside_fraction(box, (20, 20, 5, 5)) == pytest.approx(25 / 400)
    assert boxes.intersection(box, (30, 0, 10, 10)) is None        # touching edge: no area
    assert boxes.inside_fraction(box, (40, 40, 10, 10)) == 0.0


def test_clip_shift_flip_scale_hand_case():
    # box (50, 40, 20, 10) in crop (40, 20, 100, 50): shift -> (10, 20); mirror in width 100 -> x = 100-10-20 = 70
    assert boxes.clip_shift((50, 40, 20, 10), (40, 20, 100, 50)) == (10, 20, 20, 10)
    assert boxes.hflip((10, 20, 20, 10), 100) == (70, 20, 20, 10)
    # resize 100x50 -> 224x224: sx = 2.24, sy = 4.48
    out = boxes.box_in_output((50, 40, 20, 10), (40, 20, 100, 50), True, 224, 224)
    assert out == pytest.approx((156.8, 89.6, 44.8, 44.8))
    assert boxes.target_bbox(out, 224) == pytest.approx([0.8, 0.5, 0.2, 0.2])
    # not flipped: x = 10 * 2.24
    assert boxes.box_in_output((50, 40, 20, 10), (40, 20, 100, 50), False, 224, 224) == pytest.approx(
        (22.4, 89.6, 44.8, 44.8))


def test_box_partly_outside_crop_is_clipped_before_flip():
    # box (0, 0, 60, 10) in crop (40, 0, 60, 20): inside part x 40..60 -> crop x 0..20, width 20;
    # mirrored in crop width 60 -> x 40..60; scaled by 2 -> (80, 0, 40, 20)
    out = boxes.box_in_output((0, 0, 60, 10), (40, 0, 60, 20), True, 120, 40)
    assert out == pytest.approx((80, 0, 40, 20))
    assert boxes.box_in_output((0, 0, 10, 10), (40, 0, 60, 20), True, 120, 40) is None


def test_patch_mask_hand_case():
    # stride 32 on a 7x7 grid; x: floor(156.8/32)=4 .. ceil(201.6/32)=7; y: floor(89.6/32)=2 .. ceil(134.4/32)=5
    mask = boxes.patch_mask((156.8, 89.6, 44.8, 44.8), 224, 7)
    assert mask.dtype == np.float32 and mask.shape == (49,)
    assert grid_cells(mask, 7) == {(y, x) for y in range(2, 5) for x in range(4, 7)}
    # row-major y then x: cell (y=2, x=4) is index 2*7+4
    assert mask[2 * 7 + 4] == 1 and mask[4 * 7 + 2] == 0


def test_patch_mask_edges():
    # a box exactly on grid lines covers exactly its cell, also after float round-off
    assert grid_cells(boxes.patch_mask((32, 32, 32, 32), 224, 7), 7) == {(1, 1)}
    near = boxes.scale((10, 10, 10, 10), 3.2, 3.2)         # 31.999999.. / 32.00000..1 in floats
    assert grid_cells(boxes.patch_mask(near, 224, 7), 7) == {(1, 1)}
    # a tiny box keeps one cell (x_max = max(x_min + 1, ...))
    assert grid_cells(boxes.patch_mask((100, 100, 0.5, 0.5), 224, 7), 7) == {(3, 3)}
    # a box touching the far edge is clamped to the grid
    assert grid_cells(boxes.patch_mask((220, 220, 4, 4), 224, 7), 7) == {(6, 6)}
    assert grid_cells(boxes.patch_mask((224, 0, 0.1, 10), 224, 7), 7) == {(0, 6)}
    # whole image -> all ones
    assert boxes.patch_mask((0, 0, 224, 224), 224, 7).sum() == 49
    # non-square cells: R 64 on a 4x4 grid, stride 16: x 8..40 -> cells 0..2, y 16..17 -> cell 1
    assert grid_cells(boxes.patch_mask((8, 16, 32, 1), 64, 4), 4) == {(1, 0), (1, 1), (1, 2)}


def test_target_bbox_whole_image():
    assert boxes.target_bbox((0, 0, 224, 224), 224) == [0.5, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("anchor", [(0.0, 0.0, 640.0, 480.0), (100.5, 50.2, 10.3, 300.1), (630.0, 470.0, 10.0, 10.0)])
def test_anchor_crop_contains_anchor(anchor):
    width, height = 640, 480
    x, y, w, h = anchor
    seen = set()
    for seed in range(200):
        crop = boxes.anchor_crop(anchor, width, height, np.random.default_rng(seed))
        x0, y0, cw, ch = crop
        assert all(isinstance(v, int) for v in crop)
        assert 0 <= x0 <= math.floor(x) and 0 <= y0 <= math.floor(y)
        assert math.ceil(x + w) <= x0 + cw <= width and math.ceil(y + h) <= y0 + ch <= height
        assert boxes.inside_fraction(anchor, crop) == pytest.approx(1.0)
        seen.add(crop)
    if anchor == (0.0, 0.0, 640.0, 480.0):
        assert seen == {(0, 0, 640, 480)}       # the whole-image anchor leaves no choice
    else:
        assert len(seen) > 50                   # the crop is actually random


def test_random_resized_crop_bounds_and_area():
    for seed in range(300):
        x0, y0, w, h = boxes.random_resized_crop(640, 480, np.random.default_rng(seed), (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= x0 and 0 <= y0 and x0 + w <= 640 and y0 + h <= 480 and w > 0 and h > 0
        assert 0.2 * 640 * 480 * 0.97 <= w * h <= 640 * 480
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05


def test_random_resized_crop_fallback_is_central():
    # a 1000x10 strip: no crop with aspect in [3/4, 4/3] and area >= 20% fits -> central 13x10 (10 * 4/3 rounded)
    assert boxes.random_resized_crop(1000, 10, np.random.default_rng(0)) == (493, 0, 13, 10)


def test_same_generator_state_same_crop():
    a = boxes.anchor_crop((10, 10, 5, 5), 100, 100, np.random.default_rng(7))
    b = boxes.anchor_crop((10, 10, 5, 5), 100, 100, np.random.default_rng(7))
    assert a == b
