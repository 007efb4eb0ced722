"""Zero-shot evaluation on held-out shards: image<->text retrieval R@1/5/10 (ITC ranking, ITM re-ranking of the
top-k, as X-VLM) and grounding accuracy (the predicted box of a region text has IoU >= 0.5 with the true box).

The metric functions take plain tensors and are tested on known answers; `evaluate` makes the model calls.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torchvision.ops import box_convert

from storage.errors import XvlmError

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)


@dataclass
class EvalConfig:
    """What `evaluate` computes and how much at a time."""

    k_test: int = 16                 # ITM re-ranks each query's top-k ITC candidates (X-VLM: 128 on COCO-5k);
                                     # 0: ITC ranking only (a model trained without ITM)
    batch_size: int = 64             # images / texts / ITM pairs per forward
    iou_threshold: float = 0.5       # a grounding counts when IoU >= this
    max_images: int | None = None    # evaluate on the first N held-out images only (None: all)
    progress: bool = True            # tqdm bars
    # Text handling when evaluating dataset paths (the run's loader settings; the trainer passes its own).
    tokenizer: str = ""              # local BERT WordPiece tokenizer folder
    max_words: int = 40
    max_tokens: int = 40
    pre_caption: str = "xvlm"        # the run's pre_caption mode (shards.text.pre_caption)

    def __post_init__(self) -> None:
        if self.k_test < 0:
            raise XvlmError(f"eval k_test must be >= 0 (0: no ITM re-ranking), got {self.k_test}")
        if self.batch_size < 1:
            raise XvlmError(f"eval batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise XvlmError(f"eval iou_threshold must lie in (0, 1], got {self.iou_threshold}")
        if self.max_images is not None and self.max_images < 1:
            raise XvlmError(f"eval max_images must be >= 1 or null, got {self.max_images}")


# ---------------------------------------------------------------------------------------------- metrics


def best_positive_rank(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best-scoring positive candidate: the number of negatives that score at least as
    high. Ties count against the model, so a model that scores everything alike ranks last, not first.

    scores [Q, C] float, positives [Q, C] bool (every query needs at least one positive) -> ranks [Q] int64.
    """
    if scores.shape != positives.shape:
        raise XvlmError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} differ in shape")
    if not bool(positives.any(dim=1).all()):
        raise XvlmError("a retrieval query has no positive candidate")
    scores = scores.float()
    best = scores.masked_fill(~positives, -math.inf).max(dim=1, keepdim=True).values
    return ((scores >= best) & ~positives).sum(dim=1)


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """{k: fraction of queries whose best positive is among the top k candidates}."""
    ranks = best_positive_rank(scores, positives)
    return {k: float((ranks < k).float().mean()) for k in ks}


def retrieval_metrics(scores_i2t: torch.Tensor, scores_t2i: torch.Tensor, text_image: torch.Tensor,
                      ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Image->text and text->image R@k, and their mean (X-VLM's r_mean).

    scores_i2t [N_img, N_txt], scores_t2i [N_txt, N_img]; text_image [N_txt] = the image each text describes
    (an image may have several texts, each text has exactly one image).
    """
    n_img, n_txt = scores_i2t.shape
    if scores_t2i.shape != (n_txt, n_img):
        raise XvlmError(f"scores_t2i should be [{n_txt}, {n_img}], got {tuple(scores_t2i.shape)}")
    if text_image.shape != (n_txt,):
        raise XvlmError(f"text_image should have {n_txt} entries, got {tuple(text_image.shape)}")
    positives_t2i = text_image[:, None] == torch.arange(n_img)[None, :]
    i2t = recall_at_k(scores_i2t, positives_t2i.t(), ks)
    t2i = recall_at_k(scores_t2i, positives_t2i, ks)
    out = {f"i2t_r{k}": i2t[k] for k in ks}
    out.update({f"t2i_r{k}": t2i[k] for k in ks})
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def rerank_top_k(itc_scores: torch.Tensor, k: int,
                 score_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Re-rank each row's top-k ITC candidates by a finer score (X-VLM: the ITM match logit).

    itc_scores [Q, C]; score_pairs(query_idx [P], candidate_idx [P]) -> scores [P]. Returns [Q, C] scores whose
    order puts the top-k of every row first, ordered by the finer score, and the remaining candidates after them
    in their ITC order (so R@k for k beyond the re-ranked depth stays meaningful).
    """
    n_query, n_cand = itc_scores.shape
    k = min(k, n_cand)
    itc_scores = itc_scores.float()
    top_idx = itc_scores.topk(k, dim=1).indices                           # [Q, k]
    query_idx = torch.arange(n_query)[:, None].expand(-1, k).reshape(-1)
    fine = score_pairs(query_idx, top_idx.reshape(-1)).float().reshape(n_query, k)
    if not bool(torch.isfinite(fine).all()):
        raise XvlmError("the re-ranking scores hold NaN or inf (is the model diverged?)")
    # Lift the re-ranked entries above every ITC score; the shift keeps their order among themselves.
    lifted = fine - fine.min() + itc_scores.max() + 1.0
    return itc_scores.scatter(1, top_idx, lifted)


def box_iou_pairs(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of row k's predicted box with row k's target box; both [K, 4] as (cx, cy, w, h) -> [K]."""
    if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != 4:
        raise XvlmError(f"boxes must both be [K, 4], got {tuple(pred.shape)} and {tuple(target.shape)}")
    a = box_convert(pred.float(), "cxcywh", "xyxy")
    b = box_convert(target.float(), "cxcywh", "xyxy")
    top_left = torch.maximum(a[:, :2], b[:, :2])
    bottom_right = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(dim=1)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def grounding_accuracy(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> float:
    """Fraction of rows whose predicted box has IoU >= threshold with the target box ((cx, cy, w, h), [K, 4])."""
    if pred.shape[0] == 0:
        raise XvlmError("grounding accuracy over zero region texts: the held-out split has no boxes")
    return float((box_iou_pairs(pred, target) >= threshold).float().mean())


# ---------------------------------------------------------------------------------------------- held-out data


@dataclass
class EvalSet:
    """A held-out split in memory: every image plainly resized to R x R (no augmentation), every caption and every
    box text tokenised. Retrieval uses the images with captions; grounding uses every usable box text."""

    keys: list[str]
    images: torch.Tensor             # uint8 [N, 3, R, R]
    caption_ids: torch.Tensor        # int64 [Nc, T]
    caption_atts: torch.Tensor       # int64 [Nc, T]
    caption_image: torch.Tensor      # int64 [Nc]: the image each caption describes
    region_ids: torch.Tensor         # int64 [Nr, T]
    region_atts: torch.Tensor        # int64 [Nr, T]
    region_image: torch.Tensor       # int64 [Nr]
    region_boxes: torch.Tensor       # float32 [Nr, 4]: (cx, cy, w, h) / image size, in [0, 1]
    captions: list[str]
    region_texts: list[str]
    skipped: dict[str, int]          # reason -> count of shard samples / texts / boxes left out

    @property
    def retrieval_images(self) -> torch.Tensor:
        """Indices of the images that have at least one caption (the retrieval gallery)."""
        return torch.unique(self.caption_image)


@dataclass
class _TextRows:
    """Texts of one kind (captions or box texts) as they are read: clean text, token ids, image index."""

    texts: list[str] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    image: list[int] = field(default_factory=list)

    def add(self, clean: str, ids: list[int], image: int) -> None:
        self.texts.append(clean)
        self.ids.append(ids)
        self.image.append(image)

    def tensors(self, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, atts) int64 [n, max_tokens], padded with 0."""
        ids = torch.zeros(len(self.ids), max_tokens, dtype=torch.int64)
        atts = torch.zeros(len(self.ids), max_tokens, dtype=torch.int64)
        for i, row in enumerate(self.ids):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
            atts[i, :len(row)] = 1
        return ids, atts


def _held_out_samples(datasets: list) -> Iterator:
    """Every planned sample of the datasets' shards in index order: RawSample or Skipped (damage never stops it)."""
    from shards.tar_stream import iter_range

    for dataset in datasets:
        for shard in dataset.shards:
            yield from iter_range(shard, 0, shard.samples)


class _EvalSetBuilder:
    """Collects held-out samples into an EvalSet: the images, one row per usable caption and per usable box text,
    and what was left out, by reason (logged, never dropped silently)."""

    def __init__(self, vocab, image_res: int, max_words: int, max_tokens: int, pre_caption: str) -> None:
        self.vocab, self.image_res, self.max_words, self.max_tokens = vocab, image_res, max_words, max_tokens
        self.pre_caption = pre_caption
        self.keys: list[str] = []
        self.images: list[torch.Tensor] = []
        self.captions = _TextRows()
        self.regions = _TextRows()
        self.region_boxes: list[list[float]] = []
        self.skipped: dict[str, int] = {}

    def skip(self, reason: str, key: str = "", detail: object = "") -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if key:
            log.warning("eval data: leaving out %s (%s): %s", key, reason, detail)

    def encode(self, raw: str) -> tuple[str, list[int]] | None:
        from shards import text

        try:
            clean = text.pre_caption(raw, self.max_words, self.pre_caption)
            return clean, text.token_ids(clean, self.vocab, self.max_tokens)
        except text.EmptyText:
            return None

    def add(self, item) -> None:
        """One sample of the shards (or a Skipped for a damaged member or a truncated shard)."""
        from shards.samples import DECODE_ERRORS, SkipSample

        if not hasattr(item, "files"):
            self.skip(item.reason, item.key, item.detail)
            return
        try:
            meta, pixels, width, height = self._decoded(item)
        except SkipSample as err:
            self.skip(err.reason, item.key, err.detail)
            return
        except DECODE_ERRORS as err:
            self.skip("corrupt_image", item.key, err)
            return
        index = len(self.keys)
        self.keys.append(item.key)
        self.images.append(torch.from_numpy(np.asarray(pixels, dtype=np.uint8).copy()).permute(2, 0, 1))
        self._add_texts(meta, index, width, height)

    def _decoded(self, item) -> tuple[dict, Any, int, int]:
        """(meta, pixels, width, height): the whole image, resized to R x R (aspect not kept, as the region crops
        in training), deterministically."""
        from shards import augment
        from shards.samples import SkipSample, parse_meta

        if "jpg" not in item.files or "json" not in item.files:
            raise SkipSample("missing_member", "the sample lacks its jpg or json member")
        meta = parse_meta(item.files["json"])
        image = augment.open_image(item.files["jpg"])
        width, height = image.size
        if (meta.get("width"), meta.get("height")) != (width, height):
            raise SkipSample("size_mismatch", f"image is {width}x{height}, its json says "
                                              f"{meta.get('width')}x{meta.get('height')}")
        return meta, augment.crop_resize(image, (0, 0, width, height), self.image_res, self.image_res), width, height

    def _add_texts(self, meta: dict, index: int, width: int, height: int) -> None:
        from shards.samples import region_text, usable_box

        for raw in meta.get("captions") or []:
            encoded = self.encode(str(raw))
            if encoded is None:
                self.skip("empty_caption")
                continue
            self.captions.add(*encoded, index)
        for region in meta.get("regions") or []:
            box = usable_box(region.get("bbox"), width, height)
            encoded = self.encode(region_text(region))
            if box is None or encoded is None:
                self.skip("unusable_box" if box is None else "empty_region_text")
                continue
            x, y, w, h = box
            self.region_boxes.append([(x + w / 2) / width, (y + h / 2) / height, w / width, h / height])
            self.regions.add(*encoded, index)

    def build(self, paths: list[str]) -> EvalSet:
        if not self.keys:
            raise XvlmError(f"no usable held-out images in {paths} (left out: {self.skipped or 'none'})")
        if self.skipped:
            log.warning("eval data: left out %s", ", ".join(f"{n} x {r}" for r, n in sorted(self.skipped.items())))
        caption_ids, caption_atts = self.captions.tensors(self.max_tokens)
        region_ids, region_atts = self.regions.tensors(self.max_tokens)
        return EvalSet(keys=self.keys, images=torch.stack(self.images), caption_ids=caption_ids,
                       caption_atts=caption_atts, caption_image=torch.tensor(self.captions.image, dtype=torch.int64),
                       region_ids=region_ids, region_atts=region_atts,
                       region_image=torch.tensor(self.regions.image, dtype=torch.int64),
                       region_boxes=torch.tensor(self.region_boxes, dtype=torch.float32).reshape(-1, 4),
                       captions=self.captions.texts, region_texts=self.regions.texts, skipped=self.skipped)


def load_eval_set(datasets: str | Sequence[str], *, image_res: int, tokenizer: str, max_words: int = 40,
                  max_tokens: int = 40, max_images: int | None = None, progress: bool = True,
                  pre_caption: str = "xvlm") -> EvalSet:
    """Read held-out shards (built datasets: folders or s3:// prefixes) in index order, deterministically.

    Damaged samples, images whose size disagrees with their JSON, texts that pre_caption empties and boxes outside
    the image are left out and counted in `skipped` by reason (and logged), never dropped silently. `max_images`
    limits how many shard samples are read.
    """
    from tqdm import tqdm

    from shards import text
    from shards.dataset import open_datasets

    paths = [datasets] if isinstance(datasets, str) else list(datasets)
    opened = open_datasets(paths)
    builder = _EvalSetBuilder(text.load_vocab(tokenizer), image_res, max_words, max_tokens, pre_caption)
    total = sum(d.samples for d in opened) if max_images is None else min(max_images, sum(d.samples for d in opened))
    for item in tqdm(itertools.islice(_held_out_samples(opened), total), total=total, desc="eval data",
                     unit="img", disable=not progress, leave=False):
        builder.add(item)
    return builder.build(paths)


# ---------------------------------------------------------------------------------------------- model calls


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, R, R] -> float32, CLIP mean/std normalised (the loader's normalisation)."""
    from shards.augment import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@dataclass
class _Encoded:
    image_embeds: torch.Tensor       # [N, 1 + P, C] float32 on the device
    image_feat: torch.Tensor         # [N, D]
    caption_hidden: torch.Tensor     # [Nc, T, H]
    caption_feat: torch.Tensor       # [Nc, D]
    region_hidden: torch.Tensor      # [Nr, T, H]


def _encode_all(model, data: EvalSet, cfg: EvalConfig, device: torch.device) -> _Encoded:
    from tqdm import tqdm

    image_embeds, image_feat = [], []
    for part in tqdm(list(_chunks(len(data.keys), cfg.batch_size)), desc="eval images", disable=not cfg.progress,
                     leave=False):
        embeds, feat = model.encode_image(normalise(data.images[part].to(device)))
        image_embeds.append(embeds.float())
        image_feat.append(feat.float())

    def texts(ids: torch.Tensor, atts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, feat = [], []
        for part in _chunks(ids.shape[0], cfg.batch_size):
            h, f = model.encode_text(ids[part].to(device), atts[part].to(device))
            hidden.append(h.float())
            feat.append(f.float())
        if not hidden:
            return torch.zeros(0, ids.shape[1], 1, device=device), torch.zeros(0, 1, device=device)
        return torch.cat(hidden), torch.cat(feat)

    caption_hidden, caption_feat = texts(data.caption_ids, data.caption_atts)
    region_hidden, _ = texts(data.region_ids, data.region_atts)
    return _Encoded(torch.cat(image_embeds), torch.cat(image_feat), caption_hidden, caption_feat, region_hidden)


def _itm_pairs(model, enc: _Encoded, data: EvalSet, gallery: torch.Tensor, device: torch.device,
               batch_size: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """score(image_row, caption_row) -> ITM match logits, image_row indexing `gallery` (the retrieval images)."""
    from model.concept import whole_image_atts

    def score(image_rows: torch.Tensor, caption_rows: torch.Tensor) -> torch.Tensor:
        out = []
        for part in _chunks(len(image_rows), batch_size):
            images = enc.image_embeds[gallery[image_rows[part]].to(device)]
            rows = caption_rows[part].to(device)
            out.append(model.itm_scores(images, whole_image_atts(images), enc.caption_hidden[rows],
                                        data.caption_atts[rows.cpu()].to(device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    return score


def run_k_test(train_cfg, k_test: int) -> int:
    """k_test for a model trained with `train_cfg` (a TrainConfig): 0, ranking by ITC only, when the run trained
    no ITM head (loss.itm: 0), since re-ranking by an untrained head is noise; else k_test."""
    return k_test if train_cfg.loss.itm > 0 else 0


def _as_eval_inputs(data: Any, cfg: EvalConfig | dict | None, model) -> tuple[EvalSet, EvalConfig]:
    """Accept an EvalSet, dataset path(s) (with cfg's tokenizer settings), or a TrainConfig (its eval section)."""
    if hasattr(data, "eval") and hasattr(data, "data"):     # a TrainConfig: the trainer's periodic evaluation
        train_cfg = data
        options = dict(train_cfg.eval.options)
        if train_cfg.eval.max_samples:
            options.setdefault("max_images", train_cfg.eval.max_samples)
        loader = train_cfg.data.build(image_res=model.config.image_res, grid_stride=model.grid_stride)
        options.setdefault("tokenizer", loader.tokenizer)
        options.setdefault("max_words", loader.max_words)
        options.setdefault("max_tokens", loader.max_tokens)
        options.setdefault("pre_caption", loader.pre_caption)
        options.setdefault("progress", False)
        options.setdefault("k_test", run_k_test(train_cfg, EvalConfig.k_test))
        return _as_eval_inputs(list(train_cfg.eval.datasets), options, model)
    if cfg is None:
        cfg = EvalConfig()
    elif isinstance(cfg, dict):
        known = {f for f in EvalConfig.__dataclass_fields__}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise XvlmError(f"unknown eval option(s) {unknown}; valid: {sorted(known)}")
        cfg = EvalConfig(**cfg)
    if isinstance(data, EvalSet):
        return data, cfg
    if not data:
        raise XvlmError("evaluation needs held-out datasets (folders or s3:// prefixes built by xvlm build-shards)")
    if not cfg.tokenizer:
        raise XvlmError("evaluating dataset paths needs the tokenizer folder (EvalConfig.tokenizer / --tokenizer)")
    key = (tuple([data] if isinstance(data, str) else data), model.config.image_res, cfg.tokenizer, cfg.max_words,
           cfg.max_tokens, cfg.max_images, cfg.pre_caption)
    if key not in _EVAL_SET_CACHE:
        _EVAL_SET_CACHE.clear()          # keep one split in memory: periodic evaluation reuses it
        _EVAL_SET_CACHE[key] = load_eval_set(list(key[0]), image_res=model.config.image_res, tokenizer=cfg.tokenizer,
                                             max_words=cfg.max_words, max_tokens=cfg.max_tokens,
                                             max_images=cfg.max_images, progress=cfg.progress,
                                             pre_caption=cfg.pre_caption)
    return _EVAL_SET_CACHE[key], cfg


_EVAL_SET_CACHE: dict[tuple, EvalSet] = {}


@torch.no_grad()
def evaluate(model, data: Any, cfg: EvalConfig | dict | None = None,
             device: torch.device | str | None = None) -> dict[str, Any]:
    """Zero-shot retrieval and grounding of `model` (an XVLM) on held-out data.

    data: an EvalSet, held-out dataset path(s) (cfg names the tokenizer), or a TrainConfig (its `eval` section:
    datasets, max_samples, options; the tokenizer from its `data` section) as the trainer passes it.
    Returns i2t_r1/5/10, t2i_r1/5/10, r_mean (ITC top-k re-ranked by ITM), the same from ITC alone (itc_*),
    grounding_acc (IoU >= iou_threshold), grounding_miou, and the counts of images, captions and box texts.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    data, cfg = _as_eval_inputs(data, cfg, model)
    was_training = model.training
    model.eval()
    try:
        enc = _encode_all(model, data, cfg, device)
        out: dict[str, Any] = {"images": len(data.keys), "captions": len(data.captions),
                               "regions": len(data.region_texts), "k_test": cfg.k_test,
                               "skipped": dict(data.skipped)}
        gallery = data.retrieval_images
        if len(data.captions):
            # Captions index the gallery by position (images without captions are not retrieval candidates).
            position = torch.full((len(data.keys),), -1, dtype=torch.int64)
            position[gallery] = torch.arange(len(gallery))
            text_image = position[data.caption_image]
            sim_i2t = (enc.image_feat[gallery.to(device)] @ enc.caption_feat.t()).float().cpu()
            itc = retrieval_metrics(sim_i2t, sim_i2t.t(), text_image)
            out.update({f"itc_{k}": v for k, v in itc.items()})
            if cfg.k_test == 0:     # no ITM head trained: the ITC ranking is the result
                out.update(itc)
            else:
                score = _itm_pairs(model, enc, data, gallery, device, cfg.batch_size)
                i2t = rerank_top_k(sim_i2t, cfg.k_test, score)
                t2i = rerank_top_k(sim_i2t.t().contiguous(), cfg.k_test, lambda t, i: score(i, t))
                out.update(retrieval_metrics(i2t, t2i, text_image))
        else:
            log.warning("eval: the held-out split has no captions; retrieval skipped")
        if len(data.region_texts):
            boxes = []
            for part in _chunks(len(data.region_texts), cfg.batch_size):
                images = enc.image_embeds[data.region_image[part].to(device)]
                boxes.append(model.predict_boxes(images, enc.region_hidden[part],
                                                 data.region_atts[part].to(device)).float().cpu())
            pred = torch.cat(boxes)
            iou = box_iou_pairs(pred, data.region_boxes)
            out["grounding_acc"] = float((iou >= cfg.iou_threshold).float().mean())
            out["grounding_miou"] = float(iou.mean())
            # A constant box at the mean target: what grounding scores without looking at the image.
            constant = data.region_boxes.mean(dim=0, keepdim=True).expand_as(data.region_boxes)
            out["grounding_acc_constant_box"] = grounding_accuracy(constant, data.region_boxes, cfg.iou_threshold)
        else:
            log.warning("eval: the held-out split has no box texts; grounding skipped")
        return out
    finally:
        model.train(was_training)
