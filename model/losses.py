"""X-VLM's four objectives as plain functions: ITC (gathered across ranks), ITM hard negatives, MLM, box L1 + GIoU."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.ops import box_convert

from model.errors import ModelError


def _row_counts(x: torch.Tensor) -> list[int]:
    """Every rank's row count of `x` (ranks may hold different counts: region batches)."""
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    return [int(c) for c in counts]


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] == rows else torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


class _GatherLocalGrad(torch.autograd.Function):
    """All-gather of rows whose backward hands this rank only its own slice of the incoming gradient.

    This is X-VLM's convention (models/xvlm.py AllGather): every rank computes the loss over all ranks' rows, and
    a rank's features get the gradient of its own copy of that loss; DDP then averages parameter gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        parts = [torch.empty_like(_padded(x, max(sizes))) for _ in sizes]
        dist.all_gather(parts, _padded(x.contiguous(), max(sizes)))
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
        return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad[ctx.start:ctx.stop], None


def _gather_sum_grad(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    from torch.distributed.nn.functional import all_gather  # imported lazily: pulls in RPC machinery
    parts = all_gather(_padded(x, max(sizes)))
    return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)


def gather_with_grad(x: torch.Tensor, grad: str = "local", equal_rows: bool = False) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (rank order); the identity in a single process.

    grad "local" (X-VLM): the backward returns this rank's slice of its own gradient, so each rank's features get
    the gradient of its own loss. grad "sum" (open_clip, torch.distributed.nn semantics): the backward sums every
    rank's gradient into the local slice; each rank computes the same global loss, so after DDP averages parameter
    gradients they equal the single-process gradient of that loss on the global batch, N times the "local" one.
    `equal_rows` (padded batches: every rank holds the same fixed number of rows) skips exchanging the row counts,
    whose host read would break a compiled graph.
    """
    if grad not in ("local", "sum"):
        raise ModelError(f"gather grad must be 'local' or 'sum', got {grad!r}")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    sizes = [x.shape[0]] * dist.get_world_size() if equal_rows else _row_counts(x)
    return _GatherLocalGrad.apply(x, sizes) if grad == "local" else _gather_sum_grad(x, sizes)


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor,
             text_ids: torch.Tensor | None = None, gather_grad: str = "local",
             image_ids: torch.Tensor | None = None, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over L2-normalised features gathered from all ranks; row i of each side is a pair.

    `gather_grad` ("local" as X-VLM, or "sum") is the backward of the cross-rank gather (see gather_with_grad).
    With `text_ids` ([K, T], padded token ids), pairs (i, j != i) whose texts are identical are left out of both
    softmaxes: neither positive nor negative (X-VLM counts them as negatives, which pushes a repeated name away
    from every other image's instance of it). With `image_ids` ([K], fine-tuning on captions of the same image,
    X-VLM's `idx`), every pair of rows with the same id is a positive: the target of each row is spread evenly
    over its positives (models/xvlm.py get_contrastive_loss). `row_mask` ([K] bool, padded batches): rows where it
    is False are neither candidates nor averaged over, so the loss equals that of the real rows alone (fine-tuning
    batches are never padded: the two do not go together)."""
    if image_ids is not None and row_mask is not None:
        raise ModelError("itc_loss: image_ids (fine-tuning) and row_mask (padded pretraining batches) together")
    padded = row_mask is not None          # fixed shapes: the same row count on every rank
    image_all = gather_with_grad(image_feat, gather_grad, padded)
    text_all = gather_with_grad(text_feat, gather_grad, padded)
    logits = image_all @ text_all.t() / temp
    if image_ids is not None:
        ids = gather_with_grad(image_ids.reshape(-1), gather_grad)
        same = (ids[:, None] == ids[None, :]).to(logits.dtype)
        targets = same / same.sum(dim=1, keepdim=True)
        loss_i2t = -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
        loss_t2i = -(F.log_softmax(logits.t(), dim=1) * targets).sum(dim=1).mean()
        return (loss_i2t + loss_t2i) / 2
    labels = torch.arange(logits.shape[0], device=logits.device)
    if text_ids is not None:
        ids = gather_with_grad(text_ids, gather_grad, padded)
        same = (ids[:, None, :] == ids[None, :, :]).all(dim=-1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    if row_mask is not None:
        valid = gather_with_grad(row_mask.to(torch.uint8), gather_grad, padded).bool()
        # A padded row keeps its own pair only: finite softmax, ignored by the mean, no gradient.
        pairs = (valid[:, None] & valid[None, :]) | torch.eye(len(valid), dtype=torch.bool, device=valid.device)
        logits = logits.masked_fill(~pairs, float("-inf"))
        labels = labels.masked_fill(~valid, -100)
    return (F.cross_entropy(logits, labels, ignore_index=-100)
            + F.cross_entropy(logits.t(), labels, ignore_index=-100)) / 2


def sample_hard_negatives(sim_i2t: torch.Tensor, positives: torch.Tensor | None = None,
                          generator: torch.Generator | None = None,
                          row_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each text one negative image and for each image one negative text, drawn in proportion to
    softmax(similarity) with the positives excluded (X-VLM: weights = softmax + 1e-5, positives zeroed).

    sim_i2t [K, K] = image_feat @ text_feat.T / temp (local rows); positives [K, K] bool (default: the diagonal).
    Returns (neg_image_for_text [K], neg_text_for_image [K]) indices. `generator` (on sim's device) makes the draw
    reproducible; None uses the global torch RNG. `row_mask` ([K] bool, padded batches): padded rows are never drawn
    and leave the real rows' softmax as it is without them (their own draws are among the real rows, unused).
    Under torch.compile the check for rows without a candidate is left to the trainer's batch check (a
    data-dependent branch would break the graph).
    """
    k = sim_i2t.shape[0]
    if sim_i2t.shape != (k, k):
        raise ModelError(f"ITM needs a square similarity matrix, got {tuple(sim_i2t.shape)}")
    if positives is None:
        positives = torch.eye(k, dtype=torch.bool, device=sim_i2t.device)
    with torch.no_grad():
        sim_i2t, sim_t2i = sim_i2t.detach().float(), sim_i2t.detach().float().t()
        pos_i2t, pos_t2i = positives, positives.t()
        if row_mask is not None:
            valid = row_mask.bool()
            padded = ~valid[None, :]       # padded candidates: out of the softmax and never drawn
            sim_i2t, sim_t2i = sim_i2t.masked_fill(padded, float("-inf")), sim_t2i.masked_fill(padded, float("-inf"))
            # a padded row draws among all the real rows (its draw is unused)
            pos_i2t, pos_t2i = (pos_i2t & valid[:, None]) | padded, (pos_t2i & valid[:, None]) | padded
        weights_i2t = (sim_i2t.softmax(dim=1) + 1e-5).masked_fill(pos_i2t, 0.0)
        weights_t2i = (sim_t2i.softmax(dim=1) + 1e-5).masked_fill(pos_t2i, 0.0)
        empty = (weights_i2t.sum(dim=1) == 0).any() | (weights_t2i.sum(dim=1) == 0).any()
        if not sim_i2t.is_meta and not torch.compiler.is_compiling() and bool(empty):
            raise ModelError(f"ITM found a row whose every candidate is a positive (batch of {k} rows): "
                            "a batch needs at least 2 unrelated pairs")
        neg_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
        neg_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    return neg_image, neg_text


def itm_loss(logits: torch.Tensor, num_pos: int, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """2-way cross-entropy: the first `num_pos` rows of `logits` [P + Nn, 2] are matches, the rest are not.
    `row_weight` ([P + Nn], 1 real / 0 padded): the mean over the real rows only."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:num_pos] = 1
    if row_weight is None:
        return F.cross_entropy(logits, labels)
    weight = row_weight.to(torch.float32)
    return (F.cross_entropy(logits.float(), labels, reduction="none") * weight).sum() / weight.sum().clamp_min(1)


def mlm_loss(logits: torch.Tensor, masked_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the masked positions only: logits [K, M, V], masked_ids [K, M] with -100 on padding.

    A batch without any masked token gives 0 (not NaN).
    """
    flat_ids = masked_ids.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_ids, ignore_index=-100,
                            reduction="sum")
    return total / (flat_ids != -100).sum().clamp_min(1)


def giou_loss(boxes: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - GIoU per row of (x1, y1, x2, y2) boxes [K, 4]: torchvision's generalized_box_iou_loss (same eps, same
    value and gradient), its intersection written with clamps instead of a boolean-mask assignment, whose
    data-dependent shape breaks a compiled graph."""
    x1, y1, x2, y2 = boxes.unbind(dim=-1)
    x1g, y1g, x2g, y2g = target.unbind(dim=-1)
    inter_w = (torch.min(x2, x2g) - torch.max(x1, x1g)).clamp_min(0)
    inter = inter_w * (torch.min(y2, y2g) - torch.max(y1, y1g)).clamp_min(0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    enclosing = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (iou - (enclosing - union) / (enclosing + eps))


def box_losses(pred: torch.Tensor, target: torch.Tensor, is_region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, GIoU loss) on (cx, cy, w, h) boxes: L1 summed over the 4 coordinates and GIoU loss = 1 - GIoU, both
    averaged over the region rows (`is_region` [K] bool). No region rows -> (0, 0), finite, still in the graph.
    """
    weight = is_region.to(pred.dtype)
    count = weight.sum().clamp_min(1)
    l1 = (F.l1_loss(pred.float(), target.float(), reduction="none").sum(dim=1) * weight).sum() / count
    # Rows that do not count get a harmless target, so that degenerate boxes there cannot produce NaN.
    safe_target = torch.where(is_region[:, None], target.float(), pred.detach().float())
    giou = giou_loss(box_convert(pred.float(), "cxcywh", "xyxy"), box_convert(safe_target, "cxcywh", "xyxy"))
    giou = torch.where(is_region, giou, torch.zeros_like(giou))
    return l1, giou.sum() / count


def centre_loss(logits: torch.Tensor, target: torch.Tensor, is_region: torch.Tensor, grid: int) -> torch.Tensor:
    """Cross-entropy of the box head's attention logits over the patches ([K, grid * grid], row-major (y, x)) with
    the patch that holds the target box's centre ((cx, cy, w, h) in [0, 1]) as the class, averaged over the region
    rows (`is_region` [K] bool). No region rows -> 0, finite, still in the graph.

    Ours, not X-VLM's: the L1 + GIoU gradient reaches the attention only through the weighted mean of the patches'
    boxes, weakly while those boxes are alike; this names the patch to attend to directly (the centre heatmap of
    CenterNet / FCOS-style detectors, one positive per text)."""
    cells = (target[:, :2].float() * grid).long().clamp(0, grid - 1)
    labels = cells[:, 1] * grid + cells[:, 0]
    weight = is_region.to(logits.dtype)
    per_row = F.cross_entropy(logits.float(), labels, reduction="none")
    return (per_row * weight).sum() / weight.sum().clamp_min(1)
