"""Op argument schemas: unknown ops, type errors naming op and field, defaults."""

from __future__ import annotations

from typing import Any

import pytest

from ferry.errors import MessageInvalid, UnknownOp
from ferry.protocol import ops
from ferry.protocol.fields import FieldSpec
from ferry.protocol.ops import OPS, OpSpec, register_op, validate_args

EXPECTED_OPS = {
    "define",
    "undefine",
    "start",
    "shutdown",
    "destroy",
    "suspend",
    "resume",
    "list",
    "info",
    "dumpxml",
    "snapshot_create",
    "snapshot_list",
    "snapshot_delete",
    "save",
    "restore",
    "dump",
    "job_info",
    "job_abort",
    "set_max_downtime",
    "set_max_bandwidth",
    "migrate",
    "begin",
    "prepare",
    "perform",
    "finish",
    "confirm",
    "adopt_outgoing",
    "adopt_incoming",
    "journal_query",
}

# A valid value of each kind, and one of the wrong kind.
GOOD: dict[type, Any] = {
    str: "vm1",
    int: 1,
    float: 1.5,
    bool: True,
    bytes: b"\x01",
    dict: {},
    list: [],
}
WRONG: dict[type, Any] = {
    str: 42,
    int: "1",
    float: "1.5",
    bool: 1,
    bytes: "cookie",
    dict: [],
    list: {},
}


def minimal_args(op: str) -> dict[str, Any]:
    return {name: GOOD[spec.kind] for name, spec in OPS[op].fields.items() if spec.required}


def test_all_ops_are_registered() -> None:
    assert set(OPS) >= EXPECTED_OPS


def test_unknown_op_is_named() -> None:
    with pytest.raises(UnknownOp, match="'teleport'") as info:
        validate_args("teleport", {})
    assert info.value.details["op"] == "teleport"


@pytest.mark.parametrize("op", sorted(EXPECTED_OPS))
def test_minimal_args_validate(op: str) -> None:
    out = validate_args(op, minimal_args(op))
    assert set(out) == set(OPS[op].fields)


WRONG_TYPE_CASES = [
    (op, name, spec) for op in sorted(EXPECTED_OPS) for name, spec in OPS[op].fields.items()
]


@pytest.mark.parametrize(
    ("op", "name", "spec"), WRONG_TYPE_CASES, ids=[f"{o}.{n}" for o, n, _ in WRONG_TYPE_CASES]
)
def test_each_wrong_type_names_op_and_field(op: str, name: str, spec: FieldSpec) -> None:
    args = {**minimal_args(op), name: WRONG[spec.kind]}
    with pytest.raises(MessageInvalid) as info:
        validate_args(op, args)
    assert str(info.value).startswith(f"{op}: field {name!r} must be ")
    assert info.value.details == {"op": op, "field": name}


@pytest.mark.parametrize(
    ("op", "name"),
    [(op, name) for op in sorted(EXPECTED_OPS) for name, s in OPS[op].fields.items() if s.required],
)
def test_each_missing_required_field_is_named(op: str, name: str) -> None:
    args = minimal_args(op)
    del args[name]
    with pytest.raises(MessageInvalid, match=f"^{op}: field '{name}' is required$"):
        validate_args(op, args)


def test_message_example_from_the_design() -> None:
    with pytest.raises(MessageInvalid) as info:
        validate_args("start", {"name": "vm1", "paused": "yes"})
    assert str(info.value) == "start: field 'paused' must be a bool"


@pytest.mark.parametrize(
    ("op", "args", "expected"),
    [
        ("start", {"name": "vm"}, {"name": "vm", "paused": False, "force": False}),
        ("shutdown", {"name": "vm"}, {"name": "vm", "timeout": 60.0}),
        ("list", {}, {"all": False}),
        ("dumpxml", {"name": "vm"}, {"name": "vm", "inactive": False}),
        (
            "snapshot_create",
            {"name": "vm", "snapshot": "s1"},
            {"name": "vm", "snapshot": "s1", "description": "", "xml": None,
             "redefine": False, "current": False, "disk_only": False},
        ),
        (
            "migrate",
            {"name": "vm", "dest_uri": "ferry://b", "flags": 3},
            {"name": "vm", "dest_uri": "ferry://b", "flags": 3, "params": {}},
        ),
        (
            "begin",
            {"name": "vm", "dest_uri": "ferry://b", "flags": 0},
            {"name": "vm", "dest_uri": "ferry://b", "flags": 0, "params": {}},
        ),
        (
            "prepare",
            {"xml": "<domain/>", "cookie": b"", "flags": 0},
            {"xml": "<domain/>", "cookie": b"", "flags": 0, "params": {}},
        ),
        (
            "finish",
            {"name": "vm", "cookie": b"c", "flags": 1},
            {"name": "vm", "cookie": b"c", "flags": 1, "params": {}, "cancelled": False,
             "migration_id": None},
        ),
        (
            "confirm",
            {"name": "vm", "migration_id": "ab"},
            {"name": "vm", "migration_id": "ab", "cookie": b"", "cancelled": False,
             "unknown": False, "dest_host": None},
        ),
        (
            "perform",
            {"name": "vm", "migration_id": "ab", "uri": "tcp:b:1", "cookie": b"c"},
            {"name": "vm", "migration_id": "ab", "uri": "tcp:b:1", "cookie": b"c",
             "dest_name": None, "tunnel": None},
        ),
        ("journal_query", {}, {"migration_id": None, "domain": None, "since": None}),
    ],
)
def test_defaults_are_filled(op: str, args: dict[str, Any], expected: dict[str, Any]) -> None:
    assert validate_args(op, args) == expected


def test_default_containers_are_not_shared() -> None:
    first = validate_args("migrate", {"name": "vm", "dest_uri": "u", "flags": 0})
    first["params"]["dirty"] = True
    second = validate_args("migrate", {"name": "vm", "dest_uri": "u", "flags": 0})
    assert second["params"] == {}


@pytest.mark.parametrize(
    ("op", "args", "message"),
    [
        ("start", {"name": ""}, "start: field 'name' must be 1..200 characters long"),
        ("start", {"name": "x" * 201}, "start: field 'name' must be 1..200 characters long"),
        ("shutdown", {"name": "vm", "timeout": 0}, "shutdown: field 'timeout' must be > 0"),
        ("shutdown", {"name": "vm", "timeout": -1.5}, "shutdown: field 'timeout' must be > 0"),
        (
            "shutdown",
            {"name": "vm", "timeout": float("nan")},
            "shutdown: field 'timeout' must be a finite number",
        ),
        ("set_max_downtime", {"name": "vm", "ms": -1}, "set_max_downtime: field 'ms' must be >= 0"),
        (
            "set_max_bandwidth",
            {"name": "vm", "mib_per_s": -1},
            "set_max_bandwidth: field 'mib_per_s' must be >= 0",
        ),
        (
            "migrate",
            {"name": "vm", "dest_uri": "u", "flags": -1},
            "migrate: field 'flags' must be >= 0",
        ),
        (
            "migrate",
            {"name": "vm", "dest_uri": "u", "flags": True},
            "migrate: field 'flags' must be an int",
        ),
        (
            "migrate",
            {"name": "vm", "dest_uri": "u", "flags": 0, "params": {1: 2}},
            "migrate: field 'params' must be a map with string keys",
        ),
        (
            "begin",
            {"name": "vm", "dest_uri": "u", "flags": 0, "params": 5},
            "begin: field 'params' must be a map",
        ),
        (
            "journal_query",
            {"since": "yesterday"},
            "journal_query: field 'since' must be a number or null",
        ),
    ],
)
def test_ranges_and_types(op: str, args: dict[str, Any], message: str) -> None:
    with pytest.raises(MessageInvalid) as info:
        validate_args(op, args)
    assert str(info.value) == message


def test_float_fields_accept_ints_and_nullable_fields_accept_none() -> None:
    out = validate_args("shutdown", {"name": "vm", "timeout": 5})
    assert out["timeout"] == 5.0 and isinstance(out["timeout"], float)
    assert validate_args("perform", {"name": "vm", "migration_id": "a", "uri": "u",
                                     "cookie": b""})["tunnel"] is None
    assert validate_args("journal_query", {"since": 10})["since"] == 10.0


def test_unknown_args_are_dropped() -> None:
    assert validate_args("info", {"name": "vm", "verbose": True}) == {"name": "vm"}


def test_args_must_be_a_map() -> None:
    with pytest.raises(MessageInvalid, match="info: args must be a map"):
        validate_args("info", ["name"])  # type: ignore[arg-type]


def test_register_op_adds_and_refuses_duplicates() -> None:
    name = "test_only_echo"
    register_op(name, OpSpec(fields={"text": FieldSpec(str, required=True)}))
    try:
        assert validate_args(name, {"text": "hi"}) == {"text": "hi"}
        with pytest.raises(MessageInvalid, match=f"{name}: field 'text' must be a string"):
            validate_args(name, {"text": 1})
        with pytest.raises(ValueError):
            register_op(name, OpSpec(fields={}))
    finally:
        ops._REGISTRY.pop(name)
    with pytest.raises(ValueError):
        register_op("", OpSpec(fields={}))


def test_ops_mapping_is_read_only() -> None:
    with pytest.raises(TypeError):
        OPS["x"] = OpSpec(fields={})  # type: ignore[index]
