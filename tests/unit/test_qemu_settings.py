"""Which qemu capabilities and parameters a migration's flags ask for (sans-I/O)."""

from __future__ import annotations

from ferry.flags import MigrationFlags as F
from ferry.flags import MigrationParams
from ferry.qemu.settings import (
    MIB,
    UNLIMITED_BANDWIDTH,
    destination_settings,
    source_settings,
)


def test_plain_migration_turns_everything_off_and_bandwidth_unlimited() -> None:
    s = source_settings(F.LIVE, MigrationParams())
    assert s.caps == {"events": True, "multifd": False, "postcopy-ram": False,
                      "xbzrle": False, "auto-converge": False,
                      "pause-before-switchover": False}  # fmt: skip
    assert s.params == {"max-bandwidth": UNLIMITED_BANDWIDTH}


def test_both_ends_agree_on_what_must_match() -> None:
    flags = F.LIVE | F.PARALLEL | F.COMPRESSED
    params = MigrationParams(parallel_connections=4, compression_methods=["zstd"],
                             compression_zstd_level=3)  # fmt: skip
    src, dst = source_settings(flags, params), destination_settings(flags, params)
    for key in ("multifd", "postcopy-ram", "xbzrle"):
        assert src.caps[key] == dst.caps[key]
    for key in ("multifd-channels", "multifd-compression", "multifd-zstd-level"):
        assert src.params[key] == dst.params[key]
    assert dst.params["multifd-compression"] == "zstd"
    assert dst.params["multifd-channels"] == 4


def test_compressed_defaults_xbzrle_alone_and_zstd_in_parallel() -> None:
    assert source_settings(F.LIVE | F.COMPRESSED, MigrationParams()).caps["xbzrle"]
    par = source_settings(F.LIVE | F.COMPRESSED | F.PARALLEL, MigrationParams())
    assert not par.caps["xbzrle"] and par.params["multifd-compression"] == "zstd"
    cache = source_settings(F.LIVE | F.COMPRESSED,
                            MigrationParams(compression_xbzrle_cache=1 << 28))  # fmt: skip
    assert cache.params["xbzrle-cache-size"] == 1 << 28


def test_postcopy_and_its_bandwidth() -> None:
    s = source_settings(F.LIVE | F.POSTCOPY, MigrationParams(postcopy_bandwidth_mib=16))
    assert s.caps["postcopy-ram"] and destination_settings(F.LIVE | F.POSTCOPY,
                                                           MigrationParams()).caps["postcopy-ram"]
    assert s.params["max-postcopy-bandwidth"] == 16 * MIB
    # 0 is qemu's "unlimited" for post-copy.
    assert source_settings(F.LIVE | F.POSTCOPY,
                           MigrationParams()).params["max-postcopy-bandwidth"] == 0


def test_auto_converge_is_capped_by_max_throttle() -> None:
    s = source_settings(F.LIVE | F.AUTO_CONVERGE, MigrationParams(max_throttle_pct=50))
    assert s.caps["auto-converge"]
    assert s.params["max-cpu-throttle"] == 50 and s.params["cpu-throttle-initial"] == 20
    s = source_settings(F.LIVE | F.AUTO_CONVERGE,
                        MigrationParams(max_throttle_pct=10, bandwidth_mib=128))  # fmt: skip
    assert s.params["cpu-throttle-initial"] == 10 and s.params["max-bandwidth"] == 128 * MIB


def test_lease_handover_pauses_before_switchover() -> None:
    s = source_settings(F.LIVE, MigrationParams(), pause_before_switchover=True)
    assert s.caps["pause-before-switchover"]
