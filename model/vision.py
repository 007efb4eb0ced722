"""The vision tower: a timm Swin or ViT whose output is [CLS] followed by the final grid of patch features."""
from __future__ import annotations

import timm
import torch
from torch import nn

from model import convstem  # noqa: F401  (registers the vit_convstem timm model with timm)
from model.config import ModelConfig


class VisionTower(nn.Module):
    """images [B, 3, R, R] -> embeds [B, 1 + G*G, width]: the image [CLS], then the patches row-major (y, x)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.family = config.family
        # num_classes=0 drops the classifier: we read the final normed tokens, never the logits.
        self.backbone = timm.create_model(config.vision_name, pretrained=False, num_classes=0,
                                          **config.timm_kwargs())
        # timm leaves F.scaled_dot_product_attention off in Swin's window attention ("experimental"); it computes
        # the same outputs (tests/test_compiled_step.py) with fused kernels, so every attention block uses it.
        for module in self.backbone.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = True
        self.width: int = self.backbone.num_features
        if self.family == "vit":
            grid_h, grid_w = self.backbone.patch_embed.grid_size
            self.num_prefix_tokens: int = self.backbone.num_prefix_tokens
            self.has_class_token: bool = getattr(self.backbone, "cls_token", None) is not None
        else:
            stride = self.backbone.feature_info[-1]["reduction"]
            grid_h = grid_w = config.image_res // stride
        if grid_h != grid_w:
            raise ValueError(f"the vision grid must be square, got {grid_h}x{grid_w}")
        self.grid_size: int = int(grid_h)
        self.grid_stride: int = config.image_res // self.grid_size

    @property
    def num_patches(self) -> int:
        return self.grid_size * self.grid_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images)
        if self.family == "vit":
            # Keep the class token, drop register/distillation tokens: only the patches carry positions.
            patches = tokens[:, self.num_prefix_tokens:]
            # A ViT built without a class token (vision_kwargs class_token: false) pools like Swin.
            cls = tokens[:, :1] if self.has_class_token else patches.mean(dim=1, keepdim=True)
        else:
            patches = tokens.flatten(1, 2)            # timm Swin returns normed NHWC tokens
            cls = patches.mean(dim=1, keepdim=True)   # X-VLM: average pool of the final tokens
        return torch.cat([cls, patches], dim=1)

    def no_weight_decay(self) -> set[str]:
        """Backbone parameter names timm exempts from weight decay (position embeddings, class tokens)."""
        names = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {f"backbone.{name}" for name in names}
