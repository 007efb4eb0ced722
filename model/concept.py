"""Visual concepts: a box's [CLS] is the mean of its in-box patches; out-of-box patches are masked in cross-attention."""
from __future__ import annotations

import torch

from model.errors import ModelError


def concept_embeds(image_embeds: torch.Tensor, image_idx: torch.Tensor,
                   patch_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One visual concept per text row.

    image_embeds [B, 1 + N, C] (vision tower output), image_idx [K] (row -> image), patch_mask [K, N] (1 in the box)
    -> (embeds [K, 1 + N, C] = [mean of in-box patches; all patches], atts [K, 1 + N] = [1; patch_mask]).
    The whole image is the box covering every patch.
    """
    patches = image_embeds[image_idx, 1:]                      # [K, N, C]
    if patch_mask.shape != patches.shape[:2]:
        raise ModelError(f"patch_mask has shape {tuple(patch_mask.shape)} but the vision grid gives "
                        f"{tuple(patches.shape[:2])} (rows, patches): the loader's grid stride must match the model")
    mask = patch_mask.to(patches.dtype)
    counts = mask.sum(dim=1, keepdim=True)                     # [K, 1]
    # meta: shape-only runs; compiled: the trainer checks its batches first (a data-dependent branch breaks graphs)
    if not counts.is_meta and not torch.compiler.is_compiling() and bool((counts == 0).any()):
        raise ModelError("a region row has an empty patch_mask: every box covers at least one patch "
                        "(x_max = max(x_min + 1, ...)); check the loader's patch mask arithmetic")
    cls = (patches * mask.unsqueeze(-1)).sum(dim=1, keepdim=True) / counts.unsqueeze(-1)
    embeds = torch.cat([cls, patches], dim=1)
    atts = torch.cat([torch.ones_like(counts), mask], dim=1)   # the concept [CLS] is always visible
    return embeds, atts


def whole_image_atts(image_embeds: torch.Tensor) -> torch.Tensor:
    """Cross-attention mask that sees the [CLS] and every patch: [B, 1 + N] ones."""
    return torch.ones(image_embeds.shape[:2], dtype=image_embeds.dtype, device=image_embeds.device)
