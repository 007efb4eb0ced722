"""The `xvlm` command: one subcommand per stage, each a thin call into its module.

Every subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Modules are imported
lazily so that `xvlm --help` is instant and a missing optional dependency only affects its subcommand.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from model.errors import ModelError
from shards.errors import XvlmError

# name -> (module, one-line help). The order is the order of the data flow.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("tools.quickstart", "Run the whole main job on the embedded defaults (sample data -> shards -> train -> eval -> report)."),
    "sample-data": ("tools.sample_data", "Write a synthetic shapes dataset in the real COCO / VG / SBU / CC / 16M-source layouts."),
    "build-shards": ("pipeline.cli", "Convert COCO / VG / SBU / CC / 16M-source releases into box-aware tar shards (Ray job)."),
    "verify": ("tools.verify", "Check a built dataset: shards vs manifest, sample JSON schema, images, boxes."),
    "stats": ("tools.stats", "Write a self-contained HTML statistics report (+ JSON) for a built dataset."),
    "show": ("tools.show", "Draw samples with their boxes and texts to PNG (raw or as the loader augments them)."),
    "train": ("train.cli", "Train X-VLM from a YAML config (one process, torchrun or Ray Train) with exact resume."),
    "eval": ("train.eval_cli", "Evaluate a checkpoint: zero-shot retrieval R@1/5/10 and grounding accuracy."),
    "import-xvlm": ("tools.import_xvlm", "Import an official X-VLM checkpoint (.pth / .th) into our model format, every tensor checked."),
    "export-xvlm": ("tools.export_xvlm", "Export our model as an official X-VLM checkpoint (loads with strict=True)."),
    "submit": ("tools.submit", "Submit / inspect / stop a training job on a Ray cluster (Ray Jobs API)."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xvlm",
        description="xvlm-pipeline: multi-grained vision-language pretraining (X-VLM) data pipeline, loader, model and trainer.",
        # wide enough that every subcommand's help stays on one line
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=18, width=140),
        epilog="Run `xvlm COMMAND --help` for the options of one command. Start with `xvlm quickstart`.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ERROR); default INFO")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # First pass: find the subcommand without importing every module.
    top, rest = parser.parse_known_args(argv)
    if top.command is None:
        parser.print_help()
        return 0
    module_name, help_text = SUBCOMMANDS[top.command]
    module = importlib.import_module(module_name)
    sub_parser = argparse.ArgumentParser(
        prog=f"xvlm {top.command}", description=getattr(module, "DESCRIPTION", help_text),
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=getattr(module, "EPILOG", None),
    )
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(rest)
    logging.basicConfig(level=getattr(logging, top.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (XvlmError, ModelError) as err:  # clear, actionable errors: no traceback
        print(f"xvlm {top.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # credentials, bucket or endpoint errors from any S3 call: one line too
        from shards.storage import access_error

        message = access_error(err)
        if message is None:
            raise
        print(f"xvlm {top.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
