"""MultiGrainedLoader: image-text and region batches streamed from built shards, split by rank and worker, with
exact mid-epoch resume (design in docs/loader.md).
"""
from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards import collate, samples, storage, text
from shards.dataset import Dataset, open_datasets
from shards.errors import XvlmError
from shards.loader_config import LoaderConfig
from shards.plan import TAG_BLOCK, TAG_SAMPLE, EpochPlan, build_plan, rng_for
from shards.tar_stream import RawSample, Skipped, iter_range

log = logging.getLogger(__name__)

STATE_VERSION = 1
LOG_EVERY_S = 30.0        # skip counters are logged at most this often (plus the first skip at once)


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The generator of one sample: a function of (seed, epoch, global sample position) only."""
    return rng_for(seed, epoch, TAG_SAMPLE, position & 0xFFFFFFFF, position >> 32)


# ------------------------------------------------------------------------------------------ slot stream

# One shard range read ahead: (piece, first sample, count, first slice position, needed samples, first byte, bytes
# or None when it could not be read whole).
Fetched = tuple[Any, int, int, int, set[int], int, "bytes | None"]


class ReadAhead:
    """One daemon thread that runs submitted reads in order, one at a time (so at most one block is read ahead),
    for the reader's whole life; a daemon, so a read still in flight never holds up the process's exit."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="xvlm-read-ahead", daemon=True)
            self._thread.start()
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 - handed to the reader, which re-raises it in its thread
                future.set_exception(err)

    def close(self) -> None:
        """Stops the thread after the read in flight, if any (its result is dropped)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None


class SlotReader:
    """The samples of one slice in block-shuffled order, from slot `start` on. Slot s lies in pass s // L of the
    slice (a worker that skipped many samples wraps into a second pass rather than yield fewer batches); each
    block of `shuffle_buffer` consecutive slice positions is read once, then emitted in a seeded permutation.

    A worker's position is (batches done, next slot, skip counters, deferred samples); every batch carries it
    back to the main process, so state_dict() describes exactly the batches the trainer got, and a restore re-reads
    only the unconsumed samples of the current shuffle block: nothing already consumed is decoded."""

    def __init__(self, datasets: list[Dataset], plan: EpochPlan, slice_id: int, config: LoaderConfig):
        self.datasets, self.plan, self.slice_id, self.config = datasets, plan, slice_id, config
        self.block = max(1, config.shuffle_buffer)
        # "auto": only where a read waits on the network. On local disk the reads are quick and the thread would
        # only compete with the decoding for the GIL (measured: 5-25% fewer samples/s on one core).
        self.read_ahead = config.read_ahead is True or (
            config.read_ahead == "auto" and any(storage.is_s3(d.path) for d in datasets))

    def global_position(self, pass_: int, position: int) -> int:
        return pass_ * self.plan.total + self.slice_id * self.plan.slice_len + position

    def iter_from(self, slot: int) -> Iterator[tuple[int, int, RawSample | Skipped, tuple[int, int]]]:
        """(slot, global position, raw sample or skip, (dataset, shard) numbers) for slots slot, slot+1, ...

        With read-ahead (by default for datasets on S3), the next block's bytes are read in a background thread
        while this block's samples are decoded: the wait for each GET (the time to first byte, tens of milliseconds
        on a remote object store) overlaps the work instead of stalling it. The thread only moves bytes (one ranged
        read per shard piece); the tar members are parsed here, when the block is reached, so the thread holds the
        GIL as little as possible. What is read, and in which order it is yielded, do not change; it costs one more
        block of raw sample bytes in memory."""
        length = self.plan.slice_len
        ahead = ReadAhead() if self.read_ahead else None
        pending: Future | None = None   # the read of the next block: the one the slots reach next
        try:
            while True:
                pass_, q = divmod(slot, length)
                begin = (q // self.block) * self.block
                end = min(length, begin + self.block)
                perm = begin + rng_for(self.config.seed, self.plan.epoch, TAG_BLOCK, self.slice_id, pass_,
                                       begin // self.block).permutation(end - begin)
                if pending is not None:
                    items = self._parse(pending.result())
                else:
                    items = self._read(begin, end, set(perm[q - begin:].tolist()))
                pending = None
                if ahead is not None and end < length:
                    # The whole next block of this pass (a block after the first is always read whole). Not past the
                    # slice's end: a second pass is rare (many skipped samples), and at the epoch's end it would be
                    # a wasted read.
                    next_end = min(length, end + self.block)
                    pending = ahead.submit(self._fetch, end, next_end, set(range(end, next_end)))
                for k in range(q - begin, end - begin):
                    position = int(perm[k])
                    item, ref = items.pop(position)
                    yield slot, self.global_position(pass_, position), item, ref
                    slot += 1
        finally:
            if pending is not None:
                pending.cancel()
            if ahead is not None:
                ahead.close()

    def _read(self, begin: int, end: int, needed: set[int]) -> dict[int, tuple[RawSample | Skipped, tuple[int, int]]]:
        """Raw samples at the needed slice positions in [begin, end), read in tar order."""
        return self._parse([(*part, 0, None) for part in self._parts(begin, end, needed)])

    def _parts(self, begin: int, end: int, needed: set[int]) -> Iterator[tuple[Any, int, int, int, set[int]]]:
        """(piece, first sample in shard, count, first slice position, needed sample numbers) for each shard piece
        of [begin, end) that holds a needed position."""
        for piece, first, count, position in self.plan.locate(self.slice_id, begin, end):
            want = {first + p - position for p in needed if position <= p < position + count}
            if want:
                yield piece, first, count, position, want

    def _fetch(self, begin: int, end: int, needed: set[int]) -> list[Fetched]:
        """In the read-ahead thread: the bytes of each shard range that the needed positions of [begin, end) lie in,
        one ranged read each (S3: one GET, retried and resumed at the byte by the storage layer). A range that
        cannot be read whole (a missing or truncated shard, storage that kept failing) comes back as None: `_parse`
        then reads it the ordinary way, which skips and counts the damage exactly as without read-ahead."""
        out = []
        for piece, first, count, position, want in self._parts(begin, end, needed):
            shard = self.datasets[piece.dataset].shards[piece.shard]
            low, high = int(shard.offsets[min(want)]), shard.end_offset(max(want))
            data: bytes | None = None
            try:
                with storage.open_read(shard.path, start=low, end=high) as f:
                    data = f.read(high - low)
                if len(data) != high - low:
                    data = None
            except Exception as err:  # noqa: BLE001 - read again in the reader's thread, where damage is counted
                log.debug("read-ahead of %s bytes %d-%d failed (%s); reading it when it is reached",
                          shard.path, low, high, err)
                data = None
            out.append((piece, first, count, position, want, low, data))
        return out

    def _parse(self, fetched: list[Fetched]) -> dict[int, tuple[RawSample | Skipped, tuple[int, int]]]:
        """The raw samples of `_fetch`'s ranges, parsed from memory (or read now where there are no bytes)."""
        out = {}
        for piece, first, count, position, want, low, data in fetched:
            shard = self.datasets[piece.dataset].shards[piece.shard]
            opener = None if data is None else _memory_opener(data, low)
            for item in iter_range(shard, first, count, needed=want, open_read=opener):
                out[position + item.index - first] = (item, (piece.dataset, piece.shard))
        return out


def _memory_opener(data: bytes, low: int) -> Callable[..., io.BytesIO]:
    """An `open_read` for iter_range over bytes already read: shard bytes [low, low + len(data))."""
    def open_read(path: str, start: int = 0, end: int | None = None) -> io.BytesIO:
        stop = len(data) if end is None else end - low
        if start < low or stop > len(data):
            raise XvlmError(f"{path}: bytes {start}-{end} lie outside the {low}-{low + len(data)} read ahead")
        return io.BytesIO(data[start - low:stop])   # the whole range: no copy (a full slice of bytes is itself)
    return open_read


# ------------------------------------------------------------------------------------------ batches


def worker_batches(datasets: list[Dataset], config: LoaderConfig, plan: EpochPlan, rank: int, worker: int,
                   workers: int, state: dict) -> Iterator[dict[str, Any]]:
    """The batches of one logical worker from `state` to the end of the epoch; each carries the worker's state
    after it under "_worker_state"."""
    slice_id = rank * workers + worker
    reader = SlotReader(datasets, plan, slice_id, config)
    batch_index, slot = int(state["batch"]), int(state["slot"])
    skips = Counter(state.get("skips", {}))
    wrapped = int(state.get("wrapped", 0))
    # Samples fit only for the other batch kind (a VG image without caption met by an image-text batch) wait
    # for it here instead of being wasted; the state keeps their references, a resume re-reads them by index.
    deferred: dict[bool, deque] = {True: deque(), False: deque()}
    for kind, entries in state.get("deferred", {}).items():
        for position, d, s, index in entries:
            item = next(iter_range(datasets[d].shards[s], index, 1))
            if isinstance(item, Skipped):   # damaged since it was first read: counted like any damage
                skips[item.reason] += 1
                continue
            deferred[kind == "region"].append((position, item, (d, s)))
    limit = {True: 2 * config.region_max_images, False: 2 * config.image_text_batch_size}
    stream = reader.iter_from(slot)
    for i in range(batch_index, plan.batches_per_worker):
        region = bool(plan.kinds[i * workers + worker])
        built: list[dict[str, Any]] = []
        rows = 0
        barren = 0   # slots read since this batch last got a sample: a whole pass without one cannot end
        while True:
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
            if not region:
                built.append(sample)
                if len(built) == config.image_text_batch_size:
                    break
                continue
            take = min(collate.region_rows(sample), config.region_batch_size - rows)
            if take < collate.region_rows(sample):
                sample = collate.take_rows(sample, 0, take)
            built.append(sample)
            rows += take
            if rows == config.region_batch_size or len(built) == config.region_max_images:
                break
        batch = collate.collate_region(built) if region else collate.collate_image_text(built)
        waiting = {("region" if kind else "image_text"): [[position, ref[0], ref[1], item.index]
                                                           for position, item, ref in queue]
                   for kind, queue in deferred.items() if queue}
        batch["_worker_state"] = (worker, {"batch": i + 1, "slot": slot, "skips": dict(skips), "wrapped": wrapped,
                                           "deferred": waiting})
        yield batch


class _EpochBatches(IterableDataset):
    """What the DataLoader iterates: DataLoader worker k serves logical worker (k + rotation) % workers, so that a
    resumed epoch continues the round-robin at the worker whose turn it is."""

    def __init__(self, datasets: list[Dataset], config: LoaderConfig, plan: EpochPlan, rank: int, workers: int,
                 states: list[dict], rotation: int):
        self.datasets, self.config, self.plan, self.rank = datasets, config, plan, rank
        self.workers, self.states, self.rotation = workers, states, rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None:
            torch.set_num_threads(1)  # one core per worker; the workers are the parallelism
        worker = ((info.id if info is not None else 0) + self.rotation) % self.workers
        return worker_batches(self.datasets, self.config, self.plan, self.rank, worker, self.workers,
                              self.states[worker])


# ------------------------------------------------------------------------------------------ the loader


def _fresh_state() -> dict:
    return {"batch": 0, "slot": 0, "skips": {}, "wrapped": 0, "deferred": {}}


class MultiGrainedLoader:
    """`for batch in loader:` yields one epoch of batches (dicts per docs/batches.md, plus batch["skips"]: skip
    counters of this rank's epoch so far, summed over workers); the next `for` runs the next epoch.

    Every rank yields exactly `len(loader)` batches per epoch, and batch j has the same kind on every rank.
    `state_dict()` / `load_state_dict()` resume mid-epoch exactly (same world size and num_workers)."""

    def __init__(self, datasets: Sequence[str | Dataset], config: LoaderConfig, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise XvlmError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")
        self.datasets = [d if isinstance(d, Dataset) else None for d in datasets]
        paths = [d for d in datasets if not isinstance(d, Dataset)]
        opened = iter(open_datasets(paths)) if paths else iter(())
        self.datasets = [d if d is not None else next(opened) for d in self.datasets]
        if not self.datasets:
            raise XvlmError("MultiGrainedLoader needs at least one dataset")
        text.load_vocab(config.tokenizer)  # a missing tokenizer fails here, not in a worker mid-epoch
        self.config, self.rank, self.world_size = config, rank, world_size
        self.workers = max(1, config.num_workers)
        self.epoch = 0
        self._states = [_fresh_state() for _ in range(self.workers)]
        self._done = 0                   # batches of the current epoch handed out
        self._plans: dict[int, EpochPlan] = {}
        self._last_log = 0.0
        self._logged_skips = 0

    # -- plan and sizes

    def plan(self, epoch: int | None = None) -> EpochPlan:
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._plans:
            self._plans = {epoch: build_plan(self.datasets, self.config, epoch, self.world_size, self.workers)}
        return self._plans[epoch]

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.plan().batches_per_worker * self.workers

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning at the next iteration."""
        self.epoch, self._done = int(epoch), 0
        self._states = [_fresh_state() for _ in range(self.workers)]

    # -- iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._done >= len(self):       # the previous epoch was consumed to its last batch
            self.set_epoch(self.epoch + 1)
        plan = self.plan()
        dataset = _EpochBatches(self.datasets, self.config, plan, self.rank, self.workers,
                                [dict(s) for s in self._states], rotation=self._done % self.workers)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.config.num_workers,
                            persistent_workers=False)
        for batch in loader:
            worker, state = batch.pop("_worker_state")
            self._states[worker] = state
            self._done += 1
            batch["skips"] = self.skips()
            self._log_skips(batch["skips"])
            yield batch
        # The finished epoch's counters stay readable (stats(), state_dict()) until the next iteration starts.

    def skips(self) -> dict[str, int]:
        """Skipped samples by reason in this rank's current epoch, summed over workers."""
        total: Counter = Counter()
        for state in self._states:
            total.update(state["skips"])
        return dict(sorted(total.items()))

    def stats(self) -> dict[str, Any]:
        plan = self.plan()
        return {"epoch": self.epoch, "batches_done": self._done, "batches_per_epoch": len(self),
                "skips": self.skips(), "wrapped_samples": sum(s["wrapped"] for s in self._states),
                "samples_per_worker": plan.slice_len, "dropped_per_epoch": plan.dropped}

    def _log_skips(self, skips: dict[str, int]) -> None:
        n = sum(skips.values())
        now = time.monotonic()
        if n > self._logged_skips and (self._logged_skips == 0 or now - self._last_log >= LOG_EVERY_S):
            log.warning("rank %d epoch %d: %d samples skipped so far (%s)", self.rank, self.epoch, n,
                        ", ".join(f"{k}={v}" for k, v in skips.items()))
            self._last_log, self._logged_skips = now, n

    # -- resume

    def _fingerprints(self) -> list[str]:
        return [d.fingerprint for d in self.datasets]

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out: plain ints, strings and dicts (JSON-able)."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "batches_done": self._done,
                "world_size": self.world_size, "rank": self.rank, "num_workers": self.workers,
                "seed": self.config.seed, "datasets": self._fingerprints(),
                "workers": [dict(s) for s in self._states]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise XvlmError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        if state["world_size"] != self.world_size:
            raise XvlmError(
                f"the loader state was saved with world_size {state['world_size']}, this run has "
                f"{self.world_size}: exact resume needs the same world size (each rank's slice of the epoch "
                f"depends on it). Resume with {state['world_size']} ranks, or call set_epoch(epoch + 1) to start "
                f"the next epoch fresh with the new world size.")
        if state["num_workers"] != self.workers:
            raise XvlmError(f"the loader state was saved with {state['num_workers']} worker slice(s) per rank, this "
                            f"loader has {self.workers}: resume with num_workers={state['num_workers']}")
        if state["seed"] != self.config.seed:
            raise XvlmError(f"the loader state was saved with seed {state['seed']}, the config has "
                            f"{self.config.seed}")
        if state["datasets"] != self._fingerprints():
            raise XvlmError("the loader state was saved for other datasets (shard lists or contents differ); "
                            "resume with the same datasets in the same order")
        if state["rank"] != self.rank:
            raise XvlmError(f"the loader state belongs to rank {state['rank']}, this loader is rank {self.rank}: "
                            f"every rank saves and restores its own loader state")
        self.epoch = int(state["epoch"])
        self._done = int(state["batches_done"])
        self._states = [dict(s) for s in state["workers"]]
