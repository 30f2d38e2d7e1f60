"""Ferry: live migration of QEMU/KVM virtual machines between hosts.

The shared library used by both agents and by ferryctl: the sans-I/O wire
protocol (:mod:`ferry.protocol`), domain XML (:mod:`ferry.domain`), qemu
control (:mod:`ferry.qemu`), the job model (:mod:`ferry.jobs`), migration
flags (:mod:`ferry.flags`) and the one error hierarchy (:mod:`ferry.errors`).
"""

__version__ = "0.1.0"
