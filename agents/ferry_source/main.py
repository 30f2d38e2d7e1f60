"""ferry-source entry point."""

from __future__ import annotations

import asyncio
import sys

from ferry.config import AgentConfig
from ferry.daemon import agent_main

__all__ = ["main"]


async def _run(config: AgentConfig, stop: asyncio.Event) -> None:
    from ferry_source.agent import SourceAgent

    await SourceAgent(config).run(stop)


def main(argv: list[str] | None = None) -> int:
    """Run the ferry-source daemon until SIGTERM."""
    return agent_main(
        "ferry-source",
        "Ferry source agent: owns this host's domains and drives outgoing migrations.",
        _run,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
