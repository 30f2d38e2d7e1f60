"""The firmware part of the qemu argv: UEFI pflash images, a rom loader.

As libvirt does for qemu 5.0 and later: the pflash images are block nodes
(``-blockdev`` file + raw format, ``pflash0`` the code, read-only;
``pflash1`` the VM's NVRAM file, read-write) that the machine maps with
``-machine pflash0=pflash0-format,pflash1=pflash1-format``. A secure-boot
loader also needs ``-global driver=cfi.pflash01,property=secure,value=on``
(the flash then answers only to SMM writes; ``smm=on`` comes from
``<features><smm>``). A ``type='rom'`` loader is ``-bios``.

The images are the descriptors the agent opened (``PassedFiles.firmware``,
see :mod:`ferry.firmware_files`); without them (tools, tests) the paths of
the definition are used, and the NVRAM file must then be named. The node
names are fixed: the pflash contents travel in the migration stream under
the machine's own RAM block names (``system.flash0``/``system.flash1``), the
same on both ends.
"""

from __future__ import annotations

from ferry.domain.model import Domain
from ferry.errors import QemuLaunchError

__all__ = ["firmware_argv"]


def firmware_argv(
    d: Domain, passed: tuple[str, ...]
) -> tuple[list[str], list[tuple[str, object | None]]]:
    """The firmware arguments of ``d`` and its ``-machine`` options.

    ``passed``: the file names the agent gave qemu for the images (code,
    then variables), or () to use the definition's paths.

    :raises QemuLaunchError: a pflash loader with no image to map (its
        firmware was not resolved, or the NVRAM file is not named).
    """
    from ferry.domain.argv import _opts, _plain
    from ferry.domain.firmware import loader_type

    ld = d.os.loader
    if ld is None:
        if d.os.firmware == "efi":
            raise QemuLaunchError(f"domain {d.name}: firmware='efi' was not resolved to a "
                                  "loader (ferry.firmware_files does that at start)",
                                  domain=d.name)
        return [], []
    if loader_type(d.os) == "rom":
        path = passed[0] if passed else ld.path
        if path is None:
            raise QemuLaunchError(f"domain {d.name}: the rom loader has no path", domain=d.name)
        return ["-bios", _plain(path, "loader path")], []
    images: list[tuple[str, bool]] = []
    code = passed[0] if passed else ld.path
    if code is None:
        raise QemuLaunchError(f"domain {d.name}: the pflash loader has no path", domain=d.name)
    images.append((code, ld.readonly is not False))
    if ld.readonly is not False:
        nvram = passed[1] if len(passed) > 1 else (d.os.nvram.path if d.os.nvram else None)
        if nvram is None:
            raise QemuLaunchError(f"domain {d.name}: the NVRAM file is not named (the agent "
                                  "passes Ferry's default file)", domain=d.name)
        images.append((nvram, False))
    args: list[str] = []
    machine: list[tuple[str, object | None]] = []
    for i, (path, readonly) in enumerate(images):
        node = f"pflash{i}"
        # One access mode, never reopened (a passed descriptor has only one).
        args += ["-blockdev", _opts("driver=file", ("filename", path),
                                    ("node-name", f"{node}-storage"), ("read-only", readonly))]
        args += ["-blockdev", _opts(f"node-name={node}-format", ("read-only", readonly),
                                    ("driver", "raw"), ("file", f"{node}-storage"))]
        machine.append((node, f"{node}-format"))
    if ld.secure:
        args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return args, machine
