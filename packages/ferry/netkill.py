"""Destroy a stuck TCP connection of qemu's from outside (``ss -K``).

qemu writes the device state at switchover with its big lock held: if the
link to the destination dies right then, the write blocks until TCP gives up
(many minutes) and its monitor answers nothing meanwhile, so the migration
can be neither followed nor cancelled. The same goes, less badly, for an NBD
client whose server vanished. The agent knows the stream stopped moving; it
then destroys qemu's connections to that destination address and port with
the kernel's socket-destroy (``ss -K``, CONFIG_INET_DIAG_DESTROY): qemu's
write fails at once, the migration fails, the lock is released, and the
source runs on.
"""

from __future__ import annotations

import logging

from ferry.command import run_command

__all__ = ["destroy_connections", "tcp_endpoint"]

log = logging.getLogger("ferry.netkill")

_TIMEOUT = 10.0


def tcp_endpoint(uri: str) -> tuple[str, int] | None:
    """(host, port) of a ``tcp:HOST:PORT`` / ``tcp://HOST:PORT`` URI, else None."""
    for prefix in ("tcp://", "tcp:"):
        if uri.startswith(prefix):
            rest = uri[len(prefix):]
            break
    else:
        return None
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


async def destroy_connections(host: str, port: int) -> int:
    """Destroy every TCP connection of this network namespace to ``host:port``.

    Returns how many ``ss`` listed (0 when none, or when ``ss -K`` is not
    possible here). Never raises.
    """
    argv = ["ss", "-K", "-t", "-n", "-H", "dst", host, "dport", "=", str(port)]
    try:
        done = await run_command(argv, _TIMEOUT)
    except (OSError, TimeoutError) as exc:
        log.warning("cannot destroy the connections to %s:%d: %s", host, port, exc)
        return 0
    killed = len([line for line in done.stdout.splitlines() if line.strip()])
    if done.returncode != 0 or (not killed and done.stderr.strip()):
        log.warning("ss -K for %s:%d: %s", host, port, done.stderr.strip())
    return killed
