"""`vit_convstem`: a timm ViT whose patch embedding is a small convolutional stem instead of one strided conv.

Xiao et al. 2021 ("Early Convolutions Help Transformers See Better") replace ViT's patchify layer with a few
stride-2 3x3 convolutions; trained from scratch, the ViT then optimises faster and better. On the quickstart's
64 px sample scenes it reached the retrieval of the 8 px patchify ViT in about half the steps; with stride-1
convolutions between the stride-2 ones (the quickstart's stem) it also learned shapes sooner (docs/quickstart.md).

The stem is timm's `ConvStem` (conv3x3 + BatchNorm + GELU per stage, the last conv without norm or activation),
fed to timm's `HybridEmbed`; the grid stride is the product of the convolutions' strides. Registered with timm
on import (model.vision imports this module), and as a vision tower in model.config.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

from timm.layers import HybridEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn

from model.errors import ModelError

# timm's create_model hands these to every entrypoint; a model without pretrained weights has no use for them
_TIMM_PLUMBING = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


@register_model
def vit_convstem(pretrained: bool = False, stem_channels: Sequence[int] | None = None,
                 stem_strides: Sequence[int] | None = None, **kwargs: Any) -> VisionTransformer:
    """A ViT (timm VisionTransformer kwargs: embed_dim, depth, num_heads, mlp_ratio, img_size, class_token, ...)
    whose tokens come from len(stem_channels) 3x3 convolutions (default: embed_dim / 4, / 2, / 1), each of stride
    2 unless `stem_strides` (1 or 2 per convolution) says otherwise; the grid stride is their product (default 8).
    No pretrained weights exist for it."""
    if pretrained:
        raise ModelError("vit_convstem has no pretrained weights: build it with pretrained=False and train it")
    if "patch_size" in kwargs:
        raise ModelError("vit_convstem takes no patch_size: its grid stride is the product of stem_strides")
    for name in _TIMM_PLUMBING:
        kwargs.pop(name, None)
    dim = int(kwargs.setdefault("embed_dim", 192))
    channels = (dim // 4, dim // 2, dim) if stem_channels is None else tuple(int(c) for c in stem_channels)
    if not channels or min(channels) < 1:
        raise ModelError(f"vit_convstem stem_channels must be positive channel counts, got {stem_channels!r}")
    strides = (2,) * len(channels) if stem_strides is None else tuple(int(s) for s in stem_strides)
    if len(strides) != len(channels) or not set(strides) <= {1, 2}:
        raise ModelError(f"vit_convstem stem_strides must give 1 or 2 for each of the {len(channels)} convolutions "
                         f"of stem_channels {list(channels)}, got {stem_strides!r}")
    stem = ConvStem(in_chans=int(kwargs.get("in_chans", 3)), depth=len(channels), channels=channels,
                    kernel_size=3, stride=strides, padding=1, act_layer=nn.GELU)
    # patch_size=1: every cell of the stem's output map is one token; a 1x1 projection only when widths differ
    embed = partial(HybridEmbed, backbone=stem, proj=channels[-1] != dim)
    return VisionTransformer(embed_layer=embed, patch_size=1, **kwargs)
