"""Reading one slice of an epoch plan: its entries in block-shuffled order, streamed from the shards (tar byte
ranges on disk or S3, the next block read ahead in a thread on S3), with the per-sample random generator that makes
every augmentation a function of (seed, epoch, position) only (docs/loader.md, "Reading a slice").
"""
from __future__ import annotations

import io
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterator

import numpy as np

import storage
from shards.dataset import Dataset
from storage.errors import XvlmError
from shards.loader_config import LoaderConfig
from shards.plan import TAG_BLOCK, TAG_SAMPLE, EpochPlan, rng_for
from shards.tar_stream import RawSample, Skipped, iter_range

log = logging.getLogger(__name__)


def sample_rng(seed: int, epoch: int, position: int, salt: tuple[int, ...] = ()) -> np.random.Generator:
    """The generator of one sample: a function of (seed, epoch, global entry position, the stream's salt) only."""
    return rng_for(seed, epoch, TAG_SAMPLE, position & 0xFFFFFFFF, position >> 32, *salt)


# Where an entry's sample lies and which part of it the entry is: (dataset, shard, entry group).
Ref = tuple[int, int, int]

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
            config.read_ahead == "auto" and any(storage.local_path(d.path) is None for d in datasets))

    def global_position(self, pass_: int, position: int) -> int:
        return pass_ * self.plan.total + self.slice_id * self.plan.slice_len + position

    def iter_from(self, slot: int) -> Iterator[tuple[int, int, RawSample | Skipped, Ref]]:
        """(slot, global position, raw sample or skip, (dataset, shard, group)) for slots slot, slot+1, ...

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
                                       begin // self.block, *self.plan.salt).permutation(end - begin)
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

    def _read(self, begin: int, end: int, needed: set[int]) -> dict[int, tuple[RawSample | Skipped, Ref]]:
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

    def _parse(self, fetched: list[Fetched]) -> dict[int, tuple[RawSample | Skipped, Ref]]:
        """The raw samples of `_fetch`'s ranges, parsed from memory (or read now where there are no bytes)."""
        out = {}
        for piece, first, count, position, want, low, data in fetched:
            shard = self.datasets[piece.dataset].shards[piece.shard]
            opener = None if data is None else _memory_opener(data, low)
            for item in iter_range(shard, first, count, needed=want, open_read=opener):
                out[position + item.index - first] = (item, (piece.dataset, piece.shard, piece.group))
        return out


def _memory_opener(data: bytes, low: int) -> Callable[..., io.BytesIO]:
    """An `open_read` for iter_range over bytes already read: shard bytes [low, low + len(data))."""
    def open_read(path: str, start: int = 0, end: int | None = None) -> io.BytesIO:
        stop = len(data) if end is None else end - low
        if start < low or stop > len(data):
            raise XvlmError(f"{path}: bytes {start}-{end} lie outside the {low}-{low + len(data)} read ahead")
        return io.BytesIO(data[start - low:stop])   # the whole range: no copy (a full slice of bytes is itself)
    return open_read


