"""Resize a checkpoint's position tables to another image size, as X-VLM's fine-tuning loader does.

X-VLM pretrains at 224 and fine-tunes at 384 (models/xvlm.py load_pretrained): a Swin's relative-position bias
tables grow from (2*7-1)^2 to (2*12-1)^2 rows per block (window 7 -> 12; swin_transformer.py
interpolate_relative_pos_embed: the BEiT geometric-progression grid and a bicubic spline per head), and a ViT's
patch-position grid is resized bicubically (vit.py interpolate_pos_embed, the prefix tokens kept as they are).
Pure tensor mapping: the target shapes come from the model the weights go into.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from model.errors import ModelError

log = logging.getLogger(__name__)

RELATIVE_TABLE = "relative_position_bias_table"
POS_EMBED = "pos_embed"
GP_LOW, GP_HIGH, GP_TOLERANCE = 1.01, 1.5, 1e-6   # the bisection of swin_transformer.py:614-621


def _square_side(count: int, what: str) -> int:
    side = int(round(count ** 0.5))
    if side * side != count:
        raise ModelError(f"{what}: {count} positions are not a square grid")
    return side


def source_offsets(src_side: int, dst_side: int) -> np.ndarray:
    """Where the source table's rows sit on the target's integer grid: offsets from the centre growing
    geometrically (ratio q found by bisection so that the half-grid's sum reaches dst_side // 2), as
    swin_transformer.py:611-635 (from BEiT)."""
    half = src_side // 2

    def reach(q: float) -> float:      # 1 + q + ... + q^(half-1)
        return (1.0 - q ** half) / (1.0 - q)

    low, high = GP_LOW, GP_HIGH
    while high - low > GP_TOLERANCE:
        q = (low + high) / 2.0
        if reach(q) > dst_side // 2:
            high = q
        else:
            low = q
    offsets, cur = [], 1.0
    for i in range(half):
        offsets.append(cur)
        cur += q ** (i + 1)
    return np.array([-d for d in reversed(offsets)] + [0.0] + offsets)


def interpolate_relative_bias(table: torch.Tensor, dst_rows: int) -> torch.Tensor:
    """A Swin relative-position bias table [S*S, heads] resized to [dst_rows, heads] (dst_rows = D*D): each head's
    S x S grid, placed at `source_offsets`, evaluated by an interpolating bicubic spline at the integer offsets
    -D//2 .. D//2 (scipy's interp2d kind='cubic' in the official code; RectBivariateSpline is the same spline, and
    interp2d is gone from scipy). Unchanged when the sizes agree."""
    src_rows, heads = table.shape
    src, dst = _square_side(src_rows, RELATIVE_TABLE), _square_side(dst_rows, RELATIVE_TABLE)
    if src == dst:
        return table
    from scipy.interpolate import RectBivariateSpline

    grid = source_offsets(src, dst)
    t = dst // 2.0
    targets = np.arange(-t, t + 0.1, 1.0)
    columns = []
    for head in range(heads):
        values = table[:, head].reshape(src, src).float().cpu().numpy().astype(np.float64)
        spline = RectBivariateSpline(grid, grid, values, kx=3, ky=3, s=0)
        columns.append(torch.from_numpy(spline(targets, targets)).float().reshape(-1, 1))
    return torch.cat(columns, dim=1).to(table.dtype)


def interpolate_pos_embed(pos_embed: torch.Tensor, dst_tokens: int, prefix_tokens: int) -> torch.Tensor:
    """A ViT position embedding [1, prefix + S*S, C] resized to [1, dst_tokens, C]: the prefix (class) tokens kept,
    the S x S patch grid resized bicubically (align_corners False), as vit.py:222-247."""
    if pos_embed.shape[1] == dst_tokens:
        return pos_embed
    if prefix_tokens > min(pos_embed.shape[1], dst_tokens):
        raise ModelError(f"{POS_EMBED}: {prefix_tokens} prefix tokens but only {pos_embed.shape[1]} positions")
    src = _square_side(pos_embed.shape[1] - prefix_tokens, POS_EMBED)
    dst = _square_side(dst_tokens - prefix_tokens, POS_EMBED)
    extra, patches = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    grid = patches.reshape(-1, src, src, patches.shape[-1]).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([extra, patches], dim=1)


def resize_position_tables(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                           prefix_tokens: int = 1) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`state` with every relative-position bias table and ViT position embedding resized to the shape of the same
    key in `target` (a model's state_dict); other tensors untouched (a load reports their mismatches). Returns the
    new state and one line per resized tensor kind."""
    out = dict(state)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {}
    for key, value in state.items():
        if key not in target or target[key].shape == value.shape:
            continue
        if key.endswith(RELATIVE_TABLE) and value.ndim == 2:
            out[key] = interpolate_relative_bias(value, target[key].shape[0])
        elif key.endswith(POS_EMBED) and value.ndim == 3:
            out[key] = interpolate_pos_embed(value, target[key].shape[1], prefix_tokens)
        else:
            continue
        kind = RELATIVE_TABLE if key.endswith(RELATIVE_TABLE) else POS_EMBED
        old = resized.get(kind)
        resized[kind] = (tuple(value.shape), tuple(target[key].shape), (old[2] if old else 0) + 1)
    notes = [f"{kind}: {count} tensor(s) {src} -> {dst}" for kind, (src, dst, count) in sorted(resized.items())]
    for note in notes:
        log.info("resized %s", note)
    return out, notes
