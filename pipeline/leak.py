"""The leak filter of `xvlm build-shards --exclude-eval`: which training images are evaluation images.

Two tests, both made in the shard tasks, per sample:

* **by COCO id**, before the image is read: a sample whose coco_id (COCO, VG and RefCOCO images, merged or not) is
  an image of an evaluation file is dropped. Exact; COCO 2014 and 2017 share ids.
* **by content**, for every sample when an evaluation set came with its images (`images=ROOT`), once the image
  has passed the image checks: the 64-bit perceptual hash (imagehash.phash: DCT of the 32x32 grey image, bits =
  the 8x8 low frequencies above their median) of the decoded source bytes is compared with every evaluation
  image's; a Hamming distance <= HAMMING_THRESHOLD is a leak. Web sources (CC, SBU, CC12M, Open Images,
  Objects365) carry no COCO id: this is how their copies of COCO or Flickr30K test pictures are found.

A dropped sample is an `eval_leak` reject of each of its records; the detail starts with the split that matched
(`flickr30k:flickr30k_test by content: flickr30k-images/1007129816.jpg at distance 2`). The index (ids, hashes,
and the threshold) has a digest that goes into the build's fingerprint, so resume and byte-identical reruns hold
with the filter on, and another evaluation set means another build.

JPEGs are decoded with DCT scaling to >= 64 px (`Image.draft`) before the hash: 10-30x faster than a full decode,
and the hash only looks at a 32x32 thumbnail. Evaluation images are hashed the same way.
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
from shards import storage
from shards.errors import XvlmError

log = logging.getLogger(__name__)

HASH_VERSION = "phash64-draft64-v1"   # changes when image_hash would give other bits: part of the digest
HAMMING_THRESHOLD = 6                 # of 64 bits; copies measured at 0-2, other pictures >= 8 (docs/shard_builder.md)
DRAFT_SIDE = 64
READ_THREADS = 8                      # evaluation images read in parallel (S3 latency)


def image_hash(data: bytes) -> int:
    """The 64-bit perceptual hash of an image's bytes (its stored pixel frame: EXIF rotation is not applied)."""
    import imagehash

    with Image.open(io.BytesIO(data)) as image:
        image.draft("L", (DRAFT_SIDE, DRAFT_SIDE))     # JPEG: decode at 1/2..1/8 scale; others: no effect
        grey = image.convert("L")
    return int(str(imagehash.phash(grey)), 16)


@dataclass
class EvalIndex:
    """Every image of the evaluation sets: COCO ids and perceptual hashes, each with where it came from."""
    coco_ids: dict[int, str] = field(default_factory=dict)       # COCO id -> split that lists it (first)
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
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

    def match_image(self, data: bytes) -> str | None:
        """The reject detail when these image bytes look like an evaluation image, else None."""
        if len(self.hashes) == 0:
            return None
        distances = np.bitwise_count(self.hashes ^ np.uint64(image_hash(data)))
        best = int(np.argmin(distances))
        if int(distances[best]) > self.threshold:
            return None
        split, _, path = self.hash_labels[best].partition(" ")
        return f"{split} by content: {path} at distance {int(distances[best])}"


def _hash_images(spec: EvalSpec, images: list[EvalImage], progress: bool) -> list[int]:
    paths = [image_path(spec, image) for image in images]

    def one(path: str) -> int | str:
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
    hashes: list[int] = []
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
    index.hashes = np.array(hashes, dtype=np.uint64)
    return index
