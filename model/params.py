"""Optimizer parameter groups as X-VLM uses them: no weight decay on biases and norms, lr x 2 for new parameters."""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import nn

from model.xvlm import XVLM

NEW_LR_SCALE = 2.0
# Names timm exempts from decay by keyword (e.g. Swin's relative position bias tables) besides 1-D tensors.
NO_DECAY_KEYWORDS = ("relative_position_bias_table", "absolute_pos_embed", "pos_embed", "cls_token", "reg_token",
                     "dist_token")


def no_weight_decay(name: str, param: nn.Parameter, timm_names: set[str]) -> bool:
    """Biases, norm weights, the temperature (all tensors with <= 1 dim) and timm's position/class tokens."""
    return param.ndim <= 1 or name in timm_names or any(key in name for key in NO_DECAY_KEYWORDS)


def param_groups(model: XVLM, lr: float, weight_decay: float,
                 new_parameters: Collection[str] | None = None) -> list[dict[str, Any]]:
    """Up to four AdamW groups: {decay, no decay} x {pretrained-able (lr), new (lr x 2)}.

    Each group carries "lr", "weight_decay", "lr_scale" (1 or 2, for schedulers that set lr themselves) and a
    "name". Frozen parameters (requires_grad False) are left out; tied parameters appear once. New parameters are
    `model.is_new_parameter`'s (pretraining), or the names in `new_parameters` when given (fine-tuning).
    """
    is_new = model.is_new_parameter if new_parameters is None else set(new_parameters).__contains__
    timm_names = model.vision.no_weight_decay()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():  # named_parameters yields a tied tensor once
        if not param.requires_grad:
            continue
        key = (is_new(name), no_weight_decay(name, param, timm_names))
        groups.setdefault(key, []).append(param)
    out = []
    for (new, no_decay), params in sorted(groups.items()):
        scale = NEW_LR_SCALE if new else 1.0
        out.append({"params": params, "lr": lr * scale, "lr_scale": scale,
                    "weight_decay": 0.0 if no_decay else weight_decay,
                    "name": f"{'new' if new else 'base'}_{'no_decay' if no_decay else 'decay'}"})
    return out
