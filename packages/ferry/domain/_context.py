"""The parse context: the document's name, and where an element is in it."""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from ferry.domain._checks import Loc
from ferry.domain.model import OS

__all__ = ["Ctx", "DeviceEnv", "element_line"]


def element_line(el: etree._Element) -> int | None:
    """The source line of ``el`` (None when libxml2 does not know it)."""
    line: object = el.sourceline
    return line if isinstance(line, int) else None


class Ctx:
    """Document name plus helpers that locate errors at an element."""

    def __init__(self, where: str) -> None:
        self.where = where

    def loc(self, el: etree._Element, path: str) -> Loc:
        """The location of ``el``, whose element path is ``path``."""
        return Loc(self.where, element_line(el), path)


@dataclass(frozen=True)
class DeviceEnv:
    """What a device parser may need besides its element."""

    os: OS  # the guest's <os> (machine type)
    index: int  # position among the devices with the same tag, from 0
