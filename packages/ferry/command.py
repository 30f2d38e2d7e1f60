"""Run a short host command (``qemu-img``, ``ss``) from an argv list, bounded in time."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CommandResult", "run_command"]


@dataclass(frozen=True)
class CommandResult:
    """What the command said: exit status, stdout, stderr (decoded)."""

    returncode: int
    stdout: str
    stderr: str


async def run_command(argv: Sequence[str], timeout: float) -> CommandResult:
    """Run ``argv`` (never a shell) to completion.

    Raises:
        OSError: it could not be executed.
        TimeoutError: it did not finish within ``timeout`` s (it was killed and reaped).
    """
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return CommandResult(proc.returncode, out.decode(errors="replace"),
                         err.decode(errors="replace"))  # fmt: skip
