"""`xvlm export-xvlm`: our model (a run, a checkpoint, an imported folder or a model file) -> an official X-VLM
checkpoint that the official code loads with strict=True."""
from __future__ import annotations

import argparse
import logging

import torch

from model.errors import ModelError
import storage

log = logging.getLogger(__name__)

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


def model_file(source: str) -> str:
    """The model .safetensors file that `source` names."""
    from train import checkpoint as ckpt

    source = source.rstrip("/")
    if source.endswith(".safetensors"):
        if not storage.exists(source):
            raise ModelError(f"model file {source} does not exist")
        return source
    direct = storage.join(source, ckpt.MODEL_FILE)
    if storage.exists(direct):
        return direct
    found = ckpt.committed_checkpoints(source)
    if found:
        return storage.join(found[-1][1], ckpt.MODEL_FILE)
    raise ModelError(f"{source} holds no model: give a run folder with a committed checkpoint, a checkpoint or "
                     "imported folder with model.safetensors, or a .safetensors file")


def run(args: argparse.Namespace) -> int:
    from model.io import model_from_bytes
    from model.official import export_official, official_config

    path = model_file(args.source)
    model = model_from_bytes(storage.read_bytes(path), source=path)
    state = export_official(model)
    if model.config.head_layer_norm_eps != 1e-5:
        log.warning("this model's heads use LayerNorm eps %g; the official heads use 1e-5, so its ITM and box outputs "
                    "will differ slightly there", model.config.head_layer_norm_eps)
    with storage.atomic_write(args.out) as f:
        torch.save({"model": state, "config": official_config(model.config, state)}, f)
    print(f"exported {path} -> {args.out} ({len(state)} entries in the official X-VLM layout)")
    return 0
