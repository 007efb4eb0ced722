"""Ray Train entry point: a TorchTrainer whose workers each run the project's trainer (`train.loop.train`) in the
process group Ray Train set up, with the project's own checkpoints on shared storage and restarts on failure.

Run on a cluster by `xvlm submit` (a Ray job), or directly on a node of the cluster with `xvlm ray-train`
(tools/ray_train.py):
  xvlm ray-train --config train/configs/tiny_cpu.yaml --num-workers 2 out=/shared/runs/tiny
"""
from __future__ import annotations

import logging
import os
from typing import Any

import storage
from storage.errors import XvlmError

log = logging.getLogger(__name__)

CONFIG_ENV_PREFIX = "env:"


def read_config(config: str, overrides: list[str]):
    """The validated TrainConfig from a path, an s3:// URL, or `env:NAME` (YAML text in an environment variable,
    which `xvlm submit` uses for configs outside the uploaded working dir), with `key=value` overrides."""
    import tempfile

    from train.config import load_config

    if config.startswith(CONFIG_ENV_PREFIX):
        name = config[len(CONFIG_ENV_PREFIX):]
        if name not in os.environ:
            raise XvlmError(f"--config {config}: the environment variable {name} is not set")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(os.environ[name])
        try:
            return load_config(f.name, overrides)
        finally:
            os.unlink(f.name)
    return load_config(config, overrides)


def check_shared_paths(cfg) -> None:
    """Every worker, on any node, must see the same run folder and data: relative paths would resolve inside each
    job's private working directory, so they are refused."""
    ft = cfg.finetune
    paths = {"out": [cfg.out], "data.datasets": list(cfg.data.datasets), "eval.datasets": list(cfg.eval.datasets),
             "data.tokenizer": [cfg.data.overrides.get("tokenizer") or ""], "model.init": [cfg.model.init or ""],
             "finetune.init": [ft.init], "finetune.train_file": list(ft.train_file), "finetune.val_file": [ft.val_file],
             "finetune.test_file": list(ft.test_file), "finetune.image_root": [ft.image_root],
             "finetune.refcoco_data": [ft.refcoco_data], "finetune.tokenizer": [ft.tokenizer]}
    for key, values in paths.items():
        for value in values:
            if value and storage.local_path(value) is not None and not os.path.isabs(value):
                raise XvlmError(f"config {key}={value!r} is a relative path; under Ray every worker needs shared "
                                "storage: give an absolute path on a filesystem all nodes mount, or s3://")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: rebuild the config, join Ray's process group, train (resuming from the newest
    committed checkpoint: after a worker-group restart this continues where the failed attempt committed last)."""
    import ray.train
    import ray.train.torch

    from train.config import TrainConfig
    from train.loop import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.from_dict(loop_config["train_config"])
    context = ray.train.get_context()
    if context.get_world_rank() == 0:
        log.info("Ray Train worker group of %d; run folder %s; resume=%s", context.get_world_size(), cfg.out,
                 cfg.checkpoint.resume)
    # ray.train.torch.get_device() is this worker's GPU (CUDA_VISIBLE_DEVICES is set per worker) or the CPU.
    if cfg.finetune.task:     # a fine-tuning config (`finetune.task`, `finetune.init`): train/finetune.py
        from train.finetune import finetune as train
    summary = train(cfg, device=ray.train.torch.get_device())
    last = summary.get("last") or {}
    ray.train.report({"steps": summary["steps"], "steps_run": summary["steps_run"],
                      "start_step": summary["start_step"], "wall_s": summary["wall_s"],
                      "loss": last.get("loss"), "checkpoint": summary.get("checkpoint"), "out": summary["out"]})


def build_trainer(cfg, *, num_workers: int, gpus_per_worker: float, cpus_per_worker: float, max_failures: int,
                  storage_path: str | None, name: str | None = None):
    """The TorchTrainer (gloo on CPU, NCCL on GPU) that runs `train_loop_per_worker` on `num_workers` workers."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if num_workers < 1:
        raise XvlmError(f"--num-workers must be >= 1, got {num_workers}")
    if cfg.checkpoint.resume not in ("auto",):
        # A restart after a failure must continue from the last committed checkpoint, not start over.
        raise XvlmError(f"under Ray, checkpoint.resume must be 'auto' (got {cfg.checkpoint.resume!r}): a restarted "
                        "worker group continues from the newest committed checkpoint; use a new `out` for a fresh run")
    check_shared_paths(cfg)
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    if storage_path is None and storage.local_path(cfg.out) is not None:
        storage_path = os.path.join(cfg.out, "ray")
    run_name = name or os.path.basename(cfg.out.rstrip("/")) or "xvlm"
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train_config": cfg.to_dict()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
