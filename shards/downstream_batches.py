"""Fine-tuning batches from X-VLM's downstream files: a resumable stream of retrieval (image, caption, image id) or
grounding (image, referring expression, box) batches, as Retrieval.py / Grounding_bbox.py train on them.

Each epoch is a permutation of the training entries drawn from [seed, epoch] (the same on every rank, as a
DistributedSampler seeded with set_epoch); rank r takes every world_size-th entry of it and the incomplete last batch
is dropped (the official train loaders' drop_last). A sample's augmentation draws from [seed, epoch, entry], so a
batch does not depend on which process or thread built it. The position (epoch, batches done) is the state saved
in every checkpoint: a resumed run gets the same batches as an uninterrupted one. Images are read through the
storage layer (local or s3://); an image that cannot be read is a counted skip (the batch is one row shorter).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from shards.augment import IMAGE_TEXT_OPS, PHOTOMETRIC_OPS, crop_resize, hflip, rand_augment, to_tensor
from shards.boxes import anchor_crop, random_resized_crop
from shards.downstream import GroundingRef, ImageProblem, RetrievalPair, load_downstream_image
from shards.samples import DECODE_ERRORS
from shards.text import EmptyText, PAD_ID, load_vocab, pre_caption, token_ids
from storage.errors import XvlmError

log = logging.getLogger(__name__)

STATE_VERSION = 1
RETRIEVAL_CROP_SCALE = (0.5, 1.0)     # dataset/__init__.py:32 train_transform RandomResizedCrop(scale=(0.5, 1.0))
RANDAUG_N, RANDAUG_M = 2, 7           # RandomAugment(2, 7, ...) of dataset/__init__.py:35 and :52
IMAGE_THREADS = 4


@dataclass(frozen=True)
class BatchOptions:
    """What the stream needs to know, as numbers and paths (it never sees the model or the trainer)."""

    image_res: int
    grid: int                      # the model's final grid side (grounding rows attend to all G*G patches)
    batch_size: int                # per rank
    max_tokens: int = 40
    max_words: int = 30            # pre_caption's max_words (re_dataset.py / grounding_dataset.py: 30)
    tokenizer: str = ""
    seed: int = 42
    augment: bool = True


class DownstreamBatches:
    """Batches of one fine-tuning task for one rank; iterate for the rest of the current epoch (the trainer's
    `endless` asks again for the next), `state_dict` / `load_state_dict` for exact resume."""

    def __init__(self, task: str, entries: Sequence[RetrievalPair | GroundingRef], image_root: str,
                 options: BatchOptions, rank: int = 0, world_size: int = 1) -> None:
        if task not in ("retrieval", "grounding"):
            raise XvlmError(f"fine-tuning task must be retrieval or grounding, got {task!r}")
        self.task, self.entries, self.root, self.options = task, list(entries), image_root, options
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = (len(self.entries) // world_size) // options.batch_size
        if self.steps_per_epoch < 1:
            raise XvlmError(f"{len(self.entries)} training entries make no batch of {options.batch_size} per rank on "
                            f"{world_size} rank(s): lower finetune.batch_size or give a larger training file")
        self.vocab = load_vocab(options.tokenizer)
        ids = sorted({e.image_id for e in self.entries}) if task == "retrieval" else []
        self.image_number = {image_id: n for n, image_id in enumerate(ids)}   # image_id string -> int for `idx`
        self.epoch, self.batch = 0, 0
        self.skips: dict[str, int] = {}

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "task": self.task, "epoch": self.epoch, "batch": self.batch,
                "entries": len(self.entries), "world_size": self.world_size, "skips": dict(self.skips)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"version": STATE_VERSION, "task": self.task, "entries": len(self.entries),
                    "world_size": self.world_size}
        for key, value in expected.items():
            if state.get(key) != value:
                raise XvlmError(f"the checkpoint's fine-tuning position was saved with {key}={state.get(key)!r}, "
                                f"this run has {value!r}: resume with the same training file and world size")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.skips = dict(state.get("skips") or {})

    # ------------------------------------------------------------------ batches
    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's entries of `epoch`, in order (whole batches only)."""
        order = np.random.default_rng([self.options.seed, epoch]).permutation(len(self.entries))
        mine = order[self.rank::self.world_size]
        return mine[: self.steps_per_epoch * self.options.batch_size]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batch >= self.steps_per_epoch:       # a checkpoint taken after an epoch's last batch
            self.epoch, self.batch = self.epoch + 1, 0
        order = self.epoch_order(self.epoch)
        size = self.options.batch_size
        with ThreadPoolExecutor(max_workers=IMAGE_THREADS, thread_name_prefix="finetune-images") as pool:
            while self.batch < self.steps_per_epoch:
                chosen = order[self.batch * size:(self.batch + 1) * size].tolist()
                batch = self.build_batch(chosen, self.epoch, pool)
                self.batch += 1
                yield batch
        self.epoch, self.batch = self.epoch + 1, 0

    def build_batch(self, indices: list[int], epoch: int, pool: ThreadPoolExecutor | None = None) -> dict[str, Any]:
        """The batch of entries `indices` as augmented in `epoch` (docs/batches.md; retrieval: image_text batches
        with `image_ids`, grounding: region batches whose rows attend to the whole image)."""
        jobs = [(i, np.random.default_rng([self.options.seed, epoch, i])) for i in indices]
        samples = list(pool.map(lambda job: self._sample(*job), jobs)) if pool else [self._sample(*job) for job in jobs]
        kept = [s for s in samples if isinstance(s, dict)]
        for reason in (s for s in samples if isinstance(s, str)):
            self.skips[reason] = self.skips.get(reason, 0) + 1
        if len(kept) < 2:
            raise XvlmError(f"fewer than 2 usable samples in a fine-tuning batch (skips so far: {self.skips}); "
                            "check the image root and the annotation file")
        return self._collate(kept)

    def _sample(self, index: int, rng: np.random.Generator) -> dict[str, Any] | str:
        """One entry's training view, or the reason it is skipped (counted by build_batch, never dropped silently)."""
        build = self._retrieval_sample if self.task == "retrieval" else self._grounding_sample
        try:
            return build(index, rng)
        except ImageProblem as err:
            log.warning("skipping a fine-tuning sample: %s", err)
            return err.reason
        except DECODE_ERRORS:
            return "corrupt_image"
        except EmptyText:
            return "empty_text"

    def _retrieval_sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        entry = self.entries[index]
        image = load_downstream_image(self.root, entry.image)
        width, height = image.size
        opts = self.options
        if opts.augment:   # RandomResizedCrop(0.5, 1), RandomHorizontalFlip, RandomAugment(2, 7) (all ops)
            crop = random_resized_crop(width, height, rng, scale=RETRIEVAL_CROP_SCALE)
            pixels = crop_resize(image, crop, opts.image_res, opts.image_res, use_draft=False)
            if rng.random() < 0.5:
                pixels = hflip(pixels)
            pixels = rand_augment(pixels, rng, RANDAUG_N, RANDAUG_M, IMAGE_TEXT_OPS)
        else:
            pixels = crop_resize(image, (0, 0, width, height), opts.image_res, opts.image_res, use_draft=False)
        ids = token_ids(pre_caption(entry.caption, opts.max_words), self.vocab, opts.max_tokens)
        return {"image": to_tensor(pixels), "ids": ids, "image_id": self.image_number[entry.image_id]}

    def _grounding_sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """Grounding_bbox.py's training view (grounding_dataset.py:98-144): a random crop that keeps the box, a
        mirror (not for texts that say left or right: careful_hflip), resize to R x R, RandomAugment(2, 7)
        photometric ops; the target is the box's (cx, cy, w, h) / R."""
        entry = self.entries[index]
        opts = self.options
        image = load_downstream_image(self.root, entry.image)
        width, height = image.size
        x, y, w, h = entry.box
        crop = (0, 0, width, height)
        flipped = False
        text = pre_caption(entry.text, opts.max_words)
        if opts.augment:   # (x0, y0, w0, h0): x0 ~ U{0..floor(x)}, x1 ~ U{min(ceil(x+w), W)..W}, as there
            crop = anchor_crop(entry.box, width, height, rng)
            flipped = rng.random() < 0.5 and not any(word in text for word in ("left", "right"))
        pixels = crop_resize(image, crop, opts.image_res, opts.image_res, use_draft=False)
        if flipped:
            pixels = hflip(pixels)
        if opts.augment:
            pixels = rand_augment(pixels, rng, RANDAUG_N, RANDAUG_M, PHOTOMETRIC_OPS)
        ids = token_ids(text, self.vocab, opts.max_tokens)
        cw, ch = crop[2], crop[3]
        bx = x - crop[0]
        if flipped:
            bx = cw - bx - w
        target = [(bx + w / 2) / cw, (y - crop[1] + h / 2) / ch, w / cw, h / ch]
        return {"image": to_tensor(pixels), "ids": ids, "target": target}

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Padded to the longest text (the official tokenizer(padding='longest'))."""
        rows = len(samples)
        length = max(len(s["ids"]) for s in samples)
        text_ids = torch.full((rows, length), PAD_ID, dtype=torch.long)
        for k, sample in enumerate(samples):
            text_ids[k, :len(sample["ids"])] = torch.tensor(sample["ids"])
        batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples]), "text_ids": text_ids,
                                 "text_atts": (text_ids != PAD_ID).long(), "skips": dict(self.skips)}
        if self.task == "retrieval":
            batch["kind"] = "image_text"
            batch["image_ids"] = torch.tensor([s["image_id"] for s in samples], dtype=torch.long)
            return batch
        batch["kind"] = "region"
        batch["image_idx"] = torch.arange(rows)
        batch["patch_mask"] = torch.ones(rows, self.options.grid ** 2)
        batch["target_bbox"] = torch.tensor([s["target"] for s in samples], dtype=torch.float32)
        batch["is_image"] = torch.zeros(rows, dtype=torch.bool)
        return batch
