# C declarations from <sys/socket.h> used by the relay; Cython ships none.

cdef extern from "sys/socket.h" nogil:
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int shutdown(int fd, int how)

    enum:
        MSG_DONTWAIT
        MSG_NOSIGNAL
        SHUT_WR
