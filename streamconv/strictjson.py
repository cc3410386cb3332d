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


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def load_object(
    raw: bytes,
    where: str | Path,
    error: type[InvalidInputError],
    *,
    what: str,
) -> dict[str, Any]:
    """Parse ``raw`` as a JSON object with unique keys, or raise ``error`` naming ``where``."""
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
        json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as exc:
        raise error(f"duplicate key in {what}", path=where, tensor=exc.key) from exc
    except RecursionError as exc:
        raise error(f"{what} JSON is nested too deeply", path=where) from exc
    return document
