"""Offline migration's decisions, sans-I/O (``migrate --offline --persistent``).

An offline migration moves a domain's *persistent definition* to another
host and nothing else: no qemu starts on the destination, the source's
copy stays as it was (running or not), and no fence is written since the
VM did not move.  libvirt's rules (``VIR_MIGRATE_OFFLINE``) are the model:
the flag needs ``--persistent``, refuses storage copy, tunnelling,
post-copy and ``--live`` (:func:`ferry.flags.validate` checks those); a
domain that is not running may use it; Prepare defines nothing and Finish
defines the domain, inactive.

The agents gather the facts (definitions, status files, the Finish
reply) and call the functions here; the functions decide and never touch
a file or a socket.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ferry.allowed import is_allowed, refusal
from ferry.domain import Domain
from ferry.errors import DomainExists, MigrationRefused

__all__ = [
    "PENDING_LIMIT",
    "PENDING_TTL_S",
    "ConfirmAction",
    "Pending",
    "PendingBook",
    "confirm_action",
    "define_decision",
    "source_refusal",
]

#: How long a Prepare(offline) waits for its Finish before it is forgotten
#: (nothing was created for it: forgetting is the whole cleanup).
PENDING_TTL_S = 300.0
#: At most this many offline Prepares wait for their Finish at once.
PENDING_LIMIT = 64


def source_refusal(
    name: str, definition: Domain | None, *, snapshots: Sequence[str], fenced: str | None = None
) -> None:
    """Begin's refusals of an offline migration (the flag rules are checked before).

    ``definition`` is the domain's persistent definition (None: transient).
    The remote rules are :func:`ferry.allowed.is_allowed`'s with
    ``memory=False``: nothing of the running VM moves, so qemu's migration
    blockers (host devices, virtiofs) do not apply, nor do cache modes or an
    I/O error (libvirt skips those checks with ``VIR_MIGRATE_OFFLINE``);
    snapshot metadata, which would stay behind, does.

    Raises:
        MigrationRefused: an unsettled fence (``fenced`` says which), a
            transient domain (no definition to move), snapshots.
    """
    if fenced:
        raise MigrationRefused(
            f"cannot migrate domain '{name}' offline: {fenced} (see 'ferryctl dominfo {name}'; "
            f"'ferryctl migrate-recover {name}' settles an unknown outcome)", name=name,
        )  # fmt: skip
    if definition is None:
        raise MigrationRefused(
            f"cannot migrate domain '{name}' offline: it is transient (it has no persistent "
            "definition to move); define it first, or migrate it live", name=name,
        )  # fmt: skip
    problems = is_allowed(definition, True, snapshots=snapshots, memory=False)
    if problems:
        raise MigrationRefused(refusal(name, "migrate", problems),
                               problems=[p.message for p in problems])  # fmt: skip


def define_decision(
    name: str,
    uuid: str,
    host: str,
    *,
    defined_uuid: str | None,
    running_uuid: str | None,
    uuid_defined_as: str | None,
    uuid_running_as: str | None,
) -> bool:
    """May the destination define ``name``/``uuid`` (inactive)? True: it updates one.

    The facts: ``defined_uuid`` is the UUID of this host's definition named
    ``name`` (None: none); ``running_uuid`` that of a running domain named
    ``name``; ``uuid_defined_as``/``uuid_running_as`` the name of a defined
    or running domain with ``uuid``.  As libvirt: a domain of that name with
    another UUID is refused, one that runs here is refused (offline
    migration only adds a definition), and an inactive one with the same
    name and UUID is redefined (updated).

    Raises:
        DomainExists: naming the domain in the way.
    """
    if running_uuid is not None or uuid_running_as is not None:
        running = name if running_uuid is not None else uuid_running_as
        raise DomainExists(
            f"cannot migrate domain '{name}' offline to {host}: domain '{running}' "
            f"({running_uuid or uuid}) is running there", name=name,
        )  # fmt: skip
    if defined_uuid is not None and defined_uuid != uuid:
        raise DomainExists(
            f"cannot migrate domain '{name}' offline to {host}: a domain of that name is "
            f"defined there with another uuid ({defined_uuid}, not {uuid})", name=name,
        )  # fmt: skip
    if uuid_defined_as is not None and uuid_defined_as != name:
        raise DomainExists(
            f"cannot migrate domain '{name}' offline to {host}: uuid {uuid} is defined there "
            f"as '{uuid_defined_as}'", name=name, uuid=uuid,
        )  # fmt: skip
    return defined_uuid is not None


class ConfirmAction(enum.StrEnum):
    """What the source does with its definition at Confirm."""

    #: Finish defined it there; the source keeps its own (no --undefine-source).
    KEEP = "keep"
    #: Finish defined it there and --undefine-source was given.
    UNDEFINE = "undefine"
    #: The migration failed or was cancelled: nothing changes here.
    NOTHING = "nothing"
    #: Finish's answer was lost: B may or may not have it; ours stays.
    KEEP_UNKNOWN = "keep-unknown"


def confirm_action(*, undefine_source: bool, finish: str) -> ConfirmAction:
    """Confirm's action from Finish's result (``completed``, ``failed`` or ``unknown``).

    The source's definition goes only once the destination *said* it has
    its own: with the answer lost, two definitions are harmless, none
    would lose the domain.
    """
    if finish == "completed":
        return ConfirmAction.UNDEFINE if undefine_source else ConfirmAction.KEEP
    if finish == "unknown":
        return ConfirmAction.KEEP_UNKNOWN if undefine_source else ConfirmAction.NOTHING
    return ConfirmAction.NOTHING


@dataclass
class Pending:
    """One Prepare(offline) waiting for its Finish: the definition to write."""

    migration_id: str
    name: str
    #: The domain as the migrate hook left it (a :class:`~ferry.domain.Domain`).
    domain: Any
    source_host: str
    created: float


@dataclass
class PendingBook:
    """The destination's offline Prepares waiting for Finish, in memory only.

    Nothing exists on disk for them (Prepare defines nothing), so an entry
    that outlives :data:`PENDING_TTL_S` or an agent restart is simply gone:
    its Finish is then refused and the source keeps its definition.
    Time is passed in: the book never reads a clock.
    """

    ttl_s: float = PENDING_TTL_S
    limit: int = PENDING_LIMIT
    entries: dict[str, Pending] = field(default_factory=dict)

    def expire(self, now: float) -> list[Pending]:
        """Forget the entries older than the TTL; the ones forgotten."""
        old = [p for p in self.entries.values() if now - p.created > self.ttl_s]
        for p in old:
            del self.entries[p.name]
        return old

    def add(self, pending: Pending, now: float) -> None:
        """Keep ``pending`` until its Finish (replacing a stale one of the same domain).

        Raises:
            MigrationRefused: another offline migration of that domain waits
                for its Finish, or too many wait.
        """
        self.expire(now)
        other = self.entries.get(pending.name)
        if other is not None and other.migration_id != pending.migration_id:
            raise MigrationRefused(
                f"domain '{pending.name}' is busy: offline migration {other.migration_id} "
                f"from {other.source_host} waits for its Finish", name=pending.name,
            )  # fmt: skip
        if other is None and len(self.entries) >= self.limit:
            raise MigrationRefused(
                f"too many offline migrations wait for their Finish here ({self.limit})"
            )
        self.entries[pending.name] = pending

    def take(self, name: str, migration_id: str | None, now: float) -> Pending | None:
        """Remove and return the entry of ``name`` (and ``migration_id`` when given)."""
        self.expire(now)
        pending = self.entries.get(name)
        if pending is None or (migration_id and pending.migration_id != migration_id):
            return None
        del self.entries[name]
        return pending

    def describe(self) -> list[dict[str, Any]]:
        """The waiting entries, for ``agent_state``."""
        return [{"name": p.name, "migration_id": p.migration_id, "source_host": p.source_host}
                for p in self.entries.values()]  # fmt: skip
