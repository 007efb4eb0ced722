"""shards/safe_pickle.py: plain-data pickles load in every protocol; anything that would import or call code is
refused with an error naming it, and nothing from the file ever runs."""
from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools

import pytest

from shards.safe_pickle import UnsafePickleError, load_plain

REFS_LIKE = [{"image_id": 581857, "split": "train", "ann_id": 1719310, "ref_id": 0, "category_id": 1,
              "file_name": "COCO_train2014_000000581857_16.jpg", "sent_ids": [0, 1, 2],
              "sentences": [{"tokens": ["the", "lady"], "raw": "THE LADY.", "sent_id": 0, "sent": "the lady"}]},
             {"nested": ((1, 2.5, None, True), [b"bytes", "t\u00e9xt"], -2**70)}]


class Marker:
    """A class whose instance must never be rebuilt from a data file."""
    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_loads_in_every_protocol(protocol):
    data = REFS_LIKE if protocol >= 3 else [REFS_LIKE[0]]   # bytes need a global below protocol 3
    assert load_plain(pickle.dumps(data, protocol=protocol)) == data
    assert load_plain(io.BytesIO(pickle.dumps(data, protocol=protocol))) == data   # a file works too


def test_python2_byte_strings_decode_as_utf8_and_bad_bytes_stay_detectable():
    # Python 2 pickles write str as SHORT_BINSTRING: here 'caf\xc3\xa9' (UTF-8) and a latin-1 byte.
    raw = b"\x80\x02]q\x00(U\x05caf\xc3\xa9q\x01U\x04caf\xe9q\x02e."
    good, bad = load_plain(raw)
    assert good == "caf\u00e9"
    with pytest.raises(UnicodeEncodeError):
        bad.encode("utf-8")      # a lone surrogate: the caller rejects just this text


def _reduce_payload(protocol: int) -> bytes:
    class Evil:
        def __reduce__(self):
            return os.system, ("touch /tmp/xvlm-pwned",)
    return pickle.dumps({"refs": [Evil()]}, protocol=protocol)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_os_system_reduce_is_refused_and_never_runs(protocol, tmp_path):
    payload = _reduce_payload(protocol)
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p refused: .*global (posix|os)\.system"):
        load_plain(payload, what="refs(unc).p")
    assert not os.path.exists("/tmp/xvlm-pwned")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_class_instances_are_refused(protocol):
    for value in (Marker(), [1, {"a": Marker()}], collections.OrderedDict(a=1), {1, 2} if protocol < 4 else None):
        if value is None:
            continue
        with pytest.raises(UnsafePickleError, match="global"):
            load_plain(pickle.dumps(value, protocol=protocol))


def test_hand_written_hostile_opcodes_are_refused():
    hostile = {
        # protocol 0 GLOBAL + REDUCE: os.system('id')
        "global_reduce": b"cos\nsystem\n(S'id'\ntR.",
        # a global nested deep inside plain containers
        "nested_global": b"(lp0\n(dp1\nS'a'\n(lp2\ncbuiltins\neval\np3\nasS'b'\nI1\nsa.",
        # INST opcode (protocol 0 class instance)
        "inst": b"(S'id'\nios\nsystem\n.",
        # STACK_GLOBAL (protocol 4)
        "stack_global": b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x02id\x85R.",
        # persistent id
        "persid": b"Pabc\n.",
        # EXT1: the extension registry maps codes to globals
        "ext1": b"\x80\x02\x82\x01.",
        # BUILD on a plain dict (no class involved): not a plain-data pickle either
        "build_on_dict": b"\x80\x02}q\x00}q\x01U\x01aK\x01sb.",
    }
    for name, payload in hostile.items():
        with pytest.raises(UnsafePickleError) as err:
            load_plain(payload, what=name)
        assert name in str(err.value), name
    assert "global builtins.eval" in _message(hostile["nested_global"])
    assert "persistent id" in _message(hostile["persid"])


def _message(payload: bytes) -> str:
    with pytest.raises(UnsafePickleError) as err:
        load_plain(payload)
    return str(err.value)


def test_not_a_pickle_and_truncated_files_are_clear_errors():
    good = pickle.dumps(REFS_LIKE, protocol=2)
    for payload in (b"", b"{\"json\": true}", good[: len(good) // 2], b"\x80\x09garbage"):
        with pytest.raises(UnsafePickleError, match="not a readable plain-data pickle"):
            load_plain(payload, what="refs(umd).p")


def test_shared_containers_are_walked_once_and_depth_is_bounded():
    # 64 levels of a list holding the previous level twice: 2**64 paths, 64 objects.
    level: list = [1]
    for _ in range(64):
        level = [level, level]
    assert load_plain(pickle.dumps(level, protocol=4))[0][0][0] is not None
    deep = b"(" * 500 + b"]" + b"l" * 500 + b"."      # [[[...[]...]]], 501 lists deep (too deep for pickle.dumps)
    with pytest.raises(UnsafePickleError, match="deep"):
        load_plain(deep)


def test_every_opcode_that_imports_goes_through_find_class():
    """The guarantee rests on this: the only opcodes that obtain a callable are the ones that look it up by name."""
    lookups = {"GLOBAL", "STACK_GLOBAL", "INST", "EXT1", "EXT2", "EXT4"}
    callers = {"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "BUILD"}
    names = {op.name for op in pickletools.opcodes}
    assert lookups | callers <= names
    # OBJ takes its class from the stack, which only a lookup opcode can have put there.
    hostile = b"(cos\nsystem\nS'id'\no."
    with pytest.raises(UnsafePickleError, match="os.system"):
        load_plain(hostile)
