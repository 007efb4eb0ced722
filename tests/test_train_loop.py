"""The step loop in one process on random in-memory batches: evaluation hook, gradient accumulation, summaries."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.errors import XvlmError
from train.config import load_config
from train.loop import train
from train.metrics import read_metrics

TINY = str(Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_cpu.yaml")


def config(out: Path, *overrides: str):
    return load_config(TINY, [f"out={json.dumps(str(out))}", "data.synthetic=true", "schedule.steps=3",
                              "schedule.warmup_steps=1", "checkpoint.every=100", "logging.progress=false",
                              "logging.tensorboard=false", "data.image_text_batch_size=4", "data.region_batch_size=4",
                              "data.region_max_images=2", "schedule.iter_perc=0.5", *overrides])


def losses(out: Path) -> list[tuple]:
    return [(e["step"], e["loss"], e["losses"]) for e in read_metrics(str(out / "metrics.jsonl"))]


def test_evaluation_hook_runs_on_schedule_without_moving_the_training_rng(tmp_path):
    plain = train(config(tmp_path / "plain"))
    calls = []

    def evaluate(model, cfg, device=None):
        calls.append((model.training, cfg.eval.datasets))
        torch.rand(1000)  # an evaluation that draws random numbers must not change the next training steps
        return {"i2t_r1": 0.25 * len(calls), "skipped": {"bad": 1}}

    with_eval = train(config(tmp_path / "eval", "eval.every=2", "eval.datasets=[held-out]"), evaluate=evaluate)
    assert calls == [(False, ["held-out"])]                       # step 2 only, in eval mode
    assert losses(tmp_path / "eval") == losses(tmp_path / "plain")
    entries = read_metrics(str(tmp_path / "eval" / "metrics.jsonl"))
    assert [e.get("eval") for e in entries] == [None, {"i2t_r1": 0.25}, None]
    assert with_eval["eval"] == {"i2t_r1": 0.25} and plain["eval"] == {}
    assert plain["steps"] == 3 and plain["start_step"] == 0

    # a finished run resumed does nothing more; a fresh start among its checkpoints is refused
    again = train(config(tmp_path / "plain"))
    assert (again["start_step"], again["steps_run"]) == (3, 0)
    assert losses(tmp_path / "plain") == losses(tmp_path / "eval")
    with pytest.raises(XvlmError, match="already holds checkpoints"):
        train(config(tmp_path / "plain", "checkpoint.resume=none"))


def test_gradient_accumulation_takes_several_batches_per_step(tmp_path):
    # ours (per_batch): an iteration is grad_accum batches of either kind in one optimizer step
    summary = train(config(tmp_path / "ours", "schedule.grad_accum=2", "schedule.mode=alternating", "schedule.steps=2",
                           "schedule.iter_perc_mode=per_batch"))
    entries = read_metrics(str(tmp_path / "ours" / "metrics.jsonl"))
    assert [sum(e["kinds"].values()) for e in entries] == [2, 2]
    assert [e["optimizer_steps"] for e in entries] == [1, 2] and summary["optimizer_steps"] == 2
    assert summary["last"]["step"] == 2
    # the lr follows the warmup-then-decay schedule: 0 at step 1 (warmup from 0), the peak at step 2
    assert [e["lr"] for e in entries] == [0.0, 3e-4]
    # X-VLM (xvlm): two image-text batches per iteration in one step, their region batches in a step before it
    train(config(tmp_path / "xvlm", "schedule.grad_accum=2", "schedule.steps=4", "schedule.iter_perc=0.7"))
    entries = read_metrics(str(tmp_path / "xvlm" / "metrics.jsonl"))
    assert all(e["kinds"]["image_text"] == 2 for e in entries)
    steps = [1 + (e["kinds"]["region"] > 0) for e in entries]
    assert [e["optimizer_steps"] for e in entries] == np.cumsum(steps).tolist() and max(steps) == 2
    assert all(("grad_norm_region" in e) == (e["kinds"]["region"] > 0) for e in entries)


def test_scheduler_steps_once_per_image_text_iteration(tmp_path):
    """X-VLM's Pretrain.py: a region optimizer step (probability iter_perc) before each image-text step, both at
    the current lr; scheduler.step() only after the image-text step, so warmup and decay count iterations."""
    from train import distributed
    from train.loop import Trainer

    cfg = config(tmp_path, "schedule.steps=24", "schedule.warmup_steps=4", "schedule.iter_perc=0.5")
    assert (cfg.schedule.mode, cfg.schedule.iter_perc_mode) == ("alternating", "xvlm")   # tiny_cpu.yaml: X-VLM's
    ctx = distributed.setup(None)
    trainer = Trainer(cfg, ctx)
    steps = []                                  # (kind of the step's batch, lr it trained at)
    original = trainer._optimizer_step

    def record(batches, *args):
        steps.append((batches[0]["kind"], trainer.optimizer.param_groups[0]["lr"]))
        return original(batches, *args)

    trainer._optimizer_step = record
    summary = trainer.run()
    entries = read_metrics(str(tmp_path / "metrics.jsonl"))
    image_text = [lr for kind, lr in steps if kind == "image_text"]
    regions = [(i, lr) for i, (kind, lr) in enumerate(steps) if kind == "region"]
    assert len(image_text) == 24 == summary["steps"] and summary["optimizer_steps"] == len(steps) > 24
    # iteration t (1-based) trains at factor(t - 1): warmup over 4 iterations, then linear decay to 0 at 24
    factors = [t / 4 if t < 4 else (24 - t) / 20 for t in range(24)]
    assert image_text == pytest.approx([3e-4 * f for f in factors])
    assert [e["lr"] for e in entries] == pytest.approx(image_text)
    # a region step comes right before an image-text step and trains at that step's lr
    for i, lr in regions:
        assert steps[i + 1][0] == "image_text" and steps[i + 1][1] == lr
    assert [e["optimizer_steps"] for e in entries] == np.cumsum([1 + e["kinds"]["region"] for e in entries]).tolist()


def test_loss_weights_scale_the_sum_and_zero_skips_a_loss(tmp_path):
    no_dropout = ("model.hidden_dropout_prob=0", "model.attention_probs_dropout_prob=0")
    train(config(tmp_path / "full", *no_dropout))
    full = losses(tmp_path / "full")
    train(config(tmp_path / "weighted", "loss.itm=0", "loss.mlm=0", "loss.giou=2", *no_dropout))
    weighted = losses(tmp_path / "weighted")
    assert all(not any(name.endswith(("/itm", "/mlm")) for name in parts) for _, _, parts in weighted)
    first_step, first_total, first_parts = weighted[0]
    # The step's total is the weighted sum of what it logged (each batch's losses, giou counted twice).
    assert first_total == pytest.approx(sum(v * (2 if k.endswith("/giou") else 1) for k, v in first_parts.items()),
                                        rel=1e-5)
    # The first step sees the same initial weights and batches: ITC is the same number with or without the others.
    assert first_parts["image_text/itc"] == pytest.approx(full[0][2]["image_text/itc"], rel=1e-6)


def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(config(tmp_path / "tb", "logging.tensorboard=true"))
    entries = read_metrics(str(tmp_path / "tb" / "metrics.jsonl"))
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "samples_per_s", "data_wait_frac"} <= tags
    for name in ("loss", "lr"):
        logged = [(s.step, s.value) for s in events.Scalars(name)]
        assert [step for step, _ in logged] == [e["step"] for e in entries]
        assert [value for _, value in logged] == pytest.approx([e[name] for e in entries], rel=1e-6)
    losses_logged = {tag for tag in tags if tag.startswith("losses/")}
    assert losses_logged == {f"losses/{name}" for e in entries for name in e["losses"]}
