"""`xvlm ray-train`: the Ray Train entry (train/ray_train.py): a TorchTrainer whose workers each run the project's
trainer, with restarts on failure. `xvlm submit` runs it as a Ray job; on a node of a cluster it runs directly."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from train.ray_train import build_trainer, read_config

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Train on a Ray cluster with Ray Train: a TorchTrainer starts --num-workers training processes (gloo on CPU,\n"
    "NCCL on GPU) that each run the project's trainer in the process group Ray Train set up, with the project's own\n"
    "checkpoints in the config's run folder `out` (shared storage: an absolute path every node mounts, or s3://).\n"
    "When a worker fails, Ray restarts the worker group (up to --max-failures times) and the trainer resumes from\n"
    "the newest committed checkpoint. `xvlm submit` runs this command as a Ray job."
)
EPILOG = (
    "examples (on a node of a running cluster; `ray start --head` makes a one-node one):\n"
    "  xvlm ray-train --config train/configs/tiny_cpu.yaml --num-workers 2 out=/shared/runs/tiny\n"
    "  xvlm ray-train --config s3://bucket/configs/base4m.yaml --num-workers 16 --gpus-per-worker 1\n"
    "--config env:NAME reads the YAML text from the environment variable NAME (what `xvlm submit` uses for a config\n"
    "outside the uploaded working dir)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config: path, s3:// URL, or env:NAME")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (training processes)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (0: CPU, gloo)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker")
    parser.add_argument("--max-failures", type=int, default=3,
                        help="worker-group restarts before the run fails (-1: unlimited)")
    parser.add_argument("--storage-path", help="Ray Train's own run folder (default: <out>/ray for local runs)")
    parser.add_argument("--address", default=None, help="Ray address (default: the cluster this job runs on)")


def run(args: argparse.Namespace) -> int:
    import ray
    from ray.train import TrainingFailedError

    cfg = read_config(args.config, list(args.overrides))
    trainer = build_trainer(cfg, num_workers=args.num_workers, gpus_per_worker=args.gpus_per_worker,
                            cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
                            storage_path=args.storage_path)
    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=True)
    log.info("training %s with %d worker(s), max_failures=%d", cfg.out, args.num_workers, args.max_failures)
    try:
        result = trainer.fit()
    except TrainingFailedError as err:   # out of restarts (max_failures) or a deterministic error in every attempt
        print(f"xvlm ray_train: training failed: {err}", file=sys.stderr)
        return 1
    print("xvlm ray_train result: " + json.dumps(dict(result.metrics or {}), default=str))
    if result.error is not None:
        print(f"xvlm ray_train: training failed: {result.error}", file=sys.stderr)
        return 1
    return 0
