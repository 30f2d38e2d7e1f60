"""Migration cookie: golden bytes per side, limits, unknown sections, malformed input."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from ferry.errors import CookieError, CookieTooLarge
from ferry.protocol.cookie import (
    KNOWN_SECTIONS,
    MAX_COOKIE,
    Cookie,
    Graphics,
    Identity,
    LockState,
    Persistent,
    Snapshots,
    Statistics,
)

IDENTITY = Identity(
    name="vm1",
    uuid="6695eb01-f6a4-8304-79aa-97f2502e193f",
    hostname="alpha",
    host_uuid="0f7c3c4e-5a1b-4c1e-9c55-2b8f0d4a9e11",
    migration_id="m-0001",
)


def golden(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# Begin (source → destination): who migrates, lock state the destination must
# understand, snapshot metadata.
SRC_BEGIN = (
    Cookie()
    .with_identity(IDENTITY)
    .with_lockstate(LockState(driver="lockd", leases=("vm1-disk0",)), mandatory=True)
    .with_snapshots(Snapshots(names=("s1", "s2")))
)
SRC_BEGIN_BYTES = golden("""
84a86964656e7469747985a46e616d65a3766d31a475756964d92436363935656230312d66366134
2d383330342d373961612d393766323530326531393366a8686f73746e616d65a5616c706861a968
6f73745f75756964d92430663763336334652d356131622d346331652d396335352d326238663064
346139653131ac6d6967726174696f6e5f6964a66d2d30303031a96c6f636b737461746582a66472
69766572a56c6f636b64a66c656173657391a9766d312d6469736b30a9736e617073686f747381a5
6e616d657392a27331a27332a96d616e6461746f727991a96c6f636b7374617465
""")

# Prepare (destination → source): where the display now listens.
DST_PREPARE = (
    Cookie()
    .with_identity(IDENTITY)
    .with_graphics(Graphics(type="vnc", port=5901, tls_port=None, listen="0.0.0.0"))
)
DST_PREPARE_BYTES = golden("""
83a8677261706869637384a474797065a3766e63a4706f7274cd170da8746c735f706f7274c0a66c
697374656ea7302e302e302e30a86964656e7469747985a46e616d65a3766d31a475756964d92436
363935656230312d663661342d383330342d373961612d393766323530326531393366a8686f7374
6e616d65a5616c706861a9686f73745f75756964d92430663763336334652d356131622d34633165
2d396335352d326238663064346139653131ac6d6967726174696f6e5f6964a66d2d30303031a96d
616e6461746f727990
""")

# Perform (source → destination): transfer statistics.
SRC_PERFORM = Cookie().with_statistics(
    Statistics({"ram_transferred": 1048576, "downtime_ms": 42, "throughput_mbps": 912.5})
)
SRC_PERFORM_BYTES = golden("""
82aa7374617469737469637383af72616d5f7472616e73666572726564ce00100000ab646f776e74
696d655f6d732aaf7468726f7567687075745f6d627073cb408c840000000000a96d616e6461746f
727990
""")

# Finish (destination → source): the persistent definition, mandatory.
DST_FINISH = Cookie().with_persistent(
    Persistent(xml='<domain type="kvm"><name>vm1</name></domain>'), mandatory=True
)
DST_FINISH_BYTES = golden("""
82aa70657273697374656e7481a3786d6cd92c3c646f6d61696e20747970653d226b766d223e3c6e
616d653e766d313c2f6e616d653e3c2f646f6d61696e3ea96d616e6461746f727991aa7065727369
7374656e74
""")

GOLDEN = [
    ("src-begin", SRC_BEGIN, SRC_BEGIN_BYTES),
    ("dst-prepare", DST_PREPARE, DST_PREPARE_BYTES),
    ("src-perform", SRC_PERFORM, SRC_PERFORM_BYTES),
    ("dst-finish", DST_FINISH, DST_FINISH_BYTES),
]


@pytest.mark.parametrize(("cookie", "data"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_golden_encode(cookie: Cookie, data: bytes) -> None:
    assert cookie.encode() == data


@pytest.mark.parametrize(("cookie", "data"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_golden_decode(cookie: Cookie, data: bytes) -> None:
    decoded = Cookie.decode(data)
    assert decoded == cookie
    assert decoded.encode() == data


def test_source_begin_accessors() -> None:
    cookie = Cookie.decode(SRC_BEGIN_BYTES)
    assert cookie.identity == IDENTITY
    assert cookie.lockstate == LockState(driver="lockd", leases=("vm1-disk0",))
    assert cookie.snapshots == Snapshots(names=("s1", "s2"))
    assert cookie.mandatory == frozenset({"lockstate"})
    assert cookie.graphics is None and cookie.persistent is None and cookie.statistics is None


def test_destination_accessors() -> None:
    prepare = Cookie.decode(DST_PREPARE_BYTES)
    assert prepare.graphics == Graphics(type="vnc", port=5901, tls_port=None, listen="0.0.0.0")
    assert prepare.identity == IDENTITY
    finish = Cookie.decode(DST_FINISH_BYTES)
    assert finish.persistent is not None
    assert finish.persistent.xml.startswith("<domain")
    perform = Cookie.decode(SRC_PERFORM_BYTES)
    assert perform.statistics is not None
    assert perform.statistics.values["throughput_mbps"] == 912.5


def test_empty_cookie_round_trips() -> None:
    assert Cookie.decode(Cookie().encode()) == Cookie()


def xml_cookie(xml_len: int) -> Cookie:
    return Cookie().with_persistent(Persistent(xml="x" * xml_len))


def test_size_limit_is_exactly_16_kib() -> None:
    overhead = len(xml_cookie(1000).encode()) - 1000  # str16 header: constant for this range
    at_limit = xml_cookie(MAX_COOKIE - overhead)
    data = at_limit.encode()
    assert len(data) == MAX_COOKIE == 16 * 1024
    assert Cookie.decode(data) == at_limit
    with pytest.raises(CookieTooLarge):
        xml_cookie(MAX_COOKIE - overhead + 1).encode()


def test_oversized_bytes_refused_before_decoding() -> None:
    # Not even msgpack: a decoder that looked at it would say "garbage" instead.
    with pytest.raises(CookieTooLarge):
        Cookie.decode(b"\xc1" * (MAX_COOKIE + 1))


def raw(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_unknown_optional_section_is_dropped() -> None:
    data = raw({"identity": IDENTITY.to_wire(), "cpu-model": {"x": 1}, "mandatory": []})
    cookie = Cookie.decode(data)
    assert set(cookie.sections) == {"identity"}
    assert cookie.identity == IDENTITY


def test_unknown_mandatory_section_is_refused_by_name() -> None:
    data = raw({"cpu-model": {"x": 1}, "mandatory": ["cpu-model"]})
    with pytest.raises(CookieError, match="'cpu-model'") as info:
        Cookie.decode(data)
    assert info.value.details["section"] == "cpu-model"


def test_known_set_can_be_narrowed_by_the_receiver() -> None:
    # A destination without snapshot support drops the optional section ...
    cookie = Cookie.decode(SRC_BEGIN_BYTES, known=KNOWN_SECTIONS - {"snapshots"})
    assert cookie.snapshots is None and cookie.identity == IDENTITY
    # ... and refuses when the section it lacks is mandatory.
    with pytest.raises(CookieError, match="'lockstate'"):
        Cookie.decode(SRC_BEGIN_BYTES, known=KNOWN_SECTIONS - {"lockstate"})


def test_receiver_can_accept_extra_sections_it_knows() -> None:
    data = raw({"cpu-model": {"model": "EPYC"}, "mandatory": ["cpu-model"]})
    cookie = Cookie.decode(data, known=KNOWN_SECTIONS | {"cpu-model"})
    assert cookie.sections["cpu-model"] == {"model": "EPYC"}


MALFORMED: dict[str, bytes] = {
    "not-msgpack": b"\xc1",
    "not-a-map": msgpack.packb([1, 2]),
    "empty": b"",
    "trailing-junk": raw({}) + b"\x00",
    "mandatory-not-list": raw({"mandatory": "identity"}),
    "mandatory-bad-item": raw({"mandatory": [1]}),
    "section-not-map": raw({"identity": "vm1"}),
    "section-int-keys": raw({"statistics": {1: 2}}),  # type: ignore[dict-item]
    "identity-missing-field": raw({"identity": {"name": "vm1"}}),
    "graphics-bad-port": raw({"graphics": {"type": "vnc", "port": 70000}}),
    "lockstate-bad-leases": raw({"lockstate": {"driver": "lockd", "leases": "a"}}),
    "statistics-not-number": raw({"statistics": {"bytes": "many"}}),
    "statistics-bool": raw({"statistics": {"done": True}}),
    "snapshots-bad-name": raw({"snapshots": {"names": [""]}}),
    "persistent-empty": raw({"persistent": {"xml": ""}}),
    "mandatory-absent": raw({"mandatory": ["graphics"]}),
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_cookie_raises_cookie_error(data: bytes) -> None:
    with pytest.raises(CookieError):
        Cookie.decode(data)


def test_malformed_known_section_is_named() -> None:
    with pytest.raises(CookieError, match="cookie section 'identity': field 'uuid' is required"):
        Cookie.decode(
            raw({"identity": {k: v for k, v in IDENTITY.to_wire().items() if k != "uuid"}})
        )


def test_unknown_keys_inside_a_known_section_are_tolerated() -> None:
    wire = {**IDENTITY.to_wire(), "added_in_v2": 1}
    cookie = Cookie.decode(raw({"identity": wire}))
    assert cookie.identity == IDENTITY


def test_decode_refuses_non_bytes() -> None:
    with pytest.raises(CookieError):
        Cookie.decode("not bytes")  # type: ignore[arg-type]


def test_mandatory_toggle_and_without() -> None:
    cookie = Cookie().with_identity(IDENTITY, mandatory=True)
    assert cookie.mandatory == frozenset({"identity"})
    cookie = cookie.with_identity(IDENTITY)
    assert cookie.mandatory == frozenset()
    cookie = cookie.with_graphics(Graphics("spice", 5900, 5901), mandatory=True)
    trimmed = cookie.without(["graphics"])
    assert set(trimmed.sections) == {"identity"} and trimmed.mandatory == frozenset()
    assert set(cookie.sections) == {"identity", "graphics"}  # builders never mutate


def test_builders_validate() -> None:
    with pytest.raises(CookieError, match="port"):
        Cookie().with_graphics(Graphics("vnc", -1))
    with pytest.raises(CookieError):
        Cookie().with_section("mandatory", {})
    with pytest.raises(CookieError):
        Cookie().with_statistics(Statistics({"x": float("inf")}))


def test_encode_refuses_mandatory_without_section() -> None:
    with pytest.raises(CookieError, match="'graphics'"):
        Cookie(sections={}, mandatory=frozenset({"graphics"})).encode()


def test_encode_validates_sections_set_directly() -> None:
    with pytest.raises(CookieError, match="identity"):
        Cookie(sections={"identity": {"name": "vm1"}}).encode()
