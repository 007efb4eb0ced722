"""Text side of a training sample, as X-VLM does it: pre_caption, left/right swap for flips (ours, off by default),
WordPiece ids with [CLS] and padding, and MLM masking with whole-word 2-3 token spans — every random draw from a
numpy Generator. Our variants of X-VLM's text handling are named modes (docs/fidelity.md).
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np

from storage.errors import XvlmError

if TYPE_CHECKING:
    from shards.loader_config import LoaderConfig

IGNORE_INDEX = -100          # masked_ids padding, ignored by cross-entropy
PAD_ID = 0                   # BERT's [PAD]; docs/batches.md fixes padding to 0


class EmptyText(ValueError):
    """pre_caption left nothing of a text (X-VLM drops such samples; our callers count a skip)."""


# ---------------------------------------------------------------- pre_caption

PRE_CAPTION_MODES = ("xvlm", "spaces")
_PUNCT = re.compile(r"[,.'!?\"()*#:;~]")
_WHITESPACE_RUNS = re.compile(r"\s{2,}")
_SPACES = re.compile(r"\s+")
_SURROGATES = re.compile("[\ud800-\udfff]")   # lone halves of a UTF-16 pair: JSON's "\ud800" gives one


def without_surrogates(text: str) -> str:
    """The text without lone surrogates, which are not characters: the tokenizer (like any UTF-8 encoder) fails
    on them, so one such caption would stop training at the same sample on every resume."""
    return text if text.isascii() else _SURROGATES.sub("", text)


def pre_caption(text: str, max_words: int, mode: str = "xvlm") -> str:
    """X-VLM's pre_caption (dataset/utils.py): lowercase; the characters , . ' ! ? " ( ) * # : ; ~ are deleted
    ("man's" -> "mans"); - and / become spaces; <person> becomes person; runs of two or more whitespace
    characters become one space (a single tab or newline stays, as there; the tokenizer splits on it anyway);
    strip; the first `max_words` space-separated words. Raises EmptyText when nothing is left. Lone surrogates are
    dropped first (ours: they crash the tokenizer).

    mode "spaces" (ours before issue 17): the punctuation becomes spaces ("man s") and all whitespace collapses."""
    lowered = without_surrogates(text).lower()
    if mode == "xvlm":
        caption = _PUNCT.sub("", lowered).replace("-", " ").replace("/", " ").replace("<person>", "person")
        caption = _WHITESPACE_RUNS.sub(" ", caption).rstrip("\n").strip(" ")
    elif mode == "spaces":
        caption = _PUNCT.sub(" ", lowered).replace("-", " ").replace("/", " ").replace("<person>", "person")
        caption = _SPACES.sub(" ", caption).strip()
    else:
        raise XvlmError(f"pre_caption mode must be one of {PRE_CAPTION_MODES}, got {mode!r}")
    caption = " ".join(caption.split(" ")[:max_words])
    if not caption:
        raise EmptyText(f"text is empty after pre_caption: {text[:80]!r}")
    return caption


# ---------------------------------------------------------------- left/right swap

_SWAP = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost",
         "lefthand": "righthand", "righthand": "lefthand"}
_SWAP_RE = re.compile(r"\b(" + "|".join(sorted(_SWAP, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def _swap_word(match: re.Match) -> str:
    word = match.group(0)
    out = _SWAP[word.lower()]
    if word.isupper():
        return out.upper()
    return out.capitalize() if word[0].isupper() else out


def swap_left_right(text: str) -> str:
    """The text as seen in the mirrored image: whole words left<->right, leftmost<->rightmost ("left-hand" and
    "top-left" follow, since '-' is a word boundary). Words merely containing them ("leftover") are kept."""
    return _SWAP_RE.sub(_swap_word, text)


# ---------------------------------------------------------------- tokenizer

@dataclass(frozen=True)
class Vocab:
    """The tokenizer plus the per-id tables masking needs."""
    tokenizer: object
    cls_id: int
    mask_id: int
    continuation: np.ndarray     # bool [vocab]: the piece is a "##" continuation of the previous word
    random_ids: np.ndarray       # ids the 10% "random token" case draws from in "whole_word" masking (no special ones)
    size: int                    # ids 0..size-1: X-VLM's random token is any of them, special tokens included


@functools.lru_cache(maxsize=4)
def load_vocab(folder: str) -> Vocab:
    """Load a local BERT WordPiece tokenizer folder (never the network) and its masking tables; cached."""
    if not folder or not os.path.isdir(folder):
        raise XvlmError(f"tokenizer folder {folder!r} does not exist; set the loader's `tokenizer` to a local "
                        "BERT tokenizer folder (vocab.txt or tokenizer.json), e.g. OUT/tokenizer of xvlm sample-data")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in ("vocab.txt", "tokenizer.json")):
        raise XvlmError(f"tokenizer folder {folder!r} holds neither vocab.txt nor tokenizer.json; point the "
                        "loader's `tokenizer` at a BERT WordPiece tokenizer folder")
    # One short text per call gains nothing from the Rust thread pool, and a pool used before DataLoader
    # workers fork makes `tokenizers` disable itself with a warning in every worker.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import BertTokenizerFast
    try:
        tok = BertTokenizerFast.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken folder
        raise XvlmError(f"cannot load a BERT tokenizer from {folder!r}: {exc}") from exc
    if tok.cls_token_id is None or tok.mask_token_id is None:
        raise XvlmError(f"tokenizer in {folder!r} has no [CLS] or [MASK] token")
    # token_ids() calls the Rust tokenizer directly: a tokenizer.json may carry padding / truncation settings
    # (sentence-transformers folders do) that the Python wrapper would override; switch them off here.
    tok.backend_tokenizer.no_padding()
    tok.backend_tokenizer.no_truncation()
    if tok.pad_token_id not in (None, PAD_ID):
        raise XvlmError(f"tokenizer in {folder!r} pads with id {tok.pad_token_id}; the batch layout needs 0")
    size = len(tok)
    pieces = tok.convert_ids_to_tokens(list(range(size)))
    continuation = np.array([p is not None and p.startswith("##") for p in pieces], dtype=bool)
    special = set(tok.all_special_ids)
    random_ids = np.array([i for i in range(size) if i not in special], dtype=np.int64)
    return Vocab(tok, int(tok.cls_token_id), int(tok.mask_token_id), continuation, random_ids, size)


def token_ids(text: str, vocab: Vocab, max_tokens: int) -> list[int]:
    """[CLS] + the first max_tokens-1 WordPiece ids of an already pre_caption'd text (no [SEP])."""
    # The Rust tokenizer directly: same ids as the Python wrapper's __call__, 3x cheaper per text row.
    ids = vocab.tokenizer.backend_tokenizer.encode(without_surrogates(text), add_special_tokens=False).ids
    if not ids:
        raise EmptyText(f"text has no WordPiece tokens: {text[:80]!r}")
    return [vocab.cls_id] + list(ids[: max_tokens - 1])


# ---------------------------------------------------------------- masking

MASKING_MODES = ("xvlm", "whole_word")


def choose_masked_positions(ids: list[int], vocab: Vocab, rng: np.random.Generator, *, mask_prob: float,
                            max_masks: int, skipgram_prb: float, skipgram_size: int,
                            masking: str = "xvlm") -> list[int]:
    """The positions to mask, as X-VLM's TextMaskingGenerator (dataset/pretrain_dataset.py) chooses them:
    n = min(max_masks, max(1, round(mask_prob * len))) with len counting [CLS]; candidate positions in random order;
    for each, with probability skipgram_prb a span of 2..skipgram_size tokens, else one token, widened to whole
    words (`##` pieces go with their word). Returns sorted positions; [CLS] (position 0) never.

    masking "xvlm": every widened span is taken whole, so the set can overshoot n; it is then cut to a random n of
    its positions (which can split a word), as the official code does.
    masking "whole_word" (ours before issue 17): a span is shortened to the whole words that still fit n, so masks
    are always whole words; only a text whose every word is longer than n gets a partial word (its first n pieces)."""
    if masking not in MASKING_MODES:
        raise XvlmError(f"masking must be one of {MASKING_MODES}, got {masking!r}")
    length = len(ids)
    n_pred = min(max_masks, max(1, int(round(length * mask_prob))))
    cont = vocab.continuation[ids].tolist()     # plain bools: indexed per token below
    last = length - 1

    def word_start(pos: int) -> int:
        while pos > 1 and cont[pos]:
            pos -= 1
        return pos

    def word_end(pos: int) -> int:          # exclusive end of the word that contains pos
        pos += 1
        while pos <= last and cont[pos]:
            pos += 1
        return pos

    masked: set[int] = set()
    for pos in (rng.permutation(last) + 1).tolist():
        if len(masked) >= n_pred:
            break
        if pos in masked:
            continue
        span = 1
        if skipgram_prb > 0 and skipgram_size >= 2 and rng.random() < skipgram_prb:
            span = int(rng.integers(2, skipgram_size + 1))
        start = word_start(pos)
        end = word_end(min(pos + span, length) - 1)
        if masking == "xvlm":
            masked.update(range(start, end))
            continue
        # whole words in [start, end) that fit the remaining budget, from the left
        words: list[tuple[int, int]] = []
        p = start
        while p < end:
            q = word_end(p)
            words.append((p, q))
            p = q
        for a, b in words:
            fresh = [i for i in range(a, b) if i not in masked]
            if len(masked) + len(fresh) > n_pred:
                break
            masked.update(fresh)
    if masking == "xvlm":
        chosen = sorted(masked)
        if len(chosen) > n_pred:
            chosen = sorted(rng.permutation(chosen)[:n_pred].tolist())
        return chosen
    if not masked:
        # every word is longer than n_pred pieces: mask the first n_pred pieces of a random word
        heads = [i for i in range(1, length) if not cont[i]] or [1]
        head = heads[int(rng.integers(len(heads)))]
        masked.update(range(head, min(head + n_pred, length)))
    return sorted(masked)


@dataclass
class EncodedText:
    """One text row of docs/batches.md, as numpy arrays."""
    text_ids: np.ndarray          # int64 [T]
    text_atts: np.ndarray         # int64 [T]
    text_ids_masked: np.ndarray   # int64 [T]
    masked_pos: np.ndarray        # int64 [M], padded 0
    masked_ids: np.ndarray        # int64 [M], padded -100


def encode(text: str, vocab: Vocab, rng: np.random.Generator, *, max_tokens: int, max_masks: int,
           mask_prob: float, skipgram_prb: float, skipgram_size: int, masking: str = "xvlm") -> EncodedText:
    """Token ids, attention mask and MLM masking of one pre_caption'd text: each chosen position becomes [MASK]
    with p=0.8, a random id with p=0.1, stays with p=0.1 (X-VLM's draw order). The random id is any id of the
    vocabulary with masking "xvlm" (as X-VLM: special tokens included), a non-special one with "whole_word"."""
    return encode_ids(token_ids(text, vocab, max_tokens), vocab, rng, max_tokens=max_tokens, max_masks=max_masks,
                      mask_prob=mask_prob, skipgram_prb=skipgram_prb, skipgram_size=skipgram_size, masking=masking)


def encode_ids(ids: list[int], vocab: Vocab, rng: np.random.Generator, *, max_tokens: int, max_masks: int,
               mask_prob: float, skipgram_prb: float, skipgram_size: int, masking: str = "xvlm") -> EncodedText:
    """encode() of ids from token_ids(): padding, attention mask and MLM masking."""
    rows = encode_rows([ids], vocab, rng, max_tokens=max_tokens, max_masks=max_masks, mask_prob=mask_prob,
                       skipgram_prb=skipgram_prb, skipgram_size=skipgram_size, masking=masking)
    return EncodedText(**{name: value[0] for name, value in rows.items()})


def encode_rows(rows: list[list[int]], vocab: Vocab, rng: np.random.Generator, *, max_tokens: int, max_masks: int,
                mask_prob: float, skipgram_prb: float, skipgram_size: int,
                masking: str = "xvlm") -> dict[str, np.ndarray]:
    """encode_ids() of several id lists in order (the same draws), written into [K, T] / [K, M] arrays named as
    EncodedText's fields: one allocation per field for the whole sample instead of five per row."""
    k = len(rows)
    out = {"text_ids": np.full((k, max_tokens), PAD_ID, np.int64), "text_atts": np.zeros((k, max_tokens), np.int64),
           "text_ids_masked": np.full((k, max_tokens), PAD_ID, np.int64),
           "masked_pos": np.zeros((k, max_masks), np.int64),
           "masked_ids": np.full((k, max_masks), IGNORE_INDEX, np.int64)}
    for r, ids in enumerate(rows):
        positions = choose_masked_positions(ids, vocab, rng, mask_prob=mask_prob, max_masks=max_masks,
                                            skipgram_prb=skipgram_prb, skipgram_size=skipgram_size, masking=masking)
        masked = list(ids)
        for pos in positions:
            if rng.random() < 0.8:
                masked[pos] = vocab.mask_id
            elif rng.random() < 0.5:
                if masking == "xvlm":
                    masked[pos] = int(rng.integers(vocab.size))
                else:
                    masked[pos] = int(vocab.random_ids[rng.integers(len(vocab.random_ids))])
        n, m = len(ids), len(positions)
        out["text_ids"][r, :n] = ids
        out["text_atts"][r, :n] = 1
        out["text_ids_masked"][r, :n] = masked
        out["masked_pos"][r, :m] = positions
        out["masked_ids"][r, :m] = [ids[p] for p in positions]
    return out


def encode_with(ids: list[int], vocab: Vocab, rng: np.random.Generator, config: "LoaderConfig") -> EncodedText:
    """encode_ids() with the sizes of a LoaderConfig."""
    return encode_ids(ids, vocab, rng, max_tokens=config.max_tokens, max_masks=config.max_masks,
                      mask_prob=config.mask_prob, skipgram_prb=config.skipgram_prb, skipgram_size=config.skipgram_size,
                      masking=config.mlm_masking)


def encode_rows_with(rows: list[list[int]], vocab: Vocab, rng: np.random.Generator,
                     config: "LoaderConfig") -> dict[str, np.ndarray]:
    """encode_rows() with the sizes of a LoaderConfig."""
    return encode_rows(rows, vocab, rng, max_tokens=config.max_tokens, max_masks=config.max_masks,
                       mask_prob=config.mask_prob, skipgram_prb=config.skipgram_prb,
                       skipgram_size=config.skipgram_size, masking=config.mlm_masking)
