"""Migration flags: libvirt bit values, every combination rule, params parsing."""

from __future__ import annotations

import re
from typing import Any

import pytest

from ferry.errors import FlagError, MessageInvalid
from ferry.flags import ALL_FLAGS, MigrationFlags, MigrationParams, flag_names, validate

F = MigrationFlags
NO_PARAMS = MigrationParams()


def test_bit_values_match_libvirt() -> None:
    assert {m.name: m.value for m in MigrationFlags} == {
        "LIVE": 1,
        "PEER2PEER": 2,
        "TUNNELLED": 4,
        "PERSIST_DEST": 8,
        "UNDEFINE_SOURCE": 16,
        "PAUSED": 32,
        "NON_SHARED_DISK": 64,
        "NON_SHARED_INC": 128,
        "CHANGE_PROTECTION": 256,
        "UNSAFE": 512,
        "OFFLINE": 1024,
        "COMPRESSED": 2048,
        "ABORT_ON_ERROR": 4096,
        "AUTO_CONVERGE": 8192,
        "POSTCOPY": 32768,
        "PARALLEL": 131072,
        "NON_SHARED_SYNCHRONOUS_WRITES": 262144,
        "POSTCOPY_RESUME": 524288,
    }


@pytest.mark.parametrize(
    ("flags", "params"),
    [
        (0, NO_PARAMS),
        (F.LIVE, NO_PARAMS),
        # Client-driven: Ferry's tunnel is the agents' data connections.
        (F.LIVE | F.TUNNELLED, NO_PARAMS),
        (F.LIVE | F.PEER2PEER | F.TUNNELLED | F.PERSIST_DEST | F.UNDEFINE_SOURCE, NO_PARAMS),
        (F.OFFLINE | F.PERSIST_DEST | F.PEER2PEER | F.UNDEFINE_SOURCE, NO_PARAMS),
        (
            F.LIVE | F.POSTCOPY | F.AUTO_CONVERGE,
            MigrationParams(auto_converge_initial=20, auto_converge_increment=10),
        ),
        (F.LIVE | F.PARALLEL | F.PEER2PEER, MigrationParams(parallel_connections=4)),
        (
            F.LIVE | F.PEER2PEER,
            MigrationParams(
                migrate_uri="tcp://10.0.0.2:49152", bandwidth_mib=0, max_downtime_ms=300
            ),
        ),
        (F.PERSIST_DEST | F.LIVE, MigrationParams(persist_xml="<domain/>")),
        (
            F.LIVE | F.PAUSED | F.COMPRESSED | F.ABORT_ON_ERROR | F.CHANGE_PROTECTION | F.UNSAFE,
            MigrationParams(timeout_s=30.0, dest_name="vm1-new", listen_address="0.0.0.0"),
        ),
    ],
)
def test_valid_combinations(flags: MigrationFlags, params: MigrationParams) -> None:
    result = validate(flags, params)
    assert isinstance(result, MigrationFlags)
    assert result == flags


def test_validate_accepts_plain_int() -> None:
    assert validate(3, NO_PARAMS) == F.LIVE | F.PEER2PEER


RULES: list[tuple[str, int, MigrationParams, list[str]]] = [
    (
        "offline-without-persist",
        F.OFFLINE,
        NO_PARAMS,
        ["--offline (OFFLINE) requires --persistent (PERSIST_DEST)"],
    ),
    (
        "offline-with-live",
        F.OFFLINE | F.PERSIST_DEST | F.LIVE,
        NO_PARAMS,
        ["--offline (OFFLINE) cannot be combined with --live (LIVE)"],
    ),
    (
        "offline-with-tunnelled",
        F.OFFLINE | F.PERSIST_DEST | F.TUNNELLED | F.PEER2PEER,
        NO_PARAMS,
        ["--offline (OFFLINE) cannot be combined with --tunnelled (TUNNELLED)"],
    ),
    (
        "migrate-uri-with-tunnelled",
        F.LIVE | F.TUNNELLED | F.PEER2PEER,
        MigrationParams(migrate_uri="tcp://b:4444"),
        ["--migrateuri (migrate_uri) cannot be used with --tunnelled (TUNNELLED)"],
    ),
    (
        "postcopy-without-live",
        F.POSTCOPY,
        NO_PARAMS,
        ["--postcopy (POSTCOPY) requires --live (LIVE)"],
    ),
    (
        "postcopy-with-paused",
        F.POSTCOPY | F.LIVE | F.PAUSED,
        NO_PARAMS,
        ["--postcopy (POSTCOPY) cannot be combined with --suspend (PAUSED)"],
    ),
    (
        "postcopy-with-offline",
        F.POSTCOPY | F.OFFLINE | F.PERSIST_DEST,
        NO_PARAMS,
        [
            "--postcopy (POSTCOPY) cannot be combined with --offline (OFFLINE)",
            "--postcopy (POSTCOPY) requires --live (LIVE)",
        ],
    ),
    (
        "ac-initial-without-ac",
        F.LIVE,
        MigrationParams(auto_converge_initial=10),
        [
            "--auto-converge-initial (auto_converge_initial) requires "
            "--auto-converge (AUTO_CONVERGE)"
        ],
    ),
    (
        "ac-increment-without-ac",
        F.LIVE,
        MigrationParams(auto_converge_increment=5),
        [
            "--auto-converge-increment (auto_converge_increment) requires "
            "--auto-converge (AUTO_CONVERGE)"
        ],
    ),
    (
        "parallel-connections-without-parallel",
        F.LIVE,
        MigrationParams(parallel_connections=2),
        ["--parallel-connections (parallel_connections) requires --parallel (PARALLEL)"],
    ),
    (
        "persist-xml-without-persist",
        F.LIVE,
        MigrationParams(persist_xml="<domain/>"),
        ["--persistent-xml (persist_xml) requires --persistent (PERSIST_DEST)"],
    ),
]


@pytest.mark.parametrize(
    ("flags", "params", "expected"), [r[1:] for r in RULES], ids=[r[0] for r in RULES]
)
def test_each_rule(flags: int, params: MigrationParams, expected: list[str]) -> None:
    with pytest.raises(FlagError) as info:
        validate(flags, params)
    for text in expected:
        assert text in str(info.value)
    assert len(info.value.details["problems"]) == len(expected)


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(FlagError) as info:
        validate(F.TUNNELLED | F.POSTCOPY | F.OFFLINE, MigrationParams(parallel_connections=2))
    problems = info.value.details["problems"]
    assert len(problems) >= 3
    assert str(info.value) == "; ".join(problems)
    assert info.value.details["flags"] == ["TUNNELLED", "OFFLINE", "POSTCOPY"]


@pytest.mark.parametrize("bits", [64 << 20, 1 << 14, 1 << 16, 1 << 40])
def test_unknown_bits_are_refused(bits: int) -> None:
    with pytest.raises(FlagError, match=f"unknown migration flag bits {bits:#x}"):
        validate(F.LIVE | bits, NO_PARAMS)


@pytest.mark.parametrize("flags", [-1, True, "1", 1.0, None])
def test_flags_must_be_a_non_negative_int(flags: Any) -> None:
    with pytest.raises(FlagError):
        validate(flags, NO_PARAMS)


def test_flag_names() -> None:
    assert flag_names(0) == []
    assert flag_names(F.LIVE | F.PEER2PEER | F.PARALLEL) == ["LIVE", "PEER2PEER", "PARALLEL"]
    assert flag_names(1 | 1 << 14) == ["LIVE", "0x4000"]
    assert flag_names(ALL_FLAGS) == [m.name for m in MigrationFlags]


def test_params_round_trip_omits_unset() -> None:
    params = MigrationParams(dest_name="vm2", bandwidth_mib=100, timeout_s=12.5)
    wire = params.to_wire()
    assert wire == {"dest_name": "vm2", "bandwidth_mib": 100, "timeout_s": 12.5}
    assert MigrationParams.from_wire(wire) == params
    assert MigrationParams().to_wire() == {}
    assert MigrationParams.from_wire({}) == MigrationParams()


def test_params_from_wire_accepts_int_timeout_and_null() -> None:
    params = MigrationParams.from_wire({"timeout_s": 30, "dest_xml": None})
    assert params.timeout_s == 30.0 and isinstance(params.timeout_s, float)
    assert params.dest_xml is None


def test_params_unknown_field_is_refused_by_name() -> None:
    with pytest.raises(MessageInvalid, match="params: unknown field 'compression_level'"):
        MigrationParams.from_wire({"compression_level": 9})


@pytest.mark.parametrize(
    ("wire", "field"),
    [
        ({"bandwidth_mib": "fast"}, "bandwidth_mib"),
        ({"bandwidth_mib": True}, "bandwidth_mib"),
        ({"timeout_s": "10"}, "timeout_s"),
        ({"dest_name": 5}, "dest_name"),
        ({"parallel_connections": 2.0}, "parallel_connections"),
        ({"timeout_s": float("nan")}, "timeout_s"),  # not a usable number at all
    ],
)
def test_params_wrong_type_is_message_invalid(wire: dict[str, Any], field: str) -> None:
    with pytest.raises(MessageInvalid, match=f"params: field '{field}'"):
        MigrationParams.from_wire(wire)


@pytest.mark.parametrize(
    ("wire", "field", "text"),
    [
        ({"auto_converge_initial": 101}, "auto_converge_initial", "must be <= 100"),
        ({"auto_converge_initial": -1}, "auto_converge_initial", "must be >= 0"),
        ({"auto_converge_increment": 0}, "auto_converge_increment", "must be >= 1"),
        ({"auto_converge_increment": 101}, "auto_converge_increment", "must be <= 100"),
        ({"parallel_connections": 0}, "parallel_connections", "must be >= 1"),
        ({"parallel_connections": 256}, "parallel_connections", "must be <= 255"),
        ({"timeout_s": 0}, "timeout_s", "must be > 0"),
        ({"bandwidth_mib": -1}, "bandwidth_mib", "must be >= 0"),
        ({"max_downtime_ms": -5}, "max_downtime_ms", "must be >= 0"),
        ({"dest_name": ""}, "dest_name", "must be 1..200 characters long"),
    ],
)
def test_params_out_of_range_is_flag_error(wire: dict[str, Any], field: str, text: str) -> None:
    with pytest.raises(FlagError, match=f"params: field '{field}' {text}"):
        MigrationParams.from_wire(wire)


def test_params_constructor_validates() -> None:
    with pytest.raises(FlagError, match="parallel_connections"):
        MigrationParams(parallel_connections=1000)
    with pytest.raises(FlagError, match="dest_name"):
        MigrationParams(dest_name=7)  # type: ignore[arg-type]


def test_params_from_wire_refuses_non_map() -> None:
    with pytest.raises(MessageInvalid):
        MigrationParams.from_wire([("dest_name", "x")])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("flags", "params", "needle"),
    [
        (F.LIVE | F.POSTCOPY | F.PARALLEL, NO_PARAMS, "cannot switch a multifd migration"),
        (F.LIVE, MigrationParams(postcopy_after_precopy=True), "requires --postcopy"),
        (F.LIVE, MigrationParams(postcopy_bandwidth_mib=8), "requires --postcopy"),
        (F.LIVE, MigrationParams(timeout_action="suspend"), "requires --timeout"),
        (F.LIVE, MigrationParams(timeout_s=5, timeout_action="postcopy"),
         "--timeout-postcopy requires --postcopy"),
        (F.LIVE | F.POSTCOPY_RESUME, NO_PARAMS, "--postcopy-resume (POSTCOPY_RESUME) requires"),
        (F.LIVE, MigrationParams(max_throttle_pct=50), "needs --deadline"),
        (F.LIVE | F.COMPRESSED, MigrationParams(compression_methods=["zstd"]),
         "requires --parallel"),
        (F.LIVE | F.COMPRESSED | F.PARALLEL, MigrationParams(compression_methods=["xbzrle"]),
         "main stream"),
        (F.LIVE | F.COMPRESSED | F.PARALLEL,
         MigrationParams(compression_methods=["zstd", "zlib"]), "cannot be used together"),
        (F.LIVE, MigrationParams(compression_methods=["xbzrle"]), "requires --compressed"),
        (F.LIVE | F.COMPRESSED, MigrationParams(compression_xbzrle_cache=3 << 20),
         "power of two"),
        (F.LIVE | F.COMPRESSED, MigrationParams(compression_zstd_level=3),
         "requires the zstd method"),
    ],
)  # fmt: skip
def test_issue12_combinations_refused(
    flags: MigrationFlags, params: MigrationParams, needle: str
) -> None:
    with pytest.raises(FlagError) as info:
        validate(flags, params)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("flags", "params"),
    [
        (F.LIVE | F.POSTCOPY, MigrationParams(postcopy_after_precopy=True,
                                              postcopy_bandwidth_mib=16)),
        (F.LIVE | F.POSTCOPY, MigrationParams(timeout_s=5, timeout_action="postcopy")),
        (F.LIVE | F.POSTCOPY | F.POSTCOPY_RESUME, NO_PARAMS),
        (F.LIVE | F.COMPRESSED | F.PARALLEL, MigrationParams(compression_methods=["zlib"],
                                                             compression_zlib_level=6)),
        (F.LIVE | F.COMPRESSED, MigrationParams(compression_xbzrle_cache=1 << 27)),
        (F.LIVE | F.POSTCOPY, MigrationParams(deadline_s=10, max_downtime_ms=500,
                                              max_throttle_pct=50)),
    ],
)  # fmt: skip
def test_issue12_combinations_accepted(flags: MigrationFlags, params: MigrationParams) -> None:
    assert validate(flags, params) == flags


def test_comp_methods_checked_on_the_wire() -> None:
    with pytest.raises(FlagError, match="compression_methods"):
        MigrationParams.from_wire({"compression_methods": ["lz4"]})
    with pytest.raises(MessageInvalid):
        MigrationParams.from_wire({"compression_methods": [1]})
    assert MigrationParams.from_wire({"compression_methods": ["zstd"]}).compression_methods == [
        "zstd"
    ]


def test_storage_copy_rules_name_the_options() -> None:
    disk, inc = F.LIVE | F.NON_SHARED_DISK, F.LIVE | F.NON_SHARED_INC
    assert validate(disk, MigrationParams(migrate_disks=["vda"], disks_port=49400)) == disk
    assert validate(inc | F.NON_SHARED_SYNCHRONOUS_WRITES, NO_PARAMS)
    assert validate(disk | F.TUNNELLED | F.PEER2PEER, NO_PARAMS)
    assert validate(disk | F.POSTCOPY, NO_PARAMS)
    cases = [
        (disk | F.NON_SHARED_INC, NO_PARAMS, "cannot be combined: copy whole images"),
        (F.LIVE, MigrationParams(migrate_disks=["vda"]),
         "--migrate-disks (migrate_disks) requires --copy-storage-all"),
        (F.LIVE | F.NON_SHARED_SYNCHRONOUS_WRITES, NO_PARAMS,
         "--copy-storage-synchronous-writes (NON_SHARED_SYNCHRONOUS_WRITES) requires"),
        (disk, MigrationParams(disks_port=1, disks_uri="tcp://h:2"), "the URI names the port"),
        (F.NON_SHARED_DISK | F.OFFLINE | F.PERSIST_DEST, NO_PARAMS, "cannot copy storage"),
        (disk | F.TUNNELLED | F.PEER2PEER, MigrationParams(disks_port=49400),
         "--disks-port (disks_port) cannot be combined with --tunnelled"),
        (disk | F.TUNNELLED | F.PEER2PEER, MigrationParams(disks_uri="tcp://h:2"),
         "the disks travel through the tunnel"),
    ]
    for flags, params, words in cases:
        with pytest.raises(FlagError, match=re.escape(words)):
            validate(flags, params)
