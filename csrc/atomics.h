/*
 * atomics.h — every memory-ordering primitive the ring uses, in one place.
 *
 * Contract (C11 memory model, as liburing's barrier.h states its own):
 *   - load_acquire(p) pairs with an earlier store_release(p) / cas(p) in
 *     another thread or process: everything written before that release is
 *     visible after this acquire. This is how slot bytes written by a
 *     producer become visible to the consumer (commit -> acquire) and how
 *     the consumer's "I am done reading" reaches the next producer
 *     (release -> claim).
 *   - cas() is acq_rel on success (it both consumes the previous owner's
 *     publication and publishes the new state) and acquire on failure.
 *   - add_full32() is a seq_cst read-modify-write. Sleepers increment a
 *     waiter count with it before re-checking the state; wakers read the
 *     count with add_full32(p, 0) after publishing the state. Both RMWs are
 *     totally ordered on the count, so either the waker sees the sleeper or
 *     the sleeper sees the new state: "wake only if someone sleeps" is safe.
 *     (An RMW rather than a fence, because ThreadSanitizer models RMWs and
 *     does not model atomic_thread_fence.)
 *   - load_relaxed/store_relaxed/add_relaxed are for statistics and for
 *     fields published by a later release store.
 *
 * The segment is shared between processes; lock-free 64-bit atomics on
 * x86_64 and aarch64 are address-free, which is what makes this legal.
 */
#ifndef SHMFEED_ATOMICS_H
#define SHMFEED_ATOMICS_H

#include <stdatomic.h>
#include <stdint.h>

_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "64-bit atomics must be lock-free to live in shared memory");
_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "32-bit atomics must be lock-free to live in shared memory");
_Static_assert(ATOMIC_SHORT_LOCK_FREE == 2, "16-bit atomics must be lock-free (a signal handler stores one)");

typedef _Atomic uint64_t atomic_u64;
typedef _Atomic uint32_t atomic_u32;
typedef _Atomic int32_t atomic_i32;
typedef _Atomic uint16_t atomic_u16;

static inline uint64_t load_acquire64(atomic_u64 *p) { return atomic_load_explicit(p, memory_order_acquire); }
static inline uint32_t load_acquire32(atomic_u32 *p) { return atomic_load_explicit(p, memory_order_acquire); }
static inline uint64_t load_relaxed64(atomic_u64 *p) { return atomic_load_explicit(p, memory_order_relaxed); }
static inline uint32_t load_relaxed32(atomic_u32 *p) { return atomic_load_explicit(p, memory_order_relaxed); }

static inline void store_release64(atomic_u64 *p, uint64_t v) { atomic_store_explicit(p, v, memory_order_release); }
static inline void store_release32(atomic_u32 *p, uint32_t v) { atomic_store_explicit(p, v, memory_order_release); }
static inline void store_relaxed64(atomic_u64 *p, uint64_t v) { atomic_store_explicit(p, v, memory_order_relaxed); }
static inline void store_relaxed32(atomic_u32 *p, uint32_t v) { atomic_store_explicit(p, v, memory_order_relaxed); }
static inline uint16_t load_acquire16(atomic_u16 *p) { return atomic_load_explicit(p, memory_order_acquire); }
static inline uint16_t load_relaxed16(atomic_u16 *p) { return atomic_load_explicit(p, memory_order_relaxed); }
static inline void store_release16(atomic_u16 *p, uint16_t v) { atomic_store_explicit(p, v, memory_order_release); }
static inline void store_relaxed16(atomic_u16 *p, uint16_t v) { atomic_store_explicit(p, v, memory_order_relaxed); }

/* The header's magic is a plain uint64_t in the layout (layout.h), not an _Atomic one, so it
 * goes through the compiler builtins; these are the only two such accesses. store_release_plain64
 * (the creator's last header write) pairs with attach's load_acquire_plain64 of the magic: an
 * attacher that sees the magic sees the whole header. (Attach also learns the path only after
 * create returned, through some IPC, which orders it anyway; the pair makes that not matter.) */
static inline void store_release_plain64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint64_t load_acquire_plain64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

/* On failure *expected receives the current value. */
static inline int cas64(atomic_u64 *p, uint64_t *expected, uint64_t desired)
{
    return atomic_compare_exchange_strong_explicit(p, expected, desired, memory_order_acq_rel,
                                                   memory_order_acquire);
}
static inline int cas32(atomic_u32 *p, uint32_t *expected, uint32_t desired)
{
    return atomic_compare_exchange_strong_explicit(p, expected, desired, memory_order_acq_rel,
                                                   memory_order_acquire);
}

/* seq_cst: a producer's take announces its intent with it before the CAS that takes (work.c). */
static inline uint64_t exchange_full64(atomic_u64 *p, uint64_t v) { return atomic_exchange_explicit(p, v, memory_order_seq_cst); }
static inline uint64_t exchange_acq_rel64(atomic_u64 *p, uint64_t v) { return atomic_exchange_explicit(p, v, memory_order_acq_rel); }
static inline uint64_t add_relaxed64(atomic_u64 *p, uint64_t v) { return atomic_fetch_add_explicit(p, v, memory_order_relaxed); }
static inline uint32_t add_release32(atomic_u32 *p, uint32_t v) { return atomic_fetch_add_explicit(p, v, memory_order_release); }
static inline uint64_t add_full64(atomic_u64 *p, uint64_t v) { return atomic_fetch_add_explicit(p, v, memory_order_seq_cst); }
static inline uint32_t add_full32(atomic_u32 *p, uint32_t v) { return atomic_fetch_add_explicit(p, v, memory_order_seq_cst); }
static inline uint32_t sub_relaxed32(atomic_u32 *p, uint32_t v) { return atomic_fetch_sub_explicit(p, v, memory_order_relaxed); }

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif /* SHMFEED_ATOMICS_H */
