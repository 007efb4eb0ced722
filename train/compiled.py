"""The compiled step: whether to torch.compile, the fixed batch shapes it needs, and the batch check and padding
that give every batch of a kind one shape (so each kind compiles once: docs/training.md, "Compiled step").
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from shards.collate import pad_batch
from storage.errors import XvlmError
from train.config import TrainConfig

log = logging.getLogger(__name__)

# Two graphs (one per batch kind) are expected; more means shapes vary, and then compiling costs more than it saves.
RECOMPILE_LIMIT = 8


def use_compile(setting: str | bool, device: torch.device) -> bool:
    """`compile: auto` compiles on CUDA only: on CPU compiling costs minutes and gains little (docs/training.md)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def static_shapes(cfg: TrainConfig) -> dict[str, tuple[int, int]]:
    """{batch kind: (rows, images)} every batch is padded to: the loader's configured maxima."""
    loader = cfg.data.build()
    return {"image_text": (loader.image_text_batch_size, loader.image_text_batch_size),
            "region": (loader.region_batch_size, loader.region_max_images)}


def check_batch(batch: dict[str, Any]) -> None:
    """What the model checks itself when it runs eagerly and cannot check inside a graph (a data-dependent branch
    breaks it): every region row has a box, and ITM finds a negative for every row (two rows at least)."""
    rows = int(batch["text_ids"].shape[0])
    if rows < 2:
        raise XvlmError(f"a {batch['kind']} batch of {rows} row has no ITM negative: batches need 2 rows or more")
    mask = batch.get("patch_mask")
    if mask is not None and bool((mask.sum(dim=1) == 0).any()):
        raise XvlmError("a region row has an empty patch_mask: every box covers at least one patch; check the "
                        "loader's patch mask arithmetic (docs/batches.md)")


def pad_to_shape(tensors: dict[str, torch.Tensor], kind: str, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """The batch's tensors (on any device) padded to its kind's fixed shape, with `row_mask`."""
    rows, images = shapes[kind]
    try:
        padded = pad_batch({"kind": kind, **tensors}, rows, images)
    except ValueError as err:
        raise XvlmError(f"{err} (data.region_batch_size, data.region_max_images, data.image_text_batch_size are "
                        "the fixed shapes of a compiled step)") from err
    del padded["kind"]
    return padded


def compile_model(module: nn.Module, cfg: TrainConfig) -> nn.Module:
    """`module` under torch.compile with static shapes (padded batches: one graph per batch kind)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    log.info("compiling the model's forward (backend %s, mode %s); the first step of each batch kind compiles",
             cfg.compile_backend, cfg.compile_mode)
    return torch.compile(module, backend=cfg.compile_backend, mode=mode, dynamic=False)
