"""`xvlm build-shards`: convert dataset releases (every source of pipeline/sources/) into box-aware tar shards,
optionally without the images of evaluation sets."""
from __future__ import annotations

import argparse
import logging

from pipeline.build import BuildConfig, run_build, summary_lines
from pipeline.images import ImageConfig
from pipeline.leak import HAMMING_THRESHOLD
from shards.format import DEFAULT_SHARD_PREFIX
from storage.errors import XvlmError

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Convert dataset releases (the sources listed below) into WebDataset tar shards with one sample per image:\n"
    "KEY.jpg (RGB JPEG, long side <= --max-image-side), KEY.json (captions and region / object boxes in\n"
    "stored-pixel coordinates) and KEY.txt (first caption). Beside the shards: index.parquet,\n"
    "rejects.parquet (every input record that was not written, with its reason) and manifest.json (written last).\n"
    "Shard writing runs as Ray tasks: a local Ray by default, or an existing cluster with --ray-address.\n"
    "Re-running the same command after an interruption resumes: finished shards are kept, and the result is\n"
    "byte-identical to an uninterrupted run. The format is described in shards/FORMAT.md.\n"
    "--exclude-eval drops every training image that is an image of an evaluation split (by COCO id, and by a\n"
    "perceptual hash of the picture when the set's images are given): each is an `eval_leak` reject."
)
EPILOG_EXAMPLES = (
    "tiny example (CPU, a few seconds after Ray starts):\n"
    "  xvlm sample-data /tmp/xs --images 40 --val-images 10\n"
    "  xvlm build-shards --source coco=/tmp/xs/coco --source vg=/tmp/xs/vg --source sbu=/tmp/xs/sbu \\\n"
    "      --source cc=/tmp/xs/cc --out /tmp/xs/shards --samples-per-shard 20 --workers 2\n\n"
    "to S3 (credentials from the standard AWS chain; never printed):\n"
    "  xvlm build-shards --source coco=s3://data/coco --out s3://bucket/xvlm/v1 --endpoint-url http://127.0.0.1:8333\n\n"
    "without the evaluation images (X-VLM's files; a set without COCO ids needs its images):\n"
    "  xvlm build-shards ... --exclude-eval coco-karpathy=/tmp/xs/eval/coco_test.json \\\n"
    "      --exclude-eval refcoco+=/tmp/xs/eval/refcoco+_test.json \\\n"
    "      --exclude-eval flickr30k=/tmp/xs/eval/flickr30k_test.json,images=/tmp/xs/eval/images\n\n"
    "on a running Ray cluster:  xvlm build-shards ... --ray-address 10.0.0.1:6379\n"
    "see docs/shard_builder.md for the accounting, crash safety and benchmarks; docs/pipeline_sources.md for the sources."
)


def epilog() -> str:
    """The sources, from the source registry (each module's NAME and DESCRIPTION), then the examples."""
    from pipeline.sources import registry

    sources = registry()
    width = max(len(name) for name in sources) + len("=ROOT")
    lines = [f"  {name + '=ROOT':<{width}}  {getattr(module, 'DESCRIPTION', '')}".rstrip()
             for name, module in sorted(sources.items())]
    return ("sources (--source NAME=PATH, repeatable; PATH local or s3://):\n" + "\n".join(lines) + "\n\n"
            + EPILOG_EXAMPLES)


EPILOG = epilog   # built when `--help` asks for it: importing the sources costs a moment


def _source(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (e.g. coco=data/coco), got {text!r}")
    return name.strip(), path.strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ImageConfig()
    from pipeline.sources import registry

    parser.add_argument("--source", type=_source, action="append", required=True, metavar="NAME=PATH",
                        help=f"a source release ({', '.join(sorted(registry()))}); repeat for several")
    parser.add_argument("--out", required=True, metavar="DIR|s3://bucket/prefix", help="output folder or S3 prefix")
    parser.add_argument("--samples-per-shard", type=int, default=5000, metavar="N",
                        help="samples per tar shard (default 5000: ~250 MB at 512-px JPEGs)")
    parser.add_argument("--max-image-side", type=int, default=defaults.max_side, metavar="PX",
                        help=f"long side of stored images; larger ones are resized (default {defaults.max_side})")
    parser.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality, metavar="Q",
                        help=f"quality of re-encoded JPEGs, 1-100 (default {defaults.jpeg_quality})")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels, metavar="P",
                        help=f"reject images whose header declares more pixels (decompression bombs; "
                             f"default {defaults.max_pixels})")
    parser.add_argument("--max-image-bytes", type=int, default=defaults.max_file_bytes, metavar="B",
                        help=f"reject source image files larger than this, unread (default {defaults.max_file_bytes})")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="address of a running Ray cluster (e.g. 10.0.0.1:6379 or 'auto'); "
                             "default: start a local Ray in this process")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="shard tasks run in parallel (default: all CPUs of the Ray cluster)")
    parser.add_argument("--endpoint-url", default=None, metavar="URL",
                        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    parser.add_argument("--shard-prefix", default=DEFAULT_SHARD_PREFIX, metavar="PREFIX",
                        help=f"shard file names PREFIX-000000.tar (default {DEFAULT_SHARD_PREFIX!r})")
    parser.add_argument("--work-dir", default=None, metavar="DIR",
                        help="local folder for the staged annotations (default OUT/_work, or a temp folder "
                             "when OUT is on S3)")
    parser.add_argument("--exclude-eval", action="append", default=[], metavar="NAME=FILE[,images=ROOT]",
                        help="drop the training images of an evaluation file in X-VLM's format (coco_test.json, "
                             "refcoco+_val.json, flickr30k_test.json ...): by the COCO ids in its image paths, and "
                             "with images=ROOT (its image_root) also by picture content; repeat per file")
    parser.add_argument("--leak-max-distance", type=int, default=HAMMING_THRESHOLD, metavar="BITS",
                        help=f"Hamming distance of the 256-bit perceptual hashes up to which a training picture counts "
                             f"as an evaluation picture (default {HAMMING_THRESHOLD}; see docs/shard_builder.md)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    sources: dict[str, str] = {}
    for name, path in args.source:
        if name in sources:
            raise XvlmError(f"--source {name} given twice; give each source once")
        sources[name] = path
    try:
        image = ImageConfig(max_side=args.max_image_side, jpeg_quality=args.jpeg_quality, max_pixels=args.max_pixels,
                            max_file_bytes=args.max_image_bytes)
    except ValueError as err:
        raise XvlmError(str(err)) from None
    config = BuildConfig(sources=sources, out=args.out, samples_per_shard=args.samples_per_shard, image=image,
                         shard_prefix=args.shard_prefix, workers=args.workers, ray_address=args.ray_address,
                         endpoint_url=args.endpoint_url, work_dir=args.work_dir, progress=not args.no_progress,
                         command=_command(args, sources), exclude_eval=list(args.exclude_eval),
                         leak_max_distance=args.leak_max_distance)
    result = run_build(config)
    print(f"built {args.out}: {result.shards_written} shards written, {result.shards_skipped} already done")
    for line in summary_lines(result.manifest):
        print(line)
    return 0 if all(c.balanced() for c in result.manifest.sources.values()) else 1


def _command(args: argparse.Namespace, sources: dict[str, str]) -> list[str]:
    """The command as recorded in the manifest: rebuilt from the parsed options in a fixed order (so a re-run
    records the same bytes), with any user:password@ cut out of URLs."""
    import re

    command = ["xvlm", "build-shards"]
    for name, path in sources.items():
        command += ["--source", f"{name}={path}"]
    command += ["--out", args.out, "--samples-per-shard", str(args.samples_per_shard),
                "--max-image-side", str(args.max_image_side), "--jpeg-quality", str(args.jpeg_quality),
                "--max-pixels", str(args.max_pixels), "--max-image-bytes", str(args.max_image_bytes),
                "--shard-prefix", args.shard_prefix]
    for spec in args.exclude_eval:
        command += ["--exclude-eval", spec]
    if args.exclude_eval:
        command += ["--leak-max-distance", str(args.leak_max_distance)]
    return [re.sub(r"://[^/@\s]+@", "://", part) for part in command]
