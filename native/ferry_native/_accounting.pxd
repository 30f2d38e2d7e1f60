# C state of the transfer accounting, so other Cython code can cimport it.

from libc.stdint cimport int64_t


cdef class Sample:
    cdef readonly double time_s
    cdef readonly int64_t transferred
    cdef readonly int64_t remaining
    cdef readonly int64_t total
    cdef readonly double dirty_pages_rate
    cdef readonly int64_t page_size
    cdef readonly int64_t iteration
    cdef readonly int64_t throttle_pct

    cdef tuple _fields(self)


cdef class TransferAccount:
    cdef double _alpha
    cdef Py_ssize_t _window
    # Ring of (time, remaining) of the last `_window` samples.
    cdef double *_pt
    cdef double *_pr
    cdef Py_ssize_t _head      # next slot to write
    cdef Py_ssize_t _npoints   # filled slots, <= _window
    cdef int64_t _samples
    cdef Sample _last          # None before the first sample
    cdef double _bandwidth
    cdef double _smoothed
    cdef double _dirty
    cdef int64_t _relay_samples
    cdef double _relay_time
    cdef int64_t _relay_bytes
    cdef double _tunnel

    cdef double _slope(self) noexcept
    cdef object _converging(self)
    cdef double _stop_copy_s(self) noexcept
