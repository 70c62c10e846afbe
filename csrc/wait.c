/*
 * wait.c — sleeping and waking across processes.
 *
 * Futexes on words inside the shared segment, so they are *shared* futexes
 * (no FUTEX_PRIVATE_FLAG): the kernel keys them by the backing page, which
 * is what lets a producer in one process wake the consumer in another.
 * Every sleep is bounded by one slice so that a close(), a dead peer or a
 * caller's deadline is noticed even if a wake is lost.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "ring_internal.h"

#define SLICE_NS 50000000LL /* 50 ms */

int64_t shmfeed_wait_slice_ns(void) { return SLICE_NS; }

uint64_t shmfeed_clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* vDSO: not a syscall */
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

uint64_t shmfeed_now_ns(void) { return shmfeed_clock_ns(); }

void shmfeed_futex_wait(atomic_u32 *word, uint32_t expected, uint64_t deadline_ns)
{
    int64_t wait_ns = SLICE_NS;
    if (deadline_ns) {
        uint64_t now = shmfeed_clock_ns();
        if (now >= deadline_ns)
            return;
        if ((int64_t)(deadline_ns - now) < wait_ns)
            wait_ns = (int64_t)(deadline_ns - now);
    }
    struct timespec rel = {.tv_sec = wait_ns / 1000000000LL, .tv_nsec = wait_ns % 1000000000LL};
    /* EAGAIN (value changed), EINTR and ETIMEDOUT all mean: re-check. */
    (void)syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, expected, &rel, NULL, 0);
}

void shmfeed_futex_wake_all(atomic_u32 *word)
{
    (void)syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}
