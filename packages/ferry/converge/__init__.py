"""Convergence policy of issue 12: busy VMs converge (sans-I/O).

- :mod:`ferry.converge.verdict`: pre-flight verdict from RAM size, a 1 s
  dirty rate and the bandwidth: does pre-copy converge, with which throttle,
  how long post-copy takes, which plan meets the :class:`Goal`.
- :mod:`ferry.converge.policy`: the :class:`Controller` fed with each
  ``query-migrate`` sample (:class:`Tick`), answering with actions
  (:class:`SetDowntime`, :class:`SetThrottle`, :class:`StartPostcopy`,
  :class:`Note`), a plan and an ETA.
- :mod:`ferry.converge.eta`: the transfer model both use.
"""

from ferry.converge.eta import Model, dirtied_bytes, postcopy_eta, precopy_eta
from ferry.converge.policy import (
    Action,
    Controller,
    Note,
    SetDowntime,
    SetThrottle,
    Setup,
    StartPostcopy,
    Tick,
)
from ferry.converge.verdict import Goal, Measurements, Verdict, downtime_ladder, verdict

__all__ = [
    "Action",
    "Controller",
    "Goal",
    "Measurements",
    "Model",
    "Note",
    "SetDowntime",
    "SetThrottle",
    "Setup",
    "StartPostcopy",
    "Tick",
    "Verdict",
    "dirtied_bytes",
    "downtime_ladder",
    "postcopy_eta",
    "precopy_eta",
    "verdict",
]
