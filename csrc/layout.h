/*
 * layout.h — the shared-memory segment, described once.
 *
 *   offset 0            ┌────────────────────────────────────────────┐
 *                       │ header page (4096 B)                       │
 *                       │   magic, layout version, geometry,         │
 *                       │   creator identity, closed flag + message  │
 *   offset 4096         ├────────────────────────────────────────────┤
 *                       │ counters page: one cache line per writer   │
 *                       │   producers | consumer | commit events |   │
 *                       │   release events                           │
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
#define SHMFEED_LAYOUT_VERSION 1u
#define SHMFEED_PAGE 4096u
#define SHMFEED_CACHE_LINE 64u
#define SHMFEED_HEADER_BYTES 4096u
#define SHMFEED_COUNTERS_OFFSET 4096u
#define SHMFEED_DESC_OFFSET 8192u
#define SHMFEED_CLOSE_MSG_BYTES 2048u
#define SHMFEED_MAX_SLOTS 65536u
#define SHMFEED_MAX_SLOT_BYTES (1ULL << 40) /* 1 TiB: far past any real batch */

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
    uint32_t reserved;
} shm_slot_desc;

static_assert(sizeof(shm_header) == SHMFEED_HEADER_BYTES, "header must fill exactly one page");
static_assert(offsetof(shm_header, closed) == 88, "close flag offset is part of the layout");
static_assert(offsetof(shm_header, close_msg) == 96, "close message offset is part of the layout");
static_assert(sizeof(shm_producer_counters) == SHMFEED_CACHE_LINE, "producer counters: one cache line");
static_assert(sizeof(shm_consumer_counters) == SHMFEED_CACHE_LINE, "consumer counters: one cache line");
static_assert(sizeof(shm_event) == SHMFEED_CACHE_LINE, "event: one cache line");
static_assert(sizeof(shm_counters) <= SHMFEED_DESC_OFFSET - SHMFEED_COUNTERS_OFFSET, "counters fit their page");
static_assert(sizeof(shm_slot_desc) == SHMFEED_CACHE_LINE, "descriptor: one cache line, no false sharing");
static_assert(offsetof(shm_slot_desc, word) == 0, "futex waits use the low half of the first word");
static_assert(SHMFEED_DESC_OFFSET % SHMFEED_PAGE == 0, "descriptors start on a page");

#endif /* SHMFEED_LAYOUT_H */
