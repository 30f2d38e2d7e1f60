"""``ferryctl pki``: a small private CA for the agents' mutual TLS.

Ferry agents trust only certificates issued by the cluster's own CA
(:mod:`ferry.tls`). This module creates that CA and issues one certificate per
host. Each host certificate carries both the ``serverAuth`` and the
``clientAuth`` extended key usage because every agent is both: ferry-source
dials peers, ferry-destination accepts them.

Operator certificates (``ferryctl pki client NAME``) are for a management
node's ferryctl, which dials an agent's peer port itself (client-driven
migration). They carry ``clientAuth`` only, so they can never serve as an
agent, no DNS or IP names (nothing dials an operator), and a subjectAltName
URI ``ferry:operator:NAME`` that tells the agents the certificate is an
operator's (:data:`ferry.tls.OPERATOR_URI_PREFIX`). A URI rather than an OU
in the subject: it is a typed entry that carries the name itself, OpenSSL's
hostname check and the ``[peers] allowed`` matching (CN and DNS names)
never look at it, so a host certificate cannot be mistaken for an operator's
nor an operator's for a host, and it is how workload identities are usually
written (SPIFFE IDs are SAN URIs). The CN is NAME as well, for people
reading the certificate.

Key type: EC P-256 (ECDSA with SHA-256), for the CA and the hosts. It gives
~128-bit security like RSA 3072 with a 32-byte key, key generation takes
microseconds instead of seconds (``ferryctl pki host`` stays instant, tests
stay fast), handshakes are cheaper, and every TLS 1.3 implementation must
support it (RFC 8446 §9.1), so nothing is lost in compatibility.

Layout (PEM files, named like the ``[tls]`` example in ferry.config)::

    CA dir:    ca.pem (0644)  ca-key.pem (0600)
    host out:  ca.pem (0644)  NAME.pem (0644)  NAME-key.pem (0600)
    operator:  the same three files as a host, in /etc/ferry/pki/operators/NAME

The host directory holds a copy of the CA certificate so that it can be copied
to the host as it is (e.g. to /etc/ferry/pki) and named in the agent config
as ``ca``/``cert``/``key``. The CA key belongs on the admin machine only.
Files are written atomically (temp file, fsync, rename) with their final mode
set before any byte is written, so a private key is never readable by others,
not even for a moment, whatever the umask.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ferry.errors import ConfigError
from ferry.tls import OPERATOR_URI_PREFIX

__all__ = [
    "DEFAULT_CA_DIR",
    "DEFAULT_HOSTS_DIR",
    "DEFAULT_OPERATORS_DIR",
    "CAFiles",
    "HostFiles",
    "add_pki_commands",
    "init_ca",
    "issue_client",
    "issue_host",
]

#: Where ``ferryctl pki init`` puts the CA unless told otherwise.
DEFAULT_CA_DIR = Path("/etc/ferry/pki/ca")
#: ``ferryctl pki host NAME`` writes to ``DEFAULT_HOSTS_DIR / NAME`` by default.
DEFAULT_HOSTS_DIR = Path("/etc/ferry/pki/hosts")
#: ``ferryctl pki client NAME`` writes to ``DEFAULT_OPERATORS_DIR / NAME`` by default.
DEFAULT_OPERATORS_DIR = Path("/etc/ferry/pki/operators")

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca-key.pem"

# Backdate notBefore a little: hosts whose clocks lag the CA's by a few
# minutes would otherwise refuse a certificate issued "in the future".
_CLOCK_SKEW = dt.timedelta(minutes=5)

# RFC 1123 host names: labels of letters, digits and inner hyphens.
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)

# Operator names: they name files and sit in a URI, so a plain token.
_OPERATOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class CAFiles:
    """The CA's certificate and private key."""

    cert: Path
    key: Path

    def to_json(self) -> dict[str, str]:
        """Return a JSON-safe dict (for ``--json``)."""
        return {"cert": str(self.cert), "key": str(self.key)}


@dataclass(frozen=True)
class HostFiles:
    """One host's files: a copy of the CA certificate, its certificate and key.

    The field names match :class:`ferry.tls.TLSFiles`, so
    ``TLSFiles(**dataclasses.asdict(host_files))`` works.
    """

    ca: Path
    cert: Path
    key: Path

    def to_json(self) -> dict[str, str]:
        """Return a JSON-safe dict (for ``--json``)."""
        return {"ca": str(self.ca), "cert": str(self.cert), "key": str(self.key)}


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically with permission ``mode``.

    The temporary file is created with ``mode`` and then ``fchmod``-ed to it
    (``os.open`` applies the umask, which could only remove bits, but an
    explicit fchmod makes the result exact), so a key is 0600 from its first
    byte. The directory is fsynced after the rename so the new name survives
    a crash.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _mkdir(path: Path, mode: int) -> None:
    """Create ``path`` (and parents); a new leaf directory gets ``mode``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create directory {path}: {exc.strerror}", path=str(path)
        ) from None
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory", path=str(path))


def _new_key() -> ec.EllipticCurvePrivateKey:
    """Generate a P-256 key (see the module docstring for why)."""
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: the agents start unattended."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def init_ca(
    dir: Path,
    *,
    common_name: str = "Ferry CA",
    days: int = 3650,
    force: bool = False,
) -> CAFiles:
    """Create a new CA in ``dir``: ``ca.pem`` (0644) and ``ca-key.pem`` (0600).

    The CA certificate is self-signed, ``CA:TRUE, pathlen:0`` (it signs host
    certificates only, never another CA) with key usage keyCertSign+cRLSign.

    Raises:
        ConfigError: a CA already exists in ``dir`` and ``force`` is false
            (overwriting it would orphan every host certificate it issued),
            ``days`` is not positive, or the directory cannot be created.
    """
    if days <= 0:
        raise ConfigError(f"CA validity must be positive, got {days} days")
    cert_path, key_path = dir / CA_CERT_NAME, dir / CA_KEY_NAME
    existing = [p for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"a CA already exists in {dir} ({', '.join(p.name for p in existing)}); "
            "refusing to overwrite it (use --force to replace it and re-issue every host)",
            path=str(dir),
        )
    _mkdir(dir, 0o700)

    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    # Key first: a cert without its key is useless, a key without its cert
    # is at least not mistaken for a working CA.
    _write_atomic(key_path, _key_pem(key), 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return CAFiles(cert=cert_path, key=key_path)


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read the CA certificate and key from ``ca_dir``.

    Raises:
        ConfigError: a file is missing or unreadable, not PEM, not an EC key,
            or the key does not match the certificate.
    """
    cert_path, key_path = ca_dir / CA_CERT_NAME, ca_dir / CA_KEY_NAME
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read CA certificate {cert_path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"CA certificate {cert_path} is not a PEM certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read CA key {key_path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"CA key {key_path} is not an unencrypted PEM key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"CA key {key_path} is not an EC key")
    cert_pub = cert.public_key()
    if (
        not isinstance(cert_pub, ec.EllipticCurvePublicKey)
        or key.public_key().public_numbers() != cert_pub.public_numbers()
    ):
        raise ConfigError(f"CA key {key_path} does not belong to CA certificate {cert_path}")
    return cert, key


def _san_entries(name: str, dns: list[str], ips: list[str]) -> list[x509.GeneralName]:
    """Validate and build the SAN list; ``name`` joins the DNS names if it is one.

    The host label is added as a DNS SAN (when it is a valid host name) so
    that a peer dialled by its label passes OpenSSL's hostname check too.
    """
    entries: list[x509.GeneralName] = []
    seen_dns: set[str] = set()
    for d in ([name] if _HOSTNAME_RE.match(name) else []) + dns:
        if not _HOSTNAME_RE.match(d):
            raise ConfigError(f"{d!r} is not a valid DNS name")
        key = d.lower().rstrip(".")
        if key not in seen_dns:
            seen_dns.add(key)
            entries.append(x509.DNSName(key))
    seen_ip: set[str] = set()
    for text in ips:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(f"{text!r} is not an IP address") from None
        if str(ip) not in seen_ip:
            seen_ip.add(str(ip))
            entries.append(x509.IPAddress(ip))
    return entries


def _sign_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    name: str,
    *,
    days: int,
    usages: list[x509.ObjectIdentifier],
    sans: list[x509.GeneralName],
) -> x509.Certificate:
    """Sign an end-entity certificate for ``key``: CN ``name``, EKU ``usages``."""
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def issue_host(
    ca_dir: Path,
    out_dir: Path,
    name: str,
    *,
    dns: list[str],
    ips: list[str],
    days: int = 825,
    force: bool = False,
) -> HostFiles:
    """Issue a certificate for host ``name`` signed by the CA in ``ca_dir``.

    Writes ``NAME.pem`` (0644), ``NAME-key.pem`` (0600) and a copy of ``ca.pem``
    into ``out_dir``. Subject CN is ``name``; the SAN holds ``name`` (if it is
    a valid host name), every ``dns`` name and every ``ips`` address; EKU is
    serverAuth + clientAuth because an agent is both. 825 days is the longest
    lifetime Apple's TLS clients accept, kept as the customary ceiling.

    Raises:
        ConfigError: the CA cannot be loaded, ``name``/``dns``/``ips`` are not
            valid, ``days`` is not positive, or the host files exist and
            ``force`` is false.
    """
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{name!r} is not a usable host name (it names the files)")
    if days <= 0:
        raise ConfigError(f"certificate validity must be positive, got {days} days")
    ca_cert, ca_key = _load_ca(ca_dir)
    sans = _san_entries(name, dns, ips)
    if not sans:
        raise ConfigError(
            f"host {name!r} needs at least one --dns or --ip: peers check the "
            "certificate against the name or address they dial"
        )
    return _issue_leaf(
        ca_dir, out_dir, name, ca_cert, ca_key, what="host", days=days, force=force,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], sans=sans,
    )  # fmt: skip


def issue_client(
    ca_dir: Path,
    out_dir: Path,
    name: str,
    *,
    days: int = 365,
    force: bool = False,
) -> HostFiles:
    """Issue an operator (client) certificate for ``name`` from the CA in ``ca_dir``.

    Writes ``NAME.pem`` (0644), ``NAME-key.pem`` (0600) and a copy of
    ``ca.pem`` into ``out_dir``, as :func:`issue_host` does. Subject CN is
    ``name``; the only SAN is the URI ``ferry:operator:NAME`` (the marker
    the agents read); EKU is clientAuth alone, so the certificate can dial
    an agent but never be one. An agent lets it in only when ``name`` is in
    its ``[peers] operators``, and every op it calls needs an ``[[acl]]``
    rule naming it in ``operators``. A year by default: it is a person's
    or a management node's credential, re-issued more often than a host's.

    Raises:
        ConfigError: the CA cannot be loaded, ``name`` is not a plain token
            (letters, digits, ``.``, ``_``, ``-``; at most 64, not starting
            with a punctuation mark), ``days`` is not positive, or the files
            exist and ``force`` is false.
    """
    if not _OPERATOR_RE.match(name):
        raise ConfigError(
            f"{name!r} is not a usable operator name: letters, digits, '.', '_' and '-', "
            "at most 64, starting with a letter or digit (it names the files and the "
            "certificate's ferry:operator: URI)"
        )
    if days <= 0:
        raise ConfigError(f"certificate validity must be positive, got {days} days")
    ca_cert, ca_key = _load_ca(ca_dir)
    return _issue_leaf(
        ca_dir, out_dir, name, ca_cert, ca_key, what="operator", days=days, force=force,
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        sans=[x509.UniformResourceIdentifier(f"{OPERATOR_URI_PREFIX}{name}")],
    )  # fmt: skip


def _issue_leaf(
    ca_dir: Path, out_dir: Path, name: str, ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey, *,
    what: str, days: int, force: bool, usages: list[x509.ObjectIdentifier],
    sans: list[x509.GeneralName],
) -> HostFiles:  # fmt: skip
    """Write ``NAME.pem``, ``NAME-key.pem`` and a copy of ``ca.pem`` into ``out_dir``:
    what :func:`issue_host` and :func:`issue_client` share once their checks passed."""
    cert_path, key_path, ca_copy = (
        out_dir / f"{name}.pem",
        out_dir / f"{name}-key.pem",
        out_dir / CA_CERT_NAME,
    )
    existing = [p for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{what} files already exist in {out_dir} "
            f"({', '.join(p.name for p in existing)}); use --force to re-issue",
            path=str(out_dir),
        )
    _mkdir(out_dir, 0o755)

    key = _new_key()
    cert = _sign_leaf(ca_cert, ca_key, key, name, days=days, usages=usages, sans=sans)
    _write_atomic(key_path, _key_pem(key), 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    if ca_copy.resolve() != (ca_dir / CA_CERT_NAME).resolve():
        _write_atomic(ca_copy, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return HostFiles(ca=ca_copy, cert=cert_path, key=key_path)


# ----------------------------------------------------------------- CLI


def _emit(args: argparse.Namespace, data: dict[str, object], text: str) -> None:
    """Print ``data`` as JSON with ``--json``, else ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text)


def _fail(args: argparse.Namespace, exc: ConfigError) -> int:
    """Report an error in the requested form; exit status 1."""
    if getattr(args, "json", False):
        print(json.dumps({"error": exc.to_wire()}, indent=2, sort_keys=True))
    else:
        print(f"ferryctl pki: error: {exc}", file=sys.stderr)
    return 1


def cmd_init(args: argparse.Namespace) -> int:
    """Handler of ``ferryctl pki init``: create the CA; returns the exit status."""
    try:
        files = init_ca(Path(args.dir), common_name=args.cn, days=args.days, force=args.force)
    except ConfigError as exc:
        return _fail(args, exc)
    _emit(
        args,
        {"ca": files.to_json()},
        f"CA created: certificate {files.cert}, key {files.key} (keep the key off the hosts)",
    )
    return 0


def cmd_host(args: argparse.Namespace) -> int:
    """Handler of ``ferryctl pki host``: issue a host certificate; returns the exit status."""
    out = Path(args.out) if args.out else DEFAULT_HOSTS_DIR / args.name
    try:
        files = issue_host(
            Path(args.ca_dir),
            out,
            args.name,
            dns=list(args.dns or []),
            ips=list(args.ip or []),
            days=args.days,
            force=args.force,
        )
    except ConfigError as exc:
        return _fail(args, exc)
    _emit(
        args,
        {"host": args.name, "files": files.to_json()},
        f"host {args.name}: certificate {files.cert}, key {files.key}, CA copy {files.ca}",
    )
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    """Handler of ``ferryctl pki client``: issue an operator certificate; returns the status."""
    out = Path(args.out) if args.out else DEFAULT_OPERATORS_DIR / args.name
    try:
        files = issue_client(Path(args.ca_dir), out, args.name, days=args.days, force=args.force)
    except ConfigError as exc:
        return _fail(args, exc)
    _emit(
        args,
        {"operator": args.name, "files": files.to_json()},
        f"operator {args.name}: certificate {files.cert}, key {files.key}, CA copy {files.ca} "
        f"(agents admit it once {args.name!r} is in their [peers] operators)",
    )
    return 0


def add_pki_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pki init``, ``pki host`` and ``pki client`` to ferryctl's top-level subparsers.

    Each leaf parser sets ``func`` to a handler ``(args) -> int`` (the exit
    status); ferryctl's main calls ``sys.exit(args.func(args))``.
    """
    pki = subparsers.add_parser("pki", help="private CA and host certificates for agent TLS")
    sub = pki.add_subparsers(dest="pki_command", metavar="{init,host,client}", required=True)

    p_init = sub.add_parser("init", help="create the cluster CA")
    p_init.add_argument("--dir", default=str(DEFAULT_CA_DIR), help="CA directory (%(default)s)")
    p_init.add_argument("--cn", default="Ferry CA", help="CA common name (%(default)s)")
    p_init.add_argument("--days", type=int, default=3650, help="validity (%(default)s days)")
    p_init.add_argument("--force", action="store_true", help="replace an existing CA")
    p_init.add_argument("--json", action="store_true", help="machine-readable output")
    p_init.set_defaults(func=cmd_init)

    p_host = sub.add_parser("host", help="issue a host certificate (server+client)")
    p_host.add_argument("name", metavar="NAME", help="host label; becomes the CN")
    p_host.add_argument("--ip", action="append", metavar="IP", help="IP SAN (repeatable)")
    p_host.add_argument("--dns", action="append", metavar="NAME", help="DNS SAN (repeatable)")
    p_host.add_argument("--ca-dir", default=str(DEFAULT_CA_DIR), help="CA directory (%(default)s)")
    p_host.add_argument("--out", default=None, help=f"output directory ({DEFAULT_HOSTS_DIR}/NAME)")
    p_host.add_argument("--days", type=int, default=825, help="validity (%(default)s days)")
    p_host.add_argument("--force", action="store_true", help="replace existing host files")
    p_host.add_argument("--json", action="store_true", help="machine-readable output")
    p_host.set_defaults(func=cmd_host)

    p_client = sub.add_parser("client", help="issue an operator certificate (client only)")
    p_client.add_argument("name", metavar="NAME", help="operator name; CN and ferry:operator:NAME")
    p_client.add_argument(
        "--ca-dir", default=str(DEFAULT_CA_DIR), help="CA directory (%(default)s)"
    )
    p_client.add_argument(
        "--out", default=None, help=f"output directory ({DEFAULT_OPERATORS_DIR}/NAME)"
    )
    p_client.add_argument("--days", type=int, default=365, help="validity (%(default)s days)")
    p_client.add_argument("--force", action="store_true", help="replace existing files")
    p_client.add_argument("--json", action="store_true", help="machine-readable output")
    p_client.set_defaults(func=cmd_client)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Same as :func:`add_pki_commands`, under the short name other tools use."""
    add_pki_commands(subparsers)
