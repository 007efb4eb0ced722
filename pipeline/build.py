"""The shard build job: stage the sources -> group per image -> write shards in Ray tasks -> index, rejects,
manifest (last).

Shard k holds samples [k*N, (k+1)*N) of the grouped, key-sorted image list, whatever the number of workers or the
order tasks finish in, so the output is byte-identical from run to run. A finished shard leaves, after its tar,
`_work/PREFIX-k.json` (+ its index and rejects as parquet); a re-run after a crash skips shards that have both
and redoes the rest, and the final files are always assembled from `_work`, so a resumed run writes the same
bytes as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.group import GroupConfig, count_groups, group_images, iter_groups, load_accounting, reject_files
from pipeline.evalsets import parse_spec
from pipeline.images import ImageConfig, ImageReader, ImageReject, annotation_scale, map_box, normalize_image
from pipeline.leak import HAMMING_THRESHOLD, EvalIndex, build_index
from pipeline.records import ImageGroup, RecordRef
from pipeline.stage import StageConfig, stage_sources
import storage
from storage.errors import XvlmError
from shards.format import DEFAULT_SHARD_PREFIX, FORMAT_VERSION, parse_shard_name, shard_name, valid_key
from shards.format import INDEX_NAME, MANIFEST_NAME, REJECTS_NAME
from shards.hf_card import write_dataset_card
from shards.manifest import (INDEX_SCHEMA, REJECTS_SCHEMA, Manifest, SourceCounts, manifest_bytes, merge_counts,
                             table_bytes)
from shards.writer import ShardWriter

log = logging.getLogger(__name__)

WORK_NAME = "_work"
WORK_VERSION = 1
STAGING_PREFIX = "xvlm-build-"  # local staging of a build to S3: TMPDIR/xvlm-build-PID-XXXX, removed at the end
GROUP_TARGET_ROWS = 1_000_000   # annotation rows per grouping partition (bounds the group step's memory)


@dataclass
class BuildConfig:
    """Everything `xvlm build-shards` needs. Only the fields in `fingerprint()` change the output bytes."""
    sources: dict[str, str]                 # name -> root (local or s3://)
    out: str                                # local folder or s3://bucket/prefix
    samples_per_shard: int = 5000
    image: ImageConfig = field(default_factory=ImageConfig)
    shard_prefix: str = DEFAULT_SHARD_PREFIX
    workers: int | None = None              # parallel shard tasks (default: the cluster's CPUs)
    ray_address: str | None = None          # None: a local Ray started in-process
    endpoint_url: str | None = None
    work_dir: str | None = None             # local staging folder (default OUT/_work, or a temp dir for s3://)
    progress: bool = True
    command: list[str] = field(default_factory=list)
    exclude_eval: list[str] = field(default_factory=list)   # --exclude-eval NAME=FILE[,images=ROOT] (pipeline/leak.py)
    leak_max_distance: int = HAMMING_THRESHOLD
    eval_digest: str | None = None          # set by run_build from the evaluation sets as read

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise XvlmError(f"--samples-per-shard must be positive, got {self.samples_per_shard}")
        if not valid_key(self.shard_prefix):
            raise XvlmError(f"--shard-prefix {self.shard_prefix!r} may only hold letters, digits, '_' and '-'")
        if self.workers is not None and self.workers < 1:
            raise XvlmError(f"--workers must be positive, got {self.workers}")
        if not self.sources:
            raise XvlmError("no sources given: use --source NAME=PATH (e.g. --source coco=data/sample/coco)")
        for spec in self.exclude_eval:
            parse_spec(spec)
        if not 0 <= self.leak_max_distance <= 128:
            raise XvlmError(f"--leak-max-distance must be within 0..128 bits (of 256), got {self.leak_max_distance}")

    def output_config(self) -> dict:
        """The settings the output depends on (recorded in the manifest, compared on resume)."""
        config = {"sources": dict(sorted(self.sources.items())), "samples_per_shard": self.samples_per_shard,
                  "image": asdict(self.image), "shard_prefix": self.shard_prefix, "format_version": FORMAT_VERSION}
        if self.exclude_eval:   # only with the filter on: the fingerprints of other builds stay as they were
            config["exclude_eval"] = {"sets": sorted(self.exclude_eval), "max_distance": self.leak_max_distance,
                                      "digest": self.eval_digest}
        return config

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.output_config(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- one sample


@dataclass
class ShardStats:
    """What one shard task produced, besides the tar."""
    counts: dict[str, SourceCounts] = field(default_factory=dict)
    index: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    images: int = 0

    def source(self, name: str) -> SourceCounts:
        return self.counts.setdefault(name, SourceCounts())

    def reject(self, ref: RecordRef, reason: str, detail: str) -> None:
        self.rejects.append(ref.reject(reason, detail[:500]).to_row())
        self.source(ref.source).add_rejected(ref.kind, reason)

    def written(self, ref: RecordRef) -> None:
        self.source(ref.source).add_written(ref.kind)

    def reject_sample(self, group: ImageGroup, reason: str, detail: str) -> None:
        for ref in group.records():
            self.reject(ref, reason, detail)


def _words(text: str) -> int:
    return len(text.split())


def _leak_by_content(leak: EvalIndex | None, data: bytes) -> str | None:
    if leak is None:
        return None
    try:
        return leak.match_image(data)
    except Exception as err:  # noqa: BLE001 - it decoded for the image stage; a failure here is one counted reject
        raise ImageReject("not_an_image", f"decodes but cannot be hashed for the leak filter: {err}") from None


def write_sample(group: ImageGroup, reader: ImageReader, config: ImageConfig, writer: ShardWriter,
                 stats: ShardStats, leak: EvalIndex | None = None) -> None:
    """One ImageGroup -> one tar sample, or rejects for each of its records; every record is counted once.
    `leak`: the evaluation images of --exclude-eval; a sample that is one is rejected as eval_leak."""
    stats.images += 1
    leaked = leak.match_id(group.coco_id) if leak is not None else None
    if leaked:
        return stats.reject_sample(group, "eval_leak", leaked)
    try:
        if group.byte_offset is not None and group.byte_size is not None and "#" in group.image_path:
            if group.byte_size > reader.max_bytes:
                raise ImageReject("file_too_large", f"{group.byte_size} bytes, more than {reader.max_bytes} "
                                                    f"(--max-image-bytes)")
            tar_path = group.image_path.partition("#")[0]
            data = storage.read_bytes(tar_path, group.byte_offset, group.byte_offset + group.byte_size)
        else:
            data = reader.read(group.image_path)
        stored = normalize_image(data, config)
        leaked = _leak_by_content(leak, data)
        real = (stored.source_width, stored.source_height)
        # Normalized boxes (OpenImages) are fractions of the real image: its size is their frame.
        to_real = real if group.normalized else annotation_scale((group.ann_width, group.ann_height), real)
    except FileNotFoundError:
        for ref in group.records():
            stats.reject(ref, "missing_image", f"{group.image_path}: no such file")
        return
    except ImageReject as err:
        for ref in group.records():
            stats.reject(ref, err.reason, f"{group.image_path}: {err.detail}")
        return
    if leaked:
        return stats.reject_sample(group, "eval_leak", leaked)
    scale = (to_real[0] * stored.width / stored.source_width, to_real[1] * stored.height / stored.source_height)
    size = (stored.width, stored.height)
    regions, kept = [], []
    for region in group.regions:
        result = map_box(region["bbox"], scale, size)
        if result.bbox is None:
            stats.reject(region["ref"], result.reason, result.detail)
            continue
        if result.clipped:
            stats.source(region["ref"].source).clipped_boxes += 1
        regions.append({"bbox": result.bbox, "text": region["text"], "kind": region["kind"],
                        "attributes": list(region.get("attributes") or [])})
        if region.get("group_of"):
            regions[-1]["group_of"] = True
        kept.append(region["ref"])
    captions = [c.text for c in group.captions]
    if not captions and not regions:
        for ref in group.image_records:
            stats.reject(ref, "no_annotations", "no caption or box left after the checks")
        return
    meta = {"key": group.key, "source": group.source, "source_id": group.source_id, "width": stored.width,
            "height": stored.height, "captions": captions, "regions": regions}
    if group.coco_id is not None:
        meta["coco_id"] = int(group.coco_id)
    offset = writer.write(group.key, stored.jpeg, meta)
    for ref in group.image_records:
        stats.written(ref)
    for caption in group.captions:
        stats.written(caption.ref)
    for ref in kept:
        stats.written(ref)
    area = float(stored.width * stored.height)
    stats.index.append({
        "key": group.key, "shard": writer.path.rsplit("/", 1)[-1], "offset": offset, "source": group.source,
        "width": stored.width, "height": stored.height, "jpeg_bytes": len(stored.jpeg),
        "passthrough": stored.passthrough, "num_captions": len(captions),
        "num_regions": sum(r["kind"] == "region" for r in regions),
        "num_objects": sum(r["kind"] == "object" for r in regions),
        "caption_lengths": [_words(c) for c in captions],
        "box_area_fractions": [r["bbox"][2] * r["bbox"][3] / area for r in regions],
        "captions": list(captions),
        "region_texts": [r["text"] for r in regions],
        "boxes": [list(r["bbox"]) for r in regions],
        "object_labels": [r["text"] for r in regions if r["kind"] == "object"],
        "attributes": [a for r in regions for a in r.get("attributes", [])],
    })


# ---------------------------------------------------------------------------------------------- one shard


def _work_paths(out: str, name: str) -> tuple[str, str, str]:
    stem = name[: -len(".tar")]
    base = storage.join(out, WORK_NAME)
    return (storage.join(base, f"{stem}.json"), storage.join(base, f"{stem}.index.parquet"),
            storage.join(base, f"{stem}.rejects.parquet"))


def write_shard(groups: list[ImageGroup], out: str, name: str, config: ImageConfig, fingerprint: str,
                endpoint_url: str | None = None, roots: tuple[str, ...] = (), leak: EvalIndex | None = None) -> int:
    """Write shard `name` from its groups, then its stats files (the stats JSON last: the shard's done marker).
    Runs inside a Ray task. `roots`: the source folders, which local image paths must not leave. Returns the
    number of images processed."""
    if endpoint_url:
        storage.set_endpoint_url(endpoint_url)
    stats = ShardStats()
    reader = ImageReader(roots, config.max_file_bytes)
    path = storage.join(out, name)
    try:
        with ShardWriter(path) as writer:
            for group in groups:
                write_sample(group, reader, config, writer, stats, leak)
    finally:
        reader.close()
    stats_path, index_path, rejects_path = _work_paths(out, name)
    storage.write_bytes(index_path, table_bytes(stats.index, INDEX_SCHEMA))
    storage.write_bytes(rejects_path, table_bytes(stats.rejects, REJECTS_SCHEMA))
    done = {"version": WORK_VERSION, "fingerprint": fingerprint, "shard": asdict(writer.info),
            "counts": {k: v.to_json() for k, v in sorted(stats.counts.items())}, "images": stats.images}
    storage.write_text(stats_path, json.dumps(done, sort_keys=True, indent=1) + "\n")
    return stats.images


def shard_done(out: str, name: str, fingerprint: str) -> dict | None:
    """The stats of a finished shard, or None when it must be (re)written."""
    stats_path, index_path, rejects_path = _work_paths(out, name)
    try:
        done = json.loads(storage.read_bytes(stats_path))
    except FileNotFoundError:
        return None
    if done.get("version") != WORK_VERSION or done.get("fingerprint") != fingerprint:
        return None
    tar = storage.join(out, name)
    if not (storage.exists(tar) and storage.size(tar) == done["shard"]["bytes"]
            and storage.exists(index_path) and storage.exists(rejects_path)):
        return None
    return done


def shard_fingerprint(config: BuildConfig, groups: list[ImageGroup]) -> str:
    """Settings + the shard's exact input groups: a finished shard is reused only if both are unchanged."""
    digest = hashlib.sha256(config.fingerprint().encode())
    for group in groups:
        digest.update(json.dumps(asdict(group), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def _remove_stale_shards(out: str, prefix: str, count: int) -> None:
    """Shards numbered beyond this build's last one (an earlier build of inputs that have since shrunk)."""
    for entry in storage.list_files(out, recursive=False):
        parsed = parse_shard_name(entry.path.rsplit("/", 1)[-1])
        if parsed and parsed[0] == prefix and parsed[1] >= count:
            log.info("removing %s: not part of this build", entry.path)
            storage.delete(entry.path)
            for path in _work_paths(out, shard_name(prefix, parsed[1])):
                storage.delete(path)


def _chunks(groups: Iterable[ImageGroup], size: int) -> Iterator[list[ImageGroup]]:
    chunk: list[ImageGroup] = []
    for group in groups:
        chunk.append(group)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------- Ray


def init_ray(address: str | None, workers: int | None) -> int:
    """Connect to a cluster (`address`) or start a local Ray on 127.0.0.1; returns the CPUs available."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            for attempt in range(1, 4):
                try:
                    ray.init(num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1",
                             log_to_driver=False, configure_logging=False)
                    break
                except Exception as err:  # noqa: BLE001 - Ray's node start has a fixed 30 s limit
                    # On a busy machine the local raylet can miss Ray's fixed startup deadline; try again.
                    ray.shutdown()
                    if attempt == 3:
                        raise XvlmError(f"could not start a local Ray ({err}); is the machine overloaded?") from err
                    log.warning("local Ray did not start (%s); retrying (%d/3)", err, attempt + 1)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# ---------------------------------------------------------------------------------------------- the job


@dataclass
class BuildResult:
    manifest: Manifest
    shards_written: int
    shards_skipped: int


def _check_work_state(config: BuildConfig) -> None:
    """OUT/_work/build.json remembers which settings the finished shards were made with."""
    path = storage.join(config.out, WORK_NAME, "build.json")
    state = {"version": WORK_VERSION, "fingerprint": config.fingerprint(), "config": config.output_config()}
    try:
        old = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        old = None
    if old is not None and old.get("fingerprint") != state["fingerprint"]:
        raise XvlmError(f"{config.out} holds a build made with other settings ({old.get('config')}); "
                        f"use a new --out, or delete {config.out} to rebuild it")
    if old is None:
        storage.write_text(path, json.dumps(state, indent=2, sort_keys=True) + "\n")


@dataclass
class Grouped:
    """The grouping step's output as the job uses it."""
    partitions: list[str]
    images: int
    accounting: dict            # pipeline.group.load_accounting
    reject_files: list[str]     # stage + group rejects (parquet)


def _clean_interrupted_writes(out: str) -> None:
    """What a killed run left behind: temp files of atomic writes, unfinished uploads (storage knows their names)."""
    removed = sum(storage.clean_interrupted_writes(folder) for folder in (out, storage.join(out, WORK_NAME)))
    if removed:
        log.info("removed %d unfinished writes under %s (left by an interrupted run)", removed, out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # another user's process
        return True
    return True


def _remove_dead_staging() -> None:
    """Staging folders of builds to S3 whose process is gone (killed with -9: no `finally` ran), ours only."""
    base = tempfile.gettempdir()
    for name in os.listdir(base):
        match = re.match(rf"{STAGING_PREFIX}(\d+)-", name)
        path = os.path.join(base, name)
        if not match or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s: the staging folder of a build that was killed", path)


def _stage_and_group(config: BuildConfig, work_dir: str) -> Grouped:
    stage = stage_sources(config.sources, work_dir, StageConfig(progress=config.progress))
    rows = sum(sum(kinds.values()) for kinds in stage.inputs.values())
    partitions = group_images(work_dir, max(1, -(-rows // GROUP_TARGET_ROWS)), GroupConfig(progress=config.progress))
    return Grouped(partitions, sum(count_groups(p) for p in partitions), load_accounting(work_dir),
                   reject_files(work_dir))


def run_build(config: BuildConfig) -> BuildResult:
    """The whole job. Safe to re-run after a crash: finished shards are kept, the rest redone."""
    import ray

    if config.endpoint_url:
        storage.set_endpoint_url(config.endpoint_url)
    out = config.out.rstrip("/")
    storage.makedirs(out)
    leak = None
    if config.exclude_eval:
        leak = build_index([parse_spec(s) for s in config.exclude_eval], config.progress)
        leak.threshold = config.leak_max_distance
        config.eval_digest = leak.digest
    _check_work_state(config)
    _clean_interrupted_writes(out)
    temp_work = None
    if config.work_dir:
        work_dir = config.work_dir
    elif storage.local_path(out) is None:   # the shards go to a remote store: stage in a local temp folder
        _remove_dead_staging()
        work_dir = temp_work = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-")
    else:
        work_dir = os.path.join(out, WORK_NAME)
    try:
        grouped = _stage_and_group(config, work_dir)
        cpus = init_ray(config.ray_address, config.workers)
        workers = config.workers or cpus
        fingerprints: dict[str, str] = {}
        task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=True)(write_shard)
        leak_ref = ray.put(leak) if leak is not None else None   # one copy in the object store, not one per task
        names: list[str] = []
        pending: dict = {}
        written = skipped = 0
        bar = tqdm(total=grouped.images, desc="writing shards", unit=" img", disable=not config.progress,
                   smoothing=0.1, mininterval=0.5, dynamic_ncols=True)

        def collect(block: bool) -> None:
            nonlocal written
            while pending and (block or len(pending) >= 2 * workers):
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    name = pending.pop(ref)
                    try:
                        bar.update(ray.get(ref))
                    except ray.exceptions.RayError as err:
                        raise XvlmError(f"writing {name} failed after retries: {err}\nFinished shards are kept; "
                                        f"re-run the same command to resume.") from err
                    written += 1
                if not block:
                    break

        for number, chunk in enumerate(_chunks(_iter_all_groups(grouped), config.samples_per_shard)):
            name = shard_name(config.shard_prefix, number)
            names.append(name)
            fingerprint = shard_fingerprint(config, chunk)
            fingerprints[name] = fingerprint
            if shard_done(out, name, fingerprint) is not None:
                skipped += 1
                bar.update(len(chunk))
                continue
            collect(block=False)
            pending[task.remote(chunk, out, name, config.image, fingerprint, config.endpoint_url,
                                tuple(config.sources.values()), leak_ref)] = name
        collect(block=True)
        bar.close()
        manifest = finish(config, out, names, grouped, fingerprints)
        return BuildResult(manifest, written, skipped)
    finally:
        if temp_work:
            shutil.rmtree(temp_work, ignore_errors=True)


def _iter_all_groups(grouped) -> Iterator[ImageGroup]:
    for partition in grouped.partitions:
        yield from iter_groups(partition)


def finish(config: BuildConfig, out: str, names: list[str], grouped: Grouped, fingerprints: dict[str, str]) -> Manifest:
    """Assemble index.parquet and rejects.parquet from _work (bounded memory: one shard at a time), check the
    accounting against the staged inputs, then write manifest.json last."""
    early = {}
    for source, acc in grouped.accounting.items():
        counts = early[source] = SourceCounts()
        for kind, reasons in acc["rejected"].items():
            for reason, n in reasons.items():
                counts.add_rejected(kind, reason, n)
    parts: list[dict[str, SourceCounts]] = [early]
    shards: list[dict] = []
    with storage.atomic_write(storage.join(out, INDEX_NAME)) as index_file, \
            storage.atomic_write(storage.join(out, REJECTS_NAME)) as rejects_file:
        index_writer = pq.ParquetWriter(index_file, INDEX_SCHEMA, compression="zstd")
        rejects_writer = pq.ParquetWriter(rejects_file, REJECTS_SCHEMA, compression="zstd")
        for path in grouped.reject_files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536):
                rejects_writer.write_table(pa.Table.from_batches([batch]).select(REJECTS_SCHEMA.names)
                                           .cast(REJECTS_SCHEMA))
        for name in names:
            done = shard_done(out, name, fingerprints[name])
            if done is None:
                raise XvlmError(f"shard {name} did not finish (its task failed); re-run the same command to redo it")
            shards.append(done["shard"])
            parts.append({k: SourceCounts.from_json(v) for k, v in done["counts"].items()})
            _, index_path, rejects_path = _work_paths(out, name)
            index_writer.write_table(pq.read_table(pa.BufferReader(storage.read_bytes(index_path))))
            rejects_writer.write_table(pq.read_table(pa.BufferReader(storage.read_bytes(rejects_path))))
        index_writer.close()
        rejects_writer.close()
    _remove_stale_shards(out, config.shard_prefix, len(names))
    totals = merge_counts(parts)
    for source, acc in grouped.accounting.items():
        staged = {k: v for k, v in acc["inputs"].items() if v}
        counted = {k: v for k, v in totals.setdefault(source, SourceCounts()).inputs.items() if v}
        if staged != counted:
            raise RuntimeError(f"accounting error for {source}: {staged} records read but {counted} written + "
                               f"rejected; the dataset is not committed (no manifest.json)")
    manifest = Manifest(build={"command": config.command, "config": config.output_config()},
                        sources=dict(sorted(totals.items())), shards=shards)
    write_dataset_card(out, manifest)    # README.md: the schema for Hugging Face datasets
    storage.write_bytes(storage.join(out, MANIFEST_NAME), manifest_bytes(manifest))
    return manifest


def summary_lines(manifest: Manifest) -> list[str]:
    """The per-source summary printed at the end: inputs = written + rejected, per source."""
    lines = [f"{'source':<10} {'inputs':>9} {'written':>9} {'rejected':>9}  check  rejected by reason"]
    for name, counts in manifest.sources.items():
        inputs, written = sum(counts.inputs.values()), sum(counts.written.values())
        rejected = sum(sum(r.values()) for r in counts.rejected.values())
        reasons = Counter()
        for by_reason in counts.rejected.values():
            reasons.update(by_reason)
        ok = "ok" if counts.balanced() and inputs == written + rejected else "MISMATCH"
        detail = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) or "-"
        if counts.clipped_boxes:
            detail += f"; {counts.clipped_boxes} boxes clipped"
        lines.append(f"{name:<10} {inputs:>9} {written:>9} {rejected:>9}  {ok:<5}  {detail}")
    total = manifest.to_json()["totals"]
    lines.append(f"inputs = written + rejected for every source and record kind; "
                 f"{total['samples']} samples in {total['shards']} shards ({total['bytes'] / 1e6:.1f} MB)")
    return lines
