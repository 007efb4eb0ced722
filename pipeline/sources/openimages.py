"""Open Images V6 / V7 boxes: `*-annotations-bbox.csv` + `class-descriptions-boxable.csv`, images SPLIT/IMAGEID.jpg.

Layout (the annotation CSVs in ROOT or ROOT/annotations/; images as the CVDF bucket syncs them):

    oidv6-train-annotations-bbox.csv        ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,
                                            IsTruncated,IsGroupOf,IsDepiction,IsInside[,XClick1X,...]
    oidv7-class-descriptions-boxable.csv    LabelName,DisplayName (V7, with that header; V6's has no header)
    train-images-boxable-with-rotation.csv  optional image list (ImageID first): box rows of unlisted images are
                                            rejected as no_image_record
    train/000026e7ee790996.jpg              ROOT/SPLIT/IMAGEID.jpg

Only the train split is read when there is one (validation and test are held out). Every box row becomes an object
whose text is its class's DisplayName; IsGroupOf boxes are kept with the `group_of` flag. An image is listed once,
at its first box row (the release sorts rows by ImageID; an unsorted file works too).

Coordinates are fractions of the image (XMin in [0, 1] ...). No release file states the images' pixel sizes, so
the records carry normalized boxes (`ImageRef.normalized`) and the image stage, which reads every image anyway,
multiplies them by the real width and height; nothing is read per image while staging. The Rotation column needs no
action: Open Images rotates image and boxes together, and we never rotate (the boxes match the stored pixels).

Rejected here: a row without the columns it needs or with a coordinate that is not a number, an ImageID that is not
16 hex digits, a LabelName without a class description (malformed_line); a box with a coordinate outside [0, 1] or
XMin > XMax / YMin > YMax (bad_box).
"""
from __future__ import annotations

import csv
import io
from array import array
import logging
import re
from typing import Iterator

import numpy as np

from pipeline.records import Annotation, ImageRef, Reject
from pipeline.textclean import INVALID_MARK
import storage
from storage.errors import XvlmError

log = logging.getLogger(__name__)

NAME = "openimages"
DESCRIPTION = "Open Images root with *-annotations-bbox.csv, class-descriptions-boxable.csv and SPLIT/IMAGEID.jpg"
_BOXES = re.compile(r"^(?:oidv\d+-)?(train|validation|test)-annotations-bbox\.csv$")
_CLASSES = re.compile(r"^(?:oidv\d+-)?class-descriptions-boxable\.csv$")
_IMAGE_ID = re.compile(r"[0-9a-f]{16}")
NEEDED = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax")


def sample_key(source_id: str) -> str:
    return f"openimages-{source_id}"


def _image_list_pattern(split: str) -> re.Pattern:
    return re.compile(rf"^(?:oidv\d+-)?{split}-images.*\.csv$")


def _csv_rows(path: str) -> Iterator[tuple[int, int, list[str]]]:
    """(first line number, lines spanned, fields) of each CSV record, streamed; bytes that are not UTF-8 stay as
    lone surrogates. A csv error (a field over 1 MiB) gives one record with a single field naming it."""
    csv.field_size_limit(1 << 20)
    with storage.open_read(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text)
        first = 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield first, reader.line_num - first + 1, [f"csv error: {err}"]
                first = reader.line_num + 1
                continue
            yield first, reader.line_num - first + 1, fields
            first = reader.line_num + 1


def _valid(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return INVALID_MARK     # the stage rejects the record as invalid_utf8
    return text


def _files(path: str) -> dict[str, str]:
    """file name -> path of the CSVs in ROOT and ROOT/annotations (ROOT's win)."""
    found: dict[str, str] = {}
    for folder in (storage.join(path, "annotations"), path):
        for entry in storage.list_files(folder, recursive=False):
            name = entry.path.rsplit("/", 1)[-1]
            if name.endswith(".csv"):
                found[name] = entry.path
    return found


def _classes(files: dict[str, str], path: str) -> tuple[dict[str, str], str]:
    names = sorted(n for n in files if _CLASSES.match(n))
    if not names:
        raise XvlmError(f"{path} has no class-descriptions-boxable.csv (or oidv7-class-descriptions-boxable.csv): "
                        f"download it beside the box CSVs; without it the boxes have no texts")
    classes: dict[str, str] = {}
    for number, _, fields in _csv_rows(files[names[0]]):
        if number == 1 and fields == ["LabelName", "DisplayName"]:
            continue
        if len(fields) == 2:
            classes[fields[0]] = _valid(fields[1])
        else:
            log.warning("openimages: %s line %d is not LabelName,DisplayName; its class has no text", names[0], number)
    return classes, names[0]


def _listed_ids(files: dict[str, str], split: str) -> tuple[np.ndarray | None, str | None]:
    """The ImageIDs of the split's image list, as sorted uint64 (8 bytes an image), or None without a list."""
    pattern = _image_list_pattern(split)
    names = sorted(n for n in files if pattern.match(n))
    if not names:
        return None, None
    ids = array("Q")        # 8 bytes an id: V6's train list has 9M rows
    for number, _, fields in _csv_rows(files[names[0]]):
        if fields and _IMAGE_ID.fullmatch(fields[0]):
            ids.append(int(fields[0], 16))
        elif number > 1:
            log.warning("openimages: %s line %d has no ImageID; ignored", names[0], number)
    return np.unique(np.frombuffer(ids, dtype=np.uint64)), names[0]


def _columns(header: list[str], rel: str) -> dict[str, int]:
    missing = [c for c in NEEDED if c not in header]
    if missing:
        raise XvlmError(f"{rel}: the header has no {', '.join(missing)} column(s) (got {header[:14]}); is it an Open "
                        f"Images *-annotations-bbox.csv?")
    return {name: header.index(name) for name in NEEDED + ("IsGroupOf",) if name in header}


def _box_rows(root: str, box_path: str, rel: str, split: str, classes: dict[str, str],
              listed: np.ndarray | None, seen: set[int]) -> Iterator[ImageRef | Annotation | Reject]:
    rows = _csv_rows(box_path)
    header = next(rows, (1, 1, []))[2]
    col = _columns(header, rel)
    i_id, i_label, i_group = col["ImageID"], col["LabelName"], col.get("IsGroupOf")
    i_x0, i_x1, i_y0, i_y1 = col["XMin"], col["XMax"], col["YMin"], col["YMax"]
    width = max(col.values()) + 1
    current, current_ok = None, False
    for number, lines, fields in rows:
        if not fields:
            continue                # a blank line is not a record
        where = f"line {number}"
        if len(fields) < width or lines > 1:    # no Open Images field holds a newline: a quote swallowed lines
            shown = ",".join(fields).encode("utf-8", "surrogateescape")[:120]
            why = f"an unclosed quote joined {lines} lines" if lines > 1 else f"{len(fields)} field(s), need {width}"
            yield Reject(NAME, "object", rel, where, "malformed_line", f"{why}: {shown!r}")
            continue
        image_id = fields[i_id]
        if image_id != current:     # the release sorts by ImageID: this runs once per image
            current = image_id
            current_ok = _IMAGE_ID.fullmatch(image_id) is not None
            if current_ok:
                number_id = int(image_id, 16)
                unlisted = listed is not None and not _in(listed, number_id)
                if not unlisted and number_id not in seen:
                    seen.add(number_id)
                    yield ImageRef(NAME, image_id, storage.join(root, split, f"{image_id}.jpg"),
                                   ref=f"{rel}#{where}", normalized=True)
        if not current_ok:
            yield Reject(NAME, "object", rel, where, "malformed_line", f"ImageID {image_id!r:.40} is not 16 hex digits")
            continue
        name = classes.get(fields[i_label])
        if name is None:
            yield Reject(NAME, "object", rel, where, "malformed_line",
                         f"LabelName {fields[i_label]!r:.40} has no class description")
            continue
        try:
            x0, x1, y0, y1 = float(fields[i_x0]), float(fields[i_x1]), float(fields[i_y0]), float(fields[i_y1])
        except ValueError:
            yield Reject(NAME, "object", rel, where, "malformed_line", "XMin/XMax/YMin/YMax are not all numbers")
            continue
        if not (0.0 <= x0 <= x1 <= 1.0 and 0.0 <= y0 <= y1 <= 1.0):   # also false for NaN
            yield Reject(NAME, "object", rel, where, "bad_box",
                         f"normalized XMin {x0} XMax {x1} YMin {y0} YMax {y1}: outside [0, 1] or inverted")
            continue
        # Unlisted images: the annotation goes on without its ImageRef and grouping rejects it (no_image_record).
        yield Annotation(NAME, image_id, "object", name, bbox=[x0, y0, x1 - x0, y1 - y0], ref=f"{rel}#{where}",
                         group_of=i_group is not None and fields[i_group] == "1")


def _in(sorted_ids: np.ndarray, value: int) -> bool:
    at = int(np.searchsorted(sorted_ids, np.uint64(value)))
    return at < len(sorted_ids) and int(sorted_ids[at]) == value


def _rel(path: str, root: str) -> str:
    return path[len(root.rstrip("/")) + 1:] if path.startswith(root.rstrip("/") + "/") else path


def iter_records(path: str) -> Iterator[ImageRef | Annotation | Reject]:
    files = _files(path)
    boxes = {m.group(1): name for name in sorted(files) if (m := _BOXES.match(name))}
    if not boxes:
        raise XvlmError(f"{path} has no *-annotations-bbox.csv (in it or in annotations/): point openimages=PATH at "
                        f"the Open Images root (e.g. oidv6-train-annotations-bbox.csv and train/)")
    splits = ["train"] if "train" in boxes else sorted(boxes)
    if splits != sorted(boxes):
        log.info("openimages: reading the train split; held out: %s", sorted(set(boxes) - {"train"}))
    classes, classes_name = _classes(files, path)
    log.info("openimages: %d classes from %s", len(classes), classes_name)
    for split in splits:
        listed, list_name = _listed_ids(files, split)
        if list_name:
            log.info("openimages: %d listed %s images in %s", len(listed), split, list_name)
        seen: set[int] = set()
        yield from _box_rows(path, files[boxes[split]], _rel(files[boxes[split]], path), split, classes, listed, seen)
