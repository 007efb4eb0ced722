"""The leak filter of `xvlm build-shards --exclude-eval`: which training images are evaluation images.

Two tests, both made in the shard tasks, per sample:

* **by COCO id**, before the image is read: a sample whose coco_id (COCO, VG and RefCOCO images, merged or not) is
  an image of an evaluation file is dropped. Exact; COCO 2014 and 2017 share ids.
* **by content**, for every sample when an evaluation set came with its images (`images=ROOT`), once the image
  has passed the image checks: the 256-bit perceptual hash (imagehash.phash with hash_size 16: DCT of the 64x64
  grey image, bits = the 16x16 lowest frequencies above their median) of the decoded source bytes is compared with
  every evaluation image's; a Hamming distance <= HAMMING_THRESHOLD is a leak. (The 64-bit hash was measured
  first: two unrelated sample pictures came within 2 bits of each other while cropped copies reached 6, so no
  threshold separated them; with 256 bits copies stay <= 40 and other pictures >= 74.) Web sources (CC, SBU, CC12M, Open Images,
  Objects365) carry no COCO id: this is how their copies of COCO or Flickr30K test pictures are found.

A dropped sample is an `eval_leak` reject of each of its records; the detail starts with the split that matched
(`flickr30k:flickr30k_test by content: flickr30k-images/1007129816.jpg at distance 2`). The index (ids, hashes,
and the threshold) has a digest that goes into the build's fingerprint, so resume and byte-identical reruns hold
with the filter on, and another evaluation set means another build.

JPEGs are decoded with DCT scaling to >= 64 px (`Image.draft`) before the hash: several times faster than a full
decode, and the hash only looks at a 64x64 thumbnail. Evaluation images are hashed the same way.
"""
from __future__ import annotations

import hashlib
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.evalsets import EvalImage, EvalSpec, image_path, read_eval_file
import storage
from storage.errors import XvlmError

log = logging.getLogger(__name__)

HASH_VERSION = "phash256-draft64-v1"  # changes when image_hash would give other bits: part of the digest
HASH_SIZE = 16                        # 16 x 16 = 256 bits
HASH_WORDS = HASH_SIZE * HASH_SIZE // 64
HAMMING_THRESHOLD = 48                # of 256 bits; copies measured <= 40, other pictures >= 74 (docs/shard_builder.md)
DRAFT_SIDE = 64
READ_THREADS = 8                      # evaluation images read in parallel (S3 latency)


def image_hash(data: bytes) -> np.ndarray:
    """The 256-bit perceptual hash of an image's bytes, as HASH_WORDS uint64 (its stored pixel frame: EXIF rotation
    is not applied)."""
    import imagehash

    with Image.open(io.BytesIO(data)) as image:
        image.draft("L", (DRAFT_SIDE, DRAFT_SIDE))     # JPEG: decode at 1/2..1/8 scale; others: no effect
        grey = image.convert("L")
    bits = imagehash.phash(grey, hash_size=HASH_SIZE).hash.flatten()
    return np.packbits(bits).view(">u8").astype(np.uint64)


@dataclass
class EvalIndex:
    """Every image of the evaluation sets: COCO ids and perceptual hashes, each with where it came from."""
    coco_ids: dict[int, str] = field(default_factory=dict)       # COCO id -> split that lists it (first)
    hashes: np.ndarray = field(default_factory=lambda: np.zeros((0, HASH_WORDS), np.uint64))
    hash_labels: list[str] = field(default_factory=list)         # "SPLIT IMAGE_PATH" per hash
    specs: list[str] = field(default_factory=list)
    threshold: int = HAMMING_THRESHOLD

    @property
    def digest(self) -> str:
        """Changes whenever the filter would drop other images: ids, hashes, labels, threshold, hash version."""
        h = hashlib.sha256(f"{HASH_VERSION}|{self.threshold}|".encode())
        for coco_id, split in sorted(self.coco_ids.items()):
            h.update(f"{coco_id}:{split}\n".encode())
        h.update(self.hashes.astype("<u8").tobytes())
        h.update("\n".join(self.hash_labels).encode())
        return h.hexdigest()[:32]

    def match_id(self, coco_id: int | None) -> str | None:
        """The reject detail when an image with this COCO id is an evaluation image, else None."""
        if coco_id is None:
            return None
        split = self.coco_ids.get(int(coco_id))
        return None if split is None else f"{split} by COCO id {int(coco_id)}"

    def nearest(self, data: bytes) -> tuple[int, str]:
        """(Hamming distance, "SPLIT IMAGE_PATH") of the evaluation picture nearest to these image bytes."""
        distances = np.bitwise_count(self.hashes ^ image_hash(data)).sum(axis=1)
        best = int(np.argmin(distances))
        return int(distances[best]), self.hash_labels[best]

    def match_image(self, data: bytes) -> str | None:
        """The reject detail when these image bytes look like an evaluation image, else None."""
        if len(self.hashes) == 0:
            return None
        distance, label = self.nearest(data)
        if distance > self.threshold:
            return None
        split, _, path = label.partition(" ")
        return f"{split} by content: {path} at distance {distance}"


def _hash_images(spec: EvalSpec, images: list[EvalImage], progress: bool) -> list[np.ndarray]:
    paths = [image_path(spec, image) for image in images]

    def one(path: str) -> np.ndarray | str:
        try:
            return image_hash(storage.read_bytes(path))
        except FileNotFoundError:
            return f"{path}: no such file"
        except Exception as err:  # noqa: BLE001 - any unreadable image makes the filter incomplete: reported below
            return f"{path}: {type(err).__name__}: {str(err)[:120]}"

    with ThreadPoolExecutor(READ_THREADS) as pool:
        results = list(tqdm(pool.map(one, paths), total=len(paths), desc=f"hashing {spec.split}", unit=" img",
                            disable=not progress))
    failed = [r for r in results if isinstance(r, str)]
    if failed:
        raise XvlmError(f"--exclude-eval {spec.text()}: {len(failed)} of {len(paths)} evaluation images cannot be "
                        f"read, so their copies could not be found (first: {failed[0]}). Fix images=ROOT (X-VLM's "
                        f"image_root for this file) or restore the images")
    return results  # type: ignore[return-value]


def build_index(specs: list[EvalSpec], progress: bool = True) -> EvalIndex:
    """Read every evaluation file (and hash its images when images=ROOT is given)."""
    index = EvalIndex(specs=[s.text() for s in specs])
    hashes: list[np.ndarray] = []
    for spec in specs:
        images = read_eval_file(spec)
        with_ids = [i for i in images if i.coco_id is not None]
        if not with_ids and spec.images is None:
            raise XvlmError(f"--exclude-eval {spec.text()}: its images carry no COCO id, so the filter must compare "
                            f"pictures: add ,images=ROOT (X-VLM's image_root, the folder its \"image\" paths are "
                            f"relative to)")
        for image in with_ids:
            index.coco_ids.setdefault(image.coco_id, image.split)  # type: ignore[arg-type]
        if spec.images is not None:
            hashes += _hash_images(spec, images, progress)
            index.hash_labels += [f"{image.split} {image.path}" for image in images]
        log.info("--exclude-eval %s: %d images, %d with a COCO id%s", spec.split, len(images), len(with_ids),
                 ", hashed" if spec.images else "")
    index.hashes = np.array(hashes, dtype=np.uint64).reshape(-1, HASH_WORDS)
    return index
