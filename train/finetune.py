"""Fine-tuning on X-VLM's downstream tasks with the pretraining trainer: `finetune(cfg)` for retrieval (ITC + ITM with
same-image positives, Retrieval.py) or grounding (L1 + GIoU of the box head, Grounding_bbox.py).

The run is an ordinary training run (train/loop.py): checkpoints to a folder or s3://, exact resume after a kill,
torchrun / Ray; what differs is the model (a pretraining checkpoint resized for the fine-tuning image size,
train/initial_model.py), the batches (shards/downstream_batches.py, an epoch-seeded resumable stream) and the
schedule, which counts epochs: steps = epochs x batches per epoch, warm-up = finetune.warmup x steps, as X-VLM's
create_scheduler (scheduler.py:5-12). After each epoch rank 0 scores the val file; at the end the test files.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

import storage
from storage.errors import XvlmError
from train import distributed
from train.config import FinetuneSection, TrainConfig
from train.loop import Trainer, seed_everything

log = logging.getLogger(__name__)

TASK_LOSSES = {"retrieval": ("itc", "itm"), "grounding": ("bbox", "giou", "centre")}
RESULTS_FILE = "finetune_results.json"


def check_config(cfg: TrainConfig) -> None:
    """What fine-tuning needs beyond TrainConfig.validate: a task, an initial model and losses of that task."""
    ft = cfg.finetune
    if not ft.task:
        raise XvlmError("config finetune.task is not set: use `xvlm finetune retrieval|grounding` or a "
                        "train/configs/finetune_*.yaml config")
    if not ft.init:
        raise XvlmError("fine-tuning needs a pretrained model: --init CHECKPOINT (a checkpoint folder, a model "
                        ".safetensors or a folder from `xvlm import-xvlm`)")
    weights = cfg.loss.weights()
    other = sorted(set(weights) - set(TASK_LOSSES[ft.task]))
    if other:
        raise XvlmError(f"config loss.{other[0]}={weights[other[0]]} is not a {ft.task} fine-tuning loss (those are "
                        f"{', '.join(TASK_LOSSES[ft.task])}); set it to 0")
    if not set(weights) & set(TASK_LOSSES[ft.task]):
        raise XvlmError(f"config loss: {ft.task} fine-tuning needs one of {', '.join(TASK_LOSSES[ft.task])} above 0")


def check_objectives(cfg: TrainConfig, model_config) -> None:
    """What each weighted objective needs of the fine-tuning model (e.g. the centre loss an attending box head)."""
    from model.objectives import OBJECTIVES

    for name, weight in cfg.loss.weights().items():
        requires = OBJECTIVES[name].requires
        problem = requires(model_config) if requires else None
        if problem:
            raise XvlmError(f"config loss.{name}={weight} {problem}")


def read_training_entries(ft: FinetuneSection) -> list:
    """The training entries of every train file, in order (shards/downstream.py readers)."""
    from shards.downstream import read_grounding, read_retrieval_train

    entries: list = []
    for path in ft.train_file:
        if ft.task == "retrieval":
            entries += read_retrieval_train(path)
        else:
            entries += read_grounding(path, *_refer_files(ft))
    return entries


def _refer_files(ft: FinetuneSection) -> tuple[str | None, str | None]:
    if not ft.refcoco_data:
        return None, None      # the reader's default: <annotation folder>/refcoco+/
    from shards.downstream import INSTANCES_NAME, REFS_NAME

    return storage.join(ft.refcoco_data, REFS_NAME), storage.join(ft.refcoco_data, INSTANCES_NAME)


def build_stream(cfg: TrainConfig, entries: list, grid: int, image_res: int, ctx: distributed.DistContext):
    from shards.downstream_batches import BatchOptions, DownstreamBatches

    ft = cfg.finetune
    options = BatchOptions(image_res=image_res, grid=grid, batch_size=ft.batch_size, max_tokens=ft.max_tokens,
                           max_words=ft.max_words, tokenizer=ft.tokenizer, seed=cfg.schedule.seed,
                           augment=ft.augment)
    return DownstreamBatches(ft.task, entries, ft.image_root, options, rank=ctx.rank, world_size=ctx.world_size)


def set_schedule(cfg: TrainConfig, steps_per_epoch: int) -> None:
    """Epochs into steps (X-VLM: num_training_steps = epochs x step_per_epoch, warm-up int(0.1 x that)); one batch
    per step; the val file evaluated after each epoch."""
    ft, s = cfg.finetune, cfg.schedule
    s.steps = ft.epochs * steps_per_epoch
    s.warmup_steps = int(s.steps * ft.warmup)
    s.mode, s.iter_perc_mode = "alternating", "per_batch"
    s.iter_perc = 1.0 if ft.task == "grounding" else 0.0
    if ft.eval_every_epoch and ft.val_file:
        cfg.eval.every, cfg.eval.datasets = steps_per_epoch, [ft.val_file]
    else:
        cfg.eval.every, cfg.eval.datasets = 0, []


def resolve_init(init: str) -> str:
    """--init as given, or for a run folder (one holding checkpoints/) its newest committed checkpoint."""
    from train import checkpoint as ckpt

    if init.endswith(".safetensors"):
        return init
    committed = ckpt.committed_checkpoints(init)
    return committed[-1][1] if committed else init


# ---------------------------------------------------------------------------------------------- evaluation


def eval_options(cfg: TrainConfig, progress: bool = False):
    from train.downstream_eval import DownstreamEvalConfig

    ft = cfg.finetune
    return DownstreamEvalConfig(tokenizer=ft.tokenizer, k_test=ft.k_test, max_words=ft.max_words,
                                max_tokens=ft.max_tokens, progress=progress)


def evaluate_file(model, cfg: TrainConfig, path: str, device=None, progress: bool = False) -> dict[str, Any]:
    """The downstream scores of `model` on one evaluation file (train/downstream_eval.py)."""
    from shards.downstream import read_grounding, read_retrieval_eval
    from train.downstream_eval import evaluate_grounding, evaluate_retrieval

    ft = cfg.finetune
    options = eval_options(cfg, progress)
    if ft.task == "retrieval":
        return evaluate_retrieval(model, read_retrieval_eval(path), ft.image_root, options, device=device)
    return evaluate_grounding(model, read_grounding(path, *_refer_files(ft)), ft.image_root, options, device=device)


def headline(task: str, result: dict[str, Any]) -> dict[str, float]:
    """The numbers a run logs and keeps in its checkpoints: retrieval TR/IR R@1 and their mean recall; grounding
    accuracy per split."""
    if task == "retrieval":
        return {k: float(result[k]) for k in ("txt_r1", "img_r1", "r_mean") if k in result}
    splits = result.get("splits") or {}
    out = {f"{split}_acc": float(v["acc"]) for split, v in splits.items()}
    refs = sum(v["refs"] for v in splits.values())
    if len(splits) > 1 and refs:     # every ref of the file at once (RefCOCO+ test = testA + testB)
        out["acc"] = 100.0 * sum(v["correct"] for v in splits.values()) / refs
    return out


def epoch_evaluator(cfg: TrainConfig):
    """The trainer's periodic evaluation: the val file's headline numbers."""
    def evaluate(model, run_cfg: TrainConfig, device=None) -> dict[str, float]:
        result = evaluate_file(model, run_cfg, run_cfg.finetune.val_file, device=device)
        numbers = headline(run_cfg.finetune.task, result)
        log.info("val %s: %s", run_cfg.finetune.val_file, numbers)
        return numbers
    return evaluate


# ---------------------------------------------------------------------------------------------- the run


def finetune(cfg: TrainConfig, *, device: torch.device | str | None = None) -> dict[str, Any]:
    """Fine-tune (or resume fine-tuning) `cfg.finetune.init` on `cfg.finetune.task`; returns the trainer's summary
    plus `initial` (what the initial model resized or left out) and `test` (scores per test file, rank 0)."""
    from train.initial_model import initial_model

    cfg.validate()
    check_config(cfg)
    ctx = distributed.setup(device)
    try:
        entries = read_training_entries(cfg.finetune)
        seed_everything(cfg.schedule.seed)          # new parameters start the same on every rank and every resume
        model, new, notes = initial_model(cfg.finetune.init, cfg.model.overrides)
        check_objectives(cfg, model.config)
        positions = model.config.max_position_embeddings
        if cfg.finetune.max_tokens > positions:
            raise XvlmError(f"config finetune.max_tokens={cfg.finetune.max_tokens} is more than the model's "
                            f"{positions} text positions; lower it to <= {positions}")
        stream = build_stream(cfg, entries, model.grid_size, model.config.image_res, ctx)
        set_schedule(cfg, stream.steps_per_epoch)
        if ctx.is_main:
            log.info("fine-tuning %s: %d training entries, %d epochs x %d steps, warm-up %d, %d new parameters",
                     cfg.finetune.task, len(entries), cfg.finetune.epochs, stream.steps_per_epoch,
                     cfg.schedule.warmup_steps, len(new))
        trainer = Trainer(cfg, ctx, stream=stream, evaluate=epoch_evaluator(cfg), model=model, new_parameters=new)
        summary = trainer.run()
        summary["initial"] = notes
        summary["test"] = {}
        if ctx.is_main and cfg.finetune.test_file:
            record = _test_scores(trainer, cfg)
            summary["test"], summary["zero_shot"] = record["test"], record.get("zero_shot", {})
        distributed.barrier(ctx)
        return summary
    finally:
        distributed.teardown(ctx)


def _test_scores(trainer: Trainer, cfg: TrainConfig) -> dict[str, Any]:
    """Every test file's scores on rank 0 (with `finetune.zero_shot`, also the initial model's), written to
    OUT/finetune_results.json."""
    import json

    results: dict[str, Any] = {}
    with torch.no_grad():
        for path in cfg.finetune.test_file:
            results[path] = evaluate_file(trainer.model, cfg, path, device=trainer.ctx.device,
                                          progress=cfg.logging.progress)
    record = {"task": cfg.finetune.task, "init": cfg.finetune.init, "steps": trainer.step, "test": results}
    if cfg.finetune.zero_shot:
        record["zero_shot"] = zero_shot_scores(cfg, device=trainer.ctx.device)
    storage.write_text(storage.join(cfg.out, RESULTS_FILE), json.dumps(record, indent=2))
    return record


def zero_shot_scores(cfg: TrainConfig, device=None) -> dict[str, Any]:
    """The test files' scores of the model fine-tuning starts from (resized to the fine-tuning image size), with
    the RNG states restored afterwards."""
    from train.checkpoint import rng_state, set_rng_state
    from train.initial_model import initial_model

    saved = rng_state()
    try:
        seed_everything(cfg.schedule.seed)
        model, _new, _notes = initial_model(cfg.finetune.init, cfg.model.overrides)
        model.to(device or "cpu").eval()
        with torch.no_grad():
            return {path: evaluate_file(model, cfg, path, device=device) for path in cfg.finetune.test_file}
    finally:
        set_rng_state(saved)
