"""Trainer configuration, optimizer groups, lr schedule and checkpoint bookkeeping (no training)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from model.config import preset as model_preset
from model.xvlm import build_model
from storage.errors import XvlmError
from train import checkpoint as ckpt
from train.config import apply_overrides, load_config, parse_override
from train.optim import WarmupLinearDecay, build_optimizer, build_scheduler

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
TINY = str(CONFIGS / "tiny_cpu.yaml")
BASE = str(CONFIGS / "xvlm_base_4m.yaml")


def test_shipped_configs_load_with_the_paper_recipe():
    base = load_config(BASE)
    assert (base.optim.lr, base.optim.betas, base.optim.eps, base.optim.weight_decay) == (1e-4, (0.9, 0.98), 1e-8, 0.01)
    # Pretrain.py: 41 epochs x ceil(5,114,489 / 1,024) image-text iterations, the scheduler stepping once per iteration
    assert (base.schedule.warmup_steps, base.schedule.steps, base.schedule.iter_perc) == (2500, 41 * 4995, 0.5)
    assert (base.schedule.mode, base.schedule.iter_perc_mode) == ("alternating", "xvlm")
    assert base.optim.grad_clip == 1.0 and base.optim.new_param_lr_mult == 2.0
    assert base.model.build().vision_name == "swin_base_patch4_window7_224"
    loader = base.data.build()
    assert (loader.image_text_batch_size, loader.region_batch_size, loader.region_max_images) == (128, 128, 48)
    # every one of our own choices is off: the X-VLM config is the loader's defaults on these switches
    from shards.loader_config import OURS, LoaderConfig

    defaults = LoaderConfig()
    for name, ours in OURS.items():
        if name != "iter_perc_mode":
            assert getattr(loader, name) == getattr(defaults, name) != ours, name
    # the CPU quickstart keeps ours, written out in its config (its measured results were made with them)
    quick = load_config(str(CONFIGS / "quickstart_cpu.yaml"), ["data.datasets=[x]"])
    assert quick.schedule.iter_perc_mode == "per_batch" and quick.schedule.mode == "summed"
    assert all(getattr(quick.data.build(), name) == ours for name, ours in OURS.items()
               if name not in ("iter_perc_mode", "phrase_captions"))    # (phrase captions: separate streams only)
    tiny = load_config(TINY)
    assert tiny.model.build().hidden_size == 64


def test_xvlm_config_builds_the_official_model_behaviour_and_switches_reach_it():
    """X-VLM's ITC gradient convention, ITM negatives and head LayerNorm eps in the X-VLM config; our variants are
    model overrides (docs/fidelity.md)."""
    model = load_config(BASE).model.build()
    assert (model.itc_gather_grad, model.itm_positives, model.head_layer_norm_eps) == ("local", "diagonal", 1e-5)
    assert (model.itc_same_text, model.box_head, model.text_cls) == ("negative", "xvlm", "cls")
    ours = load_config(BASE, ["model.itc_gather_grad=sum", "model.itm_positives=same_box",
                              "model.head_layer_norm_eps=1.0e-12"]).model.build()
    assert (ours.itc_gather_grad, ours.itm_positives, ours.head_layer_norm_eps) == ("sum", "same_box", 1e-12)
    with pytest.raises(XvlmError, match="itm_positives must be 'diagonal' or 'same_box'"):
        load_config(BASE, ["model.itm_positives=all"])


def test_overrides_are_yaml_scalars_and_reach_every_section():
    cfg = load_config(TINY, ["schedule.steps=7", "schedule.warmup_steps=0", "optim.lr=5e-4",
                             "optim.betas=[0.8, 0.9]", "logging.progress=false", "model.box_head=softargmax",
                             "data.image_text_batch_size=3", "out=s3://bucket/run", "schedule.mode=alternating"])
    assert cfg.schedule.steps == 7 and cfg.optim.lr == 5e-4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.logging.progress is False and cfg.out == "s3://bucket/run"
    assert cfg.model.build().box_head == "softargmax"
    assert cfg.data.build().image_text_batch_size == 3
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=") == (["a"], "")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize("override, message", [
    ("schedule.stepz=3", "unknown config key schedule.stepz; valid keys in schedule: ['grad_accum'"),
    ("nope=1", "unknown config key nope; valid keys: ['checkpoint', 'compile', 'compile_backend', 'compile_mode', 'data'"),
    ("data.batch=4", "unknown config key data.batch; valid keys in data:"),
    ("model.boxhead=x", "unknown model config keys ['boxhead']"),
    ("optim.lr=abc", "optim.lr='abc': expected a number"),
    ("optim.lr=-1", "optim.lr=-1.0 must be > 0"),
    ("schedule.mode=mixed", "schedule.mode='mixed': choose one of ['summed', 'alternating']"),
    ("schedule.steps=2.5", "schedule.steps=2.5: expected an integer"),
    ("schedule.warmup_steps=999", "schedule.warmup_steps=999 must lie in [0, schedule.steps=200]"),
    ("optim.betas=[0.9]", "optim.betas=[0.9]: expected a list of 2 values"),
    ("checkpoint.keep=0", "checkpoint.keep=0 must be >= 1"),
    ("loss.itm=-1", "loss.itm=-1.0 must be >= 0 (0 skips that loss)"),
    ("loss.contrast=1", "unknown config key loss.contrast; valid keys in loss: ['bbox', 'centre', 'giou', 'itc', 'itm', 'mlm']"),
    ("data.region_max_images=0", "region_max_images must be a positive integer, got 0"),
    ("data.streams=both", "streams must be one of ['separate', 'shared'], got 'both'"),
    ("schedule.iter_perc_mode=sometimes", "schedule.iter_perc_mode='sometimes': choose one of ['xvlm', 'per_batch']"),
    ("schedule", "is not of the form dotted.key=value"),
    ("schedule.steps.x=1", "schedule.steps is a value, not a section"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(XvlmError) as err:
        load_config(TINY, [override])
    assert message in str(err.value)


def test_a_config_must_keep_an_image_text_loss():
    with pytest.raises(XvlmError, match="must keep at least one of itc, itm, mlm above 0"):
        load_config(TINY, ["loss.itc=0", "loss.itm=0", "loss.mlm=0"])
    assert load_config(TINY, ["loss.itm=0", "loss.mlm=0", "loss.bbox=0.5"]).loss.weights() == \
        {"itc": 1.0, "bbox": 0.5, "giou": 1.0}
    # region batches alone (per_batch with iter_perc 1: the quickstart's box warm-up) may train the box losses
    # alone, but not nothing; X-VLM's iterations always hold an image-text batch
    boxes_only = ["loss.itc=0", "loss.itm=0", "loss.mlm=0", "schedule.iter_perc=1.0"]
    with pytest.raises(XvlmError, match="must keep at least one of itc, itm, mlm above 0"):
        load_config(TINY, boxes_only)
    boxes_only.append("schedule.iter_perc_mode=per_batch")
    assert load_config(TINY, boxes_only).loss.weights() == {"bbox": 1.0, "giou": 1.0}
    with pytest.raises(XvlmError, match="must keep at least one loss above 0"):
        load_config(TINY, boxes_only + ["loss.bbox=0", "loss.giou=0"])


def test_centre_loss_needs_a_box_head_that_attends():
    with pytest.raises(XvlmError, match="loss.centre=1.0 trains the attention of a softargmax or dense box head"):
        load_config(TINY, ["loss.centre=1", "model.box_head=xvlm"])
    assert load_config(TINY, ["loss.centre=1", "model.box_head=dense"]).loss.weights()["centre"] == 1.0


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(XvlmError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(XvlmError, match="must hold a mapping"):
        load_config(str(bad))
    no_data = tmp_path / "nodata.yaml"
    no_data.write_text("model: {preset: tiny}\n")
    with pytest.raises(XvlmError, match="data.datasets"):
        load_config(str(no_data))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TINY, ["model.box_head=softargmax", "data.num_workers=1", "schedule.steps=9",
                             "schedule.warmup_steps=1"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(str(path))
    assert again == cfg
    assert yaml.safe_load(cfg.to_yaml())["model"] == {"preset": "tiny", "box_head": "softargmax"}


def test_warmup_then_linear_decay_and_new_parameter_lr():
    f = WarmupLinearDecay(warmup=4, total=12)
    assert [f(s) for s in range(0, 13, 2)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert WarmupLinearDecay(0, 10, min_ratio=0.1)(10) == pytest.approx(0.1)
    cfg = load_config(TINY, ["optim.lr=1e-3", "schedule.warmup_steps=2", "schedule.steps=4"])
    model = build_model(model_preset("tiny"))
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.schedule)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-8
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["new_decay"]["lr"] == 2 * by_name["base_decay"]["lr"] == 0.0  # warmup starts at 0
    assert by_name["base_no_decay"]["weight_decay"] == 0.0 and by_name["base_decay"]["weight_decay"] == 0.01
    lrs = []
    for _ in range(4):
        lrs.append((by_name["base_decay"]["lr"], by_name["new_decay"]["lr"]))
        opt.step()
        sched.step()
    assert lrs == [(0.0, 0.0), (5e-4, 1e-3), (1e-3, 2e-3), (5e-4, 1e-3)]
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters())


def _fake_checkpoint(out: Path, step: int, committed: bool) -> None:
    folder = Path(ckpt.checkpoint_path(str(out), step))
    folder.mkdir(parents=True)
    (folder / ckpt.MODEL_FILE).write_bytes(b"x")
    if committed:
        (folder / ckpt.MARKER).write_text(json.dumps({"step": step, "world_size": 1, "format_version": 1}))


def test_resume_auto_ignores_partial_checkpoints_and_prune_keeps_k(tmp_path):
    for step, committed in [(10, True), (20, True), (25, False), (30, True), (40, False)]:
        _fake_checkpoint(tmp_path, step, committed)
    assert [s for s, _ in ckpt.committed_checkpoints(str(tmp_path))] == [10, 20, 30]
    assert ckpt.resolve_resume(str(tmp_path), "auto").endswith("ckpt-00000030")
    assert ckpt.resolve_resume(str(tmp_path), "none") is None
    with pytest.raises(XvlmError, match="no committed checkpoint"):
        ckpt.resolve_resume(str(tmp_path), ckpt.checkpoint_path(str(tmp_path), 40))
    removed = ckpt.prune(str(tmp_path), keep=2)
    assert sorted(Path(p).name for p in removed) == ["ckpt-00000010", "ckpt-00000025"]
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["ckpt-00000020", "ckpt-00000030", "ckpt-00000040"]  # the newer partial one may be in progress
    assert ckpt.resolve_resume(str(tmp_path / "empty"), "auto") is None


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    import io
    import random

    import numpy as np

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    buffer = io.BytesIO()
    torch.save(ckpt.rng_state(), buffer)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_a_config_extends_another(tmp_path):
    """`extends: BASE.yaml` (relative to the config): its keys over the base's, mappings merged key by key."""
    (tmp_path / "base.yaml").write_text("data: {synthetic: true}\nschedule: {steps: 10, warmup_steps: 1}\n"
                                        "loss: {itm: 0.5}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nschedule: {steps: 5}\n")
    cfg = load_config(str(tmp_path / "child.yaml"), ["loss.mlm=0"])
    assert (cfg.schedule.steps, cfg.schedule.warmup_steps, cfg.data.synthetic) == (5, 1, True)
    assert (cfg.loss.itm, cfg.loss.mlm) == (0.5, 0.0)
    assert "extends" not in cfg.to_yaml()
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(XvlmError, match="chains more than 8 files"):
        load_config(str(tmp_path / "loop.yaml"))
    (tmp_path / "bad.yaml").write_text("extends: [a, b]\n")
    with pytest.raises(XvlmError, match="must name a YAML config file"):
        load_config(str(tmp_path / "bad.yaml"))
