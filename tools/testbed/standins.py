"""Stand-ins for host tools that cannot run on this machine.

systemd is not PID 1 here, so the real ``systemd-run --scope`` refuses
("System has not been booted with systemd as init system").  The stand-in
named ``systemd-run``, put first on PATH, records its argv, prints what the
real one prints once the scope exists ("Running scope as unit: NAME") and
execs what follows ``--`` in its own process, as ``systemd-run --scope``
does.  A file ``fail`` next to it makes it fail the way systemd-run does
without a bus.  What it execs is real (qemu); the cgroup move is systemd's
and is not exercised.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

__all__ = ["write_systemd_run"]

_SYSTEMD_RUN = textwrap.dedent(
    """\
    #!{python}
    import json, os, sys
    args = sys.argv[1:]
    if args == ["--version"]:
        print("systemd 252 (252-stand-in)")
        sys.exit(0)
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.exists(os.path.join(here, "fail")):
        print("Failed to connect to bus: No such file or directory", file=sys.stderr)
        sys.exit(1)
    cut = args.index("--")
    unit = [a.split("=", 1)[1] for a in args[:cut] if a.startswith("--unit=")][0]
    with open(os.path.join(here, "calls.jsonl"), "a") as log:
        log.write(json.dumps({{"pid": os.getpid(), "argv": sys.argv}}) + "\\n")
    print("Running scope as unit: " + unit, file=sys.stderr, flush=True)
    os.environ["FERRY_STANDIN_PID"] = str(os.getpid())
    os.execvp(args[cut + 1], args[cut + 1:])
    """
)


def write_systemd_run(bindir: Path) -> Path:
    """Write the stand-in ``systemd-run`` into ``bindir`` (which must exist)."""
    script = bindir / "systemd-run"
    script.write_text(_SYSTEMD_RUN.format(python=sys.executable))
    script.chmod(0o755)
    return script
