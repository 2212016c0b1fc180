"""Where settings come from: each source read into a *layer*, the layers merged per field.

A layer maps key paths — ``("port",)``, ``("llm", "model")`` — to an :class:`Entry`: the
value and its *origin*, the words an error uses to point at it (``env TRELLIS_PORT='abc'``,
``config file x.toml: port``, ``--port 'abc'``). Merging keeps, for every path, the entry
of the last layer that set it, so a table is merged key by key, never replaced whole. The
merged values are validated once, by the settings model; each validation error is traced
back to its entry by the longest key path that is a prefix of the error's location.

A *map of tables* (``llm.providers``: a ``dict`` of models) has keys chosen by the operator:
``[llm.providers.NAME]`` in TOML, ``TRELLIS_LLM__PROVIDERS__NAME__KEY`` in the environment
(``NAME`` lower-cased). Its entries are merged key by key like any table; it has no flags.

This module knows nothing of the concrete settings: ``app/settings.py`` passes its model.

Errors:
    :class:`SettingsError` (a ``ValueError``) for an unreadable file and, through
    :func:`describe_errors`, for values the model refuses.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

KeyPath = tuple[str, ...]

# Words that mark a name as holding a secret: such a value is never repeated in a message.
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


class SettingsError(ValueError):
    """A setting is unknown or has a bad value; the message names every offending key."""


@dataclass(frozen=True)
class Entry:
    """One value of one source, and how an error names it."""

    value: Any
    origin: str


Layer = dict[KeyPath, Entry]


def looks_secret(name: str) -> bool:
    """Whether ``name`` (a variable, flag or key) looks like it holds a secret."""
    upper = name.upper()
    return any(word in upper for word in SECRET_WORDS)


def _shown(name: str, value: Any, *, separator: str) -> str:
    """``name`` and the value's repr, or ``name`` alone when the name looks secret."""
    if looks_secret(name):
        return f"{name} (value not shown)"
    return f"{name}{separator}{value!r}"


# -- sources ---------------------------------------------------------------------------


def toml_layer(path: Path) -> Layer:
    """Every key of the TOML file at ``path``, tables descended into.

    Errors:
        :class:`SettingsError` when the file cannot be read or is not TOML.
    """
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    return {
        key: Entry(value, f"config file {path}: {'.'.join(key)}")
        for key, value in _leaves(document, ())
    }


def environ_layer(
    environ: Mapping[str, str], model: type[BaseModel], *, prefix: str, skip: set[str]
) -> tuple[Layer, list[str]]:
    """The ``prefix``-ed variables of ``environ`` that name a field of ``model``.

    ``PREFIX_NAME`` sets a field, ``PREFIX_TABLE__KEY`` a key of a table,
    ``PREFIX_TABLE__MAP__ENTRY__KEY`` a key of an entry of a map of tables; a list field
    takes a JSON array. Any other ``PREFIX_*`` variable (but those in ``skip``) is left out,
    and described in the returned warnings, with the closest real name when there is one.
    """
    known = {prefix + "__".join(key).upper(): (key, field) for key, field in leaf_fields(model)}
    maps = {
        prefix + "__".join(key).upper() + "__": (key, table) for key, table in map_tables(model)
    }
    layer: Layer = {}
    notes: list[str] = []
    for name, text in environ.items():
        if not name.startswith(prefix) or name in skip:
            continue
        found = known.get(name.upper()) or _map_entry(name.upper(), maps)
        if found is None:
            notes.append(_unknown_variable(name, list(known)))
            continue
        key, field = found
        value = _json_list(text) if get_origin(field.annotation) is list else text
        layer[key] = Entry(value, _shown(f"env {name}", text, separator="="))
    return layer, notes


def overrides_layer(overrides: Mapping[str, Any]) -> Layer:
    """Keyword overrides (the command line): nested mappings and models descended into.

    A ``None`` value is no override. Errors name an override as its flag: ``--llm-model``.
    """
    layer: Layer = {}
    for key, value in _leaves(overrides, ()):
        if value is not None:
            layer[key] = Entry(value, _shown(flag_name(key), value, separator=" "))
    return layer


def leaf_fields(model: type[BaseModel], key: KeyPath = ()) -> Iterator[tuple[KeyPath, FieldInfo]]:
    """Every setting of ``model`` with its key path; tables (nested models) descended into,
    maps of tables (see :func:`map_tables`) left out."""
    for name, field in model.model_fields.items():
        table = _table(model, name)
        if table is not None:
            yield from leaf_fields(table, (*key, name))
        elif _map_value(model, name) is None:
            yield (*key, name), field


def map_tables(
    model: type[BaseModel], key: KeyPath = ()
) -> Iterator[tuple[KeyPath, type[BaseModel]]]:
    """Every map of tables of ``model`` (a ``dict[str, SomeModel]`` field, such as
    ``llm.providers``) with its key path and the model of its entries."""
    for name in model.model_fields:
        table = _table(model, name)
        if table is not None:
            yield from map_tables(table, (*key, name))
        elif (entry := _map_value(model, name)) is not None:
            yield (*key, name), entry


def flag_name(key: KeyPath) -> str:
    """The command-line flag of a setting: ``("llm", "base_url")`` -> ``--llm-base-url``."""
    return "--" + "-".join(key).replace("_", "-")


# -- merging and errors ----------------------------------------------------------------


def merge_layers(layers: Sequence[Layer]) -> tuple[dict[str, Any], dict[KeyPath, str]]:
    """Merge per key path, later layers winning; return nested values and their origins.

    Setting a path drops what lower layers set at that path, above it or below it: a later
    ``llm = "x"`` replaces the whole table, a later ``llm.model`` only that key.
    """
    merged: Layer = {}
    for layer in layers:
        for key, entry in layer.items():
            for old in [k for k in merged if k[: len(key)] == key or key[: len(k)] == k]:
                del merged[old]
            merged[key] = entry
    values: dict[str, Any] = {}
    for key, entry in merged.items():
        node = values
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = entry.value
    return values, {key: entry.origin for key, entry in merged.items()}


def describe_errors(
    exc: ValidationError, origins: Mapping[KeyPath, str], model: type[BaseModel]
) -> str:
    """One line naming, for each error, its source and key and what is wrong."""
    lines = []
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown setting" + _did_you_mean(loc[-1], _field_names(model, loc[:-1]))
        lines.append(f"{_where(loc, origins)}: {message}")
    return "; ".join(lines)


def _where(loc: KeyPath, origins: Mapping[KeyPath, str]) -> str:
    for size in range(len(loc), 0, -1):
        origin = origins.get(loc[:size])
        if origin is not None:
            rest = ".".join(loc[size:])
            return f"{origin}: {rest}" if rest else origin
    # A key nobody set (a required one): name a source that set its table, if any did.
    table = loc[:-1]
    beside = [origin for key, origin in origins.items() if table and key[: len(table)] == table]
    where = ".".join(loc) or "settings"
    return f"{where} (a table set by {beside[0]})" if beside else where


# -- helpers ---------------------------------------------------------------------------


def _leaves(node: Any, key: KeyPath) -> Iterator[tuple[KeyPath, Any]]:
    if isinstance(node, BaseModel):
        node = node.model_dump(exclude_unset=True)
    if isinstance(node, Mapping):  # an empty table sets nothing
        for name, value in node.items():
            yield from _leaves(value, (*key, str(name)))
    else:
        yield key, node


def _table(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    field = model.model_fields.get(name)
    annotation = field.annotation if field is not None else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _map_value(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The entries' model when field ``name`` is a map of tables (``dict[str, Model]``)."""
    field = model.model_fields.get(name)
    if field is None or get_origin(field.annotation) is not dict:
        return None
    value = get_args(field.annotation)[-1]
    return value if isinstance(value, type) and issubclass(value, BaseModel) else None


def _map_entry(
    name: str, maps: Mapping[str, tuple[KeyPath, type[BaseModel]]]
) -> tuple[KeyPath, FieldInfo] | None:
    """``PREFIX_MAP__ENTRY__KEY`` as the key path ``(*map, "entry", "key")`` and its field."""
    for start, (key, table) in maps.items():
        entry, separator, field_name = name.removeprefix(start).partition("__")
        field = table.model_fields.get(field_name.lower())
        if name.startswith(start) and entry and separator and field is not None:
            return (*key, entry.lower(), field_name.lower()), field
    return None


def _field_names(model: type[BaseModel], key: KeyPath) -> list[str]:
    """The field names of the (nested) model at ``key``; none if it is not a table. An
    entry of a map of tables (``llm.providers.NAME``) is a table of the map's model."""
    current: type[BaseModel] | None = model
    in_map = False
    for part in key:
        if current is None:
            break
        if in_map:
            in_map = False  # ``part`` names an entry: ``current`` is already its model
            continue
        table, entry = _table(current, part), _map_value(current, part)
        current, in_map = (entry, True) if entry is not None else (table, False)
    return list(current.model_fields) if current is not None and not in_map else []


def _json_list(text: str) -> Any:
    """A JSON array as a list; anything else as the text (validation then names it)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, list) else text


def _unknown_variable(name: str, known: list[str]) -> str:
    hint = _did_you_mean(name.upper(), known)
    return f"environment variable {name} is not a Trellis setting; ignored{hint}"


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""
