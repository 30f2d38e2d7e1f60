"""ferry-source's end of a tunnelled migration.

qemu migrates into a unix socket that only this agent can open (mode 0600 in
the run directory, never a TCP port); every connection qemu makes there (the
main stream, then one per multifd channel, in that order) becomes one data
connection to the destination agent, with the channel's index, so the far
end can hand them to its qemu in the same order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from ferry.errors import FerryError
from ferry.tunnel.channel import ChannelSet, open_channel

__all__ = ["SourceTunnel"]

log = logging.getLogger("ferry.source.tunnel")

# How long relays may take to drain on their own after qemu finished.
DRAIN_TIMEOUT = 10.0


class SourceTunnel:
    """The listening socket qemu migrates into, and the channels behind it."""

    def __init__(
        self,
        *,
        name: str,
        socket_path: Path,
        endpoint: Any,
        host: str,
        port: int,
        token: str,
        channels: int,
        mode: str,
        on_error: Callable[[FerryError], None] | None = None,
        first_index: int = 0,
    ) -> None:
        self.name = name
        self.path = socket_path
        self._endpoint = endpoint
        self._host = host
        self._port = port
        self._token = token
        self._channels = channels
        self._first = first_index
        self._on_error = on_error
        self.mode = mode
        self.set = ChannelSet(name, on_error)
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None

    def sibling(self, socket_path: Path, first_index: int, channels: int) -> SourceTunnel:
        """Another socket whose connections become channels ``first_index`` .. of the
        same token (``--copy-storage-*``: qemu's NBD client connects there, one
        connection per disk)."""
        return SourceTunnel(name=self.name, socket_path=socket_path, endpoint=self._endpoint,
                            host=self._host, port=self._port, token=self._token,
                            channels=channels, mode=self.mode, on_error=self._on_error,
                            first_index=first_index)  # fmt: skip

    @property
    def uri(self) -> str:
        """What qemu's ``migrate`` is given."""
        return f"unix:{self.path}"

    def listen(self) -> None:
        """Create the socket (0600: qemu runs as us; nobody else may feed it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(self._channels + 1)
        sock.setblocking(False)
        self._listener = sock
        self._accepting = asyncio.create_task(self._accept(), name=f"tunnel-accept-{self.name}")

    async def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        for index in range(self._first, self._first + self._channels):
            conn, _ = await loop.sock_accept(self._listener)
            conn.setblocking(True)
            self.set.spawn(index, partial(self._carry, index, conn))

    def _carry(self, index: int, qemu_side: socket.socket) -> None:
        """Channel thread: open the data connection, then relay until the end."""
        try:
            channel = open_channel(self._endpoint, self._host, self._port, token=self._token,
                                   index=index, mode=self.mode,
                                   stopped=self.set.stopping)  # fmt: skip
        except Exception as exc:
            # Recorded before qemu's socket closes: the perform loop must
            # see our reason, not only qemu's "broken pipe".
            self.set.fail_unless_stopping(exc, index)
            qemu_side.close()
            return
        # qemu sees its stream end when this returns: on failure its
        # migration fails at once.
        self.set.carry(channel, qemu_side)

    def bytes(self) -> tuple[int, int]:
        """(bytes sent to the destination, bytes received) through the tunnel."""
        return self.set.bytes()

    async def close(self, *, drain: bool) -> None:
        """Stop accepting, let the relays finish (``drain``) or stop them, free everything."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        await self.set.wind_down(drain=drain, timeout=DRAIN_TIMEOUT)
