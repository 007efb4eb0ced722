"""Fine-tuning's same-image positives (X-VLM's `idx`): captions of one image are ITC positives, never ITM negatives."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import model.objectives as objectives
from model.config import preset
from model.losses import itc_loss
from model.synthetic import image_text_batch
from model.xvlm import build_model


def test_itc_with_distinct_ids_is_plain_itc_and_shared_ids_spread_the_target():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    temp = torch.tensor(0.1)
    plain = itc_loss(image, text, temp)
    assert torch.allclose(itc_loss(image, text, temp, image_ids=torch.arange(4)), plain)
    ids = torch.tensor([7, 7, 3, 5])
    logits = image @ text.t() / temp
    targets = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1., 0], [0, 0, 0, 1.]])
    by_hand = (-(logits.log_softmax(1) * targets).sum(1).mean() - (logits.t().log_softmax(1) * targets).sum(1).mean()) / 2
    assert torch.allclose(itc_loss(image, text, temp, image_ids=ids), by_hand)
    assert not torch.allclose(by_hand, plain)


def test_itm_never_draws_a_caption_of_the_same_image_as_a_negative(monkeypatch):
    torch.manual_seed(0)
    model = build_model(preset("tiny"))
    batch = image_text_batch(3, model.config.image_res, model.config.vocab_size)
    seen = []

    real = objectives.sample_hard_negatives

    def recording(sim, positives=None, generator=None, row_mask=None):
        seen.append(positives.clone())
        negatives = real(sim, positives, generator, row_mask)
        seen.append(negatives)
        return negatives

    monkeypatch.setattr(objectives, "sample_hard_negatives", recording)
    ids = torch.tensor([4, 4, 9])
    for _ in range(5):
        model("image_text", objectives=("itc", "itm"), image_ids=ids, image=batch["image"], text_ids=batch["text_ids"],
              text_atts=batch["text_atts"])
    assert torch.equal(seen[0], torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool))
    for neg_image, neg_text in seen[1::2]:
        assert neg_image[:2].tolist() == [2, 2] and neg_text[:2].tolist() == [2, 2]
        assert neg_image[2] in (0, 1) and neg_text[2] in (0, 1)
