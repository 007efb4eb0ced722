"""Benchmark: the paper's box head vs our soft-argmax and dense heads on shapes scenes, at equal steps (acc@0.5).

Both heads train the same `tiny` model (same seed, same batches) on the box losses only (L1 + GIoU), texts
being the scenes' region phrases; accuracy is the share of held-out phrases whose predicted box has IoU >= 0.5
with the true one. Prints the curves and the ratio of each of our heads to X-VLM's (the baseline, measured in
this run).

    python bench/bench_box_heads.py --steps 300 --batch 64 --out /tmp/box_heads
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import time

import numpy as np
import torch
from torchvision.ops import box_convert, box_iou
from tqdm import tqdm

from model.config import BOX_HEADS, preset
from model.losses import box_losses
from model.params import param_groups
from model.xvlm import build_model
import storage
from sampledata import scenes

log = logging.getLogger(__name__)
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
MAX_TOKENS = 16


def build_vocab() -> dict[str, int]:
    words = ["[PAD]", "[CLS]"] + scenes.vocabulary_words()
    return {w: i for i, w in enumerate(words)}


def make_split(count: int, seed: int, image_res: int, vocab: dict[str, int]) -> dict[str, torch.Tensor]:
    """`count` scenes -> every (scene, region phrase) pair: image index, token ids, target (cx, cy, w, h) / size."""
    rng = np.random.default_rng(seed)
    images, image_idx, ids, targets = [], [], [], []
    for index in tqdm(range(count), desc=f"scenes (seed {seed})", unit="scene"):
        scene = scenes.sample_scene(rng)
        picture = scenes.render(scene).resize((image_res, image_res), resample=3)   # bicubic, aspect not kept
        pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)
        images.append((pixels - CLIP_MEAN) / CLIP_STD)
        for phrase in scenes.region_phrases(scene, rng):
            tokens = [vocab["[CLS]"]] + [vocab[w] for w in phrase.phrase.split()][:MAX_TOKENS - 1]
            ids.append(tokens + [0] * (MAX_TOKENS - len(tokens)))
            x, y, w, h = scene.objects[phrase.object_index].box
            targets.append([(x + w / 2) / scene.width, (y + h / 2) / scene.height, w / scene.width, h / scene.height])
            image_idx.append(index)
    ids_t = torch.tensor(ids)
    return {"image": torch.stack(images), "image_idx": torch.tensor(image_idx), "text_ids": ids_t,
            "text_atts": (ids_t != 0).long(), "target": torch.tensor(targets)}


def accuracy(model, data: dict[str, torch.Tensor], batch: int = 256) -> float:
    model.eval()
    hits = 0
    with torch.no_grad():
        image_embeds = torch.cat([model.vision(data["image"][i:i + batch]) for i in range(0, len(data["image"]), batch)])
        for i in range(0, len(data["text_ids"]), batch):
            rows = slice(i, i + batch)
            text, _ = model.encode_text(data["text_ids"][rows], data["text_atts"][rows])
            pred = model.predict_boxes(image_embeds[data["image_idx"][rows]], text, data["text_atts"][rows])
            iou = box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(data["target"][rows], "cxcywh", "xyxy"))
            hits += int((iou.diagonal() >= 0.5).sum())
    model.train()
    return hits / len(data["text_ids"])


def train_head(box_head: str, train: dict, val: dict, vocab_size: int, steps: int, batch: int, lr: float,
               eval_every: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    model = build_model(preset("tiny", vocab_size=vocab_size, box_head=box_head,
                               max_position_embeddings=MAX_TOKENS))
    optimizer = torch.optim.AdamW(param_groups(model, lr, 0.01), betas=(0.9, 0.98))
    order = torch.Generator().manual_seed(seed)
    curve = [{"step": 0, "acc": accuracy(model, val), "loss": None}]
    start = time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc=f"{box_head} head", unit="step")
    for step in bar:
        rows = torch.randint(len(train["text_ids"]), (batch,), generator=order)
        images = train["image_idx"][rows]
        unique, inverse = images.unique(return_inverse=True)
        image_embeds = model.vision(train["image"][unique])[inverse]
        text, _ = model.encode_text(train["text_ids"][rows], train["text_atts"][rows])
        pred = model.raw_boxes(image_embeds, text, train["text_atts"][rows])
        l1, giou = box_losses(pred, train["target"][rows], torch.ones(batch, dtype=torch.bool))
        optimizer.zero_grad()
        (l1 + giou).backward()
        optimizer.step()
        bar.set_postfix(l1=f"{l1.item():.3f}", giou=f"{giou.item():.3f}")
        if step % eval_every == 0 or step == steps:
            curve.append({"step": step, "acc": accuracy(model, val), "loss": (l1 + giou).item(),
                          "seconds": round(time.perf_counter() - start, 1)})
    return curve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per head (default 300)")
    parser.add_argument("--batch", type=int, default=64, help="phrases per step (default 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="base learning rate, new parameters x2 (default 1e-3)")
    parser.add_argument("--train-scenes", type=int, default=1500, help="training scenes (default 1500)")
    parser.add_argument("--val-scenes", type=int, default=200, help="held-out scenes (default 200)")
    parser.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="model and batch-order seed (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", default=None, help="folder (local or s3://) for box_heads.json and box_heads.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    vocab = build_vocab()
    image_res = preset("tiny").image_res
    train = make_split(args.train_scenes, 1, image_res, vocab)
    val = make_split(args.val_scenes, 2, image_res, vocab)
    curves = {head: train_head(head, train, val, len(vocab), args.steps, args.batch, args.lr, args.eval_every,
                               args.seed) for head in BOX_HEADS}
    ours = [head for head in BOX_HEADS if head != "xvlm"]
    print(f"\ngrounding acc@0.5 on {len(val['text_ids'])} held-out phrases ({args.val_scenes} scenes), "
          f"batch {args.batch}, lr {args.lr}")
    print(f"{'step':>6} {'xvlm':>8} " + " ".join(f"{head:>11} {'ratio':>7}" for head in ours))
    for i, base in enumerate(curves["xvlm"]):
        cells = []
        for head in ours:
            acc = curves[head][i]["acc"]
            cells.append(f"{acc:>11.3f} {acc / base['acc'] if base['acc'] else float('inf'):>7.2f}")
        print(f"{base['step']:>6} {base['acc']:>8.3f} " + " ".join(cells))
    if args.out:
        out = args.out.rstrip("/")
        storage.write_text(f"{out}/box_heads.json", json.dumps({"args": vars(args), "curves": curves}, indent=2))
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for head, curve in curves.items():
            ax.plot([p["step"] for p in curve], [p["acc"] for p in curve], marker="o", label=head)
        ax.set_xlabel("step")
        ax.set_ylabel("acc@0.5 (held out)")
        ax.legend()
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=120)
        storage.write_bytes(f"{out}/box_heads.png", png.getvalue())
        print(f"wrote {out}/box_heads.json and {out}/box_heads.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
