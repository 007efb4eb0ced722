"""`xvlm quickstart`: the whole main job on embedded defaults, on CPU: sample data -> shards -> train the small
model -> zero-shot evaluation on 200 held-out scenes -> a report (loss curves, metrics) -> dataset statistics.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import storage
from model.config import BOX_HEADS
from reports.quickstart import render_markdown, write_report
from reports.stats import StatsOptions, write_report as write_stats
from storage.errors import XvlmError

log = logging.getLogger(__name__)

# The recipe is three configs (train/configs/): the box warm-up, the main training from its weights, and the main
# training alone (`--box-warmup-steps 0`); the warm-up and the main training extend the last one. This command only
# chains them, filling in the paths (and the budget, when --steps / --box-warmup-steps / --smoke change it).
CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
CONFIG = CONFIGS / "quickstart_cpu.yaml"              # the main training without a warm-up
WARMUP_CONFIG = CONFIGS / "quickstart_warmup.yaml"    # the box warm-up
MAIN_CONFIG = CONFIGS / "quickstart_main.yaml"        # the main training from the warm-up's weights
DEFAULT_OUT = "xvlm-quickstart"
DEFAULT_IMAGES = 1000        # training pictures of the sample data (the held-out split is 200 COCO val2017 scenes)
VAL_IMAGES = 200
SMOKE = {"images": 60, "val_images": 40, "steps": 12, "box_warmup_steps": 4}
SMOKE_DATA = {"image_text_batch_size": 16, "region_batch_size": 16, "region_max_images": 8, "shuffle_buffer": 32}
FINETUNE_CONFIGS = {"retrieval": CONFIGS / "quickstart_finetune_retrieval.yaml",
                    "grounding": CONFIGS / "quickstart_finetune_grounding.yaml"}
SMOKE_FINETUNE = ["finetune.epochs=1"]          # one epoch of each task (~15 and ~11 steps)
EVAL_POINTS = 6              # evaluations along the run, for the learning curves (the configs' eval.every: steps // 6)
SAMPLES_PER_SHARD = 200
LOADER_WORKERS = 1           # data.num_workers of quickstart_cpu.yaml
FINAL_K_TEST = 16            # ITM re-ranks the top 16 of 200 in the final evaluation (8 along the run)


def config_value(path: Path, *keys: str):
    """One value of a quickstart config as written (with what it extends), e.g. ("schedule", "steps")."""
    from train.config import read_config_values

    value = read_config_values(str(path))
    for key in keys:
        value = (value or {}).get(key)
    return value


DESCRIPTION = (
    "Run the whole main job on the embedded defaults, on this machine's CPU:\n"
    "  1. sample data     `xvlm sample-data`: 1,000 synthetic training pictures in the COCO / VG / SBU / CC layouts\n"
    "                     + 200 held-out COCO val2017 pictures, and a WordPiece tokenizer\n"
    "  2. shards          `xvlm build-shards`: train shards from all four sources, held-out shards from val2017\n"
    "  3. training        a ~1M-parameter X-VLM (train/configs/quickstart_cpu.yaml; ITC + box losses), budgeted in\n"
    "                     steps: a box warm-up (600 steps of region batches only, mostly the COCO pictures whose\n"
    "                     box texts are bare object names; with the centre loss), then the main training from its\n"
    "                     weights (350 steps of region + image-text batches); ~10 minutes on 2 idle cores, with\n"
    "                     progress bars and ETA; held-out evaluations for the curves\n"
    "  4. evaluation      zero-shot image<->text R@1/5/10 (ITC; ITM re-ranking when trained) and grounding acc@0.5 on the\n"
    "                     200 held-out scenes\n"
    "  5. fine-tuning     `xvlm finetune`: the model fine-tuned on the sample retrieval and RefCOCO+ style sets (scenes\n"
    "                     no training picture shows), test-set R@1 and grounding accuracy zero-shot vs fine-tuned\n"
    "  6. report          OUT/report/: loss and metric curves (PNG), metrics.json, report.md, report.html\n"
    "  7. statistics      `xvlm stats` of the train shards: OUT/report/dataset_stats.html\n"
    "Targets on the held-out scenes: image->text R@1 >= 0.5 (chance 0.005), grounding acc@0.5 >= 0.45.\n"
    "Steps whose output is already complete in OUT are reused; training resumes from its last checkpoint."
)
EPILOG = (
    "examples:\n"
    "  xvlm quickstart                         # ~11 minutes on 2 idle cores + the fine-tuning (3.6 min under load)\n"
    "  xvlm quickstart --smoke --out /tmp/qs   # about a minute: tiny data, a few steps (checks the plumbing)\n"
    "  xvlm quickstart --steps 150             # a shorter main training\n"
    "  xvlm quickstart --box-warmup-steps 0    # no box warm-up: the main training alone, 560 steps\n"
    "  xvlm quickstart --box-head xvlm         # the paper's box head instead of the dense one\n"
    "  xvlm quickstart --compare-heads         # also train the paper's box head at the same budget, report both"
)


def config_box_head() -> str:
    """The box head the quickstart configs train."""
    return config_value(CONFIG, "model", "box_head") or "xvlm"


def default_threads() -> int:
    """torch CPU threads of the model: every core of this machine."""
    return max(1, os.cpu_count() or 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT}/)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"main training steps (default {config_value(MAIN_CONFIG, 'schedule', 'steps')} after "
                             f"the box warm-up, ~6 minutes on 2 cores, {MAIN_CONFIG.name}; with --box-warmup-steps 0 "
                             f"{config_value(CONFIG, 'schedule', 'steps')}, ~9 minutes, {CONFIG.name}; "
                             f"--smoke: {SMOKE['steps']})")
    parser.add_argument("--box-warmup-steps", type=int, default=None,
                        help=f"steps of region batches only, mostly COCO pictures (bare object names), before the "
                             f"main training (default {config_value(WARMUP_CONFIG, 'schedule', 'steps')}, "
                             f"~3.7 minutes, {WARMUP_CONFIG.name}; --smoke: {SMOKE['box_warmup_steps']}; 0: none)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"about one minute: {SMOKE['images']} training + {SMOKE['val_images']} held-out "
                             f"pictures, {SMOKE['steps']} steps; no thresholds")
    parser.add_argument("--images", type=int, default=None,
                        help=f"training pictures of the sample data (default {DEFAULT_IMAGES}; --smoke: "
                             f"{SMOKE['images']})")
    parser.add_argument("--box-head", choices=BOX_HEADS, default=None,
                        help=f"box head of the trained model (default: the config's, {config_box_head()})")
    parser.add_argument("--compare-heads", action="store_true",
                        help="also train the paper's box head (xvlm; with --box-head xvlm: the config's) with the "
                             "same budget and report both")
    parser.add_argument("--seed", type=int, default=0, help="sample-data seed (default 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch CPU threads for the model (default: every core, {default_threads()} here; "
                             f"the {LOADER_WORKERS} loader worker shares them)")
    parser.add_argument("--no-stats", action="store_true", help="skip the dataset statistics report")


# ---------------------------------------------------------------------------------------------- the steps


@dataclass
class Layout:
    """Where each step writes under OUT."""

    root: Path

    @property
    def sample(self) -> Path:
        return self.root / "sample"

    @property
    def train_shards(self) -> Path:
        return self.root / "shards" / "train"

    @property
    def val_shards(self) -> Path:
        return self.root / "shards" / "val"

    @property
    def val_source(self) -> Path:
        """A COCO root holding only val2017 (links into the sample data): the held-out build reads it whole."""
        return self.root / "shards" / "coco_val2017"

    def run(self, box_head: str) -> Path:
        return self.root / f"run-{box_head}"

    def warmup(self, box_head: str) -> Path:
        return self.root / f"warmup-{box_head}"

    @property
    def report(self) -> Path:
        return self.root / "report"


def make_sample_data(layout: Layout, images: int, val_images: int, seed: int) -> dict:
    """Step 1: reuse OUT/sample when it was made with the same settings, else (re)generate it."""
    from sampledata.sample_data import generate

    summary_path = layout.sample / "sample_data.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if (summary.get("images"), summary.get("val_images"), summary.get("seed")) == (images, val_images, seed):
            print(f"[1/7] sample data: reusing {layout.sample}")
            return summary
    print(f"[1/7] sample data: {images} training + {val_images} held-out pictures -> {layout.sample}")
    return generate(layout.sample, images=images, val_images=val_images, seed=seed)


def build_shards(layout: Layout) -> None:
    """Step 2: train shards (COCO train2017, VG, SBU, CC) and held-out shards (COCO val2017), each skipped when
    its manifest (the dataset's commit marker) exists."""
    from pipeline.build import BuildConfig, run_build

    sample = layout.sample
    jobs = [(layout.train_shards, {"coco": sample / "coco", "vg": sample / "vg", "sbu": sample / "sbu",
                                   "cc": sample / "cc"}),
            (layout.val_shards, {"coco": _val_only_coco(layout)})]
    for out, sources in jobs:
        if (out / "manifest.json").is_file():
            print(f"[2/7] shards: reusing {out}")
            continue
        print(f"[2/7] shards: {', '.join(sources)} -> {out}")
        result = run_build(BuildConfig(sources={k: str(v) for k, v in sources.items()}, out=str(out),
                                       samples_per_shard=SAMPLES_PER_SHARD,
                                       command=["xvlm", "quickstart", "--out", str(layout.root)]))
        written = {name: dict(counts.written) for name, counts in result.manifest.sources.items()}
        print(f"      written: {written}")


def _val_only_coco(layout: Layout) -> Path:
    """COCO's source reads the train splits when there are any; the held-out build gets a root with val2017 only."""
    root = layout.val_source
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    coco = (layout.sample / "coco").resolve()
    links = {root / "val2017": coco / "val2017"}
    for kind in ("captions", "instances"):
        links[root / "annotations" / f"{kind}_val2017.json"] = coco / "annotations" / f"{kind}_val2017.json"
    for link, target in links.items():
        if link.is_symlink() and os.readlink(link) != str(target):
            link.unlink()
        if not link.exists():
            link.symlink_to(target)
    return root


def train_config(layout: Layout, box_head: str, steps: int | None, smoke: bool, init: str | None = None,
                 warmup: bool = False):
    """The stage's config (the warm-up; the main training from `init`; or the main training alone) with this
    quickstart's paths, box head and budget (the config's own unless --steps / --smoke change it)."""
    from train.config import load_config
    from train.evaluate import run_k_test

    path = WARMUP_CONFIG if warmup else MAIN_CONFIG if init else CONFIG
    overrides = [f"out={json.dumps(str(layout.warmup(box_head) if warmup else layout.run(box_head)))}",
                 f"data.datasets=[{json.dumps(str(layout.train_shards))}]",
                 f"data.tokenizer={json.dumps(str(layout.sample / 'tokenizer'))}",
                 f"eval.datasets=[{json.dumps(str(layout.val_shards))}]",
                 f"model.box_head={box_head}"]
    if box_head == "xvlm":   # the paper's head has no attention over the patches for the centre loss to train
        overrides.append("loss.centre=0")
    if init:
        overrides.append(f"model.init={json.dumps(init)}")
    cfg = load_config(str(path), overrides)
    fit_budget(cfg, steps or (SMOKE["steps"] if smoke else cfg.schedule.steps), warmup)
    if smoke:
        cfg.data.overrides.update(SMOKE_DATA)
        cfg.eval.options = {**cfg.eval.options, "k_test": run_k_test(cfg, 4)}
    return cfg.validate()


def fit_budget(cfg, steps: int, warmup: bool) -> None:
    """A stage of `steps` steps: its lr warmup at most a tenth of it, a checkpoint at least at the end, and
    EVAL_POINTS evaluations along the main training (for their own budgets the configs hold exactly these)."""
    cfg.schedule.steps = steps
    cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, max(1, steps // 10))
    cfg.checkpoint.every = min(cfg.checkpoint.every, steps)
    cfg.eval.every = 0 if warmup else max(1, steps // EVAL_POINTS)


def train_and_evaluate(layout: Layout, box_head: str, steps: int | None, smoke: bool,
                       warmup_steps: int = 0) -> dict[str, Any]:
    """Steps 3 and 4 for one box head: the box warm-up (when `warmup_steps`), the main training starting from its
    weights (each resuming when a checkpoint exists), then the final evaluation."""
    from model.io import load_model
    from train import checkpoint as ckpt
    from train.evaluate import EvalConfig, evaluate, run_k_test
    from train.loop import train

    init, warmup_wall = None, 0.0
    if warmup_steps:
        warm = train_config(layout, box_head, warmup_steps, smoke, warmup=True)
        print(f"[3/7] box warm-up ({box_head} box head): {warm.schedule.steps} steps of region batches only, "
              f"weighted {warm.data.overrides['source_weights']} -> {warm.out}")
        warmup_wall = stage_wall(train(warm), Path(warm.out) / "metrics.jsonl")
        done = ckpt.resolve_resume(warm.out, "auto")
        if done is None:
            raise XvlmError(f"the box warm-up left no committed checkpoint in {warm.out}")
        init = storage.join(done, ckpt.MODEL_FILE)
    cfg = train_config(layout, box_head, steps, smoke, init=init)
    print(f"[3/7] training ({box_head} box head): {cfg.schedule.steps} steps"
          + (" from the warm-up's weights" if init else "") + f" -> {cfg.out}")
    summary = train(cfg)
    path = ckpt.resolve_resume(cfg.out, "auto")
    if path is None:
        raise XvlmError(f"training left no committed checkpoint in {cfg.out}")
    loader = cfg.data.build()
    options = {**cfg.eval.options, "progress": True, "k_test": run_k_test(cfg, 4 if smoke else FINAL_K_TEST)}
    print(f"[4/7] evaluation ({box_head} box head) on {layout.val_shards}")
    model = load_model(storage.join(path, ckpt.MODEL_FILE))
    metrics = evaluate(model, [str(layout.val_shards)],
                       EvalConfig(tokenizer=loader.tokenizer, max_words=loader.max_words,
                                  max_tokens=loader.max_tokens, pre_caption=loader.pre_caption, **options))
    return {"box_head": box_head, "steps": summary["steps"],
            "train_wall_s": stage_wall(summary, Path(cfg.out) / "metrics.jsonl"),
            "box_warmup_steps": warmup_steps, "box_warmup_wall_s": warmup_wall,
            "checkpoint": path, "metrics": metrics, "run": cfg.out,
            "curve": _read_curve(Path(cfg.out) / "metrics.jsonl")}


def finetune_downstream(layout: Layout, checkpoint: str, smoke: bool) -> dict[str, Any]:
    """Step 5: the trained model fine-tuned on the sample downstream sets (scenes no training picture shows), each
    task from train/configs/quickstart_finetune_*.yaml; the test set's scores before (zero-shot) and after."""
    from train.config import load_config
    from train.finetune import finetune, headline

    down = layout.sample / "downstream"
    files = {"retrieval": ("coco_train.json", "coco_val.json", "coco_test.json"),
             "grounding": ("refcoco+_train.json", "refcoco+_val.json", "refcoco+_test.json")}
    out: dict[str, Any] = {}
    for task, path in FINETUNE_CONFIGS.items():
        train_file, val_file, test_file = (json.dumps(str(down / name)) for name in files[task])
        overrides = [f"out={json.dumps(str(layout.root / f'finetune-{task}'))}", f"finetune.init={json.dumps(checkpoint)}",
                     f"finetune.train_file=[{train_file}]", f"finetune.val_file={val_file}",
                     f"finetune.test_file=[{test_file}]", f"finetune.image_root={json.dumps(str(down / 'images'))}",
                     f"finetune.tokenizer={json.dumps(str(layout.sample / 'tokenizer'))}"]
        if task == "grounding":
            overrides.append(f"finetune.refcoco_data={json.dumps(str(down / 'refcoco+'))}")
        cfg = load_config(str(path), overrides + (SMOKE_FINETUNE if smoke else []))
        print(f"[5/7] fine-tuning {task} ({cfg.finetune.epochs} epochs on {down.name}/{files[task][0]}) -> {cfg.out}")
        summary = finetune(cfg)
        before = next(iter(summary["zero_shot"].values()), {})
        after = next(iter(summary["test"].values()), {})
        out[task] = {"test_file": files[task][2], "steps": summary["steps"],
                     "wall_s": stage_wall(summary, Path(cfg.out) / "metrics.jsonl"),
                     "zero_shot": headline(task, before), "fine_tuned": headline(task, after),
                     "counts": {k: after.get(k) for k in ("images", "texts", "refs") if k in after}}
        print(f"      {files[task][2]}: zero-shot {out[task]['zero_shot']} -> fine-tuned {out[task]['fine_tuned']}")
    return out


def stage_wall(summary: dict, metrics: Path) -> float:
    """Seconds a training stage took: this call's wall time when it ran the whole stage, else (resumed, or already
    complete and re-used) the span of the stage's metrics.jsonl, from its first logged step to its last."""
    if summary["start_step"] == 0:
        return summary["wall_s"]
    times = [row["time"] for row in _read_curve(metrics) if "time" in row]
    return max(times) - min(times) if times else summary["wall_s"]


def _read_curve(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dataset_stats(layout: Layout) -> str | None:
    """Step 6: the statistics report of the train shards (`xvlm stats`)."""
    out = layout.report / "dataset_stats.html"
    print(f"[7/7] dataset statistics -> {out}")
    write_stats(StatsOptions(dataset=str(layout.train_shards), out=str(out),
                             tokenizer=str(layout.sample / "tokenizer")))
    return str(out)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.steps is not None and args.steps < 1:
        raise XvlmError(f"--steps must be >= 1, got {args.steps}")
    if args.box_warmup_steps is not None and args.box_warmup_steps < 0:
        raise XvlmError(f"--box-warmup-steps must be >= 0, got {args.box_warmup_steps}")
    if args.threads is not None and args.threads < 1:
        raise XvlmError(f"--threads must be >= 1, got {args.threads}")
    # The model gets every core, sharing one with the loader's worker process: on this 2-core machine two model
    # threads made the main training's steps ~20% faster than one (docs/quickstart.md), the worker keeps up.
    torch.set_num_threads(args.threads or default_threads())
    started = time.perf_counter()
    layout = Layout(Path(args.out).resolve())
    images = args.images or (SMOKE["images"] if args.smoke else DEFAULT_IMAGES)
    val_images = SMOKE["val_images"] if args.smoke else VAL_IMAGES
    make_sample_data(layout, images, val_images, args.seed)
    build_shards(layout)
    head = args.box_head or config_box_head()
    other = "xvlm" if head != "xvlm" else config_box_head()
    heads = [head] + ([other] if args.compare_heads and other != head else [])
    warmup_steps = args.box_warmup_steps
    if warmup_steps is None:   # None: the warm-up config's own budget
        warmup_steps = SMOKE["box_warmup_steps"] if args.smoke else config_value(WARMUP_CONFIG, "schedule", "steps")
    steps = args.steps         # None: the main training config's own budget
    results = [train_and_evaluate(layout, h, steps, args.smoke, warmup_steps) for h in heads]
    results[0]["finetune"] = finetune_downstream(layout, results[0]["checkpoint"], args.smoke)
    print(f"[6/7] report -> {layout.report}")
    document = write_report(layout.report, results, args.smoke, None, torch.get_num_threads())
    stats = None if args.no_stats else dataset_stats(layout)
    if stats:  # link it from the report
        document = write_report(layout.report, results, args.smoke, stats, torch.get_num_threads())
    print()
    print(render_markdown(document).split("![curves]")[0].rstrip())
    print(f"\nreport: {layout.report / 'report.html'}   ({(time.perf_counter() - started) / 60:.1f} min in all)")
    return 0
