/*
 * wait.c — sleeping and waking across processes.
 *
 * Futexes on words inside the shared segment, so they are *shared* futexes
 * (no FUTEX_PRIVATE_FLAG): the kernel keys them by the backing page, which
 * is what lets a producer in one process wake the consumer in another.
 * Every sleep is bounded by one slice so that a close(), a dead peer or a
 * caller's deadline is noticed even if a wake is lost.
 *
 * Where futex is not allowed (a seccomp policy answers ENOSYS or EPERM), a
 * wait that returned at once would turn every caller's wait loop into a hot
 * spin. The first such answer switches this process to polling: each wait is
 * then a short nanosleep, and wakes are skipped (every sleeper polls).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "ring_internal.h"

#define SLICE_NS 50000000LL /* 50 ms */
#define POLL_NS 200000LL    /* without futex: how long one wait sleeps (wake-up latency vs CPU) */

static atomic_u32 futex_refused; /* set once futex answered ENOSYS/EPERM: poll from then on */

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
    if (!load_relaxed32(&futex_refused)) {
        struct timespec rel = {.tv_sec = wait_ns / 1000000000LL, .tv_nsec = wait_ns % 1000000000LL};
        long rc = syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, expected, &rel, NULL, 0);
        int e = errno;
        /* Woken (0), value changed (EAGAIN), a signal (EINTR), slice over (ETIMEDOUT): re-check. */
        if (rc == 0 || e == EAGAIN || e == EINTR || e == ETIMEDOUT)
            return;
        if (e == ENOSYS || e == EPERM)
            store_relaxed32(&futex_refused, 1); /* a process-local flag: only its value matters */
        /* Refused, or an error nothing here can fix: sleep as below, never return at once. */
    }
    if (wait_ns > POLL_NS)
        wait_ns = POLL_NS;
    struct timespec poll = {.tv_sec = 0, .tv_nsec = wait_ns};
    nanosleep(&poll, NULL); /* EINTR only ends it early: callers re-check either way */
}

void shmfeed_futex_wake_all(atomic_u32 *word)
{
    if (load_relaxed32(&futex_refused))
        return; /* sleepers poll: nobody sleeps in the kernel */
    if (syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0) < 0 &&
        (errno == ENOSYS || errno == EPERM))
        store_relaxed32(&futex_refused, 1); /* sleepers wake at their slice's end meanwhile */
}
