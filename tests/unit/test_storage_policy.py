"""The storage path policy, the host name rule and the fds qemu gets instead of paths."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from ferry.config import AgentConfig, PathsConfig, parse_config
from ferry.domain import PassedFiles, RuntimePaths, parse_domain, to_qemu_argv
from ferry.errors import ConfigError, NameInvalid, PathNotAllowed, QemuLaunchError, XMLError
from ferry.names import check_domain_names, check_name_fits, name_limit
from ferry.storage_policy import (
    SETTING,
    StoragePolicy,
    check_domain,
    domain_paths,
    open_domain_files,
)

UUID = "0b1c2d3e-0000-4000-8000-000000000001"


def dom(devices: str = "", *, name: str = "t", os_extra: str = "") -> str:
    return (
        "<domain type='qemu'>\n"
        f"  <name>{name}</name>\n"
        "  <memory unit='MiB'>64</memory>\n"
        f"  <os><type arch='x86_64' machine='pc'>hvm</type>{os_extra}</os>\n"
        f"  <devices>{devices}<memballoon model='none'/></devices>\n"
        "</domain>\n"
    )


def disk(path: str, dev: str = "vda", extra: str = "") -> str:
    return (f"<disk type='file' device='disk'><source file='{path}'/>"
            f"<target dev='{dev}' bus='virtio'/>{extra}</disk>")  # fmt: skip


def config(allowed: list[str], run_dir: str = "/run/ferry") -> AgentConfig:
    return parse_config({"host": {"uuid": UUID}, "paths": {"run_dir": run_dir},
                         "storage": {"allowed": allowed}})  # fmt: skip


# -- what the model can name ------------------------------------------------------


def test_domain_paths_names_every_host_path() -> None:
    d = parse_domain(dom(
        disk("/img/a.raw") + disk("/img/b.raw", "vdb", "<readonly/>")
        + "<disk type='file' device='cdrom'><target dev='hdc' bus='ide'/></disk>"
        + "<serial type='file'><source path='/logs/s.log'/></serial>"
        + "<serial type='unix'><source mode='bind'/><target port='1'/></serial>"
        + "<console type='unix'><source mode='connect' path='/socks/c.sock'/>"
        "<target type='virtio'/></console>"
        + "<channel type='unix'><source mode='bind' path='/socks/ch.sock'/>"
        "<target type='virtio' name='org.x'/></channel>"
        + "<serial type='pty'><target port='2'/></serial>",
        os_extra="<kernel>/boot/k</kernel><initrd>/boot/i</initrd>",
    ))  # fmt: skip
    got = [(p.element, p.path, p.kind, p.writable) for p in domain_paths(d)]
    assert got == [
        ("domain/os/kernel", "/boot/k", "kernel", False),
        ("domain/os/initrd", "/boot/i", "initrd", False),
        ("domain/devices/disk[vda]/source", "/img/a.raw", "disk", True),
        ("domain/devices/disk[vdb]/source", "/img/b.raw", "disk", False),
        ("domain/devices/serial[0]/source", "/logs/s.log", "file", False),
        ("domain/devices/console[0]/source", "/socks/c.sock", "socket", False),
        ("domain/devices/channel[0]/source", "/socks/ch.sock", "socket", False),
    ]


# -- the decision (resolver injected: no file system) -----------------------------


def fake_resolver(links: dict[str, str]) -> Callable[[str], str]:
    def resolve(path: str) -> str:
        for link, target in links.items():
            if path == link or path.startswith(link + "/"):
                return target + path[len(link):]
        return path

    return resolve


def test_etc_shadow_as_a_disk_is_refused_naming_element_path_and_setting() -> None:
    policy = StoragePolicy(["/var/lib/ferry/images", "/var/lib/libvirt/images"])
    d = parse_domain(dom(disk("/etc/shadow")))
    with pytest.raises(PathNotAllowed) as info:
        policy.check(d, "define")
    assert str(info.value) == (
        "define: domain/devices/disk[vda]/source: disk path '/etc/shadow' is outside "
        "[storage] allowed (/var/lib/ferry/images, /var/lib/libvirt/images)"
    )
    assert info.value.code == "path-not-allowed"
    assert info.value.details == {"element": "domain/devices/disk[vda]/source",
                                  "path": "/etc/shadow", "resolved": "/etc/shadow",
                                  "setting": SETTING}  # fmt: skip


def test_symlinks_are_resolved_before_the_check() -> None:
    resolve = fake_resolver({"/images/evil.raw": "/etc/shadow", "/var/run": "/run"})
    policy = StoragePolicy(["/images", "/var/run/vm"], resolve=resolve)
    assert policy.allowed == ("/images", "/run/vm")
    with pytest.raises(PathNotAllowed, match=r"'/images/evil.raw' \(resolves to '/etc/shadow'\)"):
        policy.check(parse_domain(dom(disk("/images/evil.raw"))))
    policy.check(parse_domain(dom(disk("/run/vm/good.raw"))))  # an allowed dir, spelt resolved
    policy.check(parse_domain(dom(disk("/images/sub/ok.qcow2"))))


def test_prefix_is_a_directory_not_a_string_prefix() -> None:
    policy = StoragePolicy(["/images"])
    with pytest.raises(PathNotAllowed):
        policy.check(parse_domain(dom(disk("/images-other/x.raw"))))
    assert policy.permits("/images", "disk")  # an entry may name one file or device


def test_kernel_initrd_and_chardevs_are_checked() -> None:
    policy = StoragePolicy(["/images"], "/run/ferry/serial/t")
    for xml, element in (
        (dom(os_extra="<kernel>/boot/vmlinuz</kernel>"), "domain/os/kernel"),
        (dom(os_extra="<kernel>/images/k</kernel><initrd>/root/i</initrd>"), "domain/os/initrd"),
        (dom("<serial type='file'><source path='/etc/cron.d/x'/></serial>"),
         "domain/devices/serial[0]/source"),
        (dom("<channel type='unix'><source mode='connect' path='/run/ferry/source.sock'/>"
             "<target type='virtio' name='x'/></channel>"), "domain/devices/channel[0]/source"),
    ):  # fmt: skip
        with pytest.raises(PathNotAllowed, match=re.escape(f"{element}: ")) as info:
            policy.check(parse_domain(xml))
        assert info.value.details["element"] == element


def test_sockets_in_the_domains_own_directory_are_allowed() -> None:
    policy = StoragePolicy([], "/run/ferry/serial/t")
    policy.check(parse_domain(dom(
        "<serial type='unix'><source mode='bind' path='/run/ferry/serial/t/s.sock'/></serial>"
        "<serial type='unix'><source mode='bind'/><target port='1'/></serial>"
    )))  # fmt: skip
    # ...but not another domain's, nor an image there.
    with pytest.raises(PathNotAllowed, match="or the domain's socket directory"):
        policy.check(parse_domain(dom(
            "<serial type='unix'><source mode='connect' path='/run/ferry/serial/u/s.sock'/>"
            "</serial>")))  # fmt: skip
    with pytest.raises(PathNotAllowed, match=r"outside \[storage\] allowed \(nothing\)$"):
        policy.check(parse_domain(dom(disk("/run/ferry/serial/t/disk.raw"))))


def test_check_domain_uses_the_config() -> None:
    cfg = config(["/images"])
    check_domain(parse_domain(dom(disk("/images/a.raw"))), cfg)
    with pytest.raises(PathNotAllowed):
        check_domain(parse_domain(dom(disk("/etc/shadow"))), cfg)


def test_storage_config() -> None:
    base = {"host": {"uuid": UUID}}
    assert [str(p) for p in parse_config(base).storage.allowed] == [
        "/var/lib/ferry/images", "/var/lib/libvirt/images"]  # fmt: skip
    assert parse_config({**base, "storage": {"allowed": []}}).storage.allowed == ()
    for bad in ("images", "/a/../etc", "/a//b"):
        with pytest.raises(ConfigError, match=r"\[storage\] allowed"):
            parse_config({**base, "storage": {"allowed": [bad]}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({**base, "storage": {"alowed": ["/x"]}})


# -- opening: what qemu gets is what was checked -----------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "images" / "a.raw").write_bytes(b"\0" * 4096)
    (tmp_path / "outside" / "secret").write_text("secret")
    (tmp_path / "images" / "k.elf").write_bytes(b"\x7fELF")
    return tmp_path


def test_files_are_opened_and_passed_as_fds(tree: Path) -> None:
    cfg = config([str(tree / "images")])
    d = parse_domain(dom(disk(str(tree / "images/a.raw"))
                         + disk(str(tree / "images/a.raw"), "vdb", "<readonly/><shareable/>"),
                         os_extra=f"<kernel>{tree}/images/k.elf</kernel>"))  # fmt: skip
    with open_domain_files(d, cfg) as files:
        assert len(files.fds) == 3
        kfd, afd, bfd = files.fds
        assert os.readlink(f"/proc/self/fd/{afd}") == str(tree / "images/a.raw")
        assert os.fstat(afd).st_mode and (os.get_blocking(afd))
        assert files.passed == PassedFiles(
            fd_sets=((afd, 1, "disk-vda"), (bfd, 2, "disk-vdb")),
            disks=(("vda", "/dev/fdset/1"), ("vdb", "/dev/fdset/2")),
            kernel=f"/proc/self/fd/{kfd}",
        )
        import fcntl

        assert fcntl.fcntl(afd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        assert fcntl.fcntl(bfd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        argv = " ".join(to_qemu_argv(d, paths=RuntimePaths(Path("/r"), Path("/r/q"), Path("/r/p")),
                                     files=files.passed))  # fmt: skip
        assert f"-add-fd fd={afd},set=1,opaque=disk-vda" in argv
        assert f"-kernel /proc/self/fd/{kfd}" in argv
        assert "-blockdev driver=file,filename=/dev/fdset/1,node-name=virtio-disk0-storage " \
            in argv
        assert "filename=/dev/fdset/2,node-name=virtio-disk1-storage,read-only=on" in argv
        assert "auto-read-only" not in argv and str(tree) not in argv
    assert files.fds == []
    with pytest.raises(OSError):
        os.fstat(afd)


def test_a_symlink_inside_the_allowed_dir_pointing_outside_is_refused(tree: Path) -> None:
    os.symlink(tree / "outside/secret", tree / "images/evil.raw")
    cfg = config([str(tree / "images")])
    d = parse_domain(dom(disk(str(tree / "images/evil.raw"))))
    with pytest.raises(PathNotAllowed, match=f"resolves to '{tree}/outside/secret'"):
        open_domain_files(d, cfg)
    # A link that stays inside is followed, and the real file is opened.
    os.symlink(tree / "images/a.raw", tree / "images/good.raw")
    with open_domain_files(parse_domain(dom(disk(str(tree / "images/good.raw")))),
                           cfg) as files:  # fmt: skip
        assert os.readlink(f"/proc/self/fd/{files.fds[0]}") == str(tree / "images/a.raw")


def _racing(swap: Callable[[], None]) -> Callable[[str], str]:
    """A resolver that answers truthfully, then lets the attacker move things."""

    def resolve(path: str) -> str:
        resolved = os.path.realpath(path)
        if "images" in path and path.endswith(".raw"):
            swap()
        return resolved

    return resolve


def test_a_symlink_swapped_in_after_the_check_is_refused(tree: Path) -> None:
    image = tree / "images/a.raw"

    def swap() -> None:
        image.unlink()
        os.symlink(tree / "outside/secret", image)

    policy = StoragePolicy([tree / "images"], resolve=_racing(swap))
    d = parse_domain(dom(disk(str(image))))
    with pytest.raises(PathNotAllowed, match="became a symlink after it was checked"):
        open_domain_files(d, config([]), policy=policy)


def test_a_directory_swapped_after_the_check_is_caught_by_the_opened_fd(tree: Path) -> None:
    (tree / "images/sub").mkdir()
    (tree / "images/sub/x.raw").write_bytes(b"\0")
    (tree / "outside/x.raw").write_text("secret")

    def swap() -> None:
        os.rename(tree / "images/sub", tree / "images/old")
        os.symlink(tree / "outside", tree / "images/sub")

    policy = StoragePolicy([tree / "images"], resolve=_racing(swap))
    d = parse_domain(dom(disk(str(tree / "images/sub/x.raw"))))
    with pytest.raises(PathNotAllowed, match=f"opened as '{tree}/outside/x.raw'"):
        open_domain_files(d, config([]), policy=policy)


def test_a_fifo_or_missing_file_is_an_error_not_a_hang(tree: Path) -> None:
    os.mkfifo(tree / "images/fifo.raw")
    cfg = config([str(tree / "images")])
    with pytest.raises(QemuLaunchError, match="is not a regular file"):
        open_domain_files(parse_domain(dom(disk(str(tree / "images/fifo.raw")))), cfg)
    with pytest.raises(QemuLaunchError, match="No such file"):
        open_domain_files(parse_domain(dom(disk(str(tree / "images/none.raw")))), cfg)


# -- names that are valid are names that work ---------------------------------------


def test_name_limit_follows_the_run_dir() -> None:
    assert name_limit(PathsConfig(run_dir=Path("/run/ferry")))[0] == 107 - 15 - 17
    # Even the shortest run dir leaves less than the 200 bytes of the file name rule.
    assert name_limit(PathsConfig(run_dir=Path("/r")))[0] == 107 - 6 - 1 - 17
    check_name_fits("x" * 75, PathsConfig())


def test_a_200_character_name_is_refused_with_the_reason() -> None:
    name = "x" * 200
    d = parse_domain(dom(name=name))  # the host-independent rule allows it...
    with pytest.raises(NameInvalid) as info:
        check_domain_names(d, PathsConfig(), where="define")  # ...this host does not
    assert str(info.value) == (
        "define: domain/name: domain name is 200 bytes long (UTF-8); on this host at most "
        "75 bytes fit: the QMP socket /run/ferry/qmp/NAME.destination.sock must fit in the "
        "107-byte unix socket path limit (a shorter [paths] run_dir leaves more room)"
    )
    assert info.value.code == "name-invalid" and isinstance(info.value, XMLError)


def test_a_name_of_100_emoji_is_refused_by_its_byte_length() -> None:
    with pytest.raises(NameInvalid, match=r"domain name is 400 bytes long \(UTF-8\), longer "
                                          r"than 200 bytes"):  # fmt: skip
        parse_domain(dom(name="\U0001f600" * 100))
    # A few emoji are a fine name.
    check_name_fits(parse_domain(dom(name="\U0001f600" * 5)).name, PathsConfig())


@pytest.mark.parametrize("char", ["\u202e", "\u202a", "\u2066", "\u2069", "\u200e", "\u200f",
                                  "\u061c", "\ufeff", "\u200b", "\u2028", "\x85"])  # fmt: skip
def test_bidi_and_invisible_characters_are_refused(char: str) -> None:
    with pytest.raises(NameInvalid) as info:
        parse_domain(dom(name=f"web{char}gnp.exe"))
    assert f"U+{ord(char):04X}" in str(info.value) or "control character" in str(info.value)
    assert char not in str(info.value)  # the message itself cannot be spoofed


def test_right_to_left_override_message() -> None:
    with pytest.raises(NameInvalid) as info:
        parse_domain(dom(name="vm\u202eevil"))
    assert "contains U+202E (a bidirectional override, isolate or mark" in str(info.value)
    with pytest.raises(NameInvalid):
        parse_domain(dom()).renamed("a\u2067b")


def test_default_chardev_sockets_must_fit() -> None:
    d = parse_domain(dom("<channel type='unix'><target type='virtio' name='org.qemu.guest_agent"
                         ".0'/></channel>", name="n" * 64))  # fmt: skip
    with pytest.raises(NameInvalid, match=r"domain/devices/channel\[0\]: its socket "
                                          r"/run/ferry/serial/n+/org.qemu.guest_agent.0.sock "
                                          r"would be 110 bytes long"):  # fmt: skip
        check_domain_names(d, PathsConfig())
    check_domain_names(parse_domain(dom("<serial type='unix'/>", name="n" * 64)), PathsConfig())
