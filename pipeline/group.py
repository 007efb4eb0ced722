"""Stage 2 of the shard build: join the staged annotations to their images and group them per image, out of core,
into key-sorted parquet partitions that the shard-writing tasks read slice by slice.

API (the shard writer's side):

    from pipeline.stage import stage_sources
    from pipeline.group import group_images, iter_groups, count_groups, load_accounting, reject_files

    stage_sources({"coco": "data/sample/coco", "vg": "s3://b/vg"}, work_dir)     # WORK_DIR/stage/...
    parts = group_images(work_dir, num_partitions=8)    # exactly 8 local parquet paths, in key order
    n = count_groups(parts[0])                           # from the parquet footer, no data read
    for group in iter_groups(parts[0], start=0, stop=n): # ImageGroup objects (pipeline/records.py), key-sorted
        group.key, group.source, group.image_path, group.byte_offset, group.byte_size   # image to read
        group.ann_width, group.ann_height                # the frame every bbox below is in
        group.captions      # [Caption(text, ref)]
        group.regions       # [{"bbox": [x, y, w, h], "text", "kind": "region"|"object", "attributes", "ref"}]
        group.image_records # [RecordRef] the image listings (2 for "coco+vg")
        group.reject_all("missing_image", "...")   # -> [Reject] for every record of the sample
        ref.reject("box_outside")                   # -> Reject for one caption / region (ref: RecordRef)
    accounting = load_accounting(work_dir)  # {source: {"inputs": {kind: n}, "grouped": {kind: n},
                                            #           "rejected": {kind: {reason: n}}}}: inputs = grouped + rejected
    reject_files(work_dir)                  # parquet files of Reject rows (source, kind, file, where, reason, detail)

Order: partitions are consecutive key ranges and each is sorted by key, so concatenating the partitions in list
order gives every sample sorted by key; the same staged input gives the same groups, byte for byte. Partitions
are balanced by image count (some may be empty when there are fewer images than partitions).

What grouping decides: an annotation whose image id is not listed is rejected (no_image_record); a record that
repeats an earlier one of the same image exactly is rejected (duplicate_record); an image id listed twice with the
same file merges into one sample (both listings count as written), with a different file or size the later
listing is rejected (duplicate_record); an image of a source that declares `JOIN_BY_COCO_ID = "coco"` (VG, RefCOCO)
whose coco_id is a staged COCO image joins that COCO sample ("coco+vg", "coco+refcoco+vg", key "coco-..."), its
boxes rescaled into COCO's frame, or rejected with its annotations (image_size_mismatch) when the aspect ratios
disagree; an image with no annotation left is rejected (no_annotations).

Files: WORK_DIR/groups/part-NNNNN.parquet, rejects.parquet, and accounting.json, written last (the commit marker
of this step; it also lists each partition's group count). A rerun starts the step over.

Memory: rows are spilled into key-range buckets of at most `max_rows_per_bucket` rows and each bucket is grouped
alone, so peak memory follows the bucket size, not the dataset size.
"""
from __future__ import annotations

import bisect
import json
import logging
import math
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import sources as source_registry
from pipeline.records import Caption, ImageGroup, RecordRef
from pipeline.stage import ANNOTATIONS_SCHEMA, IMAGES_SCHEMA, KIND_ORDER, REJECTS_SCHEMA, StageResult, stage_dir
import storage
from storage.errors import XvlmError

log = logging.getLogger(__name__)

GROUP_VERSION = 1
_REF = pa.struct([("source", pa.string()), ("kind", pa.string()), ("file", pa.string()), ("where", pa.string())])
_CAPTION = pa.struct([("text", pa.string()), ("source", pa.string()), ("file", pa.string()), ("where", pa.string())])
_REGION = pa.struct([
    ("x", pa.float64()), ("y", pa.float64()), ("w", pa.float64()), ("h", pa.float64()),
    ("text", pa.string()), ("kind", pa.string()), ("attributes", pa.list_(pa.string())),
    ("source", pa.string()), ("file", pa.string()), ("where", pa.string()), ("group_of", pa.bool_()),
])
GROUP_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("source_id", pa.string()), ("coco_id", pa.int64()),
    ("image_path", pa.string()), ("byte_offset", pa.int64()), ("byte_size", pa.int64()),
    ("ann_width", pa.int32()), ("ann_height", pa.int32()), ("normalized", pa.bool_()),
    ("images", pa.list_(_REF)), ("captions", pa.list_(_CAPTION)), ("regions", pa.list_(_REGION)),
])


@dataclass
class GroupConfig:
    max_rows_per_bucket: int = 500_000  # staged rows grouped in memory at once (~150 B of arrow each)
    key_sample_rows: int = 200_000      # keys sampled to place bucket / partition boundaries
    spill_batch_rows: int = 262_144
    row_group_size: int = 1_024         # groups per parquet row group: the granularity of iter_groups slices
    aspect_tolerance: float = 0.02      # COCO∩VG frames whose aspect ratios differ more are not merged
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_rows_per_bucket < 100:
            raise XvlmError(f"max_rows_per_bucket must be at least 100, got {self.max_rows_per_bucket}")


def groups_dir(work_dir: str) -> str:
    return os.path.join(work_dir, "groups")


# ---------------------------------------------------------------------------------------------- keys


def _join_remap(stage: StageResult) -> tuple[pa.Array, pa.Array] | None:
    """(SOURCE + NUL + SOURCE_ID of every image that joins another source's sample, the key of that sample).

    A source module that sets `JOIN_BY_COCO_ID = "coco"` declares that its image whose coco_id is an image of the
    staged `coco` source is a listing of that COCO sample (VG, RefCOCO): one sample with both annotations."""
    folder = os.path.join(stage_dir(stage.work_dir), "images")
    composites: list[str] = []
    keys: list[str] = []
    for name in sorted(stage.sources):
        target = getattr(source_registry.get_source(name), "JOIN_BY_COCO_ID", None)
        if target is None or target not in stage.sources:
            continue
        target_ids = pq.read_table(os.path.join(folder, f"{target}.parquet"), columns=["coco_id"]).column("coco_id")
        joining = pq.read_table(os.path.join(folder, f"{name}.parquet"), columns=["source_id", "coco_id"])
        mask = pc.fill_null(pc.is_in(joining.column("coco_id"), value_set=pc.unique(target_ids.combine_chunks())),
                            False)
        joining = joining.filter(mask)
        target_module = source_registry.get_source(target)
        keys += [source_registry.sample_key(target_module, str(i)) for i in joining.column("coco_id").to_pylist()]
        composites += [f"{name}\x00{i}" for i in joining.column("source_id").to_pylist()]
        log.info("%s+%s: %d %s images are staged %s images and join their sample", target, name, joining.num_rows,
                 name, target)
    if not composites:
        return None
    return pa.array(composites, pa.string()), pa.array(keys, pa.string())


def _remapped_keys(batch: pa.RecordBatch | pa.Table, remap: tuple[pa.Array, pa.Array] | None) -> pa.Array:
    keys = batch.column("key")
    if remap is None or len(remap[0]) == 0:
        return keys
    composites, new_keys = remap
    mine = pc.binary_join_element_wise(batch.column("source"), batch.column("source_id"), "\x00")
    return pc.coalesce(pc.take(new_keys, pc.index_in(mine, value_set=composites)), keys)


def _files(stage: StageResult, table: str) -> list[str]:
    return [os.path.join(stage_dir(stage.work_dir), table, f"{name}.parquet") for name in sorted(stage.sources)]


def _num_rows(paths: list[str]) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def _key_sample(paths: list[str], remap, every: int) -> list[str]:
    sample: list[str] = []
    seen = 0
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=262_144, columns=["key", "source", "source_id"]):
            first = (-seen) % every
            rows = np.arange(first, batch.num_rows, every)
            seen += batch.num_rows
            if len(rows):
                sub = batch.take(pa.array(rows))
                sample.extend(_remapped_keys(sub, remap).to_pylist())
    sample.sort()
    return sample


def _quantiles(sample: list[str], parts: int) -> list[str]:
    """parts - 1 ascending, distinct boundary keys splitting the sample into equal parts."""
    if not sample or parts <= 1:
        return []
    bounds = sorted({sample[min(len(sample) - 1, (len(sample) * q) // parts)] for q in range(1, parts)})
    return [b for b in bounds if b > sample[0]]


# ---------------------------------------------------------------------------------------------- spill


class _Spill:
    """Rows of one table split into key-range buckets on disk, one parquet file per bucket."""

    def __init__(self, folder: str, schema: pa.Schema):
        self.folder, self.schema = folder, schema
        self.writers: dict[int, pq.ParquetWriter] = {}
        os.makedirs(folder, exist_ok=True)

    def path(self, bucket: int) -> str:
        return os.path.join(self.folder, f"{bucket:05d}.parquet")

    def add(self, bucket: int, table: pa.Table) -> None:
        writer = self.writers.get(bucket)
        if writer is None:
            writer = self.writers[bucket] = pq.ParquetWriter(self.path(bucket), self.schema, compression="lz4")
        writer.write_table(table)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def read(self, bucket: int) -> pa.Table:
        if bucket not in self.writers:
            return self.schema.empty_table()
        table = pq.read_table(self.path(bucket), schema=self.schema)
        os.remove(self.path(bucket))
        return table


def _spill(paths: list[str], spill: _Spill, bounds: np.ndarray, remap, batch_rows: int) -> None:
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            table = pa.Table.from_batches([batch], schema=spill.schema)
            keys = _remapped_keys(table, remap)
            table = table.set_column(0, "key", keys)
            bucket = np.searchsorted(bounds, np.array(keys.to_pylist(), dtype=object), side="right")
            order = np.argsort(bucket, kind="stable")
            table = table.take(pa.array(order))
            counts = np.bincount(bucket, minlength=len(bounds) + 1)
            start = 0
            for b, n in enumerate(counts):
                if n:
                    spill.add(b, table.slice(start, int(n)))
                    start += int(n)


# ---------------------------------------------------------------------------------------------- one bucket


class _Rejects:
    def __init__(self, path: str):
        self.writer = pq.ParquetWriter(path, REJECTS_SCHEMA, compression="zstd")
        self.counts: Counter = Counter()   # (source, kind, reason) -> n

    def add_rows(self, rows: list[tuple]) -> None:
        if rows:
            self.add_table(pa.table(list(zip(*rows)), schema=REJECTS_SCHEMA))

    def add_table(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.writer.write_table(table)
        for (source, kind, reason), n in _count(table, ["source", "kind", "reason"]).items():
            self.counts[(source, kind, reason)] += n

    def close(self) -> None:
        self.writer.close()


def _count(table: pa.Table, columns: list[str]) -> dict[tuple, int]:
    if table.num_rows == 0:
        return {}
    grouped = table.group_by(columns).aggregate([([], "count_all")])
    return {tuple(row[c] for c in columns): row["count_all"] for row in grouped.to_pylist()}


def _frame_scale(primary: tuple, other: tuple, tolerance: float) -> tuple[float, float] | None:
    """(sx, sy) taking `other`'s annotation frame into `primary`'s, or None when the aspect ratios disagree."""
    pw, ph = primary
    ow, oh = other
    if not (pw and ph and ow and oh):
        return 1.0, 1.0  # a frame without a size: the image stage checks boxes against the real image
    sx, sy = pw / ow, ph / oh
    if abs(sx / sy - 1.0) > tolerance:
        return None
    return sx, sy


def _group_images(images: pa.Table, tolerance: float):
    """Decide the sample of every key: its primary listing, merged listings, and which (key, source, source_id)
    annotation sets are accepted (with their box scale). Returns (group rows, status table, image reject rows)."""
    images = images.sort_by([("key", "ascending"), ("source", "ascending"), ("seq", "ascending")])
    col = {name: images.column(name).to_pylist() for name in images.column_names}
    keys = col["key"]
    groups: list[dict] = []
    status_keys, status_state, status_sx, status_sy = [], [], [], []
    rejects: list[tuple] = []
    n = len(keys)
    i = 0
    while i < n:
        j = i
        while j < n and keys[j] == keys[i]:
            j += 1
        # The primary listing is the sample's own source (its key is "SOURCE-..."), not an image joined into it.
        p = next((r for r in range(i, j) if keys[r].startswith(col["source"][r] + "-")), i)
        # Listings are told apart by (source, source_id): the same id again is a repeat; another id under the same
        # key (a VG image of a COCO image) is another listing of the picture, merged with its own box scale.
        accepted = {(col["source"][p], col["source_id"][p]): p}
        refused: set[tuple[str, str]] = set()
        records = [(col["source"][p], "image", col["file"][p], col["where"][p])]
        frame = (col["width"][p], col["height"][p])
        scales = {(col["source"][p], col["source_id"][p]): (1.0, 1.0)}
        for r in range(i, j):
            if r == p:
                continue
            source = col["source"][r]
            ident = (source, col["source_id"][r])
            ref = (source, "image", col["file"][r], col["where"][r])
            if ident in accepted:
                first = accepted[ident]
                same = all(col[c][r] == col[c][first] for c in ("image_path", "width", "height", "byte_offset"))
                if same:
                    records.append(ref)  # the same image listed twice: one sample, both listings written
                else:
                    rejects.append((*ref, "duplicate_record",
                                    f"image id {col['source_id'][r]} is listed again with another file or size; "
                                    f"the listing at {col['file'][first]}#{col['where'][first]} is used"))
            elif ident in refused:
                rejects.append((*ref, "image_size_mismatch", "another listing of this image was refused already"))
            else:
                scale = _frame_scale(frame, (col["width"][r], col["height"][r]), tolerance)
                if scale is None:
                    refused.add(ident)
                    rejects.append((*ref, "image_size_mismatch",
                                    f"{source} frame {col['width'][r]}x{col['height'][r]} vs "
                                    f"{col['source'][p]} frame {frame[0]}x{frame[1]}: aspect ratios disagree"))
                else:
                    accepted[ident] = r
                    scales[ident] = scale
                    records.append(ref)
        for (source, source_id), (sx, sy) in scales.items():
            status_keys.append(f"{keys[i]}\x00{source}\x00{source_id}")
            status_state.append("ok")
            status_sx.append(sx)
            status_sy.append(sy)
        for source, source_id in sorted(refused):
            status_keys.append(f"{keys[i]}\x00{source}\x00{source_id}")
            status_state.append("mismatch")
            status_sx.append(1.0)
            status_sy.append(1.0)
        coco_id = next((col["coco_id"][r] for r in accepted.values() if col["coco_id"][r] is not None), None)
        groups.append({
            "key": keys[i], "source": "+".join(sorted({source for source, _ in accepted})), "source_id": col["source_id"][p],
            "coco_id": coco_id, "image_path": col["image_path"][p], "byte_offset": col["byte_offset"][p],
            "byte_size": col["byte_size"][p], "ann_width": frame[0], "ann_height": frame[1],
            "normalized": bool(col["normalized"][p]),
            "images": [dict(zip(("source", "kind", "file", "where"), rec)) for rec in records],
        })
        i = j
    status = pa.table({"status_key": pa.array(status_keys, pa.string()), "state": pa.array(status_state, pa.string()),
                       "sx": pa.array(status_sx, pa.float64()), "sy": pa.array(status_sy, pa.float64())})
    return groups, status, rejects


def _reject_table(table: pa.Table, reason: str, detail: pa.Array | str) -> pa.Table:
    n = table.num_rows
    if isinstance(detail, str):
        detail = pa.array([detail] * n, pa.string())
    return pa.table({"source": table.column("source"), "kind": table.column("kind"), "file": table.column("file"),
                     "where": table.column("where"), "reason": pa.array([reason] * n, pa.string()),
                     "detail": detail}, schema=REJECTS_SCHEMA)


def _previous_equal(table: pa.Table, columns: list[str]) -> np.ndarray:
    """Row i equals row i-1 on every column (nulls compare equal to nulls)."""
    n = table.num_rows
    same = np.ones(max(n - 1, 0), dtype=bool)
    for name in columns:
        column = table.column(name).combine_chunks()
        if pa.types.is_floating(column.type):
            column = pc.fill_null(column, -math.inf)
        elif pa.types.is_string(column.type):
            column = pc.fill_null(column, "\x00null")
        eq = pc.equal(column.slice(1), column.slice(0, n - 1)) if n > 1 else pa.array([], pa.bool_())
        same &= np.asarray(pc.fill_null(eq, False).to_numpy(zero_copy_only=False), dtype=bool)
    return np.concatenate([[False], same]) if n else np.zeros(0, dtype=bool)


def _group_annotations(anns: pa.Table, status: pa.Table, rejects: _Rejects) -> pa.Table:
    """Accepted, deduplicated, rescaled annotations sorted by (key, source, seq); rejects the others."""
    if anns.num_rows == 0:
        return anns.append_column("status_index", pa.array([], pa.int32()))
    composite = pc.binary_join_element_wise(anns.column("key"), anns.column("source"), anns.column("source_id"),
                                            "\x00")
    index = pc.index_in(composite, value_set=status.column("status_key"))
    anns = anns.append_column("status_index", index)
    unknown = pc.is_null(index)
    if pc.any(unknown).as_py():
        missing = anns.filter(unknown)
        rejects.add_table(_reject_table(missing, "no_image_record", pc.binary_join_element_wise(
            "image id ", missing.column("source_id"), " is not in the release's image list (or its listing was rejected)", "")))
        anns = anns.filter(pc.invert(unknown))
    state = pc.take(status.column("state"), anns.column("status_index"))
    refused = pc.equal(state, "mismatch")
    if pc.any(refused).as_py():
        rejects.add_table(_reject_table(anns.filter(refused), "image_size_mismatch",
                                        "its image listing was refused: frame disagrees with the merged image's"))
        anns = anns.filter(pc.invert(refused))
    # Exact repeats of a record of the same image (same source, kind, text, box, attributes) are duplicates.
    anns = anns.append_column("attributes_text", pc.binary_join(anns.column("attributes"), "\x1f"))
    identity = ["key", "source", "source_id", "kind", "text", "x", "y", "w", "h", "attributes_text", "group_of"]
    anns = anns.sort_by([(c, "ascending") for c in identity] + [("seq", "ascending")])
    duplicate = _previous_equal(anns, identity)
    if duplicate.any():
        rejects.add_table(_reject_table(anns.filter(pa.array(duplicate)), "duplicate_record",
                                        "repeats an earlier record of the same image (text, box and attributes)"))
        anns = anns.filter(pa.array(~duplicate))
    anns = anns.drop_columns(["attributes_text"])
    # VG boxes of a COCO∩VG image go into COCO's frame.
    sx = pc.take(status.column("sx"), anns.column("status_index"))
    sy = pc.take(status.column("sy"), anns.column("status_index"))
    for name, factor in (("x", sx), ("y", sy), ("w", sx), ("h", sy)):
        anns = anns.set_column(anns.schema.get_field_index(name), name, pc.multiply(anns.column(name), factor))
    return anns.sort_by([("key", "ascending"), ("source", "ascending"), ("seq", "ascending")])


def _list_column(values: pa.Table, group_keys: pa.Array, struct_type: pa.StructType) -> pa.Array:
    """One list per group (values sorted by key, every value's key among group_keys, which are sorted)."""
    index = pc.index_in(values.column("key"), value_set=group_keys).to_numpy(zero_copy_only=False)
    counts = np.bincount(index.astype(np.int64), minlength=len(group_keys)) if len(index) else \
        np.zeros(len(group_keys), np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    fields = [values.column(f.name).combine_chunks() if values.num_rows else pa.array([], f.type)
              for f in struct_type]
    structs = pa.StructArray.from_arrays(fields, fields=list(struct_type))
    return pa.ListArray.from_arrays(offsets, structs)


def _group_bucket(images: pa.Table, anns: pa.Table, rejects: _Rejects, config: GroupConfig) -> pa.Table:
    groups, status, image_rejects = _group_images(images, config.aspect_tolerance)
    rejects.add_rows(image_rejects)
    anns = _group_annotations(anns, status, rejects)
    # Images left without any annotation are no sample.
    keys = pa.array([g["key"] for g in groups], pa.string())
    has = np.zeros(len(groups), dtype=bool)
    if anns.num_rows:
        has[np.unique(pc.index_in(anns.column("key"), value_set=keys).to_numpy(zero_copy_only=False))] = True
    empty = [(ref["source"], "image", ref["file"], ref["where"], "no_annotations",
              "no caption, region or object of this image is usable")
             for g, ok in zip(groups, has) if not ok for ref in g["images"]]
    rejects.add_rows(empty)
    groups = [g for g, ok in zip(groups, has) if ok]
    keys = pa.array([g["key"] for g in groups], pa.string())
    is_caption = pc.equal(anns.column("kind"), "caption")
    captions = _list_column(anns.filter(is_caption), keys, _CAPTION)
    regions = _list_column(anns.filter(pc.invert(is_caption)), keys, _REGION)
    base = pa.Table.from_pylist(groups, schema=pa.schema([f for f in GROUP_SCHEMA if f.name not in ("captions", "regions")]))
    return base.append_column("captions", captions).append_column("regions", regions).select(GROUP_SCHEMA.names) \
        .cast(GROUP_SCHEMA)


# ---------------------------------------------------------------------------------------------- the whole job


def group_images(work_dir: str, num_partitions: int, config: GroupConfig | None = None) -> list[str]:
    """Group the staged records of WORK_DIR per image into `num_partitions` key-sorted parquet partitions
    (WORK_DIR/groups/part-NNNNN.parquet); returns their paths in key order. Also writes the group-stage rejects
    (WORK_DIR/groups/rejects.parquet) and the accounting (WORK_DIR/groups/accounting.json)."""
    config = config or GroupConfig()
    if num_partitions < 1:
        raise XvlmError(f"num_partitions must be at least 1, got {num_partitions}")
    stage_json = os.path.join(stage_dir(work_dir), "stage.json")
    if not os.path.exists(stage_json):
        raise XvlmError(f"{work_dir} holds no staged records ({stage_json} missing): run stage_sources first")
    stage = StageResult.load(stage_json)
    out = groups_dir(work_dir)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    image_files, ann_files = _files(stage, "images"), _files(stage, "annotations")
    remap = _join_remap(stage)

    # Bucket edges: row quantiles bound the memory of one bucket, image quantiles balance the partitions.
    n_images, n_rows = _num_rows(image_files), _num_rows(image_files) + _num_rows(ann_files)
    n_buckets = max(1, math.ceil(n_rows / config.max_rows_per_bucket))
    row_bounds = _quantiles(_key_sample(image_files + ann_files, remap, max(1, n_rows // config.key_sample_rows)),
                            n_buckets) if n_buckets > 1 else []
    part_bounds = _quantiles(_key_sample(image_files, remap, max(1, n_images // config.key_sample_rows)),
                             num_partitions)
    bounds = sorted(set(row_bounds) | set(part_bounds))
    bucket_partition = [0] + [bisect.bisect_right(part_bounds, b) for b in bounds]
    bounds_array = np.array(bounds, dtype=object)
    log.info("grouping %d images and %d annotations in %d buckets, %d partitions", n_images, n_rows - n_images,
             len(bounds) + 1, num_partitions)

    spill_images = _Spill(os.path.join(out, "spill", "images"), IMAGES_SCHEMA)
    spill_anns = _Spill(os.path.join(out, "spill", "annotations"), ANNOTATIONS_SCHEMA)
    _spill(image_files, spill_images, bounds_array, remap, config.spill_batch_rows)
    _spill(ann_files, spill_anns, bounds_array, remap, config.spill_batch_rows)
    spill_images.close()
    spill_anns.close()

    rejects = _Rejects(os.path.join(out, "rejects.parquet"))
    paths = [os.path.join(out, f"part-{p:05d}.parquet") for p in range(num_partitions)]
    writers = [pq.ParquetWriter(p + ".tmp", GROUP_SCHEMA, compression="zstd") for p in paths]
    grouped: Counter = Counter()  # (source, kind) -> records in groups
    partition_groups = [0] * num_partitions
    largest_bucket = 0
    for bucket in tqdm(range(len(bounds) + 1), desc="grouping", unit=" buckets", disable=not config.progress):
        images, anns = spill_images.read(bucket), spill_anns.read(bucket)
        largest_bucket = max(largest_bucket, images.num_rows + anns.num_rows)
        table = _group_bucket(images, anns, rejects, config)
        del images, anns
        if table.num_rows == 0:
            continue
        part = bucket_partition[bucket]
        writers[part].write_table(table, row_group_size=config.row_group_size)
        partition_groups[part] += table.num_rows
        _count_grouped(table, grouped)
    rejects.close()
    for writer, path in zip(writers, paths):
        writer.close()
        os.replace(path + ".tmp", path)
    shutil.rmtree(os.path.join(out, "spill"))
    accounting = _accounting(stage, grouped, rejects.counts)
    storage.write_text(os.path.join(out, "accounting.json"), json.dumps(
        {"version": GROUP_VERSION, "sources": accounting, "buckets": len(bounds) + 1,
         "largest_bucket_rows": largest_bucket,
         "partitions": [{"path": p, "groups": n} for p, n in zip(paths, partition_groups)]},
        indent=2, sort_keys=True) + "\n")
    return paths


def _count_grouped(table: pa.Table, grouped: Counter) -> None:
    for name in ("images", "captions", "regions"):
        flat = pc.list_flatten(table.column(name))
        if len(flat) == 0:
            continue
        kinds = pc.struct_field(flat, "kind") if name != "captions" else pa.array(["caption"] * len(flat))
        pairs = pa.table({"source": pc.struct_field(flat, "source"), "kind": kinds})
        for (source, kind), n in _count(pairs, ["source", "kind"]).items():
            grouped[(source, kind)] += n


def _accounting(stage: StageResult, grouped: Counter, group_rejects: Counter) -> dict:
    """Per source: inputs by kind, grouped by kind, rejected by kind and reason; checks inputs = grouped + rejected."""
    stage_rejects: Counter = Counter()
    for path in _files(stage, "rejects"):
        for (source, kind, reason), n in _count(pq.read_table(path, columns=["source", "kind", "reason"]),
                                                ["source", "kind", "reason"]).items():
            stage_rejects[(source, kind, reason)] += n
    out: dict = {}
    for source in sorted(stage.sources):
        rejected: dict[str, dict[str, int]] = defaultdict(dict)
        for counter in (stage_rejects, group_rejects):
            for (s, kind, reason), n in counter.items():
                if s == source:
                    rejected[kind][reason] = rejected[kind].get(reason, 0) + n
        inputs = stage.inputs.get(source, {})
        done = {kind: n for (s, kind), n in grouped.items() if s == source}
        for kind in set(inputs) | set(done) | set(rejected):
            total = done.get(kind, 0) + sum(rejected.get(kind, {}).values())
            if total != inputs.get(kind, 0):
                raise RuntimeError(f"accounting error in {source} {kind}: {inputs.get(kind, 0)} inputs but "
                                   f"{done.get(kind, 0)} grouped + {total - done.get(kind, 0)} rejected")
        order = lambda kv: KIND_ORDER[kv[0]]  # noqa: E731 - a sort key
        out[source] = {"inputs": dict(sorted(inputs.items(), key=order)),
                       "grouped": dict(sorted(done.items(), key=order)),
                       "rejected": {k: dict(sorted(v.items())) for k, v in sorted(rejected.items(), key=order)}}
    return out


# ---------------------------------------------------------------------------------------------- reading back


def count_groups(partition_path: str) -> int:
    """Groups in a partition, from its parquet footer."""
    return _parquet_file(partition_path).metadata.num_rows


def _parquet_file(path: str) -> pq.ParquetFile:
    if storage.local_path(path) is None:
        return pq.ParquetFile(pa.BufferReader(storage.read_bytes(path)))
    return pq.ParquetFile(path)


def iter_groups(partition_path: str, start: int = 0, stop: int | None = None) -> Iterator[ImageGroup]:
    """The ImageGroups of one partition (local path or s3://), rows [start, stop), in key order. Only the parquet
    row groups that hold the slice are read."""
    f = _parquet_file(partition_path)
    stop = f.metadata.num_rows if stop is None else min(stop, f.metadata.num_rows)
    first_row = 0
    for rg in range(f.metadata.num_row_groups):
        rows = f.metadata.row_group(rg).num_rows
        lo, hi = max(start, first_row), min(stop, first_row + rows)
        if lo < hi:
            table = f.read_row_group(rg).slice(lo - first_row, hi - lo)
            # Small batches: a row group of VG images holds ~100k regions, too many Python dicts at once.
            for batch in table.to_batches(max_chunksize=64):
                for row in batch.to_pylist():
                    yield _to_group(row)
        first_row += rows
        if first_row >= stop:
            break


def _ref(d: dict, kind: str | None = None) -> RecordRef:
    return RecordRef(d["source"], kind or d["kind"], d["file"], d["where"])


def _to_group(row: dict) -> ImageGroup:
    return ImageGroup(
        key=row["key"], source=row["source"], source_id=row["source_id"], image_path=row["image_path"],
        ann_width=row["ann_width"], ann_height=row["ann_height"], coco_id=row["coco_id"],
        byte_offset=row["byte_offset"], byte_size=row["byte_size"], normalized=bool(row["normalized"]),
        captions=[Caption(c["text"], _ref(c, "caption")) for c in row["captions"]],
        regions=[_region(r) for r in row["regions"]],
        image_records=[_ref(i) for i in row["images"]],
    )


def _region(r: dict) -> dict:
    region = {"bbox": [r["x"], r["y"], r["w"], r["h"]], "text": r["text"], "kind": r["kind"],
              "attributes": list(r["attributes"] or []), "ref": _ref(r)}
    if r["group_of"]:
        region["group_of"] = True    # only when set: the groups of sources without the flag stay as they were
    return region


def load_accounting(work_dir: str) -> dict:
    """{source: {"inputs": {kind: n}, "grouped": {kind: n}, "rejected": {kind: {reason: n}}}} of stage + group."""
    return json.loads(storage.read_text(os.path.join(groups_dir(work_dir), "accounting.json")))["sources"]


def reject_files(work_dir: str) -> list[str]:
    """Parquet files of every stage and group reject (columns of pipeline.records.Reject), in a fixed order."""
    stage = StageResult.load(os.path.join(stage_dir(work_dir), "stage.json"))
    return _files(stage, "rejects") + [os.path.join(groups_dir(work_dir), "rejects.parquet")]
