"""SBU Captions: SBU_captioned_photo_dataset_urls.txt + SBU_captioned_photo_dataset_captions.txt (line-aligned)
and a folder images/ of the downloads, each named by its URL's basename.

The sample id is the URL's basename without extension (the Flickr photo id and secret), made tar-safe. A URL
without a downloaded file still yields its image: the image stage rejects it as `missing_image`.

The two files pair by line number, so both must have the same number of lines: when they do not (a line lost or
added anywhere), every caption after that point would sit under another photo's URL; nothing is read and the build
stops with an error naming both counts (empty lines at the very end of a file are ignored: they pair nothing).
"""
from __future__ import annotations

import itertools
from typing import Iterator

from pipeline.records import Annotation, ImageRef, Reject, make_ref
from pipeline.sources import safe_id
from pipeline.textclean import decode_strict
import storage
from storage.errors import XvlmError

NAME = "sbu"
DESCRIPTION = "SBU root with SBU_captioned_photo_dataset_{urls,captions}.txt and images/ named by URL basename"
URLS = "SBU_captioned_photo_dataset_urls.txt"
CAPTIONS = "SBU_captioned_photo_dataset_captions.txt"
IMAGES = "images"


def file_name(url: str) -> str:
    """The downloader's naming rule: the URL's basename, without a query string."""
    return url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def _lines(path: str) -> int:
    """Lines of a text file, not counting empty lines at its very end."""
    last = 0
    for number, raw in storage.iter_lines(path):
        if raw:
            last = number
    return last


def iter_records(path: str) -> Iterator[ImageRef | Annotation | Reject]:
    urls_path, captions_path = storage.join(path, URLS), storage.join(path, CAPTIONS)
    for needed in (urls_path, captions_path):
        if not storage.exists(needed):
            raise XvlmError(f"{needed} does not exist: point sbu=PATH at the folder holding {URLS}, {CAPTIONS} "
                            f"and {IMAGES}/")
    urls, captions = _lines(urls_path), _lines(captions_path)
    if urls != captions:
        raise XvlmError(f"{URLS} has {urls} lines but {CAPTIONS} has {captions}: the files pair by line, so a line "
                        f"lost or added shifts every caption after it onto another photo. Nothing was read; restore "
                        f"the files of the SBU release (or drop the extra lines) and build again")
    pairs = zip(itertools.islice(storage.iter_lines(urls_path), urls),
                itertools.islice(storage.iter_lines(captions_path), captions))
    for url_line, caption_line in pairs:
        number = url_line[0]
        where = f"line {number}"
        source_id = None
        url = decode_strict(url_line[1])
        name = file_name(url.strip()) if url else ""
        if url is None or not url.strip().startswith(("http://", "https://")) or not name:
            yield Reject(NAME, "image", URLS, where, "malformed_line", f"not a URL: {url_line[1][:120]!r}")
        else:
            stem = name.rsplit(".", 1)[0] if "." in name else name
            source_id = safe_id(stem)
            yield ImageRef(NAME, source_id, storage.join(path, IMAGES, name), ref=make_ref(URLS, where))
        text = decode_strict(caption_line[1])
        if source_id is None:
            yield Reject(NAME, "caption", CAPTIONS, where, "no_image_record", "the URL on the same line is malformed")
        elif text is None:
            yield Reject(NAME, "caption", CAPTIONS, where, "invalid_utf8", f"{caption_line[1][:120]!r}")
        else:
            yield Annotation(NAME, source_id, "caption", text, ref=make_ref(CAPTIONS, where))
