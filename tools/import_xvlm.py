"""`xvlm import-xvlm`: an official X-VLM checkpoint (the .pth / .th its scripts save) -> our model folder
(train/official_checkpoints.py), from the command line."""
from __future__ import annotations

import argparse
import shlex

from train.official_checkpoints import import_checkpoint

DESCRIPTION = (
    "Import an official X-VLM checkpoint (github.com/zengyan-97/X-VLM): the dict Pretrain.py saves ({'model': ...,\n"
    "'config': ...}; 4M and 16M base), or a fine-tuned one (Retrieval.py, Grounding_bbox.py: text keys without\n"
    "`bert.`, no MLM head). It is read with torch.load(weights_only=True): a file that needs code execution is\n"
    "refused. Every tensor is mapped onto our X-VLM (Swin tower in timm, BERT layers from transformers, heads);\n"
    "Swin's relative position indices and window masks and BERT's position_ids are checked against ours, not\n"
    "copied. An unmapped, missing or mis-shaped tensor is an error naming the key.\n"
    "Writes OUT/model.safetensors (weights + model config: `xvlm train model.init=OUT`, `xvlm eval --checkpoint\n"
    "OUT`) and OUT/import.json (what was mapped and checked, the checkpoint's own config)."
)
EPILOG = (
    "examples:\n"
    "  xvlm import-xvlm 4m_base_model_state_step_199999.th --out models/xvlm-4m\n"
    "  xvlm import-xvlm checkpoint_best.pth --out models/xvlm-coco --new-heads      # a Retrieval fine-tune at 384 px\n"
    "  xvlm import-xvlm 16m_base_model_state_step_199999.th --out models/xvlm-16m --preset base   # must be base\n"
    "  xvlm eval --checkpoint models/xvlm-4m --data data/shards-val --tokenizer bert-base-uncased/\n"
    "CPU round trip with random base weights (no download, about a minute):\n"
    "  python -c \"from model.config import preset; from model.xvlm import build_model; from model.io import save_model; \\\n"
    "    save_model(build_model(preset('base')), '/tmp/x/model.safetensors')\"\n"
    "  xvlm export-xvlm /tmp/x --out /tmp/x.pth && xvlm import-xvlm /tmp/x.pth --out /tmp/y"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="official X-VLM checkpoint file (local or s3://)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write (local or s3://)")
    parser.add_argument("--preset", default="auto", choices=["auto", "base"],
                        help="auto (default): our base model with the sizes the checkpoint's tensors show (a "
                             "pretrained X-VLM-base at 224 px gives exactly `base`; fine-tunes at 384 px give window "
                             "12); base: the tensors must fit the base preset, else the first mismatching key is "
                             "named with both shapes")
    parser.add_argument("--new-heads", action="store_true",
                        help="initialise the heads the checkpoint does not have (fine-tunes: MLM head; Retrieval: box "
                             "head; Grounding_bbox: ITC, ITM and MLM heads) freshly; without it such a checkpoint is "
                             "refused. The new heads are listed in import.json")
    parser.add_argument("--text-heads", type=int, help="BERT attention heads (--preset auto; default width / 64)")
    parser.add_argument("--image-res", type=int,
                        help="image resolution (--preset auto; default the checkpoint config's image_res)")


def run(args: argparse.Namespace) -> int:
    report = import_checkpoint(args.checkpoint, args.out, args.preset, args.new_heads, args.text_heads,
                               args.image_res)
    new = f"; new heads: {', '.join(report['new_heads'])}" if report["new_heads"] else ""
    print(f"imported {args.checkpoint} ({report['kind']} layout, {report['tensors']} tensors mapped, "
          f"{report['checked_not_copied']} checked, not copied{new}) -> {args.out}")
    overrides = " ".join(shlex.quote(o) for o in [*report["train_overrides"], f"model.init={args.out}"])
    print(f"  train from it: xvlm train --config C.yaml {overrides}")
    print(f"  evaluate it:   xvlm eval --checkpoint {args.out} --data SHARDS --tokenizer BERT_FOLDER")
    return 0
