"""Retrieval evaluation cost: `train.downstream_eval.evaluate_retrieval` (threaded image reads, ITM pairs of many
queries per forward, each distinct pair scored once) against a plain loop over the same model calls in the official
order (Retrieval.py:80-152: one ITM forward of k_test pairs per image, then per text), on a synthetic 1,000-image /
5,000-caption set, CPU.

Both must give the same metrics; the ratio ours / plain is printed (target <= 1.1). Then the count of ITM forwards and
pairs for COCO 5k (5,000 images, 25,000 captions, k_test 256), the FLOPs of one X-VLM-base ITM pair (6 fusion layers,
text 40 tokens, 12x12+1 image tokens at 384 px) and a GPU time estimate; with --measure-base the base-size fusion is
timed on this machine's device (cuda when present) and that measurement is scaled instead.

  python bench/bench_eval_retrieval.py                     # 1,000 images x 5 captions, k_test 16, tiny model
  python bench/bench_eval_retrieval.py --images 200 --k-test 8          # quick
  python bench/bench_eval_retrieval.py --measure-base --skip-compare   # per-forward cost of the base fusion
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.concept import whole_image_atts  # noqa: E402
from train.downstream_eval import (DownstreamEvalConfig, evaluate_retrieval, itm_eval,  # noqa: E402
                                   _tokenise)
from train.evaluate import normalise  # noqa: E402

COCO5K = {"images": 5000, "texts": 25000, "k_test": 256}


def synthetic_set(root: Path, n_images: int, per_image: int, seed: int = 0):
    """n_images small JPEGs (random colour fields) and per_image random-word captions each; a tokenizer folder."""
    from PIL import Image

    from sampledata import scenes
    from sampledata.sample_data import write_tokenizer
    from shards.downstream import RetrievalEvalSet

    rng = np.random.default_rng(seed)
    words = scenes.vocabulary_words()
    images, texts, text_image, image_texts = [], [], [], []
    for i in range(n_images):
        pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8).repeat(12, 0).repeat(12, 1)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
        rel = f"val2014/{i:06d}.jpg"
        (root / "images" / "val2014").mkdir(parents=True, exist_ok=True)
        (root / "images" / rel).write_bytes(buf.getvalue())
        images.append(rel)
        image_texts.append([])
        for _ in range(per_image):
            image_texts[-1].append(len(texts))
            texts.append(" ".join(words[int(k)] for k in rng.integers(0, len(words), size=12)))
            text_image.append(i)
    write_tokenizer(root / "tokenizer")
    return RetrievalEvalSet("synthetic", images, texts, text_image, image_texts), str(root / "tokenizer")


@torch.no_grad()
def plain_loop(model, data, root: str, cfg: DownstreamEvalConfig) -> dict:
    """The official evaluation's structure: sequential image reads, encoders in batches, then one ITM forward of
    k_test pairs per image and one per text (Retrieval.py:118-152), into -100-filled score matrices."""
    from shards.downstream import read_pixels

    res = model.config.image_res
    embeds, feats = [], []
    for start in range(0, len(data.images), cfg.batch_size):
        batch = torch.stack([torch.from_numpy(np.array(read_pixels(root, rel, res)[0])).permute(2, 0, 1)
                             for rel in data.images[start:start + cfg.batch_size]])
        e, f = model.encode_image(normalise(batch))
        embeds.append(e)
        feats.append(f)
    image_embeds, image_feat = torch.cat(embeds), torch.cat(feats)
    ids, atts, _ = _tokenise(data.texts, cfg)
    hidden, tfeat = [], []
    for start in range(0, len(data.texts), cfg.batch_size):
        h, f = model.encode_text(ids[start:start + cfg.batch_size], atts[start:start + cfg.batch_size])
        hidden.append(h)
        tfeat.append(f)
    text_hidden, text_feat = torch.cat(hidden), torch.cat(tfeat)
    sims = image_feat @ text_feat.t()
    k = min(cfg.k_test, len(data.texts))
    i2t = torch.full(sims.shape, -100.0)
    for i, row in enumerate(sims):
        top = row.topk(k).indices
        images = image_embeds[i].repeat(k, 1, 1)
        i2t[i, top] = model.itm_scores(images, whole_image_atts(images), text_hidden[top], atts[top]).float()
    t2i = torch.full(sims.t().shape, -100.0)
    k = min(cfg.k_test, len(data.images))
    for t, row in enumerate(sims.t()):
        top = row.topk(k).indices
        images = image_embeds[top]
        t2i[t, top] = model.itm_scores(images, whole_image_atts(images), text_hidden[t].repeat(k, 1, 1),
                                       atts[t].repeat(k, 1)).float()
    return itm_eval(i2t, t2i, torch.tensor(data.text_image))


def base_pair_flops(text_tokens: int = 40, image_tokens: int = 145, layers: int = 6, hidden: int = 768,
                    vision: int = 1024, ffn: int = 3072) -> float:
    """Multiply-adds x 2 of one ITM pair through X-VLM-base's fusion layers (self-attention, cross-attention whose
    K / V project the 1024-wide image tokens, FFN) and the ITM head; attention score matmuls included."""
    t, v = text_tokens, image_tokens
    per_layer = (4 * t * hidden * hidden              # self-attention Q K V O
                 + 2 * t * t * hidden                  # self-attention scores and weighted sum
                 + 2 * t * hidden * hidden             # cross-attention Q and O
                 + 2 * v * vision * hidden             # cross-attention K and V from the image tokens
                 + 2 * t * v * hidden                  # cross-attention scores and weighted sum
                 + 2 * t * hidden * ffn)               # FFN
    return 2.0 * (layers * per_layer + hidden * 2 * hidden + 2 * hidden * 2)


@torch.no_grad()
def measure_base_forward(pairs: int, repeats: int) -> tuple[str, float]:
    """Seconds per ITM forward of `pairs` pairs through a randomly initialised base-size fusion + ITM head on this
    machine's device (bf16 autocast on cuda), with random image / text states (only the fusion runs)."""
    from model.config import preset
    from model.xvlm import XVLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = XVLM(preset("base")).to(device).eval()
    images = torch.randn(pairs, 145, model.vision.width, device=device)
    text = torch.randn(pairs, 40, model.config.hidden_size, device=device)
    atts = torch.ones(pairs, 40, dtype=torch.long, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
        torch.autocast("cpu", enabled=False)
    with autocast:
        model.itm_scores(images, whole_image_atts(images), text, atts)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model.itm_scores(images, whole_image_atts(images), text, atts)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return device.type, (time.perf_counter() - start) / repeats


def compare(args) -> None:
    from model.config import preset
    from model.xvlm import build_model

    torch.manual_seed(0)
    model = build_model(preset(args.preset)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        data, tokenizer = synthetic_set(Path(tmp), args.images, args.captions)
        cfg = DownstreamEvalConfig(tokenizer=tokenizer, k_test=args.k_test, batch_size=args.batch_size,
                                   itm_batch=args.itm_batch, progress=False)
        root = str(Path(tmp) / "images")
        timings: dict[str, list[float]] = {"ours": [], "plain": []}
        results = {}
        for _ in range(args.rounds):           # alternate, keep each side's best: the machine is shared
            for name in args.order.split(","):
                start = time.perf_counter()
                results[name] = evaluate_retrieval(model, data, root, cfg, "cpu") if name == "ours" else \
                    plain_loop(model, data, root, cfg)
                timings[name].append(time.perf_counter() - start)
    ours, plain = (min(timings["ours"]), results["ours"]), (min(timings["plain"]), results["plain"])
    same = all(abs(ours[1][k] - plain[1][k]) < 1e-6 for k in plain[1])
    if not same:
        print("WARNING: the two evaluations disagree:", {k: (ours[1][k], plain[1][k]) for k in plain[1]})
    n_img, n_txt = len(data.images), len(data.texts)
    pairs = (n_img + n_txt) * args.k_test
    print(f"synthetic set: {n_img} images, {n_txt} captions; {args.preset} model at {model.config.image_res} px; "
          f"k_test {args.k_test}; {torch.get_num_threads()} CPU thread(s)")
    distinct = ours[1]["itm_pairs"]
    print(f"ITM pairs: plain loop {pairs:,} in {n_img + n_txt:,} forwards of {args.k_test}; ours {distinct:,} distinct "
          f"pairs ({100 * distinct / pairs:.0f} %) in {math.ceil(distinct / args.itm_batch):,} forwards of "
          f"<= {args.itm_batch}")
    print(f"plain loop {plain[0]:8.2f} s   ours {ours[0]:8.2f} s   ratio ours/plain {ours[0] / plain[0]:.3f} "
          f"(target <= 1.1; best of {args.rounds} alternating rounds; all: plain "
          f"{', '.join(f'{t:.1f}' for t in timings['plain'])}, ours {', '.join(f'{t:.1f}' for t in timings['ours'])})"
          f"   same metrics: {same}   r_mean {ours[1]['r_mean']:.2f}")
    median = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
    print(f"median ratio ours/plain {median['ours'] / median['plain']:.3f}")
    print(f"ours: {distinct / ours[0]:,.0f} ITM pairs/s, plain loop {pairs / plain[0]:,.0f} on this CPU")


def estimate(args) -> None:
    n, k = COCO5K["images"] + COCO5K["texts"], COCO5K["k_test"]
    pairs = n * k
    flops = base_pair_flops()
    print(f"\nCOCO 5k (5,000 images, 25,000 captions, k_test 256): {n:,} queries x 256 = {pairs:,} ITM pairs "
          f"({n:,} official forwards of 256 pairs; ours at most {math.ceil(pairs / args.itm_batch):,} of "
          f"{args.itm_batch}, fewer by the pairs in the top 256 of both their image and their text: at most the "
          f"1,280,000 image-side pairs, 17 %)")
    print(f"X-VLM-base fusion + ITM head: {flops / 1e9:.2f} GFLOP per pair -> {pairs * flops / 1e15:.1f} PFLOP")
    for name, tflops in (("A100 bf16 (312 TF peak)", 312), ("H100 SXM bf16 (989 TF peak)", 989),
                         ("H200 bf16 (989 TF peak)", 989)):
        for mfu in (0.3, 0.5):
            print(f"  {name:<28} at {int(mfu * 100)}% of peak: {pairs * flops / (tflops * 1e12 * mfu) / 60:6.1f} min")
    print("  + encoders (5,000 Swin-B images at 384 px ~47 GFLOP each, 25,000 texts): < 1 % of the ITM FLOPs")
    if args.measure_base:
        device, seconds = measure_base_forward(args.itm_batch, args.repeats)
        print(f"measured base fusion on {device}: {seconds * 1e3:.1f} ms per forward of {args.itm_batch} pairs -> "
              f"COCO 5k ITM {pairs / args.itm_batch * seconds / 60:.1f} min "
              f"({args.itm_batch * flops / seconds / 1e12:.2f} TFLOP/s achieved)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=5, help="captions per image (default 5)")
    parser.add_argument("--k-test", type=int, default=16, help="k_test (default 16; COCO uses 256: cost is linear)")
    parser.add_argument("--itm-batch", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--order", default="plain,ours", help="which runs first (plain,ours or ours,plain)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; each side's best counts")
    parser.add_argument("--skip-compare", action="store_true", help="only the COCO 5k estimate")
    parser.add_argument("--measure-base", action="store_true", help="time the base-size fusion on this device")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_compare:
        compare(args)
    estimate(args)


if __name__ == "__main__":
    main()
