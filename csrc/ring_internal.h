/*
 * ring_internal.h — the process-local side of a ring: the attaching
 * process's own copy of the geometry (never re-read from shared memory),
 * and the few helpers shared by segment.c, protocol.c and wait.c.
 */
#ifndef SHMFEED_RING_INTERNAL_H
#define SHMFEED_RING_INTERNAL_H

#include <stdint.h>
#include <sys/types.h>

#include "layout.h"
#include "shmfeed.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "futex waits on the low half of a 64-bit word assume little-endian"

#endif

/* A status that must be looked at (STYLE.md, "results that must be used"): put on the
 * definitions of status-returning functions in the .c files, so a call inside the library
 * that drops one is a compiler warning. It lives here, not in shmfeed.h: the Python build
 * feeds shmfeed.h to cffi with its # lines removed, so a macro defined there would reach
 * cdef undefined. GCC warns even through a (void) cast; a status ignored on purpose is
 * written `if (f(...)) { }` with a comment saying why. */
#define SHMFEED_MUST_USE __attribute__((warn_unused_result))

/* work.c: before a mapping goes (munmap, retire), the fatal-signal handler stops writing into it. */
void shmfeed_fatal_forget(const shmfeed_ring *r);

struct shmfeed_ring {
    uint8_t *base;            /* start of the mapping */
    uint64_t map_bytes;       /* length of the mapping, from fstat, not the header */
    int fd;                   /* -1 once retired: the segment is given up, the range kept */
    int is_creator;
    pid_t opened_by;          /* the process that made this handle: only it may unlink the name
                                 (a fork()ed child holds a copy of the handle, not the segment) */
    int unsealed;             /* the backing can be truncated (named segment): checked, guarded */
    int guard;                /* then: this mapping's entry in the SIGBUS guard (segment.c), or -1 */
    int retired;              /* shmfeed_ring_retire ran: fd closed, name gone, range zero pages */
    uint32_t slot_count;      /* private copy of the validated geometry */
    uint32_t flags;
    uint64_t slot_bytes;
    uint64_t slot_stride;
    uint64_t data_offset;
    uint32_t creator_pid;
    uint32_t creator_uid;
    uint64_t created_ns;       /* the header's: tells this ring from a later one at the same path */
    atomic_u32 scan_hint;     /* unordered: where the next claim scan starts (a hint) */
    char path[128];           /* what another process opens to attach */
    char shm_name[64];        /* named backing: unlinked by the creator */
};

static inline shm_header *ring_header(const struct shmfeed_ring *r) { return (shm_header *)r->base; }
static inline shm_counters *ring_counters(const struct shmfeed_ring *r)
{
    return (shm_counters *)(r->base + SHMFEED_COUNTERS_OFFSET);
}
static inline shm_work *ring_work(const struct shmfeed_ring *r)
{
    return (shm_work *)(r->base + SHMFEED_WORK_OFFSET);
}
static inline shm_slot_desc *ring_desc(const struct shmfeed_ring *r, uint32_t slot)
{
    return (shm_slot_desc *)(r->base + SHMFEED_DESC_OFFSET) + slot;
}

/* Named backing: is the file still as long as the mapping? Another process of the same
 * user can ftruncate it (memfd rings are sealed against that). SHMFEED_E_CORRUPT once a
 * fault past the end was caught by the SIGBUS guard (segment.c), or, with stat_now, when
 * fstat shows the file shorter than the mapping: called before a slot is handed out.
 * Free for memfd rings (one branch), so every protocol call may ask. */
SHMFEED_MUST_USE int shmfeed_backing_check_unsealed(const struct shmfeed_ring *r, int stat_now);
SHMFEED_MUST_USE static inline int shmfeed_backing_check(const struct shmfeed_ring *r, int stat_now)
{
    return r->unsealed ? shmfeed_backing_check_unsealed(r, stat_now) : SHMFEED_OK; /* memfd: inline, free */
}

/* Reserve slot `slot`'s pages unless a claim did already (NOTE [slot memory] in segment.c):
 * SHMFEED_E_NOMEM when the machine has no memory left for them. */
SHMFEED_MUST_USE int shmfeed_slot_reserve(struct shmfeed_ring *r, uint32_t slot);
uint64_t shmfeed_clock_ns(void);
/* Sleep while *word (32 bits) still equals expected, at most until deadline_ns
 * (0 = one slice) and never longer than one slice. Returns nothing: callers
 * re-check their condition after every return. */
void shmfeed_futex_wait(atomic_u32 *word, uint32_t expected, uint64_t deadline_ns);
void shmfeed_futex_wake_all(atomic_u32 *word);
/* Low 32 bits of a slot word: what futex waits compare. */
static inline atomic_u32 *word_futex(atomic_u64 *word) { return (atomic_u32 *)(void *)word; }


/* ---- waiting, shared by protocol.c (slots) and work.c (tasks) ------------ */

/* Deadline for a timeout: 0 means none (wait forever, slice by slice). */
typedef struct wait_clock {
    int64_t timeout_ns;
    uint64_t start_ns;
    uint64_t deadline_ns;
    int waited;
} wait_clock;

void clock_begin(wait_clock *c, int64_t timeout_ns);
/* Called before each sleep; returns the status to give up with, or OK. */
SHMFEED_MUST_USE int clock_may_sleep(wait_clock *c);
void clock_account(const wait_clock *c, atomic_u64 *waits, atomic_u64 *wait_ns);
void sleep_on_word(shm_slot_desc *d, uint64_t seen, uint64_t deadline_ns);
void wake_word(shm_slot_desc *d);
void sleep_on_event(shm_event *ev, uint32_t seen, uint64_t deadline_ns);
void signal_event(shm_event *ev);
int is_closed(const struct shmfeed_ring *r);
/* a is after b in the 46-bit sequence space (wrap-safe). */
int seq_after(uint64_t a, uint64_t b);

#endif
