"""Types of the compiled transfer accounting (see _accounting.pyx and reference/accounting.py)."""

from typing import Final, SupportsFloat, SupportsIndex

__all__ = ["MAX_COUNT", "MAX_WINDOW", "Sample", "TransferAccount"]

MAX_COUNT: Final[int]
MAX_WINDOW: Final[int]

class Sample:
    """One sample of qemu's migration statistics, taken at ``time_s`` seconds."""

    @property
    def time_s(self) -> float: ...
    @property
    def transferred(self) -> int: ...
    @property
    def remaining(self) -> int: ...
    @property
    def total(self) -> int: ...
    @property
    def dirty_pages_rate(self) -> float: ...
    @property
    def page_size(self) -> int: ...
    @property
    def iteration(self) -> int: ...
    @property
    def throttle_pct(self) -> int: ...
    def __init__(
        self,
        time_s: SupportsFloat,
        transferred: SupportsIndex,
        remaining: SupportsIndex,
        total: SupportsIndex,
        dirty_pages_rate: SupportsFloat = ...,
        page_size: SupportsIndex = ...,
        iteration: SupportsIndex = ...,
        throttle_pct: SupportsIndex = ...,
    ) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...

class TransferAccount:
    """Derived figures of one migration's transfer, fed with Sample objects."""

    def __init__(self, *, smoothing: float = ..., window: int = ...) -> None: ...
    def feed(self, sample: Sample) -> None:
        """Account one more sample; samples must come in time order."""
    def feed_relay(self, time_s: float, bytes_through: int) -> None:
        """Account the tunnel relay's byte counter at ``time_s``."""
    def predicted_remaining_s(self, downtime_limit_s: float = ...) -> float | None:
        """Seconds until remaining reaches the switch-over threshold; None unless converging."""
    def predicted_downtime_s(self, downtime_limit_s: float) -> float:
        """Predicted downtime of the switch-over: remaining / smoothed bandwidth."""
    def will_meet(self, downtime_limit_s: float) -> bool:
        """Whether the migration fits ``downtime_limit_s``: now, or by converging."""
    def snapshot(self) -> dict[str, float | int | bool | None]:
        """All figures as a flat dict for progress events and JSON."""
    @property
    def converging(self) -> bool | None: ...
    @property
    def smoothing(self) -> float: ...
    @property
    def window(self) -> int: ...
    @property
    def samples(self) -> int: ...
    @property
    def bandwidth(self) -> float: ...
    @property
    def smoothed_bandwidth(self) -> float: ...
    @property
    def dirty_rate(self) -> float: ...
    @property
    def tunnel_bandwidth(self) -> float: ...
    @property
    def throttle_pct(self) -> int: ...
    @property
    def iteration(self) -> int: ...
    @property
    def transferred(self) -> int: ...
    @property
    def remaining(self) -> int: ...
    @property
    def total(self) -> int: ...
