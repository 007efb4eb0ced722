"""`xvlm sample-data`: write the synthetic sample data (sampledata/) from the command line."""
from __future__ import annotations

import argparse
import json
import time

from sampledata.sample_data import generate

DESCRIPTION = (
    "Write a synthetic shapes-scenes dataset (coloured shapes on textured backgrounds, with true captions,\n"
    "region phrases, labels and attributes) in the real on-disk layouts of COCO 2017, Visual Genome 1.2,\n"
    "SBU Captions and Conceptual Captions 3M (TSV + img2dataset webdataset output), and a WordPiece tokenizer;\n"
    "for the 16M setting also Objects365 v2, Open Images V7 boxes, CC12M and RefCOCO/+/g, with X-VLM's evaluation\n"
    "files (COCO Karpathy, Flickr30K, RefCOCO+) and copies of evaluation pictures planted in the web sources;\n"
    "and small downstream sets from scenes that are not training pictures: COCO-style retrieval\n"
    "(coco_{train,val,test}.json) and RefCOCO+-style grounding (refs(unc).p, instances.json, refcoco+_*.json).\n"
    "Same --seed -> byte-identical files."
)
EPILOG = (
    "example:\n"
    "  xvlm sample-data data/sample                 # 1,000 training images + 200 COCO val2017 images\n"
    "  xvlm sample-data /tmp/tiny --images 60 --val-images 20 --seed 1\n\n"
    "layout: OUT/coco, OUT/vg, OUT/sbu, OUT/cc (+ OUT/cc/img2dataset), OUT/objects365, OUT/openimages, OUT/cc12m\n"
    "(+ OUT/cc12m/img2dataset), OUT/refcoco, OUT/eval, OUT/downstream, OUT/tokenizer, OUT/sample_data.json.\n"
    "See docs/sample_data.md for the split between sources and the file formats."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="output folder (local); created; a previous sample-data output there is replaced")
    parser.add_argument("--images", type=int, default=1000,
                        help="training pictures, split over COCO train2017 / VG / SBU / CC (default 1000)")
    parser.add_argument("--val-images", type=int, default=200,
                        help="held-out COCO val2017 pictures for evaluation, in addition to --images (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed -> byte-identical files (default 0)")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    summary = generate(args.out, images=args.images, val_images=args.val_images, seed=args.seed)
    elapsed = time.perf_counter() - start
    print(f"wrote {summary['total_pictures']} pictures to {args.out} in {elapsed:.1f} s (seed {args.seed})")
    for source, counts in summary["counts"].items():
        print(f"  {source:<14} {json.dumps(counts)}")
    for name, path in summary["paths"].items():
        print(f"  {name:<14} {path}")
    return 0
