"""Image side of a training sample: decode (DCT-scaled when the output is smaller), crop + resize, flip,
X-VLM's RandAugment(2, 7), CLIP normalisation to a float32 CHW tensor. Every random draw comes from the numpy
Generator passed in, so the same generator state gives the same output bytes.

After the resize a sample's pixels are a uint8 [H, W, 3] numpy array, and the flip and RandAugment run on it with
OpenCV and numpy lookup tables, as X-VLM's own RandomAugment does (its randaugment.py is numpy + cv2): 3-6x
faster than Pillow's affine, rotate and sharpness ops, and no Pillow image is made per sample.
"""
from __future__ import annotations

import io
import math
import warnings

import cv2
import numpy as np
import torch
from PIL import Image

from shards.boxes import Crop
from shards.loader_config import LoaderConfig

try:        # libjpeg-turbo without Pillow's overhead (decodes in ~0.6x the time); optional: else Pillow + draft()
    import simplejpeg
except ImportError:         # pragma: no cover - depends on the environment
    simplejpeg = None

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FILL = (128, 128, 128)       # X-VLM's replace value for pixels that geometric ops uncover

# X-VLM's op lists: regions get only photometric ops, since geometric ones would move the boxes.
PHOTOMETRIC_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness")
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
IMAGE_TEXT_OPS = PHOTOMETRIC_OPS + GEOMETRIC_OPS
MAX_LEVEL = 10.0
# Pillow's ImageFilter.SMOOTH, the blur that Sharpness blends away from (as Pillow and X-VLM do)
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0

# One OpenCV thread per process: DataLoader workers are the loader's parallelism, and on 224 px images cv2's own
# threads only add contention.
cv2.setNumThreads(1)


# attribute of an image opened here from bytes: the encoded bytes (PIL images are unhashable: no side table)
_ENCODED = "_xvlm_encoded"


def open_image(data: bytes | Image.Image) -> Image.Image:
    """A lazily decoded image (header read only); Pillow's decompression-bomb and truncation checks stay on.
    Opened from bytes, the image keeps them (`_ENCODED`) so crop_resize can hand them to simplejpeg."""
    if isinstance(data, Image.Image):
        return data
    image = Image.open(io.BytesIO(data))
    setattr(image, _ENCODED, bytes(data))
    return image


def _dct_scale(crop: Crop, out_w: int, out_h: int) -> int:
    """The smallest n of 1, 2, 4, 8 (decoding at n/8) at which the crop still has at least out_w x out_h pixels.
    libjpeg-turbo also scales by 3/8, 5/8, 6/8 and 7/8, but those IDCTs have no SIMD code: measured at 512 and
    1024 px they decode 1.5-2.2x slower than n = 8 and cost more than the smaller resize saves."""
    n = 1
    while n < 8 and (crop[2] * n / 8 < out_w or crop[3] * n / 8 < out_h):
        n *= 2
    return n


def _simplejpeg_array(image: Image.Image, crop: Crop, out_w: int, out_h: int,
                      colorspace: str = "RGBX") -> tuple[np.ndarray, float] | None:
    """(uint8 [H, W, 4] RGBX pixels, or [H, W, 3] with colorspace "RGB", decoded by simplejpeg at n/8 scale, n/8), or
    None when simplejpeg is missing, the image was not opened here from bytes, is not a YCbCr/gray JPEG (CMYK goes
    through Pillow's conversion), or simplejpeg rejects the bytes (it is strict about damage libjpeg only warns
    about: Pillow then decides)."""
    data = getattr(image, _ENCODED, None)
    if simplejpeg is None or data is None or image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None
    width, height = image.size
    n = _dct_scale(crop, out_w, out_h)
    try:
        # RGBX: Pillow keeps RGB with a pad byte, so these pixels can be mapped into an image without a copy;
        # RGB: torch's resize kernel reads 3 packed channels ~1.8x faster than 3 of 4
        pixels = simplejpeg.decode_jpeg(data, colorspace=colorspace, min_width=math.ceil(width * n / 8),
                                        min_height=math.ceil(height * n / 8))
    except ValueError:
        return None
    # libjpeg scales by n/8 and rounds the size up: recover the n it took from the size it produced, so that
    # pixel i of the decoded image covers source pixels [i*8/n, (i+1)*8/n) exactly
    got_h, got_w = pixels.shape[:2]
    for taken in range(n, 9):
        if (got_w, got_h) == (math.ceil(width * taken / 8), math.ceil(height * taken / 8)):
            return pixels, taken / 8
    raise RuntimeError(f"unexpected simplejpeg size {got_w}x{got_h} for {width}x{height} at {n}/8")


def _as_rgbx_image(pixels: np.ndarray) -> Image.Image:
    """uint8 [H, W, 4] RGBX pixels mapped into a Pillow image without a copy."""
    return Image.frombuffer("RGBX", (pixels.shape[1], pixels.shape[0]), pixels, "raw", "RGBX", 0, 1)


def _draft_scale(image: Image.Image, crop: Crop, out_w: int, out_h: int) -> int:
    """Ask the JPEG decoder for 1/2, 1/4 or 1/8 size when the crop still has at least the output size there;
    returns the factor the decoder took (1 when none)."""
    if getattr(image, "format", None) != "JPEG":
        return 1      # draft() only helps JPEG; an already decoded JPEG ignores it (size unchanged -> k = 1)
    factor = 8 // _dct_scale(crop, out_w, out_h)      # the same scale rule as the simplejpeg path
    if factor == 1:
        return 1
    width, height = image.size
    # Pillow takes the scale min(width // w, height // h): ask for the floor, since asking for the rounded-up
    # size of an odd-sized image (801 -> 401) would get the next larger scale
    image.draft(image.mode if image.mode in ("RGB", "L") else "RGB", (width // factor, height // factor))
    # libjpeg scales by 1/k and rounds the size up; recover k from the size it actually produced
    for k in (8, 4, 2, 1):
        if image.size == (math.ceil(width / k), math.ceil(height / k)):
            return k
    raise RuntimeError(f"unexpected JPEG draft size {image.size} for {width}x{height}")


def resize_pixels(pixels: np.ndarray, box: tuple[int, int, int, int], out_w: int, out_h: int) -> np.ndarray:
    """The integer box (x0, y0, x1, y1) of uint8 [H, W, C] pixels (C = 3 RGB, or 4 RGBX whose 4th byte is dropped)
    resized to out_w x out_h, bicubic with antialiasing: uint8 [out_h, out_w, 3], C-contiguous.

    torch's uint8 kernel (vectorised; what torchvision's tensor RandomResizedCrop runs) does Pillow's resampling in
    0.4-0.5x Pillow's time: the same filter (bicubic, a = -0.5, support widened by the scale when shrinking),
    pixels equal to Pillow's but for rounding (mean |difference| 0.006 of 255 on photo-like pictures, at most a few
    levels on sharp edges where Pillow clips its overshoot), except on the output's outermost pixels: there
    Pillow's kernel also reads the pixels just outside the box, while torch, given the box alone, repeats its
    edge (up to ~10 levels where a sharp edge lies just outside). The box is copied to packed RGB first: the
    kernel's vectorised path wants contiguous channels-last input. Measured in bench/bench_loader.py; see
    docs/loader.md."""
    x0, y0, x1, y1 = box
    packed = np.ascontiguousarray(pixels[y0:y1, x0:x1, :3])   # packed HWC, read as channels-last NCHW
    with warnings.catch_warnings():   # read-only pixels (simplejpeg's, Pillow's) are only read here
        warnings.simplefilter("ignore", UserWarning)
        region = torch.from_numpy(packed)
    out = torch.nn.functional.interpolate(region.permute(2, 0, 1)[None], size=(out_h, out_w), mode="bicubic",
                                          align_corners=False, antialias=True)[0]
    return cv2.merge(tuple(out.numpy()))    # planes -> packed HWC: ~20x faster than a transposing copy


def crop_resize(image: Image.Image, crop: Crop, out_w: int, out_h: int, use_draft: bool = True) -> np.ndarray:
    """The crop (x0, y0, w0, h0 in the image's full-size pixels) resized to out_w x out_h, bicubic, aspect not
    kept: uint8 [out_h, out_w, 3] RGB pixels. With use_draft a JPEG is decoded at the smallest DCT scale s of 1/8,
    1/4, 1/2, 1 at which the crop still has the output size (simplejpeg when installed, else Pillow's draft()) and
    the crop box mapped exactly by s, so box arithmetic done in full-size pixels stays valid.

    A box that lands on whole pixels of the decoded image (every crop the loader draws at s = 1) is resized by
    torch (resize_pixels); a fractional one by Pillow, whose resize takes fractional boxes."""
    x0, y0, w0, h0 = crop
    decoded = None
    if use_draft:
        # the box on whole pixels at the scale libjpeg should take -> torch resizes it -> decode to packed RGB
        planned = _dct_scale(crop, out_w, out_h) / 8
        whole = all(float(v * planned).is_integer() for v in (x0, y0, x0 + w0, y0 + h0))
        decoded = _simplejpeg_array(image, crop, out_w, out_h, "RGB" if whole else "RGBX")
    if decoded is not None:
        pixels, scale = decoded
    else:
        k = _draft_scale(image, crop, out_w, out_h) if use_draft else 1
        rgb, scale = (image if image.mode == "RGB" else image.convert("RGB")), 1.0 / k
    box = (x0 * scale, y0 * scale, (x0 + w0) * scale, (y0 + h0) * scale)
    if all(float(v).is_integer() for v in box):
        return resize_pixels(pixels if decoded is not None else np.asarray(rgb), tuple(int(v) for v in box),
                             out_w, out_h)
    if decoded is not None:    # RGBX as planned; RGB only when libjpeg took another scale than planned
        rgb = _as_rgbx_image(pixels) if pixels.shape[2] == 4 else Image.fromarray(pixels, "RGB")
    out = rgb.resize((out_w, out_h), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out if out.mode == "RGB" else out.convert("RGB"))


def hflip(pixels: np.ndarray) -> np.ndarray:
    """The pixels mirrored left-right."""
    return cv2.flip(pixels, 1)


def _signed(level: float, rng: np.random.Generator) -> float:
    return -level if rng.random() > 0.5 else level


_RAMP = np.arange(256)


def _histograms(pixels: np.ndarray) -> list[np.ndarray]:
    """The 256-bin histogram of each channel of uint8 [H, W, C] or [H, W] pixels."""
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    return [cv2.calcHist([pixels], [c], None, [256], [0, 256]).ravel().astype(np.int64) for c in range(channels)]


def _apply_luts(pixels: np.ndarray, luts: list[np.ndarray]) -> np.ndarray:
    """Each channel through its own 256-entry table, entries clipped to 0..255 as Pillow's point() clips them
    (cv2.LUT takes one table per channel)."""
    table = np.stack([np.clip(lut, 0, 255).astype(np.uint8) for lut in luts], axis=-1).reshape(1, 256, len(luts))
    return cv2.LUT(pixels, table if len(luts) > 1 else table[..., 0])


def autocontrast(pixels: np.ndarray) -> np.ndarray:
    """Pillow's ImageOps.autocontrast (no cutoff; X-VLM's autocontrast_func) on uint8 [H, W, C] or [H, W] pixels:
    each channel stretched to 0..255 by the same lookup table Pillow builds, so the same pixels."""
    luts = []
    for h in _histograms(pixels):
        used = np.flatnonzero(h)
        lo, hi = (int(used[0]), int(used[-1])) if len(used) else (255, 0)
        if hi <= lo:
            luts.append(_RAMP)
            continue
        scale = 255.0 / (hi - lo)
        offset = -lo * scale
        # Pillow: int(ix * scale + offset), clipped to 0..255 (int() truncates; float64 multiply, then add)
        luts.append(np.clip((_RAMP * scale + offset).astype(np.int64), 0, 255))
    return _apply_luts(pixels, luts)


def equalize(pixels: np.ndarray) -> np.ndarray:
    """Pillow's ImageOps.equalize on uint8 [H, W, C] or [H, W] pixels: the same lookup table, the same pixels."""
    luts = []
    for h in _histograms(pixels):
        used = h[h != 0]
        step = (int(used.sum()) - int(used[-1])) // 255 if len(used) > 1 else 0
        if not step:
            luts.append(_RAMP)
            continue
        # Pillow: n starts at step // 2; lut[i] = n // step, then n += h[i]
        luts.append((step // 2 + np.concatenate(([0], np.cumsum(h)[:-1]))) // step)
    return _apply_luts(pixels, luts)


def brightness(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Pillow's ImageEnhance.Brightness (a blend with black: v * factor in float32, clipped, truncated), as a
    lookup table (X-VLM's brightness_func)."""
    lut = np.clip(_RAMP.astype(np.float32) * np.float32(factor), 0, 255).astype(np.uint8)
    return cv2.LUT(pixels, lut)


def sharpness(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Pillow's ImageEnhance.Sharpness, pixel for pixel: a blend away from the SMOOTH-filtered picture (OpenCV's
    uint8 filter gives Pillow's blur exactly; Pillow leaves the outermost rows and columns unfiltered), blended in
    float32 and truncated as Pillow's blend does."""
    blur = cv2.filter2D(pixels, -1, _SMOOTH, borderType=cv2.BORDER_REPLICATE)
    blur[0], blur[-1], blur[:, 0], blur[:, -1] = pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]
    base = blur.astype(np.float32)
    out = pixels.astype(np.float32)
    out -= base
    out *= np.float32(factor)
    out += base
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def _warp(pixels: np.ndarray, matrix: np.ndarray, interpolation: int) -> np.ndarray:
    """cv2.warpAffine with the forward matrix (source -> output), uncovered pixels filled with FILL."""
    height, width = pixels.shape[:2]
    return cv2.warpAffine(pixels, matrix, (width, height), flags=interpolation, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=FILL)


def shear(pixels: np.ndarray, factor: float, axis: str) -> np.ndarray:
    """Shear by `factor` along x (x' = x + factor * (y - cy)) or y, about the image centre, bilinear."""
    height, width = pixels.shape[:2]
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    if axis == "x":
        matrix = np.float32([[1, factor, -factor * cy], [0, 1, 0]])
    else:
        matrix = np.float32([[1, 0, 0], [factor, 1, -factor * cx]])
    return _warp(pixels, matrix, cv2.INTER_LINEAR)


def translate(pixels: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Shift by whole pixels (dx right, dy down)."""
    return _warp(pixels, np.float32([[1, 0, dx], [0, 1, dy]]), cv2.INTER_NEAREST)


def rotate(pixels: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate counter-clockwise by `degrees` about the image centre, bilinear, the same size."""
    height, width = pixels.shape[:2]
    return _warp(pixels, cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), degrees, 1.0),
                 cv2.INTER_LINEAR)


def _apply_op(pixels: np.ndarray, name: str, magnitude: int, rng: np.random.Generator) -> np.ndarray:
    """One X-VLM RandomAugment op at level `magnitude` of 10 (ALBEF's level-to-argument mappings)."""
    level = magnitude / MAX_LEVEL
    if name == "Identity":
        return pixels
    if name == "AutoContrast":
        return autocontrast(pixels)
    if name == "Equalize":
        return equalize(pixels)
    if name == "Brightness":
        return brightness(pixels, level * 1.8 + 0.1)
    if name == "Sharpness":
        return sharpness(pixels, level * 1.8 + 0.1)
    if name in ("ShearX", "ShearY"):
        return shear(pixels, _signed(level * 0.3, rng), "x" if name == "ShearX" else "y")
    if name in ("TranslateX", "TranslateY"):
        # X-VLM shifts by up to 10 px at 224; keep that fraction of the side at other resolutions
        side = pixels.shape[1] if name == "TranslateX" else pixels.shape[0]
        shift = int(round(_signed(level * 10.0 * side / 224.0, rng)))
        return translate(pixels, shift, 0) if name == "TranslateX" else translate(pixels, 0, shift)
    if name == "Rotate":
        return rotate(pixels, _signed(level * 30.0, rng))
    raise ValueError(f"unknown RandAugment op {name!r}")


def rand_augment(pixels: np.ndarray, rng: np.random.Generator, n: int, magnitude: int,
                 ops: tuple[str, ...] = PHOTOMETRIC_OPS) -> np.ndarray:
    """X-VLM's RandomAugment(N, M) on uint8 [H, W, 3] pixels: N ops drawn with replacement, each applied with
    probability 0.5."""
    if n <= 0:
        return pixels
    for index in rng.integers(0, len(ops), size=n).tolist():
        if rng.random() > 0.5:
            continue
        pixels = _apply_op(pixels, ops[index], magnitude, rng)
    return pixels


# (pixel / 255 - mean) / std as one multiply-add per value, per channel
_SCALE = (1.0 / (255.0 * np.asarray(CLIP_STD))).astype(np.float32).reshape(3, 1, 1)
_OFFSET = (-np.asarray(CLIP_MEAN) / np.asarray(CLIP_STD)).astype(np.float32).reshape(3, 1, 1)


def _rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def normalise_into(image: Image.Image | np.ndarray, out: np.ndarray) -> None:
    """Write the CLIP-normalised float32 pixels of uint8 [H, W, 3] RGB pixels (or an RGB image) into `out`
    ([3, H, W], e.g. one row of a batch tensor): a fused numpy multiply-add from the uint8 pixels, with no
    temporary float image, one packed plane at a time (cv2.split; reading the channels strided costs 1.5x as
    much). torchvision's to_dtype + normalize make four passes and cost 3x as much per image."""
    for channel, plane in enumerate(cv2.split(_rgb_array(image))):
        np.multiply(plane, _SCALE[channel], out=out[channel], casting="unsafe")
        out[channel] += _OFFSET[channel]


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """float32 [3, H, W], CLIP mean/std normalised (normalise_into a new array)."""
    pixels = _rgb_array(image)
    out = np.empty((3, *pixels.shape[:2]), np.float32)
    normalise_into(pixels, out)
    return torch.from_numpy(out)


def image_text_pixels(image: Image.Image, crop: Crop, flipped: bool, rng: np.random.Generator,
                      config: LoaderConfig, use_draft: bool = True) -> np.ndarray:
    """Image-text pixels before normalisation (uint8 [R, R, 3]): the RandomResizedCrop box resized to R x R,
    optional mirror, RandAugment with the geometric ops too. use_draft=False for an image object the caller may
    use again (draft() shrinks the object itself)."""
    out = crop_resize(image, crop, config.image_res, config.image_res, config.use_draft and use_draft)
    if flipped:
        out = hflip(out)
    return rand_augment(out, rng, config.randaug_n, config.randaug_m, IMAGE_TEXT_OPS)


def region_pixels(image: Image.Image, crop: Crop, flipped: bool, rng: np.random.Generator, config: LoaderConfig,
                  use_draft: bool = True) -> np.ndarray:
    """Region pixels before normalisation (uint8 [R, R, 3]): the anchor crop resized to R x R (aspect not kept),
    optional mirror, photometric RandAugment only (boxes must stay where the arithmetic puts them)."""
    out = crop_resize(image, crop, config.image_res, config.image_res, config.use_draft and use_draft)
    if flipped:
        out = hflip(out)
    return rand_augment(out, rng, config.randaug_n, config.randaug_m, PHOTOMETRIC_OPS)


def image_text_view(image: Image.Image, crop: Crop, flipped: bool, rng: np.random.Generator, config: LoaderConfig,
                    use_draft: bool = True) -> torch.Tensor:
    """image_text_pixels, normalised to a float32 [3, R, R] tensor."""
    return to_tensor(image_text_pixels(image, crop, flipped, rng, config, use_draft))


def region_view(image: Image.Image, crop: Crop, flipped: bool, rng: np.random.Generator, config: LoaderConfig,
                use_draft: bool = True) -> torch.Tensor:
    """region_pixels, normalised to a float32 [3, R, R] tensor."""
    return to_tensor(region_pixels(image, crop, flipped, rng, config, use_draft))
