"""SBU Captions: SBU_captioned_photo_dataset_urls.txt + SBU_captioned_photo_dataset_captions.txt (line-aligned)
and a folder images/ of the downloads, each named by its URL's basename.

The sample id is the URL's basename without extension (the Flickr photo id and secret), made tar-safe. A URL
without a downloaded file still yields its image: the image stage rejects it as `missing_image`.
"""
from __future__ import annotations

import itertools
from typing import Iterator

from pipeline.records import Annotation, ImageRef, Reject, make_ref
from pipeline.sources import safe_id
from pipeline.textclean import decode_strict
from shards import storage
from shards.errors import XvlmError

NAME = "sbu"
DESCRIPTION = "SBU root with SBU_captioned_photo_dataset_{urls,captions}.txt and images/ named by URL basename"
URLS = "SBU_captioned_photo_dataset_urls.txt"
CAPTIONS = "SBU_captioned_photo_dataset_captions.txt"
IMAGES = "images"


def file_name(url: str) -> str:
    """The downloader's naming rule: the URL's basename, without a query string."""
    return url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def iter_records(path: str) -> Iterator[ImageRef | Annotation | Reject]:
    urls_path, captions_path = storage.join(path, URLS), storage.join(path, CAPTIONS)
    for needed in (urls_path, captions_path):
        if not storage.exists(needed):
            raise XvlmError(f"{needed} does not exist: point sbu=PATH at the folder holding {URLS}, {CAPTIONS} "
                            f"and {IMAGES}/")
    pairs = itertools.zip_longest(storage.iter_lines(urls_path), storage.iter_lines(captions_path))
    for url_line, caption_line in pairs:
        number = (url_line or caption_line)[0]
        where = f"line {number}"
        source_id = None
        if url_line is None:
            yield Reject(NAME, "caption", CAPTIONS, where, "no_image_record",
                         f"{URLS} has fewer lines: this caption has no URL")
            continue
        url = decode_strict(url_line[1])
        name = file_name(url.strip()) if url else ""
        if url is None or not url.strip().startswith(("http://", "https://")) or not name:
            yield Reject(NAME, "image", URLS, where, "malformed_line", f"not a URL: {url_line[1][:120]!r}")
        else:
            stem = name.rsplit(".", 1)[0] if "." in name else name
            source_id = safe_id(stem)
            yield ImageRef(NAME, source_id, storage.join(path, IMAGES, name), ref=make_ref(URLS, where))
        if caption_line is None:
            continue  # an image without caption: grouping rejects it as no_annotations
        text = decode_strict(caption_line[1])
        if source_id is None:
            yield Reject(NAME, "caption", CAPTIONS, where, "no_image_record", "the URL on the same line is malformed")
        elif text is None:
            yield Reject(NAME, "caption", CAPTIONS, where, "invalid_utf8", f"{caption_line[1][:120]!r}")
        else:
            yield Annotation(NAME, source_id, "caption", text, ref=make_ref(CAPTIONS, where))
