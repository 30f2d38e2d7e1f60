"""What virt-manager and virt-install write besides controllers, NICs and displays (issue 14).

``<features>`` vmport/smm/kvm/hyperv, the hypervclock timer, ``<vcpu current>``,
``<iothreads>``, ``<memoryBacking>`` source/access/hugepages, sound, redirdev,
watchdog, panic, the spicevmc channel, guest-agent channels at libvirt's
runtime path, ``<alias>`` and channel ``target@state``: each parsed, formatted
back without losing anything, turned into qemu arguments, compared by the ABI
check, and (where qemu is installed) started by a real qemu.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from virtinst_corpus import dropped

import ferry.domain.argv as argv_mod
from ferry.domain import (
    GraphicsPorts,
    RuntimePaths,
    check_abi_stability,
    format_domain,
    kvm_usable,
    parse_domain,
    to_qemu_argv,
)
from ferry.domain.argv import live_sockets, unplaced_sockets
from ferry.domain.model import Domain
from ferry.errors import ABIError, MigrationRefused, QemuLaunchError, XMLError, XMLUnsupported
from ferry.flags import MigrationFlags
from ferry.storage_policy import domain_paths
from ferry_source.checks import is_allowed, unmigratable

PATHS = RuntimePaths(Path("/run/ferry/serial/vm"), Path("/run/ferry/q.sock"),
                     Path("/run/ferry/vm.pid"))


def dom(devices: str = "", *, extra: str = "", machine: str = "q35", vcpu: str = "<vcpu>2</vcpu>",
        virt: str = "kvm") -> str:
    return f"""<domain type='{virt}'>
  <name>vm</name>
  <uuid>00000000-0000-0000-0000-0000000000aa</uuid>
  <memory unit='KiB'>65536</memory>
  {vcpu}
  <os><type arch='x86_64' machine='{machine}'>hvm</type></os>
  {extra}
  <devices>
    {devices}
  </devices>
</domain>
"""


def refused(text: str, cls: type[XMLError] = XMLError) -> XMLError:
    with pytest.raises(cls) as info:
        parse_domain(text, where="t.xml")
    return info.value


def round_trip(text: str) -> Domain:
    """Parse, format, parse: equal models, a fixed point, nothing dropped or changed."""
    d = parse_domain(text, where="t.xml")
    out = format_domain(d)
    again = parse_domain(out, where="formatted")
    assert again == d
    assert format_domain(again) == out
    assert dropped(text, out) == ([], []), out
    check_abi_stability(d, again)
    return d


def argv_of(d: Domain, **kw: Any) -> str:
    kw.setdefault("kvm_usable", lambda: True)
    return " ".join(to_qemu_argv(d, paths=PATHS, **kw))


# -- features and clock ---------------------------------------------------------

WINDOWS_FEATURES = """<features>
    <acpi/>
    <apic/>
    <hyperv mode='custom'>
      <relaxed state='on'/>
      <vapic state='on'/>
      <spinlocks state='on' retries='8191'/>
      <vpindex state='on'/>
      <runtime state='on'/>
      <synic state='on'/>
      <stimer state='on'>
        <direct state='on'/>
      </stimer>
      <reset state='off'/>
      <vendor_id state='on' value='KVM Hv'/>
      <frequencies state='on'/>
      <tlbflush state='on'/>
      <ipi state='on'/>
    </hyperv>
    <kvm>
      <hidden state='on'/>
    </kvm>
    <vmport state='off'/>
    <smm state='on'/>
  </features>
  <clock offset='localtime'>
    <timer name='rtc' tickpolicy='catchup'/>
    <timer name='pit' tickpolicy='delay'/>
    <timer name='hpet' present='no'/>
    <timer name='hypervclock' present='yes'/>
  </clock>"""


def test_windows_features_and_timers_round_trip_and_reach_the_cpu() -> None:
    d = round_trip(dom(extra=WINDOWS_FEATURES))
    f = d.features
    assert f.vmport is False and f.smm is True and f.kvm == (("hidden", True),)
    assert f.hyperv_mode == "custom"
    assert [(h.name, h.state) for h in f.hyperv][:3] == [("relaxed", True), ("vapic", True),
                                                         ("spinlocks", True)]
    assert f.hyperv[2].retries == 8191 and f.hyperv[6].direct is True
    args = argv_of(d)
    assert "-machine q35,accel=kvm,usb=off,dump-guest-core=off,acpi=on,hpet=off,vmport=off," \
           "smm=on" in args
    full = to_qemu_argv(d, paths=PATHS, kvm_usable=lambda: True)
    cpu = full[full.index("-cpu") + 1]
    assert cpu == ("qemu64,kvm=off,hv-time=on,hv-relaxed=on,hv-vapic=on,hv-spinlocks=0x1fff,"
                   "hv-vpindex=on,hv-runtime=on,hv-synic=on,hv-stimer=on,hv-stimer-direct=on,"
                   "hv-vendor-id=KVM Hv,hv-frequencies=on,hv-tlbflush=on,hv-ipi=on")
    assert "-rtc base=localtime,driftfix=slew" in args
    assert "kvm-pit.lost_tick_policy=delay" in args


def test_hyperv_passthrough_and_kvm_hints() -> None:
    d = round_trip(dom(extra="<features><hyperv mode='passthrough'/><kvm>"
                             "<hint-dedicated state='on'/><poll-control state='off'/></kvm>"
                             "</features>"))
    assert "-cpu qemu64,kvm-hint-dedicated=on,kvm-poll-control=off,hv-passthrough=on" \
        in argv_of(d)
    # Under TCG there are no KVM or Hyper-V enlightenments (as with kvmclock).
    tcg = dataclasses.replace(d, virt_type="qemu")
    assert "hv-" not in argv_of(tcg) and "-cpu" not in argv_of(tcg)


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ("<vmport/>", "<vmport> needs state='on' or state='off'"),
        ("<vmport state='auto'/>", "state 'auto' is not supported"),
        ("<hyperv><spinlocks state='on'/></hyperv>", "needs retries"),
        ("<hyperv><spinlocks state='on' retries='10'/></hyperv>", "out of range"),
        ("<hyperv><spinlocks state='off' retries='9000'/></hyperv>", "retries applies to"),
        ("<hyperv><relaxed state='on' retries='9000'/></hyperv>",
         "attribute 'retries' is not supported"),
        ("<hyperv><vendor_id state='on' value='far too long a name'/></hyperv>",
         "needs a value of 1 to 12"),
        ("<hyperv><relaxed state='on'/><relaxed state='off'/></hyperv>", "more than once"),
        ("<hyperv mode='magic'/>", "hyperv mode 'magic' is not supported"),
        ("<kvm><hidden state='on'/><hidden state='off'/></kvm>", "more than once"),
    ],
)
def test_feature_mistakes_are_reported(features: str, message: str) -> None:
    err = refused(dom(extra=f"<features>{features}</features>"))
    assert message in str(err)


def test_unknown_hyperv_and_kvm_children_are_refused() -> None:
    err = refused(dom(extra="<features><hyperv><magic state='on'/></hyperv></features>"),
                  XMLUnsupported)
    assert err.details["element"] == "domain/features/hyperv/magic"
    err = refused(dom(extra="<features><kvm><dirty-ring state='on' size='4096'/></kvm>"
                            "</features>"), XMLUnsupported)
    assert err.details["element"] == "domain/features/kvm/dirty-ring"


def test_abi_compares_the_guest_visible_features() -> None:
    d = parse_domain(dom(extra=WINDOWS_FEATURES))
    for changed, field in (
        (dataclasses.replace(d.features, vmport=True), "feature vmport"),
        (dataclasses.replace(d.features, kvm=()), "feature kvm"),
        (dataclasses.replace(d.features, hyperv=d.features.hyperv[1:]), "feature hyperv"),
    ):
        with pytest.raises(ABIError) as info:
            check_abi_stability(d, dataclasses.replace(d, features=changed))
        assert info.value.details["field"] == field
    timers = tuple(t for t in d.clock.timers if t.name != "hypervclock")
    with pytest.raises(ABIError):
        check_abi_stability(d, dataclasses.replace(d, clock=dataclasses.replace(
            d.clock, timers=timers)))


def test_hyperv_passthrough_cannot_migrate_but_custom_can() -> None:
    d = parse_domain(dom(extra="<features><hyperv mode='passthrough'/></features>"))
    assert unmigratable(d) and "hv-passthrough" in unmigratable(d)[0]
    with pytest.raises(MigrationRefused) as info:
        is_allowed(d, MigrationFlags(0), [], "running")
    assert "cannot migrate domain 'vm'" in str(info.value)
    assert unmigratable(parse_domain(dom(extra=WINDOWS_FEATURES))) == []


# -- vcpus, iothreads, memory backing ------------------------------------------------


def test_vcpu_current_and_iothreads() -> None:
    d = round_trip(dom(
        "<disk type='file'><driver name='qemu' type='raw' iothread='2'/>"
        "<source file='/img/a.img'/><target dev='vda' bus='virtio'/></disk>",
        vcpu="<vcpu placement='static' current='2'>4</vcpu>", extra="<iothreads>2</iothreads>"))
    assert (d.vcpus, d.vcpus_current, d.online_vcpus, d.iothreads) == (4, 2, 2, 2)
    assert d.disks[0].iothread == 2
    args = argv_of(d)
    assert "-smp 2,maxcpus=4,sockets=4,cores=1,threads=1" in args
    assert "-object iothread,id=iothread1 -object iothread,id=iothread2" in args
    assert "iothread=iothread2" in args
    with pytest.raises(ABIError) as info:
        check_abi_stability(d, dataclasses.replace(d, vcpus_current=3))
    assert info.value.details["field"] == "vcpus online"
    # iothreads are host side: a destination may use others.
    check_abi_stability(d, dataclasses.replace(d, iothreads=4))


def test_vcpu_current_with_a_topology() -> None:
    d = round_trip(dom(vcpu="<vcpu current='1'>4</vcpu>",
                       extra="<cpu><topology sockets='1' cores='2' threads='2'/></cpu>"))
    assert "-smp 1,maxcpus=4,sockets=1,cores=2,threads=2" in argv_of(d)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (dom(vcpu="<vcpu current='3'>2</vcpu>"), "current vCPUs 3 is more than the maximum 2"),
        (dom("<disk type='file'><driver name='qemu' iothread='1'/><source file='/i/a'/>"
             "<target dev='vda' bus='virtio'/></disk>"), "iothread 1 does not exist"),
        (dom("<disk type='file'><driver name='qemu' iothread='1'/><source file='/i/a'/>"
             "<target dev='sda' bus='sata'/></disk>", extra="<iothreads>1</iothreads>"),
         "iothread applies to virtio disks only"),
        (dom(extra="<iothreads>lots</iothreads>"), "not a non-negative integer"),
    ],
)
def test_vcpu_and_iothread_mistakes(text: str, message: str) -> None:
    assert message in str(refused(text))


def test_memfd_shared_memory() -> None:
    d = round_trip(dom(extra="<memoryBacking><source type='memfd'/><access mode='shared'/>"
                             "</memoryBacking>"))
    assert (d.memory_source, d.memory_access, d.hugepages) == ("memfd", "shared", False)
    args = argv_of(d)
    assert "-object memory-backend-memfd,id=pc.ram,size=67108864,share=on -m 64" in args
    assert "memory-backend=pc.ram" in args
    # Host side: a destination may back the same RAM differently.
    check_abi_stability(d, dataclasses.replace(d, memory_source=None, memory_access=None))
    pre = round_trip(dom(extra="<memoryBacking><access mode='shared'/>"
                               "<allocation mode='immediate'/></memoryBacking>"))
    assert "memory-backend-ram,id=pc.ram,size=67108864,share=on,prealloc=on" in argv_of(pre)


def test_hugepages(monkeypatch: pytest.MonkeyPatch) -> None:
    d = round_trip(dom(extra="<memoryBacking><hugepages/></memoryBacking>"))
    sized = round_trip(dom(extra="<memoryBacking><hugepages><page size='2048' unit='KiB'/>"
                                 "</hugepages></memoryBacking>"))
    assert parse_domain(dom(extra="<memoryBacking><hugepages><page size='2' unit='M'/>"
                                  "</hugepages></memoryBacking>")) == sized
    assert d.hugepages and d.hugepage_kib is None and sized.hugepage_kib == 2048
    monkeypatch.setattr(argv_mod, "_default_hugepage_kib", lambda: 2048)
    monkeypatch.setattr(argv_mod, "_free_hugepages", lambda kib: 32)
    assert ("memory-backend-memfd,id=pc.ram,size=67108864,hugetlb=on,hugetlbsize=2097152"
            in argv_of(sized))
    monkeypatch.setattr(argv_mod, "_free_hugepages", lambda kib: 3)
    with pytest.raises(QemuLaunchError, match=r"needs 32 huge pages of 2048 KiB, this host has "
                                              r"3 free \(reserve them"):
        argv_of(d)
    monkeypatch.setattr(argv_mod, "_free_hugepages", lambda kib: None)
    with pytest.raises(QemuLaunchError, match="does not offer"):
        argv_of(d)
    err = refused(dom(extra="<memoryBacking><hugepages><page size='4' unit='KiB'/></hugepages>"
                            "</memoryBacking>"), XMLUnsupported)
    assert "huge page size 4 KiB" in str(err)


# -- devices ---------------------------------------------------------------------------

SPICE = "<graphics type='spice' autoport='no' port='5930'/><video><model type='qxl'/></video>"


def test_sound_cards_and_their_audio_backend() -> None:
    d = round_trip(dom(SPICE + "<sound model='ich9'/>"
                       "<sound model='ich6'><codec type='micro'/><codec type='output'/></sound>"
                       "<sound model='ac97'/>"))
    assert [(s.model, s.codecs) for s in d.sounds] == [
        ("ich9", ()), ("ich6", ("micro", "output")), ("ac97", ())]
    args = argv_of(d)
    assert "-audiodev spice,id=audio1 -device ich9-intel-hda,id=sound0," in args
    assert "-device hda-duplex,id=sound0-codec0,bus=sound0.0,cad=0,audiodev=audio1" in args
    assert "-device hda-micro,id=sound1-codec0,bus=sound1.0,cad=0,audiodev=audio1 " \
           "-device hda-output,id=sound1-codec1,bus=sound1.0,cad=1,audiodev=audio1" in args
    assert "-device AC97,id=sound2,audiodev=audio1," in args
    assert args.count("-audiodev") == 1
    # Without spice the default backend is none; an <audio> element names its own.
    vnc = parse_domain(dom("<graphics type='vnc'/><sound model='ich9'/>"))
    assert "-audiodev none,id=audio1" in argv_of(vnc)
    own = round_trip(dom(SPICE + "<sound model='ich9'><audio id='2'/></sound>"
                         "<audio id='2' type='none'/>"))
    assert "-audiodev none,id=audio2" in argv_of(own)
    with pytest.raises(ABIError):
        check_abi_stability(d, dataclasses.replace(d, sounds=d.sounds[:2]))


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ("<sound model='ich9'/><audio id='1' type='pulseaudio'/>", "host's sound system"),
        ("<sound model='ich9'><audio id='3'/></sound>", "<audio id='3'>, which is not defined"),
        ("<sound model='ich9'/><audio id='1' type='spice'/>", "needs spice graphics"),
    ],
)
def test_sound_backends_that_cannot_start(devices: str, message: str) -> None:
    d = parse_domain(dom(devices))
    with pytest.raises(XMLUnsupported, match=message):
        argv_of(d)


def test_sound_mistakes() -> None:
    assert "sound model 'sb16' is not supported" in str(refused(dom("<sound model='sb16'/>")))
    assert "ac97 card has no HDA codecs" in str(
        refused(dom("<sound model='ac97'><codec type='duplex'/></sound>")))


def test_usb_redirection() -> None:
    d = round_trip(dom(SPICE + "<redirdev bus='usb' type='spicevmc'/>"
                       "<redirdev bus='usb' type='tcp'><source mode='connect' host='127.0.0.1' "
                       "service='4000'/><protocol type='raw'/>"
                       "<address type='usb' bus='0' port='3'/></redirdev>"))
    assert [(r.type, r.host, r.service) for r in d.redirdevs] == [
        ("spicevmc", None, None), ("tcp", "127.0.0.1", 4000)]
    args = argv_of(d)
    assert "-device qemu-xhci,id=usb," in args  # the implicit USB controller
    assert "-chardev spicevmc,id=charredir0,name=usbredir " \
           "-device usb-redir,chardev=charredir0,id=redir0,bus=usb.0" in args
    assert "-chardev socket,id=charredir1,host=127.0.0.1,port=4000,reconnect=1 " \
           "-device usb-redir,chardev=charredir1,id=redir1,bus=usb.0,port=3" in args
    assert unmigratable(d) == []  # qemu migrates usb-redir, client or not
    with pytest.raises(XMLUnsupported, match="needs spice graphics"):
        argv_of(parse_domain(dom("<redirdev bus='usb' type='spicevmc'/>")))
    assert "needs <source host" in str(refused(dom("<redirdev bus='usb' type='tcp'/>")))
    assert "takes no <source>" in str(refused(dom(
        "<redirdev bus='usb' type='spicevmc'><source host='a' service='1'/></redirdev>")))


def test_watchdogs_and_panic() -> None:
    d = round_trip(dom("<watchdog model='i6300esb' action='poweroff'/><panic model='isa'>"
                       "<address type='isa' iobase='0x505'/></panic>"))
    args = argv_of(d)
    assert "-device i6300esb,id=watchdog0,bus=pcie.0," in args
    assert "-action watchdog=poweroff" in args and "-device pvpanic,ioport=1285" in args
    itco = round_trip(dom("<watchdog model='itco' action='reset'/><panic model='hyperv'/>"))
    args = argv_of(itco)
    assert "-global ICH9-LPC.noreboot=off" in args and "-action watchdog=reset" in args
    assert "hv-crash=on" in args and "pvpanic" not in args
    ib700 = round_trip(dom("<watchdog model='ib700'/>", machine="pc"))
    assert "-device ib700,id=watchdog0 -action watchdog=reset" in argv_of(ib700)
    assert "part of the q35 machine" in str(refused(dom("<watchdog model='itco'/>",
                                                        machine="pc")))
    # dump (issue 16): qemu pauses, ferry-source dumps and resumes (agents/ferry_source/save.py)
    dump = round_trip(dom("<watchdog model='ib700' action='dump'/>", machine="pc"))
    assert dump.watchdogs[0].action == "dump"
    assert "-device ib700,id=watchdog0 -action watchdog=pause" in argv_of(dump)
    assert "watchdog action 'explode'" in str(
        refused(dom("<watchdog model='ib700' action='explode'/>")))
    with pytest.raises(ABIError):
        check_abi_stability(d, dataclasses.replace(d, panics=()))


def test_spice_agent_channel() -> None:
    d = round_trip(dom(SPICE + "<channel type='spicevmc'><target type='virtio' "
                       "name='com.redhat.spice.0'/></channel>"))
    c = d.channels[0]
    assert (c.type, c.target_name) == ("spicevmc", "com.redhat.spice.0")
    assert "-chardev spicevmc,id=charchannel0,name=vdagent -device virtserialport," \
           "bus=virtio-serial0.0,nr=1,chardev=charchannel0,id=channel0," \
           "name=com.redhat.spice.0" in argv_of(d)
    unnamed = parse_domain(dom(SPICE + "<channel type='spicevmc'><target type='virtio'/>"
                               "</channel>"))
    assert unnamed.channels[0].target_name == "com.redhat.spice.0"
    assert "is named 'com.redhat.spice.0'" in str(refused(dom(
        "<channel type='spicevmc'><target type='virtio' name='x.y'/></channel>")))
    assert "serial type 'spicevmc' is not supported" in str(refused(dom(
        "<serial type='spicevmc'/>")))


LIBVIRT_AGENT = ("/var/lib/libvirt/qemu/channel/target/domain-3-vm/org.qemu.guest_agent.0")


def test_guest_agent_at_libvirts_runtime_path() -> None:
    d = parse_domain(dom(f"<channel type='unix'><source mode='bind' path='{LIBVIRT_AGENT}'/>"
                       "<target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>"
                       "<alias name='channel0'/></channel>"
                       "<channel type='unix'><source mode='bind'/>"
                       "<target type='virtio' name='org.qemu.guest_agent.1'/></channel>"))
    # The definition keeps what it said (but the runtime alias and state);
    # qemu gets a socket in Ferry's run directory.
    assert d.channels[0].source_path == LIBVIRT_AGENT
    assert parse_domain(format_domain(d)) == d
    assert "state=" not in format_domain(d) and "alias" not in format_domain(d)
    args = argv_of(d)
    assert "path=/run/ferry/serial/vm/org.qemu.guest_agent.0.sock,server=on" in args
    assert "path=/run/ferry/serial/vm/org.qemu.guest_agent.1.sock,server=on" in args
    assert "libvirt" not in args
    # The storage policy does not check a path Ferry does not use.
    assert domain_paths(d) == []
    # The live XML says where the sockets are; the migratable form leaves them
    # to the destination (as libvirt drops its default channel paths).
    live = live_sockets(d, PATHS)
    assert [c.source_path for c in live.channels] == [
        "/run/ferry/serial/vm/org.qemu.guest_agent.0.sock",
        "/run/ferry/serial/vm/org.qemu.guest_agent.1.sock"]
    assert "org.qemu.guest_agent.0.sock" in format_domain(live)
    check_abi_stability(d, live)
    moved = unplaced_sockets(parse_domain(format_domain(live)), PATHS.run_dir)
    assert [c.source_path for c in moved.channels] == [None, None]
    # A path of the user's own stays theirs, in the argv and the live XML.
    own = parse_domain(dom("<channel type='unix'><source mode='bind' path='/srv/ga.sock'/>"
                           "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"))
    assert "path=/srv/ga.sock," in argv_of(own)
    assert live_sockets(own, PATHS) == own
    assert unplaced_sockets(own, PATHS.run_dir) == own
    assert [p.path for p in domain_paths(own)] == ["/srv/ga.sock"]


def test_session_libvirt_path_is_a_runtime_path_too() -> None:
    path = "/home/u/.config/libvirt/qemu/lib/channel/target/domain-1-vm/org.qemu.guest_agent.0"
    d = parse_domain(dom(f"<channel type='unix'><source mode='bind' path='{path}'/>"
                         "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"))
    assert "/run/ferry/serial/vm/org.qemu.guest_agent.0.sock" in argv_of(d)


ALIASED = """<disk type='file'><source file='/img/a.img'/><target dev='vda'/>
      <alias name='virtio-disk0'/></disk>
    <interface type='user'><mac address='52:54:00:00:00:01'/><alias name='ua-net'/></interface>
    <serial type='pty'><target port='0'/><alias name='serial0'/></serial>
    <input type='tablet' bus='usb'><alias name='input0'/></input>
    <memballoon model='virtio'><alias name='balloon0'/></memballoon>
    <watchdog model='i6300esb'><alias name='watchdog0'/></watchdog>"""


def test_aliases_are_accepted_and_ignored() -> None:
    d = parse_domain(dom(ALIASED))
    plain = parse_domain(dom(ALIASED.replace("<alias name='virtio-disk0'/>", "")
                             .replace("<alias name='ua-net'/>", "")
                             .replace("<alias name='serial0'/>", "")
                             .replace("<alias name='input0'/>", "")
                             .replace("<alias name='balloon0'/>", "")
                             .replace("<alias name='watchdog0'/>", "")))
    assert d == plain
    assert "alias" not in format_domain(d)


# -- real qemu --------------------------------------------------------------------------

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")


@contextlib.contextmanager
def _short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ffd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start_and_kill(argv: list[str], pidfile: Path) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"qemu refused the argv: {proc.stderr}\n{argv}"
    pid = int(pidfile.read_text().strip())
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


DESKTOP = """<features><acpi/><apic/><vmport state='off'/><smm state='on'/></features>
  <iothreads>1</iothreads>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <clock offset='utc'><timer name='rtc' tickpolicy='catchup'/><timer name='pit'
    tickpolicy='delay'/><timer name='hpet' present='no'/></clock>"""


@needs_qemu
@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_real_qemu_starts_a_desktop_with_these_devices(machine: str) -> None:
    with _short_tmp() as tmp:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp / "d.qcow2"), "16M"],
                       check=True)
        watchdog = "itco" if machine == "q35" else "i6300esb"
        text = dom(f"""<disk type='file'><driver name='qemu' type='qcow2' iothread='1'/>
      <source file='{tmp}/d.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <channel type='unix'><source mode='bind' path='{LIBVIRT_AGENT}'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/></channel>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <input type='tablet' bus='usb'/>
    <graphics type='spice' autoport='yes'/>
    <sound model='ich9'/>
    <sound model='ac97'/>
    <video><model type='qxl'/></video>
    <redirdev bus='usb' type='spicevmc'/>
    <redirdev bus='usb' type='tcp'><source mode='connect' host='127.0.0.1' service='9'/>
    </redirdev>
    <watchdog model='{watchdog}' action='reset'/>
    <panic model='isa'/>""", machine=machine, vcpu="<vcpu current='1'>2</vcpu>",
                   extra=DESKTOP, virt="qemu")
        d = parse_domain(text)
        paths = RuntimePaths(tmp, tmp / "qmp.sock", tmp / "pid")
        with socket_port() as port:
            argv = to_qemu_argv(d, paths=paths, paused=True, qemu_binary=QEMU or "",
                                graphics_ports={0: GraphicsPorts(port)})
        _start_and_kill(argv, paths.pidfile)
        assert (tmp / "org.qemu.guest_agent.0.sock").exists()


@needs_qemu
@pytest.mark.skipif(not kvm_usable(), reason="the Hyper-V flags need KVM (/dev/kvm)")
def test_real_qemu_takes_the_hyperv_and_kvm_flags() -> None:
    with _short_tmp() as tmp:
        d = parse_domain(dom(extra=WINDOWS_FEATURES))
        paths = RuntimePaths(tmp, tmp / "qmp.sock", tmp / "pid")
        argv = to_qemu_argv(d, paths=paths, paused=True, qemu_binary=QEMU or "")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        if proc.returncode == 0:
            os.kill(int(paths.pidfile.read_text().strip()), signal.SIGKILL)
            return
        # qemu took every flag (an unknown one is "Property … not found"), but
        # a nested KVM without Hyper-V emulation refuses to set its MSRs.
        assert re.search(r"kernel doesn't allow setting HyperV|failed to set MSR 0x4000",
                         proc.stderr), proc.stderr
        pytest.skip(f"this host's KVM has no Hyper-V emulation: {proc.stderr.strip()[:120]}")


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    yield port
