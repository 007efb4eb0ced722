"""Normalized records: what every source yields, and the reject rows that account for what it does not.

Sources (`pipeline/sources/*.py`) parse release files as streams and yield `Annotation` and `ImageRef`
records plus `Reject`s; the staging step writes them to parquet and groups them per image into `ImageGroup`s;
the shard-writing tasks turn each `ImageGroup` into one tar sample or into rejects. Accounting unit: every
input record (an image entry, a caption, a region, an object, or an unparseable line) ends as written or as
exactly one `Reject` row.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, Literal, NamedTuple

# Record kinds that are counted in the manifest, per source.
RecordKind = Literal["image", "caption", "region", "object", "line"]
RegionKind = Literal["region", "object"]


@dataclass
class ImageRef:
    """One image of a source: where its bytes are and the size the annotations were made against."""
    source: str                      # "coco" | "vg" | "sbu" | "cc" | ...
    source_id: str                   # the release's id, as a string ("139", "2407890", url hash ...)
    image_path: str                  # local path or s3://; for images inside a tar: "TARPATH#MEMBER"
    width: int | None = None         # annotation frame width, when the release states it
    height: int | None = None
    coco_id: int | None = None       # set for COCO images and VG images that are COCO images
    ref: str = ""                    # "FILE#WHERE": file relative to the source root, then line / id (no '#')
    byte_offset: int | None = None   # for "TARPATH#MEMBER": the member's data starts here in the tar ...
    byte_size: int | None = None     # ... and is this long, so the image is one ranged read
    normalized: bool = False         # boxes are fractions of the image's width / height (OpenImages): the image
                                     # stage maps them to pixels with the real size; width / height stay None


@dataclass
class Annotation:
    """One caption or box-text of an image (`source`, `source_id` point at its ImageRef)."""
    source: str
    source_id: str
    kind: RecordKind                 # "caption" | "region" | "object"
    text: str
    bbox: list[float] | None = None  # [x, y, w, h] in the annotation frame; None for captions
    attributes: list[str] = field(default_factory=list)
    ref: str = ""                    # "FILE#WHERE", as ImageRef.ref
    group_of: bool = False           # the box covers a group of objects of its class (OpenImages IsGroupOf,
                                     # Objects365 iscrowd); written as "group_of": true in the sample JSON


@dataclass
class Reject:
    """One input record that did not make it into a shard, and why. A row of rejects.parquet."""
    source: str
    kind: RecordKind
    file: str
    where: str                       # line number, or the record's id
    reason: str                      # a reason code from REASONS
    detail: str = ""

    def to_row(self) -> dict:
        return asdict(self)


def make_ref(file: str, where: str) -> str:
    """The `ref` string of a record: "FILE#WHERE" (WHERE never holds '#'; FILE may)."""
    return f"{file}#{str(where).replace('#', ' ')}"


def split_ref(ref: str) -> tuple[str, str]:
    """Inverse of make_ref: ("FILE", "WHERE")."""
    file, _, where = ref.rpartition("#")
    return file, where


class RecordRef(NamedTuple):
    """Which input record a part of an ImageGroup came from: enough to count it as written or to reject it."""
    source: str
    kind: str                        # a RecordKind
    file: str
    where: str

    def reject(self, reason: str, detail: str = "") -> Reject:
        return Reject(self.source, self.kind, self.file, self.where, reason, detail)  # type: ignore[arg-type]


class Caption(NamedTuple):
    text: str
    ref: RecordRef


@dataclass
class ImageGroup:
    """One image with every annotation of it: one tar sample (or rejects). Built by pipeline/group.py.

    All boxes are [x, y, w, h] in the (ann_width, ann_height) frame (VG boxes of a COCO∩VG image are already
    rescaled to COCO's frame). `regions` are dicts {"bbox", "text", "kind", "attributes", "ref": RecordRef}.
    `image_records` are the image listings this sample stands for (two for "coco+vg", more when a release lists
    an image id twice); with the captions and regions they are every input record the sample accounts for."""
    key: str                         # tar-safe sample key: "coco-000000000139", "vg-2407890", "sbu-...", "cc-..."
    source: str                      # "coco", "vg", "sbu", "cc", or "coco+vg" for a merged image
    source_id: str                   # the primary source's id (COCO's for "coco+vg")
    image_path: str                  # local path or s3://; "TARPATH#MEMBER" for an image inside a tar
    ann_width: int | None
    ann_height: int | None
    coco_id: int | None = None
    byte_offset: int | None = None   # as ImageRef: the image's bytes in the tar, when image_path has '#'
    byte_size: int | None = None
    normalized: bool = False         # as ImageRef: boxes are fractions of the real image size
    captions: list[Caption] = field(default_factory=list)
    regions: list[dict] = field(default_factory=list)
    image_records: list[RecordRef] = field(default_factory=list)

    def records(self) -> Iterator[RecordRef]:
        """Every input record of this sample: image listings, captions, regions and objects."""
        yield from self.image_records
        for caption in self.captions:
            yield caption.ref
        for region in self.regions:
            yield region["ref"]

    def reject_all(self, reason: str, detail: str = "") -> list[Reject]:
        """Rejects for every record of the sample (e.g. when its image is missing or not decodable)."""
        return [ref.reject(reason, detail) for ref in self.records()]


# Reason codes (stable strings: reports group by them).
REASONS = {
    "missing_image": "the image file does not exist",
    "unsafe_path": "the image path resolves (through a symlink) outside the source folder",
    "not_a_file": "the image path is a folder, FIFO, device or socket, not a regular file",
    "file_too_large": "the image file is larger than --max-image-bytes (it is not read)",
    "not_an_image": "the bytes are not a decodable image (e.g. an HTML error page saved as .jpg)",
    "truncated_image": "the image file is truncated",
    "decompression_bomb": "the image header declares more pixels than --max-pixels",
    "image_size_mismatch": "annotation width/height disagree with the real image in aspect ratio",
    "bad_box": "box with negative, zero or NaN size",
    "box_outside": "box lies wholly outside the image",
    "empty_text": "empty or whitespace-only text",
    "invalid_utf8": "text is not valid UTF-8",
    "malformed_line": "a JSON / TSV line or record that cannot be parsed",
    "crowd_box": "COCO iscrowd=1 annotation (skipped as in X-VLM)",
    "no_image_record": "annotation for an image id that the release's image list does not have",
    "no_annotations": "image with no usable caption, region or object",
    "status_not_success": "img2dataset row whose status is not success",
    "unsafe_tar_member": "tar member with an absolute or '..' path, or a link",
    "duplicate_record": "the same record appears twice",
    "held_out_split": "a record of a val / test split inside a training file (RefCOCO refs): not for pretraining",
    "eval_leak": "the image is an image of an evaluation split given with --exclude-eval (by COCO id or content)",
}
