"""The assembled X-VLM: vision tower, text and fusion encoders, concept pooling, heads; forward returns its losses."""
from __future__ import annotations

import re
from collections.abc import Collection

import torch
from torch import nn

from model.concept import concept_embeds, whole_image_atts
from model.config import ModelConfig
from model.heads import (ContrastiveHead, DenseBoxHead, MLMHead, MLPHead, SoftArgmaxBoxHead,
                         XVLMBoxHead)
from model.errors import ModelError
from model.objectives import IMAGE_TEXT, OBJECTIVES, REGION, XVLM_OBJECTIVES, ForwardPass
from model.text import FusionEncoder, TextEncoder, bert_config
from model.vision import VisionTower

# Parameters X-VLM initialises from scratch on top of the pretrained towers; they train at lr x 2.
NEW_PARAMETERS = re.compile(r"^(fusion\.layer\.\d+\.crossattention\.|itc\.|itm_head\.|box_head\.)")
IGNORED_BATCH_KEYS = {"keys", "sources"}


class XVLM(nn.Module):
    """`model(**batch)` -> {"itc", "itm", "mlm"} (+ {"bbox", "giou"} for region batches, and "centre" when asked
    for), each a scalar loss: the objectives of model/objectives.py.

    Batches follow docs/batches.md. Hard negatives for ITM are drawn with `generator` when given (it must live on
    the model's device), otherwise with the global torch RNG, like dropout.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = VisionTower(config)
        self.text = TextEncoder(config)
        self.fusion = FusionEncoder(config, self.vision.width)
        hidden = config.hidden_size
        self.itc = ContrastiveHead(self.vision.width, hidden, config.embed_dim, config.temp, config.temp_min,
                                   config.temp_max)
        eps = config.head_layer_norm_eps
        self.itm_head = MLPHead(hidden, 2, eps)
        self.mlm_head = MLMHead(bert_config(config), self.text.embeddings.word_embeddings)
        if config.box_head == "xvlm":
            self.box_head: nn.Module = XVLMBoxHead(hidden, eps)
        elif config.box_head == "dense":
            self.box_head = DenseBoxHead(hidden, self.vision.width, self.vision.grid_size, eps)
        else:
            self.box_head = SoftArgmaxBoxHead(hidden, self.vision.width, self.vision.grid_size, eps)

    # ------------------------------------------------------------------ shapes the loader must agree with
    @property
    def grid_size(self) -> int:
        """G: the vision tower's final grid is G x G patches (patch_mask has G*G columns)."""
        return self.vision.grid_size

    @property
    def grid_stride(self) -> int:
        """Pixels per final-grid patch (image_res / G): the loader's `grid_stride`."""
        return self.vision.grid_stride

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the activations of every transformer block (vision, text, fusion) in the backward instead of
        keeping them from the forward: less memory for larger batches, the same losses and gradients."""
        self.vision.backbone.set_grad_checkpointing(enabled)
        self.text.checkpointing = self.fusion.checkpointing = enabled

    @staticmethod
    def is_new_parameter(name: str) -> bool:
        """True for parameters that X-VLM initialises from scratch (cross-attention, projections, heads, temp)."""
        return NEW_PARAMETERS.match(name) is not None

    # ------------------------------------------------------------------ encoders (also used by the evaluator)
    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B, 3, R, R] -> (embeds [B, 1 + N, C], normalised ITC features [B, embed_dim])."""
        embeds = self.vision(image)
        return embeds, self.itc.vision_feat(embeds[:, 0])

    def encode_concepts(self, image_embeds: torch.Tensor, image_idx: torch.Tensor,
                        patch_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Box concepts -> (embeds [K, 1 + N, C], cross-attention mask [K, 1 + N], ITC features [K, embed_dim])."""
        embeds, atts = concept_embeds(image_embeds, image_idx, patch_mask)
        return embeds, atts, self.itc.vision_feat(embeds[:, 0])

    def encode_text(self, text_ids: torch.Tensor, text_atts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text [K, T] -> (hidden [K, T, H], normalised ITC features [K, embed_dim])."""
        hidden = self.text(text_ids, text_atts)
        return hidden, self.itc.text_feat(hidden[:, 0])

    def fuse_cls(self, vision_embeds: torch.Tensor, vision_atts: torch.Tensor, text_embeds: torch.Tensor,
                 text_atts: torch.Tensor) -> torch.Tensor:
        """Fused [CLS] [K, H] of row k's text attending to row k's vision sequence."""
        return self.fusion(text_embeds, text_atts, vision_embeds, vision_atts)[:, 0]

    def itm_scores(self, vision_embeds: torch.Tensor, vision_atts: torch.Tensor, text_embeds: torch.Tensor,
                   text_atts: torch.Tensor) -> torch.Tensor:
        """Matching score [K] (the ITM 'match' logit) of row k's (vision, text) pair; used to re-rank retrieval."""
        return self.itm_head(self.fuse_cls(vision_embeds, vision_atts, text_embeds, text_atts))[:, 1]

    def predict_boxes(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                      text_atts: torch.Tensor) -> torch.Tensor:
        """(cx, cy, w, h) in [0, 1] [K, 4] for row k's text in row k's whole image (image_embeds [K, 1 + N, C])."""
        return self.raw_boxes(image_embeds, text_embeds, text_atts).clamp(0.0, 1.0)

    def raw_boxes(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_atts: torch.Tensor) -> torch.Tensor:
        """The box head's (cx, cy, w, h), unclamped (what the box losses train)."""
        return self.box_head(self.fuse_whole(image_embeds, text_embeds, text_atts), image_embeds[:, 1:])

    def fuse_whole(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                   text_atts: torch.Tensor) -> torch.Tensor:
        """Fused [CLS] of each text attending to its whole image (what every box head reads)."""
        return self.fuse_cls(image_embeds, whole_image_atts(image_embeds), text_embeds, text_atts)

    # ------------------------------------------------------------------ training forward
    def forward(self, kind: str | None = None, *, image: torch.Tensor, text_ids: torch.Tensor,
                text_atts: torch.Tensor, text_ids_masked: torch.Tensor | None = None,
                masked_pos: torch.Tensor | None = None, masked_ids: torch.Tensor | None = None,
                image_idx: torch.Tensor | None = None,
                patch_mask: torch.Tensor | None = None, target_bbox: torch.Tensor | None = None,
                is_image: torch.Tensor | None = None, row_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None, objectives: Collection[str] | None = None,
                image_ids: torch.Tensor | None = None, **ignored: object) -> dict[str, torch.Tensor]:
        """The losses of one batch, by name: itc, itm, mlm (+ bbox, giou, and centre when named, for a region batch).

        `objectives` (default: X-VLM's five) names the losses to compute; the others are skipped, not computed and
        thrown away (ITM runs the fusion on 3x the rows and MLM runs text + fusion again). The batch is encoded once;
        each objective of its kind (model/objectives.py) computes its loss from that pass, in the registry's order.
        `image_ids` [K] (fine-tuning on several captions per image, X-VLM's `idx`): rows of the same image are
        positives in ITC and never ITM negatives. The MLM tensors may be left out when mlm is not computed.
        `row_mask` ([K] bool; shards/collate.py pad_batch) marks the real rows of a padded batch: every loss is
        that of the real rows alone.
        """
        wanted = XVLM_OBJECTIVES if objectives is None else frozenset(objectives)
        if not wanted or not wanted <= set(OBJECTIVES):
            raise ModelError(f"objectives must be a non-empty subset of {sorted(OBJECTIVES)}, got {sorted(wanted)}")
        batch_kind = self._batch_kind(kind, ignored, image, text_ids, image_idx, patch_mask, target_bbox, is_image)
        encoded = self._encode(batch_kind, image, text_ids, text_atts, image_idx, patch_mask)
        if image_ids is not None and encoded["positives"] is None:   # ITM draws no caption of the same image
            encoded["positives"] = image_ids.reshape(-1, 1) == image_ids.reshape(1, -1)
        forward_pass = ForwardPass(model=self, kind=batch_kind, text_ids=text_ids, text_atts=text_atts,
                                   text_ids_masked=text_ids_masked, masked_pos=masked_pos, masked_ids=masked_ids,
                                   generator=generator, image_idx=image_idx, target_bbox=target_bbox,
                                   is_image=is_image, image_ids=image_ids,
                                   row_mask=None if row_mask is None else row_mask.bool(), **encoded)
        return {name: objective.compute(forward_pass) for name, objective in OBJECTIVES.items()
                if name in wanted and batch_kind in objective.kinds}

    @staticmethod
    def _batch_kind(kind: str | None, ignored: dict, image: torch.Tensor, text_ids: torch.Tensor,
                    image_idx: torch.Tensor | None, patch_mask: torch.Tensor | None,
                    target_bbox: torch.Tensor | None, is_image: torch.Tensor | None) -> str:
        """REGION or IMAGE_TEXT, from the tensors (a patch_mask makes a region batch); ModelError when the batch
        does not hold what its kind needs (docs/batches.md)."""
        unexpected = sorted(set(ignored) - IGNORED_BATCH_KEYS)
        if unexpected:
            raise ModelError(f"unexpected batch keys {unexpected} (see docs/batches.md)")
        region = patch_mask is not None
        if kind is not None and kind != (REGION if region else IMAGE_TEXT):
            raise ModelError(f"batch kind {kind!r} does not match its tensors "
                             f"({'patch_mask present' if region else 'no patch_mask'})")
        if region and (image_idx is None or target_bbox is None or is_image is None):
            raise ModelError("a region batch needs image_idx, patch_mask, target_bbox and is_image")
        if not region and image.shape[0] != text_ids.shape[0]:
            raise ModelError(f"an image_text batch has one text per image: {image.shape[0]} images, "
                             f"{text_ids.shape[0]} texts")
        return REGION if region else IMAGE_TEXT

    def _encode(self, kind: str, image: torch.Tensor, text_ids: torch.Tensor, text_atts: torch.Tensor,
                image_idx: torch.Tensor | None, patch_mask: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        """The encoders' outputs every objective reads: the images, the vision side of each text row (its box
        concept in a region batch, its whole image otherwise), the texts, their ITC features and temperature."""
        image_embeds = self.vision(image)
        if kind == REGION:
            vision_embeds, vision_atts = concept_embeds(image_embeds, image_idx, patch_mask)
            positives = same_box(image_idx, patch_mask) if self.config.itm_positives == "same_box" else None
        else:
            vision_embeds, vision_atts = image_embeds, whole_image_atts(image_embeds)
            positives = None
        text_embeds, text_feat = self.encode_text(text_ids, text_atts)
        return {"image_embeds": image_embeds, "vision_embeds": vision_embeds, "vision_atts": vision_atts,
                "text_embeds": text_embeds, "text_feat": text_feat,
                "vision_feat": self.itc.vision_feat(vision_embeds[:, 0]), "temp": self.itc.temperature(),
                "positives": positives}


def same_box(image_idx: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
    """[K, K] bool: rows k, j hold the same box of the same image (same image index, same patch mask). With
    `itm_positives: same_box` ITM never draws such a pair as a negative (a concept matches every text about its
    box); X-VLM's pretraining excludes only the diagonal."""
    return (image_idx[:, None] == image_idx[None, :]) & (patch_mask[:, None] == patch_mask[None, :]).all(-1)


def build_model(config: ModelConfig) -> XVLM:
    """A freshly initialised X-VLM for `config` (load pretrained towers or own weights with model.io)."""
    if not isinstance(config, ModelConfig):
        raise ModelError(f"build_model needs a ModelConfig, got {type(config).__name__}")
    return XVLM(config)
