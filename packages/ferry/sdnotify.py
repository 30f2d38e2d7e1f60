"""systemd service protocol: readiness/watchdog notification and socket activation.

The agent units are ``Type=notify`` with ``WatchdogSec=``, and
ferry-destination is socket-activated, so an agent needs three things from
systemd, all of which are plain environment-variable protocols:

* :func:`notify` sends ``READY=1``, ``STATUS=…``, ``STOPPING=1``,
  ``WATCHDOG=1`` as one datagram to ``$NOTIFY_SOCKET`` (a path, or an
  abstract socket written with a leading ``@``).
* :func:`watchdog_interval` reads ``$WATCHDOG_USEC``/``$WATCHDOG_PID``;
  :func:`run_watchdog` pings at half that interval, as sd_watchdog_enabled(3)
  recommends.
* :func:`listen_fds` returns the sockets passed by ``$LISTEN_FDS`` /
  ``$LISTEN_PID`` (via ``systemd.daemon.listen_fds``) as ``socket.socket``.

Outside systemd every function is a harmless no-op (``False``/``None``/``[]``),
so an agent started by hand or by the tests needs no special case.

The notification is written by hand (one ``sendto``) rather than through
``systemd.daemon.notify`` so that a failure is visible as ``False`` with the
errno logged by the caller, and so the behaviour does not depend on which
libsystemd the extension was linked against.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

from ferry.errors import ConfigError

__all__ = [
    "listen_fds",
    "notify",
    "ready",
    "run_watchdog",
    "status",
    "stopping",
    "watchdog_interval",
    "watchdog_ping",
]


def _notify_address() -> str | None:
    """Return ``$NOTIFY_SOCKET`` as a sockaddr for AF_UNIX, or None."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return None
    if addr[0] == "@":
        # Abstract namespace: the kernel's name starts with a NUL byte.
        return "\0" + addr[1:]
    if addr[0] == "/":
        return addr
    # vsock: and other transports are not used by systemd 252 for services.
    return None


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``) to the service manager.

    Returns True if the datagram was sent, False when there is no
    ``$NOTIFY_SOCKET`` (not run by systemd) or the send failed — callers
    that care (the watchdog) log it; nobody should crash over it.
    """
    addr = _notify_address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), addr)
    except OSError:
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Send ``READY=1`` (with an optional ``STATUS=``); see :func:`notify`."""
    msg = "READY=1"
    if status_text:
        msg += f"\nSTATUS={status_text}"
    return notify(msg)


def status(text: str) -> bool:
    """Send ``STATUS=text`` (shown by ``systemctl status``); see :func:`notify`."""
    return notify(f"STATUS={text}")


def stopping(status_text: str | None = None) -> bool:
    """Send ``STOPPING=1`` at the start of a graceful shutdown; see :func:`notify`."""
    msg = "STOPPING=1"
    if status_text:
        msg += f"\nSTATUS={status_text}"
    return notify(msg)


def watchdog_ping() -> bool:
    """Send ``WATCHDOG=1``; see :func:`notify`."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Return the watchdog timeout in seconds, or None if no watchdog is armed.

    None when ``$WATCHDOG_USEC`` is unset, not a positive integer, or when
    ``$WATCHDOG_PID`` names another process (the variable was inherited from
    a parent, as sd_watchdog_enabled(3) checks).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000


async def run_watchdog(
    interval: float | None = None,
    *,
    healthy: Callable[[], bool] | None = None,
) -> None:
    """Ping the watchdog at half the timeout until cancelled.

    ``interval`` defaults to :func:`watchdog_interval`; with no watchdog the
    coroutine returns at once. ``healthy`` lets the agent withhold the ping
    when its own event loop is wedged in a way a running coroutine can tell
    (e.g. the QMP reconnect loop is stuck), so systemd restarts it.
    """
    timeout = watchdog_interval() if interval is None else interval
    if timeout is None:
        return
    period = timeout / 2
    while True:
        if healthy is None or healthy():
            watchdog_ping()
        await asyncio.sleep(period)


def listen_fds(*, unset_environment: bool = True) -> list[socket.socket]:
    """Return the sockets systemd passed by socket activation, in order.

    Empty when ``$LISTEN_FDS`` is unset or ``$LISTEN_PID`` is not this
    process. ``unset_environment`` (default) removes the variables so a
    child process (qemu) cannot mistake the fds for its own; libsystemd also
    marks the fds close-on-exec.

    Raises:
        ConfigError: a passed fd is not a socket (a unit passing a FIFO or a
            file to an agent is misconfigured).
    """
    import systemd.daemon  # lazily: only agents under systemd need it

    fds: list[int] = list(systemd.daemon.listen_fds(unset_environment))
    if unset_environment:
        # libsystemd unsets the C environment only; os.environ is Python's
        # own copy and is what subprocess passes on, so clear it here too.
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    socks: list[socket.socket] = []
    for fd in fds:
        try:
            socks.append(socket.socket(fileno=fd))
        except OSError as exc:
            for s in socks:
                s.detach()
            raise ConfigError(
                f"socket activation passed fd {fd}, which is not a socket: {exc.strerror}",
                fd=fd,
            ) from None
    return socks
