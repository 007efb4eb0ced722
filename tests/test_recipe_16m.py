"""train/configs/xvlm_base_16m.yaml: the official 16M recipe (configs/Pretrain_XVLM_base_16m.yaml) on the 4M
config's fidelity rules: the same switches at X-VLM's values, steps counted in image-text iterations."""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from train.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"


def test_16m_config_is_the_official_recipe():
    cfg = load_config(str(CONFIGS / "xvlm_base_16m.yaml"))
    loader = cfg.data.build()
    # Pretrain.py: epochs x ceil(train_dataset_size / (batch_size x world_size)); 16M: 38, 16,219,845, 128 x 24
    assert cfg.schedule.steps == 38 * math.ceil(16_219_845 / (128 * 24)) == 200_640
    assert (cfg.schedule.warmup_steps, cfg.schedule.iter_perc, cfg.schedule.mode, cfg.schedule.iter_perc_mode) == \
        (2500, 0.5, "alternating", "xvlm")
    assert (loader.max_words, loader.max_tokens, loader.max_masks) == (30, 30, 6)
    assert (loader.image_text_batch_size, loader.region_batch_size, loader.region_max_images, loader.max_regions) == \
        (128, 128, 48, 5)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.new_param_lr_mult, cfg.optim.grad_clip) \
        == (1e-4, (0.9, 0.98), 0.01, 2.0, 1.0)
    assert cfg.schedule.seed == 42 and cfg.model.build().vision_name == "swin_base_patch4_window7_224"
    # Every other switch as in the 4M config (X-VLM's recipe): only data, sizes, steps and workers differ.
    four = yaml.safe_load((CONFIGS / "xvlm_base_4m.yaml").read_text())
    sixteen = yaml.safe_load((CONFIGS / "xvlm_base_16m.yaml").read_text())
    differ = {("out",), ("data", "datasets"), ("data", "max_words"), ("data", "max_tokens"), ("data", "max_masks"),
              ("data", "num_workers"), ("data", "region_num_workers"), ("schedule", "steps")}

    def flat(d: dict, prefix: tuple = ()) -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
        return out

    a, b = flat(four), flat(sixteen)
    assert set(a) == set(b)
    assert {k for k in a if a[k] != b[k]} == differ
    assert len(sixteen["data"]["datasets"]) == 6 and any("openimages" in d for d in sixteen["data"]["datasets"])
