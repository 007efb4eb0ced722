"""`xvlm export-xvlm`: our model (a run, a checkpoint, an imported folder or a model file) -> an official X-VLM
checkpoint that the official code loads with strict=True (train/official_checkpoints.py), from the command line."""
from __future__ import annotations

import argparse

from train.official_checkpoints import export_checkpoint

DESCRIPTION = (
    "Write our model's weights in the official X-VLM layout (github.com/zengyan-97/X-VLM): {'model': state_dict,\n"
    "'config': ...} under the names of its models/model_pretrain.py XVLM (vision_encoder.*, text_encoder.bert.*,\n"
    "text_encoder.cls.*, vision_proj, text_proj, temp, itm_head, bbox_head), with the buffers it stores (Swin's\n"
    "relative position indices and window masks, BERT's position_ids), so that `model.load_state_dict(ckpt['model'],\n"
    "strict=True)` loads it and its fine-tuning scripts (--checkpoint) start from it. The config entry holds the\n"
    "official config keys that describe the model, its Swin / BERT json values and our model config.\n"
    "Only a Swin tower with BERT's [CLS] and X-VLM's box head can be expressed (not ViT, text_cls mean, our box heads)."
)
EPILOG = (
    "examples:\n"
    "  xvlm export-xvlm runs/base4m --out xvlm_base4m.pth                  # newest committed checkpoint of the run\n"
    "  xvlm export-xvlm runs/base4m/checkpoints/ckpt-00200000 --out step200k.pth\n"
    "  xvlm export-xvlm models/xvlm-4m --out back.pth                     # a folder from `xvlm import-xvlm`\n"
    "CPU example with random base weights (no download, about half a minute):\n"
    "  python -c \"from model.config import preset; from model.xvlm import build_model; from model.io import save_model; \\\n"
    "    save_model(build_model(preset('base')), '/tmp/x/model.safetensors')\"\n"
    "  xvlm export-xvlm /tmp/x --out /tmp/x.pth"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_OR_DIR",
                        help="a run folder (its newest committed checkpoint), a checkpoint folder, a folder written by "
                             "`xvlm import-xvlm`, or a model .safetensors file; local or s3://")
    parser.add_argument("--out", required=True, metavar="CHECKPOINT.pth", help="file to write (local or s3://)")


def run(args: argparse.Namespace) -> int:
    path, entries = export_checkpoint(args.source, args.out)
    print(f"exported {path} -> {args.out} ({entries} entries in the official X-VLM layout)")
    return 0
