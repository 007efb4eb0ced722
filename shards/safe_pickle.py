"""Reading pickles that hold data only (RefCOCO's `refs(unc).p` and friends) without ever running code from them.

A pickle is a program: its GLOBAL / STACK_GLOBAL / INST / OBJ / EXT opcodes import any callable (`os.system`) and
REDUCE / NEWOBJ / BUILD call it. Every one of those paths asks `Unpickler.find_class` for the callable first, so an
unpickler whose `find_class` refuses everything can only build what the opcodes build by themselves: dicts, lists,
tuples, sets, strings, bytes, numbers, booleans and None. Persistent ids are refused too. What comes back is checked
once more, so a future opcode that builds something else would be refused as well.

Standard library only: the pipeline (RefCOCO pretraining refs) and the trainer (RefCOCO+ fine-tuning refs) both
read refs files with `load_plain`, and neither may import the other.
"""
from __future__ import annotations

import io
import pickle
from typing import BinaryIO

PLAIN_SCALARS = (str, bytes, bytearray, int, float, complex, bool, type(None))
PLAIN_CONTAINERS = (dict, list, tuple, set, frozenset)
MAX_DEPTH = 200                 # deeper nesting than any data file needs; keeps the check's recursion bounded


class UnsafePickleError(ValueError):
    """The pickle holds (or asks for) something other than plain containers and scalars, or is not a pickle."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle's hook
        raise UnsafePickleError(f"it asks for the global {module}.{name} (a class or function: loading it could run "
                                f"code); only plain containers and scalars are allowed")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"it holds a persistent id ({pid!r:.60}); only plain containers and scalars are "
                                f"allowed")


def _check_plain(value: object) -> None:
    """Every object reachable from `value` is a plain container or scalar. Each container is visited once (a
    pickle can share one list many times over, 2**60 paths through 60 small lists), depth is bounded."""
    stack: list[tuple[object, int]] = [(value, 0)]
    seen: set[int] = set()
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind in PLAIN_SCALARS:
            continue
        if kind not in PLAIN_CONTAINERS:
            raise UnsafePickleError(f"it holds a {kind.__module__}.{kind.__qualname__}; only plain containers and "
                                    f"scalars are allowed")
        if id(item) in seen:
            continue
        seen.add(id(item))
        if depth >= MAX_DEPTH:
            raise UnsafePickleError(f"it nests containers more than {MAX_DEPTH} deep")
        children = [v for pair in item.items() for v in pair] if kind is dict else list(item)  # type: ignore[union-attr]
        stack.extend((child, depth + 1) for child in children)


def load_plain(source: bytes | BinaryIO, what: str = "pickle", encoding: str = "utf-8",
               errors: str = "surrogateescape") -> object:
    """The data of a pickle that may only hold plain containers and scalars (any protocol, 0 to 5).

    `what` names the file in errors. Python 2 pickles' byte strings are decoded with `encoding` / `errors` (by
    default UTF-8, with undecodable bytes kept as lone surrogates so the caller can reject just those texts).
    Raises UnsafePickleError naming what was refused (a class, a function, a persistent id) or why the bytes are
    not a pickle; nothing from the file is ever imported or called."""
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        value = _PlainUnpickler(stream, encoding=encoding, errors=errors).load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{what} refused: {err}") from None
    except RecursionError:
        raise UnsafePickleError(f"{what} refused: it nests too deep to read") from None
    except Exception as err:  # noqa: BLE001 - any other failure means the bytes are not a plain-data pickle
        raise UnsafePickleError(f"{what} is not a readable plain-data pickle ({type(err).__name__}: "
                                f"{str(err)[:200]})") from None
    try:
        _check_plain(value)
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{what} refused: {err}") from None
    return value
