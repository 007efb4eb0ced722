"""The loader's typed configuration: image and text sizes, masking, region sampling, batching, streaming.

Plain numbers and paths only (shards/ imports nothing from model/ or train/); presets `tiny` and `base`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from shards.errors import XvlmError


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
    swap_left_right: bool = True         # flips swap left/right words in every text of the sample
    # ---- region samples
    max_regions: int = 5                 # text rows per region image, whole-image caption included
    min_region_inside: float = 0.5       # a box is kept when more than this fraction lies inside the crop
    region_crop_prob: float = 1.0        # X-VLM's anchor crop with this probability, else the whole picture
    # ---- batches
    image_text_batch_size: int = 128     # images (= text rows) per image-text batch
    region_batch_size: int = 128         # text-region rows per region batch
    region_max_images: int = 48          # images per region batch, at most
    iter_perc: float = 0.5               # probability of a region batch per image-text batch (X-VLM iter_perc)
    # ---- streaming
    seed: int = 42
    shuffle_buffer: int = 1000           # samples in the shuffle buffer of each worker
    read_ahead: bool | str = "auto"      # read the next shuffle block in a thread while this one is decoded:
                                         # "auto" = for datasets on S3 only; true / false = always / never
    num_workers: int = 0                 # DataLoader workers per rank
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
        need(self.region_max_images <= self.region_batch_size,
             f"region_max_images ({self.region_max_images}) must be <= region_batch_size ({self.region_batch_size})")
        need(0.0 <= self.iter_perc <= 1.0, f"iter_perc must be in [0, 1], got {self.iter_perc}")
        need(self.shuffle_buffer >= 0, f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        for name, weight in self.source_weights.items():
            need(weight >= 0, f"source_weights[{name!r}] must be >= 0, got {weight}")
        need(not self.source_weights or sum(self.source_weights.values()) > 0,
             "source_weights must not all be 0")

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
