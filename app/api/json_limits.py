"""Request bodies parsed as strict JSON: UTF-8, unique keys, bounded depth and numbers.

Python's ``json`` module is generous in ways a server cannot afford. It guesses UTF-16 and
UTF-32 from the first bytes, lets a later duplicate key silently win, builds integers of
thousands of digits (and raises a ``ValueError`` nobody expects past 4,300), reads ``NaN``
and ``Infinity``, and recurses until the interpreter's stack limit. :func:`parse_json`
closes each of these at parse time, so a value it returns is plain JSON that the store,
pydantic and ``pydantic_core.to_json`` all handle:

* the body is UTF-8 without a byte-order mark (anything else: 415);
* an object has each key once (400);
* nesting is at most :data:`MAX_DEPTH` containers deep (400);
* a number literal has at most :data:`MAX_NUMBER_CHARS` characters and is finite (400);
* an integer fits in 64 bits, like every integer SQLite stores (422).

Errors:
    :class:`~app.errors.UnsupportedMediaType`, :class:`~app.errors.BadRequest` and
    :class:`~app.errors.InvalidInput`, each saying which rule the body broke.
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

from app.errors import BadRequest, InvalidInput, UnsupportedMediaType

#: Containers inside containers. Real requests nest a handful deep (an agent spec with tool
#: arguments is about 6); 64 leaves room for any honest document and keeps every later
#: recursive walk (validation, serialization: pydantic_core stops at 255) far from a limit.
MAX_DEPTH = 64
#: Characters of one number literal: 100 digits is ~10^100, past any quantity a request means.
MAX_NUMBER_CHARS = 100
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def parse_json(raw: bytes) -> Any:
    """Parse a request body by the rules above.

    Errors: see the module docstring.
    """
    text = _utf8_text(raw)
    try:
        value = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_int=_integer,
            parse_float=_float,
            parse_constant=_constant,
        )
    except RecursionError:  # deeper than the interpreter's stack: far past MAX_DEPTH
        _too_deep()
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if _depth(value) > MAX_DEPTH:
        _too_deep()
    return value


def _utf8_text(raw: bytes) -> str:
    encoding = json.detect_encoding(raw)  # what json.loads(bytes) would have guessed
    if encoding != "utf-8":
        raise UnsupportedMediaType(
            f"the request body looks like {encoding}; send UTF-8 JSON without a byte-order mark",
            detail={"encoding": encoding},
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsupportedMediaType(
            f"the request body is not valid UTF-8 (byte {exc.start}); send UTF-8 JSON"
        ) from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        duplicate = _first_duplicate(pairs)
        raise BadRequest(
            f"the key {duplicate!r} appears more than once in one JSON object",
            detail={"key": duplicate},
        )
    return obj


def _first_duplicate(pairs: list[tuple[str, Any]]) -> str:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    raise AssertionError("no duplicate key")  # only called when there is one


def _check_length(literal: str) -> None:
    if len(literal) > MAX_NUMBER_CHARS:
        raise BadRequest(
            f"a number in the request body has {len(literal)} characters;"
            f" at most {MAX_NUMBER_CHARS} are accepted",
            detail={"max_number_chars": MAX_NUMBER_CHARS},
        )


def _integer(literal: str) -> int:
    _check_length(literal)
    value = int(literal)
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidInput(
            f"invalid input: the integer {literal} does not fit in 64 bits"
            f" ({INT64_MIN}..{INT64_MAX})",
            detail=[{"loc": ["body"], "msg": "integer outside 64 bits", "type": "int64_range"}],
        )
    return value


def _float(literal: str) -> float:
    _check_length(literal)
    value = float(literal)
    if not math.isfinite(value):
        raise BadRequest(f"the number {literal} is too large for a 64-bit float")
    return value


def _constant(name: str) -> NoReturn:
    raise BadRequest(f"{name} is not JSON; send a finite number or null")


def _too_deep() -> NoReturn:
    raise BadRequest(
        f"the request body is nested more than {MAX_DEPTH} levels deep",
        detail={"max_depth": MAX_DEPTH},
    )


def _depth(value: Any) -> int:
    """How many containers deep ``value`` is (a scalar: 0), level by level: only
    containers are queued, so a wide flat list costs one pass over its items."""
    depth = 0
    level = [value] if isinstance(value, dict | list) else []
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            return depth  # no need to measure the rest
        children: list[Any] = []
        for node in level:
            items = node.values() if isinstance(node, dict) else node
            children.extend(item for item in items if isinstance(item, dict | list))
        level = children
    return depth
