"""MultiGrainedLoader: image-text and region batches streamed from built shards, split by rank and worker, with
exact mid-epoch resume (design in docs/loader.md).

By default (`streams: separate`, X-VLM's Pretrain.py) two independent streams feed it: the image-text stream walks
the (image, caption) pairs and defines the epochs; the region stream walks the images with boxes and restarts on
its own when exhausted. The batch kinds come from the plan (shards/plan.py): with X-VLM's `iter_perc_mode: xvlm`
every iteration is one image-text batch, preceded with probability iter_perc by one region batch. `streams: shared`
(ours) is one pass over the images per epoch, each image serving one batch kind.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards import text
from shards.dataset import Dataset, open_datasets
from storage.errors import XvlmError
from shards.loader_config import LoaderConfig
from shards.plan import IMAGE_TEXT, REGION, SHARED, EpochPlan, build_plan, build_stream_plan, iteration_kinds
from shards.slots import ReadAhead, SlotReader, sample_rng  # noqa: F401 - re-exported (tools, tests)
from shards.workers import shared_batches, stream_batches

log = logging.getLogger(__name__)

STATE_VERSION = 1             # the shared stream's state (unchanged since it was the only one)
STREAMS_STATE_VERSION = 2     # the separate streams' state
LOG_EVERY_S = 30.0            # skip counters are logged at most this often (plus the first skip at once)

WorkerFn = Callable[..., Iterator[dict[str, Any]]]


class _EpochBatches(IterableDataset):
    """What the DataLoader iterates: DataLoader worker k serves logical worker (k + rotation) % workers, so that a
    resumed epoch continues the round-robin at the worker whose turn it is."""

    def __init__(self, datasets: list[Dataset], config: LoaderConfig, plan: EpochPlan, rank: int, workers: int,
                 states: list[dict], rotation: int, produce: WorkerFn):
        self.datasets, self.config, self.plan, self.rank = datasets, config, plan, rank
        self.workers, self.states, self.rotation, self.produce = workers, states, rotation, produce

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None:
            torch.set_num_threads(1)  # one core per worker; the workers are the parallelism
        worker = ((info.id if info is not None else 0) + self.rotation) % self.workers
        return self.produce(self.datasets, self.config, self.plan, self.rank, worker, self.workers,
                            self.states[worker])


def _fresh_state() -> dict:
    return {"batch": 0, "slot": 0, "skips": {}, "wrapped": 0, "deferred": {}}


class _Stream:
    """One stream of batches with its own epochs: its plan per epoch, the position of each of its workers, and a
    DataLoader (`num_workers` processes, or this process with 0) that continues from there."""

    def __init__(self, name: str, datasets: list[Dataset], config: LoaderConfig, rank: int, world_size: int,
                 num_workers: int):
        self.name, self.datasets, self.config = name, datasets, config
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.workers = max(1, num_workers)
        self.epoch = 0
        self.done = 0                   # batches of the current epoch handed out
        self.states = [_fresh_state() for _ in range(self.workers)]
        self._plans: dict[int, EpochPlan] = {}

    def plan(self, epoch: int | None = None) -> EpochPlan:
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._plans:
            if self.name == SHARED:
                plan = build_plan(self.datasets, self.config, epoch, self.world_size, self.workers)
            else:
                plan = build_stream_plan(self.datasets, self.config, self.name, epoch, self.world_size, self.workers)
            self._plans = {epoch: plan}
        return self._plans[epoch]

    def __len__(self) -> int:
        """Batches per epoch of this stream on this rank (the same on every rank)."""
        return self.plan().batches_per_worker * self.workers

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.done = int(epoch), 0
        self.states = [_fresh_state() for _ in range(self.workers)]

    def batches(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch's batches, each recorded in the position as it is handed out."""
        produce = shared_batches if self.name == SHARED else stream_batches
        dataset = _EpochBatches(self.datasets, self.config, self.plan(), self.rank, self.workers,
                                [dict(s) for s in self.states], rotation=self.done % self.workers, produce=produce)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False)
        for batch in loader:
            worker, state = batch.pop("_worker_state")
            self.states[worker] = state
            self.done += 1
            yield batch

    def skips(self) -> Counter:
        total: Counter = Counter()
        for state in self.states:
            total.update(state["skips"])
        return total

    def stats(self) -> dict[str, Any]:
        plan = self.plan()
        return {"epoch": self.epoch, "batches_done": self.done, "batches_per_epoch": len(self),
                "skips": dict(sorted(self.skips().items())), "wrapped_samples": sum(s["wrapped"] for s in self.states),
                "samples_per_worker": plan.slice_len, "dropped_per_epoch": plan.dropped}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.done, "num_workers": self.workers,
                "workers": [dict(s) for s in self.states]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_workers"] != self.workers:
            raise XvlmError(f"the loader state was saved with {state['num_workers']} worker slice(s) per rank for "
                            f"the {self.name} stream, this loader has {self.workers}: resume with the same "
                            f"{'region_num_workers' if self.name == REGION else 'num_workers'}")
        self.epoch = int(state["epoch"])
        self.done = int(state["batches_done"])
        self.states = [dict(s) for s in state["workers"]]


class MultiGrainedLoader:
    """`for batch in loader:` yields one epoch of batches (dicts per docs/batches.md, plus batch["skips"]: skip
    counters of this rank's current epoch(s) so far, summed over workers and streams); the next `for` runs the next
    epoch. With separate streams an epoch is one pass of the image-text stream, with the region batches the plan
    puts between its batches (the region stream keeps its own epochs).

    Every rank yields exactly `len(loader)` batches per epoch, and batch j has the same kind on every rank.
    `state_dict()` / `load_state_dict()` resume mid-epoch exactly (same world size and worker counts)."""

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
        self.separate = config.streams == "separate"
        self.workers = max(1, config.num_workers)
        self.region_only = config.iter_perc_mode == "per_batch" and config.iter_perc >= 1.0
        streams: dict[str, _Stream] = {}
        if not self.separate:
            streams[SHARED] = _Stream(SHARED, self.datasets, config, rank, world_size, config.num_workers)
        else:
            if not self.region_only:
                streams[IMAGE_TEXT] = _Stream(IMAGE_TEXT, self.datasets, config, rank, world_size, config.num_workers)
            if config.iter_perc > 0:
                streams[REGION] = _Stream(REGION, self.datasets, config, rank, world_size, config.region_workers)
        self._streams = streams
        self.epoch = 0
        self._done = 0                   # batches of the current epoch handed out (the separate streams)
        self._kinds: dict[int, np.ndarray] = {}
        self._last_log = 0.0
        self._logged_skips = 0

    # -- plan and sizes

    @property
    def _driver(self) -> _Stream:
        """The stream whose epochs are the loader's: the shared one, else the image-text one (region-only: region)."""
        if not self.separate:
            return self._streams[SHARED]
        return self._streams[REGION] if self.region_only else self._streams[IMAGE_TEXT]

    def plan(self, epoch: int | None = None, stream: str | None = None) -> EpochPlan:
        """The epoch plan of a stream (default: the shared one, or the image-text one with separate streams; the
        region stream's own current epoch when `stream` is "region" and `epoch` is None)."""
        chosen = self._driver if stream is None else self._streams.get(stream)
        if chosen is None:
            raise XvlmError(f"this loader has no {stream} stream (streams: {sorted(self._streams)})")
        return chosen.plan(epoch)

    def kinds(self, epoch: int | None = None) -> np.ndarray:
        """The kinds of the epoch's batches on this rank (True = region batch), the same on every rank."""
        epoch = self.epoch if epoch is None else epoch
        if not self.separate:
            return self._streams[SHARED].plan(epoch).kinds
        if epoch not in self._kinds:
            driver = self._driver
            n = driver.plan(epoch).batches_per_worker * driver.workers
            if self.region_only:
                kinds = np.ones(n, dtype=bool)
            elif REGION not in self._streams:
                kinds = np.zeros(n, dtype=bool)
            else:
                kinds = iteration_kinds(self.config, epoch, n)
                self._streams[REGION].plan()   # data without boxes fails here, before the first batch
            self._kinds = {epoch: kinds}
        return self._kinds[epoch]

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        if not self.separate:
            return len(self._streams[SHARED])
        return len(self.kinds())

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning at the next iteration (the region stream of separate streams
        continues where it is)."""
        self.epoch, self._done = int(epoch), 0
        self._driver.set_epoch(epoch)

    # -- iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._batches_done() >= len(self):       # the previous epoch was consumed to its last batch
            self.set_epoch(self.epoch + 1)
        source = self._streams[SHARED].batches() if not self.separate else self._separate_batches()
        for batch in source:
            batch["skips"] = self.skips()
            self._log_skips(batch["skips"])
            yield batch
        # The finished epoch's counters stay readable (stats(), state_dict()) until the next iteration starts.

    def _batches_done(self) -> int:
        return self._streams[SHARED].done if not self.separate else self._done

    def _separate_batches(self) -> Iterator[dict[str, Any]]:
        kinds = self.kinds()
        image_text = None
        regions = None
        while self._done < len(kinds):
            if kinds[self._done]:
                if regions is None:
                    regions = self._regions()
                batch = next(regions)
            else:
                if image_text is None:
                    image_text = self._streams[IMAGE_TEXT].batches()
                batch = next(image_text)
            self._done += 1
            yield batch

    def _regions(self) -> Iterator[dict[str, Any]]:
        """Region batches without end: the region stream restarts with its next epoch when exhausted (X-VLM)."""
        stream = self._streams[REGION]
        while True:
            if stream.done >= len(stream):
                stream.set_epoch(stream.epoch + 1)
            yield from stream.batches()

    def skips(self) -> dict[str, int]:
        """Skipped samples by reason in this rank's current epoch of each stream, summed over workers and streams."""
        total: Counter = Counter()
        for stream in self._streams.values():
            total.update(stream.skips())
        return dict(sorted(total.items()))

    def stats(self) -> dict[str, Any]:
        out = self._driver.stats()
        out.update(epoch=self.epoch, batches_done=self._batches_done(), batches_per_epoch=len(self),
                   skips=self.skips())
        if self.separate and REGION in self._streams and not self.region_only:
            out["region"] = self._streams[REGION].stats()
        return out

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
        common = {"world_size": self.world_size, "rank": self.rank, "seed": self.config.seed,
                  "datasets": self._fingerprints()}
        if not self.separate:
            shared = self._streams[SHARED]
            return {"version": STATE_VERSION, "epoch": shared.epoch, "batches_done": shared.done,
                    "num_workers": shared.workers, **common, "workers": [dict(s) for s in shared.states]}
        return {"version": STREAMS_STATE_VERSION, "streams": "separate", "epoch": self.epoch,
                "batches_done": self._done, **common, "iter_perc": self.config.iter_perc,
                "iter_perc_mode": self.config.iter_perc_mode,
                "stream_states": {name: stream.state_dict() for name, stream in self._streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        want = STREAMS_STATE_VERSION if self.separate else STATE_VERSION
        if state.get("version") not in (STATE_VERSION, STREAMS_STATE_VERSION):
            raise XvlmError(f"loader state version {state.get('version')!r} is not {want}")
        if state["version"] != want:
            saved, ours = ("separate", "shared") if state["version"] == STREAMS_STATE_VERSION else ("shared", "separate")
            hint = (" (a run started before X-VLM's separate streams became the default resumes with "
                    "data.streams=shared, schedule.iter_perc_mode=per_batch and the other switches it ran with: "
                    "docs/fidelity.md)") if saved == "shared" else ""
            raise XvlmError(f"the loader state was saved with streams: {saved}, this loader has streams: {ours}; "
                            f"resume with the run's own data settings{hint}")
        self._check_common(state)
        if not self.separate:
            self._streams[SHARED].load_state_dict(state)
            self.epoch = int(state["epoch"])
            return
        for name in ("iter_perc", "iter_perc_mode"):
            if state[name] != getattr(self.config, name):
                raise XvlmError(f"the loader state was saved with {name} {state[name]!r}, the config has "
                                f"{getattr(self.config, name)!r}: the sequence of batch kinds depends on it; resume "
                                f"with the run's own schedule")
        saved = state["stream_states"]
        if sorted(saved) != sorted(self._streams):
            raise XvlmError(f"the loader state holds the streams {sorted(saved)}, this loader has "
                            f"{sorted(self._streams)}")
        for name, stream in self._streams.items():
            stream.load_state_dict(saved[name])
        self.epoch = int(state["epoch"])
        self._done = int(state["batches_done"])

    def _check_common(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size:
            raise XvlmError(
                f"the loader state was saved with world_size {state['world_size']}, this run has "
                f"{self.world_size}: exact resume needs the same world size (each rank's slice of the epoch "
                f"depends on it). Resume with {state['world_size']} ranks, or call set_epoch(epoch + 1) to start "
                f"the next epoch fresh with the new world size.")
        if "num_workers" in state and state["num_workers"] != self.workers:
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
