# C declarations from <sys/eventfd.h>: one fd per relay that stop() makes
# readable, so a relay blocked in poll() wakes up.

from libc.stdint cimport uint64_t

cdef extern from "sys/eventfd.h" nogil:
    ctypedef uint64_t eventfd_t

    int eventfd(unsigned int initval, int flags)
    int eventfd_write(int fd, eventfd_t value)

    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK
