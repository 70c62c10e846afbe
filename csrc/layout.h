/*
 * layout.h — the shared-memory segment, described once.
 *
 *   offset 0            ┌────────────────────────────────────────────┐
 *                       │ header page (4096 B)                       │
 *                       │   magic, layout version, geometry,         │
 *                       │   creator identity, closed flag + message  │
 *   offset 4096         ├────────────────────────────────────────────┤
 *                       │ control page                               │
 *                       │   counters: one cache line per writer      │
 *                       │     producers | consumer | commit events | │
 *                       │     release events                         │
 *                       │   work area (work.c): task counter, posted │
 *                       │     event, two job descriptors, re-issue   │
 *                       │     queue, one record per producer; the    │
 *                       │     unordered claim's sequence counter     │
 *   offset 8192         ├────────────────────────────────────────────┤
 *                       │ slot descriptors, 64 B each (own line):    │
 *                       │   word (gen|seq|state), owner, batch seq,  │
 *                       │   payload length, timestamps, waiters      │
 *   data_offset         ├────────────────────────────────────────────┤
 *   (page aligned)      │ slot 0 data   (slot_stride bytes)          │
 *                       │ slot 1 data                                │
 *                       │ ...                                        │
 *                       └────────────────────────────────────────────┘
 *
 * The slot word packs three fields so that one CAS moves a slot between
 * states and also proves ownership (see protocol.c):
 *
 *    63        48 47                                  2 1   0
 *   ┌────────────┬─────────────────────────────────────┬─────┐
 *   │ generation │ sequence (46 bits)                  │state│
 *   └────────────┴─────────────────────────────────────┴─────┘
 *
 * The generation changes each time a claim is taken away (reclaim), so a
 * stale owner's CAS fails even when the same sequence is claimed again.
 * Futex waits use the low 32 bits of the word, which change on every
 * state transition (state bits and low sequence bits).
 */
#ifndef SHMFEED_LAYOUT_H
#define SHMFEED_LAYOUT_H

#include <assert.h>
#include <stddef.h>
#include <stdint.h>

#include "atomics.h"

#define SHMFEED_MAGIC 0x314445454648534dULL /* "MSHFEED1" little-endian */
#define SHMFEED_LAYOUT_VERSION 3u /* 2: the work area; 3: slots reserved by their first claim */
#define SHMFEED_PAGE 4096u
#define SHMFEED_CACHE_LINE 64u
#define SHMFEED_HEADER_BYTES 4096u
#define SHMFEED_COUNTERS_OFFSET 4096u
#define SHMFEED_DESC_OFFSET 8192u
#define SHMFEED_CLOSE_MSG_BYTES 2048u
#define SHMFEED_MAX_SLOTS 65536u
#define SHMFEED_MAX_SLOT_BYTES (1ULL << 40) /* 1 TiB: far past any real batch */
#define SHMFEED_WORK_OFFSET (SHMFEED_COUNTERS_OFFSET + 256u)
#define SHMFEED_MAX_PRODUCERS 32u  /* producer records in the work area */
#define SHMFEED_REISSUE_CAP 64u    /* each dead producer re-issues at most one task */

#define WORD_STATE_BITS 2u
#define WORD_SEQ_BITS 46u
#define WORD_STATE_MASK 0x3ULL
#define WORD_SEQ_MASK ((1ULL << WORD_SEQ_BITS) - 1ULL)
#define WORD_GEN_SHIFT (WORD_STATE_BITS + WORD_SEQ_BITS)

static inline uint64_t word_make(uint64_t gen, uint64_t seq, uint64_t state)
{
    return ((gen & 0xffffULL) << WORD_GEN_SHIFT) | ((seq & WORD_SEQ_MASK) << WORD_STATE_BITS) |
           (state & WORD_STATE_MASK);
}
static inline uint64_t word_state(uint64_t w) { return w & WORD_STATE_MASK; }
static inline uint64_t word_seq(uint64_t w) { return (w >> WORD_STATE_BITS) & WORD_SEQ_MASK; }
static inline uint64_t word_gen(uint64_t w) { return w >> WORD_GEN_SHIFT; }

/* Header page. Written once by the creator before any other process can
 * attach; only the close fields change afterwards. */
typedef struct shm_header {
    uint64_t magic;
    uint32_t version;
    uint32_t header_bytes;
    uint64_t segment_bytes;
    uint32_t slot_count;
    uint32_t flags;
    uint64_t slot_bytes;
    uint64_t slot_stride;
    uint64_t desc_offset;
    uint64_t desc_stride;
    uint64_t data_offset;
    uint32_t creator_pid;
    uint32_t creator_uid;
    uint64_t created_ns;
    /* 0 open, 1 closing (message being written), 2 closed. The close code
     * and message are published by the store_release of 2. */
    atomic_u32 closed;
    int32_t close_code;
    char close_msg[SHMFEED_CLOSE_MSG_BYTES];
    uint8_t reserved[SHMFEED_HEADER_BYTES - 96 - SHMFEED_CLOSE_MSG_BYTES];
} shm_header;

typedef struct shm_producer_counters {
    atomic_u64 claims;
    atomic_u64 commits;
    atomic_u64 aborts;
    atomic_u64 stale_commits;
    atomic_u64 reclaims;
    atomic_u64 waits;
    atomic_u64 wait_ns;
    atomic_u64 commit_order; /* unordered mode: ticket taken at each commit */
} shm_producer_counters;

typedef struct shm_consumer_counters {
    atomic_u64 acquires;
    atomic_u64 releases;
    atomic_u64 waits;
    atomic_u64 wait_ns;
    atomic_u64 head; /* ordered mode: next sequence the consumer acquires */
    uint64_t reserved[3];
} shm_consumer_counters;

/* A futex word that counts events, and how many sleep on it. */
typedef struct shm_event {
    atomic_u32 count;
    atomic_u32 waiters;
    uint8_t reserved[SHMFEED_CACHE_LINE - 8];
} shm_event;

typedef struct shm_counters {
    shm_producer_counters producer;      /* line 0: written by producers */
    shm_consumer_counters consumer;      /* line 1: written by the consumer */
    shm_event committed;                 /* line 2: unordered consumer sleeps here */
    shm_event released;                  /* line 3: unordered producers sleep here */
} shm_counters;

typedef struct shm_slot_desc {
    atomic_u64 word;         /* generation | sequence | state */
    atomic_u64 owner;        /* claimer's token, 0 when nobody holds a claim */
    atomic_u64 batch_seq;    /* sequence the claim is for (unordered mode) */
    atomic_u64 payload_len;  /* published by commit's release CAS */
    atomic_u64 claim_ns;
    atomic_u64 commit_ns;
    atomic_u64 commit_order; /* unordered: commit ticket, smallest acquired first */
    atomic_u32 waiters;      /* processes sleeping on this word */
    atomic_u32 backed;       /* 1 once the slot's pages are reserved: NOTE [slot memory] in segment.c */
} shm_slot_desc;

/* ---- the work area: NOTE [work hand-out] in work.c ---------------------- */

/* The task word packs the job generation (low bits, so a futex on the low
 * half sees a new job) and the next task number of that job. */
#define TASK_GEN_BITS 20u
#define TASK_GEN_MASK ((1ULL << TASK_GEN_BITS) - 1ULL)
static inline uint64_t task_make(uint64_t gen, uint64_t k) { return (k << TASK_GEN_BITS) | (gen & TASK_GEN_MASK); }
static inline uint64_t task_gen(uint64_t w) { return w & TASK_GEN_MASK; }
static inline uint64_t task_k(uint64_t w) { return w >> TASK_GEN_BITS; }

/* A job: tasks k = 0 .. count-1 are batches base_seq + k. Written by the
 * feed into jobs[gen & 1] while that generation is not yet published; read
 * by producers only for the generation they CAS against (see take()). */
typedef struct shm_job {
    atomic_u64 epoch;
    atomic_u64 base_seq;
    atomic_u64 count;
    atomic_u64 start;        /* passed through to producers (their index mapping) */
    atomic_u64 flags;        /* SHMFEED_JOB_* */
    atomic_u64 stride;       /* round robin: producers; task k is record k % stride's */
    atomic_u64 carry_gen;    /* SHMFEED_JOB_CARRY: records of this generation go on where they were */
    uint64_t reserved[1];
} shm_job;

/* One per producer position (worker). The feed resets it before it starts
 * a producer there; the producer writes the rest. */
typedef struct shm_record {
    atomic_u64 owner;        /* the producer's owner token; 0: unused */
    atomic_u64 task;         /* seq + 1 of the task it holds; 0: none */
    atomic_u64 intent;       /* non-zero while a take is in progress */
    atomic_u64 since_ns;     /* when it took the task it holds (leases) */
    atomic_u64 busy_ns;      /* statistics, written by the producer only */
    atomic_u64 batches;
    atomic_u32 pid;
    atomic_u16 stop;         /* the feed asked this producer to stop after its current task */
    atomic_u16 signal;       /* the fatal signal the producer died of (NOTE [fatal signals], work.c); 0: none */
    atomic_u64 next;         /* round robin: task_make(gen, k) of its next task */
} shm_record;

typedef struct shm_work {
    atomic_u64 next;                         /* line 0: task_make(gen, next k) */
    uint64_t reserved0[7];
    shm_event posted;                        /* line 1: a job posted, a task re-issued */
    shm_job jobs[2];                         /* lines 2-3 */
    atomic_u32 reissued;                     /* line 4: entries in the queue (a hint) */
    uint32_t reserved1[15];
    atomic_u64 queue[SHMFEED_REISSUE_CAP];   /* seq + 1 of a re-issued task; 0: empty */
    shm_record records[SHMFEED_MAX_PRODUCERS];
    /* Unordered rings: the next batch sequence shmfeed_claim_next hands out, so
     * that producers which name no sequence never produce the same one. Zero in
     * a fresh segment (and in segments older than it: they never used it). */
    atomic_u64 claim_seq;
    uint64_t reserved2[7];
} shm_work;

static_assert(sizeof(shm_header) == SHMFEED_HEADER_BYTES, "header must fill exactly one page");
static_assert(offsetof(shm_header, closed) == 88, "close flag offset is part of the layout");
static_assert(offsetof(shm_header, close_msg) == 96, "close message offset is part of the layout");
/* Python reads the header of a segment it does not attach (pyshmfeed cleanup) through the field table
 * (shmfeed_layout_fields, segment.c); these must not move between layout versions, so that a segment of
 * another version is still recognised and its creator named. */
static_assert(offsetof(shm_header, magic) == 0 && offsetof(shm_header, version) == 8, "magic, version first");
static_assert(offsetof(shm_header, creator_pid) == 72 && offsetof(shm_header, creator_uid) == 76,
              "the creator's identity is read across layout versions");
static_assert(sizeof(shm_producer_counters) == SHMFEED_CACHE_LINE, "producer counters: one cache line");
static_assert(sizeof(shm_consumer_counters) == SHMFEED_CACHE_LINE, "consumer counters: one cache line");
static_assert(sizeof(shm_event) == SHMFEED_CACHE_LINE, "event: one cache line");
static_assert(sizeof(shm_counters) <= SHMFEED_DESC_OFFSET - SHMFEED_COUNTERS_OFFSET, "counters fit their page");
static_assert(sizeof(shm_counters) <= SHMFEED_WORK_OFFSET - SHMFEED_COUNTERS_OFFSET, "work area after counters");
static_assert(sizeof(shm_job) == SHMFEED_CACHE_LINE, "job descriptor: one cache line");
static_assert(sizeof(shm_record) == SHMFEED_CACHE_LINE, "producer record: one cache line");
static_assert(SHMFEED_WORK_OFFSET + sizeof(shm_work) <= SHMFEED_DESC_OFFSET, "the work area fits the control page");
static_assert(SHMFEED_REISSUE_CAP >= SHMFEED_MAX_PRODUCERS, "every producer's task fits the re-issue queue");
static_assert(sizeof(shm_slot_desc) == SHMFEED_CACHE_LINE, "descriptor: one cache line, no false sharing");
static_assert(offsetof(shm_slot_desc, word) == 0, "futex waits use the low half of the first word");
static_assert(SHMFEED_DESC_OFFSET % SHMFEED_PAGE == 0, "descriptors start on a page");

#endif /* SHMFEED_LAYOUT_H */
