"""Conceptual 12M: the released cc12m.tsv (url TAB caption, no header) + images/ROW.jpg, or img2dataset output.

Read by the Conceptual Captions code (pipeline/sources/cc.py), record by record with the csv module's rules, as
CC3M: only the column order differs (CC12M puts the URL first). ROW counts TSV records from 0, as img2dataset
numbers them; img2dataset's webdataset output (NNNNN.tar + NNNNN.parquet) is read member by member, never extracted.
"""
from __future__ import annotations

from typing import Iterator

from pipeline.records import Annotation, ImageRef, Reject
from pipeline.sources.cc import Release, iter_release

NAME = "cc12m"
DESCRIPTION = "img2dataset webdataset output (NNNNN.tar + NNNNN.parquet) or cc12m.tsv (url TAB caption) + images/ROW.jpg"
TRAIN_TSV = "cc12m.tsv"
CC12M = Release(NAME, TRAIN_TSV, url_column=0)


def sample_key(source_id: str) -> str:
    # img2dataset keys and TSV rows both padded to 9 digits, so they sort by number (12.4M rows fit).
    return f"cc12m-{source_id.zfill(9)}" if source_id.isdigit() else f"cc12m-{source_id}"


def iter_records(path: str) -> Iterator[ImageRef | Annotation | Reject]:
    yield from iter_release(path, CC12M)
