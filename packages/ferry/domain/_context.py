"""The parse context: the document's name, where an element is in it, and the
problems found so far.

The parser reports every problem of a document at once. Code that finds a
problem either

* records it and goes on (:meth:`Ctx.report`), when what follows does not
  depend on the value, or
* raises it (``raise fail(loc, ...)``, or a check from
  :mod:`ferry.domain._checks`), when the element cannot be read further; the
  nearest :meth:`Ctx.guard` records the error and gives up that element
  only, and the parse goes on with its siblings.

A value that could not be read is None, and checks that need it are skipped
(so one mistake is reported once, not again as a consequence). An element
whose parts had problems is given up at its end with ``raise Skip()``: the
problems are recorded already, and the model is never built.
:meth:`Ctx.raise_problems` raises the one error that lists them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from lxml import etree

from ferry.domain._checks import Loc, fail
from ferry.domain._problems import MAX_PROBLEMS, Problem, from_error, to_error
from ferry.domain.model import OS
from ferry.errors import XMLError

__all__ = ["Ctx", "DeviceEnv", "Skip", "TooMany", "element_line"]

# Reports of the same problem again (the same line, element and message) are
# listed once but count towards the work limit: this many times the limit.
_REPEATS = 10

P = ParamSpec("P")
T = TypeVar("T")


def element_line(el: etree._Element) -> int | None:
    """The source line of ``el`` (None when libxml2 does not know it)."""
    line: object = el.sourceline
    return line if isinstance(line, int) else None


class Skip(Exception):
    """Give up the element being read; its problems are recorded already.

    Caught by :meth:`Ctx.guard`.
    """


class TooMany(Exception):
    """The problem limit is reached: the parse stops (bounded work for hostile input).

    Not caught by :meth:`Ctx.guard`; :func:`~ferry.domain.parse.parse_domain`
    catches it and reports the problems found.
    """


class Ctx:
    """Document name, element locations, and the problems found in the document."""

    def __init__(self, where: str, *, limit: int = MAX_PROBLEMS) -> None:
        self.where = where
        self._limit = limit
        self._problems: list[Problem] = []
        self._seen: set[tuple[int | None, str | None, str]] = set()
        self._reports = 0
        #: Whether the parse stopped at the problem limit.
        self.truncated = False

    def loc(self, el: etree._Element, path: str) -> Loc:
        """The location of ``el``, whose element path is ``path``."""
        return Loc(self.where, element_line(el), path)

    @property
    def failed(self) -> bool:
        """Whether any problem was found."""
        return bool(self._problems)

    @property
    def count(self) -> int:
        """How many problems were reported so far, repeats included.

        Compare it before and after reading a part to learn whether the part
        had problems.
        """
        return self._reports

    def record(self, err: XMLError, *, kind: str | None = None) -> None:
        """Record the problem ``err`` reports (the same problem only once).

        :raises TooMany: this is one problem more than the limit.
        """
        self._reports += 1
        if self._reports > _REPEATS * self._limit:  # mostly the same ones again
            self.truncated = True
            raise TooMany()
        problem = from_error(err, kind=kind)
        if problem.key in self._seen:
            return
        if len(self._problems) >= self._limit:
            self.truncated = True
            raise TooMany()
        self._seen.add(problem.key)
        self._problems.append(problem)

    def report(
        self, loc: Loc, message: str, *, cls: type[XMLError] = XMLError,
        kind: str | None = None, hint: str | None = None, **extra: Any,
    ) -> None:
        """Record a problem at ``loc`` and go on.

        ``kind`` is one of :data:`~ferry.domain._problems.KINDS` (by default
        from ``cls``: unsupported-value or invalid); ``hint`` says what to do.
        """
        if hint is not None:
            extra["hint"] = hint
        self.record(fail(loc, message, cls=cls, **extra), kind=kind)

    def guard(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T | None:
        """``fn(*args, **kwargs)``, or None after recording the XMLError it raised.

        None also when ``fn`` gave up with :class:`Skip` (its problems are
        recorded; were none, that would be a bug that must not drop an
        element silently, so one is recorded then).
        """
        mark = self._reports
        try:
            return fn(*args, **kwargs)
        except XMLError as exc:
            self.record(exc)
        except Skip:
            if self._reports == mark:
                self.record(XMLError(f"{self.where}: internal error: an element was given up "
                                     f"without a reason (in {getattr(fn, '__name__', fn)})",
                                     where=self.where))
        return None

    def raise_problems(self) -> None:
        """Raise the one error that lists every problem found, if any.

        :raises XMLError: (or the class of the first problem found) listing
            them all.
        """
        if self._problems:
            raise to_error(self.where, self._problems, truncated=self.truncated)


@dataclass(frozen=True)
class DeviceEnv:
    """What a device parser may need besides its element."""

    os: OS | None  # the guest's <os> (machine type); None when it could not be read
    index: int  # position among the devices with the same tag, from 0
