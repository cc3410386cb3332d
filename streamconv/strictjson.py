"""Strict JSON objects: orjson for the parse, plus the checks orjson does not make.

orjson silently keeps the last of duplicate keys; here a duplicate key anywhere in the document
is an error (checked with the standard parser's pair hook, which sees every pair).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson

from .errors import InvalidInputError

METADATA_KEY = "__metadata__"


class _DuplicateKey(ValueError):
    def __init__(self, key: str, parent: str | None = None) -> None:
        super().__init__(key)
        self.key = key
        self.parent = parent


class _Duplicated(dict[str, Any]):
    """An object with a duplicate key, handed up so its parent can name where it is."""

    def __init__(self, pairs: list[tuple[str, Any]], key: str) -> None:
        super().__init__(pairs)
        self.duplicate = key


def _pair_checker() -> tuple[Any, list[str]]:
    """A pair hook that marks objects with a duplicate key, and the list of every one found."""
    found: list[str] = []

    def check(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        for key, value in pairs:
            if isinstance(value, _Duplicated):
                raise _DuplicateKey(value.duplicate, parent=key)
        result = dict(pairs)
        if len(result) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    found.append(key)
                    return _Duplicated(pairs, key)
                seen.add(key)
        return result

    return check, found


class _NegativeZero(ValueError):
    pass


def _parse_int(text: str) -> int:
    # orjson reads the number -0 as the integer 0; safetensors' parser refuses it as a float.
    if text == "-0":
        raise _NegativeZero(text)
    return int(text)


def load_object(
    raw: bytes,
    where: str | Path,
    error: type[InvalidInputError],
    *,
    what: str,
    tensor_maps: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Parse ``raw`` as a JSON object with unique keys, or raise ``error`` naming ``where``.

    A duplicate key at the top level, or inside one of the objects named in ``tensor_maps``
    (whose keys are tensor names, like an index's ``weight_map``), is reported as that tensor.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not valid UTF-8 (byte {exc.start})", path=where) from exc
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON: {exc}", path=where) from exc
    if not isinstance(document, dict):
        raise error(f"{what} must be a JSON object, found {type(document).__name__}", path=where)
    try:
        hook, found = _pair_checker()
        json.loads(text, object_pairs_hook=hook, parse_int=_parse_int)
        if found:  # at the top level, or inside an array
            raise _DuplicateKey(found[0])
    except _DuplicateKey as exc:
        if exc.parent == METADATA_KEY or (exc.parent is None and exc.key == METADATA_KEY):
            inner = "" if exc.parent is None else f": {exc.key!r}"
            raise error(f"duplicate key in {what} {METADATA_KEY}{inner}", path=where) from exc
        if exc.parent is None or exc.parent in tensor_maps:  # the duplicate is a tensor name
            raise error(f"duplicate key in {what}", path=where, tensor=exc.key) from exc
        raise error(f"duplicate key in {what}: {exc.key!r}", path=where, tensor=exc.parent) from exc
    except _NegativeZero as exc:
        raise error(f"{what} holds the number -0, which is not an integer", path=where) from exc
    except RecursionError as exc:
        raise error(f"{what} JSON is nested too deeply", path=where) from exc
    return document
