"""ferry.lease: disk leases held by detached holder processes, with real processes.

Every test gets its own lockspace directory; the fixture kills every holder
whose command line names it (also holders started by a helper process, or
left by a failed test) and every dummy process the test started. Waits are
on conditions (pidfds, process state), never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from ferry import lease as lease_mod
from ferry.errors import DomainError, LeaseBusy, StateFileError, from_wire
from ferry.lease import LeaseManager, LeaseOwner, LeaseRecord, lease_path
from ferry.lease_holder import proc_stat

# A holder that hangs must fail its test, not the whole run.
pytestmark = pytest.mark.timeout(30)

HOST_A = LeaseOwner(host_uuid="uuid-host-a", host_name="a", domain="g1", domain_uuid="dom-1")
HOST_B = LeaseOwner(host_uuid="uuid-host-b", host_name="b", domain="g2", domain_uuid="dom-2")

T = TypeVar("T")


def _holders_in(lockspace: Path) -> list[int]:
    """Pids of live (non-zombie) lease holders working on ``lockspace``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ferry.lease_holder" in argv and str(lockspace).encode() in argv:
            stat = proc_stat(int(entry))
            if stat is not None and stat[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def _kill_and_wait(pid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], 10)
    finally:
        os.close(pidfd)


def _exits_within(pid: int, timeout: float) -> bool:
    """Wait on a pidfd (already-gone counts as exited)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def _alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


async def _wait_until(cond: Callable[[], T], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def lockspace(tmp_path: Path) -> Iterator[Path]:
    space = tmp_path / "lockspace"
    space.mkdir()
    try:
        yield space
    finally:
        for pid in _holders_in(space):
            _kill_and_wait(pid)
        lease_mod._reap_exited()  # collect the ones this process started


@pytest.fixture
def dummies() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start ``sleep 600`` processes that are killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "600"])
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.fixture
def disks(tmp_path: Path) -> list[str]:
    # The files need not exist: a lease is about the path.
    return [str(tmp_path / "disks" / f"{n}.img") for n in ("a", "b", "c", "d")]


def _start_time(pid: int) -> int:
    stat = proc_stat(pid)
    assert stat is not None
    return stat[1]


# --- pure helpers -----------------------------------------------------------


def test_lease_path_normalises_and_refuses_relative(tmp_path: Path) -> None:
    one = lease_path(tmp_path, "/x/a.img")
    assert one.parent == tmp_path and one.name.endswith(".lease") and len(one.stem) == 64
    assert lease_path(tmp_path, "/x/./y/../a.img") == one
    assert lease_path(tmp_path, "/x//a.img") == one
    assert lease_path(tmp_path, "/x/b.img") != one
    for bad in ("x/a.img", "./a.img", "", "a.img"):
        with pytest.raises(ValueError, match="absolute"):
            lease_path(tmp_path, bad)
    with pytest.raises(ValueError, match="NUL"):
        lease_path(tmp_path, "/x/a\0.img")


def test_record_round_trip_and_validation() -> None:
    record = LeaseRecord(holder_pid=42, holder_start_time=12345, disks=("/a", "/b"))
    data = json.loads(json.dumps(record.to_dict()))
    assert LeaseRecord.from_dict(data) == record
    bad: object
    for bad in (
        [],
        {"holder_start_time": 1, "disks": []},
        {"holder_pid": True, "holder_start_time": 1, "disks": []},
        {"holder_pid": 1, "holder_start_time": "1", "disks": []},
        {"holder_pid": 1, "holder_start_time": 1, "disks": "/a"},
        {"holder_pid": 1, "holder_start_time": 1, "disks": [1]},
    ):
        with pytest.raises(StateFileError):
            LeaseRecord.from_dict(bad)


def test_lease_busy_is_a_domain_error_on_the_wire() -> None:
    exc = LeaseBusy("disk /a is in use by domain 'g1' on host 'a'", disk="/a")
    assert isinstance(exc, DomainError) and exc.code == "lease-busy"
    again = from_wire(exc.to_wire())
    assert type(again) is LeaseBusy and again.details["disk"] == "/a"


# --- acquire / busy / release -------------------------------------------------


async def test_empty_disk_list_locks_nothing(lockspace: Path) -> None:
    manager = LeaseManager(lockspace)
    assert await manager.acquire(HOST_A, []) is None
    assert _holders_in(lockspace) == []
    assert manager.inspect() == []


async def test_acquire_holds_every_disk_and_names_its_owner(
    lockspace: Path, disks: list[str]
) -> None:
    manager = LeaseManager(lockspace)
    record = await manager.acquire(HOST_A, [disks[0], disks[1], disks[0] + "/../a.img"])
    assert record is not None
    assert record.disks == (disks[0], disks[1])  # normalised, deduplicated
    assert manager.holder_alive(record)
    assert _holders_in(lockspace) == [record.holder_pid]
    for disk in disks[:2]:
        assert lease_path(lockspace, disk).exists()
        owner = manager.owner_of(disk)
        assert owner is not None
        assert owner["host_uuid"] == "uuid-host-a" and owner["host_name"] == "a"
        assert owner["domain"] == "g1" and owner["domain_uuid"] == "dom-1"
        assert owner["holder_pid"] == record.holder_pid and owner["disk"] == disk
        assert owner["acquired"] == pytest.approx(time.time(), abs=60)
    assert manager.owner_of(disks[2]) is None
    listing = manager.inspect()
    assert [(e["disk"], e["held"]) for e in listing] == [(disks[0], True), (disks[1], True)]
    assert listing[0]["owner"]["domain"] == "g1"


async def test_overlapping_acquire_is_refused_and_takes_nothing(
    lockspace: Path, disks: list[str]
) -> None:
    host_a, host_b = LeaseManager(lockspace), LeaseManager(lockspace)
    first = await host_a.acquire(HOST_A, disks[:2])
    assert first is not None
    # Holders lock in lease-file order: give the second one a free disk that
    # comes before A's b.img (so it takes that one, then must give it back)
    # and one that comes after it.
    busy_name = lease_path(lockspace, disks[1]).name
    free = {False: "", True: ""}
    for n in range(1000):
        disk = str(Path(disks[1]).with_name(f"free-{n}.img"))
        free[lease_path(lockspace, disk).name < busy_name] = disk
        if all(free.values()):
            break
    before, after = free[True], free[False]
    assert before and after

    with pytest.raises(LeaseBusy) as info:
        await host_b.acquire(HOST_B, [after, disks[1], before])
    assert str(info.value) == f"disk {disks[1]} is in use by domain 'g1' on host 'a'"
    assert info.value.details["disk"] == disks[1]
    assert info.value.details["owner"]["host_uuid"] == "uuid-host-a"
    # The refused holder has exited and left nothing locked ...
    assert _holders_in(lockspace) == [first.holder_pid]
    assert lease_path(lockspace, before).exists()  # it was taken, then dropped
    assert host_a.owner_of(before) is None and host_a.owner_of(after) is None
    # ... while the first one still holds all of its disks.
    assert host_a.holder_alive(first)
    for disk in disks[:2]:
        owner = host_b.owner_of(disk)
        assert owner is not None and owner["domain"] == "g1"
    held = {e["disk"]: e["held"] for e in host_b.inspect()}
    assert held == {disks[0]: True, disks[1]: True, before: False}
    assert await host_b.acquire(HOST_B, [before, after]) is not None


async def test_release_frees_the_disks_for_another_host(lockspace: Path, disks: list[str]) -> None:
    host_a, host_b = LeaseManager(lockspace), LeaseManager(lockspace)
    first = await host_a.acquire(HOST_A, disks[:2])
    assert first is not None
    await host_a.release(first)
    assert not host_a.holder_alive(first)
    assert host_a.owner_of(disks[0]) is None and host_a.owner_of(disks[1]) is None
    await host_a.release(first)  # idempotent

    second = await host_b.acquire(HOST_B, disks[1:3])
    assert second is not None
    owner = host_a.owner_of(disks[1])
    assert owner is not None and owner["host_name"] == "b" and owner["domain"] == "g2"
    await host_b.release(second)


async def test_a_holder_waits_out_a_brief_inspection(lockspace: Path, disks: list[str]) -> None:
    # owner_of tests a lease with a shared flock; a holder trying the lease at
    # that very moment must wait, not report the disk as busy.
    path = lease_path(lockspace, disks[0])
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        manager = LeaseManager(lockspace)
        task = asyncio.create_task(manager.acquire(HOST_A, disks[:1]))

        def holder_opened_lease() -> bool:
            for pid in _holders_in(lockspace):
                with contextlib.suppress(OSError):
                    for entry in os.listdir(f"/proc/{pid}/fd"):
                        if os.readlink(f"/proc/{pid}/fd/{entry}") == str(path):
                            return True
            return False

        await _wait_until(holder_opened_lease, 5)
    finally:
        os.close(fd)
    record = await task
    assert record is not None and manager.owner_of(disks[0]) is not None


# --- the guard --------------------------------------------------------------


async def test_holder_exits_when_its_guard_exits(
    lockspace: Path, disks: list[str], dummies: Callable[[], subprocess.Popen[bytes]]
) -> None:
    qemu = dummies()
    manager = LeaseManager(lockspace)
    record = await manager.acquire(
        HOST_A, disks[:2], guard_pid=qemu.pid, guard_start_time=_start_time(qemu.pid)
    )
    assert record is not None and manager.holder_alive(record)
    holder_fd = os.pidfd_open(record.holder_pid)
    try:
        qemu.kill()
        assert select.select([holder_fd], [], [], 10)[0], "holder outlived its guard"
    finally:
        os.close(holder_fd)
    assert not manager.holder_alive(record)
    assert manager.owner_of(disks[0]) is None and manager.owner_of(disks[1]) is None
    await manager.release(record)  # reaps the exited holder, no error
    assert await LeaseManager(lockspace).acquire(HOST_B, disks[:1]) is not None


async def test_guard_already_gone_or_reused_is_refused(
    lockspace: Path, disks: list[str], dummies: Callable[[], subprocess.Popen[bytes]]
) -> None:
    manager = LeaseManager(lockspace)
    qemu = dummies()
    start = _start_time(qemu.pid)
    with pytest.raises(DomainError, match=r"guard process \d+ has exited \(pid reused"):
        await manager.acquire(HOST_A, disks[:1], guard_pid=qemu.pid, guard_start_time=start + 1)
    qemu.kill()
    qemu.wait()
    with pytest.raises(DomainError, match=rf"guard process {qemu.pid} has exited"):
        await manager.acquire(HOST_A, disks[:1], guard_pid=qemu.pid, guard_start_time=start)
    assert _holders_in(lockspace) == []
    assert manager.owner_of(disks[0]) is None


# --- independence from the starting process -----------------------------------

_STARTER = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from ferry.lease import LeaseManager, LeaseOwner

    async def main() -> None:
        manager = LeaseManager(Path(sys.argv[1]))
        owner = LeaseOwner("uuid-host-a", "a", "g1", "dom-1")
        record = await manager.acquire(owner, sys.argv[2:])
        print(json.dumps(record.to_dict()))

    asyncio.run(main())
    """
)


async def test_holder_survives_the_process_that_started_it(
    lockspace: Path, disks: list[str]
) -> None:
    # The starter exits right after acquire (like an agent killed -9); its
    # stdout reaching EOF also shows the holder kept none of its fds.
    starter = subprocess.Popen(
        [sys.executable, "-c", _STARTER, str(lockspace), *disks[:2]],
        stdout=subprocess.PIPE,
    )
    out, _ = starter.communicate(timeout=20)
    assert starter.returncode == 0
    record = LeaseRecord.from_dict(json.loads(out))
    manager = LeaseManager(lockspace)
    assert manager.holder_alive(record)
    stat = Path(f"/proc/{record.holder_pid}/stat").read_text()
    assert int(stat.rsplit(")", 1)[1].split()[1]) != starter.pid  # reparented
    owner = manager.owner_of(disks[0])
    assert owner is not None and owner["holder_pid"] == record.holder_pid
    with pytest.raises(LeaseBusy):
        await manager.acquire(HOST_B, disks[1:2])

    # Another process (a restarted agent) releases it from the record.
    await manager.release(record)
    assert not manager.holder_alive(record)
    assert manager.owner_of(disks[0]) is None and manager.owner_of(disks[1]) is None


async def test_release_of_a_stale_record_spares_unrelated_processes(
    lockspace: Path, dummies: Callable[[], subprocess.Popen[bytes]]
) -> None:
    manager = LeaseManager(lockspace)
    other = dummies()
    start = _start_time(other.pid)
    # Same pid, other start time: the pid was reused.
    await manager.release(LeaseRecord(other.pid, start + 1, ("/x/a.img",)))
    # Same pid and start time, but not a lease holder.
    await manager.release(LeaseRecord(other.pid, start, ("/x/a.img",)))
    assert not manager.holder_alive(LeaseRecord(other.pid, start, ("/x/a.img",)))
    assert not _exits_within(other.pid, 0) and other.poll() is None
    assert _alive(other.pid)


# --- failures leave nothing behind ------------------------------------------


async def test_cancelled_acquire_leaves_no_holder(lockspace: Path, disks: list[str]) -> None:
    manager = LeaseManager(lockspace)
    task = asyncio.create_task(manager.acquire(HOST_A, disks[:2]))
    pids = await _wait_until(lambda: _holders_in(lockspace))
    assert task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(_exits_within(pid, 0) for pid in pids)
    assert _holders_in(lockspace) == []
    assert manager.owner_of(disks[0]) is None and manager.owner_of(disks[1]) is None


async def test_unresponsive_holder_is_killed_after_the_timeout(
    lockspace: Path, tmp_path: Path, disks: list[str]
) -> None:
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\nexec sleep 600\n")
    fake.chmod(0o755)
    manager = LeaseManager(lockspace, python=str(fake))
    t0 = time.monotonic()
    with pytest.raises(DomainError, match=r"did not answer within 0\.5s") as info:
        await manager.acquire(HOST_A, disks[:1], timeout=0.5)
    assert time.monotonic() - t0 < 5
    pid = info.value.details["pid"]
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped


async def test_holder_that_cannot_start_or_crashes(
    lockspace: Path, tmp_path: Path, disks: list[str]
) -> None:
    with pytest.raises(DomainError, match="cannot start the lease holder"):
        await LeaseManager(lockspace, python="/nonexistent/python").acquire(HOST_A, disks[:1])
    crash = tmp_path / "crash-python"
    crash.write_text("#!/bin/sh\necho 'holder: broken install' >&2\nexit 7\n")
    crash.chmod(0o755)
    with pytest.raises(DomainError, match=r"status 7\): holder: broken install"):
        await LeaseManager(lockspace, python=str(crash)).acquire(HOST_A, disks[:1])


async def test_missing_lockspace_is_refused_not_created(tmp_path: Path, disks: list[str]) -> None:
    missing = tmp_path / "not-mounted"
    with pytest.raises(DomainError, match=r"lockspace directory .* does not exist"):
        await LeaseManager(missing).acquire(HOST_A, disks[:1])
    assert not missing.exists()
    assert LeaseManager(missing).inspect() == []
    assert LeaseManager(missing).owner_of(disks[0]) is None


async def test_no_fd_leak_in_the_caller(lockspace: Path, disks: list[str]) -> None:
    manager = LeaseManager(lockspace)
    before = _fd_count()
    for _ in range(3):
        record = await manager.acquire(HOST_A, disks[:2])
        assert record is not None
        with pytest.raises(LeaseBusy):
            await manager.acquire(HOST_B, disks[1:3])
        manager.owner_of(disks[0])
        manager.inspect()
        manager.holder_alive(record)
        await manager.release(record)
    assert _fd_count() == before
    assert lease_mod._CHILDREN == {}  # every holder this process started was reaped
