"""model/resize.py: a 224 checkpoint's position tables resized for 384 fine-tuning as X-VLM's loader does."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.config import preset
from model.errors import ModelError
from model.io import load_strict
from model.resize import (interpolate_pos_embed, interpolate_relative_bias, resize_position_tables,
                          source_offsets)
from model.xvlm import build_model

SWIN = dict(vision_name="swin_tiny_patch4_window7_224",
            vision_kwargs={"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]})


def test_offsets_are_the_official_geometric_grid():
    """Window 7 -> 12: 13 source rows spread over the target's -11..11 (X-VLM's 224 -> 384 fine-tuning)."""
    grid = source_offsets(13, 23)
    assert grid.shape == (13,) and grid[6] == 0 and np.allclose(grid, -grid[::-1])
    assert list(grid[5:8]) == [-1.0, 0.0, 1.0]
    assert abs(grid[-1] - 11.0) < 1e-3                   # the outermost source row lands on the target's edge
    steps = np.diff(grid[6:])
    assert np.allclose(steps[1:] / steps[:-1], steps[1] / steps[0])   # ratios constant: geometric


def test_relative_table_spline_reproduces_a_cubic_and_keeps_equal_sizes():
    """The interpolating bicubic spline is exact on a cubic polynomial of the offsets; equal sizes: the same table."""
    grid = source_offsets(13, 23)
    poly = lambda y, x: 0.5 + 0.1 * x - 0.02 * y * x + 0.003 * x ** 3 - 0.001 * y ** 2   # noqa: E731
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    table = torch.tensor(np.stack([poly(ys, xs), 2 * poly(ys, xs)], -1).reshape(169, 2), dtype=torch.float32)
    out = interpolate_relative_bias(table, 529)
    t = np.arange(-11, 12, dtype=np.float64)
    ty, tx = np.meshgrid(t, t, indexing="ij")
    expected = np.stack([poly(ty, tx), 2 * poly(ty, tx)], -1).reshape(529, 2)
    assert out.shape == (529, 2)
    assert np.allclose(out.numpy(), expected, atol=1e-4)
    assert interpolate_relative_bias(table, 169) is table
    with pytest.raises(ModelError, match="not a square grid"):
        interpolate_relative_bias(table, 530)


def test_pos_embed_matches_torch_bicubic_and_keeps_the_class_token():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 64, 8)
    out = interpolate_pos_embed(pos, 1 + 144, prefix_tokens=1)
    grid = pos[:, 1:].reshape(1, 8, 8, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 144, 8)
    assert torch.equal(out[:, :1], pos[:, :1])
    assert torch.equal(out[:, 1:], ref)
    assert interpolate_pos_embed(pos, 65, 1) is pos


def test_tiny_vit_checkpoint_loads_at_a_larger_image_size():
    small = build_model(preset("tiny"))                       # 64 px, 8 x 8 patches
    large = build_model(preset("tiny", image_res=96))         # 12 x 12 patches
    state, notes = resize_position_tables(small.state_dict(), large.state_dict(), prefix_tokens=1)
    assert notes == ["pos_embed: 1 tensor(s) (1, 65, 64) -> (1, 145, 64)"]
    load_strict(large, state, "resized")
    assert torch.equal(large.text.embeddings.word_embeddings.weight, small.text.embeddings.word_embeddings.weight)
    own = small.state_dict()
    same, notes = resize_position_tables(own, own)
    assert notes == [] and all(same[k] is v for k, v in own.items())


def test_swin_window_7_at_224_resizes_to_window_12_at_384():
    small = build_model(preset("tiny", image_res=224, **SWIN))
    large = build_model(preset("tiny", image_res=384, vision_name=SWIN["vision_name"],
                               vision_kwargs={**SWIN["vision_kwargs"], "window_size": 12}))
    state, notes = resize_position_tables(small.state_dict(), large.state_dict())
    assert len(notes) == 1 and notes[0].startswith("relative_position_bias_table: 4 tensor(s) (169, ")
    assert "-> (529, " in notes[0]
    load_strict(large, state, "resized")
    key = "vision.backbone.layers.0.blocks.0.attn.relative_position_bias_table"
    centre_small = small.state_dict()[key].reshape(13, 13)[6, 6]
    assert torch.allclose(large.state_dict()[key].reshape(23, 23)[11, 11], centre_small, atol=1e-6)  # offset 0 kept
    assert large.grid_size == 12
    image = torch.randn(1, 3, 384, 384)
    assert large.vision(image).shape == (1, 1 + 144, large.vision.width)
