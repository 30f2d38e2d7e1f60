"""Starting qemu in a transient systemd scope (``machine.slice``), when systemd is init.

Why a scope: a service's ``KillMode=`` decides what ``systemctl stop`` kills in
*the service's own cgroup*. A qemu that stays in the agent's cgroup is at the
mercy of that setting (and of every resource limit and device policy of the
agent's unit). Moved into its own scope unit under ``machine.slice`` (where
libvirt and systemd-machined put VMs too), qemu is outside the agent's cgroup
altogether: restarting, stopping or upgrading ``ferry-source`` or
``ferry-destination`` cannot touch it, and ``systemctl status`` /
``systemd-cgls`` show each VM as its own unit. Where systemd is not the init
system there are no units to create; qemu then runs detached (own session,
``-daemonize``) as before.

How: ``systemd-run --scope ... -- QEMU-ARGV``, run by the same detached launcher
:func:`ferry.qemu.process.launch` uses for qemu itself. systemd-run
(``src/run/run.c``, ``start_transient_scope()``) asks the manager for a
transient scope whose ``PIDs``/``PIDFDs`` property is *its own* pid
(``getpid()``), waits until the start job is done, and then ``execvpe()``\\ s the
command **in its own process** (systemd-run(1): "it will be executed by
systemd-run itself as parent process and will thus inherit the execution
environment of the caller"). So:

* the process the scope is created for *is* qemu (same pid, same session,
  stdio and environment; no extra systemd-run process stays around);
* qemu's ``-daemonize`` forks stay in that cgroup (children inherit their
  parent's cgroup), and a scope lives as long as *any* process is in it
  (systemd.scope(5): scopes have no "main" process; their lifetime is bound to
  "the existence of at least one process in the scope"), so the launcher
  process exiting after daemonizing does not end the scope;
* the launcher's exit status is still qemu's start verdict, the pid in the
  pidfile is still the qemu to track, and nothing in launch/reconnect changes.

Execution properties are inherited from the caller, not set by the scope: qemu
keeps the agent's mount namespace, capability bounding set, seccomp filter and
no_new_privs. Cgroup-based properties are the exception: the device policy of
the agent's unit (``DevicePolicy=closed`` + ``DeviceAllow=``) applies to the
agent's cgroup, not to the scope, so :data:`DEFAULT_SCOPE_PROPERTIES` repeats
it for the scope (extend it with ``[qemu] scope_properties``).

Why no ``--quiet``: with ``--quiet`` systemd-run prints neither the reason a
start job failed nor its "Running scope as unit: NAME" line. That line is
printed immediately before the ``execvpe()``, so it is the proof that the
scope exists and the exec happened: its absence from stderr means systemd-run
itself failed (no D-Bus, access denied, unit exists...) and qemu never ran.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from ferry.errors import QemuLaunchError

__all__ = [
    "CGROUP_MODES",
    "DEFAULT_SCOPE_PROPERTIES",
    "SCOPE_SLICE",
    "SYSTEMD_BOOTED_PATH",
    "CgroupMode",
    "ScopeRequest",
    "escape_unit_component",
    "find_systemd_run",
    "scope_for",
    "scope_unit_name",
    "split_scope_marker",
    "systemd_booted",
    "systemd_run_argv",
    "systemd_run_env",
    "systemd_run_version",
    "use_scope",
]

CgroupMode = Literal["auto", "scope", "detached"]
#: Values of ``[qemu] cgroup``.
CGROUP_MODES: Final[tuple[str, ...]] = ("auto", "scope", "detached")

#: sd_booted(3): "checks whether the directory /run/systemd/system/ exists".
SYSTEMD_BOOTED_PATH: Final = Path("/run/systemd/system")

SCOPE_SLICE: Final = "machine.slice"
_UNIT_PREFIX: Final = "ferry-qemu-"
_UNIT_SUFFIX: Final = ".scope"
# unit_name_is_valid(): strlen(name) < UNIT_NAME_MAX (256).
_UNIT_NAME_MAX: Final = 255
_TOKEN_LEN: Final = 8

#: The agent units' device policy, repeated for the scope (a cgroup setting:
#: it does not follow qemu out of the agent's cgroup). Nodes that do not
#: exist on a host are skipped by systemd with a note in its log.
DEFAULT_SCOPE_PROPERTIES: Final[tuple[str, ...]] = (
    "DevicePolicy=closed",
    "DeviceAllow=/dev/kvm rw",
    "DeviceAllow=/dev/net/tun rw",
    "DeviceAllow=/dev/vhost-net rw",
    "DeviceAllow=/dev/vhost-vsock rw",
)

# systemd's unit_name_escape(): these stay, "/" becomes "-", everything else
# (including "-" and "\\") becomes \xNN per byte; a leading "." too.
_KEEP = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:_.")
_PROPERTY_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*=[^\n\r\0]*")
# systemd 254 added --expand-environment=; scopes do not expand by default
# there, but systemd announces that this default will change.
_EXPAND_ENV_SINCE = 254


def systemd_booted(path: Path | None = None) -> bool:
    """True when systemd is the init system (the sd_booted() rule).

    ``path`` overrides :data:`SYSTEMD_BOOTED_PATH` (tests).
    """
    return (path or SYSTEMD_BOOTED_PATH).is_dir()


def use_scope(mode: str, *, booted_path: Path | None = None) -> bool:
    """Resolve ``[qemu] cgroup``: True for a scope, False for plain detached.

    :raises QemuLaunchError: ``mode`` is not one of :data:`CGROUP_MODES`.
    """
    if mode == "scope":
        return True
    if mode == "detached":
        return False
    if mode == "auto":
        return systemd_booted(booted_path)
    raise QemuLaunchError(f"[qemu] cgroup: expected one of {', '.join(CGROUP_MODES)}, got {mode!r}")


def _escape_pieces(text: str) -> list[str]:
    """systemd's unit_name_escape(), one piece per character of ``text``."""
    pieces: list[str] = []
    for index, char in enumerate(text):
        piece = []
        for byte in char.encode():
            if byte == ord("/"):
                piece.append("-")
            elif byte in _KEEP and not (index == 0 and byte == ord(".")):
                piece.append(chr(byte))
            else:
                piece.append(f"\\x{byte:02x}")
        pieces.append("".join(piece))
    return pieces


def escape_unit_component(text: str) -> str:
    """``systemd-escape TEXT`` (not ``--path``): a string safe inside a unit name."""
    return "".join(_escape_pieces(text))


def scope_unit_name(domain_name: str, token: str | None = None) -> str:
    """``ferry-qemu-<escaped name>-<token>.scope`` for one launch of a domain.

    ``token`` (default: 8 random hex digits) is fresh for every launch, so a
    domain restarted (or migrated back) at once never collides with its
    previous scope while systemd is still collecting it ("Unit ... already
    exists"). The escaped name is cut, at a whole character, to keep the unit
    name within systemd's 255 characters; the token keeps it unique.
    """
    token = token or uuidlib.uuid4().hex[:_TOKEN_LEN]
    room = _UNIT_NAME_MAX - len(_UNIT_PREFIX) - len(token) - 1 - len(_UNIT_SUFFIX)
    escaped = ""
    for piece in _escape_pieces(domain_name):
        if len(escaped) + len(piece) > room:
            break
        escaped += piece
    return f"{_UNIT_PREFIX}{escaped}-{token}{_UNIT_SUFFIX}"


@dataclass(frozen=True)
class ScopeRequest:
    """The transient scope one qemu is started in."""

    unit: str
    description: str
    slice: str = SCOPE_SLICE
    properties: tuple[str, ...] = DEFAULT_SCOPE_PROPERTIES

    @property
    def where(self) -> str:
        """``machine.slice/NAME.scope``, for messages."""
        return f"{self.slice}/{self.unit}"


def scope_for(
    mode: str,
    domain_name: str,
    domain_uuid: str,
    *,
    extra_properties: Sequence[str] = (),
    booted_path: Path | None = None,
) -> ScopeRequest | None:
    """The scope to start ``domain_name``'s qemu in, or None to run it detached.

    :raises QemuLaunchError: bad ``mode`` or a malformed property.
    """
    if not use_scope(mode, booted_path=booted_path):
        return None
    for prop in extra_properties:
        if not _PROPERTY_RE.fullmatch(prop):
            raise QemuLaunchError(f"[qemu] scope_properties: {prop!r} is not NAME=VALUE")
    return ScopeRequest(
        unit=scope_unit_name(domain_name),
        description=f"Ferry qemu: domain {domain_name} ({domain_uuid})",
        properties=(*DEFAULT_SCOPE_PROPERTIES, *extra_properties),
    )


def find_systemd_run(scope: ScopeRequest) -> str:
    """The ``systemd-run`` on PATH.

    :raises QemuLaunchError: there is none (naming the unit we could not create).
    """
    found = shutil.which("systemd-run")
    if found is None:
        raise QemuLaunchError(
            f"cannot start qemu in scope {scope.where}: systemd-run is not on PATH "
            '(install systemd, or set [qemu] cgroup = "detached")',
            unit=scope.unit,
        )
    return found


_versions: dict[str, int | None] = {}


async def systemd_run_version(systemd_run: str, timeout: float = 10.0) -> int | None:
    """systemd's version number from ``systemd-run --version`` (cached per path).

    None when it cannot be told; callers then use only options every
    supported systemd (>= 236) knows.
    """
    if systemd_run in _versions:
        return _versions[systemd_run]
    version: int | None = None
    try:
        proc = await asyncio.create_subprocess_exec(
            systemd_run,
            "--version",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            async with asyncio.timeout(timeout):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            out = b""
        match = re.match(rb"\s*systemd\s+(\d+)", out)
        if match:
            version = int(match.group(1))
    except OSError:
        pass
    _versions[systemd_run] = version
    return version


def systemd_run_argv(
    systemd_run: str,
    scope: ScopeRequest,
    qemu_argv: Sequence[str],
    *,
    version: int | None = None,
) -> list[str]:
    """The argv that starts ``qemu_argv`` inside ``scope`` (a list: never a shell).

    ``--collect`` unloads the scope once empty even if it failed, so a failed
    start leaves no unit behind. ``--no-ask-password``: a daemon has nobody
    to ask. ``--expand-environment=no`` (systemd >= 254) keeps a ``$`` in a
    path or name literal whatever systemd's future default. Everything after
    ``--`` is qemu's argv, untouched.
    """
    argv = [
        systemd_run,
        "--scope",
        f"--slice={scope.slice}",
        f"--unit={scope.unit}",
        f"--description={scope.description}",
        "--collect",
        "--no-ask-password",
    ]
    if version is not None and version >= _EXPAND_ENV_SINCE:
        argv.append("--expand-environment=no")
    argv += [f"--property={prop}" for prop in scope.properties]
    argv.append("--")
    argv += list(qemu_argv)
    return argv


def systemd_run_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for systemd-run: its messages, uncoloured, on our stderr file.

    Level info guarantees the "Running ... as unit" line (see the module
    docstring); the console target keeps a JOURNAL_STREAM inherited from the
    agent's unit from sending them to the journal instead. qemu inherits
    these variables (systemd-run execs it with its own environment); qemu
    does not read them.
    """
    env = dict(os.environ if base is None else base)
    env.update(SYSTEMD_LOG_LEVEL="info", SYSTEMD_LOG_TARGET="console", SYSTEMD_COLORS="0")
    return env


def split_scope_marker(stderr: str, scope: ScopeRequest) -> tuple[bool, str]:
    """Find systemd-run's "Running [scope ]as unit: NAME" line in ``stderr``.

    Returns (found, the rest of stderr without that line): found means the
    scope was started and qemu exec'd in it, so the rest is qemu's own output.
    (systemd 252 prints "Running scope as unit: NAME", 256 "Running as unit:
    NAME; invocation ID: ...".)
    """
    found = False
    rest: list[str] = []
    needle = f"as unit: {scope.unit}"
    for line in stderr.splitlines():
        if not found and line.startswith("Running ") and needle in line:
            found = True
            continue
        rest.append(line)
    return found, "\n".join(rest).strip()
