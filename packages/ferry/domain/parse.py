"""Parse and validate domain XML into a :class:`~ferry.domain.model.Domain`.

Parsing happens in three steps, each of which can only raise
:class:`~ferry.errors.XMLError` (or its subclass
:class:`~ferry.errors.XMLUnsupported`):

1. **Load** (:mod:`ferry.domain._load`): size limit, refusal of any DOCTYPE
   or entity declaration, then lxml with entity resolution, network access
   and DTD loading switched off.
2. **Schema walk** (:mod:`ferry.domain._walk`): every element and attribute
   in document order is checked against the schema table
   (:mod:`ferry.domain._schema`), the list of what Ferry understands. The
   first element or attribute not in it is refused with ``XMLUnsupported``
   naming its path (``domain/devices/hostdev``) and line, so nothing is ever
   silently dropped. ``<metadata>`` is opaque and skipped.
3. **Typed parse**: values are converted and checked (units, enumerations,
   paths, cross-references), defaults are filled in, and the model is built:
   the children of ``<domain>`` section by section (:mod:`ferry.domain._top`,
   :mod:`ferry.domain._platform`), then each device by the parser its tag
   names (:mod:`ferry.domain._devices`: disks and controllers, interfaces,
   character devices, display, the rest), then the checks that span devices
   (:mod:`ferry.domain._cross`).

Module layout (no module imports one listed after it)::

    _checks    value checks shared with the model and the argv builder
    _context   the parse context (document name, element locations)
    _load      step 1                  _schema   the schema table
    _walk      step 2                  _values   typed readers of values
    _address   <address>               _disks _nics _chardevs _display _misc
    _devices   the device table        _cross    checks across devices
    _platform  os, cpu, features, clock, pm
    _top       the sections of <domain>
    parse      this entry point
"""

from __future__ import annotations

from ferry.domain._checks import fail
from ferry.domain._context import Ctx
from ferry.domain._load import MAX_XML_BYTES, load
from ferry.domain._top import parse_top
from ferry.domain._walk import walk
from ferry.domain.model import Domain
from ferry.errors import XMLError

__all__ = ["MAX_XML_BYTES", "parse_domain"]

#: The safe loader, under the name :mod:`ferry.domain.format` imports it by.
_load = load


def parse_domain(xml: str | bytes, *, where: str = "<xml>") -> Domain:
    """Parse and validate a libvirt domain XML document.

    ``where`` names the document in error messages (a file name, "migration
    cookie", ...). Defaults are filled in as libvirt fills them on define:
    a random UUID and MAC addresses when absent, ``currentMemory`` equal to
    ``memory``, a boot from ``hd`` when there is neither kernel nor boot
    device, a virtio memory balloon, a VGA video device for graphics without
    video, and so on (see :mod:`ferry.domain`).

    :raises XMLUnsupported: an element, attribute or value Ferry does not
        implement; the message names the element path and line.
    :raises XMLError: malformed or hostile XML (DOCTYPE, entities, over
        :data:`MAX_XML_BYTES`), or an invalid value (bad UUID, memory 0,
        relative or unsafe path, ...), again with element and line.
    """
    if not isinstance(where, str):
        where = str(where)
    root = load(xml, where)
    ctx = Ctx(where)
    if root.tag != "domain":
        tag = root.tag if isinstance(root.tag, str) else "?"
        raise fail(ctx.loc(root, tag), f"root element is <{tag}>, expected <domain>")
    walk(root, "domain", where)
    try:
        return parse_top(ctx, root)
    except XMLError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError) as exc:  # pragma: no cover
        # A bug of ours must still not leak as a non-XMLError to callers that
        # feed untrusted XML; keep the cause for the log.
        raise XMLError(f"{where}: cannot interpret domain XML: {exc!r}", where=where) from exc
