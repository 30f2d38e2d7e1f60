"""``ferryctl migrate --client-driven``: ferryctl drives the five phases itself.

Begin, Perform and Confirm go to the source's admin socket; Prepare and
Finish to the destination's agent port over TLS with an *operator
certificate* (``ferryctl pki client NAME``), so the source host needs no
right to talk to the destination.  The cookies travel through here as in
libvirt's non-p2p v3 protocol.

The rules that keep one copy:

- Finish is sent cancelled unless Perform completed (or the source says its
  qemu died after the stream started, when the destination's copy is the
  only one left).
- Confirm is sent cancelled only when the destination *answered* Finish
  with an error: it never starts CPUs then.  When Finish got no answer,
  Confirm says the outcome is unknown and the source asks the destination.
- While Perform runs, ferryctl tells the destination that the stream still
  moves (``migration_progress``), as the source agent does in p2p.

If ferryctl dies between two phases, both agents wait ``client_grace_s``
for ``ferryctl migrate-recover NAME [--pki DIR]`` (:meth:`Driver.take_over`),
then end the migration by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferry.errors import FerryError, MigrationFailed, PhaseError, ProtocolError, ReplyLost
from ferry.flags import MigrationFlags, MigrationParams
from ferry.rpc import Session, connect_tcp, keepalive, make_hello
from ferry.tls import TLSFiles, client_context
from ferry.uri import parse_dest_uri

__all__ = ["OPERATOR_PKI_ENV", "Driver", "operator_files"]

#: Where the operator's certificate directory is named when --pki is not given.
OPERATOR_PKI_ENV = "FERRY_OPERATOR_PKI"
#: Test-only: ferryctl kills itself (SIGKILL) at this point (after-begin,
#: after-prepare, during-perform, after-perform, after-finish) — the fault
#: matrix's "client killed" column, at an exact place in the protocol.
CLIENT_FAULT_ENV = "FERRY_TESTING_CLIENT_DIES"
CLIENT_UUID = "00000000-0000-0000-0000-000000000000"
HEARTBEAT_INTERVAL_S = 2.0
CONNECT_TIMEOUT_S = 10.0
#: Prepare starts a qemu; Finish waits for the stream's end and starts CPUs.
REPLY_TIMEOUT_S = 120.0
#: A Finish the destination is told to cancel only tidies up.
CANCELLED_FINISH_TIMEOUT_S = 10.0

Show = Callable[[str, dict[str, Any]], None]


def operator_files(directory: Path | None) -> TLSFiles:
    """The operator certificate in ``directory`` (as ``ferryctl pki client NAME`` wrote it).

    Raises:
        FerryError: no directory given, or it does not hold exactly one
            certificate with its key beside ``ca.pem``.
    """
    if directory is None:
        env = os.environ.get(OPERATOR_PKI_ENV)
        if not env:
            raise FerryError(
                "--client-driven needs an operator certificate: pass --pki DIR (the directory "
                f"'ferryctl pki client NAME' wrote) or set {OPERATOR_PKI_ENV}"
            )
        directory = Path(env)
    ca = directory / "ca.pem"
    certs = sorted(
        p for p in directory.glob("*.pem")
        if p.name != "ca.pem" and not p.name.endswith("-key.pem")
        and (directory / f"{p.stem}-key.pem").exists()
    )  # fmt: skip
    if not ca.exists() or len(certs) != 1:
        found = ", ".join(p.name for p in certs) or "none"
        raise FerryError(
            f"{directory}: expected ca.pem and one NAME.pem with NAME-key.pem (as 'ferryctl pki "
            f"client NAME' writes them); found ca.pem {'yes' if ca.exists() else 'no'}, "
            f"certificates: {found}"
        )
    cert = certs[0]
    return TLSFiles(ca=ca, cert=cert, key=directory / f"{cert.stem}-key.pem")


def _die_here(point: str) -> None:
    """The test-only client fault: SIGKILL ourselves, like ``kill -9``, at ``point``."""
    if os.environ.get(CLIENT_FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


class Driver:
    """One client-driven migration, from Begin (or a take-over) to Confirm."""

    def __init__(self, source: Session, files: TLSFiles, show: Show) -> None:
        self.source = source
        self.files = files
        self.show = show
        self.dest: Session | None = None
        self.migration_id = ""
        self.name = ""
        self.dest_name = ""
        self.flags = MigrationFlags(0)
        self.params = MigrationParams()
        self.dest_host = ""

    # -- the whole protocol ----------------------------------------------------

    async def migrate(
        self, name: str, dest_uri: str, flags: MigrationFlags, params: MigrationParams
    ) -> dict[str, Any]:
        """Run Begin → Prepare → Perform → Finish → Confirm; Confirm's summary."""
        self.name = name
        flags &= ~MigrationFlags.PEER2PEER
        begun = await self.source.request("begin", {
            "name": name, "dest_uri": dest_uri, "flags": int(flags),
            "params": params.to_wire(),
        }, on_event=self._source_event)  # fmt: skip
        self.migration_id = str(begun["migration_id"])
        self.flags = MigrationFlags(begun["flags"])
        self.params = params
        _die_here("after-begin")
        try:
            await self._connect(dest_uri)
            prepared = await self._prepare(begun)
        except BaseException:
            with contextlib.suppress(FerryError, OSError):
                await self._confirm(cancelled=True)
            await self.close()
            raise
        return await self._from_perform(prepared)

    async def take_over(self, adopted: dict[str, Any]) -> dict[str, Any]:
        """Continue a migration whose client went away (``adopt_outgoing``'s answer)."""
        self.name = str(adopted["name"])
        self.migration_id = str(adopted["migration_id"])
        self.flags = MigrationFlags(adopted["flags"])
        self.params = MigrationParams.from_wire(adopted.get("params") or {})
        stage = str(adopted["stage"])
        self.show("warning", {"message": f"taking over migration {self.migration_id} of "
                                         f"'{self.name}' ({stage})"})  # fmt: skip
        await self._connect(str(adopted["dest_uri"]))
        if stage == "begun":
            try:
                prepared = await self.dest_request("adopt_incoming",
                                                   {"migration_id": self.migration_id})
            except FerryError:
                # The destination never prepared it (or discarded it): Prepare now.
                prepared = await self._prepare(adopted)
            else:
                self.dest_name = str(prepared.get("name") or self.name)
            return await self._from_perform(prepared)
        with contextlib.suppress(FerryError):
            # Take its side over too, so its grace ends; Finish decides either way.
            await self.dest_request("adopt_incoming", {"migration_id": self.migration_id})
        self.dest_name = str(adopted.get("dest_name") or self.name)
        # Perform is running or over: the source follows it (or gives its
        # result) and ignores the URI and cookie.
        return await self._from_perform({"uri": "-", "cookie": b"", "name": self.dest_name})

    async def close(self) -> None:
        """Close the connection to the destination."""
        if self.dest is not None:
            with contextlib.suppress(Exception):
                await self.dest.close()

    # -- phases ----------------------------------------------------------------

    async def _connect(self, dest_uri: str) -> None:
        host, port = parse_dest_uri(dest_uri)
        self.dest_host = host
        hello = make_hello(CLIENT_UUID, socket.gethostname(), "client")
        try:
            self.dest = await connect_tcp(host, port, hello, ssl_context=client_context(
                self.files), server_hostname=host, timeout=CONNECT_TIMEOUT_S)  # fmt: skip
        except FerryError:
            raise
        except (OSError, TimeoutError) as exc:
            raise FerryError(f"cannot reach ferry-destination at {host}:{port}: {exc}") from None
        keepalive(self.dest)

    async def dest_request(
        self, op: str, args: dict[str, Any], timeout: float = REPLY_TIMEOUT_S
    ) -> dict[str, Any]:
        """One request to the destination; :class:`ReplyLost` when no answer came."""
        assert self.dest is not None
        try:
            return await self.dest.request(op, args, timeout=timeout)
        except (ProtocolError, OSError, TimeoutError) as exc:
            if isinstance(exc, ProtocolError) and not self.dest.closed:
                raise
            raise ReplyLost(f"{op}: no answer from {self.dest_host} ({exc})",
                            peer=self.dest_host) from None  # fmt: skip

    async def _prepare(self, begun: dict[str, Any]) -> dict[str, Any]:
        self._phase("prepare")
        prepared = await self.dest_request("prepare", {
            "xml": begun["xml"], "cookie": begun["cookie"], "flags": int(self.flags),
            "params": self.params.to_wire(),
        })  # fmt: skip
        self.dest_name = str(prepared.get("name") or self.name)
        _die_here("after-prepare")
        return prepared

    async def _from_perform(self, prepared: dict[str, Any]) -> dict[str, Any]:
        """Perform (or follow the one running), Finish, Confirm."""
        try:
            perform_error: FerryError | None = None
            try:
                if not self.flags & MigrationFlags.OFFLINE:  # offline: no Perform
                    await self._perform(prepared)
            except FerryError as exc:
                perform_error = exc
                if isinstance(exc, ProtocolError) and self.source.closed:
                    raise
            _die_here("after-perform")
            cancelled = perform_error is not None and bool(
                perform_error.details.get("finish_cancelled", True))  # fmt: skip
            self._phase("finish")
            outcome = "completed"
            finish_error: FerryError | None = None
            try:
                fin = await self.dest_request("finish", {
                    "name": self.dest_name, "cookie": b"", "flags": int(self.flags),
                    "params": self.params.to_wire(), "cancelled": cancelled,
                    "migration_id": self.migration_id,
                }, timeout=CANCELLED_FINISH_TIMEOUT_S if cancelled else REPLY_TIMEOUT_S)
                self.dest_host = str(fin.get("host") or self.dest_host)
            except ReplyLost as exc:
                outcome = "unknown" if not cancelled else "failed"
                finish_error = exc
            except PhaseError as exc:
                # No such incoming migration there (any more): whatever ended
                # it recorded the outcome; the source asks for it.
                outcome, finish_error = "unknown", exc
            except FerryError as exc:
                # The destination answered Finish itself with an error: it
                # discarded its copy.
                outcome, finish_error = "failed", exc
            _die_here("after-finish")
            if cancelled:
                outcome = "failed"
            result = await self._confirm(cancelled=outcome == "failed",
                                         unknown=outcome == "unknown")  # fmt: skip
            if outcome == "failed":
                error = perform_error or finish_error
                assert error is not None
                note = f" (the VM was {result.get('source')})" if result.get("source") else ""
                error.message += note
                error.args = (error.message,)
                raise error
            return result
        finally:
            await self.close()

    async def _perform(self, prepared: dict[str, Any]) -> dict[str, Any]:
        heartbeat: list[float] = [0.0]
        beats: set[asyncio.Task[Any]] = set()
        loop = asyncio.get_running_loop()

        def on_event(event: str, data: dict[str, Any]) -> None:
            self._source_event(event, data)
            if event == "progress":
                if data.get("transferred"):
                    _die_here("during-perform")
                now = loop.time()
                if now - heartbeat[0] >= HEARTBEAT_INTERVAL_S and self.dest is not None:
                    heartbeat[0] = now
                    moved = int(data.get("transferred") or 0) + int(data.get("tunnel_bytes") or 0)
                    task = loop.create_task(self._beat(moved))
                    beats.add(task)
                    task.add_done_callback(beats.discard)

        args: dict[str, Any] = {
            "name": self.name, "migration_id": self.migration_id,
            "uri": str(prepared["uri"]), "cookie": prepared["cookie"],
            "dest_name": self.dest_name,
        }  # fmt: skip
        if prepared.get("tunnel"):
            args["tunnel"] = prepared["tunnel"]
        try:
            return await self.source.request("perform", args, on_event=on_event)
        finally:
            for task in beats:
                task.cancel()

    async def _beat(self, transferred: int) -> None:
        with contextlib.suppress(FerryError, OSError, TimeoutError):
            await self.dest_request("migration_progress", {
                "migration_id": self.migration_id, "transferred": transferred}, timeout=10)

    async def _confirm(self, *, cancelled: bool, unknown: bool = False) -> dict[str, Any]:
        return await self.source.request("confirm", {
            "name": self.name, "migration_id": self.migration_id, "cancelled": cancelled,
            "unknown": unknown, "dest_host": self.dest_host or None,
        }, on_event=self._source_event)  # fmt: skip

    # -- display ---------------------------------------------------------------

    def _phase(self, phase: str) -> None:
        self.show("phase", {"phase": phase, "migration_id": self.migration_id})

    def _source_event(self, event: str, data: dict[str, Any]) -> None:
        if event == "phase" and data.get("migration_id") and not self.migration_id:
            self.migration_id = str(data["migration_id"])
        self.show(event, data)


def lost_source(name: str, migration_id: str, exc: BaseException) -> FerryError:
    """The error when ferry-source's admin connection broke mid-way."""
    ident = f" {migration_id}" if migration_id else ""
    return MigrationFailed(
        f"lost the connection to ferry-source during client-driven migration{ident} ({exc}); "
        f"both agents end the migration on their own after their grace period, or take it "
        f"over with 'ferryctl migrate-recover {name} [--pki DIR]'"
    )
