"""Value checks shared by the parser, :meth:`Domain.renamed` and the argv builder.

Each check raises :class:`~ferry.errors.XMLError` (or a subclass) whose
message names the element and source line, and whose details carry
``line``, ``element`` and ``where`` so a remote ferryctl can show the same.
"""

from __future__ import annotations

import ipaddress
import os
import re
import unicodedata
from typing import Any

from ferry.errors import NameInvalid, XMLError

__all__ = [
    "Loc",
    "check_host_path",
    "check_listen",
    "check_name",
    "check_safe_text",
    "fail",
    "normalise_mac",
    "normalise_uuid",
]

# Names become file names (NAME.xml, NAME.status, NAME.destination.sock, and
# the atomic writer's ".NAME.status.XXXXXXXX.tmp": 21 bytes more than the
# name) within the 255-byte file name limit, and appear in logs.  The run
# directory usually sets a lower limit: see ferry.names.
NAME_MAX_BYTES = 200
# Characters that change how the text around them is displayed (bidi
# embeddings, overrides, isolates and marks), or that are invisible or break
# lines: with them one name can be made to look like another.
_DECEPTIVE = frozenset(
    "\u061c\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    "\u2028\u2029\u2060\u2066\u2067\u2068\u2069\ufeff"
)
# PATH_MAX; anything longer cannot be opened anyway.
_PATH_MAX = 4096
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107
# Pseudo file systems: a guest must never be handed host kernel state.
_FORBIDDEN_ROOTS = ("/proc", "/sys", "/dev")

_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
)
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class Loc:
    """Where a value came from: document name, line and element path."""

    __slots__ = ("element", "line", "where")

    def __init__(self, where: str = "<xml>", line: int | None = None, element: str = "domain"):
        self.where = where
        self.line = line
        self.element = element

    def child(self, element: str, line: int | None = None) -> Loc:
        """Return the location of a child element (line defaults to ours)."""
        return Loc(self.where, self.line if line is None else line, f"{self.element}/{element}")


def fail(
    loc: Loc | None, message: str, *, cls: type[XMLError] = XMLError, **extra: Any
) -> XMLError:
    """Build (not raise) an XML error located at ``loc``.

    The message reads ``WHERE:LINE: ELEMENT: MESSAGE`` so it is useful on its
    own; the same facts are in ``details`` for programs.
    """
    if loc is None:
        loc = Loc()
    if loc.line is not None:
        text = f"{loc.where}:{loc.line}: {loc.element}: {message}"
    else:
        text = f"{loc.where}: {loc.element}: {message}"
    return cls(text, line=loc.line, element=loc.element, where=loc.where, **extra)


def check_name(name: str, loc: Loc | None = None) -> str:
    """Validate a domain name: 1..200 bytes of UTF-8, no '/', no control,
    bidi or invisible characters, no leading '.' and no surrounding white
    space (names become file names under the state directories, and are
    shown to operators who must be able to tell two names apart).

    This is the host-independent part; :func:`ferry.names.check_name_fits`
    adds the limit that the host's run directory sets.

    :raises NameInvalid: the name is not acceptable (an :class:`XMLError`).
    """
    loc = loc or Loc(element="domain/name")

    def bad(message: str) -> XMLError:
        return fail(loc, message, cls=NameInvalid)

    if not name:
        raise bad("domain name is empty")
    if any(unicodedata.category(c) == "Cs" for c in name):
        raise bad(f"domain name {name!r} contains a lone surrogate (not valid Unicode)")
    size = len(name.encode())
    if size > NAME_MAX_BYTES:
        raise bad(f"domain name is {size} bytes long (UTF-8), longer than {NAME_MAX_BYTES} "
                  "bytes")
    if "/" in name:
        raise bad(f"domain name {name!r} contains '/'")
    if _CONTROL_RE.search(name) or any(unicodedata.category(c) == "Cc" for c in name):
        raise bad(f"domain name {name!r} contains a NUL, newline or control character")
    deceptive = sorted({f"U+{ord(c):04X}" for c in name if c in _DECEPTIVE})
    if deceptive:
        raise bad(f"domain name {name!r} contains {', '.join(deceptive)} (a bidirectional "
                  "override, isolate or mark, or an invisible character): it could be made "
                  "to look like another name")
    if name.startswith("."):
        raise bad(f"domain name {name!r} starts with '.'")
    if name != name.strip():
        raise bad(f"domain name {name!r} has leading or trailing white space")
    return name


def check_safe_text(value: str, loc: Loc, what: str, *, newlines: bool = False) -> str:
    """Refuse NUL and control characters (newlines only when ``newlines``)."""
    bad = _CONTROL_RE.findall(value)
    if newlines:
        bad = [c for c in bad if c not in "\n\t\r"]
    if bad:
        raise fail(loc, f"{what} contains a NUL or control character")
    return value


def normalise_uuid(text: str, loc: Loc) -> str:
    """Return the UUID in canonical lower-case 8-4-4-4-12 form.

    :raises XMLError: not 32 hex digits (hyphens in the usual places allowed).
    """
    text = text.strip()
    if not _UUID_RE.fullmatch(text):
        raise fail(loc, f"invalid UUID {text!r}")
    h = text.replace("-", "").lower()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def normalise_mac(text: str, loc: Loc) -> str:
    """Return a unicast MAC address in lower case.

    :raises XMLError: malformed or multicast address.
    """
    text = text.strip()
    if not _MAC_RE.fullmatch(text):
        raise fail(loc, f"invalid MAC address {text!r}")
    if int(text[0:2], 16) & 1:
        raise fail(loc, f"MAC address {text!r} is a multicast address")
    return text.lower()


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


def check_host_path(
    path: str,
    loc: Loc,
    what: str,
    *,
    allow_dev: bool = False,
    unix_socket: bool = False,
) -> str:
    """Validate a host path taken from the XML.

    It must be absolute and normalised (no ``.``/``..`` components, no
    doubled or trailing ``/``), free of NUL and control characters, and not
    under /proc, /sys or /dev, except that ``allow_dev`` admits /dev (block
    devices of ``disk type='block'``). ``unix_socket`` also enforces the
    sun_path length.

    :raises XMLError: naming the element and the path.
    """
    if _CONTROL_RE.search(path):
        raise fail(loc, f"{what} {path!r} contains a NUL, newline or control character")
    if not path.startswith("/") or path.startswith("//"):
        raise fail(loc, f"{what} {path!r} is not an absolute path")
    if ".." in path.split("/"):
        raise fail(loc, f"{what} {path!r} contains a '..' component")
    if os.path.normpath(path) != path:
        raise fail(loc, f"{what} {path!r} is not normalised (use {os.path.normpath(path)!r})")
    if len(path.encode()) > _PATH_MAX:
        raise fail(loc, f"{what} is longer than {_PATH_MAX} bytes")
    for root in _FORBIDDEN_ROOTS:
        if root == "/dev" and allow_dev:
            continue
        if _under(path, root):
            raise fail(loc, f"{what} {path!r} is under {root}, which is not allowed")
    if unix_socket and len(path.encode()) > UNIX_PATH_MAX:
        raise fail(loc, f"unix socket path {path!r} is longer than {UNIX_PATH_MAX} bytes")
    return path


def check_listen(value: str, loc: Loc) -> str:
    """Validate a graphics listen address: an IP address or a host name."""
    value = value.strip()
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if len(value) <= 253 and _HOSTNAME_RE.fullmatch(value):
        return value
    raise fail(loc, f"invalid listen address {value!r}")
