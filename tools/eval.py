"""`xvlm eval`: zero-shot retrieval R@1/5/10 and grounding accuracy of a checkpoint on held-out shards
(train/eval_checkpoint.py), from the command line."""
from __future__ import annotations

import argparse
import json

import storage
from train.eval_checkpoint import DEFAULT_K_TEST, CheckpointEval, evaluate_checkpoint

DESCRIPTION = (
    "Evaluate a model on held-out shards (datasets built by `xvlm build-shards`), deterministically (each image\n"
    "plainly resized to the model's image_res, no augmentation):\n"
    "  retrieval  image->text and text->image R@1/5/10 over the split's images and captions: ITC similarity\n"
    "             ranks every candidate, the ITM head re-ranks each query's top-k (as X-VLM); itc_* = ITC alone\n"
    "  grounding  fraction of box texts whose predicted box (the text attending to the whole image, through the\n"
    "             model's box head) has IoU >= 0.5 with the true box; mean IoU; a constant-box baseline\n"
    "The checkpoint is a ckpt-XXXXXXXX folder of a run, `auto` (the newest committed one of --run), a folder\n"
    "written by `xvlm import-xvlm` (an official X-VLM checkpoint), or a model .safetensors file. Text settings\n"
    "(tokenizer, max_words, max_tokens) come from the run's config (an imported folder: --tokenizer, and the\n"
    "official config's max_words / max_tokens)."
)
EPILOG = (
    "examples:\n"
    "  xvlm eval --checkpoint auto --run runs/tiny --data data/shards-val\n"
    "  xvlm eval --checkpoint runs/tiny/checkpoints/ckpt-00000200 --data data/shards-val --k-test 32 \\\n"
    "      --out runs/tiny/eval.json\n"
    "  xvlm eval --checkpoint s3://bucket/model.safetensors --data s3://bucket/shards-val --tokenizer tok/\n"
    "  xvlm eval --checkpoint models/xvlm-4m --data data/shards-val --tokenizer bert-base-uncased/   # imported\n"
    "  xvlm eval --checkpoint auto --run runs/tiny --data data/shards-val --max-images 100 --k-test 8   # quick"
)



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH|auto",
                        help="a checkpoint folder (…/checkpoints/ckpt-XXXXXXXX), `auto` (newest committed checkpoint "
                             "of --run), a folder from `xvlm import-xvlm`, or a model .safetensors file; local or s3://")
    parser.add_argument("--run", help="run folder (local or s3://) for --checkpoint auto")
    parser.add_argument("--data", action="append", required=True, metavar="DATASET",
                        help="held-out dataset folder or s3:// prefix (repeatable)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the run config's data.tokenizer)")
    parser.add_argument("--max-words", type=int, help="pre_caption word limit (default: the run config's)")
    parser.add_argument("--max-tokens", type=int, help="token limit incl. [CLS] (default: the run config's)")
    parser.add_argument("--k-test", type=int, default=None,
                        help=f"ITM re-ranks each query's top-k ITC candidates (default {DEFAULT_K_TEST}, X-VLM uses 128 on COCO-5k; "
                             "0 = ITC ranking only, the default when the run trained without ITM: loss.itm 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images / texts / pairs per forward (default 64)")
    parser.add_argument("--max-images", type=int, help="evaluate the first N held-out samples only")
    parser.add_argument("--iou", type=float, default=0.5, help="IoU threshold of a correct box (default 0.5)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    parser.add_argument("--out", help="write the metrics as JSON to this file (local or s3://)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    request = CheckpointEval(checkpoint=args.checkpoint, run=args.run, data=list(args.data), tokenizer=args.tokenizer,
                             max_words=args.max_words, max_tokens=args.max_tokens, k_test=args.k_test,
                             batch_size=args.batch_size, max_images=args.max_images, iou=args.iou,
                             device=args.device, progress=not args.no_progress)
    metrics = evaluate_checkpoint(request)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        storage.write_text(args.out, text + "\n")
    return 0
