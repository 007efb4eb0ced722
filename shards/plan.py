"""Epoch plans: which entries each (rank, worker) reads in an epoch of a stream, how many batches everyone yields,
and the sequence of batch kinds, computed identically on every rank from the manifests, the seed and the epoch
(docs/loader.md, "The epoch plan").

A stream walks *entries*: the samples of the shared stream, the (image, caption) pairs of the image-text stream,
the (image, box kind) pairs of the region stream. An entry is a shard sample plus a `group` number that says which
part of the sample it is (a caption index, a box kind), so entries are read with the same byte-range machinery as
samples: a `Piece` is a run of consecutive samples of one shard, all in the same group.
"""
from __future__ import annotations

import bisect
import hashlib
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from shards.dataset import Dataset, ShardIndex
from storage.errors import XvlmError
from shards.loader_config import LoaderConfig
from shards.samples import PHRASE_CAPTION

log = logging.getLogger(__name__)

CHUNK = 64   # samples per interleaved chunk of a slice: one ranged read each, small against a shuffle block

# Tags that keep the random streams of different purposes apart (SeedSequence entropy words).
TAG_SOURCE, TAG_ORDER, TAG_KIND, TAG_BLOCK, TAG_SAMPLE, TAG_ROWS = 1, 2, 3, 4, 5, 6

# The streams. "shared" is the single sample stream of the `shared` mode (ours); its random words carry no salt, so
# its plans and samples are those of the versions before the separate streams existed.
SHARED, IMAGE_TEXT, REGION = "shared", "image_text", "region"
SALT = {SHARED: (), IMAGE_TEXT: (11,), REGION: (12,)}

# Entry groups (Piece.group). Image-text entries: the caption index (>= 0), PHRASE_CAPTION + j (the j-th largest
# distinct region phrase of the image as its caption), or RANDOM_CAPTION (one entry per image, a caption drawn at
# random). Region entries: every box, or only the objects / only the region phrases.
RANDOM_CAPTION = -1
ALL_BOXES, OBJECTS, PHRASES = 0, 1, 2
GROUP_KINDS = {ALL_BOXES: None, OBJECTS: ("object",), PHRASES: ("region",)}


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
    """Samples [start, start + count) of shard `shard` of dataset `dataset`, as entries of group `group`."""
    dataset: int
    shard: int
    start: int
    count: int
    group: int = 0


@dataclass
class EpochPlan:
    epoch: int
    slices: list[list[Piece]]          # per slice id (rank * num_workers + worker), in reading order
    slice_len: int                     # L: entries per slice, equal for all
    total: int                         # entries in the epoch's shuffled order (before cutting)
    dropped: int                       # total - slices * L, left out of this epoch
    kinds: np.ndarray                  # bool per rank-local batch index j: True = region batch
    batches_per_worker: int            # N: every worker of every rank yields exactly N batches
    stream: str = SHARED               # which stream the plan is of (SHARED, IMAGE_TEXT, REGION)

    def __post_init__(self) -> None:
        self._starts = [np.cumsum([0] + [p.count for p in pieces]).tolist() for pieces in self.slices]

    @property
    def salt(self) -> tuple[int, ...]:
        """Extra seed words of this stream's random draws (none for the shared stream)."""
        return SALT[self.stream]

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


# ---------------------------------------------------------------------------------------------- entries

EntryGroups = Callable[[ShardIndex], list[tuple[int, np.ndarray]]]


def entry_groups(stream: str, config: LoaderConfig) -> EntryGroups:
    """For a shard, the (group, eligible-sample mask) pairs that make the entries of `stream`."""
    def shared(shard: ShardIndex) -> list[tuple[int, np.ndarray]]:
        return [(0, np.ones(shard.samples, dtype=bool))]

    def image_text(shard: ShardIndex) -> list[tuple[int, np.ndarray]]:
        if config.image_text_entries == "image":
            return [(RANDOM_CAPTION, shard.num_captions > 0)]
        # one entry per (image, caption): caption round j holds the samples with more than j captions; then the
        # region phrases used as captions (at most phrase_captions per image; a phrase repeated in an image is a
        # counted skip when its entry is read)
        rounds = int(shard.num_captions.max()) if shard.samples else 0
        phrases = min(config.phrase_captions, int(shard.num_regions.max()) if shard.samples else 0)
        return [(j, shard.num_captions > j) for j in range(rounds)] + \
            [(PHRASE_CAPTION + j, shard.num_regions > j) for j in range(phrases)]

    def region(shard: ShardIndex) -> list[tuple[int, np.ndarray]]:
        if config.region_entries == "image":
            return [(ALL_BOXES, (shard.num_objects + shard.num_regions) > 0)]
        return [(OBJECTS, shard.num_objects > 0), (PHRASES, shard.num_regions > 0)]

    return {SHARED: shared, IMAGE_TEXT: image_text, REGION: region}[stream]


def _source_runs(datasets: list[Dataset], groups: EntryGroups) -> dict[str, list[Piece]]:
    """Per source, its runs of consecutive eligible same-source samples of one shard and group (shards are ordered
    by key, so runs are long)."""
    runs: dict[str, list[Piece]] = {}
    for d, dataset in enumerate(datasets):
        for s, shard in enumerate(dataset.shards):
            names = np.asarray(shard.sources)
            for group, eligible in groups(shard):
                # a run ends where the source changes or an ineligible sample lies
                breaks = np.flatnonzero((names[1:] != names[:-1]) | (eligible[1:] != eligible[:-1])) + 1
                cuts = [0] + breaks.tolist() + [shard.samples]
                for begin, end in zip(cuts[:-1], cuts[1:]):
                    if eligible[begin]:
                        runs.setdefault(str(names[begin]), []).append(Piece(d, s, begin, end - begin, group))
    return runs


def source_targets(sizes: dict[str, int], weights: dict[str, float]) -> dict[str, int]:
    """Entries per epoch of each source: its own size without weights, else its weighted share of the total."""
    if not weights:
        return dict(sizes)
    missing = sorted(set(sizes) - set(weights))
    if missing:
        raise XvlmError(f"source_weights has no weight for source(s) {missing} of the datasets (sources: "
                        f"{sorted(sizes)}); give every source a weight (0 leaves it out)")
    absent = sorted(set(weights) - set(sizes))
    if absent:   # a recipe's weights may name sources a smaller build lacks (every present one needs a weight)
        log.info("source_weights names source(s) %s that these datasets do not have here; their weights are not used "
                 "(sources: %s)", absent, sorted(sizes))
    total, weight_sum = sum(sizes.values()), sum(w for name, w in weights.items() if name in sizes)
    if weight_sum <= 0:
        raise XvlmError(f"source_weights gives every source of the datasets ({sorted(sizes)}) weight 0")
    return {name: int(round(total * weights[name] / weight_sum)) for name in sizes}


def _take(runs: list[Piece], n: int) -> list[Piece]:
    """The first n entries of `runs` cycled (a source drawn more often than its size repeats whole runs)."""
    out, i = [], 0
    size = sum(p.count for p in runs)
    while n > 0 and size > 0:
        piece = runs[i % len(runs)]
        take = min(piece.count, n)
        out.append(Piece(piece.dataset, piece.shard, piece.start, take, piece.group))
        n -= take
        i += 1
    return out


class _Cursor:
    """Takes consecutive entries off a list of pieces."""

    def __init__(self, pieces: list[Piece]):
        self.pieces, self.i, self.offset = pieces, 0, 0

    def take(self, n: int) -> list[Piece]:
        out = []
        while n > 0:
            piece = self.pieces[self.i]
            k = min(n, piece.count - self.offset)
            out.append(Piece(piece.dataset, piece.shard, piece.start + self.offset, k, piece.group))
            n -= k
            self.offset += k
            if self.offset == piece.count:
                self.i, self.offset = self.i + 1, 0
        return out


def _chunks(pieces: list[Piece], size: int) -> list[list[Piece]]:
    """Pieces regrouped into chunks of `size` entries (the last shorter)."""
    out, current, room = [], [], size
    for piece in pieces:
        start, count = piece.start, piece.count
        while count > 0:
            k = min(count, room)
            current.append(Piece(piece.dataset, piece.shard, start, k, piece.group))
            start, count, room = start + k, count - k, room - k
            if room == 0:
                out.append(current)
                current, room = [], size
    if current:
        out.append(current)
    return out


@dataclass
class _Slices:
    slices: list[list[Piece]]
    slice_len: int
    total: int


def _build_slices(datasets: list[Dataset], config: LoaderConfig, epoch: int, n_slices: int,
                  stream: str) -> _Slices:
    """The epoch's entries of `stream`, shuffled by source and cut into n_slices equal, equally mixed slices."""
    salt = SALT[stream]
    runs = _source_runs(datasets, entry_groups(stream, config))
    targets = source_targets({name: sum(p.count for p in pieces) for name, pieces in runs.items()},
                             config.source_weights)
    # Every slice gets the same share of every source (stratified), so no worker is left with, say, only
    # caption-less Visual Genome images; within a slice, chunks of the sources are interleaved in seeded order.
    slice_parts: list[list[list[Piece]]] = [[] for _ in range(n_slices)]
    total = 0
    for name in sorted(runs):
        order = rng_for(config.seed, epoch, TAG_SOURCE, name, *salt).permutation(len(runs[name]))
        # shuffled runs (the shard shuffle), then the source's sequence cut into n_slices equal parts
        sequence = _take([runs[name][i] for i in order], targets[name])
        total += sum(p.count for p in sequence)
        share = sum(p.count for p in sequence) // n_slices
        cursor = _Cursor(sequence)
        for k in range(n_slices):
            part = cursor.take(share)
            slice_parts[k].extend(_chunks(part, CHUNK))
    slice_len = sum(p.count for chunk in slice_parts[0] for p in chunk) if slice_parts else 0
    slices: list[list[Piece]] = []
    for k, chunks in enumerate(slice_parts):
        order = rng_for(config.seed, epoch, TAG_ORDER, k, *salt).permutation(len(chunks))
        slices.append([piece for i in order for piece in chunks[i]])
    return _Slices(slices, slice_len, total)


def batch_cost(config: LoaderConfig, region: bool) -> int:
    """Most samples one batch can consume without skips (region batches take region_max_images images at most)."""
    return config.region_max_images if region else config.image_text_batch_size


# ---------------------------------------------------------------------------------------------- batch kinds


def kind_sequence(config: LoaderConfig, epoch: int, length: int) -> np.ndarray:
    """The first `length` batch kinds of the epoch (True = region batch), the same on every rank.

    iter_perc_mode "xvlm" (Pretrain.py): every iteration is one image-text batch, preceded with probability
    iter_perc by one region batch, drawn once per iteration. "per_batch" (ours before): each batch is a region batch
    with probability iter_perc."""
    draws = rng_for(config.seed, epoch, TAG_KIND).random(length) < config.iter_perc
    if config.iter_perc_mode == "per_batch":
        return draws
    out = np.empty(2 * length, dtype=bool)
    n = 0
    for region in draws.tolist():
        if region:
            out[n] = True
            n += 1
        out[n] = False
        n += 1
        if n >= length:
            break
    return out[:length]


def iteration_kinds(config: LoaderConfig, epoch: int, image_text_batches: int) -> np.ndarray:
    """The kinds of an epoch of the separate streams, ending with its `image_text_batches`-th image-text batch."""
    if config.iter_perc_mode == "xvlm":
        draws = rng_for(config.seed, epoch, TAG_KIND).random(image_text_batches) < config.iter_perc
        out = np.zeros(image_text_batches + int(draws.sum()), dtype=bool)
        out[np.flatnonzero(draws) + np.arange(int(draws.sum()))] = True    # a region batch before each drawn one
        return out
    if config.iter_perc >= 1.0:
        raise XvlmError("iteration_kinds: a region-only run has no image-text batches to end its epoch")
    # per_batch: draw kinds until the epoch's image-text batches are used up
    rng = rng_for(config.seed, epoch, TAG_KIND)
    chunks, image_text = [], 0
    while image_text < image_text_batches:
        chunk = rng.random(max(64, 2 * (image_text_batches - image_text))) < config.iter_perc
        chunks.append(chunk)
        image_text += int((~chunk).sum())
    kinds = np.concatenate(chunks)
    end = int(np.flatnonzero(~kinds)[image_text_batches - 1]) + 1
    return kinds[:end]


# ---------------------------------------------------------------------------------------------- plans


def build_plan(datasets: list[Dataset], config: LoaderConfig, epoch: int, world_size: int,
               num_workers: int) -> EpochPlan:
    """The plan of the shared stream (`streams: shared`): every sample once per epoch, serving one batch kind."""
    workers = max(1, num_workers)
    n_slices = world_size * workers
    cut = _build_slices(datasets, config, epoch, n_slices, SHARED)
    if cut.slice_len == 0:
        raise XvlmError(f"the datasets give {cut.total} samples per epoch, too few for world_size x num_workers = "
                        f"{world_size} x {workers} slices (each source needs at least that many samples); use "
                        f"fewer workers or more data")
    # Batch kinds per rank-local batch index j (the same on every rank, so DDP ranks run the same step kind);
    # batch j comes from worker j % workers. N = batches per worker such that no worker needs more than its
    # slice when every batch consumes its most (batch_cost), so counts are equal and known up front.
    it_cost, region_cost = batch_cost(config, False), batch_cost(config, True)
    max_batches = cut.slice_len // min(it_cost, region_cost) + 1
    kinds = kind_sequence(config, epoch, max_batches * workers)
    costs = np.where(kinds, region_cost, it_cost).reshape(max_batches, workers)
    fits = (np.cumsum(costs, axis=0) <= cut.slice_len).all(axis=1)
    batches = int(np.argmin(fits)) if not fits.all() else max_batches
    if batches == 0:
        raise XvlmError(f"each of the {n_slices} (rank, worker) slices holds {cut.slice_len} samples, fewer than "
                        f"one batch ({it_cost} image-text / up to {region_cost} region images); use smaller "
                        f"batches, fewer workers or more data")
    return EpochPlan(epoch=epoch, slices=cut.slices, slice_len=cut.slice_len, total=cut.total,
                     dropped=cut.total - cut.slice_len * n_slices, kinds=kinds[:batches * workers],
                     batches_per_worker=batches)


def build_stream_plan(datasets: list[Dataset], config: LoaderConfig, stream: str, epoch: int, world_size: int,
                      num_workers: int) -> EpochPlan:
    """The plan of one of the separate streams (IMAGE_TEXT or REGION): its entries once per epoch, in batches of
    one kind; every worker of every rank yields the same number of batches."""
    workers = max(1, num_workers)
    n_slices = world_size * workers
    cut = _build_slices(datasets, config, epoch, n_slices, stream)
    region = stream == REGION
    what = "region entries (samples with boxes)" if region else "image-text entries (captions)"
    if cut.total == 0:
        raise XvlmError(f"the datasets hold no {what}; "
                        + ("set schedule.iter_perc to 0 (no region batches) or add data with boxes" if region else
                           "add data with captions (only schedule.iter_perc_mode per_batch with iter_perc 1 trains "
                           "region batches alone)"))
    cost = batch_cost(config, region)
    batches = cut.slice_len // cost
    if batches == 0:
        raise XvlmError(f"each of the {n_slices} (rank, worker) slices of the {stream} stream holds "
                        f"{cut.slice_len} {what}, fewer than one batch ({cost}); use smaller batches, fewer workers "
                        f"or more data")
    return EpochPlan(epoch=epoch, slices=cut.slices, slice_len=cut.slice_len, total=cut.total,
                     dropped=cut.total - cut.slice_len * n_slices, kinds=np.full(batches * workers, region),
                     batches_per_worker=batches, stream=stream)
