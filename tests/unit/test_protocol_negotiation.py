"""Negotiation: feature intersection, mandatory features both ways, versions."""

from __future__ import annotations

import pytest

from ferry.errors import FeatureMissing, VersionMismatch
from ferry.protocol.messages import Hello, Welcome
from ferry.protocol.negotiation import Negotiated, negotiate


def hello(
    version: tuple[int, int] = (1, 0),
    features: set[str] | None = None,
    mandatory: set[str] | None = None,
    hostname: str = "alpha",
) -> Hello:
    return Hello(
        version,
        f"uuid-{hostname}",
        hostname,
        "source",
        frozenset(features or ()),
        frozenset(mandatory or ()),
    )


def welcome(
    version: tuple[int, int] = (1, 0),
    features: set[str] | None = None,
    mandatory: set[str] | None = None,
    hostname: str = "beta",
) -> Welcome:
    return Welcome(
        version,
        f"uuid-{hostname}",
        hostname,
        "destination",
        frozenset(features or ()),
        frozenset(mandatory or ()),
    )


def test_intersection_and_peer_identity() -> None:
    result = negotiate(
        hello(features={"tunnel", "postcopy", "snapshots"}),
        welcome(features={"tunnel", "snapshots", "zerocopy"}),
    )
    assert result == Negotiated(
        version=(1, 0),
        features=frozenset({"tunnel", "snapshots"}),
        peer_host_uuid="uuid-beta",
        peer_hostname="beta",
        peer_role="destination",
    )


def test_both_sides_agree() -> None:
    a = hello(features={"x", "y"}, mandatory={"x"})
    b = welcome(features={"x", "z"})
    assert negotiate(a, b).features == negotiate(b, a).features == frozenset({"x"})


def test_no_common_features_is_fine() -> None:
    assert negotiate(hello(features={"a"}), welcome(features={"b"})).features == frozenset()


def test_minor_mismatch_uses_the_lower_minor() -> None:
    assert negotiate(hello((1, 4)), welcome((1, 2))).version == (1, 2)
    assert negotiate(hello((1, 0)), welcome((1, 7))).version == (1, 0)


def test_major_mismatch_names_both_versions() -> None:
    with pytest.raises(VersionMismatch) as info:
        negotiate(hello((1, 3)), welcome((2, 0)))
    assert "1.3" in str(info.value) and "2.0" in str(info.value)
    assert info.value.details["local_version"] == [1, 3]
    assert info.value.details["remote_version"] == [2, 0]


def test_remote_mandatory_missing_locally_is_named() -> None:
    with pytest.raises(FeatureMissing) as info:
        negotiate(
            hello(features={"tunnel"}), welcome(features={"tunnel", "lockd"}, mandatory={"lockd"})
        )
    message = str(info.value)
    assert "'lockd'" in message and "'beta' requires" in message and "'alpha' lacks" in message
    assert info.value.details["missing"] == ["lockd"]


def test_local_mandatory_missing_remotely_is_named() -> None:
    with pytest.raises(FeatureMissing) as info:
        negotiate(
            hello(features={"tunnel", "postcopy"}, mandatory={"postcopy", "tunnel"}),
            welcome(features={"tunnel"}),
        )
    message = str(info.value)
    assert "'postcopy'" in message
    assert "'alpha' requires" in message and "'beta' lacks" in message
    assert info.value.details["missing"] == ["postcopy"]  # 'tunnel' is shared: not missing


def test_mandatory_features_both_sides_have_are_fine() -> None:
    result = negotiate(
        hello(features={"a", "b"}, mandatory={"a"}), welcome(features={"a", "b"}, mandatory={"b"})
    )
    assert result.features == frozenset({"a", "b"})


def test_version_is_checked_before_features() -> None:
    with pytest.raises(VersionMismatch):
        negotiate(hello((1, 0)), welcome((3, 0), features={"x"}, mandatory={"x"}))
