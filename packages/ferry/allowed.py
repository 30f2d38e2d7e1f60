"""What may be saved, dumped, snapshotted here, or migrated to another host.

libvirt's ``qemuMigrationSrcIsAllowed(vm, remote, …)`` idea, sans-I/O: one
check for every operation that takes the guest's state out of its qemu.
Some parts of a domain stop *every* such operation, because qemu itself
cannot serialise their state (host devices, vhost-user-fs, Hyper-V
passthrough: qemu's migration blockers, which a save to a file meets just
like a migration does). Others only stop a move to *another* host (snapshot
metadata that would stay behind, a guest paused on an I/O error with
``--abort-on-error``): a local save or dump of such a domain is fine.

:func:`is_allowed` returns the problems (empty: allowed);
:func:`refusal` words them for the operation ("cannot save domain 'x': …"
versus "cannot migrate domain 'x': …").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ferry.domain import Domain
from ferry.domain._filesystem import migration_blockers as fs_migration_blockers
from ferry.domain._hostdev import migration_blockers as hostdev_blockers

__all__ = ["Operation", "Problem", "is_allowed", "refusal", "unmigratable"]

#: The verbs the messages use.
Operation = Literal["migrate", "save", "dump", "snapshot"]


@dataclass(frozen=True)
class Problem:
    """One reason an operation is refused.

    ``remote_only``: it stops a move to another host but not a local
    save, dump or snapshot.
    """

    message: str
    remote_only: bool = False


def unmigratable(domain: Domain) -> list[str]:
    """What in ``domain`` qemu cannot serialise, each named with the reason.

    Such a domain still defines and starts; what takes its state out of qemu
    (migration, save, full dump, memory snapshot) is refused. Sound cards,
    USB redirection, spice agent channels, watchdogs, panic notifiers,
    iothreads, huge pages and memfd memory all migrate; host devices
    (``<hostdev>``) and virtiofs filesystems do not, nor does
    ``<hyperv mode='passthrough'>``.
    """
    found = hostdev_blockers(domain) + fs_migration_blockers(domain)
    if domain.features.hyperv_mode == "passthrough":
        found.append("<features><hyperv mode='passthrough'>: qemu blocks the migration of "
                     "'hv-passthrough' (it copies this host's Hyper-V features); list the "
                     "features with mode='custom' instead")
    return found


def is_allowed(
    domain: Domain,
    remote: bool,
    *,
    snapshots: Sequence[str] = (),
    io_error: bool = False,
    abort_on_error: bool = False,
    memory: bool = True,
) -> list[Problem]:
    """The problems that refuse taking ``domain``'s state out of qemu.

    Args:
        domain: the (live) definition.
        remote: the state goes to another host (migration); False for a
            local save, dump or snapshot.
        snapshots: names of the domain's snapshots (they would stay behind
            on a move: remote only).
        io_error: the guest is paused after an I/O error.
        abort_on_error: the caller asked to refuse a guest paused on an I/O
            error (``--abort-on-error``: remote only, as libvirt).
        memory: the operation serialises the device state (save, full dump,
            migration). A memory-only dump (``dump-guest-memory``) reads the
            guest RAM without it, so qemu's migration blockers do not apply.
    """
    found: list[Problem] = []
    if remote and snapshots:
        found.append(Problem(
            f"it has {len(snapshots)} snapshot(s) ({', '.join(snapshots)}) whose metadata "
            "would stay behind", remote_only=True))  # fmt: skip
    if memory:
        found += [Problem(m) for m in unmigratable(domain)]
    if remote and io_error and abort_on_error:
        found.append(Problem("it is paused after an I/O error and --abort-on-error was given",
                             remote_only=True))  # fmt: skip
    return found


def refusal(name: str, operation: Operation, problems: Sequence[Problem]) -> str:
    """One message for all ``problems``: "cannot save domain 'x': a; b"."""
    return f"cannot {operation} domain '{name}': " + "; ".join(p.message for p in problems)
