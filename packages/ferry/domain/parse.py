"""Parse and validate domain XML into a :class:`~ferry.domain.model.Domain`.

Parsing happens in three steps, each of which can only raise
:class:`~ferry.errors.XMLError` (or its subclass
:class:`~ferry.errors.XMLUnsupported`):

1. **Load** (:mod:`ferry.domain._load`): size limit, refusal of any DOCTYPE
   or entity declaration, then lxml with entity resolution, network access
   and DTD loading switched off.
2. **Schema walk** (:mod:`ferry.domain._walk`): every element and attribute
   in document order is checked against the schema table
   (:mod:`ferry.domain._schema`), the list of what Ferry understands. Each
   element or attribute not in it is a problem (``XMLUnsupported``, naming
   its path ``domain/devices/hostdev`` and line), so nothing is ever
   silently dropped; it is removed, and the parse goes on. ``<metadata>`` is
   opaque and skipped.
3. **Typed parse**: values are converted and checked (units, enumerations,
   paths, cross-references), defaults are filled in, and the model is built:
   the children of ``<domain>`` section by section (:mod:`ferry.domain._top`,
   :mod:`ferry.domain._platform`), then each device by the parser its tag
   names (:mod:`ferry.domain._devices`: disks and controllers, interfaces,
   character devices, display, the rest), then the checks that span devices
   (:mod:`ferry.domain._cross`).

Steps 2 and 3 do not stop at the first problem: they record every problem
in the parse context (:mod:`ferry.domain._context`) and go on wherever that
is safe, and :func:`parse_domain` then raises one error that lists them all
(:mod:`ferry.domain._problems`), so a user fixes a file in one pass.

Module layout (no module imports one listed after it)::

    _checks    value checks shared with the model and the argv builder
    _problems  the problems found, and the one error that lists them
    _context   the parse context (locations, the problems recorded)
    _load      step 1                  _schema   the schema table
    _walk      step 2                  _values   typed readers of values
    _address   <address>               _disks _controllers _nics _chardevs _display _misc
    _devices   the device table        _cross    checks across devices
    _platform  os, cpu, features, clock, pm
    _top       the sections of <domain>
    parse      this entry point
"""

from __future__ import annotations

from ferry.domain._context import Ctx, Skip, TooMany
from ferry.domain._load import MAX_XML_BYTES, load
from ferry.domain._nics import HostNetworks, check_host_networks
from ferry.domain._top import parse_top
from ferry.domain._walk import walk
from ferry.domain.model import Domain
from ferry.errors import XMLError

__all__ = ["MAX_XML_BYTES", "HostNetworks", "parse_domain"]

#: The safe loader, under the name :mod:`ferry.domain.format` imports it by.
_load = load


def parse_domain(
    xml: str | bytes, *, where: str = "<xml>", networks: HostNetworks | None = None
) -> Domain:
    """Parse and validate a libvirt domain XML document.

    ``where`` names the document in error messages (a file name, "migration
    cookie", ...). Defaults are filled in as libvirt fills them on define:
    a random UUID and MAC addresses when absent, ``currentMemory`` equal to
    ``memory``, a boot from ``hd`` when there is neither kernel nor boot
    device, a virtio memory balloon, a VGA video device for graphics without
    video, and so on (see :mod:`ferry.domain`).

    Every problem of the document is reported at once, in one error: its
    message lists them grouped by kind and sorted by line, and
    ``details["problems"]`` holds them for programs (see
    :mod:`ferry.domain._problems`). A document that cannot be loaded at all
    (malformed, hostile) has that one problem. The parse stops after
    :data:`~ferry.domain._problems.MAX_PROBLEMS` problems.

    ``networks`` (define, and a migration's Prepare): the networks this
    host maps; an ``<interface type='network'>`` naming another is one more
    problem, with the setting to add as its hint.

    :raises XMLUnsupported: an element, attribute or value Ferry does not
        implement (the first problem found is of this kind); the message
        names the element path and line of each problem.
    :raises XMLError: malformed or hostile XML (DOCTYPE, entities, over
        :data:`MAX_XML_BYTES`), or an invalid value (bad UUID, memory 0,
        relative or unsafe path, ...), again with element and line.
    """
    if not isinstance(where, str):
        where = str(where)
    ctx = Ctx(where)
    try:
        root = load(xml, where)
    except XMLError as exc:
        ctx.record(exc, kind="malformed")
        ctx.raise_problems()
        raise  # pragma: no cover (raise_problems raised)
    if root.tag != "domain":
        tag = root.tag if isinstance(root.tag, str) else "?"
        ctx.report(ctx.loc(root, tag), f"root element is <{tag}>, expected <domain>",
                   kind="malformed", hint="give the document a <domain> root element")
        ctx.raise_problems()
    domain = None
    try:
        walk(ctx, root, "domain")
        domain = parse_top(ctx, root)
        if networks is not None:
            check_host_networks(ctx, root, networks)
    except TooMany:
        pass  # the problems found are reported below
    except (ValueError, TypeError, KeyError, OverflowError, AssertionError, Skip) as exc:
        # A bug of ours must still not leak as a non-XMLError to callers that
        # feed untrusted XML; keep the cause for the log.
        raise XMLError(f"{where}: cannot interpret domain XML: {exc!r}", where=where) from exc
    ctx.raise_problems()
    if domain is None:  # pragma: no cover (problems were recorded)
        raise XMLError(f"{where}: cannot interpret domain XML", where=where)
    return domain
