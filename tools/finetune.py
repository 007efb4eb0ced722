"""`xvlm finetune retrieval|grounding`: fine-tune a pretrained X-VLM on X-VLM's downstream files with the trainer."""
from __future__ import annotations

import argparse
import json
import logging


log = logging.getLogger(__name__)

TASKS = ("retrieval", "grounding")
DESCRIPTION = (
    "Fine-tune a pretrained X-VLM on retrieval (coco_train.json / flickr30k_train.json: ITC + ITM with same-image\n"
    "positives) or grounding (refcoco+_train.json with refs(unc).p + instances.json: L1 + GIoU of the box head),\n"
    "with X-VLM's recipes as the shipped configs (image_res 384 with the position tables resized from the 224\n"
    "checkpoint, lr 3e-5, x2 for new parameters, 10 epochs, 10% warm-up, 20 per GPU). The pretraining trainer runs it:\n"
    "checkpoints to a folder or s3://, `--resume auto` exact after a kill, torchrun, `xvlm submit`. The val file is\n"
    "scored after every epoch, the test files at the end (OUT/finetune_results.json)."
)
EPILOG = (
    "examples:\n"
    "  # the sample sets of `xvlm sample-data --out data` on CPU, from the quickstart's model\n"
    "  xvlm finetune retrieval --config train/configs/finetune_retrieval_coco.yaml --init xvlm-quickstart/run \\\n"
    "      --out runs/ft-sample model.image_res=96 finetune.train_file=[data/downstream/coco_train.json] \\\n"
    "      finetune.val_file=data/downstream/coco_val.json finetune.test_file=[data/downstream/coco_test.json] \\\n"
    "      finetune.image_root=data/downstream/images finetune.tokenizer=data/tokenizer 'model.vision_kwargs={}'\n"
    "  # X-VLM base on COCO, 8 GPUs, checkpoints on S3\n"
    "  torchrun --nproc_per_node 8 -m tools.cli finetune retrieval --config train/configs/finetune_retrieval_coco.yaml \\\n"
    "      --init runs/xvlm-base-4m/checkpoints/ckpt-00204795 --out s3://bucket/runs/ft-coco\n"
    "  # RefCOCO+ from the official checkpoint (`xvlm import-xvlm 4m_base_model_state_step_199999.th --out xvlm-4m`)\n"
    "  xvlm finetune grounding --config 'train/configs/finetune_grounding_refcoco+.yaml' --init xvlm-4m\n\n"
    "--init: a checkpoint folder (ckpt-XXXXXXXX, or a run folder's newest), a model .safetensors, or a folder from\n"
    "`xvlm import-xvlm`. The config's model section lists changes to that model's config (image_res, window size)."
)


INTERMIXED = True    # the task, then options, then overrides: tools/cli.py parses with parse_intermixed_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=TASKS, help="retrieval (ITC + ITM) or grounding (box L1 + GIoU)")
    parser.add_argument("--config", required=True,
                        help="YAML config, e.g. train/configs/finetune_retrieval_coco.yaml (local or s3://)")
    parser.add_argument("--init", required=True, metavar="CHECKPOINT",
                        help="the pretrained model: checkpoint folder, run folder (its newest checkpoint), model "
                             ".safetensors, or an `xvlm import-xvlm` folder")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. finetune.epochs=2 finetune.batch_size=8 model.image_res=96")
    parser.add_argument("--out", default=None, help="run folder, local or s3://bucket/prefix (default: the config's)")
    parser.add_argument("--resume", default=None, metavar="auto|none|PATH",
                        help="auto (default): continue from the newest committed checkpoint in --out; none; PATH")
    parser.add_argument("--summary-json", default=None, metavar="FILE",
                        help="write the run summary (steps, time, last metrics, test scores) to this JSON file")


def run(args: argparse.Namespace) -> int:
    from train.config import load_config
    from train.finetune import finetune, resolve_init

    from tools.train import command_overrides  # the overrides as `xvlm train` takes them

    task = args.task
    cfg = load_config(args.config, command_overrides(args, "finetune.epochs=2", f"finetune.task={task}",
                                                     f"finetune.init={json.dumps(resolve_init(args.init))}"))
    summary = finetune(cfg)
    if summary["rank"] != 0:
        return 0
    if args.summary_json:
        import storage

        storage.write_text(args.summary_json, json.dumps(summary, indent=2, default=str))
    last = summary.get("last") or {}
    log.info("done: step %d, %.1fs, last loss %s, val %s, run folder %s", summary["steps"], summary["wall_s"],
             last.get("loss"), summary.get("eval"), summary["out"])
    from train.finetune import headline

    for path, result in (summary.get("test") or {}).items():
        print(f"{path}: {json.dumps(headline(task, result))}")
    for path, result in (summary.get("zero_shot") or {}).items():
        print(f"{path} before fine-tuning: {json.dumps(headline(task, result))}")
    return 0
