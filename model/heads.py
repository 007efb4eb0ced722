"""Heads on top of the encoders: ITC projections + temperature, ITM, tied MLM, and the two box heads."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

from model.text import init_bert_weights


class MLPHead(nn.Module):
    """X-VLM's head: Linear(H -> 2H) -> LayerNorm -> GELU -> Linear(2H -> out). X-VLM's LayerNorm has PyTorch's
    default eps 1e-5 (models/xvlm.py build_mlp), not BERT's 1e-12."""

    def __init__(self, hidden: int, out: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.LayerNorm(2 * hidden, eps=eps), nn.GELU(),
                                 nn.Linear(2 * hidden, out))
        init_bert_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ContrastiveHead(nn.Module):
    """Projects vision and text [CLS] to L2-normalised `embed_dim` features; owns the learnable temperature."""

    def __init__(self, vision_width: int, hidden: int, embed_dim: int, temp: float, temp_min: float,
                 temp_max: float) -> None:
        super().__init__()
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.temp_min, self.temp_max = temp_min, temp_max
        init_bert_weights(self)

    def temperature(self) -> torch.Tensor:
        """The temperature of this forward: the parameter clamped in place into [temp_min, temp_max] (no gradient
        through the clamp), then used with gradient 1, as X-VLM does (models/model_pretrain.py: `temp.clamp_` under
        no_grad). A temperature at a bound can leave it again.

        We clamp `.data`: an in-place op on the parameter itself would bump its version and break the backward of
        an earlier forward still in the graph (two batches summed into one step, gradient accumulation). The
        returned clone is this forward's own copy of the value, so a later forward's clamp cannot change what
        this one's backward reads; its gradient is the identity.
        """
        self.temp.data.clamp_(self.temp_min, self.temp_max)
        return self.temp.clone()

    def vision_feat(self, cls: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(cls), dim=-1)

    def text_feat(self, cls: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(cls), dim=-1)


class MLMHead(nn.Module):
    """BERT's MLM head (transform + decoder), its decoder weight tied to the word embeddings."""

    def __init__(self, bert_config, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.cls = BertOnlyMLMHead(bert_config)      # keys match a Hugging Face BertForPreTraining `cls.*`
        init_bert_weights(self.cls)
        predictions = self.cls.predictions
        predictions.decoder.weight = word_embeddings.weight
        predictions.decoder.bias = predictions.bias  # one output bias, as transformers ties it

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cls(hidden)


class XVLMBoxHead(nn.Module):
    """The paper's box head: MLP on the fused text [CLS] (text attending to the whole image), sigmoid -> (cx, cy, w, h)."""

    def __init__(self, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.mlp = MLPHead(hidden, 4, eps)

    def forward(self, fused_cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        del patches  # the paper's head reads the [CLS] only
        return self.mlp(fused_cls).sigmoid()


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings [grid*grid, dim], row-major (y, x); half the channels per axis (MAE)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(ys), encode(xs)], dim=1).float()


def patch_centres(grid: int) -> torch.Tensor:
    """[grid*grid, 2] (x, y) centres of the patches in [0, 1], row-major (y, x)."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


class PatchAttention(nn.Module):
    """Where the fused text [CLS] attends over the patches: softmax(query(cls) . (key(patch) + sin-cos position)).
    The base of the two soft-argmax box heads, which read the box off these weights (`boxes_from`). Subclasses
    initialise `query` and `key` (creation order fixes the random init, so each head keeps its own)."""

    def __init__(self, hidden: int, vision_width: int, grid: int) -> None:
        super().__init__()
        dim = hidden - hidden % 4
        self.grid = grid
        self.query = nn.Linear(hidden, dim)
        self.key = nn.Linear(vision_width, dim)
        self.register_buffer("pos_embed", sincos_2d(grid, dim), persistent=False)
        self.register_buffer("centres", patch_centres(grid), persistent=False)

    def logits(self, fused_cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """[K, N] attention logits over the patches (the `centre` loss trains them directly)."""
        keys = self.key(patches) + self.pos_embed.to(patches.dtype)            # [K, N, D]
        query = self.query(fused_cls)                                          # [K, D]
        return torch.einsum("knd,kd->kn", keys, query) / math.sqrt(query.shape[-1])

    def attention(self, fused_cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """[K, N] weights over the patches, each row summing to 1."""
        return self.logits(fused_cls, patches).softmax(dim=-1)

    def boxes_from(self, weights: torch.Tensor, fused_cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """(cx, cy, w, h) [K, 4] given the attention weights."""
        raise NotImplementedError

    def forward(self, fused_cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        return self.boxes_from(self.attention(fused_cls, patches), fused_cls, patches)

    def boxes_and_logits(self, fused_cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes [K, 4], attention logits [K, N]) from one attention pass."""
        logits = self.logits(fused_cls, patches)
        return self.boxes_from(logits.softmax(dim=-1), fused_cls, patches), logits


class SoftArgmaxBoxHead(PatchAttention):
    """Ours: the box centre is the attention-weighted mean of the patch centres (a soft-argmax of the fused text [CLS]
    over the patches, keyed with fixed sin-cos positions) plus a learned offset of at most one patch; w, h from an MLP.

    Why: the centre is read off the image where the text attends, instead of being regressed from one vector.
    """

    def __init__(self, hidden: int, vision_width: int, grid: int, eps: float = 1e-5) -> None:
        super().__init__(hidden, vision_width, grid)
        self.offset = MLPHead(hidden, 2, eps)
        self.size = MLPHead(hidden, 2, eps)
        init_bert_weights(self.query)
        init_bert_weights(self.key)

    def boxes_from(self, weights: torch.Tensor, fused_cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        del patches  # the centre comes from the weights, the offset and size from the fused [CLS]
        centre = weights @ self.centres.to(weights.dtype) + self.offset(fused_cls).tanh() / self.grid
        return torch.cat([centre, self.size(fused_cls).sigmoid()], dim=-1)


class DenseBoxHead(PatchAttention):
    """Ours: every patch predicts the whole box (its centre as an offset of up to `reach` patches from the patch's
    own centre, and w, h), reading its own features and the fused text [CLS]; the box is the soft-argmax-weighted
    mean of the patches' boxes, the weights being where the fused text attends (as in `SoftArgmaxBoxHead`).

    Why: the offset is read off the patch that sees the object's edges, so the box is exact below the patch
    size, and patches that share the attention agree on one box instead of averaging their centres
    (one-stage detectors such as FCOS regress per location the same way).
    """

    def __init__(self, hidden: int, vision_width: int, grid: int, eps: float = 1e-5, reach: float = 2.0) -> None:
        super().__init__(hidden, vision_width, grid)
        self.reach = reach
        self.patch_in = nn.Linear(vision_width, hidden)
        self.text_in = nn.Linear(hidden, hidden)
        self.regress = nn.Sequential(nn.LayerNorm(hidden, eps=eps), nn.GELU(), nn.Linear(hidden, 4))
        init_bert_weights(self)

    def boxes_from(self, weights: torch.Tensor, fused_cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        per_patch = self.regress(self.patch_in(patches) + self.text_in(fused_cls)[:, None])   # [K, N, 4]
        centres = self.centres.to(per_patch.dtype) + per_patch[..., :2].tanh() * (self.reach / self.grid)
        boxes = torch.cat([centres, per_patch[..., 2:].sigmoid()], dim=-1)    # [K, N, 4] (cx, cy, w, h)
        return torch.einsum("kn,knc->kc", weights, boxes)
