"""The fault matrix of issue 10: which fault, at which point, and what must hold after it.

Every cell is one migration of ``g1`` from A to B on a fresh two-host test
bed, broken once at a deterministic point:

1. the agent that reaches the phase's fault point (``[testing] faults``, see
   :mod:`ferry.faults`) freezes itself there (``stop``), or loses that step's
   reply (``drop-reply``, the "lose one reply" column);
2. while it is frozen the test applies the fault: kill -9 an agent, kill a
   qemu, or cut the link (the veth inside B's namespace);
3. the frozen agent is thawed if it is alive; killed agents are restarted
   (without the fault) at once, or once ``ferryctl migrate`` has exited where
   that is the meaningful order; the link is restored once ``ferryctl
   migrate`` has exited;
4. if A reports the outcome unknown, ``ferryctl migrate-recover g1`` settles it;
   if A fenced its copy as paused in post-copy, ``ferryctl migrate g1 B
   --postcopy --postcopy-resume`` finishes the move; where the fault destroyed
   half of a post-copy VM (a qemu killed mid-stream), the loss must be
   reported, nothing may run, resuming must fail, and both halves are
   destroyed so that the bed is reusable (:meth:`CellRun.settle_lost`);
5. once everything settled (no job record, no incoming job or token, one
   qemu per active domain), the safety rule is checked (:func:`check_settled`)
   and a next migration must succeed with the guest's memory intact.

The client-driven column (issue 13, ``mode="client"``, ids ``client-…``) runs
the same steps with ``ferryctl migrate --client-driven`` in A's namespace
(operator certificate, ``[migration] client_grace_s`` = CLIENT_GRACE_S):
ferryctl SIGKILLs itself after each phase (FERRY_TESTING_CLIENT_DIES), or an
agent or the link breaks where this mode differs from p2p.  When ferryctl
was killed, both agents must hold the migration through the grace period
and end it alone soon after (:meth:`CellRun.client_dies`); ferryctl must
report within CLIENT_EXIT_BOUND_S of an agent or link fault.

Nothing here sleeps to synchronise: every wait polls a condition with a bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from faults import Link, freeze_point_logged, kill_qemu, thaw, wait_frozen

import testguest
from cluster import LOCAL_STORAGE, VENV_BIN, Cluster, HostEnv, guest_xml, wait_until

__all__ = [
    "CELLS",
    "FAULTS",
    "KNOWN_BUGS",
    "NOT_APPLICABLE",
    "PHASES",
    "TIMEOUTS",
    "Cell",
    "CellRecord",
    "run_cell",
]

class CellFailure(AssertionError):
    """The safety rule or the harness's expectations do not hold."""


# -- the matrix -------------------------------------------------------------------

FAULTS = (
    "kill-source-agent",
    "kill-destination-agent",
    "kill-source-qemu",
    "kill-destination-qemu",
    "cut-link",
    "lose-reply",
)
FAULT_TITLES = {
    "kill-source-agent": "kill -9 ferry-source (A)",
    "kill-destination-agent": "kill -9 ferry-destination (B)",
    "kill-source-qemu": "kill source qemu (A)",
    "kill-destination-qemu": "kill destination qemu (B)",
    "cut-link": "cut the link",
    "lose-reply": "lose one reply",
}
PHASES = ("begin", "prepare", "perform", "finish", "confirm", "postcopy")

#: The point each phase is driven at (a cell may pick another, see CELLS).
PHASE_POINTS = {
    "begin": "src.begin",
    "prepare": "dst.prepare",
    "perform": "src.perform",
    "finish": "dst.finish",
    "confirm": "src.confirm",
    "postcopy": "src.postcopy",
}

NOT_APPLICABLE = {
    ("kill-destination-qemu", "begin"): "no destination qemu exists before Prepare",
}

#: Short timeouts so that every cell settles fast (agent.toml keys).
TIMEOUTS: dict[str, Any] = {
    "migration.stall_timeout_s": 5,
    "migration.reply_timeout_s": 15,
    "migration.outcome_timeout_s": 10,
    "destination.incoming_timeout_s": 20,
}

# Bounds of the waits (seconds).  The slowest legitimate path of a cell is a
# lost Finish reply over a cut link: reply timeout, then the outcome timeout.
FREEZE_WAIT = 60.0
MIGRATE_EXIT_WAIT = 90.0
RECOVER_WAIT = 30.0
SETTLE_WAIT = 60.0

# Perform cells cap the copy so that it is still running when the fault hits
# (32 MiB at 4 MiB/s: ~8 s); the guest dirties slowly enough to converge.
PERFORM_BANDWIDTH_MIB_S = 4
GUEST_MEM_MIB = 32

# Post-copy cells (issue 12): the guest rewrites an 8 MiB working set flat
# out, so a pre-copy capped at 8 MiB/s never converges (8 MiB left at every
# pass is ~1 s of downtime) and --postcopy-after-precopy switches once the
# first pass is done; post-copy at 1 MiB/s then streams the ~8 MiB left for
# several seconds, long enough for the fault to hit it mid-stream.
POSTCOPY_WSS_MIB = 8
POSTCOPY_PRECOPY_MIB_S = 8
POSTCOPY_BANDWIDTH_MIB_S = 1
POSTCOPY_ARGS = (
    "--postcopy",
    "--postcopy-after-precopy",
    "--bandwidth",
    str(POSTCOPY_PRECOPY_MIB_S),
    "--postcopy-bandwidth",
    str(POSTCOPY_BANDWIDTH_MIB_S),
)
#: ``ferryctl migrate g1 B …`` that finishes a post-copy move A fenced.
POSTCOPY_RESUME = ("--live", "--postcopy", "--postcopy-resume", "--json")
#: ferry.fences.POSTCOPY: the fence of a copy paused in post-copy.
POSTCOPY_FENCE = "postcopy"

# The client-driven column (issue 13): ``ferryctl migrate --client-driven``
# runs in A's namespace with the operator certificate and drives the five
# phases itself.  Both agents give a client that went away CLIENT_GRACE_S
# to take the migration over (``ferryctl migrate-recover``), then end it.
CLIENT_GRACE_S = 3
#: ferryctl's own fault (FERRY_TESTING_CLIENT_DIES): it SIGKILLs itself there.
CLIENT_POINTS = ("after-begin", "after-prepare", "during-perform", "after-perform",
                 "after-finish")  # fmt: skip
#: A migration whose client died is settled at most this long after the grace
#: (its source asks the destination for the outcome, outcome_timeout_s, and
#: the harness's observation of both hosts takes a few seconds).
CLIENT_SETTLE_BOUND_S = 15.0
#: ferryctl --client-driven reports at most this long after an agent or link
#: fault.  The slowest legitimate path is the one p2p takes in 25 s: Finish's
#: reply lost in a cut (reply_timeout_s), then A asks B (outcome_timeout_s).
CLIENT_EXIT_BOUND_S = 40.0


@dataclass(frozen=True)
class Cell:
    """One fault at one point of one phase."""

    fault: str
    phase: str
    point: str
    #: Outcomes that honour the safety rule for this cell: "A", "B" (where the
    #: one running copy is), "none" (the fault killed the only copy).
    expect: tuple[str, ...] = ("A", "B")
    #: When a killed agent comes back: "at-once" (right after the fault) or
    #: "after-exit" (once ``ferryctl migrate`` has exited).
    restart: str = "at-once"
    #: The guest has a disk with a lease in the shared lockspace.
    leased: bool = False
    #: Row of the issue's table of broken cases this cell reproduces.
    headline: int | None = None
    why: str = ""
    #: A cell beside the matrix (another point of the same phase): its name.
    variant: str = ""
    #: "p2p" (ferry-source drives the phases) or "client" (``ferryctl migrate
    #: --client-driven`` drives them: the client-driven column of issue 13).
    mode: str = "p2p"
    #: The guest's disk is on A's local storage and moves with
    #: ``--copy-storage-all`` (issue 15's rows).
    storage: bool = False

    @property
    def id(self) -> str:
        """The pytest id: ``[client-][leased-][storage-]FAULT-PHASE[-VARIANT]``."""
        tail = f"-{self.variant}" if self.variant else ""
        head = ("client-" if self.client else "") + ("leased-" if self.leased else "") \
            + ("storage-" if self.storage else "")
        return f"{head}{self.fault}-{self.phase}{tail}"

    @property
    def client(self) -> bool:
        """ferryctl drives the migration (``--client-driven``)."""
        return self.mode == "client"

    @property
    def action(self) -> str:
        """What the fault point does: ``stop``, ``drop-reply``, or ``kill`` (ferryctl
        kills itself at a point of its own, FERRY_TESTING_CLIENT_DIES)."""
        if self.fault == "kill-client":
            return "kill"
        return "drop-reply" if self.fault == "lose-reply" else "stop"

    @property
    def capped(self) -> bool:
        """The copy is slowed down so that the fault hits it while it runs."""
        return self.phase == "perform" or self.point == "during-perform" or self.storage

    @property
    def point_host(self) -> str:
        """``a`` for ``src.*`` points, ``b`` for ``dst.*``, ``client`` for ferryctl's."""
        if self.action == "kill":
            return "client"
        return "a" if self.point.startswith("src.") else "b"

    @property
    def point_agent(self) -> str:
        """The agent that reaches the point."""
        return "source" if self.point.startswith("src.") else "destination"

    @property
    def postcopy(self) -> bool:
        """The migration switches to post-copy before the fault (issue 12)."""
        return self.phase == "postcopy"

    @property
    def lost(self) -> bool:
        """A post-copy cell whose fault destroys half of the VM (one qemu killed)."""
        return self.postcopy and self.expect == ("none",)


def _cells() -> list[Cell]:
    specials: dict[tuple[str, str], dict[str, Any]] = {
        # -- Begin: the VM never paused; A must keep it.
        ("kill-source-agent", "begin"): {"expect": ("A",)},
        ("kill-destination-agent", "begin"): {
            "expect": ("A",),
            "restart": "after-exit",
            "why": "A finds no ferry-destination on B",
        },
        ("kill-source-qemu", "begin"): {"expect": ("none",)},
        ("cut-link", "begin"): {"expect": ("A",)},
        ("lose-reply", "begin"): {"why": "ferryctl's connection is lost; the migration goes on"},
        # -- Prepare: nothing was copied; A must keep it.
        ("kill-source-agent", "prepare"): {"expect": ("A",)},
        ("kill-destination-agent", "prepare"): {"expect": ("A",), "restart": "after-exit"},
        ("kill-source-qemu", "prepare"): {"expect": ("none",)},
        ("kill-destination-qemu", "prepare"): {"expect": ("A",)},
        ("cut-link", "prepare"): {"expect": ("A",)},
        ("lose-reply", "prepare"): {"expect": ("A",)},
        # -- Perform: the copy is running (bandwidth capped).
        ("kill-destination-agent", "perform"): {"headline": 3},
        ("kill-source-qemu", "perform"): {"expect": ("none",)},
        ("kill-destination-qemu", "perform"): {"expect": ("A",)},
        ("cut-link", "perform"): {
            "expect": ("A",),
            "headline": 4,
            "why": "ferryctl must end with an error naming the stall",
        },
        # -- Finish: dst.finish is after B started the CPUs and recorded it.
        ("kill-source-agent", "finish"): {"expect": ("B",), "headline": 2},
        ("kill-destination-agent", "finish"): {
            "point": "dst.finish.begin",
            "headline": 3,
            "why": "killed before it handles Finish",
        },
        ("kill-source-qemu", "finish"): {"expect": ("B",)},
        ("kill-destination-qemu", "finish"): {
            "point": "dst.finish.begin",
            "expect": ("A",),
            "why": "B's copy dies before its CPUs start",
        },
        ("cut-link", "finish"): {"expect": ("B",), "headline": 1},
        ("lose-reply", "finish"): {"expect": ("B",), "headline": 1},
        # -- Confirm: B runs the VM, the outcome is known on A.
        ("kill-source-agent", "confirm"): {"expect": ("B",)},
        ("kill-destination-agent", "confirm"): {"expect": ("B",)},
        ("kill-source-qemu", "confirm"): {"expect": ("B",)},
        ("kill-destination-qemu", "confirm"): {
            "expect": ("none",),
            "why": "the fault kills the only running copy",
        },
        ("cut-link", "confirm"): {"expect": ("B",)},
        ("lose-reply", "confirm"): {"expect": ("B",), "why": "ferryctl's reply is lost"},
        # -- Post-copy (issue 12): src.postcopy is after the switch, before
        # Finish.  B holds the CPU state, A the pages not sent yet.
        ("kill-source-agent", "postcopy"): {
            "expect": ("B",),
            "why": "A's recovery follows the stream, B says postcopy, A fences; resume → B",
        },
        ("kill-destination-agent", "postcopy"): {
            "expect": ("B",),
            "why": "B's recovery holds its post-copy qemu; A fences; resume → B",
        },
        ("kill-source-qemu", "postcopy"): {
            "expect": ("none",),
            "why": "the pages not yet sent die with A's qemu: lost, reported",
        },
        ("kill-destination-qemu", "postcopy"): {
            "expect": ("none",),
            "why": "the CPU state dies with B's qemu: lost, reported",
        },
        ("cut-link", "postcopy"): {
            "expect": ("B",),
            "why": "both qemus postcopy-paused; resume once the link is back → B",
        },
        ("lose-reply", "postcopy"): {
            "expect": ("B",),
            "why": "Finish goes out on an aborted connection; A fences; resume → B",
        },
    }
    cells = []
    for phase in PHASES:
        for fault in FAULTS:
            if (fault, phase) in NOT_APPLICABLE:
                continue
            extra = {"point": PHASE_POINTS[phase], **specials.get((fault, phase), {})}
            cells.append(Cell(fault=fault, phase=phase, **extra))
    # The same with a leased disk: the Finish row and the headline cells.
    leased = [
        Cell(**{**asdict(c), "leased": True})
        for c in cells
        if c.phase == "finish" or (c.headline is not None and c.phase == "perform")
    ]
    extras = [
        Cell(
            fault="kill-destination-agent",
            phase="finish",
            point="dst.finish",
            expect=("B",),
            headline=3,
            variant="after-cpus",
            why="B started the CPUs and recorded it, then died before replying",
        ),
    ]
    return cells + extras + leased


def _client_cells() -> list[Cell]:
    """The client-driven column (issue 13): ferryctl killed after each phase, and the
    agent and link faults where this mode differs from p2p.

    ferryctl runs in A's namespace, so a cut link also cuts it from B; it
    sends Finish itself, so a lost Finish reply is its to handle (Confirm
    with the outcome unknown: A asks B).
    """

    def cell(fault: str, phase: str, point: str, expect: tuple[str, ...], why: str) -> Cell:
        return Cell(fault=fault, phase=phase, point=point, expect=expect, why=why, mode="client")

    never_finished = "ferryctl never sent Finish: B discards, A resumes after the grace"
    return [
        *(cell("kill-client", p, p, ("A",), never_finished) for p in CLIENT_POINTS[:-1]),
        cell("kill-client", "after-finish", "after-finish", ("B",),
             "B runs; after the grace A asks B and stops its copy"),
        cell("kill-source-agent", "perform", "src.perform", ("A",),
             "ferryctl loses A and ends; B discards; A's recovery asks B and resumes"),
        cell("kill-source-agent", "finish", "dst.finish", ("B",),
             "B started the CPUs; A never entered Finish itself: its recovery must ask B"),
        cell("kill-destination-agent", "perform", "src.perform", ("A",),
             "ferryctl's Finish finds B gone; A asks the restarted B, which never finished"),
        cell("kill-destination-agent", "finish", "dst.finish.begin", ("A", "B"),
             "killed before it handles Finish; A asks the restarted B"),
        cell("cut-link", "perform", "src.perform", ("A",),
             "ferryctl is cut from B too; Perform stalls and ferryctl must name it"),
        cell("cut-link", "finish", "dst.finish", ("B",),
             "B started the CPUs; Finish's reply is lost in the cut"),
        cell("lose-reply", "finish", "dst.finish", ("B",),
             "ferryctl Confirms with the outcome unknown: A asks B"),
    ]  # fmt: skip


#: The variant of a cell whose migration is ``--tunnelled``.
TUNNELLED = "tunnelled"


def _storage_cells() -> list[Cell]:
    """Issue 15's rows: the disk mirrored to B's NBD export (``--copy-storage-all``),
    broken while it is copied (``src.mirror``) and once it is complete at
    switchover (``src.switchover``). Besides the safety rule: B keeps no image
    unless it runs the VM, A's image is never changed."""

    def cell(fault: str, phase: str, expect: tuple[str, ...], why: str, **kw: Any) -> Cell:
        return Cell(fault=fault, phase=phase, point=f"src.{phase}", expect=expect, why=why,
                    storage=True, **kw)  # fmt: skip

    return [
        cell("kill-source-agent", "mirror", ("A",),
             "A's qemu keeps mirroring; the restarted agent asks B, resumes, and removes the "
             "mirror jobs and NBD nodes the copy left in qemu"),
        cell("kill-destination-agent", "mirror", ("A",),
             "B's restarted agent discards the incoming qemu and deletes the images it made"),
        cell("kill-source-qemu", "mirror", ("none",), "the only copy dies; B deletes its images"),
        cell("kill-destination-qemu", "mirror", ("A",), "the mirror fails; A runs on"),
        cell("cut-link", "mirror", ("A",), "the mirror stalls; A runs on, B's watchdog discards"),
        cell("cut-link", "switchover", ("A",),
             "the disks are complete on B but the device state cannot follow: A runs on"),
        cell("kill-destination-qemu", "switchover", ("A",),
             "B's qemu dies with complete disks: they are deleted, A runs on"),
        # The disks through the migration's tunnel (--tunnelled): their
        # channels die with B's agent; a stuck stream is unstuck by A.
        cell("kill-destination-agent", "mirror", ("A",),
             "the disks' tunnel channels die with B's agent: the mirror fails, A runs on, "
             "B's restarted agent deletes the images", variant=TUNNELLED),
        cell("cut-link", "switchover", ("A",),
             "qemu's device state hangs in the tunnel: A stops the tunnel, runs on",
             variant=TUNNELLED),
    ]  # fmt: skip


CELLS: tuple[Cell, ...] = tuple(_cells() + _client_cells() + _storage_cells())

#: Cells that show a bug in the agents (not in this harness): marked
#: xfail(strict=True) by test_matrix.py until the agents are fixed.
KNOWN_BUGS: dict[str, str] = {}


# -- what a cell records ------------------------------------------------------------


@dataclass
class CellRecord:
    """What happened in one cell; printed in the matrix and saved as JSON."""

    id: str
    fault: str
    phase: str
    point: str
    leased: bool
    headline: int | None
    expect: tuple[str, ...]
    variant: str
    mode: str = "p2p"
    #: "A runs", "B runs", "none (shut off)", "paused on A" …
    outcome: str | None = None
    #: migrate-recover settled an unknown outcome.
    recovered: bool = False
    #: ``migrate --postcopy --postcopy-resume`` finished a fenced post-copy move.
    postcopy_resumed: bool = False
    #: The stage the cell was in (the failing one if it failed).
    stage: str = "setup"
    status: str = "not run"
    error: str | None = None
    migrate_rc: int | None = None
    migrate_error: str | None = None
    #: Seconds: fault applied → everything settled; the whole cell.
    settle_s: float | None = None
    total_s: float | None = None
    #: Seconds from the fault to ferryctl migrate's exit.
    exit_s: float | None = None
    #: Client-driven cells whose ferryctl was killed: seconds from its death
    #: until A ended the migration (its job record gone), and until B's
    #: incoming qemu was gone (None: B kept a qemu, the VM runs there).
    orphan_end_s: float | None = None
    b_discard_s: float | None = None
    timeline: list[tuple[float, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def for_cell(cls, cell: Cell) -> CellRecord:
        """An empty record for ``cell``."""
        return cls(
            id=cell.id,
            fault=cell.fault,
            phase=cell.phase,
            point=cell.point,
            leased=cell.leased,
            headline=cell.headline,
            expect=cell.expect,
            variant=cell.variant,
            mode=cell.mode,
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        return asdict(self)


# -- observing both hosts -------------------------------------------------------------

#: FERRY_FAULTS_LENIENT=1: skip the agent-state checks where ferryctl lacks the
#: verb (to try the harness against agents that do not have it yet).
LENIENT = os.environ.get("FERRY_FAULTS_LENIENT") == "1"

NAME = "g1"
UUID = "5f1e1d2c-0b7a-4c3e-9f60-000000000a10"
#: A storage cell's disk, on A's local storage (LOCAL_STORAGE as the agents see it).
STORAGE_IMAGE = "g1-local.img"


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


@dataclass
class HostView:
    """What one host says and has, at one moment."""

    label: str
    #: ``list --all`` of ferry-source: name → state.
    domains: dict[str, str]
    reason: str | None
    qemu: list[int]
    job_files: list[str]
    fence: dict[str, Any] | None
    agent_state: dict[str, Any]
    problems: list[str]

    @property
    def state(self) -> str | None:
        """g1's state here, None if this host does not know it."""
        return self.domains.get(NAME)


def _json_of(host: HostEnv, *args: str, agent: str = "source") -> tuple[Any, str | None]:
    """ferryctl's decoded ``--json`` answer, or None and why not.

    Raises:
        CellFailure: ferryctl does not know the verb (a usage error cannot
            go away by waiting).
    """
    try:
        result = host.ferryctl(*args, "--json", agent=agent, timeout=20)
    except subprocess.TimeoutExpired:
        return None, f"ferryctl {' '.join(args)} on {host.label}/{agent} timed out"
    if result.returncode == 2:
        raise CellFailure(f"ferryctl {' '.join(args)}: usage error: {result.stderr.strip()[-300:]}")
    if result.returncode != 0:
        return None, (
            f"ferryctl {' '.join(args)} on {host.label}/{agent} failed: "
            f"{(result.stderr or result.stdout).strip()[-300:]}"
        )
    try:
        return json.loads(result.stdout), None
    except ValueError:
        return None, f"ferryctl {' '.join(args)} on {host.label}/{agent}: not JSON"


def observe_host(host: HostEnv) -> HostView:
    """Everything the safety rule looks at on one host."""
    problems: list[str] = []
    listing, list_err = _json_of(host, "list", "--all")
    domains: dict[str, str] = {}
    if list_err:
        problems.append(list_err)
    else:
        domains = {d["name"]: d["state"] for d in listing}
    reason = None
    if NAME in domains:
        info, _ = _json_of(host, "dominfo", NAME)
        if info is not None:
            reason = info.get("reason")
    qemu = host.qemu_pids()
    active = [n for n, s in domains.items() if s != "shut off"]
    if not list_err and len(qemu) != len(active):
        problems.append(
            f"{host.label}: {len(qemu)} qemu process(es) {qemu} but {len(active)} active "
            f"domain(s) {active}"
        )
    jobs = sorted(p.name for p in (host.run_dir / "jobs").glob("*.job"))
    if jobs:
        problems.append(f"{host.label}: job records left: {jobs}")
    # Read after the state: an agent fences before it stops its copy, so a
    # copy seen stopped here has its fence on disk by now.
    fence = None
    with contextlib.suppress(OSError, ValueError):
        fence = json.loads((host.state_dir / "fences" / f"{UUID}.json").read_text())
    agent_state: dict[str, Any] = {}
    for agent in ("source", "destination"):
        if agent not in host.procs:
            problems.append(f"{host.label}: ferry-{agent} is not running")
            continue
        if LENIENT:
            try:
                st, err = _json_of(host, "agent-state", agent=agent)
            except CellFailure:
                continue
        else:
            st, err = _json_of(host, "agent-state", agent=agent)
        agent_state[agent] = st if st is not None else {"error": err}
        if st is None:
            problems.append(str(err))
            continue
        for key in ("jobs", "incoming", "outgoing"):
            if st.get(key):
                problems.append(f"{host.label}/{agent}: agent-state {key}: {st[key]}")
        if st.get("tokens"):
            problems.append(f"{host.label}/{agent}: agent-state tokens: {st['tokens']}")
    return HostView(
        label=host.label,
        domains=domains,
        reason=reason,
        qemu=qemu,
        job_files=jobs,
        fence=fence,
        agent_state=agent_state,
        problems=problems,
    )


@dataclass
class Observation:
    """Both hosts at one moment."""

    a: HostView
    b: HostView

    @property
    def hosts(self) -> tuple[HostView, HostView]:
        return (self.a, self.b)

    @property
    def problems(self) -> list[str]:
        return self.a.problems + self.b.problems

    @property
    def running(self) -> list[str]:
        """Labels of the hosts that report g1 running."""
        return [h.label for h in self.hosts if h.state == "running"]

    @property
    def paused(self) -> list[str]:
        return [h.label for h in self.hosts if h.state == "paused"]

    @property
    def postcopy_fenced_on_a(self) -> bool:
        """A holds its copy paused and fenced as post-copy (``--postcopy-resume`` finishes it)."""
        return (
            self.a.state == "paused"
            and (self.a.fence or {}).get("outcome") == POSTCOPY_FENCE
            and not self.a.job_files
        )

    @property
    def unknown_on_a(self) -> bool:
        """A holds a paused copy whose outcome it does not know."""
        return self.a.state == "paused" and "outcome unknown" in (self.a.reason or "")

    def describe(self) -> str:
        """A short dump for failure messages."""
        lines = []
        for h in self.hosts:
            lines.append(
                f"  {h.label}: g1={h.state!r} reason={h.reason!r} qemu={h.qemu} "
                f"jobs={h.job_files} fence={(h.fence or {}).get('outcome')!r}"
            )
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


def _entries(value: Any) -> list[dict[str, Any]]:
    """A list of agent-state's (``incoming``, ``outcomes``) as mappings, whatever its shape."""
    if isinstance(value, dict):
        return [v if isinstance(v, dict) else {} for v in value.values()]
    if isinstance(value, list):
        return [v if isinstance(v, dict) else {} for v in value]
    return []


def _where(obs: Observation) -> str:
    """Where g1 is, in the matrix's words (for a record, not a verdict)."""
    parts = [f"{h} runs" for h in (x.upper() for x in obs.running)]
    parts += [f"paused on {h.upper()}" for h in obs.paused]
    return " + ".join(parts) or "none"


def observe(cluster: Cluster) -> Observation:
    """Both hosts, A first."""
    return Observation(observe_host(cluster.a), observe_host(cluster.b))


# -- running a cell -----------------------------------------------------------------


def client_argv(cluster: Cluster, src: HostEnv, *args: str, fault: str | None = None) -> list[str]:
    """argv of a client-driven ferryctl against ``src``'s ferry-source, run in ``src``'s
    network namespace (it dials the other host itself) with the operator certificate.

    :meth:`Cluster.client_argv` is the same for A only; the next migration of
    a cell whose copy ended on B starts from B.
    """
    if src is cluster.a:
        return cluster.client_argv(*args, fault=fault)
    env = ["env", f"FERRY_OPERATOR_PKI={cluster.operator_pki()}"]
    if fault is not None:
        env.append(f"FERRY_TESTING_CLIENT_DIES={fault}")
    return src.ns.exec_argv([*env, *src.ferryctl_argv(*args)])


@dataclass
class Migrate:
    """A ``ferryctl migrate`` running in the background, output in files."""

    proc: subprocess.Popen[str]
    out: Path
    err: Path

    @classmethod
    def start(
        cls,
        cluster: Cluster,
        *extra: str,
        tag: str = "migrate",
        client: bool = False,
        client_fault: str | None = None,
    ) -> Migrate:
        """``ferryctl migrate g1 B`` from A; ``client``: ``--client-driven``, run in A's
        namespace with the operator certificate, killing itself at ``client_fault``."""
        a, b = cluster.a, cluster.b
        out, err = cluster.tmp / f"{tag}.out", cluster.tmp / f"{tag}.err"
        if client:
            argv = client_argv(cluster, a, "migrate", NAME, b.uri, "--live", "--json",
                               "--client-driven", *extra, fault=client_fault)  # fmt: skip
        else:
            argv = [
                str(VENV_BIN / "ferryctl"),
                "--connect",
                str(a.source_socket),
                "migrate",
                NAME,
                b.uri,
                "--live",
                "--json",
                *extra,
            ]
        with out.open("w") as fo, err.open("w") as fe:
            proc = subprocess.Popen(argv, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, text=True)
        return cls(proc, out, err)

    def wait(self, timeout: float) -> int:
        """Wait for ferryctl to exit; kill it and fail if it does not."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise CellFailure(
                f"ferryctl migrate did not exit within {timeout:.0f}s (hangs):\n{self.stderr}"
            ) from None

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def error_line(self) -> str | None:
        """The ``error: …`` line ferryctl printed, if any."""
        lines = [ln for ln in self.stderr.splitlines() if ln.startswith("error:")]
        return lines[-1] if lines else None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Guest:
    """g1's serial reader and the report taken just before the migration."""

    serial: testguest.SerialReader
    before: testguest.Report | None = None

    def snapshot(self) -> testguest.Report:
        rep = self.serial.wait_for(lambda r: r.sweeps > 0, timeout=30)
        self.before = rep
        return rep

    def check_runs_on(self, host: HostEnv, what: str) -> testguest.Report:
        """The guest, read on ``host``, kept counting with its memory intact."""
        assert self.before is not None
        self.serial.reconnect(host.serial_socket(NAME))
        last = self.serial.latest()
        base = last.counter if last is not None else self.before.counter
        try:
            after = self.serial.wait_for(lambda r: r.counter > base + 2, timeout=30, fresh=True)
        except TimeoutError as exc:
            raise CellFailure(f"{what}: the guest on {host.label} does not report: {exc}") from None
        if self.serial.boot_count != 1:
            raise CellFailure(f"{what}: the guest rebooted ({self.serial.boot_count} boot lines)")
        if after.bad_pages != 0:
            raise CellFailure(f"{what}: {after.bad_pages} bad pages on {host.label}: {after.raw}")
        if after.checksum != self.before.checksum:
            raise CellFailure(
                f"{what}: checksum {after.checksum:x} on {host.label}, "
                f"{self.before.checksum:x} before"
            )
        if after.counter <= self.before.counter:
            raise CellFailure(f"{what}: the counter went back: {after.raw}")
        return after


def _xml(kernel: Path, virt_type: str, disk: Path | None, *, slow: bool, busy: bool = False) -> str:
    # A Perform cell's guest dirties 1 MiB/s of a 2 MiB working set, which a
    # 4 MiB/s copy overtakes; the others rewrite 4 MiB as fast as they can,
    # a post-copy cell's (busy) 8 MiB.
    return guest_xml(
        NAME,
        kernel,
        virt_type=virt_type,
        mem_mib=GUEST_MEM_MIB,
        wss_mib=2 if slow else POSTCOPY_WSS_MIB if busy else 4,
        rate_mib_s=1 if slow else 0,
        uuid=UUID,
        disks=[(str(disk), "none")] if disk is not None else (),
    )


def _boot(host: HostEnv, tmp: Path, xml: str, *, force: bool = False) -> Guest:
    path = tmp / f"{NAME}.xml"
    path.write_text(xml)
    host.ferryctl("define", str(path), check=True)
    if force:
        host.ferryctl("start", NAME, "--force", check=True)
    else:
        host.ferryctl("start", NAME, check=True)
    serial = testguest.SerialReader(host.serial_socket(NAME))
    try:
        serial.wait_for_boot(timeout=60)
        serial.wait_for(lambda r: r.counter >= 2, timeout=60)
    except BaseException:
        serial.close()
        raise
    return Guest(serial)


class CellRun:
    """The steps of one cell, each one recorded in the cell's record."""

    def __init__(
        self,
        cluster: Cluster,
        cell: Cell,
        record: CellRecord,
        kernel: Path,
        virt_type: str,
        tmp: Path,
    ) -> None:
        self.cluster = cluster
        self.cell = cell
        self.record = record
        self.kernel = kernel
        self.virt_type = virt_type
        self.tmp = tmp
        self.t0 = time.monotonic()
        self.link = Link(cluster, "b")
        self.disk: Path | None = None
        #: A storage cell's image as A had it before the migration (sha256).
        self.image_sha = ""
        self.guest: Guest | None = None
        self.killed: list[tuple[HostEnv, str]] = []
        #: A lost post-copy VM's halves were checked and destroyed.
        self.lost_cleaned = False
        #: When the fault hit (for a lost reply: when the migration started).
        self.fault_at = time.monotonic()

    # -- bookkeeping

    def stage(self, name: str) -> None:
        self.record.stage = name
        self.record.timeline.append((round(time.monotonic() - self.t0, 2), name))

    def note(self, text: str) -> None:
        self.record.notes.append(text)

    def host(self, label: str) -> HostEnv:
        return self.cluster.a if label == "a" else self.cluster.b

    # -- the steps

    def configure(self) -> None:
        """Short timeouts on both hosts; the fault on the host that reaches its point."""
        self.stage("configure")
        settings = dict(TIMEOUTS)
        if self.cell.client:
            # Both hosts admit the operator's certificate for the client-driven ops.
            settings.update(self.cluster.operator_config())
            settings["migration.client_grace_s"] = CLIENT_GRACE_S
        for host in (self.cluster.a, self.cluster.b):
            host.extra_config = dict(settings)
            host.write_config()
        if self.cell.point_host != "client":
            faulted = self.host(self.cell.point_host)
            faulted.write_config(**{"testing.faults": [f"{self.cell.point}={self.cell.action}"]})
        if self.cell.storage:
            for host in (self.cluster.a, self.cluster.b):
                host.enable_local_storage()
        self.cluster.start()

    def boot(self) -> Guest:
        self.stage("boot")
        if self.cell.leased:
            self.disk = self.cluster.tmp / "leased-disk.img"
            with self.disk.open("wb") as f:
                f.truncate(16 << 20)
        if self.cell.storage:
            # 16 MiB of random bytes on A's local storage: ~4 s of mirror at 4 MiB/s.
            (self.cluster.a.local_dir / STORAGE_IMAGE).write_bytes(os.urandom(16 << 20))
            self.image_sha = _sha(self.cluster.a.local_dir / STORAGE_IMAGE)
            self.disk = LOCAL_STORAGE / STORAGE_IMAGE
        xml = _xml(
            self.kernel,
            self.virt_type,
            self.disk,
            slow=self.cell.capped,
            busy=self.cell.postcopy,
        )
        self.guest = _boot(self.cluster.a, self.tmp, xml)
        self.guest.snapshot()
        return self.guest

    def drive(self) -> Migrate:
        """Start the migration, apply the fault at its point, thaw, restart."""
        cell, a, b = self.cell, self.cluster.a, self.cluster.b
        extra = ["--bandwidth", str(PERFORM_BANDWIDTH_MIB_S)] if cell.capped else []
        if cell.postcopy:
            extra = list(POSTCOPY_ARGS)
        if cell.storage:
            extra.append("--copy-storage-all")
        if cell.variant == TUNNELLED:
            extra.append("--tunnelled")
        self.stage("migrate")
        mig = Migrate.start(
            self.cluster,
            *extra,
            client=cell.client,
            client_fault=cell.point if cell.action == "kill" else None,
        )
        if cell.action == "kill":
            self.client_dies(mig)
            return mig
        faulted = self.host(cell.point_host)
        if cell.action == "drop-reply":
            # Nothing to do while frozen: the agent loses the reply by itself.
            self.fault_at = time.monotonic()
            self.stage("wait-migrate-exit")
            self.record.migrate_rc = mig.wait(MIGRATE_EXIT_WAIT)
            if not freeze_point_logged(faulted, cell.point_agent, cell.point):
                if cell.postcopy:
                    # Without the switch the cell tests nothing of post-copy.
                    raise CellFailure(
                        f"{cell.point} was never reached (no switch to post-copy?):\n"
                        + mig.stderr[-600:]
                    )
                self.note(f"{cell.point} was never reached (no fault fired)")
            faulted.write_config()
            return mig
        self.stage(f"freeze@{cell.point}")
        pid = wait_frozen(faulted, cell.point_agent, FREEZE_WAIT, also=mig.proc)
        if not freeze_point_logged(faulted, cell.point_agent, cell.point):
            raise CellFailure(f"ferry-{cell.point_agent} froze, but not at {cell.point}")
        faulted.write_config()  # a restarted agent must not hit it again
        self.stage(f"fault:{cell.fault}")
        frozen_killed = False
        if cell.fault == "kill-source-agent":
            a.stop_agent("source", signal.SIGKILL)
            self.killed.append((a, "source"))
            frozen_killed = cell.point_host == "a"
        elif cell.fault == "kill-destination-agent":
            b.stop_agent("destination", signal.SIGKILL)
            self.killed.append((b, "destination"))
            frozen_killed = cell.point_host == "b"
        elif cell.fault == "kill-source-qemu":
            self.note(f"killed source qemu {kill_qemu(a)}")
        elif cell.fault == "kill-destination-qemu":
            self.note(f"killed destination qemu {kill_qemu(b)}")
        elif cell.fault == "cut-link":
            self.link.cut()
        else:  # pragma: no cover - the table holds nothing else
            raise AssertionError(cell.fault)
        self.fault_at = time.monotonic()
        if not frozen_killed:
            thaw(pid)
        if cell.restart == "at-once":
            self.restart_killed()
        self.stage("wait-migrate-exit")
        self.record.migrate_rc = mig.wait(MIGRATE_EXIT_WAIT)
        return mig

    def client_dies(self, mig: Migrate) -> None:
        """ferryctl kills itself at its point; then watch both agents end the orphan.

        Each agent must hold the migration for the grace period (a client may
        take it over) and end it by itself soon after: A's job record goes,
        B's incoming qemu goes unless the VM runs there.
        """
        cell, a, b = self.cell, self.cluster.a, self.cluster.b
        self.stage(f"client-dies@{cell.point}")
        self.record.migrate_rc = mig.wait(MIGRATE_EXIT_WAIT)
        self.fault_at = time.monotonic()
        self.record.exit_s = 0.0
        if self.record.migrate_rc != -signal.SIGKILL:
            raise CellFailure(
                f"ferryctl did not die at {cell.point} (rc={self.record.migrate_rc}):\n"
                + mig.stderr[-600:]
            )
        phases = re.findall(r'"phase": ?"(\w+)"', mig.stdout)
        self.note(f"ferryctl died at {cell.point} after phases {phases}")

        def a_jobs() -> list[Path]:
            return sorted((a.run_dir / "jobs").glob("*.job"))

        if not a_jobs():
            raise CellFailure(f"A holds no job record right after its client died at {cell.point}")
        self.stage("orphan")
        deadline = self.fault_at + CLIENT_GRACE_S + CLIENT_SETTLE_BOUND_S
        b_keeps = cell.expect == ("B",)
        while True:
            since = round(time.monotonic() - self.fault_at, 1)
            if self.record.orphan_end_s is None and not a_jobs():
                self.record.orphan_end_s = since
            if self.record.b_discard_s is None and not b_keeps and not b.qemu_pids():
                self.record.b_discard_s = since
            if self.record.orphan_end_s is not None and (
                b_keeps or self.record.b_discard_s is not None
            ):
                break
            if time.monotonic() > deadline:
                held = [p.name for p in a_jobs()]
                raise CellFailure(
                    f"{since}s after its client died (grace {CLIENT_GRACE_S}s) the migration "
                    f"is not ended: A's job records {held}, B's qemu {b.qemu_pids()}"
                )
            time.sleep(0.1)
        if self.record.orphan_end_s < CLIENT_GRACE_S - 0.25:
            raise CellFailure(
                f"A ended the migration {self.record.orphan_end_s}s after its client died, "
                f"within the grace period ({CLIENT_GRACE_S}s) a client has to take it over"
            )
        self.note(
            f"A ended the orphan after {self.record.orphan_end_s}s"
            + ("" if b_keeps else f"; B's incoming qemu gone after {self.record.b_discard_s}s")
        )

    def restart_killed(self) -> None:
        for host, agent in self.killed:
            self.stage(f"restart {host.label}/{agent}")
            host.write_config()
            host.start_agent(agent)
        self.killed.clear()

    def after_exit(self, mig: Migrate) -> None:
        """Restart what is still down, restore the link, record ferryctl's verdict."""
        if self.record.exit_s is None:
            self.record.exit_s = round(time.monotonic() - self.fault_at, 1)
        self.record.migrate_error = mig.error_line()
        self.restart_killed()
        if self.link.is_cut:
            self.stage("restore-link")
            self.link.restore()
            self.note(f"link down for {self.link.down_for:.1f}s")
        if self.cell.fault == "cut-link" and self.cell.phase == "perform":
            err = mig.error_line() or ""
            if not re.search(r"no data moved|stall|link .* down", err, re.I):
                raise CellFailure(
                    f"ferryctl migrate over a cut link must end with an error naming the stall, "
                    f"got rc={mig.proc.returncode} {err!r}"
                )
        if self.cell.postcopy:
            self.check_postcopy_report(mig)

    def check_postcopy_report(self, mig: Migrate) -> None:
        """After the switch, a migrate that did not finish says so in post-copy's words.

        Its ferryctl dies with A's agent (kill-source-agent); otherwise an
        error must carry the ``postcopy-paused`` code or say that the VM
        cannot run on A.  A cell that loses the VM must end with an error.
        """
        cell, rc = self.cell, mig.proc.returncode
        err = mig.error_line() or ""
        switched = '"postcopy"' in mig.stdout
        self.note(f"migrate rc={rc}, switch event {'seen' if switched else 'not seen'}")
        if cell.lost and rc == 0:
            raise CellFailure(f"ferryctl migrate succeeded although the fault lost the VM: {err!r}")
        if rc == 0 or cell.fault == "kill-source-agent":
            return
        if not re.search(r"\(postcopy-paused\)|cannot run here", mig.stderr):
            raise CellFailure(
                f"ferryctl migrate failed after the switch to post-copy without the "
                f"postcopy-paused code or saying the VM cannot run on A: rc={rc} {err!r}"
            )
        if not cell.lost and "--postcopy-resume" not in mig.stderr:
            raise CellFailure(f"ferryctl migrate's error does not name --postcopy-resume: {err!r}")

    def settle(self) -> Observation:
        """Wait until nothing is in flight; settle an unknown outcome on A on the way."""
        self.stage("settle")
        deadline = time.monotonic() + SETTLE_WAIT
        obs = observe(self.cluster)
        while True:
            if self.cell.lost and not self.lost_cleaned:
                if self.lost_settled(obs):
                    self.settle_lost(obs)
                    obs = observe(self.cluster)
                    continue
            elif obs.postcopy_fenced_on_a and not self.record.postcopy_resumed:
                if "paused in post-copy" not in (obs.a.reason or "") \
                        and time.monotonic() < deadline:
                    # dominfo was read a moment before the fence was written:
                    # look again (CI of stop 20 caught that race).
                    time.sleep(0.3)
                    obs = observe(self.cluster)
                    continue
                self.note(f"A: {obs.a.reason}")
                self.check_postcopy_fenced(obs)
                self.postcopy_resume()
                obs = observe(self.cluster)
                continue
            if obs.unknown_on_a and not self.record.recovered:
                self.note(f"A: {obs.a.reason}")
                self.check_unknown_fenced(obs)
                self.recover()
                obs = observe(self.cluster)
                continue
            if not obs.problems:
                self.note_pending_outcomes()
                return obs
            if time.monotonic() > deadline:
                self.record.outcome = _where(obs)
                raise CellFailure(
                    f"not settled {SETTLE_WAIT:.0f}s after ferryctl migrate exited:\n"
                    + obs.describe()
                )
            time.sleep(0.3)
            obs = observe(self.cluster)

    def note_pending_outcomes(self) -> None:
        """Outcome records still in a pending state once everything settled (history
        may remain, but a pending one would answer a later migrate-recover "pending")."""
        for host in (self.cluster.a, self.cluster.b):
            for path in sorted((host.run_dir / "outcomes").glob("*.json")):
                with contextlib.suppress(OSError, ValueError):
                    state = json.loads(path.read_text()).get("state")
                    if state not in ("running", "failed"):
                        self.note(f"{host.label}: outcome record {path.stem} left {state!r}")

    def check_unknown_fenced(self, obs: Observation) -> None:
        """A copy paused with its outcome unknown says why and refuses a plain resume."""
        a = self.cluster.a
        reason = obs.a.reason or ""
        if not re.search(r"migration \w+ to \S+: outcome unknown", reason):
            raise CellFailure(f"A's paused copy does not name the migration and host: {reason!r}")
        if obs.a.fence is None or obs.a.fence.get("outcome") != "unknown":
            raise CellFailure(f"A's copy has an unknown outcome but no such fence: {obs.a.fence}")
        result = a.ferryctl("resume", NAME)
        if result.returncode == 0:
            raise CellFailure("'resume g1' on A succeeded while the outcome is unknown")
        self.note(f"A refuses resume: {result.stderr.strip()[-160:]}")

    def recover(self) -> None:
        self.stage("migrate-recover")
        a = self.cluster.a
        last: list[str] = []

        def recovered() -> bool:
            result = a.ferryctl("migrate-recover", NAME, "--json", timeout=60)
            last[:] = [result.stdout.strip(), result.stderr.strip()]
            if result.returncode == 2:
                raise CellFailure(f"ferryctl migrate-recover: usage error: {last[1][-300:]}")
            return result.returncode == 0

        try:
            wait_until(recovered, RECOVER_WAIT, "ferryctl migrate-recover g1 to succeed", 0.5)
        except TimeoutError:
            raise CellFailure(f"migrate-recover g1 on A keeps failing: {last}") from None
        self.record.recovered = True
        self.note(f"migrate-recover: {last[0][-200:]}")
        self.stage("settle")

    # -- post-copy (issue 12)

    def check_postcopy_fenced(self, obs: Observation) -> None:
        """A copy fenced in post-copy says so and refuses resume and a plain migrate."""
        a = self.cluster.a
        reason = obs.a.reason or ""
        if not re.search(r"migration \w+ to \S+ is paused in post-copy", reason):
            raise CellFailure(f"A's post-copy fence is not reported by dominfo: {reason!r}")
        result = a.ferryctl("resume", NAME)
        if result.returncode == 0:
            raise CellFailure("TWO RUNNING COPIES: 'resume g1' on A succeeded after the switch")
        if "--postcopy-resume" not in result.stderr:
            raise CellFailure(
                f"A refuses resume without naming --postcopy-resume: {result.stderr.strip()!r}"
            )
        self.note(f"A refuses resume: {result.stderr.strip()[-160:]}")
        result = a.ferryctl("migrate", NAME, self.cluster.b.uri, "--live", timeout=60)
        if result.returncode == 0 or "--postcopy-resume" not in result.stderr:
            raise CellFailure(
                f"a plain migrate of a post-copy-fenced g1 must be refused naming "
                f"--postcopy-resume: rc={result.returncode} {result.stderr.strip()[-300:]!r}"
            )

    def postcopy_resume(self) -> None:
        """``ferryctl migrate g1 B --postcopy --postcopy-resume`` (retried while it fails)."""
        self.stage("postcopy-resume")
        a, b = self.cluster.a, self.cluster.b
        last: list[str] = []
        tries = [0]

        def resumed() -> bool:
            tries[0] += 1
            result = a.ferryctl("migrate", NAME, b.uri, *POSTCOPY_RESUME, timeout=120)
            last[:] = [result.stdout.strip(), result.stderr.strip()]
            if result.returncode == 2 or "(flags-invalid)" in last[1]:
                raise CellFailure(f"ferryctl migrate --postcopy-resume: usage error: {last[1]}")
            return result.returncode == 0

        try:
            wait_until(resumed, RECOVER_WAIT, "migrate g1 --postcopy --postcopy-resume", 1.0)
        except TimeoutError:
            raise CellFailure(
                f"migrate g1 --postcopy --postcopy-resume keeps failing ({tries[0]} tries): "
                f"{last[1][-400:]}"
            ) from None
        self.record.postcopy_resumed = True
        self.note(f"--postcopy-resume succeeded (try {tries[0]})")
        self.stage("settle")

    def lost_settled(self, obs: Observation) -> bool:
        """A lost post-copy VM: A's side is done (fenced, no job), nothing runs, B decided."""
        source = obs.a.agent_state.get("source") or {}
        b_dest = obs.b.agent_state.get("destination") or {}
        if obs.running:
            raise CellFailure("a copy runs although the fault lost the VM:\n" + obs.describe())
        return (
            not obs.a.job_files
            and not source.get("jobs")
            and not source.get("outgoing")
            and (obs.a.fence or {}).get("outcome") == POSTCOPY_FENCE
            and "error" not in b_dest
            and not any(
                o.get("state") in ("prepared", "finishing")
                for o in _entries(b_dest.get("outcomes"))
            )
        )

    def settle_lost(self, obs: Observation) -> None:
        """The fault destroyed half of a post-copy VM: reported, not resumable, cleaned up.

        Nothing may run; A's copy (if its qemu lives) is paused and fenced
        as post-copy; B's half (if its qemu lives) is paused, not resumed;
        ``--postcopy-resume`` must fail.  Then both halves are destroyed so
        that the next migration can run on a bed without leftovers.
        """
        self.stage("lost-check")
        a, b = self.cluster.a, self.cluster.b
        self.note(f"lost: {obs.describe().strip()}")
        if obs.a.qemu:
            if obs.a.state != "paused" or "paused in post-copy" not in (obs.a.reason or ""):
                raise CellFailure(
                    "A's live half is not reported paused in post-copy:\n" + obs.describe()
                )
            result = a.ferryctl("resume", NAME)
            if result.returncode == 0:
                raise CellFailure("'resume g1' on A succeeded after the switch (half a VM runs)")
        if obs.b.qemu and obs.b.state not in ("paused", None):
            raise CellFailure(f"B's half of the lost VM is {obs.b.state!r}:\n" + obs.describe())
        result = a.ferryctl("migrate", NAME, b.uri, *POSTCOPY_RESUME, timeout=120)
        if result.returncode == 2 or "(flags-invalid)" in result.stderr:
            raise CellFailure(f"ferryctl migrate --postcopy-resume: usage error: {result.stderr}")
        if result.returncode == 0:
            raise CellFailure(
                "--postcopy-resume succeeded although a qemu of the post-copy VM was killed:\n"
                + observe(self.cluster).describe()
            )
        self.note(f"--postcopy-resume fails: {result.stderr.strip()[-200:]}")
        after = observe(self.cluster)
        if after.running:
            raise CellFailure("a copy runs after a failed --postcopy-resume:\n" + after.describe())
        self.stage("lost-cleanup")
        for host, view in ((b, after.b), (a, after.a)):
            if not view.qemu:
                continue
            result = host.ferryctl("destroy", NAME, timeout=60)
            if result.returncode != 0:
                raise CellFailure(
                    f"'destroy g1' on {host.label} (the lost VM's half) failed: "
                    f"{result.stderr.strip()[-300:]}"
                )
            self.note(f"destroyed the lost VM's half on {host.label}")
        self.lost_cleaned = True
        self.stage("settle")

    def check(self, obs: Observation) -> str:
        """The safety rule on a settled test bed; returns the outcome."""
        self.stage("check")
        a, b = self.cluster.a, self.cluster.b
        running = obs.running
        if len(running) > 1:
            raise CellFailure("TWO RUNNING COPIES:\n" + obs.describe())
        paused = obs.paused
        if running:
            where = running[0].upper()
            outcome = f"{where} runs"
            if paused:
                raise CellFailure(f"a running and a paused copy:\n{obs.describe()}")
        elif paused:
            where = paused[0].upper()
            view = obs.a if where == "A" else obs.b
            outcome = f"paused on {where}"
            if not view.reason:
                raise CellFailure(f"a paused copy on {where} with no reason given")
            self.note(f"paused on {where}: {view.reason}")
        else:
            where = "none"
            outcome = "none (shut off)"
        if self.record.recovered:
            outcome += " (unknown → recovered)"
        if self.record.postcopy_resumed:
            outcome += " (post-copy → resumed)"
        if self.lost_cleaned:
            outcome += " (post-copy VM lost, reported)"
        self.record.outcome = outcome
        if where not in self.cell.expect:
            raise CellFailure(
                f"outcome {outcome!r}, expected one of {self.cell.expect}:\n{obs.describe()}"
            )
        if self.cell.storage:
            self.check_images(where)
        # Both hosts agree: the other host reports g1 shut off or not at all.
        for view in obs.hosts:
            if view.label.upper() != where and view.state not in (None, "shut off"):
                raise CellFailure(f"{view.label} reports g1 {view.state!r}:\n{obs.describe()}")
        if where in ("A", "B"):
            runner = a if where == "A" else b
            assert self.guest is not None
            self.guest.check_runs_on(runner, "after the fault")
            self.check_leases(runner.label)
            other_view = obs.b if where == "A" else obs.a
            other = b if where == "A" else a
            if other_view.state == "shut off":
                self.check_fenced(other, other_view)
        else:
            self.check_leases(None)
        return where

    def check_images(self, where: str) -> None:
        """Issue 15: B keeps a copied image only when it runs the VM; A's is unchanged."""
        a_img = self.cluster.a.local_dir / STORAGE_IMAGE
        b_img = self.cluster.b.local_dir / STORAGE_IMAGE
        if _sha(a_img) != self.image_sha:
            raise CellFailure("A's disk image changed: the source's storage must be untouched")
        if where == "B":
            if not b_img.exists() or _sha(b_img) != self.image_sha:
                raise CellFailure("B runs the VM but its image is not A's")
        elif b_img.exists():
            raise CellFailure(f"B kept a half-copied image ({b_img}) though it does not run "
                              "the VM")  # fmt: skip
        self.note(f"images: A's unchanged; B {'has the copy' if where == 'B' else 'has none'}")

    def check_leases(self, runner: str | None) -> None:
        """The lockspace holds the disk's lease for the running copy only."""
        if self.disk is None:
            return
        from ferry.lease import LeaseManager

        held = [e for e in LeaseManager(self.cluster.lockspace).inspect() if e["held"]]
        owners = [(e["owner"] or {}).get("host_name") for e in held]
        if runner is None:
            if held:
                raise CellFailure(f"leases held with no running copy: {held}")
            return
        if owners != [runner]:
            raise CellFailure(f"leases held by {owners}, the copy runs on {runner}: {held}")

    def check_fenced(self, host: HostEnv, view: HostView) -> None:
        """A host that handed g1 away refuses to start it again."""
        if view.fence is None:
            raise CellFailure(f"g1 runs elsewhere but {host.label} has no fence for it")
        result = host.ferryctl("start", NAME)
        if result.returncode == 0:
            raise CellFailure(f"TWO RUNNING COPIES: 'start g1' on {host.label} succeeded")
        self.note(f"{host.label} refuses start: {result.stderr.strip()[-160:]}")

    def next_migration(self, where: str) -> None:
        """From wherever g1 is to the other host, with the guest's memory intact."""
        self.stage("next-migration")
        a, b = self.cluster.a, self.cluster.b
        assert self.guest is not None
        if where == "none":
            # The fault killed the only copy: boot it again where it is defined.
            self.guest.serial.close()
            fence = observe_host(a).fence
            xml = _xml(self.kernel, self.virt_type, self.disk, slow=False)
            self.guest = _boot(a, self.tmp, xml, force=fence is not None)
            if fence is not None:
                self.note(f"A kept a fence ({fence.get('outcome')}): started with --force")
            self.guest.snapshot()
            where = "A"
        src, dst = (a, b) if where == "A" else (b, a)
        self.guest.snapshot()
        copy: tuple[str, ...] = ()
        if self.cell.storage:
            copy = ("--copy-storage-all",)
            stale = dst.local_dir / STORAGE_IMAGE
            if stale.exists():
                # The image the VM left behind on the other host: its
                # operator removes it (Ferry never copies over a file).
                stale.unlink()
                self.note(f"removed the stale image on {dst.label} before moving back")
        if self.cell.client:
            argv = client_argv(self.cluster, src, "migrate", NAME, dst.uri, "--live", "--json",
                               "--client-driven")  # fmt: skip
            result = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                    stdin=subprocess.DEVNULL)  # fmt: skip
        else:
            result = src.ferryctl("migrate", NAME, dst.uri, "--live", "--json", *copy,
                                  timeout=120)  # fmt: skip
        if result.returncode != 0:
            raise CellFailure(
                f"the next migration {src.label} → {dst.label} failed: {result.stderr.strip()}"
            )
        self.guest.check_runs_on(dst, "after the next migration")
        wait_until(lambda: not src.qemu_pids(), 15, f"no qemu left on {src.label}")
        obs = observe(self.cluster)
        if obs.running != [dst.label] or obs.problems:
            raise CellFailure(f"after the next migration:\n{obs.describe()}")
        self.check_leases(dst.label)

    def close(self) -> None:
        self.link.close()
        if self.guest is not None:
            self.guest.serial.close()


def run_cell(
    cluster: Cluster,
    cell: Cell,
    record: CellRecord,
    kernel: Path,
    virt_type: str,
    tmp: Path,
) -> None:
    """Run one cell; raises CellFailure (or another error) when it fails."""
    run = CellRun(cluster, cell, record, kernel, virt_type, tmp)
    mig: Migrate | None = None
    try:
        run.configure()
        run.boot()
        mig = run.drive()
        run.after_exit(mig)
        obs = run.settle()
        record.settle_s = round(time.monotonic() - run.fault_at, 1)
        if cell.action == "kill" and record.settle_s > CLIENT_GRACE_S + CLIENT_SETTLE_BOUND_S:
            raise CellFailure(
                f"settled {record.settle_s}s after the client died: more than the grace "
                f"({CLIENT_GRACE_S}s) + {CLIENT_SETTLE_BOUND_S:.0f}s"
            )
        where = run.check(obs)
        run.next_migration(where)
        if cell.client and (record.exit_s or 0.0) > CLIENT_EXIT_BOUND_S:
            run.stage("exit-bound")
            raise CellFailure(
                f"the migration settled safely, but ferryctl --client-driven reported only "
                f"{record.exit_s}s after the fault (bound {CLIENT_EXIT_BOUND_S:.0f}s): "
                f"{record.migrate_error}"
            )
        run.stage("done")
    finally:
        if mig is not None:
            mig.close()
        run.close()
        record.total_s = round(time.monotonic() - run.t0, 1)
