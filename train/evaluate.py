"""Zero-shot evaluation on held-out shards: image<->text retrieval R@1/5/10 (ITC ranking, ITM re-ranking of the
top-k, as X-VLM) and grounding accuracy (the predicted box of a region text has IoU >= 0.5 with the true box).

The metric functions take plain tensors and are tested on known answers; `evaluate` makes the model calls.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torchvision.ops import box_convert

from shards.errors import XvlmError

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)


@dataclass
class EvalConfig:
    """What `evaluate` computes and how much at a time."""

    k_test: int = 16                 # ITM re-ranks each query's top-k ITC candidates (X-VLM: 128 on COCO-5k)
    batch_size: int = 64             # images / texts / ITM pairs per forward
    iou_threshold: float = 0.5       # a grounding counts when IoU >= this
    max_images: int | None = None    # evaluate on the first N held-out images only (None: all)
    progress: bool = True            # tqdm bars

    def __post_init__(self) -> None:
        if self.k_test < 1:
            raise XvlmError(f"eval k_test must be >= 1, got {self.k_test}")
        if self.batch_size < 1:
            raise XvlmError(f"eval batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise XvlmError(f"eval iou_threshold must lie in (0, 1], got {self.iou_threshold}")
        if self.max_images is not None and self.max_images < 1:
            raise XvlmError(f"eval max_images must be >= 1 or null, got {self.max_images}")


# ---------------------------------------------------------------------------------------------- metrics


def best_positive_rank(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best-scoring positive candidate: the number of negatives that score at least as
    high. Ties count against the model, so a model that scores everything alike ranks last, not first.

    scores [Q, C] float, positives [Q, C] bool (every query needs at least one positive) -> ranks [Q] int64.
    """
    if scores.shape != positives.shape:
        raise XvlmError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} differ in shape")
    if not bool(positives.any(dim=1).all()):
        raise XvlmError("a retrieval query has no positive candidate")
    scores = scores.float()
    best = scores.masked_fill(~positives, -math.inf).max(dim=1, keepdim=True).values
    return ((scores >= best) & ~positives).sum(dim=1)


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """{k: fraction of queries whose best positive is among the top k candidates}."""
    ranks = best_positive_rank(scores, positives)
    return {k: float((ranks < k).float().mean()) for k in ks}


def retrieval_metrics(scores_i2t: torch.Tensor, scores_t2i: torch.Tensor, text_image: torch.Tensor,
                      ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Image->text and text->image R@k, and their mean (X-VLM's r_mean).

    scores_i2t [N_img, N_txt], scores_t2i [N_txt, N_img]; text_image [N_txt] = the image each text describes
    (an image may have several texts, each text has exactly one image).
    """
    n_img, n_txt = scores_i2t.shape
    if scores_t2i.shape != (n_txt, n_img):
        raise XvlmError(f"scores_t2i should be [{n_txt}, {n_img}], got {tuple(scores_t2i.shape)}")
    if text_image.shape != (n_txt,):
        raise XvlmError(f"text_image should have {n_txt} entries, got {tuple(text_image.shape)}")
    positives_t2i = text_image[:, None] == torch.arange(n_img)[None, :]
    i2t = recall_at_k(scores_i2t, positives_t2i.t(), ks)
    t2i = recall_at_k(scores_t2i, positives_t2i, ks)
    out = {f"i2t_r{k}": i2t[k] for k in ks}
    out.update({f"t2i_r{k}": t2i[k] for k in ks})
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def rerank_top_k(itc_scores: torch.Tensor, k: int,
                 score_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Re-rank each row's top-k ITC candidates by a finer score (X-VLM: the ITM match logit).

    itc_scores [Q, C]; score_pairs(query_idx [P], candidate_idx [P]) -> scores [P]. Returns [Q, C] scores whose
    order puts the top-k of every row first, ordered by the finer score, and the remaining candidates after them
    in their ITC order (so R@k for k beyond the re-ranked depth stays meaningful).
    """
    n_query, n_cand = itc_scores.shape
    k = min(k, n_cand)
    itc_scores = itc_scores.float()
    top_idx = itc_scores.topk(k, dim=1).indices                           # [Q, k]
    query_idx = torch.arange(n_query)[:, None].expand(-1, k).reshape(-1)
    fine = score_pairs(query_idx, top_idx.reshape(-1)).float().reshape(n_query, k)
    if not bool(torch.isfinite(fine).all()):
        raise XvlmError("the re-ranking scores hold NaN or inf (is the model diverged?)")
    # Lift the re-ranked entries above every ITC score; the shift keeps their order among themselves.
    lifted = fine - fine.min() + itc_scores.max() + 1.0
    return itc_scores.scatter(1, top_idx, lifted)


def box_iou_pairs(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of row k's predicted box with row k's target box; both [K, 4] as (cx, cy, w, h) -> [K]."""
    if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != 4:
        raise XvlmError(f"boxes must both be [K, 4], got {tuple(pred.shape)} and {tuple(target.shape)}")
    a = box_convert(pred.float(), "cxcywh", "xyxy")
    b = box_convert(target.float(), "cxcywh", "xyxy")
    top_left = torch.maximum(a[:, :2], b[:, :2])
    bottom_right = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(dim=1)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def grounding_accuracy(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> float:
    """Fraction of rows whose predicted box has IoU >= threshold with the target box ((cx, cy, w, h), [K, 4])."""
    if pred.shape[0] == 0:
        raise XvlmError("grounding accuracy over zero region texts: the held-out split has no boxes")
    return float((box_iou_pairs(pred, target) >= threshold).float().mean())
