"""The storage-copy plan (ferry.storage_copy): which disks, how, and the peer's plan checked."""

from __future__ import annotations

from typing import Any

import pytest

from ferry.domain import parse_domain
from ferry.errors import CookieError, MigrationRefused
from ferry.storage_copy import (
    DiskCopy,
    ImageInfo,
    block_export_add_args,
    copy_plan,
    create_image_argv,
    image_info_from_json,
    mirror_args,
    mirror_progress,
    nbd_client_args,
    nbd_server_start_args,
    select_disks,
)

XML = """<domain type='kvm'>
  <name>d</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/img/root.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='/img/data.raw'/><target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='/img/ro.raw'/><target dev='vdc' bus='virtio'/><readonly/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='/img/shared.raw'/><target dev='vdd' bus='virtio'/><shareable/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <target dev='hdc' bus='ide'/><readonly/></disk>
  </devices>
</domain>"""

INFOS = {
    "/img/root.qcow2": ImageInfo("qcow2", 8 << 30, "/base/debian.qcow2", "qcow2"),
    "/img/data.raw": ImageInfo("raw", 1 << 30),
}


def test_default_selection_is_every_writable_unshared_disk_with_a_source() -> None:
    d = parse_domain(XML)
    assert [x.target_dev for x in select_disks(d, None)] == ["vda", "vdb"]


def test_migrate_disks_picks_exactly_those_and_names_every_bad_one() -> None:
    d = parse_domain(XML)
    assert [x.target_dev for x in select_disks(d, ["vdb"])] == ["vdb"]
    with pytest.raises(MigrationRefused) as err:
        select_disks(d, ["vdb", "vdz", "vdc", "vdd", "hdc"])
    text = err.value.message
    assert "vdz: no such disk" in text and "vdc: cannot be copied: it is read-only" in text
    assert "vdd: cannot be copied: it is shareable" in text and "hdc: cannot be copied" in text
    assert "vdb:" not in text  # the good one is not a problem


def test_full_and_incremental_plans() -> None:
    d = parse_domain(XML)
    full = copy_plan(select_disks(d, None), INFOS, "all")
    assert [(c.target, c.format, c.virtual_size, c.shallow) for c in full] == [
        ("vda", "qcow2", 8 << 30, False), ("vdb", "raw", 1 << 30, False)]
    inc = copy_plan(select_disks(d, ["vda"]), INFOS, "inc")
    assert inc[0].shallow and inc[0].backing == "/base/debian.qcow2"
    assert create_image_argv(inc[0]) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", "/base/debian.qcow2", "-F", "qcow2",
        "/img/root.qcow2", str(8 << 30)]
    assert create_image_argv(full[1]) == ["qemu-img", "create", "-q", "-f", "raw",
                                          "/img/data.raw", str(1 << 30)]
    with pytest.raises(MigrationRefused, match="vdb: --copy-storage-inc needs an image with a "
                                               "backing file"):
        copy_plan(select_disks(d, None), INFOS, "inc")


def test_an_image_that_disagrees_with_its_xml_is_refused() -> None:
    d = parse_domain(XML)
    infos = dict(INFOS, **{"/img/data.raw": ImageInfo("qcow2", 1 << 30)})
    with pytest.raises(MigrationRefused, match="vdb: the image is qcow2, the XML says raw"):
        copy_plan(select_disks(d, None), infos, "all")


def test_qemu_img_info_json() -> None:
    info = image_info_from_json({"format": "qcow2", "virtual-size": 1024,
                                 "backing-filename": "b.qcow2",
                                 "full-backing-filename": "/x/b.qcow2",
                                 "backing-filename-format": "qcow2"})
    assert info == ImageInfo("qcow2", 1024, "/x/b.qcow2", "qcow2")
    with pytest.raises(ValueError):
        image_info_from_json({"format": "raw"})


def test_wire_round_trip_and_every_bad_field_refused() -> None:
    c = DiskCopy("vda", "/img/root.qcow2", "qcow2", 8 << 30, True, "/base/b.qcow2", "qcow2")
    assert DiskCopy.from_wire(c.to_wire()) == c
    good: dict[str, Any] = c.to_wire()
    for field, value in (("target", "../x"), ("target", 7), ("path", "rel/path"),
                         ("path", "/a\0b"), ("path", "/" + "a" * 5000), ("format", "vmdk"),
                         ("virtual_size", 0), ("virtual_size", True), ("virtual_size", 1 << 50),
                         ("shallow", "yes"), ("backing", None)):  # fmt: skip
        with pytest.raises(CookieError):
            DiskCopy.from_wire({**good, field: value})
    with pytest.raises(CookieError, match="backing given for a full copy"):
        DiskCopy.from_wire({**good, "shallow": False})
    with pytest.raises(CookieError):
        DiskCopy.from_wire(["not", "a", "map"])


def test_qmp_arguments() -> None:
    c = DiskCopy("vda", "/img/root.qcow2", "qcow2", 1 << 30)
    assert nbd_server_start_args(("10.0.0.2", 49300), "tls0") == {
        "addr": {"type": "inet", "data": {"host": "10.0.0.2", "port": "49300"}},
        "tls-creds": "tls0"}
    assert "tls-creds" not in nbd_server_start_args(("10.0.0.2", 1), None)
    assert nbd_server_start_args("/run/t/nbd.sock", None) == {
        "addr": {"type": "unix", "data": {"path": "/run/t/nbd.sock"}}}
    assert block_export_add_args(c, "drive-vda") == {
        "type": "nbd", "id": "ferry-vda", "node-name": "drive-vda", "name": "ferry-vda",
        "writable": True}
    client = nbd_client_args(c, ("10.0.0.2", 49300), "tls0")
    assert client["export"] == "ferry-vda" and client["node-name"] == "ferry-nbd-vda"
    assert client["server"] == {"type": "inet", "host": "10.0.0.2", "port": "49300"}
    unix = nbd_client_args(c, "/run/t/nbd.sock", None)
    assert unix["server"] == {"type": "unix", "path": "/run/t/nbd.sock"} and "tls-creds" not in unix
    m = mirror_args(c, "drive-vda", synchronous_writes=True, speed=1 << 20)
    assert m["sync"] == "full" and m["copy-mode"] == "write-blocking" and m["speed"] == 1 << 20
    assert m["target"] == "ferry-nbd-vda" and m["auto-dismiss"] is False
    shallow = DiskCopy("vda", "/i", "qcow2", 1, True, "/b", "qcow2")
    assert mirror_args(shallow, "n", synchronous_writes=False)["sync"] == "top"


def test_mirror_progress() -> None:
    copies = [DiskCopy("vda", "/a", "raw", 100), DiskCopy("vdb", "/b", "raw", 300)]
    jobs = [{"device": "ferry-mirror-vda", "offset": 100, "len": 100, "ready": True,
             "status": "ready"},
            {"device": "ferry-mirror-vdb", "offset": 50, "len": 300, "ready": False,
             "status": "running"}]  # fmt: skip
    p = mirror_progress(copies, jobs)
    assert (p.copied, p.total, p.ready, p.failed) == (150, 400, False, ())
    jobs[1].update(offset=300, ready=True, status="ready")
    assert mirror_progress(copies, jobs).ready
    gone = mirror_progress(copies, jobs[:1])
    assert not gone.ready and gone.failed == ("vdb: mirror job is gone",)
    jobs[1].update(status="concluded", ready=False, error="Input/output error")
    assert mirror_progress(copies, jobs).failed == (
        "vdb: mirror concluded: Input/output error",)
    assert not mirror_progress([], []).ready
