"""The evaluation sets named by `xvlm build-shards --exclude-eval`: X-VLM's own evaluation files, read for the
images they hold.

Syntax of one `--exclude-eval`: `NAME=FILE[,images=ROOT]`, repeated for each file (val and test of one set are two
flags). FILE is a JSON list in X-VLM's formats, local or s3://:

* retrieval (configs/Retrieval_coco.yaml, Retrieval_flickr.yaml; dataset/re_dataset.py): coco_{val,test}.json,
  flickr30k_{val,test}.json: `[{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": [...]}, ...]`;
* grounding (configs/Grounding_bbox.yaml; dataset/grounding_dataset.py): refcoco+_{val,test}.json:
  `[{"image": "train2014/COCO_train2014_000000581857.jpg", "text": "...", "ref_id": 0}, ...]`.

Each entry's "image" is a path relative to X-VLM's `image_root`; a COCO file name (COCO_val2014_ID.jpg,
COCO_train2014_ID.jpg or 2017's ID.jpg, 12 digits) gives its COCO id: training images with that id are dropped
(COCO 2014 and 2017 share ids). `images=ROOT` (X-VLM's image_root for that file) makes the filter also compare
pictures: every listed image is read and hashed, and training images that look the same are dropped. A set whose
images carry no COCO id (Flickr30K) needs `images=ROOT`. NAME is a label (`coco-karpathy`, `refcoco+`,
`flickr30k` ...); each file's split is named NAME:FILE_STEM (`coco-karpathy:coco_test`) in the rejects.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import storage
from shards.downstream import safe_relative     # the one rule for annotation-file image paths
from storage.errors import XvlmError

_NAME = re.compile(r"[a-z0-9][a-z0-9+_.-]*")
_COCO_FILE = re.compile(r"(?:^|_)(\d{12})\.(?:jpg|jpeg|png)$", re.IGNORECASE)
MAX_EVAL_FILE_BYTES = 1 << 30


@dataclass(frozen=True)
class EvalSpec:
    """One `--exclude-eval NAME=FILE[,images=ROOT]`."""
    name: str
    file: str
    images: str | None = None

    @property
    def split(self) -> str:
        stem = self.file.rstrip("/").rsplit("/", 1)[-1]
        return f"{self.name}:{stem[:-5] if stem.endswith('.json') else stem}"

    def text(self) -> str:
        return f"{self.name}={self.file}" + (f",images={self.images}" if self.images else "")


@dataclass(frozen=True)
class EvalImage:
    """One image an evaluation file lists."""
    split: str                # NAME:FILE_STEM
    path: str                 # as the file writes it ("val2014/COCO_val2014_000000391895.jpg")
    coco_id: int | None


def parse_spec(text: str) -> EvalSpec:
    """`NAME=FILE[,images=ROOT]` -> EvalSpec; XvlmError saying what is wrong."""
    name, sep, rest = text.partition("=")
    name = name.strip().lower()
    if not sep or not rest or not _NAME.fullmatch(name):
        raise XvlmError(f"--exclude-eval {text!r}: expected NAME=FILE[,images=ROOT], e.g. "
                        f"coco-karpathy=data/finetune/coco_test.json,images=images/coco")
    file, *options = rest.split(",")
    images = None
    for option in options:
        key, sep, value = option.partition("=")
        if key.strip() != "images" or not sep or not value.strip():
            raise XvlmError(f"--exclude-eval {text!r}: unknown option {option!r}; the only option is images=ROOT "
                            f"(X-VLM's image_root for this file; paths with commas are not supported)")
        images = value.strip()
    if not file.strip():
        raise XvlmError(f"--exclude-eval {text!r}: no FILE after {name}=")
    return EvalSpec(name, file.strip(), images)


def coco_id(path: str) -> int | None:
    """The COCO id in an image path: COCO_val2014_000000391895.jpg -> 391895, 000000391895.jpg -> 391895."""
    match = _COCO_FILE.search(path.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def read_eval_file(spec: EvalSpec) -> list[EvalImage]:
    """The distinct images of one evaluation file, in file order."""
    if not storage.exists(spec.file):
        raise XvlmError(f"--exclude-eval {spec.name}: {spec.file} does not exist")
    size = storage.size(spec.file)
    if size > MAX_EVAL_FILE_BYTES:
        raise XvlmError(f"--exclude-eval {spec.name}: {spec.file} is {size} bytes; an evaluation file is far smaller")
    try:
        entries = json.loads(storage.read_bytes(spec.file))
    except (ValueError, UnicodeDecodeError) as err:
        raise XvlmError(f"--exclude-eval {spec.name}: {spec.file} is not JSON ({err}); give X-VLM's evaluation "
                        f"file (a list of {{\"image\": ...}} entries)") from None
    if not isinstance(entries, list):
        raise XvlmError(f"--exclude-eval {spec.name}: {spec.file} holds a JSON {type(entries).__name__}, not the "
                        f"list of entries of X-VLM's evaluation files")
    seen: dict[str, EvalImage] = {}
    for k, entry in enumerate(entries):
        image = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(image, str) or not image.strip():
            raise XvlmError(f"--exclude-eval {spec.name}: {spec.file} entry {k} has no \"image\" path; is it one of "
                            f"X-VLM's evaluation files?")
        if image not in seen:
            seen[image] = EvalImage(spec.split, image, coco_id(image))
    if not seen:
        raise XvlmError(f"--exclude-eval {spec.name}: {spec.file} lists no image")
    return list(seen.values())


def image_path(spec: EvalSpec, image: EvalImage) -> str:
    """Where an evaluation image lies: its path under the set's images=ROOT (never outside it)."""
    rel = safe_relative(image.path)
    if rel is None:
        raise XvlmError(f"--exclude-eval {spec.name}: {spec.file} lists {image.path!r}, which leaves images=ROOT")
    return storage.join(spec.images, rel)  # type: ignore[arg-type]
