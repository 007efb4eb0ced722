"""Random batches in the loader's layout (docs/batches.md), for model tests, overfitting checks and benchmarks."""
from __future__ import annotations

import math

import torch

CLS_ID, MASK_ID, FIRST_WORD_ID = 101, 103, 1000


def patch_mask_for_boxes(boxes: torch.Tensor, image_res: int, grid: int) -> torch.Tensor:
    """Boxes [K, 4] (x, y, w, h) in pixels -> patch masks [K, grid*grid] with the loader's arithmetic:
    x_min = floor(x / s), x_max = max(x_min + 1, ceil((x + w) / s)), clamped to [0, grid]; same for y."""
    stride = image_res / grid
    masks = torch.zeros(boxes.shape[0], grid, grid)
    for k, (x, y, w, h) in enumerate(boxes.tolist()):
        x0 = min(max(math.floor(x / stride), 0), grid - 1)
        y0 = min(max(math.floor(y / stride), 0), grid - 1)
        x1 = min(max(x0 + 1, math.ceil((x + w) / stride)), grid)
        y1 = min(max(y0 + 1, math.ceil((y + h) / stride)), grid)
        masks[k, y0:y1, x0:x1] = 1.0
    return masks.flatten(1)


def _text_fields(rows: int, max_tokens: int, max_masks: int, vocab_size: int,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    if vocab_size <= FIRST_WORD_ID + 10:
        raise ValueError(f"synthetic batches need vocab_size > {FIRST_WORD_ID + 10}, got {vocab_size}")
    lengths = torch.randint(max(3, max_tokens // 2), max_tokens + 1, (rows,), generator=generator)
    ids = torch.randint(FIRST_WORD_ID, vocab_size, (rows, max_tokens), generator=generator)
    ids[:, 0] = CLS_ID
    atts = (torch.arange(max_tokens)[None] < lengths[:, None]).long()
    ids = ids * atts
    masked = ids.clone()
    masked_pos = torch.zeros(rows, max_masks, dtype=torch.long)
    masked_ids = torch.full((rows, max_masks), -100, dtype=torch.long)
    for k in range(rows):
        n = min(max_masks, max(1, round(int(lengths[k]) * 0.25)))
        pos = 1 + torch.randperm(int(lengths[k]) - 1, generator=generator)[:n].sort().values
        masked_pos[k, :n] = pos
        masked_ids[k, :n] = ids[k, pos]
        masked[k, pos] = MASK_ID
    return {"text_ids": ids, "text_atts": atts, "text_ids_masked": masked, "masked_pos": masked_pos,
            "masked_ids": masked_ids}


def image_text_batch(batch: int, image_res: int, vocab_size: int, max_tokens: int = 12, max_masks: int = 3,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """An image_text batch of random images and texts."""
    generator = generator or torch.Generator().manual_seed(0)
    out = {"image": torch.randn(batch, 3, image_res, image_res, generator=generator)}
    out.update(_text_fields(batch, max_tokens, max_masks, vocab_size, generator))
    return out


def region_batch(images: int, rows_per_image: int, image_res: int, grid: int, vocab_size: int,
                 max_tokens: int = 12, max_masks: int = 3, with_whole_image: bool = True,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A region batch: per image, optionally one whole-image row, then random boxes."""
    generator = generator or torch.Generator().manual_seed(0)
    image = torch.randn(images, 3, image_res, image_res, generator=generator)
    rows = images * rows_per_image
    image_idx = torch.arange(images).repeat_interleave(rows_per_image)
    wh = (0.15 + 0.6 * torch.rand(rows, 2, generator=generator)) * image_res
    xy = torch.rand(rows, 2, generator=generator) * (image_res - wh)
    boxes = torch.cat([xy, wh], dim=1)
    is_image = torch.zeros(rows, dtype=torch.bool)
    if with_whole_image:
        is_image[::rows_per_image] = True
        boxes[is_image] = torch.tensor([0.0, 0.0, float(image_res), float(image_res)])
    target = torch.cat([boxes[:, :2] + boxes[:, 2:] / 2, boxes[:, 2:]], dim=1) / image_res
    out = {"image": image, "image_idx": image_idx, "patch_mask": patch_mask_for_boxes(boxes, image_res, grid),
           "target_bbox": target, "is_image": is_image}
    out.update(_text_fields(rows, max_tokens, max_masks, vocab_size, generator))
    return out
