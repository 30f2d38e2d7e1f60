"""The problems found in one domain XML document, and the one error that lists them.

The parser does not stop at the first problem: the schema walk and the typed
parse record every problem they find (see :class:`~ferry.domain._context.Ctx`),
and :func:`to_error` turns them into one :class:`~ferry.errors.XMLError`
whose message lists them all, grouped by :data:`KINDS` and sorted by line,
so that a user fixes the file in one pass::

    define: 3 problems in the domain XML; fix them all, then try again:
    elements Ferry does not support (remove them):
      define:12: domain/devices/sound: element <sound> is not supported by Ferry
    values Ferry does not support (use a supported one):
      define:9: domain/devices/disk/driver: disk format 'vmdk' is not supported (...)
    invalid or missing values (correct them):
      define:4: domain/memory: memory must be greater than 0

A document with one problem gets that problem's message alone, as before.
``details["problems"]`` holds the same list for programs: ``line``,
``path`` (the element path), ``kind``, ``code`` (the error code the problem
alone would have had), ``message`` and ``hint`` (what to do), and
``details["problem_count"]`` their number (``details["truncated"]`` is
true when the parse stopped at the limit, so there may be more). The
top-level ``line``, ``element``, ``where`` (and ``attribute``, ``value``, ...
where known) and the error's class are those of the problem found first, so
that a caller that looks at one problem sees the one an earlier Ferry
reported.

Untrusted input gets bounded work and output: the parse stops after
:data:`MAX_PROBLEMS` problems (the same problem on the same line is listed
once, and stops the parse when repeated ten times as often), and each
message is cut at :data:`MAX_MESSAGE_CHARS` characters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ferry.errors import XMLError, XMLUnsupported

__all__ = [
    "KINDS",
    "MAX_MESSAGE_CHARS",
    "MAX_PROBLEMS",
    "Problem",
    "default_kind",
    "from_error",
    "to_error",
]

#: How many problems are listed; the parse stops at the next one.
MAX_PROBLEMS = 100
#: Longer messages (a long value quoted in them) are cut here.
MAX_MESSAGE_CHARS = 500
_MAX_PATH_CHARS = 200

#: The kinds of problem, in the order they are listed, with the heading that
#: tells what to do about all of them.
KINDS: dict[str, str] = {
    "malformed": "the document is not well-formed or not allowed",
    "unsupported-element": "elements Ferry does not support (remove them)",
    "unsupported-attribute": "attributes Ferry does not support (remove them)",
    "unsupported-value": "values Ferry does not support (use a supported one)",
    "invalid": "invalid or missing values (correct them)",
    "conflict": "conflicts between elements (make them agree)",
}

_DEFAULT_HINTS: dict[str, str] = {
    "malformed": "fix the document so that it is well-formed XML without a DTD",
    "unsupported-element": "remove the element",
    "unsupported-attribute": "remove the attribute",
    "unsupported-value": "use a value Ferry supports",
    "invalid": "correct the value as the message says",
    "conflict": "change one of the elements so that they agree",
}

# Details of an XMLError that locate it; the others (attribute, value, ...)
# are kept with the problem.
_LOCATION = frozenset({"where", "line", "element", "kind", "hint"})


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Problem:
    """One problem: where it is, what is wrong, what to do."""

    kind: str
    line: int | None
    path: str | None  # the element path, e.g. domain/devices/disk/source
    message: str  # what is wrong, without the location
    hint: str  # what to do
    text: str  # the located line: WHERE:LINE: PATH: MESSAGE
    cls: type[XMLError] = XMLError
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int | None, str | None, str]:
        """Identity for de-duplication."""
        return self.line, self.path, self.message

    def to_wire(self) -> dict[str, Any]:
        """The problem as an item of ``details["problems"]``."""
        return {"line": self.line, "path": self.path, "kind": self.kind, "code": self.cls.code,
                "message": self.message, "hint": self.hint}  # fmt: skip


def default_kind(cls: type[XMLError]) -> str:
    """The kind of a problem raised as ``cls`` by a value check."""
    return "unsupported-value" if issubclass(cls, XMLUnsupported) else "invalid"


def _located(where: str, line: int | None, path: str | None) -> str:
    if path is None:
        return f"{where}:{line}: " if line is not None else f"{where}: "
    if line is not None:
        return f"{where}:{line}: {path}: "
    return f"{where}: {path}: "


def from_error(err: XMLError, *, kind: str | None = None, hint: str | None = None) -> Problem:
    """The problem an :class:`XMLError` built by :func:`ferry.domain._checks.fail` reports.

    ``kind`` and ``hint`` default to those in the error's details, then to
    the defaults for its class.
    """
    details = err.details
    where = str(details.get("where") or "<xml>")
    raw_line = details.get("line")
    line = raw_line if isinstance(raw_line, int) else None
    raw_path = details.get("element")
    path = _cut(raw_path, _MAX_PATH_CHARS) if isinstance(raw_path, str) else None
    kind = kind or str(details.get("kind") or default_kind(type(err)))
    hint = hint or str(details.get("hint") or _DEFAULT_HINTS.get(kind, ""))
    prefix = _located(where, line, raw_path if isinstance(raw_path, str) else None)
    if err.message.startswith(prefix):
        message = _cut(err.message[len(prefix):], MAX_MESSAGE_CHARS)
        text = _located(where, line, path) + message
    else:
        message = _cut(err.message, MAX_MESSAGE_CHARS)
        text = message
    extra = {k: v for k, v in details.items() if k not in _LOCATION}
    return Problem(kind=kind, line=line, path=path, message=message, hint=_cut(hint, 300),
                   text=text, cls=type(err), extra=extra)  # fmt: skip


def _order(item: tuple[int, Problem]) -> tuple[int, int, int]:
    seq, p = item
    kinds = list(KINDS)
    rank = kinds.index(p.kind) if p.kind in KINDS else len(kinds)
    return rank, p.line if p.line is not None else 1 << 62, seq


def _render(where: str, problems: list[Problem], truncated: bool) -> str:
    count = f"{len(problems)} or more" if truncated else f"{len(problems)}"
    lines = [f"{where}: {count} problems in the domain XML; fix them all, then try again:"]
    heading = None
    for _, p in sorted(enumerate(problems), key=_order):
        if p.kind != heading:
            heading = p.kind
            lines.append(f"{KINDS.get(p.kind, p.kind)}:")
        lines.append(f"  {p.text}")
    if truncated:
        lines.append("… and maybe more: Ferry stopped looking (too many problems)")
    return "\n".join(lines)


def to_error(where: str, problems: list[Problem], *, truncated: bool = False) -> XMLError:
    """The one error for ``problems`` (in the order found).

    ``truncated``: the parse stopped at the limit, there may be more. The
    error's class and top-level details are those of the first problem found.
    """
    if not problems:
        raise ValueError("to_error needs at least one problem")
    first = problems[0]
    single = len(problems) == 1 and not truncated
    message = first.text if single else _render(where, problems, truncated)
    listed = [p.to_wire() for _, p in sorted(enumerate(problems), key=_order)]
    details: dict[str, Any] = dict(first.extra)
    details.update(where=where, line=first.line, element=first.path, problems=listed,
                   problem_count=len(problems), truncated=truncated)
    return first.cls(message, **details)
