# C declarations from <poll.h>: the relay waits for readiness on the data fd
# and the stop eventfd at once.

cdef extern from "poll.h" nogil:
    ctypedef unsigned long nfds_t

    struct pollfd:
        int fd
        short events
        short revents

    int poll(pollfd *fds, nfds_t nfds, int timeout)

    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP
        POLLNVAL
