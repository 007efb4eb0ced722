"""The `xvlm` command, the project's only face: one subcommand per stage, each a thin module of tools/ (arguments,
one call into the library, printing), all registered in SUBCOMMANDS below.

Every subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Modules are imported
lazily so that `xvlm --help` is instant and a missing optional dependency only affects its subcommand.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from model.errors import ModelError
from storage.errors import XvlmError

# The one registry of subcommands: name -> (module under tools/, one-line help), in the order of the data flow.
# Each module is thin: DESCRIPTION, EPILOG (text, or a function that builds it), add_arguments(parser), run(args).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("tools.quickstart", "Run the whole main job on the embedded defaults (sample data -> shards -> train -> eval -> report)."),
    "sample-data": ("tools.sample_data", "Write a synthetic shapes dataset in the real layouts of every source (COCO, VG, SBU, CC, 16M sources)."),
    "build-shards": ("tools.build_shards", "Convert dataset releases (the sources its --help lists) into box-aware tar shards (Ray job)."),
    "verify": ("tools.verify", "Check a built dataset (shards vs manifest, sample JSON, images, boxes) or a run's checkpoints."),
    "stats": ("tools.stats", "Write a self-contained HTML statistics report (+ JSON) for a built dataset."),
    "show": ("tools.show", "Draw samples with their boxes and texts to PNG (raw or as the loader augments them)."),
    "train": ("tools.train", "Train X-VLM from a YAML config (one process or torchrun) with exact resume."),
    "ray-train": ("tools.ray_train", "Train with Ray Train on a Ray cluster's nodes (restarts failed workers, resumes)."),
    "submit": ("tools.submit", "Submit / inspect / stop a training job on a Ray cluster (Ray Jobs API)."),
    "finetune": ("tools.finetune", "Fine-tune a pretrained model on retrieval or grounding (X-VLM's recipes, same trainer, exact resume)."),
    "eval": ("tools.eval", "Evaluate a checkpoint: zero-shot retrieval R@1/5/10 and grounding accuracy."),
    "import-xvlm": ("tools.import_xvlm", "Import an official X-VLM checkpoint (.pth / .th) into our model format, every tensor checked."),
    "export-xvlm": ("tools.export_xvlm", "Export our model as an official X-VLM checkpoint (loads with strict=True)."),
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
    epilog = getattr(module, "EPILOG", None)
    sub_parser = argparse.ArgumentParser(
        prog=f"xvlm {top.command}", description=getattr(module, "DESCRIPTION", help_text),
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog() if callable(epilog) else epilog,
    )
    module.add_arguments(sub_parser)
    # A module with positionals on both sides of its options (`finetune TASK --config ... KEY=VALUE`) says INTERMIXED.
    args = sub_parser.parse_intermixed_args(rest) if getattr(module, "INTERMIXED", False) else sub_parser.parse_args(rest)
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
        import storage

        message = storage.describe_error(err)
        if message is None:
            raise
        print(f"xvlm {top.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
