"""``<devices>``: the table of device kinds, and the devices found.

Each device element is parsed by the function its tag names in
:data:`DEVICES`, in document order; one with problems is left out (its
problems are recorded) and the others are still read. Supporting a new kind of device takes
its elements in :data:`~ferry.domain._schema.SCHEMA`, one small parse
function (``(ctx, element, env) -> model``) and one line here naming the
:class:`~ferry.domain.model.Domain` field its models go to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lxml import etree

from ferry.domain._chardevs import parse_channel, parse_console, parse_serial
from ferry.domain._checks import check_host_path
from ferry.domain._context import Ctx, DeviceEnv
from ferry.domain._controllers import parse_controller
from ferry.domain._disks import parse_disk
from ferry.domain._display import parse_audio, parse_graphics, parse_video
from ferry.domain._filesystem import parse_filesystem
from ferry.domain._hostdev import parse_hostdev
from ferry.domain._misc import (
    parse_input,
    parse_memballoon,
    parse_panic,
    parse_redirdev,
    parse_rng,
    parse_sound,
    parse_watchdog,
)
from ferry.domain._nics import parse_interface
from ferry.domain._tpm import parse_tpm
from ferry.domain._values import elements, one, text
from ferry.domain.model import (
    OS,
    Audio,
    CharDev,
    Controller,
    Disk,
    Graphics,
    Input,
    Interface,
    Memballoon,
    Rng,
    Video,
)

__all__ = ["DEVICES", "DeviceKind", "Devices", "parse_devices"]


@dataclass(frozen=True)
class DeviceKind:
    """How one device element is parsed, and where its models go."""

    #: The :class:`~ferry.domain.model.Domain` field: a tuple of the models.
    field: str
    #: ``(ctx, element, env) -> model``; raises XMLError (or Skip, its
    #: problems recorded) when the device cannot be read.
    parse: Callable[[Ctx, etree._Element, DeviceEnv], Any]
    #: For a device a domain has at most one of: the model when there is none
    #: (the Domain field then holds that one model, not a tuple).
    single: Callable[[], Any] | None = None


DEVICES: dict[str, DeviceKind] = {
    "disk": DeviceKind("disks", parse_disk),
    "controller": DeviceKind("controllers", parse_controller),
    "interface": DeviceKind("interfaces", parse_interface),
    "serial": DeviceKind("serials", parse_serial),
    "console": DeviceKind("consoles", parse_console),
    "channel": DeviceKind("channels", parse_channel),
    "input": DeviceKind("inputs", parse_input),
    "graphics": DeviceKind("graphics", parse_graphics),
    "audio": DeviceKind("audios", parse_audio),
    "video": DeviceKind("videos", parse_video),
    # libvirt adds a virtio balloon when there is none; so does Ferry.
    "memballoon": DeviceKind("memballoon", parse_memballoon, single=Memballoon),
    "rng": DeviceKind("rngs", parse_rng),
    "sound": DeviceKind("sounds", parse_sound),
    "redirdev": DeviceKind("redirdevs", parse_redirdev),
    "watchdog": DeviceKind("watchdogs", parse_watchdog),
    "panic": DeviceKind("panics", parse_panic),
    "hostdev": DeviceKind("hostdevs", parse_hostdev),
    "filesystem": DeviceKind("filesystems", parse_filesystem),
    "tpm": DeviceKind("tpms", parse_tpm),
}


class Devices:
    """The devices parsed, by tag, each with the element it came from."""

    def __init__(self) -> None:
        self.emulator: str | None = None
        #: The tags of which at least one device had problems (and is left out).
        self.failed: set[str] = set()
        self._models: dict[str, list[Any]] = {tag: [] for tag in DEVICES}
        self._elements: dict[str, list[etree._Element]] = {tag: [] for tag in DEVICES}

    def add(self, tag: str, model: Any, el: etree._Element | None = None) -> None:
        """Record ``model`` parsed from ``el`` (None for a default Ferry added)."""
        self._models[tag].append(model)
        if el is not None:
            self._elements[tag].append(el)

    def element(self, tag: str, n: int) -> etree._Element | None:
        """The element the ``n``-th model of ``tag`` came from (None for a default)."""
        found = self._elements[tag]
        return found[n] if n < len(found) else None

    def fields(self) -> dict[str, Any]:
        """The :class:`~ferry.domain.model.Domain` fields for these devices."""
        out: dict[str, Any] = {"emulator": self.emulator}
        for tag, kind in DEVICES.items():
            models = self._models[tag]
            if kind.single is not None:
                out[kind.field] = models[0] if models else kind.single()
            else:
                out[kind.field] = tuple(models)
        return out

    # Typed views for the cross-checks.

    @property
    def disks(self) -> list[Disk]:
        return self._models["disk"]

    @property
    def controllers(self) -> list[Controller]:
        return self._models["controller"]

    @property
    def interfaces(self) -> list[Interface]:
        return self._models["interface"]

    @property
    def serials(self) -> list[CharDev]:
        return self._models["serial"]

    @property
    def consoles(self) -> list[CharDev]:
        return self._models["console"]

    @property
    def channels(self) -> list[CharDev]:
        return self._models["channel"]

    @property
    def inputs(self) -> list[Input]:
        return self._models["input"]

    @property
    def graphics(self) -> list[Graphics]:
        return self._models["graphics"]

    @property
    def audios(self) -> list[Audio]:
        return self._models["audio"]

    @property
    def videos(self) -> list[Video]:
        return self._models["video"]

    @property
    def memballoon(self) -> Memballoon:
        found = self._models["memballoon"]
        return found[0] if found else Memballoon()

    @property
    def rngs(self) -> list[Rng]:
        return self._models["rng"]


def parse_devices(ctx: Ctx, el: etree._Element, os_: OS | None) -> Devices:
    """Every device under ``<devices>``, in document order.

    A device with problems is recorded as such and left out; the others are
    still read. ``os_`` is None when ``<os>`` could not be read (the checks
    that depend on the machine type are then skipped).
    """
    dloc = ctx.loc(el, "domain/devices")
    out = Devices()
    em = one(ctx, el, "emulator", dloc)
    if em is not None:
        out.emulator = ctx.guard(check_host_path, text(em).strip(),
                                 ctx.loc(em, "domain/devices/emulator"), "emulator")
    seen: dict[str, int] = {}
    for child in elements(el):
        tag = str(child.tag)
        if tag == "emulator":
            continue
        kind = DEVICES[tag]
        index = seen.get(tag, 0)
        seen[tag] = index + 1
        if kind.single is not None and index > 0:
            ctx.report(ctx.loc(child, f"domain/devices/{tag}"), f"<{tag}> appears more than once",
                       hint=f"keep one <{tag}>")
            continue
        model = ctx.guard(kind.parse, ctx, child, DeviceEnv(os=os_, index=index))
        if model is not None:
            out.add(tag, model, child)
        else:
            out.failed.add(tag)
    return out
