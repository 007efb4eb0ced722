"""The epoch plan: which samples each (rank, worker) reads in an epoch and how many batches everyone yields,
computed identically on every rank from the manifests, the seed and the epoch (docs/loader.md, "The epoch plan").
"""
from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass

import numpy as np

from shards.dataset import Dataset
from shards.errors import XvlmError
from shards.loader_config import LoaderConfig

CHUNK = 64   # samples per interleaved chunk of a slice: one ranged read each, small against a shuffle block

# Tags that keep the random streams of different purposes apart (SeedSequence entropy words).
TAG_SOURCE, TAG_ORDER, TAG_KIND, TAG_BLOCK, TAG_SAMPLE = 1, 2, 3, 4, 5


def seed_words(*parts: int | str) -> list[int]:
    """Non-negative 32-bit words for numpy SeedSequence; strings are hashed stably (not Python's hash())."""
    words = []
    for part in parts:
        if isinstance(part, str):
            part = int.from_bytes(hashlib.sha256(part.encode()).digest()[:4], "little")
        words.append(int(part) & 0xFFFFFFFF)
    return words


def rng_for(*parts: int | str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed_words(*parts)))


@dataclass(frozen=True)
class Piece:
    """Samples [start, start + count) of shard `shard` of dataset `dataset`."""
    dataset: int
    shard: int
    start: int
    count: int


@dataclass
class EpochPlan:
    epoch: int
    slices: list[list[Piece]]          # per slice id (rank * num_workers + worker), in reading order
    slice_len: int                     # L: samples per slice, equal for all
    total: int                         # samples in the epoch's shuffled order (before cutting)
    dropped: int                       # total - slices * L, left out of this epoch
    kinds: np.ndarray                  # bool per rank-local batch index j: True = region batch
    batches_per_worker: int            # N: every worker of every rank yields exactly N batches

    def __post_init__(self) -> None:
        self._starts = [np.cumsum([0] + [p.count for p in pieces]).tolist() for pieces in self.slices]

    def locate(self, slice_id: int, begin: int, end: int) -> list[tuple[Piece, int, int, int]]:
        """Slice positions [begin, end) as (piece, first sample in shard, count, first slice position)."""
        starts, pieces = self._starts[slice_id], self.slices[slice_id]
        out = []
        i = bisect.bisect_right(starts, begin) - 1
        pos = begin
        while pos < end:
            piece = pieces[i]
            offset = pos - starts[i]
            n = min(piece.count - offset, end - pos)
            out.append((piece, piece.start + offset, n, pos))
            pos += n
            i += 1
        return out


def _source_runs(datasets: list[Dataset]) -> dict[str, list[Piece]]:
    """Per source, its runs of consecutive same-source samples (shards are ordered by key, so runs are long)."""
    runs: dict[str, list[Piece]] = {}
    for d, dataset in enumerate(datasets):
        for s, shard in enumerate(dataset.shards):
            names = np.asarray(shard.sources)
            cuts = [0] + (np.flatnonzero(names[1:] != names[:-1]) + 1).tolist() + [shard.samples]
            for begin, end in zip(cuts[:-1], cuts[1:]):
                runs.setdefault(str(names[begin]), []).append(Piece(d, s, begin, end - begin))
    return runs


def source_targets(sizes: dict[str, int], weights: dict[str, float]) -> dict[str, int]:
    """Samples per epoch of each source: its own size without weights, else its weighted share of the total."""
    if not weights:
        return dict(sizes)
    missing = sorted(set(sizes) - set(weights))
    if missing:
        raise XvlmError(f"source_weights has no weight for source(s) {missing} of the datasets (sources: "
                        f"{sorted(sizes)}); give every source a weight (0 leaves it out)")
    unknown = sorted(set(weights) - set(sizes))
    if unknown:
        raise XvlmError(f"source_weights names source(s) {unknown} that the datasets do not have "
                        f"(sources: {sorted(sizes)})")
    total, weight_sum = sum(sizes.values()), sum(weights.values())
    return {name: int(round(total * weights[name] / weight_sum)) for name in sizes}


def _take(runs: list[Piece], n: int) -> list[Piece]:
    """The first n samples of `runs` cycled (a source drawn more often than its size repeats whole runs)."""
    out, i = [], 0
    size = sum(p.count for p in runs)
    while n > 0 and size > 0:
        piece = runs[i % len(runs)]
        take = min(piece.count, n)
        out.append(Piece(piece.dataset, piece.shard, piece.start, take))
        n -= take
        i += 1
    return out


class _Cursor:
    """Takes consecutive samples off a list of pieces."""

    def __init__(self, pieces: list[Piece]):
        self.pieces, self.i, self.offset = pieces, 0, 0

    def take(self, n: int) -> list[Piece]:
        out = []
        while n > 0:
            piece = self.pieces[self.i]
            k = min(n, piece.count - self.offset)
            out.append(Piece(piece.dataset, piece.shard, piece.start + self.offset, k))
            n -= k
            self.offset += k
            if self.offset == piece.count:
                self.i, self.offset = self.i + 1, 0
        return out


def _chunks(pieces: list[Piece], size: int) -> list[list[Piece]]:
    """Pieces regrouped into chunks of `size` samples (the last shorter)."""
    out, current, room = [], [], size
    for piece in pieces:
        start, count = piece.start, piece.count
        while count > 0:
            k = min(count, room)
            current.append(Piece(piece.dataset, piece.shard, start, k))
            start, count, room = start + k, count - k, room - k
            if room == 0:
                out.append(current)
                current, room = [], size
    if current:
        out.append(current)
    return out


def batch_cost(config: LoaderConfig, region: bool) -> int:
    """Most samples one batch can consume without skips (region batches stop at region_max_images images)."""
    return config.region_max_images if region else config.image_text_batch_size


def build_plan(datasets: list[Dataset], config: LoaderConfig, epoch: int, world_size: int,
               num_workers: int) -> EpochPlan:
    workers = max(1, num_workers)
    n_slices = world_size * workers
    runs = _source_runs(datasets)
    targets = source_targets({name: sum(p.count for p in pieces) for name, pieces in runs.items()},
                             config.source_weights)
    # Every slice gets the same share of every source (stratified), so no worker is left with, say, only
    # caption-less Visual Genome images; within a slice, chunks of the sources are interleaved in seeded order.
    slice_parts: list[list[list[Piece]]] = [[] for _ in range(n_slices)]
    total = 0
    for name in sorted(runs):
        order = rng_for(config.seed, epoch, TAG_SOURCE, name).permutation(len(runs[name]))
        # shuffled runs (the shard shuffle), then the source's sequence cut into n_slices equal parts
        sequence = _take([runs[name][i] for i in order], targets[name])
        total += sum(p.count for p in sequence)
        share = sum(p.count for p in sequence) // n_slices
        cursor = _Cursor(sequence)
        for k in range(n_slices):
            part = cursor.take(share)
            slice_parts[k].extend(_chunks(part, CHUNK))
    slice_len = sum(p.count for chunk in slice_parts[0] for p in chunk)
    if slice_len == 0:
        raise XvlmError(f"the datasets give {total} samples per epoch, too few for world_size x num_workers = "
                        f"{world_size} x {workers} slices (each source needs at least that many samples); use "
                        f"fewer workers or more data")
    slices: list[list[Piece]] = []
    for k, chunks in enumerate(slice_parts):
        order = rng_for(config.seed, epoch, TAG_ORDER, k).permutation(len(chunks))
        slices.append([piece for i in order for piece in chunks[i]])
    # Batch kinds per rank-local batch index j (the same on every rank, so DDP ranks run the same step kind);
    # batch j comes from worker j % workers. N = batches per worker such that no worker needs more than its
    # slice when every batch consumes its most (batch_cost), so counts are equal and known up front.
    it_cost, region_cost = batch_cost(config, False), batch_cost(config, True)
    max_batches = slice_len // min(it_cost, region_cost) + 1
    kinds = rng_for(config.seed, epoch, TAG_KIND).random(max_batches * workers) < config.iter_perc
    costs = np.where(kinds, region_cost, it_cost).reshape(max_batches, workers)
    fits = (np.cumsum(costs, axis=0) <= slice_len).all(axis=1)
    batches = int(np.argmin(fits)) if not fits.all() else max_batches
    if batches == 0:
        raise XvlmError(f"each of the {n_slices} (rank, worker) slices holds {slice_len} samples, fewer than one "
                        f"batch ({it_cost} image-text / up to {region_cost} region images); use smaller batches, "
                        f"fewer workers or more data")
    return EpochPlan(epoch=epoch, slices=slices, slice_len=slice_len, total=total,
                     dropped=total - slice_len * n_slices, kinds=kinds[:batches * workers],
                     batches_per_worker=batches)
