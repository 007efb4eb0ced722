"""Evaluation on X-VLM's downstream sets, computed as the official scripts compute it: retrieval (Retrieval.py
evaluation + itm_eval) and RefCOCO+ box grounding (Grounding_bbox.py val + dataset/utils.py grounding_eval_bbox).

* Retrieval: every image and text is encoded once; ITC similarity ranks all pairs; for each image (text) the top
  k_test texts (images) by ITC are scored by the ITM head, and the score matrix holds those ITM 'match' logits with
  -100 everywhere else (Retrieval.py:109-152: ITM only, ITC is not added). TR / IR R@1/5/10 are the share of queries
  whose best positive ranks in the top k, and r_mean their mean (itm_eval, Retrieval.py:166-210), in percent.
  The ITM pairs of many queries go through one forward (`itm_batch` pairs), not one forward per query, and a pair
  in the top k of both its image and its text is scored once, not twice.
* Grounding: the box head's (cx, cy, w, h) for each text in its whole image, scaled to the image's pixels, converted
  to (x, y, w, h) and compared with the ref's box by the official computeIoU (dataset/utils.py:336-348, inclusive
  pixel edges); accuracy = share with IoU >= 0.5, per split (dataset/utils.py:258-290).

Images that are missing or unreadable are counted (`missing_images`, by reason) and left out together with their
texts; every result says over how many images / texts / refs it was computed.
"""
from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

import storage
from storage.errors import XvlmError
from train.evaluate import RECALL_KS, best_positive_rank, normalise

log = logging.getLogger(__name__)

OFFICIAL_FILL = -100.0           # Retrieval.py:110,134: the score of pairs outside a query's top k_test
READ_THREADS = 8                 # image reads in flight (S3 latency, JPEG decoding releases the GIL)
READ_AHEAD = 64                  # decoded images waiting for the encoder at most


@dataclass
class DownstreamEvalConfig:
    """How the downstream evaluation runs. Text defaults are X-VLM's fine-tuning ones (max_words 30 in
    dataset/re_dataset.py:49 and grounding_dataset.py:58, max_tokens 40 in the configs)."""
    tokenizer: str = ""                 # local BERT WordPiece tokenizer folder
    k_test: int = 256                   # configs/Retrieval_coco.yaml:33 (Flickr30K: 128); 0 = ITC ranking only
    batch_size: int = 64                # images / texts per encoder forward
    itm_batch: int = 256                # (image, text) pairs per ITM forward, across queries
    max_words: int = 30
    max_tokens: int = 40
    pre_caption: str = "xvlm"
    iou_threshold: float = 0.5
    progress: bool = True

    def __post_init__(self) -> None:
        if self.k_test < 0:
            raise XvlmError(f"k_test must be >= 0 (0: ITC ranking only), got {self.k_test}")
        if self.batch_size < 1 or self.itm_batch < 1:
            raise XvlmError(f"batch_size and itm_batch must be >= 1, got {self.batch_size}, {self.itm_batch}")
        if not self.tokenizer:
            raise XvlmError("downstream evaluation needs the tokenizer folder (--tokenizer DIR)")


# ---------------------------------------------------------------------------------------------- metrics


def official_score_matrix(sims: torch.Tensor, k: int, score_pairs: Callable[[torch.Tensor, torch.Tensor],
                                                                             torch.Tensor]) -> torch.Tensor:
    """Retrieval.py:110-131 for every query row at once: [Q, C] filled with -100, each row's top-k ITC candidates
    holding score_pairs(query_idx [P], candidate_idx [P]) -> [P] (the ITM match logit)."""
    n_query, n_cand = sims.shape
    k = min(k, n_cand)
    top = sims.float().topk(k, dim=1).indices
    query = torch.arange(n_query)[:, None].expand(-1, k).reshape(-1)
    scores = score_pairs(query, top.reshape(-1)).float().reshape(n_query, k)
    if not bool(torch.isfinite(scores).all()):
        raise XvlmError("the ITM scores hold NaN or inf (is the model diverged?)")
    return torch.full((n_query, n_cand), OFFICIAL_FILL).scatter(1, top, scores)


def official_score_matrices(sims: torch.Tensor, k: int, score_pairs: Callable[[torch.Tensor, torch.Tensor],
                                                                              torch.Tensor]) -> tuple[torch.Tensor,
                                                                                                      torch.Tensor]:
    """(score_matrix_i2t [I, T], score_matrix_t2i [T, I]) of Retrieval.py:110-152 from sims [I, T]: both directions'
    top-k pairs, each distinct (image, text) pair scored once by score_pairs(image_idx, text_idx) (the official code
    scores a pair found from both sides twice; its score is the same), in (image, text) order."""
    n_img, n_txt = sims.shape
    top_i = sims.float().topk(min(k, n_txt), dim=1).indices              # [I, k]: texts of each image
    top_t = sims.t().float().topk(min(k, n_img), dim=1).indices          # [T, k]: images of each text
    keys = torch.cat([(torch.arange(n_img)[:, None] * n_txt + top_i).reshape(-1),
                      (top_t * n_txt + torch.arange(n_txt)[:, None]).reshape(-1)])
    unique, inverse = torch.unique(keys, return_inverse=True)
    scores = score_pairs(unique // n_txt, unique % n_txt).float()[inverse]
    if not bool(torch.isfinite(scores).all()):
        raise XvlmError("the ITM scores hold NaN or inf (is the model diverged?)")
    n_i2t = top_i.numel()
    i2t = torch.full((n_img, n_txt), OFFICIAL_FILL).scatter(1, top_i, scores[:n_i2t].reshape(top_i.shape))
    t2i = torch.full((n_txt, n_img), OFFICIAL_FILL).scatter(1, top_t, scores[n_i2t:].reshape(top_t.shape))
    return i2t, t2i


def itm_eval(scores_i2t: torch.Tensor, scores_t2i: torch.Tensor, text_image: torch.Tensor) -> dict[str, float]:
    """Retrieval.py itm_eval (lines 166-210) with its key names, in percent: txt_r1/5/10 (image->text, the best of
    an image's texts), img_r1/5/10 (text->image), txt_r_mean, img_r_mean, r_mean. Ties count against the model
    (the official argsort leaves their order to numpy; they only arise among the -100 entries)."""
    n_img, n_txt = scores_i2t.shape
    if scores_t2i.shape != (n_txt, n_img) or text_image.shape != (n_txt,):
        raise XvlmError(f"itm_eval: scores {tuple(scores_i2t.shape)} / {tuple(scores_t2i.shape)} and text_image "
                        f"{tuple(text_image.shape)} do not fit together")
    positives = text_image[:, None] == torch.arange(n_img)[None, :]          # [N_txt, N_img]
    ranks = {"txt": best_positive_rank(scores_i2t, positives.t()), "img": best_positive_rank(scores_t2i, positives)}
    out: dict[str, float] = {}
    for side, rank in ranks.items():
        for k in RECALL_KS:
            out[f"{side}_r{k}"] = 100.0 * float((rank < k).double().mean())
        out[f"{side}_r_mean"] = sum(out[f"{side}_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def official_iou(box1: torch.Tensor, box2: torch.Tensor) -> torch.Tensor:
    """dataset/utils.py computeIoU (lines 336-348) on rows of (x, y, w, h) pixel boxes [K, 4] -> [K]: the
    intersection with inclusive pixel edges (x2 = x + w - 1, +1 on each side), the union from w * h areas."""
    x1 = torch.maximum(box1[:, 0], box2[:, 0])
    y1 = torch.maximum(box1[:, 1], box2[:, 1])
    x2 = torch.minimum(box1[:, 0] + box1[:, 2] - 1, box2[:, 0] + box2[:, 2] - 1)
    y2 = torch.minimum(box1[:, 1] + box1[:, 3] - 1, box2[:, 1] + box2[:, 3] - 1)
    inter = torch.where((x1 < x2) & (y1 < y2), (x2 - x1 + 1) * (y2 - y1 + 1), torch.zeros_like(x1))
    union = box1[:, 2] * box1[:, 3] + box2[:, 2] * box2[:, 3] - inter
    return inter / union


def pixel_boxes(pred: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Predicted (cx, cy, w, h) in [0, 1] [K, 4] -> (x, y, w, h) in the image's pixels (dataset/utils.py:268-273);
    sizes [K, 2] = (width, height)."""
    scale = sizes.float().repeat(1, 2)            # (W, H, W, H)
    box = pred.float() * scale
    return torch.stack([box[:, 0] - box[:, 2] / 2, box[:, 1] - box[:, 3] / 2, box[:, 2], box[:, 3]], dim=1)


# ---------------------------------------------------------------------------------------------- inputs


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="it", disable=not progress, leave=False)


@dataclass
class _Images:
    """The images that could be read, as model inputs, and what could not."""
    kept: list[int] = field(default_factory=list)            # indices into the caller's list
    sizes: list[tuple[int, int]] = field(default_factory=list)
    missing: dict[str, int] = field(default_factory=dict)    # reason -> count


def _read_ahead(pool: ThreadPoolExecutor, fn: Callable, items: Sequence, ahead: int) -> Iterator:
    """fn(item) for each item, in order, at most `ahead` in flight (decoded images never pile up in memory)."""
    futures: deque = deque()
    for item in items:
        futures.append(pool.submit(fn, item))
        if len(futures) >= ahead:
            yield futures.popleft().result()
    while futures:
        yield futures.popleft().result()


def _read_images(root: str, rels: Sequence[str], res: int, progress: bool,
                 on_batch: Callable[[torch.Tensor, list[int]], None], batch_size: int) -> _Images:
    """Read `rels` under `root` (threads); hand each batch of uint8 [B, 3, res, res] to on_batch in order, with the
    indices (into `rels`) of its images."""
    from shards.downstream import ImageProblem, read_pixels

    def read(rel: str):
        try:
            return read_pixels(root, rel, res)
        except ImageProblem as err:
            return err

    out, pending, first = _Images(), [], 0
    bar = _bar(len(rels), "images", progress)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for index, got in enumerate(_read_ahead(pool, read, rels, READ_AHEAD)):
            bar.update(1)
            if isinstance(got, ImageProblem):
                out.missing[got.reason] = out.missing.get(got.reason, 0) + 1
                if sum(out.missing.values()) <= 5:
                    log.warning("leaving out image %s", got)
                continue
            pixels, size = got
            out.kept.append(index)
            out.sizes.append(size)
            pending.append(torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1))
            if len(pending) == batch_size:
                on_batch(torch.stack(pending), out.kept[first:])
                pending, first = [], len(out.kept)
    if pending:
        on_batch(torch.stack(pending), out.kept[first:])
    bar.close()
    return out


def _tokenise(texts: Sequence[str], cfg: DownstreamEvalConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids, atts) int64 [N, max_tokens] as our loader tokenises ([CLS] + WordPiece, no [SEP]) and the count of
    texts pre_caption emptied (kept as [CLS] alone, as the official tokenizer keeps an empty caption)."""
    from shards import text

    vocab = text.load_vocab(cfg.tokenizer)
    ids = torch.zeros(len(texts), cfg.max_tokens, dtype=torch.int64)
    atts = torch.zeros_like(ids)
    empty = 0
    for row, raw in enumerate(texts):
        try:
            tokens = text.token_ids(text.pre_caption(raw, cfg.max_words, cfg.pre_caption), vocab, cfg.max_tokens)
        except text.EmptyText:
            tokens, empty = [vocab.cls_id], empty + 1
        ids[row, :len(tokens)] = torch.tensor(tokens)
        atts[row, :len(tokens)] = 1
    return ids, atts, empty


def _encode_texts(model, ids: torch.Tensor, atts: torch.Tensor, batch: int, device) -> tuple[torch.Tensor, ...]:
    hidden, feat = [], []
    for part in _chunks(ids.shape[0], batch):
        h, f = model.encode_text(ids[part].to(device), atts[part].to(device))
        hidden.append(h.float())
        feat.append(f.float())
    return torch.cat(hidden), torch.cat(feat)


# ---------------------------------------------------------------------------------------------- retrieval


def itm_pair_scorer(model, image_embeds: torch.Tensor, text_hidden: torch.Tensor, text_atts: torch.Tensor,
                    itm_batch: int, progress: bool = False,
                    desc: str = "ITM") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """score(image_idx [P], text_idx [P]) -> ITM match logits [P] (on the CPU), itm_batch pairs per forward: the
    vision sequence attended in full (Retrieval.py:122, encoder_att all ones)."""
    from model.concept import whole_image_atts

    device = image_embeds.device

    def score(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        out = []
        bar = _bar(len(image_idx), desc, progress)
        for part in _chunks(len(image_idx), itm_batch):
            images = image_embeds[image_idx[part].to(device)]
            rows = text_idx[part].to(device)
            out.append(model.itm_scores(images, whole_image_atts(images), text_hidden[rows],
                                        text_atts[rows]).float().cpu())
            bar.update(part.stop - part.start)
        bar.close()
        return torch.cat(out) if out else torch.zeros(0)

    return score


@torch.no_grad()
def evaluate_retrieval(model, eval_set, image_root: str, cfg: DownstreamEvalConfig,
                       device: torch.device | str | None = None) -> dict[str, Any]:
    """TR / IR R@1/5/10 and r_mean (percent) of `model` on a RetrievalEvalSet (shards.downstream), as Retrieval.py
    computes them, plus the same from ITC alone (itc_*) and the counts it was computed over."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        embeds, feats = [], []

        def encode(batch: torch.Tensor, _: list[int]) -> None:
            e, f = model.encode_image(normalise(batch.to(device)))
            embeds.append(e.float())
            feats.append(f.float())

        images = _read_images(image_root, eval_set.images, model.config.image_res, cfg.progress, encode,
                              cfg.batch_size)
        if not images.kept:
            raise XvlmError(f"{eval_set.name}: none of its {len(eval_set.images)} images could be read under "
                            f"{image_root} ({images.missing}); is --images X-VLM's image_root for this file?")
        texts = [t for i in images.kept for t in eval_set.image_texts[i]]
        text_image = torch.tensor([k for k, i in enumerate(images.kept) for _ in eval_set.image_texts[i]])
        ids, atts, empty = _tokenise([eval_set.texts[t] for t in texts], cfg)
        text_hidden, text_feat = _encode_texts(model, ids, atts, cfg.batch_size, device)
        image_embeds, image_feat = torch.cat(embeds), torch.cat(feats)
        sims = (image_feat @ text_feat.t()).float().cpu()
        out: dict[str, Any] = {"set": eval_set.name, "images": len(images.kept), "texts": len(texts),
                               "images_listed": len(eval_set.images), "texts_listed": len(eval_set.texts),
                               "missing_images": sum(images.missing.values()), "missing_by_reason": images.missing,
                               "empty_texts": empty, "k_test": cfg.k_test}
        out.update({f"itc_{k}": v for k, v in itm_eval(sims, sims.t(), text_image).items()})
        if cfg.k_test == 0:
            out.update({k: out[f"itc_{k}"] for k in itm_eval(sims, sims.t(), text_image)})
            return out
        score = itm_pair_scorer(model, image_embeds, text_hidden, atts.to(device), cfg.itm_batch, cfg.progress)
        scored: list[int] = []

        def counted(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
            scored.append(len(image_idx))
            return score(image_idx, text_idx)

        i2t, t2i = official_score_matrices(sims, cfg.k_test, counted)
        out["itm_pairs"] = sum(scored)          # distinct pairs scored (the official code: (I + T) x k_test)
        out.update(itm_eval(i2t, t2i, text_image))
        return out
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------- grounding


def _refs_by_image(refs: Sequence) -> tuple[list[str], list[list[int]]]:
    images: dict[str, list[int]] = {}
    for k, ref in enumerate(refs):
        images.setdefault(ref.image, []).append(k)
    return list(images), list(images.values())


@torch.no_grad()
def evaluate_grounding(model, refs: Sequence, image_root: str, cfg: DownstreamEvalConfig,
                       device: torch.device | str | None = None) -> dict[str, Any]:
    """acc@IoU 0.5 per split (val / testA / testB ...) of `model` on GroundingRefs (shards.downstream), as
    Grounding_bbox.py + grounding_eval_bbox compute it, with the counts it was computed over."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        image_names, image_refs = _refs_by_image(refs)
        ids, atts, empty = _tokenise([r.text for r in refs], cfg)
        pred = torch.full((len(refs), 4), float("nan"))

        def predict(batch: torch.Tensor, batch_images: list[int]) -> None:
            image_embeds, _ = model.encode_image(normalise(batch.to(device)))
            rows = [(b, r) for b, k in enumerate(batch_images) for r in image_refs[k]]
            for part in _chunks(len(rows), cfg.batch_size):
                image_row = torch.tensor([b for b, _ in rows[part]], device=device)
                ref_row = torch.tensor([r for _, r in rows[part]])
                text_hidden, _ = model.encode_text(ids[ref_row].to(device), atts[ref_row].to(device))
                pred[ref_row] = model.predict_boxes(image_embeds[image_row], text_hidden,
                                                    atts[ref_row].to(device)).float().cpu()

        images = _read_images(image_root, image_names, model.config.image_res, cfg.progress, predict, cfg.batch_size)
        kept = [r for k in images.kept for r in image_refs[k]]
        if not kept:
            raise XvlmError(f"none of the {len(image_names)} grounding images could be read under {image_root} "
                            f"({images.missing}); is --images X-VLM's image_root for this file?")
        kept_t = torch.tensor(sorted(kept))
        sizes = torch.tensor([[refs[r].width, refs[r].height] for r in kept_t.tolist()])
        iou = official_iou(pixel_boxes(pred[kept_t], sizes), torch.tensor([refs[r].box for r in kept_t.tolist()]))
        return _grounding_result(refs, kept_t, iou, cfg, images, empty, len(image_names))
    finally:
        model.train(was_training)


def _grounding_result(refs: Sequence, kept: torch.Tensor, iou: torch.Tensor, cfg: DownstreamEvalConfig,
                      images: _Images, empty: int, n_images: int) -> dict[str, Any]:
    splits: dict[str, list[int]] = {name: [] for name in ("val", "testA", "testB")}
    for row, r in enumerate(kept.tolist()):
        splits.setdefault(refs[r].split or "unknown", []).append(row)
    out: dict[str, Any] = {"refs": len(kept), "refs_listed": len(refs), "images": len(images.kept),
                           "images_listed": n_images, "missing_images": sum(images.missing.values()),
                           "missing_by_reason": images.missing, "empty_texts": empty,
                           "skipped": dict(getattr(refs, "skipped", {})), "iou_threshold": cfg.iou_threshold,
                           "splits": {}}
    for split, rows in splits.items():
        if not rows:
            continue
        hit = iou[rows] >= cfg.iou_threshold
        out["splits"][split] = {"acc": 100.0 * float(hit.float().mean()), "correct": int(hit.sum()),
                                "refs": len(rows), "miou": float(iou[rows].mean())}
        out[f"{split}_d"] = float(hit.float().mean())     # grounding_eval_bbox's key names (dataset/utils.py:290)
    return out


# ---------------------------------------------------------------------------------------------- a checkpoint


@dataclass
class DownstreamRequest:
    """One `xvlm eval --task retrieval|grounding` request; None text fields take the run config's (else X-VLM's)."""
    task: str                                  # retrieval | grounding
    checkpoint: str
    ann: list[str]
    images: str
    run: str | None = None
    refs: str | None = None
    instances: str | None = None
    tokenizer: str | None = None
    max_words: int | None = None
    max_tokens: int | None = None
    k_test: int | None = None                  # None: the fine-tuning run's, else 256
    batch_size: int = 64
    itm_batch: int = 256
    iou: float = 0.5
    device: str | None = None
    progress: bool = True


def load_eval_model(checkpoint: str, run: str | None, device: torch.device):
    """(model on `device`, run config path or None, model file) for a checkpoint argument of `xvlm eval`."""
    from model.io import model_from_bytes
    from train import checkpoint as ckpt
    from train.eval_checkpoint import resolve_checkpoint

    model_path, config_path = resolve_checkpoint(checkpoint, run)
    folder = model_path.rsplit("/", 1)[0]
    if model_path.endswith(f"/{ckpt.MODEL_FILE}") and storage.exists(storage.join(folder, ckpt.MARKER)):
        return ckpt.read_model(folder).to(device), config_path, model_path
    # a .safetensors file or an imported folder's model file, local or s3://, read through storage
    return model_from_bytes(storage.read_bytes(model_path), source=model_path).to(device), config_path, model_path


def finetune_text_settings(config_path: str | None) -> dict[str, Any]:
    """A fine-tuning run's own text settings and k_test (its config's `finetune` section, when it has one with a
    task): the evaluation must tokenise as the run trained (a small model may have fewer text positions than 40)."""
    if not config_path or not storage.exists(config_path):
        return {}
    from train.config import load_config

    ft = getattr(load_config(config_path), "finetune", None)
    if ft is None or not getattr(ft, "task", ""):
        return {}
    found = {"tokenizer": getattr(ft, "tokenizer", "") or None, "max_words": getattr(ft, "max_words", None),
             "max_tokens": getattr(ft, "max_tokens", None), "k_test": getattr(ft, "k_test", None)}
    return {k: v for k, v in found.items() if v is not None}


def _request_config(request: DownstreamRequest, config_path: str | None) -> DownstreamEvalConfig:
    """The command line first, then a fine-tuning run's settings, then X-VLM's fine-tuning defaults (max_words 30,
    max_tokens 40, k_test 256), the tokenizer and pre_caption mode from the run's data section."""
    from train.eval_checkpoint import imported_text_settings, text_settings

    imported_text_settings(request.checkpoint, request)
    for name, value in finetune_text_settings(config_path).items():
        if getattr(request, name) is None:
            setattr(request, name, value)
    for name in ("max_words", "max_tokens", "k_test"):
        if getattr(request, name) is None:
            setattr(request, name, getattr(DownstreamEvalConfig, name))
    return DownstreamEvalConfig(k_test=request.k_test, batch_size=request.batch_size,  # type: ignore[arg-type]
                                itm_batch=request.itm_batch, iou_threshold=request.iou, progress=request.progress,
                                **text_settings(config_path, request))


def check_text_positions(model, cfg: DownstreamEvalConfig) -> None:
    """max_tokens must fit the model's text positions (else a clear error, not an index error in the embedding)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and cfg.max_tokens > positions:
        raise XvlmError(f"max_tokens {cfg.max_tokens} is more than the model's {positions} text positions; pass "
                        f"--max-tokens {positions} or fewer (the run's fine-tuning max_tokens)")


def evaluate_downstream_checkpoint(request: DownstreamRequest) -> dict[str, Any]:
    """Read the annotation files first (bad input fails before the model loads), then evaluate the checkpoint:
    retrieval -> {"results": {set name: metrics}}; grounding -> {"results": {"refcoco+": metrics over all files}}."""
    from shards.downstream import GroundingRefs, read_grounding, read_retrieval_eval

    if request.task not in ("retrieval", "grounding"):
        raise XvlmError(f"unknown downstream task {request.task!r}: retrieval or grounding")
    if not request.ann:
        raise XvlmError(f"--task {request.task} needs --ann FILE (X-VLM's annotation file; repeatable)")
    if request.task == "retrieval":
        sets = [read_retrieval_eval(path) for path in request.ann]
    else:
        refs = GroundingRefs()
        for path in request.ann:
            got = read_grounding(path, request.refs, request.instances)
            refs.extend(got)
            for reason, n in got.skipped.items():
                refs.skipped[reason] = refs.skipped.get(reason, 0) + n
    device = torch.device(request.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config_path, model_path = load_eval_model(request.checkpoint, request.run, device)
    cfg = _request_config(request, config_path)
    check_text_positions(model, cfg)
    log.info("evaluating %s on %s (%s)", model_path, ", ".join(request.ann), device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
        torch.autocast("cpu", enabled=False)
    results: dict[str, Any] = {}
    with autocast:
        if request.task == "retrieval":
            for data in sets:
                results[data.name] = evaluate_retrieval(model, data, request.images, cfg, device)
        else:
            results["refcoco+"] = evaluate_grounding(model, refs, request.images, cfg, device)
    return {"task": request.task, "checkpoint": model_path, "ann": list(request.ann), "images": request.images,
            "results": results}
