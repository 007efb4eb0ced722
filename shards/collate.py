"""Collate built samples into the batches of docs/batches.md: image-text batches (one row per image) and region
batches (K text-region rows from B images, `image_idx` pointing each row at its image): X-VLM's pooled rows, or
samples packed until the rows are filled (ours).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
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


def pooled_rows(total: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Which of `total` pooled rows a region batch keeps, as X-VLM's RegionTextJsonDataset.collate_fn: a random
    `batch_size` of them; when there are fewer, all of them plus a random sample of them again, or all of them
    repeated when even that is short. Sorted (the model's losses do not depend on the row order)."""
    if total <= 0:
        raise ValueError("cannot pool the rows of region samples that have none")
    if total >= batch_size:
        keep = rng.choice(total, batch_size, replace=False)
    elif batch_size - total <= total:
        keep = np.concatenate([np.arange(total), rng.choice(total, batch_size - total, replace=False)])
    else:
        keep = np.tile(np.arange(total), math.ceil(batch_size / total))[:batch_size]
    return np.sort(keep)


def collate_region_pooled(samples: list[dict[str, Any]], batch_size: int, rng: np.random.Generator) -> dict[str, Any]:
    """X-VLM's region batch: the rows of all `samples` pooled, `pooled_rows` of them kept. Images none of whose rows
    was kept are left out of `image` (they would enter no loss); `drawn_images` counts all of them."""
    if not samples:
        raise ValueError("cannot collate an empty list of region samples")
    counts = [region_rows(s) for s in samples]
    keep = pooled_rows(sum(counts), batch_size, rng)
    owner = np.repeat(np.arange(len(samples)), counts)[keep]
    used = np.unique(owner)
    images = [samples[i] for i in used.tolist()]
    batch: dict[str, Any] = {"kind": "region", "image": stack_images(images)}
    batch["image_idx"] = torch.from_numpy(np.searchsorted(used, owner).astype(np.int64))
    index = torch.from_numpy(keep.astype(np.int64))
    for name in ROW_FIELDS:
        batch[name] = torch.cat([s[name] for s in samples])[index]
    batch["keys"] = [s["key"] for s in images]
    batch["sources"] = [s["source"] for s in images]
    batch["drawn_images"] = len(samples)
    return batch


def pad_batch(batch: dict[str, Any], rows: int, images: int) -> dict[str, Any]:
    """The batch padded to exactly `rows` text rows and `images` images, with `row_mask` [rows] bool (True on the
    real rows), so that every batch of a kind has one shape and a compiled step compiles once per kind.

    Padded images are zeros; a padded row repeats row 0's text (a valid attention mask), has no masked token
    (masked_ids -100), the whole-image box and is_image True, and points at image 0: it is a real input to every
    layer, and the model's losses leave it out through `row_mask`. Works on tensors of any device; a batch already
    at the maxima gains only its row mask. ValueError when the batch holds more rows or images than the maxima.
    """
    count, pictures = int(batch["text_ids"].shape[0]), int(batch["image"].shape[0])
    if count > rows or pictures > images:
        raise ValueError(f"a {batch.get('kind', 'region')} batch of {count} rows and {pictures} images does not fit "
                         f"the padded shape ({rows} rows, {images} images): raise the maxima")
    region = "patch_mask" in batch
    if not region and rows != images:
        raise ValueError(f"an image_text batch has one row per image: pad it to equal rows and images, got {rows} "
                         f"rows and {images} images")
    out = dict(batch)
    text = batch["text_ids"]
    out["row_mask"] = torch.arange(rows, device=text.device) < count
    out["image"] = _pad_rows(batch["image"], images, torch.zeros_like(batch["image"][:1]))
    fill: dict[str, torch.Tensor] = {name: batch[name][:1] for name in TEXT_FIELDS}
    fill["masked_ids"] = torch.full_like(batch["masked_ids"][:1], -100)
    if region:
        fill["image_idx"] = torch.zeros_like(batch["image_idx"][:1])
        fill["patch_mask"] = torch.ones_like(batch["patch_mask"][:1])
        fill["target_bbox"] = torch.tensor([[0.5, 0.5, 1.0, 1.0]], dtype=batch["target_bbox"].dtype,
                                           device=text.device)
        fill["is_image"] = torch.ones_like(batch["is_image"][:1])
    for name, value in fill.items():
        out[name] = _pad_rows(batch[name], rows, value)
    return out


def _pad_rows(x: torch.Tensor, rows: int, fill: torch.Tensor) -> torch.Tensor:
    """`x` [n, ...] followed by `fill` [1, ...] repeated up to `rows` rows."""
    missing = rows - x.shape[0]
    if missing == 0:
        return x
    return torch.cat([x, fill.expand(missing, *fill.shape[1:])])
