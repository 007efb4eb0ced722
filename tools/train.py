"""`xvlm train`: X-VLM pretraining from a YAML config with dotted overrides, checkpoints and exact resume."""
from __future__ import annotations

import argparse
import json
import logging

from storage.errors import XvlmError

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Train X-VLM from a YAML config (train/configs/*.yaml) with `section.key=value` overrides.\n"
    "One process, or many under torchrun (NCCL on GPU, gloo on CPU). Checkpoints (local folder or s3://) are\n"
    "committed by a marker written last; `--resume auto` (the default) continues from the newest committed one\n"
    "with exactly the losses an uninterrupted run would have had. Metrics: a progress bar, OUT/metrics.jsonl,\n"
    "TensorBoard (OUT/tensorboard) when installed."
)
EPILOG = (
    "examples:\n"
    "  # tiny model on CPU, shards from `xvlm sample-data` + `xvlm build-shards` (see docs/training.md)\n"
    "  xvlm train --config train/configs/tiny_cpu.yaml --out runs/tiny schedule.steps=50 checkpoint.every=10\n"
    "  # a smoke run without any data: random in-memory batches\n"
    "  xvlm train --config train/configs/tiny_cpu.yaml --out /tmp/smoke data.synthetic=true schedule.steps=5 \\\n"
    "      schedule.warmup_steps=1\n"
    "  # 2 CPU processes\n"
    "  MASTER_ADDR=127.0.0.1 GLOO_SOCKET_IFNAME=lo torchrun --nproc_per_node 2 -m tools.cli train \\\n"
    "      --config train/configs/tiny_cpu.yaml --out runs/tiny2\n"
    "  # X-VLM base 4M on 8 GPUs per node, checkpoints on S3\n"
    "  torchrun --nnodes 1 --nproc_per_node 8 -m tools.cli train --config train/configs/xvlm_base_4m.yaml \\\n"
    "      --out s3://bucket/runs/xvlm-base-4m\n\n"
    "overrides: values are YAML scalars (schedule.steps=20, optim.betas=[0.9,0.98], model.box_head=softargmax);\n"
    "unknown keys are errors. The resolved config is saved as OUT/config.yaml and in every checkpoint.\n\n"
    "compile: auto (default: torch.compile on CUDA, eager on CPU), true or false; compiled runs pad each batch to\n"
    "its kind's fixed shape (data.image_text_batch_size, data.region_batch_size, data.region_max_images) and\n"
    "compile once per batch kind. Turn it off (compile=false) for short debugging runs (docs/training.md)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (local or s3://), e.g. train/configs/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides of config values, e.g. schedule.steps=100 optim.lr=5e-4")
    parser.add_argument("--out", default=None,
                        help="run folder, local or s3://bucket/prefix (checkpoints, metrics, config); default: the "
                             "config's `out`")
    parser.add_argument("--resume", default=None, metavar="auto|none|PATH",
                        help="auto (default): continue from the newest committed checkpoint in --out, if any; "
                             "none: start fresh; PATH: a ckpt-XXXXXXXX folder")
    parser.add_argument("--summary-json", default=None, metavar="FILE",
                        help="write the run summary (steps, time, last metrics) to this JSON file (rank 0)")


def command_overrides(args: argparse.Namespace, example: str, *extra: str) -> list[str]:
    """The config overrides of a training command: its KEY=VALUE arguments (checked), `extra`, then --out and
    --resume when given (xvlm train, xvlm finetune)."""
    overrides = list(args.overrides)
    for text in overrides:
        if "=" not in text:
            raise XvlmError(f"unexpected argument {text!r}: overrides are KEY=VALUE (e.g. {example})")
    overrides.extend(extra)
    if args.out is not None:
        overrides.append(f"out={json.dumps(args.out)}")  # quoted: a path is always a string
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={json.dumps(args.resume)}")
    return overrides


def run(args: argparse.Namespace) -> int:
    from train.config import load_config
    from train.loop import train

    cfg = load_config(args.config, command_overrides(args, "schedule.steps=20"))
    summary = train(cfg)
    if summary["rank"] != 0:
        return 0
    if args.summary_json:
        import storage

        storage.write_text(args.summary_json, json.dumps(summary, indent=2))
    last = summary.get("last") or {}
    log.info("done: step %d, %.1fs, last loss %s, run folder %s", summary["steps"], summary["wall_s"],
             last.get("loss"), summary["out"])
    return 0
