"""Image normalization: pass-through, conversions, resizing, rejects with their reasons, and box mapping."""
from __future__ import annotations

import io
import math
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.images import (ImageConfig, ImageReader, ImageReject, annotation_scale, map_box, normalize_image,
                             stored_size)


def _picture(width: int = 300, height: int = 200) -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = (250, 10, 10)   # a red top-left quarter, to check orientation
    return Image.fromarray(pixels, "RGB")


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


CONFIG = ImageConfig(max_side=256, jpeg_quality=90)


@pytest.mark.parametrize("progressive", [False, True])
def test_small_rgb_jpeg_passes_through_byte_for_byte(progressive):
    data = _encode(_picture(200, 120), "JPEG", quality=85, progressive=progressive)
    stored = normalize_image(data, CONFIG)
    assert stored.passthrough and stored.jpeg == data
    assert (stored.width, stored.height) == (200, 120)


def test_large_jpeg_is_resized_to_max_side_with_high_quality():
    source = _picture(640, 480)
    stored = normalize_image(_encode(source, "JPEG", quality=95), CONFIG)
    assert not stored.passthrough
    assert (stored.width, stored.height) == (256, 192) == _decoded(stored.jpeg).size
    assert (stored.source_width, stored.source_height) == (640, 480)
    # The red quarter is still the top-left quarter after resizing (no rotation, no crop).
    pixels = np.asarray(_decoded(stored.jpeg))
    assert pixels[20:80, 20:100, 0].mean() > 200 and pixels[20:80, 20:100, 1].mean() < 60


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("L", "JPEG"), ("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"),
                                      ("LA", "PNG"), ("1", "PNG"), ("RGB", "PNG"), ("RGB", "WEBP")])
def test_other_modes_and_formats_become_rgb_jpeg(mode, fmt):
    data = _encode(_picture(120, 90).convert(mode), fmt)
    stored = normalize_image(data, CONFIG)
    out = _decoded(stored.jpeg)
    assert not stored.passthrough and out.format == "JPEG" and out.mode == "RGB" and out.size == (120, 90)


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))          # fully transparent black
    stored = normalize_image(_encode(rgba, "PNG"), CONFIG)
    assert np.asarray(_decoded(stored.jpeg)).min() >= 250


def test_16_bit_grayscale_keeps_its_full_range():
    ramp = (np.tile(np.linspace(0, 65535, 64), (32, 1))).astype(np.uint16)
    data = _encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels = np.asarray(_decoded(normalize_image(data, CONFIG).jpeg))[..., 0]
    assert pixels[:, :4].mean() < 15 and pixels[:, -4:].mean() > 240     # not clipped to all-white


def test_exif_orientation_is_not_applied_and_tag_is_dropped():
    source = _picture(200, 100)
    exif = Image.Exif()
    exif[0x0112] = 6                                          # "rotate 90 CW to display"
    data = _encode(source, "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == 6
    stored = normalize_image(data, CONFIG)
    out = _decoded(stored.jpeg)
    assert not stored.passthrough
    assert out.size == (200, 100)                             # stored frame, not rotated to 100x200
    assert out.getexif().get(0x0112) is None                  # no reader can rotate it away from its boxes
    assert np.asarray(out)[5:40, 5:80, 0].mean() > 200        # the red quarter stays top-left


def test_truncated_jpeg_is_rejected_as_truncated():
    data = _encode(_picture(200, 120), "JPEG", quality=90)
    with pytest.raises(ImageReject) as err:
        normalize_image(data[: len(data) * 2 // 3], CONFIG)
    assert err.value.reason == "truncated_image"


def test_truncated_large_jpeg_is_rejected_too():
    data = _encode(_picture(640, 480), "JPEG", quality=90)
    with pytest.raises(ImageReject) as err:
        normalize_image(data[: len(data) // 2], CONFIG)
    assert err.value.reason == "truncated_image"


@pytest.mark.parametrize("data", [b"<!DOCTYPE html><html><body>404 Not Found</body></html>", b"", b"\xff\xd8\xff"])
def test_bytes_that_are_not_an_image_are_rejected(data):
    with pytest.raises(ImageReject) as err:
        normalize_image(data, CONFIG)
    assert err.value.reason in ("not_an_image", "truncated_image")
    if data.startswith(b"<"):
        assert err.value.reason == "not_an_image"


def test_decompression_bomb_header_is_rejected_before_decoding():
    # A 20000x20000 PNG of one colour compresses to a few hundred KB: the header declares 400 M pixels.
    big = _encode(Image.new("L", (6000, 6000)), "PNG")
    with pytest.raises(ImageReject) as err:
        normalize_image(big, ImageConfig(max_side=256, max_pixels=10_000_000))
    assert err.value.reason == "decompression_bomb"
    assert "36000000" in err.value.detail
    assert Image.MAX_IMAGE_PIXELS is not None                 # Pillow's own protection stays on


def test_stored_size_never_enlarges():
    assert stored_size(100, 50, 512) == (100, 50)
    assert stored_size(1024, 512, 512) == (512, 256)
    assert stored_size(3, 5000, 512) == (1, 512)


def test_annotation_scale_rescales_same_aspect_and_rejects_other_aspect():
    assert annotation_scale((None, None), (640, 480)) == (1.0, 1.0)
    assert annotation_scale((640, 480), (640, 480)) == (1.0, 1.0)
    assert annotation_scale((1280, 960), (640, 480)) == (0.5, 0.5)
    with pytest.raises(ImageReject) as err:
        annotation_scale((480, 640), (640, 480))
    assert err.value.reason == "image_size_mismatch"


def test_map_box_scales_clips_and_rejects():
    ok = map_box([100, 50, 200, 100], (0.5, 0.5), (320, 240))
    assert ok.bbox == [50.0, 25.0, 100.0, 50.0] and not ok.clipped
    clipped = map_box([-20, 10, 60, 30], (1.0, 1.0), (100, 100))
    assert clipped.bbox == [0.0, 10.0, 40.0, 30.0] and clipped.clipped
    assert map_box([150, 10, 20, 20], (1.0, 1.0), (100, 100)).reason == "box_outside"
    for bad in ([1, 2, 0, 5], [1, 2, -3, 5], [1, math.nan, 3, 3], [1, 2, math.inf, 3], [1, 2, 3], None):
        assert map_box(bad, (1.0, 1.0), (100, 100)).reason == "bad_box"


def test_reader_reads_tar_members_and_refuses_links(tmp_path):
    path = tmp_path / "images.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.jpg", "b.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(name[:1].encode() * 4))
        link = tarfile.TarInfo("c.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    reader = ImageReader()
    assert reader.read(f"{path}#b.jpg") == b"bbbb"
    assert reader.read(f"{path}#a.jpg") == b"aaaa"             # behind the stream position: reopened
    with pytest.raises(ImageReject) as err:
        reader.read(f"{path}#c.jpg")
    assert err.value.reason == "unsafe_tar_member"
    with pytest.raises(ImageReject) as err:
        reader.read(f"{path}#zzz.jpg")
    assert err.value.reason == "missing_image"
    with pytest.raises(ImageReject) as err:
        reader.read(str(tmp_path / "nope.jpg"))
    assert err.value.reason == "missing_image"
    reader.close()


def test_fast_jpeg_header_check_agrees_with_pillow():
    from pipeline.images import _can_pass_through, jpeg_passthrough_size

    picture = _picture(200, 120)
    rotated, upright = Image.Exif(), Image.Exif()
    rotated[0x0112], upright[0x0112] = 8, 1
    full = _encode(picture, "JPEG", quality=80)
    cases = {
        "baseline": full, "progressive": _encode(picture, "JPEG", progressive=True),
        "optimized": _encode(picture, "JPEG", optimize=True), "gray": _encode(picture.convert("L"), "JPEG"),
        "cmyk": _encode(picture.convert("CMYK"), "JPEG"), "rotated": _encode(picture, "JPEG", exif=rotated.tobytes()),
        "upright": _encode(picture, "JPEG", exif=upright.tobytes()), "too_big": _encode(_picture(300, 120), "JPEG"),
        "truncated": full[:-100], "png": _encode(picture, "PNG"),
    }
    for name, data in cases.items():
        fast = jpeg_passthrough_size(data, CONFIG)
        try:
            image = Image.open(io.BytesIO(data))
            slow = _can_pass_through(image, data, CONFIG.max_side)
        except OSError:
            slow = False
        assert (fast is not None) == slow, name
        if fast is not None:
            assert fast == image.size, name
    assert jpeg_passthrough_size(full, ImageConfig(max_side=256, max_pixels=1000)) is None   # bomb limit
