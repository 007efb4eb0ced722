"""`xvlm show`: draw dataset samples with their boxes and texts (reports/show/), from the command line."""
from __future__ import annotations

import argparse

import storage
from reports.show import ShowOptions, show

DESCRIPTION = (
    "Draw samples of a dataset built by `xvlm build-shards` to PNG files: the stored image with every region /\n"
    "object box outlined in a distinct colour and numbered, and its captions and box texts listed underneath.\n"
    "Pick samples by KEY (as in index.parquet, e.g. coco-000000000139) or --random N. With --augmented also\n"
    "draw them as the training loader delivers them (shards/samples.py: the region view with its anchor crop,\n"
    "flip and resize, boxes from the loader's target boxes; the image-text view with its random resized crop),\n"
    "so you can check that boxes stay on their objects and that left/right words follow flips."
)
EPILOG = (
    "examples:\n"
    "  xvlm show data/shards --random 8 --out /tmp/show\n"
    "  xvlm show data/shards coco-000000000139 vg-2407890 --out /tmp/show\n"
    "  xvlm show data/shards --random 4 --augmented --tokenizer data/sample/tokenizer --seed 3 --out /tmp/show\n"
    "writes OUT/KEY.png, and with --augmented OUT/KEY.region.png and OUT/KEY.image_text.png. see docs/reports.md."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATASET", help="dataset folder or s3://bucket/prefix (with manifest.json)")
    parser.add_argument("keys", nargs="*", metavar="KEY", help="sample keys to draw (e.g. coco-000000000139)")
    parser.add_argument("--random", type=int, default=0, metavar="N", help="draw N random samples instead of KEYs")
    parser.add_argument("--augmented", action="store_true",
                        help="also draw each sample as the loader delivers it (region and image-text views)")
    parser.add_argument("--out", default="show", metavar="DIR", help="folder for the PNGs (default ./show)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random and of the augmentations (default 0)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="BERT WordPiece tokenizer folder (needed by --augmented: the loader tokenizes texts)")
    parser.add_argument("--preset", default="base", choices=["tiny", "base"],
                        help="loader preset for --augmented (image size, max regions; default base: 224 px)")
    parser.add_argument("--image-res", type=int, default=None, metavar="PX",
                        help="override the loader's image side for --augmented (a multiple of its grid stride)")
    parser.add_argument("--endpoint-url", default=None, metavar="URL",
                        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")


def run(args: argparse.Namespace) -> int:
    if args.endpoint_url:
        storage.set_endpoint_url(args.endpoint_url)
    options = ShowOptions(dataset=args.dataset, keys=list(args.keys), random=args.random, augmented=args.augmented,
                          out=args.out, seed=args.seed, tokenizer=args.tokenizer, preset=args.preset,
                          image_res=args.image_res)
    for path in show(options):
        print(f"wrote {path}")
    return 0
