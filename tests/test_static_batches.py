"""Static-shape batches (shards/collate.py pad_batch): padded-and-masked losses and gradients equal the unpadded
ones (fp32, CPU, tiny), padded rows are never drawn as ITM negatives, and the pad step's errors."""
from __future__ import annotations

import pytest
import torch

from model.config import preset
from model.losses import sample_hard_negatives
from model.synthetic import image_text_batch, region_batch
from model.xvlm import build_model
from shards.collate import pad_batch

ALL_OBJECTIVES = ("itc", "itm", "mlm", "bbox", "giou")
VARIANTS = {
    "xvlm": {},
    "ours": {"itc_same_text": "ignore", "itm_positives": "same_box", "box_head": "softargmax"},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # conftest.py


def tiny_model(**overrides):
    torch.manual_seed(0)
    config = preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **overrides)
    return build_model(config).train()


def argmax_draws(weights: torch.Tensor, num_samples: int, generator=None) -> torch.Tensor:
    """A draw that depends on the weights only (the real one consumes RNG by the matrix size): the heaviest."""
    del num_samples, generator
    return weights.argmax(dim=1, keepdim=True)


def losses_and_grads(model, batch: dict, objectives) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    losses = model(objectives=objectives, **batch)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def ragged_region_batch(vocab: int, grid: int) -> dict[str, torch.Tensor]:
    """Three images with 3, 1 and 2 rows (the loader's packed batches vary so)."""
    full = region_batch(3, 3, 64, grid, vocab, max_tokens=16, max_masks=4, generator=torch.Generator().manual_seed(3))
    keep = torch.tensor([0, 1, 2, 3, 6, 7])
    out = {k: (v[keep] if k not in ("image",) else v) for k, v in full.items()}
    out["image_idx"] = torch.tensor([0, 0, 0, 1, 2, 2])
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_padded_losses_and_gradients_equal_unpadded(variant, monkeypatch):
    monkeypatch.setattr(torch, "multinomial", argmax_draws)
    model = tiny_model(**VARIANTS[variant])
    objectives = ALL_OBJECTIVES + (("centre",) if variant == "ours" else ())
    region = ragged_region_batch(model.config.vocab_size, model.grid_size)
    image_text = image_text_batch(5, 64, model.config.vocab_size, 16, 4, torch.Generator().manual_seed(4))
    for batch, rows, images in ((region, 10, 5), (image_text, 8, 8)):
        want_losses, want_grads = losses_and_grads(model, batch, objectives)
        padded = pad_batch(batch, rows, images)
        assert padded["row_mask"].tolist() == [True] * batch["text_ids"].shape[0] + [False] * (
            rows - batch["text_ids"].shape[0])
        got_losses, got_grads = losses_and_grads(model, padded, objectives)
        assert got_losses.keys() == want_losses.keys()
        for name, want in want_losses.items():
            torch.testing.assert_close(got_losses[name], want, rtol=1e-5, atol=1e-7, msg=f"{variant} {name}")
        assert got_grads.keys() == want_grads.keys()
        assert_grads_close(got_grads, want_grads, variant)


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    """Each gradient within 1e-5 of its norm. Gradients that are 0 in exact arithmetic (a key bias: softmax
    ignores a constant shift) hold only rounding noise, so the floor is 1e-7 of the largest gradient's norm."""
    floor = 1e-7 * max(float(w.norm()) for w in want.values())
    for name, w in want.items():
        err = float((got[name] - w).norm())
        assert err <= 1e-5 * float(w.norm()) + floor, f"{what} grad {name}: |diff| {err:.3g} |grad| {w.norm():.3g}"


def test_padded_rows_are_never_drawn_as_negatives():
    generator = torch.Generator().manual_seed(0)
    sim = torch.randn(8, 8, generator=generator) * 5
    row_mask = torch.tensor([True] * 3 + [False] * 5)
    for _ in range(50):
        neg_image, neg_text = sample_hard_negatives(sim, None, generator, row_mask)
        assert neg_image.max() < 3 and neg_text.max() < 3
        assert (neg_image[:3] != torch.arange(3)).all() and (neg_text[:3] != torch.arange(3)).all()


def test_pad_batch_errors_and_full_batches():
    batch = image_text_batch(4, 64, 2000, 8, 2)
    with pytest.raises(ValueError, match="does not fit the padded shape"):
        pad_batch(batch, 3, 3)
    with pytest.raises(ValueError, match="one row per image"):
        pad_batch(batch, 6, 5)
    same = pad_batch(batch, 4, 4)
    assert same["image"] is batch["image"] and bool(same["row_mask"].all())


def test_giou_loss_equals_torchvision_value_and_gradient():
    from torchvision.ops import generalized_box_iou_loss

    from model.losses import giou_loss

    generator = torch.Generator().manual_seed(1)
    corner = torch.rand(64, 2, generator=generator)
    boxes = torch.cat([corner, corner + 0.05 + torch.rand(64, 2, generator=generator)], dim=1)
    corner = torch.rand(64, 2, generator=generator)
    target = torch.cat([corner, corner + 0.05 + torch.rand(64, 2, generator=generator)], dim=1)
    mine, theirs = boxes.clone().requires_grad_(), boxes.clone().requires_grad_()
    got, want = giou_loss(mine, target), generalized_box_iou_loss(theirs, target, reduction="none")
    assert bool((want > 1).any()) and bool((want < 1).any())   # disjoint and overlapping pairs both occur
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad)
