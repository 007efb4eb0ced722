"""`xvlm eval`: zero-shot retrieval R@1/5/10 and grounding accuracy of a checkpoint on held-out shards
(train/eval_checkpoint.py), or on X-VLM's downstream files (--task retrieval|grounding: train/downstream_eval.py),
from the command line."""
from __future__ import annotations

import argparse
import json

import storage
from storage.errors import XvlmError
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
    "official config's max_words / max_tokens).\n\n"
    "--task retrieval|grounding evaluates on X-VLM's own downstream files instead (docs/downstream.md), as the\n"
    "official Retrieval.py / Grounding_bbox.py compute it:\n"
    "  retrieval  --ann coco_test.json (one entry per image with its caption list; repeatable) --images ROOT:\n"
    "             ITC ranks all pairs, ITM re-scores each query's top --k-test (256); TR / IR R@1/5/10 and their\n"
    "             mean in percent\n"
    "  grounding  --ann refcoco+_val.json --ann refcoco+_test.json --images ROOT (boxes and splits from\n"
    "             refcoco+/refs(unc).p + instances.json beside the files, or --refs / --instances): accuracy\n"
    "             (IoU >= 0.5) per split val / testA / testB\n"
    "The results go to --out (JSON) and a table in the paper's layout, the paper's X-VLM numbers beside ours.\n"
    "Missing images are counted and left out with their texts; the table says over how many."
)
EPILOG = (
    "examples:\n"
    "  xvlm eval --checkpoint auto --run runs/tiny --data data/shards-val\n"
    "  xvlm eval --checkpoint runs/tiny/checkpoints/ckpt-00000200 --data data/shards-val --k-test 32 \\\n"
    "      --out runs/tiny/eval.json\n"
    "  xvlm eval --checkpoint s3://bucket/model.safetensors --data s3://bucket/shards-val --tokenizer tok/\n"
    "  xvlm eval --checkpoint models/xvlm-4m --data data/shards-val --tokenizer bert-base-uncased/   # imported\n"
    "  xvlm eval --checkpoint auto --run runs/tiny --data data/shards-val --max-images 100 --k-test 8   # quick\n"
    "  xvlm eval --task retrieval --checkpoint auto --run runs/ft --ann data/sample/downstream/coco_test.json \\\n"
    "      --images data/sample/downstream/images --out runs/ft/coco_test.json\n"
    "  xvlm eval --task grounding --checkpoint auto --run runs/ft --ann data/sample/downstream/refcoco+_val.json \\\n"
    "      --ann data/sample/downstream/refcoco+_test.json --images data/sample/downstream/images\n"
    "  xvlm eval --task retrieval --checkpoint s3://b/ft/model.safetensors --tokenizer tok/ \\\n"
    "      --ann s3://b/finetune/coco_test.json --images s3://b/images/coco --k-test 256"
)



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=("shards", "retrieval", "grounding"), default="shards",
                        help="shards (default): held-out shards (--data); retrieval / grounding: X-VLM's downstream "
                             "files (--ann, --images)")
    parser.add_argument("--checkpoint", required=True, metavar="PATH|auto",
                        help="a checkpoint folder (…/checkpoints/ckpt-XXXXXXXX), `auto` (newest committed checkpoint "
                             "of --run), a folder from `xvlm import-xvlm`, or a model .safetensors file; local or s3://")
    parser.add_argument("--run", help="run folder (local or s3://) for --checkpoint auto")
    parser.add_argument("--data", action="append", metavar="DATASET",
                        help="--task shards: held-out dataset folder or s3:// prefix (repeatable)")
    parser.add_argument("--ann", action="append", metavar="FILE",
                        help="--task retrieval: coco_test.json / flickr30k_test.json ...; --task grounding: "
                             "refcoco+_val.json, refcoco+_test.json ... (X-VLM's files, local or s3://; repeatable)")
    parser.add_argument("--images", metavar="ROOT", help="--task retrieval|grounding: the image root the files' "
                                                         "\"image\" paths are relative to (X-VLM's image_root)")
    parser.add_argument("--refs", metavar="FILE", help="--task grounding: the refer release's refs(unc).p "
                                                       "(default: refcoco+/refs(unc).p beside the first --ann)")
    parser.add_argument("--instances", metavar="FILE", help="--task grounding: the refer release's instances.json "
                                                            "(default: beside the refs file)")
    parser.add_argument("--itm-batch", type=int, default=256,
                        help="--task retrieval: (image, text) pairs per ITM forward (default 256)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the run config's data.tokenizer)")
    parser.add_argument("--max-words", type=int, help="pre_caption word limit (default: the run config's; "
                                                      "--task retrieval|grounding: a fine-tuning run's "
                                                      "finetune.max_words, else 30 as X-VLM's fine-tuning)")
    parser.add_argument("--max-tokens", type=int, help="token limit incl. [CLS] (default: the run config's; "
                                                       "--task retrieval|grounding: a fine-tuning run's "
                                                       "finetune.max_tokens, else 40)")
    parser.add_argument("--k-test", type=int, default=None,
                        help=f"ITM re-ranks each query's top-k ITC candidates (--task shards: default "
                             f"{DEFAULT_K_TEST}; 0 = ITC ranking only, the default when the run trained without ITM: "
                             "loss.itm 0; --task retrieval: default the fine-tuning run's finetune.k_test, else 256 as "
                             "configs/Retrieval_coco.yaml; Flickr30K uses 128)")
    parser.add_argument("--batch-size", type=int, default=64, help="images / texts / pairs per forward (default 64)")
    parser.add_argument("--max-images", type=int, help="evaluate the first N held-out samples only")
    parser.add_argument("--iou", type=float, default=0.5, help="IoU threshold of a correct box (default 0.5)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    parser.add_argument("--out", help="write the metrics as JSON to this file (local or s3://)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _check_task_arguments(args: argparse.Namespace) -> None:
    if args.task == "shards":
        if not args.data:
            raise XvlmError("xvlm eval needs --data DATASET (held-out shards), or --task retrieval|grounding with "
                            "--ann FILE --images ROOT")
        extra = [f"--{n}" for n in ("ann", "images", "refs", "instances") if getattr(args, n)]
        if extra:
            raise XvlmError(f"{', '.join(extra)} belong to --task retrieval|grounding; add --task")
        return
    if args.data:
        raise XvlmError(f"--data is for held-out shards (--task shards), not --task {args.task}; give --ann FILE")
    if not args.ann or not args.images:
        raise XvlmError(f"--task {args.task} needs --ann FILE (X-VLM's annotation file) and --images ROOT (the "
                        f"image root its paths are relative to)")
    if args.task == "retrieval" and (args.refs or args.instances):
        raise XvlmError("--refs / --instances belong to --task grounding")


def _run_downstream(args: argparse.Namespace) -> int:
    from reports.downstream import downstream_tables
    from train.downstream_eval import DownstreamRequest, evaluate_downstream_checkpoint

    request = DownstreamRequest(task=args.task, checkpoint=args.checkpoint, ann=list(args.ann), images=args.images,
                                run=args.run, refs=args.refs, instances=args.instances, tokenizer=args.tokenizer,
                                max_words=args.max_words, max_tokens=args.max_tokens,
                                k_test=args.k_test, batch_size=args.batch_size,
                                itm_batch=args.itm_batch, iou=args.iou, device=args.device,
                                progress=not args.no_progress)
    report = evaluate_downstream_checkpoint(request)
    text = json.dumps(report, indent=2)
    if args.out:
        storage.write_text(args.out, text + "\n")
    print(downstream_tables(report))
    if args.out:
        print(f"\nwrote {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    _check_task_arguments(args)
    if args.task != "shards":
        return _run_downstream(args)
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
