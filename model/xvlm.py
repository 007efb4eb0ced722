"""The assembled X-VLM: vision tower, text and fusion encoders, concept pooling, heads; forward returns its losses."""
from __future__ import annotations

import re
from collections.abc import Collection

import torch
from torch import nn

from model.concept import concept_embeds, whole_image_atts
from model.config import ModelConfig
from model.heads import (ContrastiveHead, DenseBoxHead, MLMHead, MLPHead, PatchAttention, SoftArgmaxBoxHead,
                         XVLMBoxHead)
from model.losses import box_losses, centre_loss, itc_loss, itm_loss, mlm_loss, sample_hard_negatives
from model.text import FusionEncoder, TextEncoder, bert_config
from model.vision import VisionTower
from model.errors import ModelError

# Parameters X-VLM initialises from scratch on top of the pretrained towers; they train at lr x 2.
NEW_PARAMETERS = re.compile(r"^(fusion\.layer\.\d+\.crossattention\.|itc\.|itm_head\.|box_head\.)")
IGNORED_BATCH_KEYS = {"keys", "sources"}
XVLM_OBJECTIVES = frozenset({"itc", "itm", "mlm", "bbox", "giou"})   # X-VLM's losses: forward()'s default
OBJECTIVES = XVLM_OBJECTIVES | {"centre"}                  # the losses forward() can compute
BOX_OBJECTIVES = frozenset({"bbox", "giou", "centre"})     # region batches only


class XVLM(nn.Module):
    """`model(**batch)` -> {"itc", "itm", "mlm"} (+ {"bbox", "giou"} for region batches, and "centre" when asked
    for), each a scalar loss.

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
        return self._boxes(image_embeds, text_embeds, text_atts).clamp(0.0, 1.0)

    def _boxes(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_atts: torch.Tensor) -> torch.Tensor:
        return self.box_head(self._fuse_whole(image_embeds, text_embeds, text_atts), image_embeds[:, 1:])

    def _fuse_whole(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                    text_atts: torch.Tensor) -> torch.Tensor:
        """Fused [CLS] of each text attending to its whole image (what every box head reads)."""
        return self.fuse_cls(image_embeds, whole_image_atts(image_embeds), text_embeds, text_atts)

    # ------------------------------------------------------------------ training forward
    def forward(self, kind: str | None = None, *, image: torch.Tensor, text_ids: torch.Tensor,
                text_atts: torch.Tensor, text_ids_masked: torch.Tensor, masked_pos: torch.Tensor,
                masked_ids: torch.Tensor, image_idx: torch.Tensor | None = None,
                patch_mask: torch.Tensor | None = None, target_bbox: torch.Tensor | None = None,
                is_image: torch.Tensor | None = None, generator: torch.Generator | None = None,
                objectives: Collection[str] | None = None, **ignored: object) -> dict[str, torch.Tensor]:
        """The losses of one batch, by name: itc, itm, mlm (+ bbox, giou, and centre when named, for a region batch).

        `objectives` (default: X-VLM's five) names the losses to compute; the others are skipped, not computed and
        thrown away (ITM runs the fusion on 3x the rows and MLM runs text + fusion again).
        """
        wanted = XVLM_OBJECTIVES if objectives is None else frozenset(objectives)
        if not wanted or not wanted <= OBJECTIVES:
            raise ModelError(f"objectives must be a non-empty subset of {sorted(OBJECTIVES)}, got {sorted(wanted)}")
        unexpected = sorted(set(ignored) - IGNORED_BATCH_KEYS)
        if unexpected:
            raise ModelError(f"unexpected batch keys {unexpected} (see docs/batches.md)")
        region = patch_mask is not None
        if kind is not None and kind != ("region" if region else "image_text"):
            raise ModelError(f"batch kind {kind!r} does not match its tensors "
                            f"({'patch_mask present' if region else 'no patch_mask'})")
        if region and (image_idx is None or target_bbox is None or is_image is None):
            raise ModelError("a region batch needs image_idx, patch_mask, target_bbox and is_image")

        image_embeds = self.vision(image)
        if region:
            vision_embeds, vision_atts = concept_embeds(image_embeds, image_idx, patch_mask)
            positives = same_box(image_idx, patch_mask) if self.config.itm_positives == "same_box" else None
        else:
            if image.shape[0] != text_ids.shape[0]:
                raise ModelError(f"an image_text batch has one text per image: {image.shape[0]} images, "
                                f"{text_ids.shape[0]} texts")
            vision_embeds, vision_atts = image_embeds, whole_image_atts(image_embeds)
            positives = None
        text_embeds, text_feat = self.encode_text(text_ids, text_atts)
        vision_feat = self.itc.vision_feat(vision_embeds[:, 0])
        temp = self.itc.temperature()

        losses = {}
        if "itc" in wanted:
            same_text = text_ids if self.config.itc_same_text == "ignore" else None
            losses["itc"] = itc_loss(vision_feat, text_feat, temp, same_text, self.config.itc_gather_grad)
        if "itm" in wanted:
            losses["itm"] = self._itm_loss(vision_embeds, vision_atts, text_embeds, text_atts,
                                           (vision_feat @ text_feat.t() / temp), positives, generator)
        if "mlm" in wanted:
            losses["mlm"] = self._mlm_loss(text_ids_masked, text_atts, vision_embeds, vision_atts, masked_pos,
                                           masked_ids)
        if region and wanted & BOX_OBJECTIVES:
            # Every row goes through the box head (X-VLM does too) so that all its parameters join each region
            # step's graph; whole-image rows then weigh 0 in the loss.
            is_region = ~is_image.bool()
            rows = image_embeds[image_idx]
            if "centre" in wanted:
                if not isinstance(self.box_head, PatchAttention):
                    raise ModelError(f"the centre loss trains the attention of a softargmax or dense box head; "
                                     f"box_head {self.config.box_head!r} has none: set its weight to 0")
                fused = self._fuse_whole(rows, text_embeds, text_atts)
                pred, logits = self.box_head.boxes_and_logits(fused, rows[:, 1:])   # one attention pass for both
                losses["centre"] = centre_loss(logits, target_bbox, is_region, self.box_head.grid)
            else:
                pred = self._boxes(rows, text_embeds, text_atts)
            bbox, giou = box_losses(pred, target_bbox, is_region)
            losses.update({name: value for name, value in (("bbox", bbox), ("giou", giou)) if name in wanted})
        return losses

    def _itm_loss(self, vision_embeds: torch.Tensor, vision_atts: torch.Tensor, text_embeds: torch.Tensor,
                  text_atts: torch.Tensor, sim_i2t: torch.Tensor, positives: torch.Tensor | None,
                  generator: torch.Generator | None) -> torch.Tensor:
        neg_image, neg_text = sample_hard_negatives(sim_i2t, positives, generator)
        # One fusion pass over K positives, K (text, hard-negative concept) and K (concept, hard-negative text).
        vision_all = torch.cat([vision_embeds, vision_embeds[neg_image], vision_embeds])
        vision_atts_all = torch.cat([vision_atts, vision_atts[neg_image], vision_atts])
        text_all = torch.cat([text_embeds, text_embeds, text_embeds[neg_text]])
        text_atts_all = torch.cat([text_atts, text_atts, text_atts[neg_text]])
        logits = self.itm_head(self.fuse_cls(vision_all, vision_atts_all, text_all, text_atts_all))
        return itm_loss(logits, num_pos=text_embeds.shape[0])

    def _mlm_loss(self, text_ids_masked: torch.Tensor, text_atts: torch.Tensor, vision_embeds: torch.Tensor,
                  vision_atts: torch.Tensor, masked_pos: torch.Tensor, masked_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.fusion(self.text(text_ids_masked, text_atts), text_atts, vision_embeds, vision_atts)
        at_masks = hidden.gather(1, masked_pos[..., None].expand(-1, -1, hidden.shape[-1]))
        return mlm_loss(self.mlm_head(at_masks), masked_ids)


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
