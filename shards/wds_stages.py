"""Our multi-grained sample builders as WebDataset stages: a stock `webdataset.WebDataset(urls)` pipeline over our
shards yields the same kind of image-text and region samples as our loader (shards/samples.py builds both), and
batches them with our collate functions into the layout the model takes (docs/batches.md).

    import webdataset as wds
    from shards.collate import collate_image_text, collate_region
    from shards.loader_config import preset
    from shards.wds_stages import ImageTextSamples, image_text_stage, region_stage

    config = preset("tiny", tokenizer="data/sample/tokenizer")
    pairs = (wds.WebDataset(urls, shardshuffle=False)
             .compose(image_text_stage(config))             # skips counted by reason (SkipCounter)
             .batched(64, collation_fn=collate_image_text))
    boxes = wds.WebDataset(urls, shardshuffle=False).compose(region_stage(config)).batched(
        16, collation_fn=collate_region)
    # or one sample at a time, with webdataset's own error handling:
    pairs = wds.WebDataset(urls).map(ImageTextSamples(config), handler=wds.warn_and_continue)

A sample's augmentation is drawn from a random stream seeded by (seed, key, kind), as `xvlm show --augmented`
draws it, so it does not depend on the order or the worker that reads it. What these stages do not give is what our
loader adds around the same builders (shards/loader.py): an epoch plan shared by every rank, source mixing,
X-VLM's two streams, and a position that resumes exactly; and webdataset's tar reader does not apply our tar-member
rule (shards.tar_stream.member_problem): run `xvlm verify` on shards from elsewhere first.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

from shards import samples
from shards.loader_config import LoaderConfig
from shards.plan import rng_for

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg")


class SampleBuilder:
    """A callable for `.map(...)`: a WebDataset sample ({"__key__", "jpg", "json", ...}; undecoded bytes, or a PIL
    image and a dict after `.decode("pil")`) -> one of our training samples of `kind`. Raises samples.SkipSample
    for a sample that gives none (no caption, no usable box, a corrupt or oversized image)."""

    kind = ""

    def __init__(self, config: LoaderConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed

    def build(self, image: Any, meta: Any, rng) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        key = str(sample.get("__key__", ""))
        image = next((sample[ext] for ext in IMAGE_EXTENSIONS if sample.get(ext) is not None), None)
        if image is None or sample.get("json") is None:
            raise samples.SkipSample("missing_member", f"sample {key!r} lacks its jpg or json member")
        return self.build(image, sample["json"], rng_for(self.seed, key, self.kind))


class ImageTextSamples(SampleBuilder):
    """WebDataset sample -> image-text sample (one caption drawn; RandomResizedCrop, flip, RandAugment)."""

    kind = "image_text"

    def build(self, image: Any, meta: Any, rng) -> dict[str, Any]:
        return samples.image_text_sample(image, meta, rng, self.config)


class RegionSamples(SampleBuilder):
    """WebDataset sample -> region sample (anchor crop, whole-image caption row + box rows, patch masks)."""

    kind = "region"

    def build(self, image: Any, meta: Any, rng) -> dict[str, Any]:
        return samples.region_sample(image, meta, rng, self.config)


class SkipCounter:
    """What a stage skipped, by reason (as the loader's skip counters); the first skip of each reason is logged."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, key: str, skip: samples.SkipSample) -> None:
        if not self.counts[skip.reason]:
            log.warning("webdataset stage: skipping %s (%s: %s); further %s skips are only counted", key,
                        skip.reason, skip.detail, skip.reason)
        self.counts[skip.reason] += 1


def stage(builder: SampleBuilder, skips: SkipCounter | None = None
          ) -> Callable[[Iterable[dict[str, Any]]], Iterator[dict[str, Any]]]:
    """A generator stage for `.compose(...)`: every sample `builder` can build, the others counted in `skips`."""
    counter = skips if skips is not None else SkipCounter()

    def run(source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in source:
            try:
                yield builder(sample)
            except samples.SkipSample as skip:
                counter.add(str(sample.get("__key__", "")), skip)

    run.skips = counter   # type: ignore[attr-defined]
    return run


def image_text_stage(config: LoaderConfig, seed: int = 0, skips: SkipCounter | None = None):
    """`.compose(image_text_stage(config))`: image-text samples of a WebDataset pipeline over our shards."""
    return stage(ImageTextSamples(config, seed), skips)


def region_stage(config: LoaderConfig, seed: int = 0, skips: SkipCounter | None = None):
    """`.compose(region_stage(config))`: region samples of a WebDataset pipeline over our shards."""
    return stage(RegionSamples(config, seed), skips)
