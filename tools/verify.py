"""`xvlm verify`: check a built dataset (reports/verify/) or a training run's checkpoints (reports/verify/run.py)."""
from __future__ import annotations

import argparse
import os

import storage
from reports.verify import VerifyOptions, report_lines, verify
from reports.verify import run as verify_run
from shards.format import MANIFEST_NAME

DESCRIPTION = (
    "Check a dataset built by `xvlm build-shards` (a folder or an s3:// prefix) and list every problem:\n"
    "  - manifest.json: readable, a known format version, inputs = written + rejected for every source;\n"
    "  - every shard the manifest lists: present, of the recorded size and sha256, with the recorded sample count;\n"
    "  - every tar member: a plain file with a safe relative name KEY.jpg / KEY.json / KEY.txt;\n"
    "  - every sample: its JSON valid against the format (shards/format.py), its image a decodable RGB JPEG of\n"
    "    the size the JSON states (Pillow, decompression-bomb and truncation checks on), every box inside it,\n"
    "    KEY.txt equal to the first text, and its index.parquet row (key, byte offset, counts) matching;\n"
    "  - rejects.parquet: readable, and its counts equal the manifest's.\n"
    "Given a training run folder (the --out of `xvlm train`) instead, it checks every committed checkpoint: each\n"
    "file its COMMITTED marker lists present with the recorded size and sha256, the marker naming its own step; and\n"
    "says which checkpoint `--resume auto` would continue from.\n"
    "Exits 0 when everything holds, 1 when there is a problem (the list says which shard / sample and what)."
)
EPILOG = (
    "examples:\n"
    "  xvlm verify data/shards\n"
    "  xvlm verify s3://bucket/xvlm/v1 --workers 8 --endpoint-url http://127.0.0.1:8333\n"
    "  xvlm verify data/shards --no-images      # skip image decoding (sizes, hashes, JSON and boxes only)\n"
    "  xvlm verify runs/tiny                    # a training run: its checkpoints against their markers\n"
    "see docs/reports.md."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATASET|RUN",
                        help="dataset folder or s3://bucket/prefix (with manifest.json), or a training run folder "
                             "(--out of `xvlm train`) or one of its checkpoint folders")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                        help="shards checked in parallel (default min(4, CPUs))")
    parser.add_argument("--no-images", action="store_true",
                        help="do not decode images (still checks hashes, sizes, names, JSON and boxes)")
    parser.add_argument("--max-listed", type=int, default=200, metavar="N",
                        help="problems printed in full (all are counted; default 200)")
    parser.add_argument("--endpoint-url", default=None, metavar="URL",
                        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.endpoint_url:
        storage.set_endpoint_url(args.endpoint_url)
    if not storage.exists(storage.join(args.dataset, MANIFEST_NAME)) and verify_run.is_run(args.dataset):
        checked = verify_run.verify_run(args.dataset, progress=not args.no_progress)
        for line in verify_run.report_lines(checked, args.max_listed):
            print(line)
        return 0 if checked.ok and checked.committed else 1
    options = VerifyOptions(dataset=args.dataset, images=not args.no_images, workers=args.workers,
                            progress=not args.no_progress, max_listed=args.max_listed)
    result = verify(options)
    for line in report_lines(result, options.max_listed):
        print(line)
    return 0 if result.ok else 1
