"""The objective registry: every loss the model can compute, declared once — its name, the batch kinds it applies
to, its function, its default weight, whether X-VLM trains it, and what it needs of the model config.

`XVLM.forward` encodes a batch once (a ForwardPass) and computes the wanted objectives of the batch's kind in the
registry's order; the trainer's `loss` config section (train/config.py) and its metric keys (train/loop.py) are
built from this registry. Adding a loss is one new entry in OBJECTIVES.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from model.config import ModelConfig
from model.errors import ModelError
from model.heads import PatchAttention
from model.losses import box_losses, centre_loss, itc_loss, itm_loss, mlm_loss, sample_hard_negatives

if TYPE_CHECKING:
    from model.xvlm import XVLM

REGION = "region"            # batches of box texts, each row attending to its box's patches (docs/batches.md)
IMAGE_TEXT = "image_text"    # batches of (image, caption) pairs
BATCH_KINDS = (REGION, IMAGE_TEXT)


@dataclass
class ForwardPass:
    """One batch as every objective reads it: its tensors and the encoders' outputs, computed once by
    XVLM.forward. Region batches: the vision side is one box concept per row (image_idx, patch_mask)."""

    model: XVLM
    kind: str
    text_ids: torch.Tensor
    text_atts: torch.Tensor
    text_ids_masked: torch.Tensor | None      # None in fine-tuning batches (no MLM)
    masked_pos: torch.Tensor | None
    masked_ids: torch.Tensor | None
    image_embeds: torch.Tensor            # [B, 1 + N, C] the whole images
    vision_embeds: torch.Tensor           # [K, 1 + N, C] what each text row attends to
    vision_atts: torch.Tensor
    text_embeds: torch.Tensor             # [K, T, H]
    text_feat: torch.Tensor               # [K, embed_dim] normalised
    vision_feat: torch.Tensor
    temp: torch.Tensor
    positives: torch.Tensor | None        # [K, K] pairs ITM must not draw as negatives (None: the diagonal)
    generator: torch.Generator | None
    image_idx: torch.Tensor | None = None
    target_bbox: torch.Tensor | None = None
    is_image: torch.Tensor | None = None
    image_ids: torch.Tensor | None = None     # [K] fine-tuning: rows with the same id are positives (ITC, ITM)
    row_mask: torch.Tensor | None = None  # [K] bool, padded batches (shards/collate.py pad_batch): the real rows
    _boxes: tuple[torch.Tensor, torch.Tensor | None] | None = field(default=None, repr=False)
    _box_losses: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def is_region(self) -> torch.Tensor:
        """[K] bool: the rows that are box texts (whole-image rows and padded rows weigh 0 in the box losses)."""
        region = ~self.is_image.bool()
        return region if self.row_mask is None else region & self.row_mask

    def boxes(self, with_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(predicted (cx, cy, w, h) [K, 4], the box head's attention logits or None), computed once. Every row goes
        through the box head (X-VLM does too) so that all its parameters join each region step's graph."""
        if self._boxes is None or (with_logits and self._boxes[1] is None):
            model = self.model
            rows = self.image_embeds[self.image_idx]
            if with_logits:   # one attention pass gives both
                fused = model.fuse_whole(rows, self.text_embeds, self.text_atts)
                self._boxes = model.box_head.boxes_and_logits(fused, rows[:, 1:])
            else:
                self._boxes = (model.raw_boxes(rows, self.text_embeds, self.text_atts), None)
        return self._boxes

    def box_losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L1, GIoU loss) of the predicted boxes over the region rows, computed once."""
        if self._box_losses is None:
            self._box_losses = box_losses(self.boxes()[0], self.target_bbox, self.is_region)
        return self._box_losses


# ---------------------------------------------------------------------------------------------- the functions


def contrastive(p: ForwardPass) -> torch.Tensor:
    """ITC: symmetric InfoNCE between the vision side's and the texts' features, gathered across ranks."""
    config = p.model.config
    same_text = p.text_ids if config.itc_same_text == "ignore" else None
    return itc_loss(p.vision_feat, p.text_feat, p.temp, same_text, config.itc_gather_grad,
                    image_ids=p.image_ids, row_mask=p.row_mask)


def matching(p: ForwardPass) -> torch.Tensor:
    """ITM: a 2-way head on the fused [CLS] of K positives and 2K hard negatives drawn by ITC similarity."""
    model = p.model
    neg_image, neg_text = sample_hard_negatives(p.vision_feat @ p.text_feat.t() / p.temp, p.positives, p.generator,
                                                p.row_mask)
    # One fusion pass over K positives, K (text, hard-negative concept) and K (concept, hard-negative text).
    vision_all = torch.cat([p.vision_embeds, p.vision_embeds[neg_image], p.vision_embeds])
    vision_atts_all = torch.cat([p.vision_atts, p.vision_atts[neg_image], p.vision_atts])
    text_all = torch.cat([p.text_embeds, p.text_embeds, p.text_embeds[neg_text]])
    text_atts_all = torch.cat([p.text_atts, p.text_atts, p.text_atts[neg_text]])
    logits = model.itm_head(model.fuse_cls(vision_all, vision_atts_all, text_all, text_atts_all))
    weight = None if p.row_mask is None else p.row_mask.repeat(3)
    return itm_loss(logits, num_pos=p.text_embeds.shape[0], row_weight=weight)


def masked_language(p: ForwardPass) -> torch.Tensor:
    """MLM: the masked texts through the text encoder and the fusion (attending to the vision side), predicted at
    the masked positions."""
    if p.text_ids_masked is None or p.masked_pos is None or p.masked_ids is None:
        raise ModelError("the mlm loss needs text_ids_masked, masked_pos and masked_ids in the batch; "
                         "set its weight to 0 for batches without them (fine-tuning)")
    model = p.model
    hidden = model.fusion(model.text(p.text_ids_masked, p.text_atts), p.text_atts, p.vision_embeds, p.vision_atts)
    at_masks = hidden.gather(1, p.masked_pos[..., None].expand(-1, -1, hidden.shape[-1]))
    masked_ids = p.masked_ids if p.row_mask is None else p.masked_ids.masked_fill(~p.row_mask[:, None], -100)
    return mlm_loss(model.mlm_head(at_masks), masked_ids)


def box_centre(p: ForwardPass) -> torch.Tensor:
    """Ours: cross-entropy of the box head's attention over the patches with the box centre's patch as the class."""
    head = p.model.box_head
    if not isinstance(head, PatchAttention):
        raise ModelError(f"the centre loss trains the attention of a softargmax or dense box head; "
                         f"box_head {p.model.config.box_head!r} has none: set its weight to 0")
    _pred, logits = p.boxes(with_logits=True)
    return centre_loss(logits, p.target_bbox, p.is_region, head.grid)


def box_l1(p: ForwardPass) -> torch.Tensor:
    """L1 of the predicted (cx, cy, w, h), summed over the coordinates, averaged over the region rows."""
    return p.box_losses()[0]


def box_giou(p: ForwardPass) -> torch.Tensor:
    """1 - GIoU of the predicted boxes, averaged over the region rows."""
    return p.box_losses()[1]


def _attending_box_head(config: ModelConfig) -> str | None:
    if config.box_head in ("softargmax", "dense"):
        return None
    return ("trains the attention of a softargmax or dense box head: set model.box_head to one of them, or the "
            "weight to 0")


# ---------------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Objective:
    """One loss: `compute(pass)` on batches of `kinds`, weighted `weight` unless the config says otherwise.
    `xvlm`: one of X-VLM's own five (what forward computes when not told); `requires(model config)`: why the model
    cannot train it (None when it can)."""

    name: str
    kinds: tuple[str, ...]
    compute: Callable[[ForwardPass], torch.Tensor]
    weight: float
    xvlm: bool = True
    requires: Callable[[ModelConfig], str | None] | None = None
    note: str = ""


# In computing order: the centre loss before bbox / giou, whose boxes it predicts in the same attention pass.
OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("itc", (IMAGE_TEXT, REGION), contrastive, 1.0),
    Objective("itm", (IMAGE_TEXT, REGION), matching, 1.0),
    Objective("mlm", (IMAGE_TEXT, REGION), masked_language, 1.0),
    Objective("centre", (REGION,), box_centre, 0.0, xvlm=False, requires=_attending_box_head,
              note="ours: the box head's attention trained on the patch of the box centre (softargmax, dense)"),
    Objective("bbox", (REGION,), box_l1, 1.0),
    Objective("giou", (REGION,), box_giou, 1.0),
)}
XVLM_OBJECTIVES = frozenset(name for name, o in OBJECTIVES.items() if o.xvlm)   # forward()'s default


def objectives_of(kind: str) -> tuple[str, ...]:
    """The names of the objectives a batch of `kind` has, in computing order."""
    return tuple(name for name, o in OBJECTIVES.items() if kind in o.kinds)
