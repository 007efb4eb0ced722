"""`xvlm stats`: the statistics report of a built dataset (reports/stats/), from the command line."""
from __future__ import annotations

import argparse

import storage
from reports.stats import StatsOptions, write_report

DESCRIPTION = (
    "Write a self-contained HTML statistics report (plots embedded as PNG, readable offline) and a JSON summary\n"
    "of a dataset built by `xvlm build-shards`, from its index.parquet, manifest.json and rejects.parquet only\n"
    "(no image is decoded, so it takes seconds even for millions of samples; memory stays bounded).\n"
    "Shows per-source counts of images, captions, regions and objects; captions and boxes per image; text\n"
    "lengths in words and tokens; box areas, aspect ratios and centres; image sizes; the most frequent object\n"
    "labels and attributes; rejects by reason and source with examples; shard sizes. DATASET may be a folder\n"
    "or an s3:// prefix. --compare puts a second dataset side by side."
)
EPILOG = (
    "examples:\n"
    "  xvlm stats data/shards                                   # writes report.html and report.json\n"
    "  xvlm stats data/shards --out /tmp/r.html --json /tmp/r.json\n"
    "  xvlm stats s3://bucket/xvlm/v2 --compare s3://bucket/xvlm/v1 --out compare.html\n"
    "  xvlm stats data/shards --tokenizer data/sample/tokenizer  # WordPiece token counts (needs caption texts\n"
    "                                                            # in the index; else whitespace counts)\n"
    "see docs/reports.md for every section of the report and the JSON fields."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATASET", help="dataset folder or s3://bucket/prefix (with manifest.json)")
    parser.add_argument("--out", default="report.html", metavar="HTML",
                        help="the HTML report to write, local or s3:// (default report.html)")
    parser.add_argument("--json", dest="json_out", default=None, metavar="JSON",
                        help="the JSON summary to write (default: --out with .json instead of .html)")
    parser.add_argument("--compare", default=None, metavar="OTHER",
                        help="a second dataset to show side by side (e.g. the previous build)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="BERT WordPiece tokenizer folder for token counts; without it tokens are counted by "
                             "whitespace. WordPiece needs caption texts in index.parquet")
    parser.add_argument("--batch-size", type=int, default=65_536, metavar="ROWS",
                        help="index rows read at a time (bounds memory; default 65536)")
    parser.add_argument("--endpoint-url", default=None, metavar="URL",
                        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.endpoint_url:
        storage.set_endpoint_url(args.endpoint_url)
    options = StatsOptions(dataset=args.dataset, out=args.out, json_out=args.json_out, compare=args.compare,
                           tokenizer=args.tokenizer, batch_size=args.batch_size, progress=not args.no_progress)
    document = write_report(options)
    for s in document["datasets"]:
        t = s["samples"]["total"]
        print(f"{s['dataset']}: {t['images']:,} images, {t['captions']:,} captions, {t['regions']:,} regions, "
              f"{t['objects']:,} objects, {s['rejects']['total']:,} rejected records")
        for note in s["notes"]:
            print(f"  note: {note}")
    print(f"wrote {options.out} and {options.json_path}")
    return 0
