"""ferry-destination entry point."""

from __future__ import annotations

import asyncio
import sys

from ferry.config import AgentConfig
from ferry.daemon import agent_main

__all__ = ["main"]


async def _run(config: AgentConfig, stop: asyncio.Event) -> None:
    from ferry_destination.agent import DestinationAgent

    await DestinationAgent(config).run(stop)


def main(argv: list[str] | None = None) -> int:
    """Run the ferry-destination daemon until SIGTERM."""
    return agent_main(
        "ferry-destination",
        "Ferry destination agent: receives incoming migrations (Prepare/Finish).",
        _run,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
