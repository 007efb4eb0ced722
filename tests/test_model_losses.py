"""The X-VLM losses against hand computations and torchvision, and the hard-negative sampler's guarantees."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

from model.losses import box_losses, itc_loss, itm_loss, mlm_loss, sample_hard_negatives
from model.errors import ModelError


def test_box_losses_match_hand_values():
    pred = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]])
    target = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.4, 0.3, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]])
    is_region = torch.tensor([True, True, False])
    l1, giou = box_losses(pred, target, is_region)
    # row 0 identical; row 1 shifted by 0.1 in x: L1 = 0.1; boxes [0.2,0.2,0.4,0.4] vs [0.3,0.2,0.5,0.4]:
    # inter 0.1*0.2 = 0.02, union 0.04+0.04-0.02 = 0.06, IoU = 1/3, hull 0.3*0.2 = 0.06 -> GIoU = 1/3.
    assert math.isclose(float(l1), (0.0 + 0.1) / 2, rel_tol=1e-5)
    assert math.isclose(float(giou), (0.0 + (1 - 1 / 3)) / 2, rel_tol=1e-5)


def test_box_losses_match_torchvision_on_random_boxes():
    g = torch.Generator().manual_seed(3)
    pred = torch.cat([torch.rand(20, 2, generator=g), 0.05 + 0.5 * torch.rand(20, 2, generator=g)], dim=1)
    target = torch.cat([torch.rand(20, 2, generator=g), 0.05 + 0.5 * torch.rand(20, 2, generator=g)], dim=1)
    is_region = torch.rand(20, generator=g) > 0.3
    l1, giou = box_losses(pred, target, is_region)
    sel = is_region
    expected_l1 = (pred[sel] - target[sel]).abs().sum() / sel.sum()
    giou_matrix = generalized_box_iou(box_convert(pred[sel], "cxcywh", "xyxy"), box_convert(target[sel], "cxcywh", "xyxy"))
    expected_giou = (1 - giou_matrix.diagonal()).sum() / sel.sum()
    assert torch.allclose(l1, expected_l1, atol=1e-6) and torch.allclose(giou, expected_giou, atol=1e-6)


def test_box_losses_without_region_rows_are_zero_finite_and_differentiable():
    pred = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 1.0, 1.0]], requires_grad=True)  # even degenerate boxes
    target = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0]])
    l1, giou = box_losses(pred, target, torch.tensor([False, False]))
    assert l1.item() == 0.0 and giou.item() == 0.0
    (l1 + giou).backward()
    assert torch.isfinite(pred.grad).all() and float(pred.grad.abs().sum()) == 0.0


def test_itc_matches_a_plain_computation():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    temp = torch.tensor(0.07)
    loss = itc_loss(image, text, temp)
    sim = (image @ text.t() / 0.07).double()
    i2t = -torch.stack([sim[i].log_softmax(0)[i] for i in range(6)]).mean()
    t2i = -torch.stack([sim[:, i].log_softmax(0)[i] for i in range(6)]).mean()
    assert math.isclose(float(loss), float((i2t + t2i) / 2), rel_tol=1e-5)


def test_itc_leaves_identical_texts_out_of_both_softmaxes():
    """Rows 0, 2 and 4 share a text ("hexagon"): with text_ids, the pairs among them are neither positive nor
    negative; every other pair counts as before. Without text_ids they are negatives (X-VLM)."""
    g = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    ids = torch.tensor([[101, 7, 0], [101, 8, 9], [101, 7, 0], [101, 8, 0], [101, 7, 0], [101, 9, 0]])
    same = {0: (2, 4), 2: (0, 4), 4: (0, 2)}
    sim = (image @ text.t() / 0.07).double()

    def nll(scores: torch.Tensor, i: int) -> torch.Tensor:
        keep = [j for j in range(6) if j not in same.get(i, ())]
        return -scores[keep].log_softmax(0)[keep.index(i)]

    i2t = torch.stack([nll(sim[i], i) for i in range(6)]).mean()
    t2i = torch.stack([nll(sim[:, i], i) for i in range(6)]).mean()
    loss = itc_loss(image, text, torch.tensor(0.07), ids)
    assert math.isclose(float(loss), float((i2t + t2i) / 2), rel_tol=1e-5)
    plain = itc_loss(image, text, torch.tensor(0.07))
    assert float(loss) < float(plain)                # the left-out pairs were negatives before
    distinct = torch.arange(6)[:, None].expand(6, 3)   # no two texts alike: the same as X-VLM's loss
    assert torch.allclose(itc_loss(image, text, torch.tensor(0.07), distinct), plain)


def test_itm_and_mlm_losses():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [3.0, 0.0]])
    expected = (F.cross_entropy(logits[:1], torch.tensor([1])) + F.cross_entropy(logits[1:], torch.tensor([0, 0])) * 2) / 3
    assert torch.allclose(itm_loss(logits, num_pos=1), expected)
    mlm_logits = torch.randn(2, 3, 10)
    ids = torch.tensor([[4, -100, -100], [7, 2, -100]])
    expected = F.cross_entropy(mlm_logits[ids != -100], ids[ids != -100])
    assert torch.allclose(mlm_loss(mlm_logits, ids), expected)
    assert float(mlm_loss(mlm_logits, torch.full((2, 3), -100))) == 0.0   # no masked token: 0, not NaN


def test_hard_negatives_never_draw_a_positive():
    g = torch.Generator().manual_seed(0)
    k = 8
    # Positives scored far above everything: a sampler that ignored the mask would pick them almost always.
    sim = torch.randn(k, k, generator=g) + 50 * torch.eye(k)
    positives = torch.eye(k, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True          # extra positives (same box, two texts)
    sim[0, 1] = sim[1, 0] = 50.0
    for _ in range(50):
        neg_image, neg_text = sample_hard_negatives(sim, positives, generator=g)
        assert not positives[neg_image, torch.arange(k)].any()   # (image neg_image[t], text t)
        assert not positives[torch.arange(k), neg_text].any()    # (image i, text neg_text[i])


def test_hard_negatives_follow_the_similarity_and_the_generator():
    sim = torch.zeros(4, 4)
    sim[0, 3] = 10.0          # text 3 is by far the hardest negative for image 0, image 0 for text 3
    a = sample_hard_negatives(sim, generator=torch.Generator().manual_seed(5))
    b = sample_hard_negatives(sim, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    text_counts, image_counts = torch.zeros(4), torch.zeros(4)
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        neg_image, neg_text = sample_hard_negatives(sim, generator=g)
        text_counts[neg_text[0]] += 1
        image_counts[neg_image[3]] += 1
    assert text_counts[3] > 90 and image_counts[0] > 90


def test_hard_negatives_need_two_unrelated_rows():
    with pytest.raises(ModelError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1))
