"""Image normalization for the shards: read the bytes, check them, pass a fitting JPEG through untouched or
decode -> RGB -> resize -> re-encode, and map the annotation boxes into the stored image's pixel frame.

Works with Pillow and pillow-simd (only APIs both have). Pillow's decompression-bomb and truncated-image
protections stay on; on top, the header's width*height is checked against `max_pixels` before any decoding.
EXIF orientation is never applied: annotations were made in the stored pixel frame (see shards/FORMAT.md).
"""
from __future__ import annotations

import io
import logging
import math
import os
import stat
import tarfile
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

import storage
from shards.format import DEFAULT_MAX_IMAGE_SIDE
from shards.tar_stream import unsafe_member

log = logging.getLogger(__name__)

# Pillow >= 9.1 has Image.Resampling; pillow-simd (a 9.x fork) may not.
_LANCZOS = getattr(getattr(Image, "Resampling", Image), "LANCZOS")
EXIF_ORIENTATION = 0x0112
ASPECT_TOLERANCE = 0.02      # relative aspect-ratio difference still treated as "same picture, other size"
BOX_DECIMALS = 2             # stored boxes are rounded to 1/100 pixel


@dataclass(frozen=True)
class ImageConfig:
    """How images are stored in the shards."""
    max_side: int = DEFAULT_MAX_IMAGE_SIDE      # long side of a stored image, in pixels
    jpeg_quality: int = 90                      # quality of re-encoded JPEGs
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485   # header width*height above this: decompression_bomb
    max_file_bytes: int = 256 * 1024 * 1024     # a source image file above this is not read: file_too_large

    def __post_init__(self) -> None:
        if self.max_side < 16:
            raise ValueError(f"max_side must be >= 16, got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be positive, got {self.max_file_bytes}")


class ImageReject(Exception):
    """The image cannot be stored; `reason` is a code from pipeline.records.REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class StoredImage:
    """The bytes that go into KEY.jpg, their size, and the size of the source image they came from."""
    jpeg: bytes
    width: int
    height: int
    source_width: int
    source_height: int
    passthrough: bool


# ---------------------------------------------------------------------------------------------- reading


class ImageReader:
    """Reads image bytes from local paths, s3:// and `TARPATH#MEMBER`. Tar members are read by streaming the
    tar forward (works on S3 without random access); asking for members in tar order reads each tar once.

    A release is input from elsewhere: a local path must lie inside one of `roots` (the source folders), and the
    image file must not be a symlink out of them (it may resolve into its root, or into the folder it is listed in:
    folders linked in by the user, e.g. train2017 -> /mnt/coco/train2017, are followed); it must be a regular file
    (not a FIFO, device or folder) of at most `max_bytes`, and no file is read past that many bytes: a link to
    /dev/zero, /etc/shadow or a huge file costs nothing and leaks nothing."""

    def __init__(self, roots: tuple[str, ...] | list[str] = (), max_bytes: int = ImageConfig.max_file_bytes) -> None:
        self._tar_path: str | None = None
        self._stream = None
        self._tar: tarfile.TarFile | None = None
        self.roots = [(os.path.normpath(os.path.abspath(r)), os.path.realpath(r))
                      for r in roots if storage.local_path(r) is not None]
        self.max_bytes = max_bytes

    def _outside(self, path: str) -> str:
        """Why a local path leaves the source folders ('' when it does not)."""
        if not self.roots:
            return ""
        lexical, real = os.path.normpath(os.path.abspath(path)), os.path.realpath(path)
        for root, real_root in self.roots:
            if _inside(lexical, root) and (_inside(real, real_root)
                                           or _inside(real, os.path.realpath(os.path.dirname(lexical)))):
                return ""
        return f"resolves to {real}, outside the source folder(s)"

    def read(self, path: str) -> bytes:
        """The file's bytes; raises ImageReject(missing_image / unsafe_tar_member / unsafe_path / not_a_file /
        file_too_large)."""
        tar_path, hash_sign, member = path.partition("#")
        if hash_sign and tar_path.endswith(".tar"):
            return self._read_member(tar_path, member)
        if storage.local_path(path) is not None:
            return self._read_local(path)
        try:
            data = storage.read_bytes(path, 0, self.max_bytes + 1)
        except FileNotFoundError as err:
            raise ImageReject("missing_image", f"no such file ({type(err).__name__})") from None
        return self._checked_size(data)

    def _checked_size(self, data: bytes) -> bytes:
        if len(data) > self.max_bytes:
            raise ImageReject("file_too_large", f"more than {self.max_bytes} bytes (--max-image-bytes)")
        return data

    def _read_local(self, path: str) -> bytes:
        outside = self._outside(path)
        if outside:
            raise ImageReject("unsafe_path", outside)
        real = os.path.realpath(path)
        try:
            info = os.stat(real)
        except (FileNotFoundError, NotADirectoryError) as err:
            raise ImageReject("missing_image", f"no such file ({type(err).__name__})") from None
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a device, FIFO or socket"
            raise ImageReject("not_a_file", f"{real} is {kind}, not a regular file")
        if info.st_size > self.max_bytes:
            raise ImageReject("file_too_large", f"{info.st_size} bytes, more than {self.max_bytes} (--max-image-bytes)")
        with open(real, "rb") as f:
            return self._checked_size(f.read(self.max_bytes + 1))

    def _open_tar(self, tar_path: str) -> None:
        self.close()
        try:
            self._stream = storage.open_read(tar_path)
        except FileNotFoundError:
            raise ImageReject("missing_image", f"{tar_path}: no such tar") from None
        self._tar = tarfile.open(fileobj=self._stream, mode="r|")
        self._tar_path = tar_path

    def _read_member(self, tar_path: str, member: str) -> bytes:
        for attempt in range(2):   # continue forward in the open tar, else once more from its start
            if attempt == 1 or self._tar_path != tar_path:
                self._open_tar(tar_path)
            try:
                # next() rather than `for info in tar`: a new for-loop would restart at the first member.
                while (info := self._tar.next()) is not None:
                    self._tar.members.clear()   # stream mode keeps every header otherwise
                    if info.name != member:
                        continue
                    unsafe = unsafe_member(info)
                    if unsafe:
                        raise ImageReject("unsafe_tar_member", f"{tar_path}#{member}: {unsafe}")
                    if info.size > self.max_bytes:
                        raise ImageReject("file_too_large", f"{tar_path}#{member}: {info.size} bytes, more than "
                                                            f"{self.max_bytes} (--max-image-bytes)")
                    return self._tar.extractfile(info).read()
            except tarfile.ReadError as err:
                self.close()
                raise ImageReject("missing_image", f"{tar_path}: unreadable tar ({err})") from None
        raise ImageReject("missing_image", f"{tar_path} has no member {member!r}")

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._tar_path = self._stream = self._tar = None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# ---------------------------------------------------------------------------------------------- checks


def _open_header(data: bytes, max_pixels: int) -> Image.Image:
    """Open the image lazily (header only) and check its declared size before anything is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReject("decompression_bomb", str(err)) from None
    except UnidentifiedImageError:
        head = data[:16]
        raise ImageReject("not_an_image", f"{len(data)} bytes starting {head!r}") from None
    except (OSError, SyntaxError, ValueError) as err:   # corrupt headers raise these from the plugins
        raise ImageReject("not_an_image", f"unreadable header: {err}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageReject("not_an_image", f"header declares size {width}x{height}")
    if width * height > max_pixels:
        raise ImageReject("decompression_bomb", f"{width}x{height} = {width * height} pixels > max {max_pixels}")
    return image


def _jpeg_complete(data: bytes) -> bool:
    """Whether the JPEG ends with its EOI marker (a truncated download does not). Pass-through never decodes,
    so this is what keeps a cut-off file out; anything else takes the decoding path, which checks fully."""
    if data[:2] != b"\xff\xd8":
        return False
    return data[-2:] == b"\xff\xd9" or data[-64:].rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9"   # no full copy


_SOF_PASS = {0xC0, 0xC1, 0xC2}      # baseline, extended sequential, progressive (Huffman)


def _exif_orientation(payload: bytes) -> int | None:
    """The orientation tag of an APP1 Exif payload (b"Exif\0\0" + TIFF), or None."""
    tiff = payload[6:]
    if tiff[:2] not in (b"II", b"MM") or len(tiff) < 8:
        return None
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    for i in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        entry = tiff[ifd + 2 + 12 * i: ifd + 14 + 12 * i]
        if len(entry) < 12:
            return None
        if int.from_bytes(entry[0:2], order) == EXIF_ORIENTATION:
            return int.from_bytes(entry[8:10], order)
    return None


def jpeg_passthrough_size(data: bytes, config: ImageConfig) -> tuple[int, int] | None:
    """(width, height) when `data` can be stored untouched: a complete 8-bit 3-channel baseline/progressive JPEG
    within max_side and max_pixels, without an EXIF rotation. Reads only the marker segments (Pillow's JPEG
    header parser costs ~1 ms an image, more than the rest of pass-through); None = take the Pillow path."""
    if not _jpeg_complete(data):
        return None
    i, n = 2, len(data)
    size = None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:              # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        payload = data[i + 4:i + 2 + length]
        if length < 2 or len(payload) != length - 2:
            return None
        if marker == 0xDA:              # start of scan: the header is over
            return size
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _SOF_PASS or len(payload) < 6 or payload[0] != 8 or payload[5] != 3:
                return None
            height, width = int.from_bytes(payload[1:3], "big"), int.from_bytes(payload[3:5], "big")
            if not (0 < width <= config.max_side and 0 < height <= config.max_side) \
                    or width * height > config.max_pixels:
                return None
            size = (width, height)
        elif marker == 0xE1 and payload[:6] == b"Exif\x00\x00" and _exif_orientation(payload) not in (None, 1):
            return None
        i += 2 + length
    return None


def _can_pass_through(image: Image.Image, data: bytes, max_side: int) -> bool:
    if image.format != "JPEG" or image.mode != "RGB" or max(image.size) > max_side:
        return False
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        return False   # re-encoded in the stored frame without the tag, so no reader rotates it
    return _jpeg_complete(data)


# ---------------------------------------------------------------------------------------------- decoding


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit int) grayscale: scale the full range to 8 bits; a plain convert would clip at 255.
        values = np.asarray(image).astype(np.int64)
        top = 65535 if values.max(initial=0) > 255 or mode.startswith("I;16") else 255
        gray = (np.clip(values, 0, top) * 255 // top).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")   # L, 1, P, CMYK, YCbCr, LAB, HSV


def _decode(image: Image.Image, target: tuple[int, int] | None) -> Image.Image:
    """Decode fully; JPEGs that will be shrunk are DCT-downscaled while decoding (never below `target`)."""
    if target is not None and image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK"):
        image.draft(image.mode, target)
    try:
        image.load()
    except OSError as err:
        if "truncated" in str(err).lower():
            raise ImageReject("truncated_image", str(err)) from None
        raise ImageReject("not_an_image", f"cannot decode: {err}") from None
    except (SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReject("not_an_image", f"cannot decode: {err}") from None
    return image


def stored_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size after shrinking so the long side is at most max_side (never enlarged)."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def normalize_image(data: bytes, config: ImageConfig) -> StoredImage:
    """Bytes of any image -> the JPEG stored in the shard. Raises ImageReject with the reason code."""
    try:
        return _normalize(data, config)
    except (ImageReject, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - Pillow plugins raise struct.error, IndexError, EOFError ... on corrupt data
        raise ImageReject("not_an_image", f"cannot decode: {type(err).__name__}: {err}") from None


def _normalize(data: bytes, config: ImageConfig) -> StoredImage:
    fast = jpeg_passthrough_size(data, config)
    if fast is not None:
        return StoredImage(data, fast[0], fast[1], fast[0], fast[1], passthrough=True)
    image = _open_header(data, config.max_pixels)
    width, height = image.size
    if _can_pass_through(image, data, config.max_side):
        return StoredImage(data, width, height, width, height, passthrough=True)
    new_size = stored_size(width, height, config.max_side)
    image = _decode(image, new_size if new_size != (width, height) else None)
    rgb = _to_rgb(image)
    if rgb.size != new_size:
        rgb = rgb.resize(new_size, _LANCZOS)
    out = io.BytesIO()
    # No exif=/icc_profile= arguments: the stored JPEG carries no orientation tag (pixels are in stored frame).
    rgb.save(out, format="JPEG", quality=config.jpeg_quality)
    return StoredImage(out.getvalue(), new_size[0], new_size[1], width, height, passthrough=False)


# ---------------------------------------------------------------------------------------------- boxes


def annotation_scale(annotation_size: tuple[int | None, int | None], real_size: tuple[int, int]) -> tuple[float, float]:
    """Factors from the annotation frame to the real image. Raises ImageReject(image_size_mismatch) when the
    stated size and the real image disagree in aspect ratio (then the boxes cannot be trusted)."""
    ann_w, ann_h = annotation_size
    real_w, real_h = real_size
    if not ann_w or not ann_h or (ann_w, ann_h) == (real_w, real_h):
        return 1.0, 1.0
    if ann_w <= 0 or ann_h <= 0:
        raise ImageReject("image_size_mismatch", f"annotation size {ann_w}x{ann_h} is not positive")
    ann_ratio, real_ratio = ann_w / ann_h, real_w / real_h
    if abs(ann_ratio - real_ratio) / real_ratio > ASPECT_TOLERANCE:
        raise ImageReject("image_size_mismatch",
                          f"annotations are for {ann_w}x{ann_h}, the image is {real_w}x{real_h} (other aspect ratio)")
    return real_w / ann_w, real_h / ann_h


@dataclass(frozen=True)
class BoxResult:
    """A box in stored pixels, or why it was dropped; `clipped` when part of it lay outside the image."""
    bbox: list[float] | None
    reason: str | None = None
    detail: str = ""
    clipped: bool = False


def map_box(bbox: list[float] | None, scale: tuple[float, float], size: tuple[int, int]) -> BoxResult:
    """[x, y, w, h] in the annotation frame -> [x, y, w, h] in the stored image, clipped to it."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return BoxResult(None, "bad_box", f"bbox {bbox!r} is not 4 numbers")
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return BoxResult(None, "bad_box", f"bbox {[x, y, w, h]} has a negative, zero or NaN size")
    sx, sy = scale
    width, height = size
    x0, y0, x1, y1 = x * sx, y * sy, (x + w) * sx, (y + h) * sy
    cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
    cx0, cy0 = round(cx0, BOX_DECIMALS), round(cy0, BOX_DECIMALS)
    cw, ch = round(cx1 - cx0, BOX_DECIMALS), round(cy1 - cy0, BOX_DECIMALS)
    if cw <= 0 or ch <= 0:
        return BoxResult(None, "box_outside", f"bbox {[x, y, w, h]} lies outside the {width}x{height} image")
    clipped = x0 < -1e-6 or y0 < -1e-6 or x1 > width + 1e-6 or y1 > height + 1e-6
    return BoxResult([cx0, cy0, cw, ch], clipped=clipped)
