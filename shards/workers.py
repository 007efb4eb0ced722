"""The batches of one logical loader worker: it reads its slice of an epoch plan (shards/slots.py), builds the
samples (shards/samples.py) and collates them (shards/collate.py). Each batch carries the worker's position after
it, so the main process always knows exactly what the trainer has consumed (docs/loader.md, "Exact resume").

`stream_batches` serves one of X-VLM's two separate streams (image-text entries, or region entries); `shared_batches`
serves our shared stream, where each sample serves one batch kind per epoch and waits for the other kind when it
does not fit the one at hand.
"""
from __future__ import annotations

from collections import Counter, deque
from typing import Any, Iterator

from shards import collate, samples
from shards.dataset import Dataset
from storage.errors import XvlmError
from shards.loader_config import LoaderConfig
from shards.plan import GROUP_KINDS, RANDOM_CAPTION, REGION, TAG_ROWS, EpochPlan, rng_for
from shards.slots import SlotReader, sample_rng
from shards.tar_stream import Skipped, iter_range


def _region_batch(built: list[dict[str, Any]], config: LoaderConfig, plan: EpochPlan, slice_id: int,
                  index: int) -> dict[str, Any]:
    """A region batch of the built samples: X-VLM's pooled rows, or the packed samples as they are."""
    if config.region_batching == "pooled":
        rng = rng_for(config.seed, plan.epoch, TAG_ROWS, slice_id, index, *plan.salt)
        return collate.collate_region_pooled(built, config.region_batch_size, rng)
    return collate.collate_region(built)


def _add_packed(built: list[dict[str, Any]], sample: dict[str, Any], rows: int, config: LoaderConfig) -> tuple[int, bool]:
    """Packed region batches (ours): the sample's rows, cut to what still fits region_batch_size. Returns the rows
    now in the batch and whether it is full."""
    take = min(collate.region_rows(sample), config.region_batch_size - rows)
    if take < collate.region_rows(sample):
        sample = collate.take_rows(sample, 0, take)
    built.append(sample)
    rows += take
    return rows, rows == config.region_batch_size or len(built) == config.region_max_images


def stream_batches(datasets: list[Dataset], config: LoaderConfig, plan: EpochPlan, rank: int, worker: int,
                   workers: int, state: dict) -> Iterator[dict[str, Any]]:
    """The batches of one logical worker of a separate stream (plan.stream: image-text or region entries) from
    `state` to the end of the stream's epoch; each carries the worker's state after it under "_worker_state".

    Image-text batches: image_text_batch_size entries, each one (image, caption) pair (or an image with a caption
    drawn). Region batches: region_max_images entries, each an image with the boxes of its entry's kind, their
    rows pooled (X-VLM) or packed (ours)."""
    slice_id = rank * workers + worker
    region = plan.stream == REGION
    reader = SlotReader(datasets, plan, slice_id, config)
    batch_index, slot = int(state["batch"]), int(state["slot"])
    skips = Counter(state.get("skips", {}))
    wrapped = int(state.get("wrapped", 0))
    pooled = config.region_batching == "pooled"
    size = config.region_max_images if region else config.image_text_batch_size
    stream = reader.iter_from(slot)
    for i in range(batch_index, plan.batches_per_worker):
        built: list[dict[str, Any]] = []
        rows, full = 0, False
        barren = 0   # slots read since this batch last got a sample: a whole pass without one cannot end
        while not full:
            if barren > plan.slice_len:
                raise XvlmError(f"rank {rank} worker {worker} read its whole slice of the {plan.stream} stream "
                                f"({plan.slice_len} entries) without one usable sample (skips so far: "
                                f"{dict(skips)}); check the data with `xvlm verify`")
            slot, position, item, ref = next(stream)
            slot += 1
            barren += 1
            if slot > plan.slice_len:
                wrapped += 1
            if isinstance(item, Skipped):
                skips[item.reason] += 1
                continue
            rng = sample_rng(config.seed, plan.epoch, position, plan.salt)
            group = ref[2]
            try:
                if region:
                    sample = samples.region_sample(item.files["jpg"], item.files["json"], rng, config,
                                                   normalise=False, kinds=GROUP_KINDS[group])
                else:
                    sample = samples.image_text_sample(item.files["jpg"], item.files["json"], rng, config,
                                                       normalise=False,
                                                       caption_index=None if group == RANDOM_CAPTION else group)
            except samples.SkipSample as err:
                skips[err.reason] += 1
                continue
            barren = 0
            if region and not pooled:
                rows, full = _add_packed(built, sample, rows, config)
            else:
                built.append(sample)
                full = len(built) == size
        if region:
            batch = _region_batch(built, config, plan, slice_id, i)
        else:
            batch = collate.collate_image_text(built)
        batch["_worker_state"] = (worker, {"batch": i + 1, "slot": slot, "skips": dict(skips), "wrapped": wrapped})
        yield batch


def shared_batches(datasets: list[Dataset], config: LoaderConfig, plan: EpochPlan, rank: int, worker: int,
                   workers: int, state: dict) -> Iterator[dict[str, Any]]:
    """The batches of one logical worker of the shared stream (`streams: shared`, ours) from `state` to the end of
    the epoch; each carries the worker's state after it under "_worker_state"."""
    slice_id = rank * workers + worker
    reader = SlotReader(datasets, plan, slice_id, config)
    batch_index, slot = int(state["batch"]), int(state["slot"])
    skips = Counter(state.get("skips", {}))
    wrapped = int(state.get("wrapped", 0))
    pooled = config.region_batching == "pooled"
    # Samples fit only for the other batch kind (a VG image without caption met by an image-text batch) wait
    # for it here instead of being wasted; the state keeps their references, a resume re-reads them by index.
    deferred: dict[bool, deque] = {True: deque(), False: deque()}
    for kind, entries in state.get("deferred", {}).items():
        for position, d, s, index in entries:
            item = next(iter_range(datasets[d].shards[s], index, 1))
            if isinstance(item, Skipped):   # damaged since it was first read: counted like any damage
                skips[item.reason] += 1
                continue
            deferred[kind == "region"].append((position, item, (d, s, 0)))
    limit = {True: 2 * config.region_max_images, False: 2 * config.image_text_batch_size}
    stream = reader.iter_from(slot)
    for i in range(batch_index, plan.batches_per_worker):
        region = bool(plan.kinds[i * workers + worker])
        built: list[dict[str, Any]] = []
        rows, full = 0, False
        barren = 0   # slots read since this batch last got a sample: a whole pass without one cannot end
        while not full:
            if barren > plan.slice_len:
                kind = "region" if region else "image-text"
                raise XvlmError(f"rank {rank} worker {worker} read its whole slice ({plan.slice_len} samples) "
                                f"without one usable for a {kind} batch (skips so far: {dict(skips)}); the data "
                                f"has no {'boxes' if region else 'captions'} there: set iter_perc to "
                                f"{0 if region else 1} or add such data")
            if deferred[region]:
                position, item, ref = deferred[region].popleft()
            else:
                slot, position, item, ref = next(stream)
                slot += 1
                barren += 1
                if slot > plan.slice_len:
                    wrapped += 1
                if isinstance(item, Skipped):
                    skips[item.reason] += 1
                    continue
                # The index says what a sample has: no decoding to find it unfit for this batch kind.
                shard = datasets[ref[0]].shards[ref[1]]
                fits = shard.has_region if region else shard.has_caption
                if not fits[item.index]:
                    other = shard.has_caption if region else shard.has_region
                    if other[item.index] and len(deferred[not region]) < limit[not region]:
                        deferred[not region].append((position, item, ref))
                    else:
                        skips["no_region" if region else "no_caption"] += 1
                    continue
            rng = sample_rng(config.seed, plan.epoch, position)
            build = samples.region_sample if region else samples.image_text_sample
            try:
                sample = build(item.files["jpg"], item.files["json"], rng, config, normalise=False)
            except samples.SkipSample as err:
                skips[err.reason] += 1
                continue
            barren = 0
            if region and not pooled:
                rows, full = _add_packed(built, sample, rows, config)
            else:
                built.append(sample)
                full = len(built) == (config.region_max_images if region else config.image_text_batch_size)
        if region:
            batch = _region_batch(built, config, plan, slice_id, i)
        else:
            batch = collate.collate_image_text(built)
        waiting = {("region" if kind else "image_text"): [[position, ref[0], ref[1], item.index]
                                                           for position, item, ref in queue]
                   for kind, queue in deferred.items() if queue}
        batch["_worker_state"] = (worker, {"batch": i + 1, "slot": slot, "skips": dict(skips), "wrapped": wrapped,
                                           "deferred": waiting})
        yield batch
