"""Domain XML as ``virt-install`` writes it, generated at test time, and a survey of it.

Issue 14 asks whether Ferry takes the VMs people actually have.  This module
makes them: it runs Debian's ``virt-install`` (package ``virtinst``) with
``--print-xml`` for a spread of typical installs (:data:`CONFIGS`) and then
surveys every file with Ferry's own parser (:func:`survey`).

How the XML is made
-------------------
``virt-install --print-xml --connect test:///default`` needs no daemon, but
libvirt's test driver describes a fake i686 host: its output says
``<domain type='test'>``, ``arch='i686'``, ``/usr/bin/test-hv`` and no machine
type, and ``--virt-type kvm --arch x86_64 --machine q35`` are refused ("Host
does not support any virtualization options for architecture 'x86_64'").
Editing the text afterwards would still leave out everything virt-install
only writes for a KVM host (q35 with its ``pcie-root-port`` tree, UEFI,
TPM, the guest-agent channel, spice extras, hyperv for Windows, the CPU
default).  So the connection is virt-install's own test-suite form of
``test:///default`` (``virtinst/uri.py``, class ``MagicURI``)::

    __virtinst_test__test:///default,fakeuri=qemu:///system,caps=CAPS,domcaps=DOMCAPS

The connection opened is still ``test:///default`` (no daemon, nothing is
defined anywhere); virt-install is only told that it talks to
``qemu:///system`` and is shown the capabilities XML that libvirt's qemu
driver would report for *this* host, written by :func:`host_capabilities`
and :func:`domain_capabilities` from what the host has: the
``qemu-system-x86_64`` binary and its machine types and CPU models, whether
``/dev/kvm`` opens, the OVMF firmware files (Debian's ``ovmf``) and
``swtpm`` (Debian's ``swtpm``).  No text of the generated XML is edited.

What ``--print-xml`` gives is the XML virt-install hands to libvirt's
``defineXML``: libvirt would then add PCI addresses and canonical machine
names (``virsh dumpxml`` style, covered by ``shared/libvirt-xml``).

Disks point into the corpus directory.  A disk virt-install is to create
(``--disk path=…,size=N``) does not exist when virt-install runs, so it
writes the ``<driver type='qcow2' discard='unmap'/>`` of a new volume, as
for ``qemu:///system``; the image is made with ``qemu-img`` afterwards so
the VM can start.  Media that must exist at install time (an ISO, a cloud
image for ``--import``) is made before.

Each :class:`Generated` keeps the exact argv, so any file can be remade by
hand (``python3 tools/testbed/virtinst_corpus.py --keep DIR`` keeps the
capabilities files and images and prints every argv).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIGS",
    "EXPECT",
    "Config",
    "Corpus",
    "Generated",
    "Image",
    "SurveyRow",
    "available",
    "causes",
    "domain_capabilities",
    "dropped",
    "format_causes",
    "format_table",
    "generate",
    "host_capabilities",
    "missing",
    "survey",
    "survey_one",
]

VIRT_INSTALL = "virt-install"
QEMU = "qemu-system-x86_64"
OVMF_DIR = Path("/usr/share/OVMF")
MAGIC = "__virtinst_test__"


# ---------------------------------------------------------------------------
# The configurations.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """A file a configuration refers to, made in the corpus directory.

    ``kind``: ``qcow2`` or ``raw`` (``qemu-img create``), ``iso`` (a tiny
    ISO 9660 image made with ``xorriso``), ``dir`` (a directory).
    ``before``: it must exist when virt-install runs (media, an imported
    image); otherwise it is made afterwards, for the VM to start.
    """

    name: str
    kind: str = "qcow2"
    size: str = "1G"
    before: bool = False


@dataclass(frozen=True)
class Config:
    """One typical install: virt-install arguments after ``--name``.

    ``{dir}`` in an argument is replaced by the corpus directory.
    ``step`` is ``--print-xml``'s step for installs that have two phases
    (``--cdrom``, ``--pxe``, ``--cloud-init``): 1 is the install boot, 2 the
    definition that stays.  ``session``: virt-install is told it talks to
    ``qemu:///session`` (user networking by default) instead of
    ``qemu:///system``.
    """

    name: str
    what: str
    args: tuple[str, ...]
    images: tuple[Image, ...] = ()
    step: int | None = None
    session: bool = False  # qemu:///session (a desktop user's libvirt) instead of system


def _disk(name: str, *extra: str, size: int = 8) -> str:
    """``--disk`` of a new image virt-install would create (``size`` GiB)."""
    return ",".join([f"path={{dir}}/{name}", f"size={size}", *extra])


# Common to (almost) all: memory and vCPUs as a user would give them.
_SMALL = ("--memory", "2048", "--vcpus", "2")

CONFIGS: tuple[Config, ...] = (
    Config(
        "desktop-spice", "desktop: q35, spice, sound, usb redirection (virt-install defaults)",
        ("--memory", "4096", "--vcpus", "2", "--os-variant", "fedora37", "--cpu", "host-model",
         "--disk", _disk("desktop-spice.qcow2", size=20), "--import",
         "--network", "network=default", "--graphics", "spice"),
        (Image("desktop-spice.qcow2"),),
    ),
    Config(
        "desktop-vnc-qxl", "desktop: vnc on localhost, qxl video, ich9 sound",
        ("--memory", "4096", "--vcpus", "4", "--os-variant", "ubuntu22.04", "--cpu", "host-model",
         "--disk", _disk("desktop-vnc-qxl.qcow2", size=20), "--import",
         "--network", "network=default", "--graphics", "vnc,listen=127.0.0.1",
         "--video", "qxl", "--sound", "ich9"),
        (Image("desktop-vnc-qxl.qcow2"),),
    ),
    Config(
        "server-headless", "headless server: no graphics, serial console",
        (*_SMALL, "--os-variant", "debian11", "--cpu", "host-model",
         "--disk", _disk("server-headless.qcow2"), "--import",
         "--network", "network=default", "--graphics", "none",
         "--console", "pty,target.type=serial"),
        (Image("server-headless.qcow2"),),
    ),
    Config(
        "server-minimal", "headless server without balloon, rng or usb",
        ("--memory", "1024", "--vcpus", "1", "--os-variant", "debian11", "--cpu", "host-model",
         "--disk", _disk("server-minimal.qcow2", "bus=virtio"), "--import",
         "--network", "network=default", "--graphics", "none",
         "--memballoon", "none", "--rng", "none", "--controller", "usb,model=none"),
        (Image("server-minimal.qcow2"),),
    ),
    Config(
        "serial-tcp", "server with its serial console on a telnet server (tcp bind)",
        (*_SMALL, "--os-variant", "debian11", "--cpu", "host-model",
         "--disk", _disk("serial-tcp.qcow2"), "--import",
         "--network", "network=default", "--graphics", "none",
         "--serial", "tcp,host=127.0.0.1:4555,mode=bind,protocol.type=telnet"),
        (Image("serial-tcp.qcow2"),),
    ),
    Config(
        "uefi", "UEFI (--boot uefi: firmware='efi')",
        (*_SMALL, "--os-variant", "debian11", "--cpu", "host-model", "--boot", "uefi",
         "--disk", _disk("uefi.qcow2"), "--import",
         "--network", "network=default", "--graphics", "vnc"),
        (Image("uefi.qcow2"),),
    ),
    Config(
        "uefi-tpm", "UEFI with an emulated TPM 2.0 (swtpm)",
        (*_SMALL, "--os-variant", "fedora37", "--cpu", "host-model", "--boot", "uefi",
         "--tpm", "emulator", "--disk", _disk("uefi-tpm.qcow2"), "--import",
         "--network", "network=default", "--graphics", "vnc"),
        (Image("uefi-tpm.qcow2"),),
    ),
    Config(
        "uefi-loader", "UEFI with an explicit secure-boot loader and NVRAM template (OVMF 4M)",
        (*_SMALL, "--os-variant", "debian11", "--cpu", "host-model",
         "--boot", f"loader={OVMF_DIR}/OVMF_CODE_4M.secboot.fd,loader.readonly=yes,"
                   f"loader.type=pflash,loader.secure=yes,"
                   f"nvram.template={OVMF_DIR}/OVMF_VARS_4M.ms.fd",
         "--features", "smm.state=on",
         "--disk", _disk("uefi-loader.qcow2"), "--import",
         "--network", "network=default", "--graphics", "vnc"),
        (Image("uefi-loader.qcow2"),),
    ),
    Config(
        "win11", "Windows 11 (osinfo: UEFI, TPM, hyperv, sata, e1000e, qxl)",
        ("--memory", "4096", "--vcpus", "4", "--os-variant", "win11", "--cpu", "host-model",
         "--disk", _disk("win11.qcow2", size=64), "--import",
         "--network", "network=default"),
        (Image("win11.qcow2"),),
    ),
    Config(
        "win10", "Windows 10 (osinfo: hyperv, localtime clock, sata, e1000e)",
        ("--memory", "4096", "--vcpus", "2", "--os-variant", "win10", "--cpu", "host-model",
         "--disk", _disk("win10.qcow2", size=64), "--import",
         "--network", "network=default"),
        (Image("win10.qcow2"),),
    ),
    Config(
        "bridge-nic", "server on a host bridge (--network bridge=br0)",
        (*_SMALL, "--os-variant", "debian11", "--cpu", "host-model",
         "--disk", _disk("bridge-nic.qcow2"), "--import",
         "--network", "bridge=br0,model=virtio", "--graphics", "none"),
        (Image("bridge-nic.qcow2"),),
    ),
    Config(
        "network-nic", "libvirt network NIC, e1000e model",
        (*_SMALL, "--os-variant", "debian11", "--cpu", "host-model",
         "--disk", _disk("network-nic.qcow2"), "--import",
         "--network", "network=default,model=e1000e", "--graphics", "none"),
        (Image("network-nic.qcow2"),),
    ),
    Config(
        "virtio-scsi", "two disks on a virtio-scsi controller",
        (*_SMALL, "--os-variant", "debian11", "--cpu", "host-model",
         "--controller", "type=scsi,model=virtio-scsi",
         "--disk", _disk("virtio-scsi-0.qcow2", "bus=scsi"),
         "--disk", _disk("virtio-scsi-1.qcow2", "bus=scsi"), "--import",
         "--network", "network=default", "--graphics", "none"),
        (Image("virtio-scsi-0.qcow2"), Image("virtio-scsi-1.qcow2")),
    ),
    Config(
        "multi-disk-nic", "three disks (qcow2, raw, sata), a cdrom, two NICs",
        (*_SMALL, "--os-variant", "debian11", "--cpu", "host-model",
         "--disk", _disk("multi-0.qcow2"),
         "--disk", "path={dir}/multi-1.raw,size=2,format=raw,cache=none,io=native",
         "--disk", "path={dir}/multi-2.qcow2,size=4,bus=sata",
         "--disk", "path={dir}/media.iso,device=cdrom", "--import",
         "--network", "network=default", "--network", "bridge=br0,model=virtio",
         "--graphics", "vnc"),
        (Image("multi-0.qcow2"), Image("multi-1.raw", "raw", "2G"), Image("multi-2.qcow2"),
         Image("media.iso", "iso", before=True)),
    ),
    Config(
        "hugepages-numa", "hugepages, NUMA cell, strict numatune, vCPUs pinned",
        (*_SMALL, "--os-variant", "debian11",
         "--cpu", "host-model,cell0.id=0,cell0.cpus=0-1,cell0.memory=2097152",
         "--memorybacking", "hugepages=on", "--numatune", "0,mode=strict",
         "--cputune", "vcpupin0.vcpu=0,vcpupin0.cpuset=0,vcpupin1.vcpu=1,vcpupin1.cpuset=1",
         "--disk", _disk("hugepages-numa.qcow2"), "--import",
         "--network", "network=default", "--graphics", "none"),
        (Image("hugepages-numa.qcow2"),),
    ),
    Config(
        "numa-two-cells", "two guest NUMA cells, sockets/cores topology",
        ("--memory", "2048", "--vcpus", "4,sockets=2,cores=2,threads=1",
         "--os-variant", "debian11",
         "--cpu", "host-model,cell0.id=0,cell0.cpus=0-1,cell0.memory=1048576,"
                  "cell1.id=1,cell1.cpus=2-3,cell1.memory=1048576",
         "--disk", _disk("numa-two-cells.qcow2"), "--import",
         "--network", "network=default", "--graphics", "none"),
        (Image("numa-two-cells.qcow2"),),
    ),
    Config(
        "cloud-init", "cloud image with --cloud-init (the definition that stays, step 2)",
        (*_SMALL, "--os-variant", "ubuntu22.04", "--cpu", "host-model",
         "--disk", "path={dir}/cloud-init.qcow2,driver.type=qcow2", "--import",
         "--cloud-init", "root-password-generate=on,disable=on",
         "--network", "network=default", "--graphics", "none"),
        (Image("cloud-init.qcow2", before=True),),
        step=2,
    ),
    Config(
        "cloud-seed-iso", "cloud image imported with a NoCloud seed ISO as cdrom",
        (*_SMALL, "--os-variant", "ubuntu22.04", "--cpu", "host-model",
         "--disk", "path={dir}/cloud-seed.qcow2,device=disk,driver.type=qcow2,bus=virtio",
         "--disk", "path={dir}/seed.iso,device=cdrom", "--import",
         "--network", "network=default", "--graphics", "none"),
        (Image("cloud-seed.qcow2", before=True), Image("seed.iso", "iso", before=True)),
    ),
    Config(
        "i440fx", "legacy i440fx (pc) machine, IDE disk, rtl8139, cirrus, vnc",
        ("--memory", "1024", "--vcpus", "1", "--os-variant", "centos7.0", "--machine", "pc",
         "--cpu", "host-model",
         "--disk", _disk("i440fx.qcow2", "bus=ide"), "--import",
         "--network", "network=default,model=rtl8139", "--graphics", "vnc",
         "--video", "cirrus"),
        (Image("i440fx.qcow2"),),
    ),
    Config(
        "i440fx-user-net", "i440fx with user networking and vnc",
        ("--memory", "1024", "--vcpus", "1", "--os-variant", "debian11", "--machine", "pc",
         "--cpu", "host-model", "--disk", _disk("i440fx-user-net.qcow2"), "--import",
         "--network", "user", "--graphics", "vnc"),
        (Image("i440fx-user-net.qcow2"),),
    ),
    Config(
        "i440fx-passthrough", "headless i440fx, user networking, the default (passthrough) CPU",
        ("--memory", "1024", "--vcpus", "2", "--os-variant", "debian11", "--machine", "pc",
         "--disk", _disk("i440fx-passthrough.qcow2"), "--import",
         "--network", "user", "--graphics", "none"),
        (Image("i440fx-passthrough.qcow2"),),
    ),
    Config(
        "session-desktop", "a desktop user's VM (qemu:///session: user networking, spice)",
        (*_SMALL, "--os-variant", "fedora37", "--cpu", "host-model",
         "--disk", _disk("session-desktop.qcow2"), "--import"),
        (Image("session-desktop.qcow2"),),
        session=True,
    ),
    Config(
        "session-server", "a headless VM under qemu:///session",
        (*_SMALL, "--os-variant", "debian11", "--cpu", "host-model",
         "--disk", _disk("session-server.qcow2"), "--import", "--graphics", "none"),
        (Image("session-server.qcow2"),),
        session=True,
    ),
    Config(
        "cpu-host-passthrough", "virt-install's default CPU for KVM (host-passthrough)",
        (*_SMALL, "--os-variant", "debian11",
         "--disk", _disk("cpu-host-passthrough.qcow2"), "--import",
         "--network", "network=default", "--graphics", "none"),
        (Image("cpu-host-passthrough.qcow2"),),
    ),
    Config(
        "cpu-named", "a named CPU model with a feature (what migrates between unlike hosts)",
        (*_SMALL, "--os-variant", "debian11", "--cpu", "Nehalem,+x2apic",
         "--disk", _disk("cpu-named.qcow2"), "--import",
         "--network", "network=default", "--graphics", "none"),
        (Image("cpu-named.qcow2"),),
    ),
    Config(
        "guest-agent-path", "guest-agent channel at libvirt's runtime path",
        (*_SMALL, "--os-variant", "debian11", "--cpu", "host-model",
         "--disk", _disk("guest-agent-path.qcow2"), "--import",
         "--network", "network=default", "--graphics", "none", "--channel",
         "unix,mode=bind,path=/var/lib/libvirt/qemu/channel/target/domain-1-guest-agent-path/"
         "org.qemu.guest_agent.0,target.type=virtio,target.name=org.qemu.guest_agent.0"),
        (Image("guest-agent-path.qcow2"),),
    ),
    Config(
        "usb-redir", "spice listening on an address, usb redirection (spicevmc and tcp)",
        (*_SMALL, "--os-variant", "fedora37", "--cpu", "host-model",
         "--disk", _disk("usb-redir.qcow2"), "--import",
         "--network", "network=default", "--graphics", "spice,listen=127.0.0.1",
         "--redirdev", "usb,type=spicevmc", "--redirdev", "usb,type=tcp,server=127.0.0.1:4000"),
        (Image("usb-redir.qcow2"),),
    ),
    Config(
        "watchdog", "i6300esb watchdog and a pvpanic device",
        (*_SMALL, "--os-variant", "debian11", "--cpu", "host-model",
         "--disk", _disk("watchdog.qcow2"), "--import",
         "--network", "network=default", "--graphics", "none",
         "--watchdog", "i6300esb,action=reset", "--panic", "default"),
        (Image("watchdog.qcow2"),),
    ),
    Config(
        "cdrom-install", "installing from an ISO (install boot, step 1)",
        (*_SMALL, "--os-variant", "debian11", "--cpu", "host-model",
         "--cdrom", "{dir}/install.iso", "--disk", _disk("cdrom-install.qcow2"),
         "--network", "network=default", "--graphics", "vnc"),
        (Image("cdrom-install.qcow2"), Image("install.iso", "iso", before=True)),
        step=1,
    ),
    Config(
        "pxe-install", "installing from the network (--pxe, install boot, step 1)",
        (*_SMALL, "--os-variant", "debian11", "--cpu", "host-model", "--pxe",
         "--disk", _disk("pxe-install.qcow2"),
         "--network", "network=default", "--graphics", "vnc"),
        (Image("pxe-install.qcow2"),),
        step=1,
    ),
    Config(
        "virtiofs", "a host directory shared with virtiofs (memfd shared memory)",
        (*_SMALL, "--os-variant", "fedora37", "--cpu", "host-model",
         "--memorybacking", "source.type=memfd,access.mode=shared",
         "--filesystem", "source={dir}/share,target=share,driver.type=virtiofs",
         "--disk", _disk("virtiofs.qcow2"), "--import",
         "--network", "network=default", "--graphics", "none"),
        (Image("virtiofs.qcow2"), Image("share", "dir", before=True)),
    ),
    Config(
        "iothreads-vcpus", "iothreads for a disk, vCPU hotplug headroom (current < max)",
        ("--memory", "2048", "--vcpus", "2,maxvcpus=4", "--iothreads", "2",
         "--os-variant", "debian11", "--cpu", "host-model",
         "--disk", _disk("iothreads.qcow2", "driver.iothread=1,cache=none,io=native"),
         "--import", "--network", "network=default", "--graphics", "none"),
        (Image("iothreads.qcow2"),),
    ),
)


#: What each generated file must contain (XPath from ``<domain>``): what the
#: config is there for.  Checked by :func:`missing`, so that a virt-install
#: that stops writing it fails the test instead of thinning the corpus.
EXPECT: dict[str, tuple[str, ...]] = {
    "desktop-spice": ("devices/graphics[@type='spice']", "devices/sound", "devices/redirdev",
                      "devices/channel[@type='spicevmc']", "os/type[@machine='q35']",
                      "devices/controller[@model='pcie-root-port']"),
    "desktop-vnc-qxl": ("devices/graphics[@type='vnc'][@listen='127.0.0.1']",
                        "devices/video/model[@type='qxl']", "devices/sound[@model='ich9']"),
    "server-headless": ("devices/console[@type='pty']", "not(devices/graphics)"),
    "server-minimal": ("devices/memballoon[@model='none']",
                       "devices/controller[@type='usb'][@model='none']", "not(devices/rng)"),
    "serial-tcp": ("devices/serial[@type='tcp']/source[@mode='bind']",
                   "devices/serial/protocol[@type='telnet']"),
    "uefi": ("os[@firmware='efi']",),
    "uefi-tpm": ("os[@firmware='efi']", "devices/tpm/backend[@type='emulator']"),
    "uefi-loader": ("os/loader[@secure='yes'][@type='pflash'][@readonly='yes']",
                    "os/nvram[@template]", "features/smm"),
    "win11": ("os[@firmware='efi']", "devices/tpm", "features/hyperv",
              "clock[@offset='localtime']/timer[@name='hypervclock']"),
    "win10": ("features/hyperv", "devices/disk/target[@bus='sata']",
              "devices/interface/model[@type='e1000e']"),
    "bridge-nic": ("devices/interface[@type='bridge']/source[@bridge='br0']",),
    "network-nic": ("devices/interface[@type='network']/source[@network='default']",
                    "devices/interface/model[@type='e1000e']"),
    "virtio-scsi": ("devices/controller[@type='scsi'][@model='virtio-scsi']",
                    "count(devices/disk/target[@bus='scsi']) = 2"),
    "multi-disk-nic": ("count(devices/disk) = 4", "count(devices/interface) = 2",
                       "devices/disk[@device='cdrom']/source",
                       "devices/disk/driver[@type='raw'][@cache='none'][@io='native']"),
    "hugepages-numa": ("memoryBacking/hugepages", "numatune/memory[@mode='strict']",
                       "cpu/numa/cell", "count(cputune/vcpupin) = 2"),
    "numa-two-cells": ("count(cpu/numa/cell) = 2", "cpu/topology[@sockets='2']"),
    "cloud-init": ("devices/disk[@device='cdrom']", "devices/disk/driver[@type='qcow2']"),
    "cloud-seed-iso": ("devices/disk[@device='cdrom']/source",
                       "devices/disk/driver[@type='qcow2']"),
    "i440fx": ("os/type[@machine='pc']", "devices/disk/target[@bus='ide']",
               "devices/interface/model[@type='rtl8139']", "devices/video/model[@type='cirrus']"),
    "i440fx-user-net": ("os/type[@machine='pc']", "devices/interface[@type='user']"),
    "i440fx-passthrough": ("os/type[@machine='pc']", "cpu[@mode='host-passthrough']",
                           "devices/interface[@type='user']"),
    "session-desktop": ("devices/interface[@type='user']", "devices/graphics[@type='spice']"),
    "session-server": ("devices/interface[@type='user']", "not(devices/graphics)"),
    "cpu-host-passthrough": ("cpu[@mode='host-passthrough']",),
    "cpu-named": ("cpu[@mode='custom']/model[text()='Nehalem']",
                  "cpu/feature[@name='x2apic'][@policy='force']"),
    "guest-agent-path": (
        "devices/channel[@type='unix']/source[starts-with(@path, '/var/lib/libvirt/')]",
        "devices/channel/target[@name='org.qemu.guest_agent.0']"),
    "usb-redir": ("devices/redirdev[@type='tcp']", "devices/redirdev[@type='spicevmc']",
                  "devices/graphics[@type='spice'][@listen='127.0.0.1']"),
    "watchdog": ("devices/watchdog[@model='i6300esb'][@action='reset']", "devices/panic"),
    "cdrom-install": ("os/boot[@dev='cdrom']", "devices/disk[@device='cdrom']/source"),
    "pxe-install": ("os/boot[@dev='network']",),
    "virtiofs": ("devices/filesystem/driver[@type='virtiofs']",
                 "memoryBacking/source[@type='memfd']", "memoryBacking/access[@mode='shared']"),
    "iothreads-vcpus": ("iothreads", "vcpu[@current='2']", "devices/disk/driver[@iothread='1']"),
}

#: What every generated file must have: a KVM x86_64 guest with qemu as
#: emulator, nothing of the test driver (type 'test', i686, /usr/bin/test-hv).
EXPECT_ALL = ("self::domain[@type='kvm']", "os/type[@arch='x86_64'][@machine]",
              "devices/emulator[contains(text(), 'qemu-system-x86_64')]")


def missing(g: Generated) -> list[str]:
    """The expectations (:data:`EXPECT`, :data:`EXPECT_ALL`) the file does not meet."""
    from lxml import etree

    if g.xml is None:
        return ["(not generated)"]
    root = etree.fromstring(g.xml.encode(), etree.XMLParser(resolve_entities=False,
                                                             no_network=True))
    out = []
    for expr in (*EXPECT_ALL, *EXPECT.get(g.name, ())):
        found = root.xpath(expr)
        if not (found if isinstance(found, list) else bool(found)):
            out.append(expr)
    return out


# ---------------------------------------------------------------------------
# Capabilities of this host, as libvirt's qemu driver would report them.
# ---------------------------------------------------------------------------


def _run(argv: Sequence[str], *, timeout: float = 60, env: dict[str, str] | None = None,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                          check=False)  # fmt: skip


def _qemu_binary() -> str:
    return shutil.which(QEMU) or f"/usr/bin/{QEMU}"


def _machines(qemu: str) -> list[tuple[str, str | None]]:
    """``(name, canonical)`` of each machine type (aliases carry their target)."""
    out = _run([qemu, "-machine", "help"]).stdout
    found: list[tuple[str, str | None]] = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 1)
        if len(parts) != 2 or parts[0] in ("none", "microvm", "isapc", "xenfv", "xenpv"):
            continue
        alias = re.search(r"\(alias of ([^)]+)\)", parts[1])
        found.append((parts[0], alias.group(1) if alias else None))
    return found


def _cpu_models(qemu: str) -> list[str]:
    out = _run([qemu, "-cpu", "help"]).stdout
    models = []
    for line in out.splitlines():
        m = re.match(r"^x86 (\S+)", line)
        if m and m.group(1) not in ("base", "host", "max"):
            models.append(m.group(1))
    return models


def _kvm_opens() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;")


def host_capabilities() -> str:
    """``virsh capabilities`` of this host, as far as virt-install reads it."""
    qemu = _qemu_binary()
    machines = "".join(
        f"\n      <machine{f' canonical={chr(39)}{_esc(c)}{chr(39)}' if c else ''}"
        f" maxCpus='255'>{_esc(m)}</machine>"
        for m, c in _machines(qemu)
    )
    domains = "<domain type='qemu'/>" + ("<domain type='kvm'/>" if _kvm_opens() else "")
    ncpu = os.cpu_count() or 1
    cpus = "".join(
        f"<cpu id='{i}' socket_id='0' core_id='{i}' siblings='{i}'/>" for i in range(ncpu)
    )
    return f"""<capabilities>
  <host>
    <uuid>00000000-0000-4000-8000-000000000014</uuid>
    <cpu>
      <arch>x86_64</arch>
      <topology sockets='1' dies='1' cores='{ncpu}' threads='1'/>
      <pages unit='KiB' size='4'/>
      <pages unit='KiB' size='2048'/>
      <pages unit='KiB' size='1048576'/>
    </cpu>
    <topology>
      <cells num='1'>
        <cell id='0'>
          <cpus num='{ncpu}'>{cpus}</cpus>
        </cell>
      </cells>
    </topology>
  </host>
  <guest>
    <os_type>hvm</os_type>
    <arch name='x86_64'>
      <wordsize>64</wordsize>
      <emulator>{_esc(qemu)}</emulator>{machines}
      {domains}
    </arch>
    <features>
      <acpi default='on' toggle='yes'/>
      <apic default='on' toggle='no'/>
      <cpuselection/>
      <deviceboot/>
      <disksnapshot default='on' toggle='no'/>
    </features>
  </guest>
</capabilities>
"""


def _enum(name: str, values: Iterable[str]) -> str:
    inner = "".join(f"<value>{_esc(v)}</value>" for v in values)
    return f"<enum name='{name}'>{inner}</enum>"


def domain_capabilities() -> str:
    """``virsh domcapabilities`` (kvm, x86_64) of this host, as far as virt-install reads it.

    The firmware list is what Debian's ``ovmf`` installs; the TPM emulator
    backend is offered only when ``swtpm`` is installed, as libvirt does.
    """
    qemu = _qemu_binary()
    kvm = _kvm_opens()
    loaders = sorted(str(p) for p in OVMF_DIR.glob("OVMF_CODE*.fd"))
    tpm_backends = ["passthrough", *(["emulator"] if shutil.which("swtpm") else [])]
    models = "".join(
        f"<model usable='yes' vendor='unknown'>{_esc(m)}</model>" for m in _cpu_models(qemu)
    )
    return f"""<domainCapabilities>
  <path>{_esc(qemu)}</path>
  <domain>{"kvm" if kvm else "qemu"}</domain>
  <machine>pc-q35-7.2</machine>
  <arch>x86_64</arch>
  <vcpu max='288'/>
  <iothreads supported='yes'/>
  <os supported='yes'>
    {_enum("firmware", ["efi"] if loaders else [])}
    <loader supported='yes'>
      {"".join(f"<value>{_esc(p)}</value>" for p in loaders)}
      {_enum("type", ["rom", "pflash"])}
      {_enum("readonly", ["yes", "no"])}
      {_enum("secure", ["yes", "no"])}
    </loader>
  </os>
  <cpu>
    <mode name='host-passthrough' supported='{"yes" if kvm else "no"}'>
      {_enum("hostPassthroughMigratable", ["on", "off"])}
    </mode>
    <mode name='maximum' supported='yes'>
      {_enum("maximumMigratable", ["on", "off"])}
    </mode>
    <mode name='host-model' supported='{"yes" if kvm else "no"}'>
      <model fallback='forbid'>qemu64</model>
    </mode>
    <mode name='custom' supported='yes'>{models}</mode>
  </cpu>
  <memoryBacking supported='yes'>{_enum("sourceType", ["file", "anonymous", "memfd"])}
  </memoryBacking>
  <devices>
    <disk supported='yes'>
      {_enum("diskDevice", ["disk", "cdrom", "floppy", "lun"])}
      {_enum("bus", ["fdc", "scsi", "virtio", "usb", "sata"])}
      {_enum("model", ["virtio", "virtio-transitional", "virtio-non-transitional"])}
    </disk>
    <graphics supported='yes'>{_enum("type", ["sdl", "vnc", "spice", "egl-headless", "dbus"])}
    </graphics>
    <video supported='yes'>
      {_enum("modelType", ["vga", "cirrus", "vmvga", "qxl", "virtio", "none", "bochs",
                           "ramfb"])}
    </video>
    <tpm supported='yes'>
      {_enum("model", ["tpm-tis", "tpm-crb"])}
      {_enum("backendModel", tpm_backends)}
      {_enum("backendVersion", ["1.2", "2.0"])}
    </tpm>
    <filesystem supported='yes'>{_enum("driverType", ["path", "handle", "virtiofs"])}
    </filesystem>
  </devices>
  <features>
    <gic supported='no'/>
    <sev supported='no'/>
  </features>
</domainCapabilities>
"""


# ---------------------------------------------------------------------------
# Generation.
# ---------------------------------------------------------------------------


def available() -> str | None:
    """Why the corpus cannot be generated here, or None."""
    for tool in (VIRT_INSTALL, "qemu-img", QEMU, "xorriso"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make deps: Debian's virtinst, qemu-utils, ...)"
    return None


@dataclass
class Generated:
    """One generated file, or the reason virt-install did not write it."""

    config: Config
    argv: list[str]
    xml: str | None
    error: str | None = None

    @property
    def name(self) -> str:
        """The configuration's (and domain's) name."""
        return self.config.name

    def command(self) -> str:
        """The argv as a shell command line (to reproduce by hand)."""
        return shlex.join(self.argv)


@dataclass
class Corpus:
    """Everything :func:`generate` made: the directory, capabilities and files."""

    root: Path
    connect: str
    files: list[Generated]

    def by_name(self) -> dict[str, Generated]:
        """The files keyed by configuration name."""
        return {g.name: g for g in self.files}


def _make_image(root: Path, image: Image) -> None:
    path = root / image.name
    if path.exists():
        return
    if image.kind == "dir":
        path.mkdir(parents=True)
        return
    if image.kind == "iso":
        src = root / f".{image.name}.d"
        src.mkdir(exist_ok=True)
        (src / "README").write_text(f"{image.name}: an empty medium for the virt-install corpus\n")
        result = _run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "CIDATA", "-o", str(path),
                       str(src)])  # fmt: skip
    else:
        result = _run(["qemu-img", "create", "-q", "-f", image.kind, str(path), image.size])
    if result.returncode != 0:
        raise RuntimeError(f"cannot make {path}: {result.stderr.strip()}")


def _virt_install_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    # virt-install writes its log, and --cloud-init its ISO, under the cache
    # directory; keep both in the corpus.
    env.update(LANG="C.UTF-8", LC_ALL="C.UTF-8", HOME=str(root / "home"),
               XDG_CACHE_HOME=str(root / "cache"),
               XDG_CONFIG_HOME=str(root / "config"))  # fmt: skip
    # Use the system python (virt-install's shebang) even under a venv.
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if "venv" not in p
    ) or "/usr/bin:/bin"
    return env


def _one(config: Config, root: Path, connect: str, env: dict[str, str]) -> Generated:
    if config.session:
        connect = connect.replace("fakeuri=qemu:///system", "fakeuri=qemu:///session")
    argv = [VIRT_INSTALL, "--connect", connect, "--print-xml"]
    if config.step is not None:
        argv.append(str(config.step))
    argv += ["--name", config.name, "--noautoconsole"]
    argv += [a.replace("{dir}", str(root)) for a in config.args]
    result = _run(argv, env=env, timeout=120)
    if result.returncode != 0:
        return Generated(config, argv, None, error=result.stderr.strip() or result.stdout.strip())
    text = result.stdout
    if text.count("<domain ") != 1:
        return Generated(config, argv, None,
                         error=f"expected one <domain>, got {text.count('<domain ')} "
                               "(a two-step install needs Config.step)")  # fmt: skip
    return Generated(config, argv, text)


def generate(root: Path, configs: Sequence[Config] = CONFIGS, *, jobs: int | None = None) -> Corpus:
    """Write the capabilities, make the media and run virt-install for each config.

    ``root`` is made if need be; it ends up holding the images, ``caps.xml``,
    ``domcaps.xml`` and one ``NAME.xml`` per generated file.
    Runs up to ``jobs`` virt-install processes at once (default: one per CPU).
    """
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    caps, domcaps = root / "caps.xml", root / "domcaps.xml"
    caps.write_text(host_capabilities())
    domcaps.write_text(domain_capabilities())
    connect = f"{MAGIC}test:///default,fakeuri=qemu:///system,caps={caps},domcaps={domcaps}"
    for sub in ("home", "cache", "config"):
        (root / sub).mkdir(exist_ok=True)
    for config in configs:
        for image in config.images:
            if image.before:
                _make_image(root, image)
            else:
                # virt-install writes a new volume's <driver type> only when
                # the file is not there yet: make a second run like the first.
                with contextlib.suppress(FileNotFoundError):
                    (root / image.name).unlink()
    env = _virt_install_env(root)
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
        files = list(pool.map(lambda c: _one(c, root, connect, env), configs))
    for config in configs:
        for image in config.images:
            _make_image(root, image)
    for g in files:
        if g.xml is not None:
            (root / f"{g.name}.xml").write_text(g.xml)
    return Corpus(root, connect, files)


# ---------------------------------------------------------------------------
# Nothing dropped: what the input had must be in Ferry's formatted output.
# ---------------------------------------------------------------------------

#: What Ferry documents as "accepted and ignored" (ferry.domain docstring),
#: as (element path, attribute or None) of the input.
IGNORED: tuple[tuple[str, str | None], ...] = (
    ("domain", "id"),
)


def _facts(xml: str) -> tuple[Counter[str], Counter[str], Counter[str]]:
    """Element paths, attribute names and values (with text) of a document, counted.

    Paths use element names (namespaced ones in Clark notation); comments and
    processing instructions are left out.  A pty chardev's ``source/@path``
    and the other ignored items (:data:`IGNORED`) are left out as well.
    """
    from lxml import etree

    parser = etree.XMLParser(resolve_entities=False, no_network=True, remove_comments=True,
                             remove_pis=True)  # fmt: skip
    root = etree.fromstring(xml.encode(), parser)
    elements: Counter[str] = Counter()
    attrs: Counter[str] = Counter()
    values: Counter[str] = Counter()

    def walk(el: Any, path: str, pty: bool) -> None:
        if pty and path.endswith("/source") and set(el.attrib) <= {"path"} and len(el) == 0:
            return  # the allocated /dev/pts/N of a pty (libvirt's live XML)
        elements[path] += 1
        for name, value in el.attrib.items():
            if (path, name) in IGNORED or (pty and path.endswith("/source") and name == "path"):
                continue
            attrs[f"{path}/@{name}"] += 1
            values[f"{path}/@{name}={value}"] += 1
        text = (el.text or "").strip()
        if text and len(el) == 0:
            values[f"{path}={text}"] += 1
        for child in el:
            if not isinstance(child.tag, str):
                continue
            child_pty = pty or child.get("type") == "pty"
            walk(child, f"{path}/{child.tag}", child_pty)

    walk(root, root.tag, False)
    return elements, attrs, values


def dropped(source: str, formatted: str) -> tuple[list[str], list[str]]:
    """What ``source`` has that ``formatted`` lacks: ``(dropped, changed)``.

    ``dropped``: element paths or attribute names found fewer times in the
    output than in the input (``domain/devices/graphics/listen x1``).
    ``changed``: attribute values and texts found fewer times (the item is
    there, its value is not): a normalisation such as a unit conversion, or a
    silently rewritten setting; either way worth a look.
    """
    ie, ia, iv = _facts(source)
    oe, oa, ov = _facts(formatted)
    lost = [(k, n - oe[k]) for k, n in ie.items() if oe[k] < n]
    lost += [(k, n - oa[k]) for k, n in ia.items() if oa[k] < n]
    gone = {k for k, _ in lost}
    changed = []
    for k, n in iv.items():
        item = k.partition("=")[0]  # element path, or element path/@attribute
        if ov[k] < n and item not in gone and item.partition("/@")[0] not in gone:
            changed.append(k)
    return [f"{k} x{n}" for k, n in lost], changed


# ---------------------------------------------------------------------------
# The survey.
# ---------------------------------------------------------------------------


@dataclass
class Problem:
    """One reason Ferry refuses a file: where, and what."""

    element: str | None
    line: int | None
    message: str
    code: str = "xml-unsupported"

    def cause(self) -> str:
        """The problem without file and line: what groups equal causes."""
        msg = re.sub(r"^[^:]*:\d+: ", "", self.message)
        msg = re.sub(r"^[^:]*\.xml: ", "", msg)
        if self.element and not msg.startswith(self.element):
            msg = f"{self.element}: {msg}"
        # Values that differ per file (paths, names) do not make a new cause.
        msg = re.sub(r"'/[^']*'", "'PATH'", msg)
        return msg


@dataclass
class SurveyRow:
    """What Ferry made of one generated file."""

    name: str
    status: str  # "accepted", "refused", "internal", "not-generated"
    problems: list[Problem] = field(default_factory=list)
    message: str | None = None  # the refusal as parse_domain worded it (all it reported)
    peeled: bool = False  # problems after the first were found by removing the earlier ones
    round_trip: str | None = None  # None = ok, else what differs
    dropped: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    argv_error: str | None = None  # the qemu command line Ferry would build at start
    # For a refused file whose problems could all be peeled off: what building
    # the qemu command line of the rest says (the next thing a user would meet).
    peeled_argv_error: str | None = None
    internal: str | None = None  # a traceback: never acceptable

    @property
    def clear(self) -> bool:
        """Accepted, or refused with messages that name an element: no internal error."""
        if self.status == "accepted":
            return self.internal is None
        if self.status != "refused":
            return False
        return bool(self.problems) and all(
            p.message.strip() and "Traceback" not in p.message
            and re.search(r"\bdomain(/[\w:.-]+)*", f"{p.element or ''} {p.message}")
            for p in self.problems
        )  # fmt: skip


def _problems_of(exc: Exception, where: str) -> list[Problem]:
    """Every problem an XMLError reports: its ``details["problems"]`` when parse
    lists them all (each with ``line``, ``path``, ``message``, ``hint``), else
    the error itself.  Each message is given its location, ``WHERE:LINE: PATH:``.
    """
    details: dict[str, Any] = dict(getattr(exc, "details", {}) or {})
    code = str(getattr(exc, "code", "xml-invalid"))
    items = details.get("problems")
    if not (isinstance(items, list) and items):
        return [Problem(details.get("element"), details.get("line"), str(exc), code)]
    out = []
    for item in items:
        if not isinstance(item, dict):
            out.append(Problem(None, None, str(item), code))
            continue
        path = item.get("path") or item.get("element")
        line = item.get("line")
        message = str(item.get("message", item))
        if not message.startswith(where):
            loc = f"{where}:{line}: " if isinstance(line, int) else f"{where}: "
            message = loc + (f"{path}: " if path else "") + message
        if item.get("hint"):
            message += f" ({item['hint']})"
        out.append(Problem(path if isinstance(path, str) else None,
                           line if isinstance(line, int) else None, message,
                           str(item.get("code", code))))  # fmt: skip
    return out


def _peel(xml: str, problems: Sequence[Problem]) -> str | None:
    """``xml`` without the elements (or attributes) the problems name; None when none is found.

    A problem is found by its element path and line.  One that names an
    attribute (``attribute 'X' …``) takes only that attribute away; any other
    takes its element: dropping just a refused value would make up a
    different, default, device.
    """
    from lxml import etree

    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    root = etree.fromstring(xml.encode(), parser)

    def find(el: Any, rest: list[str], line: int) -> Any:
        if not rest:
            return el if el.sourceline == line else None
        for child in el:
            if isinstance(child.tag, str) and child.tag == rest[0]:
                hit = find(child, rest[1:], line)
                if hit is not None:
                    return hit
        return None

    targets: list[tuple[Any, str | None]] = []
    for p in problems:
        if not p.element or p.line is None:
            continue
        steps = p.element.split("/")
        el = find(root, steps[1:], p.line) if steps[0] == root.tag else None
        if el is None:  # e.g. named by its parent's line ("appears more than once")
            continue
        named = re.search(r"attribute '([^']+)'", p.message)
        attribute = named.group(1) if named and named.group(1) in el.attrib else None
        if attribute is None and el.getparent() is None:
            continue  # the root itself
        targets.append((el, attribute))
    if not targets:
        return None
    for el, attribute in targets:
        if attribute is not None:
            el.attrib.pop(attribute, None)
    for el, attribute in targets:
        parent = el.getparent()
        if attribute is None and parent is not None:
            parent.remove(el)
    return etree.tostring(root, encoding="unicode")


def survey_one(g: Generated, *, max_peel: int = 200) -> SurveyRow:
    """Parse, round-trip and build the qemu argv of one generated file.

    A refused file is parsed again without the elements its problems name,
    until it parses (or nothing more can be taken out), so that every
    problem is listed even where :func:`ferry.domain.parse_domain` reports
    only the first one, or only those one pass can see (``peeled`` tells).
    """
    from ferry.domain import format_domain, parse_domain
    from ferry.errors import XMLError

    if g.xml is None:
        problem = Problem(None, None, g.error or "?", "virt-install")
        return SurveyRow(g.name, "not-generated", [problem])
    where = f"{g.name}.xml"
    try:
        domain = parse_domain(g.xml, where=where)
    except XMLError as exc:
        problems = _problems_of(exc, where)
        if any("cannot interpret domain XML" in p.message for p in problems):
            return SurveyRow(g.name, "internal", problems, message=str(exc),
                             internal=repr(exc.__cause__ or exc))  # fmt: skip
        row = SurveyRow(g.name, "refused", problems, message=str(exc))
        _peel_all(row, g.xml, where, max_peel)
        return row
    except Exception:
        return SurveyRow(g.name, "internal", internal=traceback.format_exc())

    row = SurveyRow(g.name, "accepted")
    try:
        text = format_domain(domain)
        reparsed = parse_domain(text, where=f"formatted {where}")
        if reparsed != domain:
            row.round_trip = "parse(format(parse(x))) != parse(x)"
        elif format_domain(reparsed) != text:
            row.round_trip = "format is not a fixed point"
        row.dropped, row.changed = dropped(g.xml, text)
    except Exception:
        row.internal = traceback.format_exc()
        return row
    try:
        row.argv_error = _argv_error(domain)
    except Exception:
        row.internal = traceback.format_exc()
    return row


def _peel_all(row: SurveyRow, xml: str, where: str, max_peel: int) -> None:
    """Add to ``row`` the problems met once the ones found so far are taken out of ``xml``.

    Stops when the rest parses (then ``row.peeled_argv_error`` tells what
    start would say) or when nothing more can be taken out.  A problem met
    again (the next of 14 ``pcie-root-port`` controllers) is listed once.
    """
    from ferry.domain import parse_domain
    from ferry.errors import XMLError

    text = xml
    batch = list(row.problems)
    seen = {(p.element, p.cause()) for p in row.problems}
    for _ in range(max_peel):
        text_next = _peel(text, batch)
        if text_next is None:
            return
        text = text_next
        try:
            rest = parse_domain(text, where=where)
        except XMLError as exc:
            # Each round takes at least one element or attribute out, so this ends.
            batch = _problems_of(exc, where)
            new = [p for p in batch if (p.element, p.cause()) not in seen]
            seen.update((p.element, p.cause()) for p in new)
            row.problems += new
            row.peeled = row.peeled or bool(new)
            continue
        except Exception:
            return
        try:
            # What start would say once define takes the file.
            row.peeled_argv_error = _argv_error(rest)
        except Exception:
            row.peeled_argv_error = "INTERNAL: " + traceback.format_exc().strip().splitlines()[-1]
        return


def _argv_error(domain: Any) -> str | None:
    """Why Ferry cannot build the qemu command line of ``domain`` (as ``Host.start`` asks)."""
    from ferry.domain import RuntimePaths, to_qemu_argv
    from ferry.domain.argv import GraphicsPorts, NicTap, PassedFiles
    from ferry.domain.firmware import needs_nvram, resolve_firmware
    from ferry.errors import FerryError
    from ferry.firmware_files import load_descriptors

    # What Host.start passes: ports it reserved for autoport displays and
    # the tap devices it opened for bridge/network NICs (stand-in numbers:
    # the command line is built, never run, here).
    ports = {i: GraphicsPorts(port=5900 + i, tls_port=None, websocket=None)
             for i, _ in enumerate(domain.graphics)}  # fmt: skip
    taps = {i: NicTap(fd=100 + i, ifname=f"ferry{i}")
            for i, nic in enumerate(domain.interfaces) if nic.type in ("bridge", "network")}
    with tempfile.TemporaryDirectory(prefix="fy-argv-") as tmp:
        run = Path(tmp)
        paths = RuntimePaths(run_dir=run, qmp_socket=run / "qmp.sock", pidfile=run / "pid")
        try:
            # The firmware Host.start would choose, and the images it would pass.
            domain = resolve_firmware(domain, load_descriptors())
            files = PassedFiles(firmware=("/dev/fdset/90", "/dev/fdset/91")[
                :2 if needs_nvram(domain.os) else 1] if domain.os.loader else ())
            to_qemu_argv(domain, paths=paths, kvm_usable=lambda: True, graphics_ports=ports,
                         nic_taps=taps, files=files)
        except FerryError as exc:
            return str(exc)
    return None


def survey(files: Iterable[Generated]) -> list[SurveyRow]:
    """:func:`survey_one` for each file."""
    return [survey_one(g) for g in files]


#: Configurations Ferry defines today (the unit test's floor; of them, the
#: e2e test's START_FLOOR is every one this test bed can start).
DEFINE_FLOOR = (
    "desktop-spice",
    "desktop-vnc-qxl",
    "server-headless",
    "server-minimal",
    "serial-tcp",
    "uefi",
    "uefi-tpm",
    "uefi-loader",
    "win11",
    "win10",
    "bridge-nic",
    "network-nic",
    "virtio-scsi",
    "multi-disk-nic",
    "hugepages-numa",
    "numa-two-cells",
    "cloud-init",
    "cloud-seed-iso",
    "i440fx",
    "i440fx-user-net",
    "i440fx-passthrough",
    "session-desktop",
    "session-server",
    "cpu-host-passthrough",
    "cpu-named",
    "guest-agent-path",
    "usb-redir",
    "watchdog",
    "cdrom-install",
    "pxe-install",
    "virtiofs",
    "iothreads-vcpus",
)

# ---------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(rows: Sequence[SurveyRow], started: dict[str, str] | None = None) -> str:
    """A text table: one line per file.

    Columns: define (accepted/refused), rt (round trip: equal model, nothing
    dropped), argv (Ferry builds the qemu command line it would start),
    start (from the e2e test, when given), # (distinct refusal causes), and
    the first problem.
    """
    lines = [f"{'config':22} {'define':9} {'rt':4} {'argv':5} "
             f"{'start':6} {'#':>2}  first problem / note"]  # fmt: skip
    for r in rows:
        rt = "-" if r.status != "accepted" else (
            "ok" if r.round_trip is None and not r.dropped else "BAD")
        argv = "-" if r.status != "accepted" else ("ok" if r.argv_error is None else "no")
        start = "-" if started is None else started.get(r.name, "-")
        if r.problems:
            note = r.problems[0].cause()
        elif r.internal:
            note = "INTERNAL: " + r.internal.strip().splitlines()[-1]
        elif r.dropped:
            note = "dropped: " + ", ".join(r.dropped)
        elif r.argv_error:
            note = "start: " + r.argv_error
        else:
            note = ""
        n = str(len({p.cause() for p in r.problems})) if r.problems else ""
        lines.append(f"{r.name:22} {r.status:9} {rt:4} {argv:5} {start:6} {n:>2}  "
                     f"{_short(note, 110)}")  # fmt: skip
    accepted = sum(r.status == "accepted" for r in rows)
    argv_ok = sum(r.status == "accepted" and r.argv_error is None for r in rows)
    lines.append(f"{accepted}/{len(rows)} define, {argv_ok} build a qemu command line"
                 + ("" if started is None else
                    f", {sum(v == 'yes' for v in started.values())} started"))  # fmt: skip
    return "\n".join(lines)


def causes(rows: Sequence[SurveyRow]) -> list[tuple[str, list[str]]]:
    """Refusal causes, most common first: ``(cause, [config names])``.

    ``start: …`` causes are those of building the qemu command line: of a
    file define accepts, or of what is left of a refused file once its
    define problems are taken out (the next thing its user would meet).
    """
    seen: dict[str, list[str]] = {}
    for r in rows:
        for p in r.problems:
            names = seen.setdefault(p.cause(), [])
            if r.name not in names:
                names.append(r.name)
        for error in (r.argv_error, r.peeled_argv_error):
            if error:
                cause = "start: " + re.sub(r"^domain \S+: ", "", error)
                seen.setdefault(re.sub(r"'/[^']*'", "'PATH'", cause), []).append(r.name)
    return sorted(seen.items(), key=lambda kv: (-len(kv[1]), kv[0]))


def format_causes(rows: Sequence[SurveyRow]) -> str:
    """:func:`causes` as text, one cause a line with its count and configs."""
    return "\n".join(f"{len(names):3}  {cause}\n       {' '.join(names)}"
                     for cause, names in causes(rows))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the corpus, survey it, print the table (``--json`` for a machine)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", metavar="DIR", help="generate into DIR and keep it")
    parser.add_argument("--json", action="store_true", help="one JSON object per file")
    parser.add_argument("--argv", action="store_true", help="print each virt-install argv")
    args = parser.parse_args(argv)
    reason = available()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if args.keep:
            root = Path(args.keep)
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fy-virtinst-")))
        corpus = generate(root)
        rows = survey(corpus.files)
        if args.json:
            for g, r in zip(corpus.files, rows, strict=True):
                print(json.dumps({"name": r.name, "status": r.status, "argv": g.argv,
                                  "problems": [p.__dict__ for p in r.problems],
                                  "dropped": r.dropped, "changed": r.changed,
                                  "argv_error": r.argv_error, "internal": r.internal}))  # fmt: skip
            return 0
        if args.argv:
            for g in corpus.files:
                print(f"# {g.name}: {g.config.what}\n{g.command()}\n")
        print(format_table(rows))
        print("\nrefusal causes, most common first:")
        print(format_causes(rows))
    return 0


if __name__ == "__main__":
    try:
        import ferry  # noqa: F401  (the venv's, or PYTHONPATH's)
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "packages"))
    raise SystemExit(main())
