"""A tiny declarative field spec, shared by messages, op arguments, cookies and params.

Wire data arrives as plain msgpack values (str, int, float, bool, bytes, list,
dict, None). A :class:`FieldSpec` says what one field must look like; a
:func:`check_fields` call turns an untrusted map into a dict with defaults
filled, or raises the caller's error class with a message that names where the
map came from and the field ("start: field 'paused' must be a bool").
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ferry.errors import FerryError

__all__ = ["FieldSpec", "check_fields", "check_value", "short_repr"]

_KIND_NAMES: dict[type, str] = {
    str: "a string",
    int: "an int",
    float: "a number",
    bool: "a bool",
    bytes: "bytes",
    dict: "a map",
    list: "a list",
}

# Error messages quote peer-supplied values; a hostile peer must not be able to
# make our error reply larger than the frame that caused it.
_REPR_LIMIT = 60


def short_repr(value: Any) -> str:
    """Return ``repr(value)`` cut to a length fit for an error message."""
    text = repr(value)
    if len(text) > _REPR_LIMIT:
        return text[: _REPR_LIMIT - 3] + "..."
    return text


@dataclass(frozen=True)
class FieldSpec:
    """What one field of a wire map must look like.

    ``kind`` is one of str, int, float, bool, bytes, dict, list. ``float``
    fields accept ints (converted) but never bools or non-finite numbers;
    ``int`` fields never accept bools. ``ge``/``gt``/``le`` bound numbers;
    ``min_len``/``max_len`` bound the length of strings, bytes and lists;
    ``choices`` restricts the value; ``items`` checks each element of a list;
    ``nullable`` also allows None. A missing optional field gets a copy of
    ``default``.
    """

    kind: type
    required: bool = False
    default: Any = None
    nullable: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    min_len: int | None = None
    max_len: int | None = None
    choices: frozenset[Any] | None = None
    items: FieldSpec | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KIND_NAMES:
            kinds = sorted(k.__name__ for k in _KIND_NAMES)
            raise TypeError(f"FieldSpec kind must be one of {kinds}")

    def describe(self) -> str:
        """Return the expected type in words ("a string or null")."""
        name = _KIND_NAMES[self.kind]
        return f"{name} or null" if self.nullable else name


def _fail(
    error: type[FerryError], where: str, name: str, problem: str, details: Mapping[str, Any]
) -> FerryError:
    return error(f"{where}: field {name!r} {problem}", field=name, **details)


def check_value(
    where: str,
    name: str,
    spec: FieldSpec,
    value: Any,
    error: type[FerryError],
    details: Mapping[str, Any] | None = None,
) -> Any:
    """Check one present value against ``spec`` and return it (floats normalised).

    Raises ``error`` (a :class:`FerryError` subclass chosen by the caller) whose
    message names ``where`` and ``name`` and whose details carry ``field`` plus
    ``details``.
    """
    extra = details or {}
    if value is None:
        if spec.nullable:
            return None
        raise _fail(error, where, name, f"must be {spec.describe()}", extra)
    kind = spec.kind
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(error, where, name, f"must be {spec.describe()}", extra)
        try:
            value = float(value)
        except OverflowError:
            raise _fail(error, where, name, "is out of range", extra) from None
        if not math.isfinite(value):
            raise _fail(error, where, name, "must be a finite number", extra)
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(error, where, name, f"must be {spec.describe()}", extra)
    elif not isinstance(value, kind):
        raise _fail(error, where, name, f"must be {spec.describe()}", extra)

    if kind is int or kind is float:
        if spec.ge is not None and value < spec.ge:
            raise _fail(error, where, name, f"must be >= {_num(spec.ge)}", extra)
        if spec.gt is not None and not value > spec.gt:
            raise _fail(error, where, name, f"must be > {_num(spec.gt)}", extra)
        if spec.le is not None and value > spec.le:
            raise _fail(error, where, name, f"must be <= {_num(spec.le)}", extra)
    if kind in (str, bytes, list):
        _check_len(where, name, spec, len(value), error, extra)
    if spec.choices is not None and value not in spec.choices:
        options = ", ".join(repr(c) for c in sorted(spec.choices, key=repr))
        raise _fail(error, where, name, f"must be one of {options}", extra)
    if kind is dict and not all(isinstance(k, str) for k in value):
        raise _fail(error, where, name, "must be a map with string keys", extra)
    if kind is list and spec.items is not None:
        value = [
            check_value(where, f"{name}[{i}]", spec.items, item, error, details)
            for i, item in enumerate(value)
        ]
    return value


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _check_len(
    where: str,
    name: str,
    spec: FieldSpec,
    length: int,
    error: type[FerryError],
    details: Mapping[str, Any],
) -> None:
    unit = "characters" if spec.kind is str else ("bytes" if spec.kind is bytes else "items")
    low, high = spec.min_len, spec.max_len
    if (low is not None and length < low) or (high is not None and length > high):
        if low is not None and high is not None:
            bounds = f"{low}..{high}"
        elif low is not None:
            bounds = f"at least {low}"
        else:
            bounds = f"at most {high}"
        raise _fail(error, where, name, f"must be {bounds} {unit} long", details)


def check_fields(
    where: str,
    specs: Mapping[str, FieldSpec],
    data: Mapping[str, Any],
    error: type[FerryError],
    *,
    unknown: Literal["drop", "refuse"] = "drop",
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Check the map ``data`` against ``specs``; return the known fields, defaults filled.

    Unknown keys are dropped (``unknown="drop"``, the wire's forward-compatible
    rule) or refused (``unknown="refuse"``). Raises ``error`` naming ``where``
    and the field for a missing required field, a wrong type or a value out of
    range, or for an unknown field when refusing them.
    """
    extra = details or {}
    if unknown == "refuse":
        for key in data:
            if key not in specs:
                raise error(f"{where}: unknown field {short_repr(key)}", field=str(key), **extra)
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        if name in data:
            out[name] = check_value(where, name, spec, data[name], error, extra)
        elif spec.required:
            raise _fail(error, where, name, "is required", extra)
        else:
            # Defaults may be mutable (a {} for params); never share one.
            out[name] = copy.copy(spec.default)
    return out
