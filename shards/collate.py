"""Collate built samples into the batches of docs/batches.md: image-text batches (one row per image) and region
batches (K text-region rows from B images, `image_idx` pointing each row at its image).
"""
from __future__ import annotations

from typing import Any

import torch

from shards.augment import normalise_into
from shards.samples import TEXT_FIELDS

ROW_FIELDS = TEXT_FIELDS + ("patch_mask", "target_bbox", "is_image")


def stack_images(samples: list[dict[str, Any]]) -> torch.Tensor:
    """image [B, ...]: the samples' `image` tensors stacked, or their `pixels` (normalise=False samples: uint8
    [R, R, 3] arrays) normalised straight into the batch tensor, which saves a float image per sample and the copy of it."""
    if all("image" in s for s in samples):
        return torch.stack([s["image"] for s in samples])
    height, width = next(s["pixels"] for s in samples if "pixels" in s).shape[:2]
    out = torch.empty((len(samples), 3, height, width), dtype=torch.float32)
    rows = out.numpy()
    for i, sample in enumerate(samples):
        if "pixels" in sample:
            normalise_into(sample["pixels"], rows[i])
        else:
            out[i] = sample["image"]
    return out


def collate_image_text(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack image-text samples: image [B, 3, R, R], text fields [B, ...], keys and sources."""
    if not samples:
        raise ValueError("cannot collate an empty list of image-text samples")
    batch: dict[str, Any] = {"kind": "image_text", "image": stack_images(samples)}
    for name in TEXT_FIELDS:
        batch[name] = torch.stack([s[name] for s in samples])
    batch["keys"] = [s["key"] for s in samples]
    batch["sources"] = [s["source"] for s in samples]
    return batch


def region_rows(sample: dict[str, Any]) -> int:
    """Number of text-region rows (K_i) of a region sample."""
    return int(sample["is_image"].shape[0])


def take_rows(sample: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """The region sample restricted to rows [start, stop) (same image); for packing fixed-size region batches."""
    part = dict(sample)
    for name in ROW_FIELDS:
        part[name] = sample[name][start:stop]
    if "texts" in sample:
        part["texts"] = sample["texts"][start:stop]
    return part


def collate_region(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Region samples (one image + K_i rows each) -> image [B, 3, R, R], row fields [K = sum K_i, ...],
    image_idx [K]; keys and sources per image."""
    if not samples:
        raise ValueError("cannot collate an empty list of region samples")
    counts = [region_rows(s) for s in samples]
    if min(counts) == 0:
        raise ValueError("a region sample with no rows cannot be collated (its image would have no text)")
    batch: dict[str, Any] = {"kind": "region", "image": stack_images(samples)}
    batch["image_idx"] = torch.repeat_interleave(torch.arange(len(samples), dtype=torch.int64),
                                                 torch.tensor(counts, dtype=torch.int64))
    for name in ROW_FIELDS:
        batch[name] = torch.cat([s[name] for s in samples])
    batch["keys"] = [s["key"] for s in samples]
    batch["sources"] = [s["source"] for s in samples]
    return batch
