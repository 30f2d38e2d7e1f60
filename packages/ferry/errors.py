"""Ferry's one error hierarchy.

Every error carries a stable string ``code`` that travels on the wire, so an
error raised by an agent on one host is re-raised as the same class by
ferryctl or by the peer agent on another host (:func:`from_wire`).

::

    FerryError                      code "internal"
     ├── ProtocolError              "protocol"          bad bytes or envelope
     │    ├── FrameTooLarge         "frame-too-large"
     │    ├── FrameTruncated        "frame-truncated"
     │    ├── FrameGarbage          "frame-garbage"
     │    ├── MessageInvalid        "message-invalid"   a field of wrong type/range
     │    ├── UnknownOp             "unknown-op"
     │    ├── VersionMismatch       "version-mismatch"
     │    ├── FeatureMissing        "feature-missing"   peer's mandatory feature unknown
     │    └── CookieError           "cookie-invalid"
     │         └── CookieTooLarge   "cookie-too-large"
     ├── PhaseError                 "phase-order"       migration phase out of order
     ├── FlagError                  "flags-invalid"     nonsense flag combination
     ├── ConfigError                "config-invalid"
     ├── AccessDenied               "access-denied"     ACL or socket credentials
     │    └── PathNotAllowed        "path-not-allowed"  a host path outside [storage] allowed
     ├── AuthError                  "auth-failed"       TLS peer / tunnel token
     ├── XMLError                   "xml-invalid"       malformed or hostile XML
     │    ├── XMLUnsupported        "xml-unsupported"   element we refuse to drop silently
     │    ├── NameInvalid           "name-invalid"      a domain name that would not work here
     │    └── ABIError              "abi-unstable"      destination XML changes the guest ABI
     ├── DomainError                "domain"
     │    ├── NoDomain              "no-domain"
     │    ├── DomainExists          "domain-exists"
     │    ├── DomainState           "domain-state"      wrong run state for the op
     │    ├── SnapshotError         "snapshot"
     │    └── CpuStartError         "cpu-unsupported"   this host cannot run the named CPU model
     ├── JobError                   "job"
     │    ├── JobBusy               "job-busy"          another job holds the domain
     │    └── JobAborted            "job-aborted"
     ├── MigrationError             "migration"
     │    ├── MigrationRefused      "migration-refused" is_allowed / unsafe / same host
     │    │    └── CpuIncompatible  "cpu-incompatible"  destination lacks guest CPU features
     │    ├── MigrationFailed       "migration-failed"
     │    ├── MigrationTimeout      "migration-timeout"
     │    │    (TunnelError         "tunnel-failed"     a MigrationFailed: data connection broke)
     │    └── HookRefused           "hook-refused"
     ├── QemuError                  "qemu"
     │    ├── QemuLaunchError       "qemu-launch"
     │    └── QMPError              "qmp"
     └── NativeError                "native"            ferry_native missing or broken
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = [
    "ABIError",
    "AccessDenied",
    "AuthError",
    "ConfigError",
    "CookieError",
    "CookieTooLarge",
    "CpuIncompatible",
    "CpuStartError",
    "DeadlineUnreachable",
    "DomainError",
    "DomainExists",
    "DomainState",
    "FeatureMissing",
    "FerryError",
    "FlagError",
    "FrameGarbage",
    "FrameTooLarge",
    "FrameTruncated",
    "HookRefused",
    "JobAborted",
    "JobBusy",
    "JobError",
    "MessageInvalid",
    "MigrationError",
    "MigrationFailed",
    "MigrationRefused",
    "MigrationStalled",
    "MigrationTimeout",
    "NativeError",
    "NoDomain",
    "OutcomeUnknown",
    "PhaseError",
    "PostcopyPaused",
    "ProtocolError",
    "QMPError",
    "QemuError",
    "QemuLaunchError",
    "ReplyLost",
    "SnapshotError",
    "TunnelError",
    "UnknownOp",
    "VersionMismatch",
    "XMLError",
    "XMLUnsupported",
    "from_wire",
]

_REGISTRY: dict[str, type[FerryError]] = {}


class FerryError(Exception):
    """Base of every Ferry error; ``code`` is stable and travels on the wire."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        code = cls.__dict__.get("code")
        if code is not None:
            if code in _REGISTRY and _REGISTRY[code] is not cls:
                raise TypeError(f"error code {code!r} used twice")
            _REGISTRY[code] = cls

    def __str__(self) -> str:
        return self.message

    def to_wire(self) -> dict[str, Any]:
        """Return the ``error`` map of a reply: code, message, details."""
        return {"code": self.code, "message": self.message, "details": dict(self.details)}


_REGISTRY[FerryError.code] = FerryError


class ProtocolError(FerryError):
    """The peer sent bytes or an envelope that break the protocol."""

    code = "protocol"


class FrameTooLarge(ProtocolError):
    """A frame header announced more bytes than the configured limit."""

    code = "frame-too-large"


class FrameTruncated(ProtocolError):
    """The stream ended in the middle of a frame."""

    code = "frame-truncated"


class FrameGarbage(ProtocolError):
    """A frame body is not one msgpack map."""

    code = "frame-garbage"


class MessageInvalid(ProtocolError):
    """A message field is missing, of the wrong type or out of range."""

    code = "message-invalid"


class UnknownOp(ProtocolError):
    """A request named an operation this side does not know."""

    code = "unknown-op"


class VersionMismatch(ProtocolError):
    """The peers speak different major protocol versions."""

    code = "version-mismatch"


class FeatureMissing(ProtocolError):
    """The peer marked a feature mandatory that this side lacks."""

    code = "feature-missing"


class CookieError(ProtocolError):
    """A migration cookie is malformed or needs an unknown mandatory section."""

    code = "cookie-invalid"


class CookieTooLarge(CookieError):
    """An encoded cookie exceeds 16 KiB."""

    code = "cookie-too-large"


class PhaseError(FerryError):
    """A migration phase was attempted out of order; state is unchanged."""

    code = "phase-order"


class FlagError(FerryError):
    """A migration flag/parameter combination makes no sense."""

    code = "flags-invalid"


class ConfigError(FerryError):
    """The agent configuration is invalid."""

    code = "config-invalid"


class AccessDenied(FerryError):
    """The caller may not perform this operation on this domain."""

    code = "access-denied"


class AuthError(FerryError):
    """A peer failed authentication (certificate or tunnel token)."""

    code = "auth-failed"


class XMLError(FerryError):
    """Domain XML is malformed, hostile, or invalid."""

    code = "xml-invalid"


class XMLUnsupported(XMLError):
    """Domain XML uses an element or value Ferry refuses rather than drops."""

    code = "xml-unsupported"


class ABIError(XMLError):
    """A replacement domain XML would change the guest-visible ABI."""

    code = "abi-unstable"


class DomainError(FerryError):
    """A domain operation failed."""

    code = "domain"


class NoDomain(DomainError):
    """No domain with that name or UUID."""

    code = "no-domain"


class DomainExists(DomainError):
    """A domain with that name or UUID already exists."""

    code = "domain-exists"


class DomainState(DomainError):
    """The domain is in the wrong state for the operation."""

    code = "domain-state"


class SnapshotError(DomainError):
    """A snapshot metadata operation failed."""

    code = "snapshot"


class JobError(FerryError):
    """A job could not run."""

    code = "job"


class JobBusy(JobError):
    """Another job holds the domain."""

    code = "job-busy"


class JobAborted(JobError):
    """The job was aborted on request."""

    code = "job-aborted"


class MigrationError(FerryError):
    """A migration failed or was refused."""

    code = "migration"


class MigrationRefused(MigrationError):
    """A migration was refused before it started (checks in Begin/Prepare)."""

    code = "migration-refused"


class CpuIncompatible(MigrationRefused):
    """The destination cannot run the guest's CPU exactly (Prepare).

    ``details``: ``missing`` (the features this host lacks) or
    ``differences`` (host-passthrough: how the two hosts' CPUs differ).
    """

    code = "cpu-incompatible"


class MigrationFailed(MigrationError):
    """A migration started and failed."""

    code = "migration-failed"


class MigrationTimeout(MigrationError):
    """A migration did not finish within its timeout."""

    code = "migration-timeout"


class TunnelError(MigrationFailed):
    """A tunnel data connection failed (connect, relay, or the peer dropped it)."""

    code = "tunnel-failed"


class HookRefused(MigrationError):
    """The operator's migrate hook refused the migration."""

    code = "hook-refused"


class ReplyLost(MigrationFailed):
    """A request to a peer got no reply (timeout or lost connection): it may have acted."""

    code = "reply-lost"


class MigrationStalled(MigrationFailed):
    """No data moved for the stall timeout: the link looks down."""

    code = "migration-stalled"


class OutcomeUnknown(MigrationError):
    """The destination could not say whether it runs the VM; the source stays paused."""

    code = "outcome-unknown"


class PostcopyPaused(MigrationError):
    """A post-copy migration stopped half-way; only ``--postcopy-resume`` can finish it."""

    code = "postcopy-paused"


class DeadlineUnreachable(MigrationError):
    """The pre-flight says no allowed lever meets the requested ``--deadline``."""

    code = "deadline-unreachable"


class QemuError(FerryError):
    """Talking to or running qemu failed."""

    code = "qemu"


class CpuStartError(DomainError):
    """This host cannot run the domain's named CPU model exactly (start).

    ``details``: ``missing``, the features this host lacks.
    """

    code = "cpu-unsupported"


class QemuLaunchError(QemuError):
    """qemu could not be started."""

    code = "qemu-launch"


class QMPError(QemuError):
    """A QMP command failed."""

    code = "qmp"


class NativeError(FerryError):
    """The compiled ferry_native module is missing or broken."""

    code = "native"


def from_wire(error: Mapping[str, Any]) -> FerryError:
    """Rebuild the error an agent sent (``{code, message, details}``).

    An unknown code becomes a plain :class:`FerryError` that keeps the code in
    its details, so a newer peer's error is still shown, not lost.
    """
    code = error.get("code")
    message = error.get("message")
    details = error.get("details")
    if not isinstance(message, str):
        message = repr(message)
    if not isinstance(details, Mapping):
        details = {}
    cls = _REGISTRY.get(code) if isinstance(code, str) else None
    # Details are merged after construction: a peer's detail named
    # "message" or "self" must not collide with the constructor's arguments.
    exc = (cls or FerryError)(message)
    exc.details.update({str(k): v for k, v in details.items()})
    if cls is None:
        exc.details.setdefault("remote_code", code)
    return exc

class StateFileError(FerryError):
    """A state file on disk (domain status, job record) is unreadable or corrupt."""

    code = "state-file"


__all__ += ["StateFileError"]


class LeaseBusy(DomainError):
    """A disk's lease is held by another domain, on this host or another one."""

    code = "lease-busy"


__all__ += ["LeaseBusy"]


class PathNotAllowed(AccessDenied):
    """A domain names a host path outside the storage policy (``[storage] allowed``).

    ``details`` carry ``element`` (where in the domain), ``path`` (as written),
    ``resolved`` (after symlinks) and ``setting``.
    """

    code = "path-not-allowed"


class NameInvalid(XMLError):
    """A domain name that would not work on this host (length, characters, paths built from it)."""

    code = "name-invalid"


__all__ += ["NameInvalid", "PathNotAllowed"]


class SaveError(FerryError):
    """A save, restore or dump failed (qemu, the compressor or the file)."""

    code = "save"


class SaveRefused(SaveError):
    """The domain cannot be saved or dumped (``ferry.allowed``: a device qemu cannot serialise)."""

    code = "save-refused"


class SaveImageError(SaveError):
    """A file that is not a Ferry save image, or one this host cannot read."""

    code = "save-image"


class SaveImagePartial(SaveImageError):
    """A save image whose save never finished: restore refuses it."""

    code = "save-image-partial"


__all__ += ["SaveError", "SaveImageError", "SaveImagePartial", "SaveRefused"]
