"""Access control: who may run which op on which domain.

Checks run *after* the domain XML has been parsed, so a rule about domain
names sees the real name and UUID the XML declares, not whatever string the
caller put in the request.  Root is always allowed on the local admin
sockets (as with libvirt's polkit default for root); every other caller must
match a rule.  Peer agents (TLS, certificate from our CA) are trusted until a
rule names peers at all; from then on they too must match a rule.
Operators (TLS, an operator certificate from ``ferryctl pki client``) are
never trusted by default: every op needs a rule naming them in
``operators``, and a rule's ``peers`` never matches an operator (nor its
``operators`` a host).
"""

from __future__ import annotations

import fnmatch
import grp
import pwd
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ferry.errors import AccessDenied

if TYPE_CHECKING:
    # Only a type here: ferryctl imports this module (through ferry.rpc) and
    # need not pay for parsing the TOML machinery at every start.
    from ferry.config import ACLRule
    from ferry.tls import PeerIdentity

__all__ = ["Subject", "check_access", "subject_from_identity", "subject_from_ucred"]


@dataclass(frozen=True)
class Subject:
    """The caller of an op: a local user (admin socket), a peer agent or an
    operator (both TLS, told apart by the certificate)."""

    kind: str  # "local", "peer" or "operator"
    uid: int | None = None
    user: str | None = None
    groups: frozenset[str] = field(default_factory=frozenset)
    peer: str | None = None  # certificate common name of a peer agent
    #: The peer certificate's DNS subjectAltNames (an ACL rule may name those too).
    peer_names: tuple[str, ...] = ()
    #: The operator name of an operator certificate (kind "operator").
    operator: str | None = None

    @property
    def is_root(self) -> bool:
        """True for uid 0 on a local socket."""
        return self.kind == "local" and self.uid == 0

    def describe(self) -> str:
        """A human name for error messages."""
        if self.kind == "peer":
            return f"peer {self.peer!r}"
        if self.kind == "operator":
            return f"operator {self.operator!r}"
        return f"user {self.user or self.uid!r}"


def subject_from_ucred(uid: int, gid: int) -> Subject:
    """Build a local subject from SO_PEERCRED credentials (names resolved)."""
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    groups: set[str] = set()
    try:
        groups.add(grp.getgrgid(gid).gr_name)
    except KeyError:
        groups.add(str(gid))
    for entry in grp.getgrall():
        if user in entry.gr_mem:
            groups.add(entry.gr_name)
    return Subject(kind="local", uid=uid, user=user, groups=frozenset(groups))


def subject_from_identity(identity: PeerIdentity) -> Subject:
    """The subject of a verified TLS peer: an operator if its certificate
    says so (``ferry:operator:NAME``), else a peer agent."""
    if identity.operator is not None:
        return Subject(kind="operator", operator=identity.operator)
    return Subject(kind="peer", peer=identity.common_name, peer_names=identity.dns_names)


def _matches_subject(rule: ACLRule, subject: Subject) -> bool:
    if subject.kind == "operator":
        name = subject.operator or ""
        return bool(name) and any(fnmatch.fnmatchcase(name, p) for p in rule.operators)
    if subject.kind == "peer":
        names = [n for n in (subject.peer, *subject.peer_names) if n] or [""]
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in rule.peers)
    if subject.user is not None and any(fnmatch.fnmatchcase(subject.user, p) for p in rule.users):
        return True
    return any(fnmatch.fnmatchcase(g, p) for g in subject.groups for p in rule.groups)


def check_access(
    rules: tuple[ACLRule, ...],
    subject: Subject,
    op: str,
    domain: str | None = None,
    domain_uuid: str | None = None,
) -> None:
    """Allow or refuse ``op`` on ``domain`` for ``subject``.

    A domain pattern matches the name or the UUID.  Local root is allowed.

    Raises:
        AccessDenied: naming the op, the domain and the subject.
    """
    if subject.is_root:
        return
    # Peer agents are authenticated by our CA; until the operator writes a
    # rule naming peers, every peer the CA vouches for is trusted.
    if subject.kind == "peer" and not any(rule.peers for rule in rules):
        return
    for rule in rules:
        if not _matches_subject(rule, subject):
            continue
        if not any(fnmatch.fnmatchcase(op, p) for p in rule.ops):
            continue
        if domain is None and domain_uuid is None:
            return
        candidates = [c for c in (domain, domain_uuid) if c]
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in rule.domains):
            return
    target = f" on domain {domain!r}" if domain else ""
    hint = ""
    if subject.kind == "operator" and not any(_matches_subject(rule, subject) for rule in rules):
        hint = " (no [[acl]] rule names it in operators)"
    raise AccessDenied(
        f"access denied: {subject.describe()} may not run {op!r}{target}{hint}",
        op=op,
        domain=domain,
    )
