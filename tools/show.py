"""`xvlm show`: draw dataset samples to PNG with their boxes and texts — as stored in the shards, and with
`--augmented` as the loader delivers them (crop, flip with left/right swapped texts, resize), so a user can see
that boxes stay on their objects.

A sample is found through index.parquet (shard + byte offset) and only its tar members are read.
"""
from __future__ import annotations

import argparse
import io
import logging
import math
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import storage
from storage.errors import XvlmError
from shards.format import MAX_SAMPLE_JSON_BYTES, SampleError, load_json
from shards.loader_config import LoaderConfig
from shards.manifest import DatasetManifest, read_dataset_manifest
from shards.side_files import check_columns, iter_batches, open_parquet
from shards.tar_stream import member_problem

log = logging.getLogger(__name__)

# Distinct, saturated colours; box i gets PALETTE[i % len(PALETTE)] (tests check pixels against it).
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0),
           (170, 255, 195), (128, 128, 0), (0, 0, 128), (255, 225, 25)]
LINE_WIDTH = 3            # box outline, drawn inside the box's pixels
MIN_SIDE = 320            # smaller images are enlarged (nearest neighbour, integer factor) to stay readable
PANEL_WIDTH = 560         # minimum width of the text panel under the image

DESCRIPTION = (
    "Draw samples of a dataset built by `xvlm build-shards` to PNG files: the stored image with every region /\n"
    "object box outlined in a distinct colour and numbered, and its captions and box texts listed underneath.\n"
    "Pick samples by KEY (as in index.parquet, e.g. coco-000000000139) or --random N. With --augmented also\n"
    "draw them as the training loader delivers them (shards/samples.py: the region view with its anchor crop,\n"
    "flip and resize, boxes from the loader's target boxes; the image-text view with its random resized crop),\n"
    "so you can check that boxes stay on their objects and that left/right words follow flips."
)
EPILOG = (
    "examples:\n"
    "  xvlm show data/shards --random 8 --out /tmp/show\n"
    "  xvlm show data/shards coco-000000000139 vg-2407890 --out /tmp/show\n"
    "  xvlm show data/shards --random 4 --augmented --tokenizer data/sample/tokenizer --seed 3 --out /tmp/show\n"
    "writes OUT/KEY.png, and with --augmented OUT/KEY.region.png and OUT/KEY.image_text.png. see docs/reports.md."
)


def box_colour(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def _font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1 has no scalable default font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


@dataclass
class DrawnBox:
    bbox: tuple[float, float, float, float]    # x, y, w, h in the pixels of the image given to draw_sample
    text: str


def scale_factor(width: int, height: int) -> int:
    """Integer enlargement for small images (1 for images of MIN_SIDE px or more on the long side)."""
    return max(1, math.ceil(MIN_SIDE / max(1, max(width, height))))


def draw_sample(image: Image.Image, boxes: list[DrawnBox], lines: list[str]) -> Image.Image:
    """The image (enlarged by scale_factor, at the top-left corner) with box i outlined in box_colour(i) and
    numbered, and a text panel below: `lines`, then each box's number and text in its colour."""
    image = image.convert("RGB")
    k = scale_factor(*image.size)
    if k > 1:
        image = image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)
    font = _font(13)
    width = max(image.width, PANEL_WIDTH)
    text_lines: list[tuple[str, tuple[int, int, int]]] = []
    for line in lines:
        text_lines += [(part, (20, 20, 20)) for part in _wrap(line, font, width - 16)]
    for i, box in enumerate(boxes):
        wrapped = _wrap(f"[{i}] {box.text}", font, width - 34)
        text_lines += [(part, box_colour(i)) for part in wrapped]
    line_h = 17
    canvas = Image.new("RGB", (width, image.height + 10 + line_h * len(text_lines) + 6), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    rects = []
    for i, box in enumerate(boxes):
        x, y, w, h = (v * k for v in box.bbox)
        x0, y0 = int(round(x)), int(round(y))
        x1, y1 = max(x0 + 1, int(round(x + w)) - 1), max(y0 + 1, int(round(y + h)) - 1)
        rects.append((x0, y0, x1, y1))
    # number tags first, outlines on top: an outline is never hidden by another box's tag
    for i, (x0, y0, x1, y1) in enumerate(rects):
        tag = str(i)
        tw = int(font.getlength(tag)) + 6
        ty = y0 - 16 if y0 >= 16 else y0 + LINE_WIDTH
        tx = min(x0 + LINE_WIDTH, image.width - tw)
        draw.rectangle([tx, ty, tx + tw, ty + 15], fill=box_colour(i))
        draw.text((tx + 3, ty + 1), tag, fill=(0, 0, 0) if sum(box_colour(i)) > 400 else (255, 255, 255), font=font)
    for i, rect in enumerate(rects):
        draw.rectangle(rect, outline=box_colour(i), width=LINE_WIDTH)
    y = image.height + 8
    for text, colour in text_lines:
        if colour != (20, 20, 20):
            draw.rectangle([8, y + 3, 18, y + 13], fill=colour)
            draw.text((24, y), text, fill=(20, 20, 20), font=font)
        else:
            draw.text((8, y), text, fill=colour, font=font)
        y += line_h
    return canvas


# ---------------------------------------------------------------------------------------------- reading samples


@dataclass
class ShardSample:
    key: str
    shard: str
    offset: int
    jpg: bytes
    meta: dict
    txt: str


def find_rows(manifest: DatasetManifest, keys: list[str] | None = None, random_n: int = 0,
              seed: int = 0) -> list[dict]:
    """Index rows (key, shard, offset) of the given keys (in the order given) or of N random samples."""
    dataset, path = manifest.path, manifest.index_path
    columns = ["key", "shard", "offset"]
    try:
        with storage.local_copy(path) as local:
            parquet = open_parquet(local, path)
            check_columns(parquet.schema_arrow, columns, path)
            if keys:
                found: dict[str, dict] = {}
                wanted = set(keys)
                for batch in iter_batches(parquet, columns, 262_144):
                    for row in batch.filter(_is_in(batch, wanted)).to_pylist():
                        found[row["key"]] = row
                missing = [k for k in keys if k not in found]
                if missing:
                    raise XvlmError(f"key(s) {', '.join(missing)} not in {path}; keys look like "
                                    f"coco-000000000139 (see index.parquet or `xvlm show {dataset} --random 5`)")
                return [found[k] for k in keys]
            total = parquet.metadata.num_rows
            if total == 0:
                raise XvlmError(f"{path} has no rows: the dataset is empty")
            rng = np.random.default_rng(seed)
            chosen = sorted(rng.choice(total, size=min(random_n, total), replace=False).tolist())
            rows, start, pick = [], 0, 0
            for batch in iter_batches(parquet, columns, 262_144):
                while pick < len(chosen) and chosen[pick] < start + batch.num_rows:
                    rows.append(batch.slice(chosen[pick] - start, 1).to_pylist()[0])
                    pick += 1
                start += batch.num_rows
            return rows
    except FileNotFoundError:
        raise XvlmError(f"{path} does not exist; is {dataset} a dataset built by `xvlm build-shards`?") from None


def _is_in(batch, wanted: set[str]):
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.is_in(batch.column("key"), value_set=pa.array(sorted(wanted), pa.string()))


def read_sample(manifest: DatasetManifest, row: dict) -> ShardSample:
    """The members of one sample, read from its byte offset in its shard (a ranged read on S3)."""
    dataset = manifest.path
    entry = next((s for s in manifest.shards if s.name == row["shard"]), None)
    if entry is None or not isinstance(row["offset"], int) or not 0 <= row["offset"] < entry.bytes:
        raise XvlmError(f"index.parquet puts sample {row['key']!r} at byte {row['offset']} of {row['shard']!r}, "
                        f"which the manifest does not list or is not that long; run `xvlm verify {dataset}`")
    path = storage.join(dataset, entry.name)
    files: dict[str, bytes] = {}
    try:
        with storage.open_read(path, start=int(row["offset"])) as stream:
            tar = tarfile.open(fileobj=stream, mode="r|")
            for info in tar:
                key, _, ext = info.name.partition(".")
                if key != row["key"]:
                    break
                why = member_problem(info)
                if why:
                    raise XvlmError(f"{row['shard']}: {why}; run `xvlm verify {dataset}`")
                member = tar.extractfile(info)
                files[ext] = member.read() if member is not None else b""
                if len(files) == 3:
                    break
    except FileNotFoundError:
        raise XvlmError(f"shard {path} does not exist; run `xvlm verify {dataset}`") from None
    except (tarfile.TarError, EOFError) as err:
        raise XvlmError(f"cannot read sample {row['key']} at byte {row['offset']} of {path} ({err}); "
                        f"run `xvlm verify {dataset}`") from None
    if "jpg" not in files or "json" not in files:
        raise XvlmError(f"sample {row['key']} at byte {row['offset']} of {path} has members {sorted(files)}, "
                        f"not jpg + json; run `xvlm verify {dataset}`")
    try:
        meta = load_json(files["json"], f"{row['key']}.json in {path}", max_bytes=MAX_SAMPLE_JSON_BYTES)
    except SampleError as err:
        raise XvlmError(f"{err}; run `xvlm verify {dataset}`") from None
    if not isinstance(meta, dict):
        raise XvlmError(f"{row['key']}.json in {path} is not a JSON object; run `xvlm verify {dataset}`")
    return ShardSample(row["key"], row["shard"], int(row["offset"]), files["jpg"], meta,
                       files.get("txt", b"").decode("utf-8", "replace"))


# ---------------------------------------------------------------------------------------------- views


def _region_label(region: dict) -> str:
    attributes = region.get("attributes") or []
    extra = f" (attributes: {', '.join(attributes)})" if attributes else ""
    return f"{region.get('kind', '?')}: {region.get('text', '')}{extra}"


def _drawable_box(region: object) -> tuple[float, float, float, float] | None:
    """A region's bbox as 4 finite numbers with a positive size, or None (NaN, strings, negative sizes...)."""
    bbox = region.get("bbox") if isinstance(region, dict) else None
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < 1e6
            for v in bbox):
        return None
    return tuple(float(v) for v in bbox) if bbox[2] > 0 and bbox[3] > 0 else None


def _open_stored(sample: ShardSample) -> Image.Image:
    """The stored image, decoded; XvlmError when it is not an image or has more pixels than the loader takes."""
    try:
        image = Image.open(io.BytesIO(sample.jpg))   # Pillow's bomb and truncation checks stay on
        if image.width * image.height > LoaderConfig.max_pixels:
            raise XvlmError(f"image is {image.width}x{image.height}, more than the loader's max_pixels "
                            f"{LoaderConfig.max_pixels}")
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise XvlmError(f"image does not decode ({type(err).__name__}: {err})") from None
    return image


def raw_view(sample: ShardSample) -> Image.Image:
    """The stored image with every box of its JSON (a box that is not 4 finite numbers is listed, not drawn)."""
    image = _open_stored(sample)
    meta = sample.meta
    regions = [r for r in meta.get("regions") or [] if isinstance(r, dict)] \
        if isinstance(meta.get("regions"), list) else []
    boxes = [DrawnBox(box, _region_label(r)) for r in regions if (box := _drawable_box(r)) is not None]
    lines = [f"{sample.key} ({meta.get('source')}, id {meta.get('source_id')}) - stored {image.width}x{image.height}, "
             f"{sample.shard} @ byte {sample.offset}"]
    lines += [f"not drawn, bbox is not 4 finite numbers with a size: {r.get('bbox')!r:.60} ({_region_label(r)})"
              for r in regions if _drawable_box(r) is None]
    captions = meta.get("captions") if isinstance(meta.get("captions"), list) else []
    lines += [f"caption: {c}" for c in captions]
    if not captions:
        lines.append("(no caption)")
    return draw_sample(image, boxes, lines)


def tensor_to_image(tensor) -> Image.Image:
    """Undo the loader's CLIP normalisation of a float [3, H, W] tensor."""
    from shards.augment import CLIP_MEAN, CLIP_STD

    array = tensor.detach().cpu().numpy().astype(np.float64)
    array = array * np.asarray(CLIP_STD)[:, None, None] + np.asarray(CLIP_MEAN)[:, None, None]
    return Image.fromarray(np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0), "RGB")


def region_boxes(sample: dict, image_res: int) -> tuple[list[DrawnBox], list[str]]:
    """The loader's region rows as drawn boxes (from its (cx, cy, w, h)/R targets) and the whole-image rows."""
    boxes, captions = [], []
    for text, target, is_image in zip(sample["texts"], sample["target_bbox"].tolist(), sample["is_image"].tolist()):
        if is_image:
            captions.append(text)
            continue
        cx, cy, w, h = (v * image_res for v in target)
        boxes.append(DrawnBox((cx - w / 2, cy - h / 2, w, h), text))
    return boxes, captions


def augmented_views(shard_sample: ShardSample, config, seed: int) -> dict[str, Image.Image | str]:
    """{"region": PNG image or why not, "image_text": ...}: the loader's own sample builders, drawn."""
    from shards import samples
    from shards.plan import rng_for

    out: dict[str, Image.Image | str] = {}
    res = config.image_res
    try:
        sample = samples.region_sample(shard_sample.jpg, shard_sample.meta, rng_for(seed, shard_sample.key, "region"),
                                       config)
        boxes, captions = region_boxes(sample, res)
        lines = [f"{shard_sample.key} - loader region view: crop {sample['crop']} of the stored image, "
                 f"flipped {'yes' if sample['flipped'] else 'no'}, resized to {res}x{res}"]
        lines += [f"caption: {c}" for c in captions]
        out["region"] = draw_sample(tensor_to_image(sample["image"]), boxes, lines)
    except samples.SkipSample as skip:
        out["region"] = f"no region view: the loader skips it ({skip})"
    try:
        sample = samples.image_text_sample(shard_sample.jpg, shard_sample.meta,
                                           rng_for(seed, shard_sample.key, "image_text"), config)
        lines = [f"{shard_sample.key} - loader image-text view: crop {sample['crop']}, flipped "
                 f"{'yes' if sample['flipped'] else 'no'}, resized to {res}x{res}", f"caption: {sample['text']}"]
        out["image_text"] = draw_sample(tensor_to_image(sample["image"]), [], lines)
    except samples.SkipSample as skip:
        out["image_text"] = f"no image-text view: the loader skips it ({skip})"
    return out


# ---------------------------------------------------------------------------------------------- CLI


@dataclass
class ShowOptions:
    dataset: str
    keys: list[str]
    random: int = 0
    augmented: bool = False
    out: str = "show"
    seed: int = 0
    tokenizer: str | None = None
    preset: str = "base"
    image_res: int | None = None

    def __post_init__(self) -> None:
        if bool(self.keys) == bool(self.random):
            raise XvlmError("give sample KEY(s) or --random N (one of the two)")
        if self.random < 0:
            raise XvlmError(f"--random must be positive, got {self.random}")
        if self.augmented and not self.tokenizer:
            raise XvlmError("--augmented needs --tokenizer DIR (the BERT WordPiece folder the loader uses, e.g. "
                            "OUT/tokenizer of `xvlm sample-data`): the loader's samples carry token ids")

    def loader_config(self):
        from shards.loader_config import preset

        overrides = {"tokenizer": self.tokenizer or ""}
        if self.image_res:
            overrides["image_res"] = self.image_res
        return preset(self.preset, **overrides)


def show(options: ShowOptions) -> list[str]:
    """Write the PNGs; returns the paths written (and logs why a view was not possible)."""
    manifest = read_dataset_manifest(options.dataset)   # refuses an unfinished, foreign or damaged dataset
    config = options.loader_config() if options.augmented else None
    rows = find_rows(manifest, options.keys or None, options.random, options.seed)
    storage.makedirs(options.out)
    written, failed = [], []
    for row in rows:
        try:   # a damaged sample is reported and the others are still drawn
            sample = read_sample(manifest, row)
            views: dict[str, Image.Image | str] = {"": raw_view(sample)}
        except XvlmError as err:
            print(f"{row['key']}: not drawn: {err}")
            failed.append(f"{row['key']} ({err})")
            continue
        if config is not None:
            views.update({f".{k}": v for k, v in augmented_views(sample, config, options.seed).items()})
        for suffix, view in views.items():
            if isinstance(view, str):
                print(f"{sample.key}: {view}")
                continue
            path = storage.join(options.out, f"{sample.key}{suffix}.png")
            buf = io.BytesIO()
            view.save(buf, format="PNG")
            storage.write_bytes(path, buf.getvalue())
            written.append(path)
    if failed:
        raise XvlmError(f"{len(failed)} of {len(rows)} sample(s) could not be drawn: {'; '.join(failed)[:600]}; "
                        f"run `xvlm verify {manifest.path}`")
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATASET", help="dataset folder or s3://bucket/prefix (with manifest.json)")
    parser.add_argument("keys", nargs="*", metavar="KEY", help="sample keys to draw (e.g. coco-000000000139)")
    parser.add_argument("--random", type=int, default=0, metavar="N", help="draw N random samples instead of KEYs")
    parser.add_argument("--augmented", action="store_true",
                        help="also draw each sample as the loader delivers it (region and image-text views)")
    parser.add_argument("--out", default="show", metavar="DIR", help="folder for the PNGs (default ./show)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random and of the augmentations (default 0)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="BERT WordPiece tokenizer folder (needed by --augmented: the loader tokenizes texts)")
    parser.add_argument("--preset", default="base", choices=["tiny", "base"],
                        help="loader preset for --augmented (image size, max regions; default base: 224 px)")
    parser.add_argument("--image-res", type=int, default=None, metavar="PX",
                        help="override the loader's image side for --augmented (a multiple of its grid stride)")
    parser.add_argument("--endpoint-url", default=None, metavar="URL",
                        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")


def run(args: argparse.Namespace) -> int:
    if args.endpoint_url:
        storage.set_endpoint_url(args.endpoint_url)
    options = ShowOptions(dataset=args.dataset, keys=list(args.keys), random=args.random, augmented=args.augmented,
                          out=args.out, seed=args.seed, tokenizer=args.tokenizer, preset=args.preset,
                          image_res=args.image_res)
    for path in show(options):
        print(f"wrote {path}")
    return 0
