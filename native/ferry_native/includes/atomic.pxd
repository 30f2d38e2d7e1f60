# Atomic loads and stores for the fields that run() writes without the GIL
# while other threads read them (bytes_copied, the stop flag).  On x86-64 an
# aligned 8-byte access is atomic anyway; the builtins make it so everywhere
# and keep the compiler from caching the value in a register.

from libc.stdint cimport uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    static inline uint64_t ferry_load_u64(const uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    static inline void ferry_add_u64(uint64_t *p, uint64_t v) {
        __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
    }
    static inline int ferry_load_int(const int *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void ferry_store_int(int *p, int v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    """
    uint64_t ferry_load_u64(const uint64_t *p) noexcept nogil
    void ferry_add_u64(uint64_t *p, uint64_t v) noexcept nogil
    int ferry_load_int(const int *p) noexcept nogil
    void ferry_store_int(int *p, int v) noexcept nogil
