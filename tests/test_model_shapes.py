"""Model shapes for the tiny and base presets, bidirectional text/fusion layers, and concept masks."""
from __future__ import annotations

import pytest
import torch

from model.concept import concept_embeds
from model.config import ModelConfig, preset
from model.synthetic import image_text_batch, patch_mask_for_boxes, region_batch
from model.xvlm import XVLM, build_model, same_box
from model.errors import ModelError


VOCAB = 1200


@pytest.fixture(scope="module")
def tiny() -> XVLM:
    torch.manual_seed(0)
    return build_model(preset("tiny", vocab_size=1200))


def test_tiny_losses_are_scalars_with_the_right_keys(tiny):
    grid = tiny.grid_size
    assert (grid, tiny.grid_stride) == (8, 8)
    losses = tiny(kind="image_text", **image_text_batch(4, 64, 1200), keys=["a"] * 4, sources=["coco"] * 4)
    assert sorted(losses) == ["itc", "itm", "mlm"]
    losses = tiny(kind="region", **region_batch(2, 3, 64, grid, 1200))
    assert sorted(losses) == ["bbox", "giou", "itc", "itm", "mlm"]
    assert all(v.shape == () and torch.isfinite(v) for v in losses.values())


def test_tiny_encoder_shapes(tiny):
    batch = region_batch(2, 3, 64, tiny.grid_size, 1200)
    embeds, feat = tiny.encode_image(batch["image"])
    assert embeds.shape == (2, 1 + 64, 64) and feat.shape == (2, 32)
    text, text_feat = tiny.encode_text(batch["text_ids"], batch["text_atts"])
    assert text.shape == (6, 12, 64) and text_feat.shape == (6, 32)
    assert torch.allclose(feat.norm(dim=-1), torch.ones(2)) and torch.allclose(text_feat.norm(dim=-1), torch.ones(6))
    concepts, atts, concept_feat = tiny.encode_concepts(embeds, batch["image_idx"], batch["patch_mask"])
    assert concepts.shape == (6, 65, 64) and atts.shape == (6, 65) and concept_feat.shape == (6, 32)
    assert tiny.itm_scores(concepts, atts, text, batch["text_atts"]).shape == (6,)
    boxes = tiny.predict_boxes(embeds[batch["image_idx"]], text, batch["text_atts"])
    assert boxes.shape == (6, 4) and bool(((boxes >= 0) & (boxes <= 1)).all())


def test_swin_tower_pools_its_cls_and_uses_the_final_stride():
    config = preset("tiny", vision_name="swin_tiny_patch4_window7_224", image_res=64,
                    vision_kwargs={"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2),
                                   "window_size": 2})
    model = build_model(config).eval()
    assert (model.grid_size, model.grid_stride) == (2, 32)
    embeds = model.vision(torch.randn(2, 3, 64, 64))
    assert embeds.shape == (2, 5, 128)
    assert torch.allclose(embeds[:, 0], embeds[:, 1:].mean(dim=1), atol=1e-6)
    losses = model(**region_batch(2, 2, 64, 2, config.vocab_size))
    assert all(torch.isfinite(v) for v in losses.values())


def _base_on_meta() -> tuple[XVLM, str]:
    """The base model on the meta device (shapes only, instant), or on the CPU where timm cannot build Swin on meta
    (timm 1.0.9, the low end of our range: its drop-path rates call .tolist() on a meta tensor)."""
    try:
        with torch.device("meta"):
            return build_model(preset("base")), "meta"
    except NotImplementedError:
        return build_model(preset("base")), "cpu"


def test_base_preset_shapes_and_parameter_count_on_meta():
    model, device = _base_on_meta()
    count = sum(p.numel() for p in model.parameters())
    assert 210e6 < count < 222e6, count      # the paper's ~216M
    assert (model.grid_size, model.grid_stride, model.vision.width) == (7, 32, 1024)
    assert model.fusion.layer[0].crossattention.self.key.in_features == 1024
    assert len(model.text.layer) == 6 and len(model.fusion.layer) == 6
    batch = {k: v.to(device) for k, v in region_batch(2, 2, 224, 7, 30522).items()}
    with torch.no_grad():
        embeds, feat = model.encode_image(batch["image"])
        text, text_feat = model.encode_text(batch["text_ids"], batch["text_atts"])
        concepts, atts, _ = model.encode_concepts(embeds, batch["image_idx"], batch["patch_mask"])
        scores = model.itm_scores(concepts, atts, text, batch["text_atts"])
        boxes = model.predict_boxes(embeds[batch["image_idx"]], text, batch["text_atts"])
    assert embeds.shape == (2, 50, 1024) and feat.shape == (2, 256)
    assert text.shape == (4, 12, 768) and text_feat.shape == (4, 256)
    assert concepts.shape == (4, 50, 1024) and scores.shape == (4,) and boxes.shape == (4, 4)


def _changed_positions(encode, ids: torch.Tensor, atts: torch.Tensor) -> torch.Tensor:
    """Which positions' outputs change when only the LAST real token changes."""
    other = ids.clone()
    last = int(atts.sum()) - 1
    other[0, last] = ids[0, last] + 1
    with torch.no_grad():
        diff = (encode(ids, atts) - encode(other, atts)).abs().amax(dim=-1)[0]
    return diff > 1e-6


def test_text_and_fusion_layers_are_bidirectional(tiny):
    tiny.eval()
    ids = torch.tensor([[101, 1100, 1101, 1102, 1103, 1104, 0, 0]])
    atts = (ids != 0).long()
    text_changed = _changed_positions(tiny.text, ids, atts)
    assert bool(text_changed[:5].all()), "an earlier token must see a later one in the text encoder"

    # Fusion alone: feed identical text-encoder states except at the last token.
    vision = torch.randn(1, 65, 64)
    vision_atts = torch.ones(1, 65)
    hidden = torch.randn(1, 8, 64)

    def fusion_only(ids_: torch.Tensor, atts_: torch.Tensor) -> torch.Tensor:
        h = hidden.clone()
        h[0, 5] += (ids_[0, 5] - 1104).float()       # the last real token differs between the two calls
        return tiny.fusion(h, atts_, vision, vision_atts)

    fusion_changed = _changed_positions(fusion_only, ids, atts)
    assert bool(fusion_changed[:5].all()), "an earlier token must see a later one in the fusion encoder"
    # Padding keys are masked: changing a padded position's state changes no real token.
    h2 = hidden.clone()
    h2[0, 7] += 5.0
    with torch.no_grad():
        same = tiny.fusion(hidden, atts, vision, vision_atts)[0, :6] - tiny.fusion(h2, atts, vision, vision_atts)[0, :6]
    assert float(same.abs().max()) < 1e-5
    tiny.train()


def test_concept_mask_hides_exactly_the_out_of_box_patches():
    grid, res = 8, 64
    boxes = torch.tensor([[8.0, 16.0, 20.0, 10.0],     # x 1..4 (ceil(28/8)=4), y 2..4 (ceil(26/8)=4)
                          [0.0, 0.0, 64.0, 64.0],      # the whole image
                          [60.0, 60.0, 1.0, 1.0]])     # a tiny box still covers one patch
    mask = patch_mask_for_boxes(boxes, res, grid)
    image = torch.randn(1, 1 + grid * grid, 5)
    embeds, atts = concept_embeds(image, torch.zeros(3, dtype=torch.long), mask)
    expected = torch.zeros(grid, grid)
    expected[2:4, 1:4] = 1
    assert torch.equal(atts[0, 1:].reshape(grid, grid), expected)
    assert atts[:, 0].eq(1).all()                                # the concept [CLS] is always visible
    assert atts[1, 1:].eq(1).all() and atts[2, 1:].sum() == 1
    patches = image[0, 1:]
    assert torch.allclose(embeds[0, 0], patches[expected.flatten().bool()].mean(dim=0))
    assert torch.allclose(embeds[1, 0], patches.mean(dim=0))
    assert torch.equal(embeds[:, 1:], patches.expand(3, -1, -1))
    # Masked patches get no attention: changing an out-of-box patch leaves row 0's fusion output unchanged.
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=1200)).eval()
    image_embeds = torch.randn(1, 65, 64)
    text = torch.randn(1, 6, 64)
    text_atts = torch.ones(1, 6)
    concept, concept_atts = concept_embeds(image_embeds, torch.zeros(1, dtype=torch.long), mask[:1])
    changed = image_embeds.clone()
    changed[0, 1 + 0] += 3.0                                     # patch (0, 0) lies outside box 0
    concept2, _ = concept_embeds(changed, torch.zeros(1, dtype=torch.long), mask[:1])
    with torch.no_grad():
        a = model.fusion(text, text_atts, concept, concept_atts)
        b = model.fusion(text, text_atts, concept2, concept_atts)
    assert float((a - b).abs().max()) < 1e-5
    inside = image_embeds.clone()
    inside[0, 1 + 2 * grid + 1] += 3.0                           # patch (2, 1) lies inside box 0
    concept3, _ = concept_embeds(inside, torch.zeros(1, dtype=torch.long), mask[:1])
    with torch.no_grad():
        c = model.fusion(text, text_atts, concept3, concept_atts)
    assert float((a - c).abs().max()) > 1e-4


def test_bad_inputs_raise_clear_errors(tiny):
    with pytest.raises(ModelError, match="empty patch_mask"):
        concept_embeds(torch.randn(1, 65, 4), torch.zeros(1, dtype=torch.long), torch.zeros(1, 64))
    with pytest.raises(ModelError, match="grid stride"):
        concept_embeds(torch.randn(1, 65, 4), torch.zeros(1, dtype=torch.long), torch.ones(1, 49))
    with pytest.raises(ModelError, match="unknown vision tower"):
        ModelConfig(vision_name="resnet50")
    with pytest.raises(ModelError, match="unknown model config keys"):
        preset("tiny", hiden_size=3)
    with pytest.raises(ModelError, match="box_head"):
        preset("tiny", box_head="detr")
    with pytest.raises(ModelError, match="itc_same_text must be 'negative' or 'ignore'"):
        preset("tiny", itc_same_text="positive")
    with pytest.raises(ModelError, match="does not match"):
        tiny(kind="region", **image_text_batch(2, 64, 1200))
    with pytest.raises(ModelError, match="unexpected batch keys"):
        tiny(**image_text_batch(2, 64, 1200), captions=["x"])


def test_objectives_compute_only_the_named_losses(tiny):
    region = region_batch(2, 3, 64, tiny.grid_size, 1200)
    tiny.eval()   # no dropout: the two calls must see the same network
    try:
        everything = tiny(**region)
        some = tiny(**region, objectives=["itc", "giou"])
    finally:
        tiny.train()
    assert sorted(some) == ["giou", "itc"]
    assert all(torch.equal(some[name], everything[name]) for name in some)
    assert sorted(tiny(**image_text_batch(3, 64, 1200), objectives={"itc", "bbox"})) == ["itc"]
    with pytest.raises(ModelError, match="objectives"):
        tiny(**region, objectives=["itc", "contrastive"])
    with pytest.raises(ModelError, match="objectives"):
        tiny(**region, objectives=[])


@pytest.mark.parametrize("head", ["softargmax", "dense"])
def test_centre_loss_trains_the_box_heads_attention(head):
    """Named, `centre` joins the region losses (image-text batches have none) and its gradient reaches the box
    head's attention and the vision tower; the other losses are unchanged by asking for it; the paper's head,
    which has no attention over the patches, refuses it."""
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=1200, box_head=head)).eval()
    region = region_batch(2, 3, 64, model.grid_size, 1200)
    losses = model(**region, objectives={"itc", "bbox", "giou", "centre"})
    assert sorted(losses) == ["bbox", "centre", "giou", "itc"] and torch.isfinite(losses["centre"])
    plain = model(**region, objectives={"itc", "bbox", "giou"})
    assert all(torch.equal(plain[name], losses[name]) for name in plain)
    losses["centre"].backward()
    for name in ("box_head.query.weight", "box_head.key.weight", "vision.backbone.pos_embed"):
        assert float(dict(model.named_parameters())[name].grad.abs().sum()) > 0, name
    assert sorted(model(**image_text_batch(3, 64, 1200), objectives={"itc", "centre"})) == ["itc"]
    paper = build_model(preset("tiny", vocab_size=1200, box_head="xvlm"))
    with pytest.raises(ModelError, match="centre loss trains the attention of a softargmax or dense box head"):
        paper(**region, objectives={"itc", "centre"})


def test_text_cls_mean_puts_the_mean_token_state_first():
    torch.manual_seed(0)
    plain = build_model(preset("tiny", vocab_size=1200)).eval()
    torch.manual_seed(0)
    pooled = build_model(preset("tiny", vocab_size=1200, text_cls="mean")).eval()
    ids = torch.randint(1, 1200, (3, 7))
    atts = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    hidden = plain.text(ids, atts)
    mean_hidden = pooled.text(ids, atts)
    assert torch.equal(mean_hidden[:, 1:], hidden[:, 1:])   # the same weights: only position 0 differs
    for row, length in enumerate((7, 5, 3)):
        assert torch.allclose(mean_hidden[row, 0], hidden[row, :length].mean(dim=0), atol=1e-6)
    with pytest.raises(ModelError, match="text_cls"):
        preset("tiny", text_cls="max")


def test_vit_without_class_token_pools_its_patches():
    config = preset("tiny", vision_kwargs={"patch_size": 8, "embed_dim": 64, "depth": 1, "num_heads": 2,
                                           "class_token": False, "global_pool": "avg"})
    model = build_model(config).eval()
    embeds = model.vision(torch.randn(2, 3, 64, 64))
    assert embeds.shape == (2, 1 + 64, 64)
    assert torch.allclose(embeds[:, 0], embeds[:, 1:].mean(dim=1), atol=1e-6)


def test_vit_with_conv_stem_tokenises_by_convolutions():
    """vit_convstem: the grid stride is the product of the stem's strides (2 each by default); tokens are the stem's output cells, so moving one
    pixel changes only the tokens whose receptive field holds it (before the transformer blocks)."""
    config = preset("tiny", vision_name="vit_convstem",
                    vision_kwargs={"embed_dim": 64, "depth": 1, "num_heads": 2, "stem_channels": [16, 32, 64]})
    model = build_model(config).eval()
    assert (model.grid_size, model.grid_stride) == (8, 8)
    stem = model.vision.backbone.patch_embed
    assert [m.stride for m in stem.modules() if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] * 3
    images = torch.randn(2, 3, 64, 64)
    assert model.vision(images).shape == (2, 1 + 64, 64)
    tokens = stem(images)
    nudged = images.clone()
    nudged[:, :, 60, 3] += 1.0                      # bottom-left corner: grid cell (row 7, column 0)
    changed = (stem(nudged) - tokens).abs().flatten(2).amax(dim=(0, 2)) > 0      # per token
    assert changed.reshape(8, 8)[7, 0] and changed.reshape(8, 8)[:5].sum() == 0 and changed.reshape(8, 8)[:, 3:].sum() == 0
    losses = build_model(config)(**region_batch(2, 2, 64, 8, config.vocab_size))
    assert all(torch.isfinite(v) for v in losses.values())
    two_stages = build_model(preset("tiny", vision_name="vit_convstem", vision_kwargs={"embed_dim": 64, "depth": 1,
                                                                                     "num_heads": 2, "stem_channels": [32, 48]}))
    assert (two_stages.grid_size, two_stages.grid_stride) == (16, 4)   # 48 -> 64 channels through a 1x1 projection
    deeper = build_model(preset("tiny", vision_name="vit_convstem", vision_kwargs={
        "embed_dim": 64, "depth": 1, "num_heads": 2, "stem_channels": [16, 16, 32, 32, 64], "stem_strides": [2, 1, 2, 1, 2]}))
    convs = [m.stride for m in deeper.vision.backbone.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [(2, 2), (1, 1), (2, 2), (1, 1), (2, 2)] and (deeper.grid_size, deeper.grid_stride) == (8, 8)
    for bad, match in (({"patch_size": 8}, "patch_size"), ({"stem_channels": []}, "stem_channels"),
                       ({"stem_channels": [16, 64], "stem_strides": [2]}, "stem_strides"),
                       ({"stem_channels": [16, 64], "stem_strides": [2, 3]}, "stem_strides")):
        with pytest.raises(ModelError, match=match):
            build_model(preset("tiny", vision_name="vit_convstem", vision_kwargs=bad))


def _two_rows_of_one_box(model) -> dict[str, torch.Tensor]:
    """A region batch of 2 texts about the same box of the same image (e.g. an object and its region caption)."""
    batch = region_batch(1, 2, 64, model.grid_size, VOCAB, with_whole_image=False)
    batch["patch_mask"][1] = batch["patch_mask"][0]
    batch["target_bbox"][1] = batch["target_bbox"][0]
    return batch


def test_itm_negatives_exclude_only_the_diagonal_by_default():
    """X-VLM's pretraining (no idx): a row's only excluded candidate is its own pair, so another text about the same
    box can be drawn as a negative; `itm_positives: same_box` (ours) excludes it too."""
    ours = build_model(preset("tiny", vocab_size=VOCAB, itm_positives="same_box"))
    official = build_model(preset("tiny", vocab_size=VOCAB))
    assert official.config.itm_positives == "diagonal"
    batch = _two_rows_of_one_box(official)
    losses = official(**batch, objectives={"itm"})        # each row's negative is the other row's pair
    assert torch.isfinite(losses["itm"])
    with pytest.raises(ModelError, match="every candidate is a positive"):
        ours(**batch, objectives={"itm"})                  # the other row is a positive: nothing left to draw


def test_same_box_marks_rows_of_the_same_image_and_patch_mask():
    image_idx = torch.tensor([0, 0, 0, 1])
    patch_mask = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 0]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(same_box(image_idx, patch_mask), expected)


@pytest.mark.parametrize("box_head", ["xvlm", "softargmax", "dense"])
def test_head_layer_norms_use_pytorchs_eps_and_bert_layers_berts(box_head):
    """X-VLM's ITM and box heads (build_mlp) use nn.LayerNorm's default eps 1e-5; BERT's own layers 1e-12. Our box
    heads follow the heads."""
    model = build_model(preset("tiny", vocab_size=VOCAB, box_head=box_head))
    norms = {name: module.eps for name, module in model.named_modules() if isinstance(module, torch.nn.LayerNorm)}
    heads = {name: eps for name, eps in norms.items() if name.startswith(("itm_head.", "box_head."))}
    bert = {name: eps for name, eps in norms.items() if name.startswith(("text.", "fusion.", "mlm_head."))}
    assert heads and set(heads.values()) == {1e-5}
    assert bert and set(bert.values()) == {1e-12}
