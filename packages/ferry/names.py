"""Domain names that work on this host: every path built from a name fits.

The parser's :func:`ferry.domain._checks.check_name` is the host-independent
rule (1..200 bytes of UTF-8, no '/', no control, bidi or invisible
characters, no leading '.'). This module adds what the host's directories
set: a name is only valid here when every path :class:`ferry.host.Host`
builds from it can be used. Those paths are::

    state_dir/domains/NAME.xml            file names: 255 bytes each
    state_dir/snapshots/NAME/
    run_dir/domains/NAME.status|.xml|.pid
    run_dir/log/NAME.log
    run_dir/qmp/NAME.source.sock          unix sockets: 107 bytes (sun_path)
    run_dir/qmp/NAME.destination.sock
    run_dir/serial/NAME/serialN.sock      the domain's unnamed chardev sockets
    run_dir/serial/NAME/consoleN.sock
    run_dir/serial/NAME/CHANNEL.sock

The QMP sockets exist for every running domain and are the longest of the
always-present paths, so they set the general limit (with ``/run/ferry``: 75
bytes); a domain's own unnamed chardev sockets are checked one by one.
Everything here is sans-I/O: it computes lengths, it touches no file.
"""

from __future__ import annotations

from pathlib import Path

from ferry.config import PathsConfig
from ferry.domain import Domain
from ferry.domain._checks import NAME_MAX_BYTES, UNIX_PATH_MAX, Loc, check_name, fail
from ferry.domain.model import is_libvirt_channel_path
from ferry.errors import NameInvalid

__all__ = ["chardev_default_sockets", "check_domain_names", "check_name_fits", "name_limit"]

# The longest suffix of a QMP socket (ferry.host.Host.qmp_socket).
_QMP_SUFFIX = ".destination.sock"


def name_limit(paths: PathsConfig) -> tuple[int, str]:
    """The most bytes a domain name may have here, and the path that sets it.

    Returns ``(limit, why)``; ``why`` names the path pattern for messages.
    """
    qmp = f"{paths.qmp_dir}/NAME{_QMP_SUFFIX}"
    room = UNIX_PATH_MAX - len(str(paths.qmp_dir).encode()) - 1 - len(_QMP_SUFFIX)
    if room < NAME_MAX_BYTES:
        return room, (
            f"the QMP socket {qmp} must fit in the {UNIX_PATH_MAX}-byte unix socket path "
            "limit (a shorter [paths] run_dir leaves more room)"
        )
    return NAME_MAX_BYTES, "names become file names (NAME.status, NAME.destination.sock, ...)"


def _bad(loc: Loc | None, message: str) -> NameInvalid:
    err = fail(loc or Loc(element="domain/name"), message, cls=NameInvalid)
    assert isinstance(err, NameInvalid)
    return err


def check_name_fits(name: str, paths: PathsConfig, loc: Loc | None = None) -> str:
    """Check ``name`` against the general rule and this host's path limits.

    :raises NameInvalid: naming what is wrong (the character, or the length
        and the path that does not fit).
    """
    check_name(name, loc)
    limit, why = name_limit(paths)
    size = len(name.encode())
    if size > limit:
        raise _bad(
            loc,
            f"domain name is {size} bytes long (UTF-8); on this host at most {limit} bytes "
            f"fit: {why}",
        )
    return name


def chardev_default_sockets(domain: Domain, chardev_dir: Path) -> list[tuple[str, Path]]:
    """The unix sockets Ferry places for ``domain``'s chardevs that name no path.

    Returns ``(element, path)`` pairs, with the file names that
    :func:`ferry.domain.to_qemu_argv` gives them (serialN, consoleN, the
    channel's target name).
    """
    out: list[tuple[str, Path]] = []
    for i, s in enumerate(domain.serials):
        if s.type == "unix" and s.source_path is None:
            out.append((f"domain/devices/serial[{i}]", chardev_dir / f"serial{i}.sock"))
    serial_ports = {s.target_port for s in domain.serials}
    for i, c in enumerate(domain.consoles):
        if c.target_type == "serial" and c.target_port in serial_ports:
            continue  # the console is that serial port: no socket of its own
        if c.type == "unix" and c.source_path is None:
            out.append((f"domain/devices/console[{i}]", chardev_dir / f"console{i}.sock"))
    for i, c in enumerate(domain.channels):
        if c.type == "unix" and (c.source_path is None
                                 or is_libvirt_channel_path(c.source_path)):
            name = c.target_name or f"channel{i}"
            out.append((f"domain/devices/channel[{i}]", chardev_dir / f"{name}.sock"))
    return out


def check_domain_names(domain: Domain, paths: PathsConfig, *, where: str = "domain") -> None:
    """The name rule, and the length of every socket placed for ``domain``.

    ``where`` names the request in messages (``define``, ``prepare``).

    :raises NameInvalid: the name does not fit, or a socket path built from
        it (and a chardev's target name) is over the unix socket limit.
    """
    check_name_fits(domain.name, paths, Loc(where, None, "domain/name"))
    for element, path in chardev_default_sockets(domain, paths.serial_dir / domain.name):
        size = len(str(path).encode())
        if size > UNIX_PATH_MAX:
            raise _bad(
                Loc(where, None, element),
                f"its socket {path} would be {size} bytes long, over the {UNIX_PATH_MAX}-byte "
                "unix socket path limit (use a shorter domain name or channel name)",
            )
