"""The box heads read the box off the image: the soft-argmax heads put the centre where the text attends, and the
dense head adds the attended patch's own offset and size; the centre loss trains that attention directly."""
from __future__ import annotations

import math

import torch

from model.heads import DenseBoxHead, SoftArgmaxBoxHead, patch_centres
from model.losses import centre_loss

GRID, HIDDEN, WIDTH = 4, 32, 24


def peaked(head, target: int, rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs under which the head's attention is all on patch `target`: its key alone aligns with the query."""
    torch.manual_seed(0)
    patches = torch.zeros(rows, GRID * GRID, WIDTH)
    patches[:, target, 0] = 1.0
    fused = torch.randn(rows, HIDDEN)
    with torch.no_grad():
        head.key.weight.zero_()
        head.key.bias.zero_()
        head.key.weight[:, 0] = 1.0
        head.query.weight.zero_()
        head.query.bias.fill_(1000.0)           # logits: 0 + pos . q elsewhere, huge on the target patch
        head.pos_embed.zero_()
    return fused, patches


def test_soft_argmax_head_centres_on_the_attended_patch():
    head = SoftArgmaxBoxHead(HIDDEN, WIDTH, GRID)
    fused, patches = peaked(head, target=6)
    box = head(fused, patches)
    offset = head.offset(fused).tanh() / GRID
    torch.testing.assert_close(box[:, :2], patch_centres(GRID)[6].expand(3, 2) + offset)
    assert ((box[:, 2:] > 0) & (box[:, 2:] < 1)).all()


def test_dense_head_takes_the_attended_patch_box_and_its_offset_reaches_two_patches():
    head = DenseBoxHead(HIDDEN, WIDTH, GRID)
    fused, patches = peaked(head, target=9)
    final = head.regress[-1]
    with torch.no_grad():
        final.weight.zero_()
        final.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0]))
    box = head(fused, patches)
    torch.testing.assert_close(box, torch.cat([patch_centres(GRID)[9], torch.tensor([0.5, 0.5])]).expand(3, 4))
    with torch.no_grad():
        final.bias.copy_(torch.tensor([20.0, -20.0, 2.0, -2.0]))   # tanh -> +1 / -1: two patches right and up
    box = head(fused, patches)
    expected = patch_centres(GRID)[9] + torch.tensor([2.0, -2.0]) / GRID
    torch.testing.assert_close(box[:, :2], expected.expand(3, 2))
    torch.testing.assert_close(box[:, 2:], torch.tensor([2.0, -2.0]).sigmoid().expand(3, 2))


def test_dense_head_averages_the_patch_boxes_by_attention():
    torch.manual_seed(1)
    head = DenseBoxHead(HIDDEN, WIDTH, GRID)
    fused, patches = torch.randn(5, HIDDEN), torch.randn(5, GRID * GRID, WIDTH)
    box = head(fused, patches)
    keys = head.key(patches) + head.pos_embed
    weights = torch.einsum("knd,kd->kn", keys, head.query(fused)).div(keys.shape[-1] ** 0.5).softmax(-1)
    per_patch = head.regress(head.patch_in(patches) + head.text_in(fused)[:, None])
    centres = patch_centres(GRID) + per_patch[..., :2].tanh() * 2.0 / GRID
    expected = (weights[..., None] * torch.cat([centres, per_patch[..., 2:].sigmoid()], -1)).sum(1)
    torch.testing.assert_close(box, expected)


def test_boxes_and_logits_are_the_forward_and_its_attention():
    """One attention pass gives both: the boxes equal forward()'s, the logits' softmax is attention()."""
    for head in (SoftArgmaxBoxHead(HIDDEN, WIDTH, GRID), DenseBoxHead(HIDDEN, WIDTH, GRID)):
        torch.manual_seed(1)
        fused, patches = torch.randn(5, HIDDEN), torch.randn(5, GRID * GRID, WIDTH)
        boxes, logits = head.boxes_and_logits(fused, patches)
        torch.testing.assert_close(boxes, head(fused, patches))
        torch.testing.assert_close(logits.softmax(-1), head.attention(fused, patches))


def test_centre_loss_is_the_cross_entropy_on_the_centre_patch():
    """Hand case on a 4x4 grid: a box centred at (0.6, 0.3) lies in patch (x 2, y 1) = 6; whole-image rows do
    not count; rows with no region give 0 that still backpropagates."""
    logits = torch.zeros(3, GRID * GRID, requires_grad=True)
    with torch.no_grad():
        logits[0, 6] = 2.0
        logits[1, 0] = 5.0
    target = torch.tensor([[0.6, 0.3, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 1.0, 1.0]])
    is_region = torch.tensor([True, True, False])
    loss = centre_loss(logits, target, is_region, GRID)
    row0 = -(2.0 - math.log(math.exp(2.0) + 15))
    row1 = -(5.0 - math.log(math.exp(5.0) + 15))
    assert math.isclose(loss.item(), (row0 + row1) / 2, rel_tol=1e-5)
    edge = centre_loss(logits, torch.tensor([[1.0, 1.0, 0.1, 0.1]] * 3), torch.tensor([True, False, False]), GRID)
    assert math.isclose(float(edge), -(0.0 - math.log(math.exp(2.0) + 15)), rel_tol=1e-5)   # cell 15, clamped
    none = centre_loss(logits, target, torch.zeros(3, dtype=torch.bool), GRID)
    none.backward()
    assert float(none) == 0.0 and torch.isfinite(logits.grad).all()
