"""The loader's typed configuration: image and text sizes, masking, region sampling, batching, streaming.

Plain numbers and paths only (shards/ imports nothing from model/ or train/); presets `tiny` and `base`. The
defaults are X-VLM's recipe (dataset/pretrain_dataset.py, dataset/utils.py, Pretrain.py); each of our own choices
is a named switch whose default is off (docs/fidelity.md lists them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from storage.errors import XvlmError


# The named modes of the loader's switches: the first of each is X-VLM's (the default).
CHOICES: dict[str, tuple[str, ...]] = {
    "pre_caption": ("xvlm", "spaces"),
    "mlm_masking": ("xvlm", "whole_word"),
    "object_attributes": ("one", "all"),
    "region_batching": ("pooled", "packed"),
    "iter_perc_mode": ("xvlm", "per_batch"),
    "streams": ("separate", "shared"),
    "image_text_entries": ("caption", "image"),
    "region_entries": ("kind", "image"),
}

# Our own choices before issue 17, as overrides: the configs that rely on them (tiny_cpu.yaml, quickstart_cpu.yaml)
# set the same values explicitly.
OURS: dict[str, Any] = {
    "pre_caption": "spaces", "mlm_masking": "whole_word", "swap_left_right": True, "region_anchor_first": True,
    "object_attributes": "all", "region_batching": "packed", "iter_perc_mode": "per_batch", "streams": "shared",
    "phrase_captions": 0,
}


@dataclass
class LoaderConfig:
    # ---- images
    image_res: int = 224                 # R: side of the square training image
    grid_stride: int = 32                # pixels per cell of the vision tower's final grid (Swin-B: 32 -> 7x7)
    crop_scale: tuple[float, float] = (0.2, 1.0)   # RandomResizedCrop area range (image-text)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    randaug_n: int = 2                   # RandAugment(N, M) as X-VLM: N ops, each applied with p=0.5
    randaug_m: int = 7
    use_draft: bool = True               # DCT-scaled JPEG decoding when the output is much smaller
    max_pixels: int = 4096 * 4096        # a stored image with more pixels (by its header) is skipped undecoded
    # ---- text
    tokenizer: str = ""                  # local BERT WordPiece tokenizer folder (vocab.txt / tokenizer.json)
    max_words: int = 40
    max_tokens: int = 40                 # T: [CLS] + up to T-1 WordPiece tokens
    max_masks: int = 8                   # M
    mask_prob: float = 0.25
    skipgram_prb: float = 0.2
    skipgram_size: int = 3
    pre_caption: str = "xvlm"            # xvlm: , . ' ! ? " ( ) * # : ; ~ deleted ("man's" -> "mans");
                                         # spaces (ours): they become spaces ("man s")
    mlm_masking: str = "xvlm"            # xvlm: spans taken whole, then cut to n at random, random ids from the
                                         # whole vocabulary; whole_word (ours): only whole words, non-special ids
    swap_left_right: bool = False        # ours: flips swap left/right words in every text of the sample
    # ---- region samples
    max_regions: int = 5                 # text rows per region image, whole-image caption included
    min_region_inside: float = 0.5       # a box is kept when more than this fraction lies inside the crop
    region_crop_prob: float = 1.0        # X-VLM's anchor crop with this probability, else the whole picture
    region_anchor_first: bool = False    # ours: the anchor box's row right after the caption (X-VLM: no row
                                         # privileged, the anchor is one of the boxes in random order)
    object_attributes: str = "one"       # one (X-VLM): one random attribute before the object name; all (ours):
                                         # every attribute
    # ---- batches
    image_text_batch_size: int = 128     # images (= text rows) per image-text batch
    region_batch_size: int = 128         # text-region rows per region batch
    region_max_images: int = 48          # images per region batch (at most, with region_batching: packed)
    region_batching: str = "pooled"      # pooled (X-VLM): region_max_images images, a random region_batch_size
                                         # of all their rows (resampled when short); packed (ours): images
                                         # until region_batch_size rows are filled
    iter_perc: float = 0.5               # X-VLM's iter_perc (regions.iter_perc), see iter_perc_mode
    iter_perc_mode: str = "xvlm"         # xvlm: each iteration is one image-text batch, preceded with probability
                                         # iter_perc by one region batch (1/3 of batches at 0.5); per_batch (ours
                                         # before issue 17): each batch is a region batch with probability iter_perc
    # ---- streams
    streams: str = "separate"            # separate (X-VLM): an image-text stream and a region stream, each with
                                         # its own epochs; shared (ours): one pass over the images per epoch,
                                         # each image serving one batch kind
    image_text_entries: str = "caption"  # caption (X-VLM): one image-text entry per (image, caption) pair;
                                         # image: one per image, a random caption drawn (separate streams)
    phrase_captions: int = 8             # region phrases (VG's) also used as whole-image captions, per image: the
                                         # largest-box distinct ones (X-VLM's train_file holds ALBEF's VG captions,
                                         # ~8 per image; docs/fidelity.md states the assumption); 0 = none
    region_entries: str = "kind"         # kind (X-VLM's coco_objs / vg_objs / vg_regions files): one region entry
                                         # per image and box kind (objects, region phrases); image: one per image
    region_num_workers: int | None = None  # DataLoader workers of the region stream (None: num_workers)
    # ---- streaming
    seed: int = 42
    shuffle_buffer: int = 1000           # samples in the shuffle buffer of each worker
    read_ahead: bool | str = "auto"      # read the next shuffle block in a thread while this one is decoded:
                                         # "auto" = for datasets on S3 only; true / false = always / never
    num_workers: int = 0                 # DataLoader workers per rank (of the image-text stream when separate)
    source_weights: dict[str, float] = field(default_factory=dict)  # mixture between sources; {} = by size

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise XvlmError(f"loader config: {what}")

        for name in ("image_res", "grid_stride", "max_pixels", "max_words", "max_tokens", "max_masks",
                     "max_regions", "image_text_batch_size", "region_batch_size", "region_max_images"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.image_res % self.grid_stride == 0,
             f"image_res ({self.image_res}) must be a multiple of grid_stride ({self.grid_stride})")
        need(self.max_tokens >= 2, f"max_tokens must be >= 2 ([CLS] + one token), got {self.max_tokens}")
        need(self.max_masks < self.max_tokens, f"max_masks ({self.max_masks}) must be < max_tokens ({self.max_tokens})")
        need(0.0 < self.mask_prob <= 1.0, f"mask_prob must be in (0, 1], got {self.mask_prob}")
        need(0.0 <= self.skipgram_prb <= 1.0, f"skipgram_prb must be in [0, 1], got {self.skipgram_prb}")
        need(isinstance(self.skipgram_size, int) and self.skipgram_size >= 1,
             f"skipgram_size must be an integer >= 1, got {self.skipgram_size}")
        self.crop_scale = tuple(float(v) for v in self.crop_scale)  # YAML gives lists
        self.crop_ratio = tuple(float(v) for v in self.crop_ratio)
        need(len(self.crop_scale) == 2 and 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0,
             f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.crop_scale}")
        need(len(self.crop_ratio) == 2 and 0.0 < self.crop_ratio[0] <= self.crop_ratio[1],
             f"crop_ratio must be (lo, hi) with 0 < lo <= hi, got {self.crop_ratio}")
        need(0.0 <= self.hflip_prob <= 1.0, f"hflip_prob must be in [0, 1], got {self.hflip_prob}")
        need(self.randaug_n >= 0 and 0 <= self.randaug_m <= 10,
             f"randaug_n must be >= 0 and randaug_m in [0, 10], got {self.randaug_n}, {self.randaug_m}")
        need(isinstance(self.read_ahead, bool) or self.read_ahead == "auto",
             f"read_ahead must be auto, true or false, got {self.read_ahead!r}")
        need(0.0 <= self.region_crop_prob <= 1.0,
             f"region_crop_prob must be in [0, 1], got {self.region_crop_prob}")
        need(0.0 <= self.min_region_inside < 1.0,
             f"min_region_inside must be in [0, 1), got {self.min_region_inside}")
        need(self.region_batching != "packed" or self.region_max_images <= self.region_batch_size,
             f"region_max_images ({self.region_max_images}) must be <= region_batch_size ({self.region_batch_size}) "
             f"with region_batching packed")
        need(0.0 <= self.iter_perc <= 1.0, f"iter_perc must be in [0, 1], got {self.iter_perc}")
        for name, choices in CHOICES.items():
            need(getattr(self, name) in choices, f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        need(isinstance(self.phrase_captions, int) and self.phrase_captions >= 0,
             f"phrase_captions must be an integer >= 0, got {self.phrase_captions!r}")
        need(self.region_num_workers is None or (isinstance(self.region_num_workers, int)
                                                 and self.region_num_workers >= 0),
             f"region_num_workers must be null or an integer >= 0, got {self.region_num_workers!r}")
        need(self.shuffle_buffer >= 0, f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        for name, weight in self.source_weights.items():
            need(weight >= 0, f"source_weights[{name!r}] must be >= 0, got {weight}")
        need(not self.source_weights or sum(self.source_weights.values()) > 0,
             "source_weights must not all be 0")

    @property
    def region_workers(self) -> int:
        """DataLoader workers of the region stream (separate streams)."""
        return self.num_workers if self.region_num_workers is None else self.region_num_workers

    @property
    def grid(self) -> int:
        """G: side of the vision tower's final patch grid."""
        return self.image_res // self.grid_stride

    def replace(self, **changes: Any) -> "LoaderConfig":
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise XvlmError(f"loader config: unknown field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    # tests and the CPU quickstart: 64x64 images on a 4x4 grid, short texts
    "tiny": dict(image_res=64, grid_stride=16, max_words=16, max_tokens=16, max_masks=4,
                 max_regions=4, image_text_batch_size=8, region_batch_size=8, region_max_images=4,
                 shuffle_buffer=64),
    # the paper's 4M setting
    "base": dict(image_res=224, grid_stride=32, max_words=40, max_tokens=40, max_masks=8,
                 max_regions=5, image_text_batch_size=128, region_batch_size=128, region_max_images=48),
}


def preset(name: str, **overrides: Any) -> LoaderConfig:
    """The named preset (`tiny` or `base`) with optional field overrides."""
    if name not in PRESETS:
        raise XvlmError(f"unknown loader preset {name!r}; choose one of {sorted(PRESETS)}")
    return LoaderConfig(**{**PRESETS[name], **overrides})
