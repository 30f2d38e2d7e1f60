"""Migration progress display and journal printing for ferryctl.

On a terminal a live ``rich`` panel shows the phase, data processed and
remaining, bandwidth, dirty rate, throttle and predicted time left; with
``--json`` every event is one JSON object on its own line; on a pipe
without ``--json`` a plain line per phase change and every few seconds.
"""

from __future__ import annotations

import json
import sys
import time
from types import TracebackType
from typing import Any

__all__ = ["Display", "describe", "make_display", "print_journal"]

GIB = 1024**3
MIB = 1024**2


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.1f} MiB"


def _rate(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / MIB:.1f} MiB/s"


def _secs(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n:.1f} s"


class Display:
    """Base display: plain lines, used on pipes."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self.phase = "begin"
        self.last: dict[str, Any] = {}
        #: The last storage-copy sample (--copy-storage-*), shown beside RAM.
        self.storage: dict[str, Any] = {}
        self._last_print = 0.0

    def __enter__(self) -> Display:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def note(self, text: str) -> None:
        """A message for the operator (stderr, so stdout stays parseable)."""
        print(text, file=sys.stderr, flush=True)

    def event(self, name: str, data: dict[str, Any]) -> None:
        """Handle one event streamed by the agent."""
        if name == "phase":
            self.phase = str(data.get("phase"))
            print(f"phase: {self.phase}", flush=True)
        elif name == "progress":
            self.last = data
            now = time.monotonic()
            if self.verbose or now - self._last_print > 2.0:
                self._last_print = now
                print(self.line(data), flush=True)
        elif name == "storage":
            self.storage = data
            now = time.monotonic()
            if self.verbose or now - self._last_print > 2.0 or _storage_done(data):
                self._last_print = now
                print(storage_line(data), flush=True)
        elif name == "warning":
            self.note(f"warning: {data.get('message')}")
        elif name in ("decision", "postcopy", "preflight"):
            print(describe(name, data), flush=True)

    def line(self, data: dict[str, Any]) -> str:
        """One-line summary of a progress sample."""
        return (
            f"{self.phase}: processed {_size(data.get('transferred'))}, "
            f"remaining {_size(data.get('remaining'))}, "
            f"bandwidth {_rate(data.get('smoothed_bandwidth'))}, "
            f"dirty {_rate(data.get('dirty_rate'))}, "
            f"throttle {data.get('throttle_pct', 0)}%, "
            f"ETA {_secs(data.get('eta_s'))}"
            + (f", plan {data['plan']}" if data.get("plan") else "")
            + (
                f", tunnel {_size(data['tunnel_bytes'])} at "
                f"{_rate(data.get('tunnel_bandwidth') or data.get('tunnel_bytes_per_s'))}"
                if "tunnel_bytes" in data
                else ""
            )
        )

    def finish(self, result: dict[str, Any]) -> None:
        """Print the outcome."""
        stats = result.get("stats", {})
        if result.get("offline"):
            print(f"Offline migration completed: {result.get('dest_name')} is defined (inactive) "
                  f"on {result.get('dest_host')}; {result.get('name')} is "
                  f"{result.get('source_state')} here, its definition "
                  f"{result.get('source_definition')}", flush=True)  # fmt: skip
            return
        print(
            f"Migration completed: {result.get('name')} now runs on {result.get('dest_host')} "
            f"(total {stats.get('total_time_ms', '-')} ms, "
            f"downtime {stats.get('downtime_ms', '-')} ms, "
            f"{_size(stats.get('transferred'))} transferred, "
            f"throttle {stats.get('throttle_pct', 0)}%"
            + (", post-copy" if stats.get("postcopy") else "")
            + (
                f", {_size(stats['tunnel_bytes'])} through the {stats.get('tunnel_mode')} "
                f"tunnel on {stats.get('tunnel_channels')} channel(s)"
                if "tunnel_bytes" in stats
                else ""
            )
            + ")",
            flush=True,
        )


class JSONDisplay(Display):
    """One JSON object per event, for scripts."""

    def note(self, text: str) -> None:
        print(json.dumps({"event": "note", "data": {"message": text}}), flush=True)

    def event(self, name: str, data: dict[str, Any]) -> None:
        print(json.dumps({"event": name, "data": data}, default=str), flush=True)

    def finish(self, result: dict[str, Any]) -> None:
        print(json.dumps({"event": "result", "data": result}, default=str), flush=True)


class RichDisplay(Display):
    """A live panel on a terminal."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__(verbose)
        self.decision = ""
        from rich.console import Console
        from rich.live import Live

        self.console = Console(stderr=False)
        self.live = Live(
            self._render(), console=self.console, refresh_per_second=8, transient=False
        )

    def _render(self) -> Any:
        from rich.table import Table

        data = self.last
        table = Table(title="ferry migration", show_header=False, expand=False)
        table.add_column("what", style="bold")
        table.add_column("value")
        total = data.get("total") or 0
        transferred = data.get("transferred") or 0
        table.add_row("phase", self.phase)
        table.add_row("processed", f"{_size(transferred)} of {_size(total)} RAM")
        table.add_row("remaining", _size(data.get("remaining")))
        table.add_row("bandwidth", _rate(data.get("smoothed_bandwidth")))
        table.add_row("dirty rate", _rate(data.get("dirty_rate")))
        table.add_row("passes", str(data.get("iteration", 0)))
        table.add_row("throttle", f"{data.get('throttle_pct', 0)} %")
        converging = data.get("converging")
        table.add_row("converging", "-" if converging is None else ("yes" if converging else "NO"))
        table.add_row("ETA", _secs(data.get("eta_s")))
        if self.storage:
            table.add_row("storage", storage_line(self.storage))
        if data.get("plan"):
            table.add_row("plan", str(data["plan"]))
        if self.decision:
            table.add_row("last decision", self.decision)
        if "tunnel_bytes" in data:
            table.add_row(
                "tunnel",
                f"{_size(data['tunnel_bytes'])} at "
                f"{_rate(data.get('tunnel_bandwidth') or data.get('tunnel_bytes_per_s'))}",
            )
        return table

    def __enter__(self) -> Display:
        self.live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.live.update(self._render())
        self.live.__exit__(exc_type, exc, tb)

    def note(self, text: str) -> None:
        self.console.print(text)

    def event(self, name: str, data: dict[str, Any]) -> None:
        if name == "phase":
            self.phase = str(data.get("phase"))
        elif name == "progress":
            self.last = data
        elif name == "storage":
            self.storage = data
        elif name == "warning":
            self.console.print(f"[yellow]warning:[/] {data.get('message')}")
        elif name in ("decision", "postcopy", "preflight"):
            self.decision = describe(name, data)
            self.console.print(self.decision)
        self.live.update(self._render())


def _storage_done(data: dict[str, Any]) -> bool:
    disks = data.get("disks") or {}
    return bool(disks) and all(d.get("ready") for d in disks.values())


def storage_line(data: dict[str, Any]) -> str:
    """One line for the disks' copy: total and per disk (``--copy-storage-*``)."""
    disks = data.get("disks") or {}
    parts = ", ".join(
        f"{t} {_size(d.get('copied'))}/{_size(d.get('total'))}"
        + (" in sync" if d.get("ready") else "")
        for t, d in disks.items())  # fmt: skip
    return (f"storage: copied {_size(data.get('disk_copied'))} of {_size(data.get('disk_total'))}"
            + (f" ({parts})" if parts else ""))  # fmt: skip


def describe(name: str, data: dict[str, Any]) -> str:
    """One line for a decision, a switch to post-copy or the pre-flight verdict."""
    if name == "postcopy":
        return f"switched to post-copy: {data.get('reason', '')}"
    if name == "preflight":
        verdict = data.get("verdict") or {}
        reasons = "; ".join(str(r) for r in verdict.get("reasons") or [])
        return f"pre-flight: plan {verdict.get('plan', '?')}" + (f" ({reasons})" if reasons else "")
    return f"decision: {data.get('reason', '')}"


def make_display(*, json_lines: bool, verbose: bool = False) -> Display:
    """Pick the display for the output: JSON lines, a live panel, or plain lines."""
    if json_lines:
        return JSONDisplay(verbose)
    if sys.stdout.isatty():
        return RichDisplay(verbose)
    return Display(verbose)


def print_journal(entries: list[dict[str, Any]]) -> None:
    """Print journal entries, one line each, labelled with their host."""
    for entry in entries:
        stamp = time.strftime("%H:%M:%S", time.localtime(float(entry.get("timestamp", 0))))
        frac = f"{float(entry.get('timestamp', 0)) % 1:.3f}"[1:]
        host = entry.get("host") or entry.get("FERRY_HOST") or "?"
        agent = entry.get("agent") or entry.get("SYSLOG_IDENTIFIER") or ""
        phase = entry.get("FERRY_PHASE")
        tag = f" [{phase}]" if phase else ""
        print(f"{stamp}{frac} {host:<8} {agent:<18}{tag} {entry.get('message', '')}")
