"""Mutual TLS for the agents.

Every agent is both a TLS server (ferry-destination accepts peers) and a TLS
client (ferry-source dials them), and both directions are authenticated with
certificates issued by the cluster's own CA (``ferryctl pki``). A peer is
therefore trusted only if

1. its certificate chains to *our* CA file (never the system trust store: a
   publicly trusted certificate must not be able to migrate VMs onto a host),
2. on the client side, the certificate matches the name or IP address we
   dialled (OpenSSL's hostname check, on by default), and
3. optionally, the identity carries the host name the caller expected
   (:func:`check_peer_name`), e.g. the host label recorded in a cookie.

TLS 1.3 is the minimum: the agents only ever talk to each other, so there is
no legacy peer to accommodate, and 1.3 removes renegotiation and the weak
cipher suites in one step.

Errors: a missing, unreadable or inconsistent file raises
:class:`~ferry.errors.ConfigError` naming the file; a peer that fails
verification raises :class:`~ferry.errors.AuthError` (see
:func:`as_auth_error` for turning the ``ssl`` module's errors into one).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ferry.errors import AuthError, ConfigError

__all__ = [
    "OPERATOR_URI_PREFIX",
    "PeerIdentity",
    "TLSFiles",
    "as_auth_error",
    "check_operator_allowed",
    "check_peer_allowed",
    "check_peer_name",
    "client_context",
    "identity_from_der",
    "peer_identity",
    "server_context",
]


@dataclass(frozen=True)
class TLSFiles:
    """The three PEM files an agent needs: CA certificate, own cert, own key."""

    ca: Path
    cert: Path
    key: Path


#: The subjectAltName URI that marks an operator certificate
#: (``ferryctl pki client NAME`` writes ``ferry:operator:NAME``).
OPERATOR_URI_PREFIX = "ferry:operator:"


@dataclass(frozen=True)
class PeerIdentity:
    """Who the peer's certificate says it is.

    ``ips`` are normalised by :mod:`ipaddress` (``str(ip_address(x))``) so
    that ``2001:DB8:0:0:0:0:0:1`` from OpenSSL and ``2001:db8::1`` from a
    config file compare equal.  ``operator`` is the name of an operator
    certificate (its ``ferry:operator:NAME`` URI), None for a host.
    """

    common_name: str | None
    dns_names: tuple[str, ...] = field(default_factory=tuple)
    ips: tuple[str, ...] = field(default_factory=tuple)
    operator: str | None = None

    def describe(self) -> str:
        """Return a short human form, e.g. ``CN=host-a DNS=a.example IP=10.0.0.1``."""
        parts = [f"CN={self.common_name}" if self.common_name else "CN=<none>"]
        parts += [f"DNS={n}" for n in self.dns_names]
        parts += [f"IP={ip}" for ip in self.ips]
        if self.operator is not None:
            parts.append(f"URI={OPERATOR_URI_PREFIX}{self.operator}")
        return " ".join(parts)


def _operator_name(uris: list[str]) -> str | None:
    """The operator name among a certificate's SAN URIs, None for a host.

    Raises:
        AuthError: more than one operator URI, or an empty name (our CA
            issues neither; a certificate that does is not trusted to say
            who it is).
    """
    names = [u[len(OPERATOR_URI_PREFIX) :] for u in uris if u.startswith(OPERATOR_URI_PREFIX)]
    if not names:
        return None
    if len(names) > 1 or not names[0]:
        raise AuthError(f"peer certificate has an unusable operator name: {', '.join(uris)}")
    return names[0]


class _HasPeerCert(Protocol):
    """Anything with ``getpeercert()``: ``ssl.SSLSocket`` or ``ssl.SSLObject``."""

    def getpeercert(self, binary_form: bool = False) -> Any: ...


def _check_readable(path: Path, what: str) -> None:
    """Raise ConfigError naming ``path`` unless it is a readable regular file.

    ``ssl`` reports a missing file as a bare ``FileNotFoundError`` without the
    role of the file, and a PEM error without any file name at all; checking
    first lets the operator see *which* of the three settings is wrong.
    """
    try:
        with path.open("rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise ConfigError(f"TLS {what} file {path} does not exist", file=str(path)) from None
    except IsADirectoryError:
        raise ConfigError(f"TLS {what} file {path} is a directory", file=str(path)) from None
    except OSError as exc:
        raise ConfigError(
            f"TLS {what} file {path} is not readable: {exc.strerror}", file=str(path)
        ) from None


def _load(ctx: ssl.SSLContext, files: TLSFiles) -> None:
    """Load CA, certificate and key into ``ctx``, mapping failures to ConfigError."""
    _check_readable(files.ca, "CA certificate")
    _check_readable(files.cert, "certificate")
    _check_readable(files.key, "private key")
    try:
        ctx.load_verify_locations(cafile=str(files.ca))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"TLS CA certificate file {files.ca} holds no usable certificate: {exc}",
            file=str(files.ca),
        ) from None
    try:
        ctx.load_cert_chain(certfile=str(files.cert), keyfile=str(files.key))
    except ssl.SSLError as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            msg = f"TLS private key {files.key} does not belong to certificate {files.cert}"
        else:
            msg = (
                f"TLS certificate {files.cert} / private key {files.key} "
                f"could not be loaded: {reason}"
            )
        raise ConfigError(msg, file=str(files.cert), key=str(files.key)) from None


def _base_context(purpose: int) -> ssl.SSLContext:
    """A context with the settings both sides share."""
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # Both directions are authenticated: a server without a client cert is
    # as unwelcome as a client without a server cert.
    ctx.verify_mode = ssl.CERT_REQUIRED
    # No session tickets: agents make few, long connections, and tickets
    # would only add key material that outlives the connection.
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def server_context(files: TLSFiles) -> ssl.SSLContext:
    """Return the context for an agent's listening socket.

    TLS 1.3 minimum; the client must present a certificate that chains to
    ``files.ca`` (``CERT_REQUIRED``), otherwise the handshake fails.

    Raises:
        ConfigError: a file is missing, unreadable, not PEM, or the key does
            not match the certificate.
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    _load(ctx, files)
    return ctx


def client_context(files: TLSFiles, *, server_hostname_check: bool = True) -> ssl.SSLContext:
    """Return the context for dialling a peer agent.

    The server's certificate must chain to ``files.ca``. With
    ``server_hostname_check`` (the default) it must also match the
    ``server_hostname`` passed to ``open_connection``/``wrap_socket``: a DNS
    name against the DNS SANs, an IP literal against the IP SANs. Turn the
    check off only when the caller verifies the identity itself with
    :func:`check_peer_name` (e.g. when dialling through a tunnel whose
    address is not in the certificate).

    Raises:
        ConfigError: a file is missing, unreadable, not PEM, or the key does
            not match the certificate.
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = server_hostname_check
    _load(ctx, files)
    return ctx


def _norm_ip(text: str) -> str | None:
    """Return the canonical form of an IP literal, or None if it is not one."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return None


def peer_identity(sslobj: _HasPeerCert) -> PeerIdentity:
    """Read the verified peer certificate of a TLS connection.

    ``sslobj`` is an ``ssl.SSLSocket`` or the ``ssl.SSLObject`` that asyncio
    exposes as ``writer.get_extra_info("ssl_object")``.

    Raises:
        AuthError: the peer presented no certificate (cannot happen with our
            contexts, which require one, but is checked rather than assumed).
    """
    cert = sslobj.getpeercert()
    if not cert:
        raise AuthError("peer presented no certificate")
    common_name: str | None = None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                common_name = str(value)
    dns: list[str] = []
    ips: list[str] = []
    uris: list[str] = []
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            dns.append(str(value).lower())
        elif kind == "IP Address":
            ip = _norm_ip(str(value))
            if ip is not None:
                ips.append(ip)
        elif kind == "URI":
            uris.append(str(value))
    return PeerIdentity(common_name=common_name, dns_names=tuple(dns), ips=tuple(ips),
                        operator=_operator_name(uris))  # fmt: skip


def identity_from_der(der: bytes) -> PeerIdentity:
    """Read a verified peer certificate in DER form (``ferry_native`` hands those).

    Raises:
        AuthError: the bytes are not a certificate (cannot happen after a
            verified handshake, but is checked rather than assumed).
    """
    # Imported here: only ferry-destination's data connections need it, and
    # ferryctl imports this module without wanting cryptography's start-up.
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise AuthError(f"peer certificate unreadable: {exc}") from None
    common_name: str | None = None
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        common_name = attr.value if isinstance(attr.value, str) else attr.value.decode()
    dns: list[str] = []
    ips: list[str] = []
    uris: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        dns = [name.lower() for name in san.get_values_for_type(x509.DNSName)]
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        uris = list(san.get_values_for_type(x509.UniformResourceIdentifier))
    return PeerIdentity(common_name=common_name, dns_names=tuple(dns), ips=tuple(ips),
                        operator=_operator_name(uris))  # fmt: skip


def check_peer_allowed(
    identity: PeerIdentity,
    allowed: tuple[str, ...],
    *,
    host: str,
    operators: tuple[str, ...] = (),
) -> None:
    """The ``[peers] allowed`` check, right after a peer's TLS handshake.

    A peer is let in when its common name or one of its DNS names matches
    an entry (shell-style pattern, case-insensitive).  An empty list lets
    every host of the CA in.  An operator certificate is never checked
    against ``allowed``: it must be in ``operators`` instead
    (:func:`check_operator_allowed`).

    Raises:
        AuthError: naming the peer's certificate names, ``host`` (this host)
            and the setting.
    """
    if identity.operator is not None:
        check_operator_allowed(identity.operator, operators, host=host)
        return
    if not allowed:
        return
    names = [n for n in (identity.common_name, *identity.dns_names) if n]
    patterns = [p.lower().rstrip(".") for p in allowed]
    for name in names:
        if any(fnmatch.fnmatchcase(name.lower().rstrip("."), p) for p in patterns):
            return
    raise AuthError(
        f"host {host} refuses peer certificate {identity.describe()}: not in its "
        f"[peers] allowed ({', '.join(allowed)})",
        peer=identity.common_name,
        setting="[peers] allowed",
    )


def check_operator_allowed(name: str, operators: tuple[str, ...], *, host: str) -> None:
    """The ``[peers] operators`` check for an operator certificate.

    ``operators`` holds operator names (shell-style patterns, case-sensitive
    as the names in ``[[acl]] operators`` are).  Empty, the default: no
    operator may connect.

    Raises:
        AuthError: naming the operator, ``host`` and the setting.
    """
    if any(fnmatch.fnmatchcase(name, p) for p in operators):
        return
    listed = f"({', '.join(operators)})" if operators else "(empty: no operator may connect)"
    raise AuthError(
        f"host {host} refuses operator {name!r}: not in its [peers] operators {listed}",
        operator=name,
        setting="[peers] operators",
    )


def check_peer_name(identity: PeerIdentity, expected: str) -> None:
    """Check that the peer is ``expected`` (host name, host label or IP).

    An IP literal must be one of the IP SANs. A name matches a DNS SAN
    (case-insensitively) or the common name, because ``ferryctl pki host
    NAME`` puts the host label in the CN and operators name peers by label.
    Wildcards are not honoured: our CA never issues them.

    Raises:
        AuthError: no match; the message names the expected and the actual
            identity.
    """
    ip = _norm_ip(expected)
    if ip is not None:
        if ip in identity.ips:
            return
    else:
        want = expected.lower().rstrip(".")
        if want in (n.rstrip(".") for n in identity.dns_names):
            return
        if identity.common_name is not None and identity.common_name.lower() == want:
            return
    raise AuthError(
        f"peer certificate does not match: expected {expected!r}, got {identity.describe()}",
        expected=expected,
        got=identity.describe(),
    )


def as_auth_error(exc: BaseException, *, peer: str | None = None) -> AuthError:
    """Translate a TLS failure into an :class:`AuthError` that names the reason.

    ``ssl`` errors carry the reason in different attributes depending on
    which side noticed: the verifying side has ``verify_message``
    (``"unable to get local issuer certificate"``, ``"Hostname mismatch"``),
    the other side only the alert it received as ``reason``
    (``TLSV1_ALERT_UNKNOWN_CA``, ``TLSV13_ALERT_CERTIFICATE_REQUIRED``).
    A connection reset during the handshake is how some refusals arrive.
    """
    where = f" with {peer}" if peer else ""
    reason: str
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
    elif isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
    else:
        reason = f"{type(exc).__name__}: {exc}"
    err = AuthError(f"TLS handshake{where} failed: {reason}", reason=reason)
    if peer:
        err.details["peer"] = peer
    return err
