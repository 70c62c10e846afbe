/*
 * test_protocol.c — the slot state machine, one operation at a time.
 *
 * Single-threaded except where a test needs a blocked waiter (close and
 * wake-up tests). The descriptor and counter pages are read through
 * layout.h only to see who sleeps where, or to stage the state a producer
 * leaves behind when it dies between two of its stores.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "layout.h"
#include "shmfeed.h"

#define MS 1000000LL
#define OWNER_A 0xa1ULL
#define OWNER_B 0xb2ULL
#define OWNER_C 0xc3ULL

static shmfeed_ring *make_ring(uint32_t slots, uint64_t bytes, uint32_t flags)
{
    shmfeed_ring *ring = NULL;
    char err[256];
    if (shmfeed_ring_create(slots, bytes, flags, &ring, err, sizeof err) != SHMFEED_OK)
        fprintf(stderr, "creating a ring of %u x %llu failed: %s\n", slots, (unsigned long long)bytes, err);
    return ring;
}

static uint8_t *slot_data(shmfeed_ring *ring, uint32_t slot)
{
    shmfeed_geometry g;
    uint8_t *base;
    shmfeed_ring_geometry(ring, &g);
    shmfeed_ring_base(ring, &base);
    return base + g.data_offset + (uint64_t)slot * g.slot_stride;
}

static shm_slot_desc *slot_desc(shmfeed_ring *ring, uint32_t slot)
{
    uint8_t *base;
    shmfeed_ring_base(ring, &base);
    return (shm_slot_desc *)(base + SHMFEED_DESC_OFFSET) + slot;
}

static shm_counters *ring_counters_page(shmfeed_ring *ring)
{
    uint8_t *base;
    shmfeed_ring_base(ring, &base);
    return (shm_counters *)(base + SHMFEED_COUNTERS_OFFSET);
}

static uint32_t slot_state(shmfeed_ring *ring, uint32_t slot)
{
    shmfeed_slot_info info;
    if (shmfeed_slot_info_read(ring, slot, &info) != SHMFEED_OK)
        return UINT32_MAX;
    return info.state;
}

/* Claim `seq` without waiting, fill `len` bytes with `fill`, commit. */
static int produce(shmfeed_ring *ring, uint64_t seq, uint64_t owner, uint64_t len, uint8_t fill)
{
    shmfeed_claimed c;
    CHECK_RC(shmfeed_claim(ring, seq, owner, 0, &c), SHMFEED_OK);
    CHECK_EQ(c.seq, seq);
    memset(slot_data(ring, c.slot), fill, len);
    CHECK_RC(shmfeed_commit(ring, &c, len), SHMFEED_OK);
    return 0;
}

/* Acquire without waiting; expect batch `seq` of `len` bytes of `fill`. */
static int consume(shmfeed_ring *ring, uint64_t seq, uint64_t len, uint8_t fill)
{
    shmfeed_acquired a;
    CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_OK);
    CHECK_EQ(a.seq, seq);
    CHECK_EQ(a.payload_len, len);
    const uint8_t *p = slot_data(ring, a.slot);
    for (uint64_t i = 0; i < len; i++)
        CHECK_EQ(p[i], fill);
    CHECK_RC(shmfeed_release(ring, &a), SHMFEED_OK);
    return 0;
}

/* ---- ordered mode: one batch through every state ------------------------- */

static int test_ordered_claim_commit_acquire_release(void)
{
    shmfeed_ring *ring = make_ring(4, 128, SHMFEED_ORDERED);
    CHECK(ring);
    for (uint64_t seq = 0; seq < 10; seq++) { /* wraps the ring twice */
        uint32_t slot = (uint32_t)(seq % 4);
        shmfeed_claimed c;
        shmfeed_acquired a;
        shmfeed_slot_info info;
        uint64_t before = shmfeed_now_ns();

        CHECK_RC(shmfeed_claim(ring, seq, OWNER_A, 0, &c), SHMFEED_OK);
        CHECK_EQ(c.slot, slot);
        CHECK_EQ(c.seq, seq);
        CHECK_EQ(c.owner, OWNER_A);
        CHECK_RC(shmfeed_slot_info_read(ring, slot, &info), SHMFEED_OK);
        CHECK_EQ(info.state, SHMFEED_SLOT_CLAIMED);
        CHECK_EQ(info.seq, seq);
        CHECK_EQ(info.owner, OWNER_A);
        CHECK(info.claim_ns >= before);

        memset(slot_data(ring, slot), (int)(0x40 + seq), seq + 1);
        CHECK_RC(shmfeed_commit(ring, &c, seq + 1), SHMFEED_OK);
        CHECK_RC(shmfeed_slot_info_read(ring, slot, &info), SHMFEED_OK);
        CHECK_EQ(info.state, SHMFEED_SLOT_READY);
        CHECK_EQ(info.owner, 0); /* commit unlocks the owner word */
        CHECK_EQ(info.payload_len, seq + 1);

        CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_OK);
        CHECK_EQ(a.slot, slot);
        CHECK_EQ(a.seq, seq);
        CHECK_EQ(a.payload_len, seq + 1);
        CHECK(a.commit_ns >= info.claim_ns && a.commit_ns <= shmfeed_now_ns());
        CHECK_EQ(slot_state(ring, slot), SHMFEED_SLOT_ACQUIRED);
        for (uint64_t i = 0; i <= seq; i++)
            CHECK_EQ(slot_data(ring, slot)[i], 0x40 + seq);

        CHECK_RC(shmfeed_release(ring, &a), SHMFEED_OK);
        CHECK_RC(shmfeed_slot_info_read(ring, slot, &info), SHMFEED_OK);
        CHECK_EQ(info.state, SHMFEED_SLOT_FREE);
        CHECK_EQ(info.seq, seq + 4); /* free for the batch one lap later */
    }
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* Producers may run a full ring ahead of the consumer, and no further. */
static int test_ordered_producers_stop_one_lap_ahead(void)
{
    shmfeed_ring *ring = make_ring(4, 64, SHMFEED_ORDERED);
    shmfeed_claimed c;
    CHECK(ring);
    for (uint64_t seq = 0; seq < 4; seq++)
        CHECK(produce(ring, seq, OWNER_A, 8, (uint8_t)seq) == 0);
    CHECK_RC(shmfeed_claim(ring, 4, OWNER_A, 0, &c), SHMFEED_E_AGAIN); /* slot 0 still holds batch 0 */
    CHECK(consume(ring, 0, 8, 0) == 0);
    CHECK(produce(ring, 4, OWNER_A, 8, 4) == 0);
    for (uint64_t seq = 1; seq < 5; seq++)
        CHECK(consume(ring, seq, 8, (uint8_t)seq) == 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* The consumer takes batch s only after batch s-1, whatever the commit order. */
static int test_ordered_delivers_in_sequence_order(void)
{
    shmfeed_ring *ring = make_ring(4, 64, SHMFEED_ORDERED);
    shmfeed_acquired a;
    CHECK(ring);
    CHECK(produce(ring, 2, OWNER_A, 3, 2) == 0);
    CHECK(produce(ring, 1, OWNER_B, 2, 1) == 0);
    CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_E_AGAIN); /* batch 0 not committed */
    CHECK(produce(ring, 0, OWNER_C, 1, 0) == 0);
    CHECK(consume(ring, 0, 1, 0) == 0);
    CHECK(consume(ring, 1, 2, 1) == 0);
    CHECK(consume(ring, 2, 3, 2) == 0);
    CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_E_AGAIN);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* ---- misuse is an error, never a silent success ------------------------ */

static int test_claim_of_committed_seq_is_stale(void)
{
    shmfeed_ring *ring = make_ring(2, 64, SHMFEED_ORDERED);
    shmfeed_claimed c;
    shmfeed_acquired a;
    CHECK(ring);
    CHECK(produce(ring, 0, OWNER_A, 8, 1) == 0);
    CHECK_RC(shmfeed_claim(ring, 0, OWNER_B, 0, &c), SHMFEED_E_STALE);       /* READY(0) */
    CHECK_RC(shmfeed_claim(ring, 0, OWNER_B, -1, &c), SHMFEED_E_STALE);      /* no wait either */
    CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_OK);
    CHECK_RC(shmfeed_claim(ring, 0, OWNER_B, 0, &c), SHMFEED_E_STALE);       /* ACQUIRED(0) */
    CHECK_RC(shmfeed_release(ring, &a), SHMFEED_OK);
    CHECK_RC(shmfeed_claim(ring, 0, OWNER_B, 0, &c), SHMFEED_E_STALE);       /* FREE(2) */
    CHECK_RC(shmfeed_claim(ring, 2, OWNER_B, 0, &c), SHMFEED_OK);            /* the next lap is fine */
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_commit_twice_is_state_error(void)
{
    shmfeed_ring *ring = make_ring(2, 64, SHMFEED_ORDERED);
    shmfeed_claimed c;
    shmfeed_counters k;
    CHECK(ring);
    CHECK_RC(shmfeed_claim(ring, 0, OWNER_A, 0, &c), SHMFEED_OK);
    CHECK_RC(shmfeed_commit(ring, &c, 8), SHMFEED_OK);
    CHECK_RC(shmfeed_commit(ring, &c, 16), SHMFEED_E_STATE);
    CHECK_RC(shmfeed_abort(ring, &c), SHMFEED_E_STATE); /* too late to abort a commit */
    CHECK_RC(shmfeed_counters_read(ring, &k), SHMFEED_OK);
    CHECK_EQ(k.commits, 1);
    CHECK_EQ(k.stale_commits, 0);
    CHECK(consume(ring, 0, 8, 0) == 0); /* the first commit's length stands */
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_release_twice_or_unacquired_is_an_error(void)
{
    shmfeed_ring *ring = make_ring(2, 64, SHMFEED_ORDERED);
    shmfeed_acquired a, never = {0}, forged;
    CHECK(ring);
    CHECK(produce(ring, 0, OWNER_A, 8, 0) == 0);
    CHECK(produce(ring, 1, OWNER_A, 8, 1) == 0);
    CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_OK);
    CHECK_RC(shmfeed_release(ring, &a), SHMFEED_OK);
    CHECK_RC(shmfeed_release(ring, &a), SHMFEED_E_STATE);
    CHECK_EQ(slot_state(ring, 0), SHMFEED_SLOT_FREE);

    /* Never acquired: a zeroed handle is not an acquired one. */
    CHECK_RC(shmfeed_release(ring, &never), SHMFEED_E_INVAL);
    /* A well-formed handle for slot 1, which is READY, not ACQUIRED. */
    forged = a;
    forged.slot = 1;
    forged.seq = 1;
    forged.token = word_make(0, 1, SHMFEED_SLOT_ACQUIRED);
    CHECK_RC(shmfeed_release(ring, &forged), SHMFEED_E_STATE);
    CHECK_EQ(slot_state(ring, 1), SHMFEED_SLOT_READY); /* untouched */
    forged.slot = 2;                                    /* out of range */
    CHECK_RC(shmfeed_release(ring, &forged), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_release(ring, NULL), SHMFEED_E_INVAL);

    CHECK(consume(ring, 1, 8, 1) == 0);
    shmfeed_counters k;
    CHECK_RC(shmfeed_counters_read(ring, &k), SHMFEED_OK);
    CHECK_EQ(k.releases, 2);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_payload_longer_than_slot(void)
{
    shmfeed_ring *ring = make_ring(2, 100, SHMFEED_ORDERED);
    shmfeed_claimed c;
    CHECK(ring);
    CHECK_RC(shmfeed_claim(ring, 0, OWNER_A, 0, &c), SHMFEED_OK);
    CHECK_RC(shmfeed_commit(ring, &c, 101), SHMFEED_E_TOOBIG);
    CHECK_RC(shmfeed_commit(ring, &c, UINT64_MAX), SHMFEED_E_TOOBIG);
    CHECK_EQ(slot_state(ring, 0), SHMFEED_SLOT_CLAIMED); /* the claim stays valid */
    memset(slot_data(ring, 0), 7, 100);
    CHECK_RC(shmfeed_commit(ring, &c, 100), SHMFEED_OK); /* exactly the slot is fine */
    CHECK(consume(ring, 0, 100, 7) == 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_bad_arguments(void)
{
    shmfeed_ring *ring = make_ring(2, 64, SHMFEED_ORDERED);
    shmfeed_claimed c, bad;
    shmfeed_acquired a;
    CHECK(ring);
    CHECK_RC(shmfeed_claim(ring, 0, 0, 0, &c), SHMFEED_E_INVAL);               /* owner 0 means "nobody" */
    CHECK_RC(shmfeed_claim(ring, WORD_SEQ_MASK + 1, OWNER_A, 0, &c), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_claim(ring, 0, OWNER_A, 0, NULL), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_claim(NULL, 0, OWNER_A, 0, &c), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_acquire(ring, 0, NULL), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_acquire(NULL, 0, &a), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_claim(ring, 0, OWNER_A, 0, &c), SHMFEED_OK);
    bad = c;
    bad.slot = 2;
    CHECK_RC(shmfeed_commit(ring, &bad, 1), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_abort(ring, &bad), SHMFEED_E_INVAL);
    bad = c;
    bad.token = word_make(0, 0, SHMFEED_SLOT_READY); /* not a claim token */
    CHECK_RC(shmfeed_commit(ring, &bad, 1), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_commit(ring, NULL, 1), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_commit(ring, &c, 1), SHMFEED_OK);
    CHECK_EQ(shmfeed_wait_slice_ns() > 0, 1);
    CHECK(strcmp(shmfeed_strerror(SHMFEED_E_STALE), shmfeed_strerror(12345)) != 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* ---- abort and reclaim --------------------------------------------------- */

static int test_abort_then_claim_same_seq(void)
{
    shmfeed_ring *ring = make_ring(2, 64, SHMFEED_ORDERED);
    shmfeed_claimed first, second;
    shmfeed_slot_info info;
    shmfeed_counters k;
    CHECK(ring);
    CHECK_RC(shmfeed_claim(ring, 0, OWNER_A, 0, &first), SHMFEED_OK);
    memset(slot_data(ring, 0), 0xee, 64); /* a half-written batch */
    CHECK_RC(shmfeed_abort(ring, &first), SHMFEED_OK);
    CHECK_RC(shmfeed_slot_info_read(ring, 0, &info), SHMFEED_OK);
    CHECK_EQ(info.state, SHMFEED_SLOT_FREE);
    CHECK_EQ(info.seq, 0);        /* free for the same batch again */
    CHECK_EQ(info.generation, 1); /* ... under a new generation */
    CHECK_EQ(info.owner, 0);

    /* The aborted claim is dead: it can neither commit nor abort again.
     * (Both come back E_STALE today: abort and reclaim leave the same
     * slot word, so the commit cannot tell "you aborted" from "you were
     * reclaimed". Either code is acceptable; success is not.) */
    int rc = shmfeed_commit(ring, &first, 8);
    CHECK(rc == SHMFEED_E_STALE || rc == SHMFEED_E_STATE);
    rc = shmfeed_abort(ring, &first);
    CHECK(rc == SHMFEED_E_STALE || rc == SHMFEED_E_STATE);
    CHECK_EQ(slot_state(ring, 0), SHMFEED_SLOT_FREE);

    CHECK_RC(shmfeed_claim(ring, 0, OWNER_B, 0, &second), SHMFEED_OK);
    CHECK(second.token != first.token);
    memset(slot_data(ring, 0), 0x11, 64);
    CHECK_RC(shmfeed_commit(ring, &first, 8), SHMFEED_E_STALE); /* the old token stays dead */
    CHECK_RC(shmfeed_commit(ring, &second, 64), SHMFEED_OK);
    CHECK(consume(ring, 0, 64, 0x11) == 0);
    CHECK_RC(shmfeed_counters_read(ring, &k), SHMFEED_OK);
    CHECK_EQ(k.claims, 2);
    CHECK_EQ(k.aborts, 1);
    CHECK_EQ(k.commits, 1);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_reclaim_frees_a_dead_owners_claims(void)
{
    shmfeed_ring *ring = make_ring(4, 64, SHMFEED_ORDERED);
    shmfeed_claimed a0, a1, b2, c0, c1;
    shmfeed_counters k;
    shmfeed_slot_info info;
    uint64_t seqs[4] = {0};
    uint32_t n = 99;
    CHECK(ring);
    CHECK_RC(shmfeed_claim(ring, 0, OWNER_A, 0, &a0), SHMFEED_OK);
    CHECK_RC(shmfeed_claim(ring, 1, OWNER_A, 0, &a1), SHMFEED_OK);
    CHECK_RC(shmfeed_claim(ring, 2, OWNER_B, 0, &b2), SHMFEED_OK);

    CHECK_RC(shmfeed_reclaim(ring, OWNER_A, seqs, 4, &n), SHMFEED_OK);
    CHECK_EQ(n, 2);
    CHECK_EQ(seqs[0], 0);
    CHECK_EQ(seqs[1], 1);
    for (uint32_t s = 0; s < 2; s++) {
        CHECK_RC(shmfeed_slot_info_read(ring, s, &info), SHMFEED_OK);
        CHECK_EQ(info.state, SHMFEED_SLOT_FREE);
        CHECK_EQ(info.seq, s);
        CHECK_EQ(info.owner, 0);
        CHECK_EQ(info.generation, 1);
    }
    CHECK_EQ(slot_state(ring, 2), SHMFEED_SLOT_CLAIMED); /* another owner's claim stays */

    /* The stale owner wakes up: its commit and abort are refused. */
    CHECK_RC(shmfeed_commit(ring, &a0, 8), SHMFEED_E_STALE);
    CHECK_RC(shmfeed_abort(ring, &a1), SHMFEED_E_STALE);

    /* The batches are re-issued to a live owner and delivered once, in order. */
    CHECK_RC(shmfeed_claim(ring, 0, OWNER_C, 0, &c0), SHMFEED_OK);
    CHECK_RC(shmfeed_claim(ring, 1, OWNER_C, 0, &c1), SHMFEED_OK);
    memset(slot_data(ring, 0), 0xc0, 8);
    memset(slot_data(ring, 1), 0xc1, 8);
    memset(slot_data(ring, 2), 0xb2, 8);
    CHECK_RC(shmfeed_commit(ring, &b2, 8), SHMFEED_OK);
    CHECK_RC(shmfeed_commit(ring, &c1, 8), SHMFEED_OK);
    CHECK_RC(shmfeed_commit(ring, &a0, 8), SHMFEED_E_STALE); /* still stale after the re-claim */
    CHECK_RC(shmfeed_commit(ring, &c0, 8), SHMFEED_OK);
    CHECK(consume(ring, 0, 8, 0xc0) == 0);
    CHECK(consume(ring, 1, 8, 0xc1) == 0);
    CHECK(consume(ring, 2, 8, 0xb2) == 0);

    /* Nothing left to take back. */
    CHECK_RC(shmfeed_reclaim(ring, OWNER_A, seqs, 4, &n), SHMFEED_OK);
    CHECK_EQ(n, 0);
    CHECK_RC(shmfeed_counters_read(ring, &k), SHMFEED_OK);
    CHECK_EQ(k.reclaims, 2);
    CHECK_EQ(k.stale_commits, 3);
    CHECK_EQ(k.commits, 3);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_reclaim_reports_overflow_and_bad_arguments(void)
{
    shmfeed_ring *ring = make_ring(4, 64, SHMFEED_ORDERED);
    shmfeed_claimed c;
    uint64_t seqs[1] = {99};
    uint32_t n = 0;
    CHECK(ring);
    for (uint64_t seq = 0; seq < 3; seq++)
        CHECK_RC(shmfeed_claim(ring, seq, OWNER_A, 0, &c), SHMFEED_OK);
    CHECK_RC(shmfeed_reclaim(ring, OWNER_A, seqs, 1, &n), SHMFEED_E_TOOBIG); /* all freed, 1 reported */
    CHECK_EQ(n, 3);
    CHECK_EQ(seqs[0], 0);
    for (uint32_t s = 0; s < 3; s++)
        CHECK_EQ(slot_state(ring, s), SHMFEED_SLOT_FREE);
    CHECK_RC(shmfeed_reclaim(ring, 0, seqs, 1, &n), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_reclaim(ring, OWNER_A, NULL, 1, &n), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_reclaim(ring, OWNER_A, seqs, 1, NULL), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_reclaim(ring, OWNER_A, NULL, 0, &n), SHMFEED_OK); /* just count */
    CHECK_EQ(n, 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* A producer that died between its two CASes leaves its token in `owner`
 * (the owner lock) with the slot word FREE or READY; reclaim clears both
 * cases and re-issues nothing, since no claim was taken or the commit won. */
static int test_reclaim_after_death_between_steps(void)
{
    shmfeed_ring *ring = make_ring(2, 64, SHMFEED_ORDERED);
    shmfeed_claimed c;
    shmfeed_slot_info info;
    uint64_t seqs[2];
    uint32_t n = 99;
    CHECK(ring);
    /* Died holding the owner lock of FREE slot 0: nobody can claim batch 0. */
    atomic_store(&slot_desc(ring, 0)->owner, OWNER_A);
    CHECK_RC(shmfeed_claim(ring, 0, OWNER_B, 0, &c), SHMFEED_E_AGAIN);
    CHECK_RC(shmfeed_reclaim(ring, OWNER_A, seqs, 2, &n), SHMFEED_OK);
    CHECK_EQ(n, 0);
    CHECK_RC(shmfeed_slot_info_read(ring, 0, &info), SHMFEED_OK);
    CHECK_EQ(info.state, SHMFEED_SLOT_FREE);
    CHECK_EQ(info.owner, 0);
    CHECK_EQ(info.generation, 1); /* the dead producer's pending CAS would fail */
    CHECK(produce(ring, 0, OWNER_B, 4, 0xb0) == 0);

    /* Died after its commit CAS, before unlocking: the batch is delivered. */
    CHECK(produce(ring, 1, OWNER_A, 4, 0xa1) == 0);
    atomic_store(&slot_desc(ring, 1)->owner, OWNER_A);
    CHECK_RC(shmfeed_reclaim(ring, OWNER_A, seqs, 2, &n), SHMFEED_OK);
    CHECK_EQ(n, 0);
    CHECK_RC(shmfeed_slot_info_read(ring, 1, &info), SHMFEED_OK);
    CHECK_EQ(info.state, SHMFEED_SLOT_READY);
    CHECK_EQ(info.owner, 0);
    CHECK(consume(ring, 0, 4, 0xb0) == 0);
    CHECK(consume(ring, 1, 4, 0xa1) == 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* A producer killed right after its claim CAS has stored nothing else yet:
 * reclaim must re-issue the batch the slot word says was claimed, not the
 * batch the slot held one lap earlier (that one was delivered already). */
static int test_reclaim_reports_the_claimed_seq_of_a_cut_short_claim(void)
{
    shmfeed_ring *ring = make_ring(2, 64, SHMFEED_ORDERED);
    shm_slot_desc *d;
    uint64_t seqs[2] = {99, 99};
    uint32_t n = 0;
    CHECK(ring);
    CHECK(produce(ring, 0, OWNER_B, 4, 0) == 0);
    CHECK(consume(ring, 0, 4, 0) == 0); /* slot 0 is now free for batch 2 */
    d = slot_desc(ring, 0);
    uint64_t w = atomic_load(&d->word);
    CHECK_EQ(word_seq(w), 2);
    atomic_store(&d->owner, OWNER_A);                                          /* its owner lock ... */
    atomic_store(&d->word, word_make(word_gen(w), 2, SHMFEED_SLOT_CLAIMED));   /* ... and its claim CAS */
    CHECK_RC(shmfeed_reclaim(ring, OWNER_A, seqs, 2, &n), SHMFEED_OK);
    CHECK_EQ(n, 1);
    CHECK_EQ(seqs[0], 2);
    CHECK(produce(ring, 1, OWNER_B, 4, 1) == 0);
    CHECK(produce(ring, 2, OWNER_B, 4, 2) == 0); /* the re-issued batch goes through */
    CHECK(consume(ring, 1, 4, 1) == 0);
    CHECK(consume(ring, 2, 4, 2) == 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* ---- unordered mode ----------------------------------------------------- */

static int test_unordered_delivers_in_commit_order(void)
{
    shmfeed_ring *ring = make_ring(4, 64, 0);
    shmfeed_claimed c[4];
    static const int commit_order[4] = {2, 0, 3, 1};
    CHECK(ring);
    for (int round = 0; round < 3; round++) {
        uint64_t first = 100 + 10 * (uint64_t)round;
        uint32_t used = 0;
        for (int i = 0; i < 4; i++) {
            CHECK_RC(shmfeed_claim(ring, first + (uint64_t)i, OWNER_A + (uint64_t)i, 0, &c[i]), SHMFEED_OK);
            CHECK_EQ(c[i].seq, first + (uint64_t)i);
            CHECK((used & (1u << c[i].slot)) == 0); /* four claims, four different slots */
            used |= 1u << c[i].slot;
        }
        shmfeed_claimed extra;
        CHECK_RC(shmfeed_claim(ring, first + 4, OWNER_A, 0, &extra), SHMFEED_E_AGAIN); /* full */
        for (int k = 0; k < 4; k++) {
            int i = commit_order[(k + round) % 4];
            memset(slot_data(ring, c[i].slot), 0x10 + i, (size_t)i + 1);
            CHECK_RC(shmfeed_commit(ring, &c[i], (uint64_t)i + 1), SHMFEED_OK);
        }
        for (int k = 0; k < 4; k++) {
            int i = commit_order[(k + round) % 4];
            CHECK(consume(ring, first + (uint64_t)i, (uint64_t)i + 1, (uint8_t)(0x10 + i)) == 0);
        }
        shmfeed_acquired a;
        CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_E_AGAIN);
    }
    int32_t committed;
    CHECK_RC(shmfeed_seq_committed(ring, 100, &committed), SHMFEED_E_INVAL); /* ordered mode only */
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* A slot released mid-round is claimed again while others are in flight. */
static int test_unordered_reuses_released_slots(void)
{
    shmfeed_ring *ring = make_ring(2, 64, 0);
    shmfeed_claimed c;
    shmfeed_acquired a;
    CHECK(ring);
    CHECK(produce(ring, 7, OWNER_A, 1, 7) == 0);
    CHECK(produce(ring, 3, OWNER_B, 1, 3) == 0);
    CHECK_RC(shmfeed_claim(ring, 9, OWNER_A, 0, &c), SHMFEED_E_AGAIN);
    CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_OK);
    CHECK_EQ(a.seq, 7);
    CHECK_RC(shmfeed_claim(ring, 9, OWNER_A, 0, &c), SHMFEED_E_AGAIN); /* acquired is not free */
    CHECK_RC(shmfeed_release(ring, &a), SHMFEED_OK);
    CHECK_RC(shmfeed_claim(ring, 9, OWNER_A, 0, &c), SHMFEED_OK);
    CHECK_EQ(c.slot, a.slot);
    memset(slot_data(ring, c.slot), 9, 1);
    CHECK_RC(shmfeed_commit(ring, &c, 1), SHMFEED_OK);
    CHECK(consume(ring, 3, 1, 3) == 0);
    CHECK(consume(ring, 9, 1, 9) == 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* Claims that name no sequence take the segment's counter: distinct across handles
 * (processes), none used by a claim that finds no free slot, refused on ordered rings. */
static int test_unordered_claim_next_takes_the_segments_counter(void)
{
    shmfeed_ring *ring = make_ring(3, 64, 0), *peer = NULL, *ordered_ring = make_ring(2, 64, SHMFEED_ORDERED);
    shmfeed_claimed c0, c1, c2, c;
    shmfeed_acquired a;
    char path[128], err[256];
    CHECK(ring && ordered_ring);
    CHECK_RC(shmfeed_ring_path(ring, path, sizeof path), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_attach(path, &peer, err, sizeof err), SHMFEED_OK);
    CHECK_RC(shmfeed_claim_next(ring, OWNER_A, 0, &c0), SHMFEED_OK);
    CHECK_RC(shmfeed_claim_next(peer, OWNER_B, 0, &c1), SHMFEED_OK);
    CHECK_RC(shmfeed_claim_next(ring, OWNER_A, 0, &c2), SHMFEED_OK);
    CHECK_EQ(c0.seq, 0);
    CHECK_EQ(c1.seq, 1);
    CHECK_EQ(c2.seq, 2);
    CHECK_RC(shmfeed_claim_next(peer, OWNER_B, 0, &c), SHMFEED_E_AGAIN); /* full: takes no sequence */
    CHECK_RC(shmfeed_commit(peer, &c1, 1), SHMFEED_OK);
    CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_OK);
    CHECK_EQ(a.seq, 1);
    CHECK_RC(shmfeed_release(ring, &a), SHMFEED_OK);
    CHECK_RC(shmfeed_claim_next(peer, OWNER_B, 0, &c), SHMFEED_OK);
    CHECK_EQ(c.seq, 3);
    CHECK_RC(shmfeed_claim_next(ordered_ring, OWNER_A, 0, &c), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_claim_next(ring, 0, 0, &c), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_ring_detach(peer), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_detach(ordered_ring), SHMFEED_OK);
    return 0;
}

static int test_unordered_abort_and_reclaim(void)
{
    shmfeed_ring *ring = make_ring(3, 64, 0);
    shmfeed_claimed a10, a11, b12, c;
    uint64_t seqs[3];
    uint32_t n;
    CHECK(ring);
    CHECK_RC(shmfeed_claim(ring, 10, OWNER_A, 0, &a10), SHMFEED_OK);
    CHECK_RC(shmfeed_claim(ring, 11, OWNER_A, 0, &a11), SHMFEED_OK);
    CHECK_RC(shmfeed_claim(ring, 12, OWNER_B, 0, &b12), SHMFEED_OK);
    CHECK_RC(shmfeed_claim(ring, 13, OWNER_C, 0, &c), SHMFEED_E_AGAIN);

    CHECK_RC(shmfeed_reclaim(ring, OWNER_A, seqs, 3, &n), SHMFEED_OK);
    CHECK_EQ(n, 2);
    CHECK((seqs[0] == 10 && seqs[1] == 11) || (seqs[0] == 11 && seqs[1] == 10));
    CHECK_RC(shmfeed_commit(ring, &a10, 1), SHMFEED_E_STALE);

    CHECK_RC(shmfeed_abort(ring, &b12), SHMFEED_OK);
    CHECK_RC(shmfeed_commit(ring, &b12, 1), SHMFEED_E_STALE);

    /* Three free slots again; the re-issued batches go through. */
    CHECK(produce(ring, 11, OWNER_C, 2, 11) == 0);
    CHECK(produce(ring, 12, OWNER_C, 2, 12) == 0);
    CHECK(produce(ring, 10, OWNER_C, 2, 10) == 0);
    CHECK(consume(ring, 11, 2, 11) == 0);
    CHECK(consume(ring, 12, 2, 12) == 0);
    CHECK(consume(ring, 10, 2, 10) == 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* ---- timeouts ------------------------------------------------------------ */

/* Zero timeout: E_AGAIN at once, and no wait is counted. A positive one:
 * E_TIMEOUT after at least that long; long timeouts span several slices. */
static int check_timeouts(uint32_t flags)
{
    shmfeed_ring *ring = make_ring(2, 64, flags);
    shmfeed_claimed c;
    shmfeed_acquired a;
    shmfeed_counters k;
    CHECK(ring);
    CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_E_AGAIN);
    uint64_t t0 = shmfeed_now_ns();
    CHECK_RC(shmfeed_acquire(ring, 20 * MS, &a), SHMFEED_E_TIMEOUT);
    uint64_t t1 = shmfeed_now_ns();
    CHECK(t1 - t0 >= 20 * MS);

    /* Fill the ring so that the next claim must wait. */
    CHECK_RC(shmfeed_claim(ring, 0, OWNER_A, 0, &c), SHMFEED_OK);
    CHECK_RC(shmfeed_claim(ring, 1, OWNER_A, 0, &c), SHMFEED_OK);
    CHECK_RC(shmfeed_claim(ring, 2, OWNER_A, 0, &c), SHMFEED_E_AGAIN);
    int64_t slice = shmfeed_wait_slice_ns();
    int64_t longer = slice * 2 + slice / 2;
    t0 = shmfeed_now_ns();
    CHECK_RC(shmfeed_claim(ring, 2, OWNER_A, longer, &c), SHMFEED_E_TIMEOUT);
    t1 = shmfeed_now_ns();
    CHECK(t1 - t0 >= (uint64_t)longer);

    CHECK_RC(shmfeed_counters_read(ring, &k), SHMFEED_OK);
    CHECK_EQ(k.consumer_waits, 1);
    CHECK(k.consumer_wait_ns >= 20 * MS);
    CHECK_EQ(k.producer_waits, 1);
    CHECK(k.producer_wait_ns >= (uint64_t)longer);
    CHECK_EQ(k.claims, 2);
    CHECK_EQ(k.acquires, 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_timeouts_ordered(void) { return check_timeouts(SHMFEED_ORDERED); }
static int test_timeouts_unordered(void) { return check_timeouts(0); }

/* ---- blocked waiters: woken by progress, and by close -------------------- */

typedef enum { WAIT_ACQUIRE, WAIT_CLAIM } wait_kind;

typedef struct waiter {
    shmfeed_ring *ring;
    wait_kind kind;
    uint64_t seq;          /* WAIT_CLAIM: the batch to claim */
    int64_t timeout_ns;
    int rc;
    uint64_t seq_out;
    uint64_t returned_ns;
    pthread_t thread;
} waiter;

static void *waiter_main(void *arg)
{
    waiter *w = arg;
    if (w->kind == WAIT_ACQUIRE) {
        shmfeed_acquired a = {0};
        w->rc = shmfeed_acquire(w->ring, w->timeout_ns, &a);
        w->seq_out = a.seq;
        if (w->rc == SHMFEED_OK)
            shmfeed_release(w->ring, &a);
    } else {
        shmfeed_claimed c = {0};
        w->rc = shmfeed_claim(w->ring, w->seq, OWNER_C, w->timeout_ns, &c);
        w->seq_out = c.seq;
        if (w->rc == SHMFEED_OK)
            shmfeed_commit(w->ring, &c, 0);
    }
    w->returned_ns = shmfeed_now_ns();
    return NULL;
}

static int start_waiter(waiter *w, shmfeed_ring *ring, wait_kind kind, uint64_t seq, int64_t timeout_ns)
{
    w->ring = ring;
    w->kind = kind;
    w->seq = seq;
    w->timeout_ns = timeout_ns;
    w->rc = 1;
    return pthread_create(&w->thread, NULL, waiter_main, w);
}

/* Block until `n` threads sleep on `waiters` (so that the next step must
 * wake them), then give them a moment to enter the futex wait. */
static int wait_for_sleepers(atomic_u32 *waiters, uint32_t n)
{
    for (int i = 0; i < 5000; i++) {
        if (atomic_load(waiters) >= n) {
            usleep(5000);
            return 0;
        }
        usleep(1000);
    }
    fprintf(stderr, "nobody went to sleep within 5 s\n");
    return -1;
}

/* Where a waiter of this kind sleeps. Ordered: on the slot word of its
 * batch; unordered: on the commit (consumer) or release (producer) event. */
static atomic_u32 *sleep_word(shmfeed_ring *ring, uint32_t flags, wait_kind kind, uint32_t slot)
{
    if (flags & SHMFEED_ORDERED)
        return &slot_desc(ring, slot)->waiters;
    return kind == WAIT_ACQUIRE ? &ring_counters_page(ring)->committed.waiters
                                : &ring_counters_page(ring)->released.waiters;
}

/* A futex wake takes microseconds; a missed one leaves the sleeper to notice
 * at the end of its slice, 40+ ms later (it slept for 5 ms already). Half a
 * slice tells the two apart with room for a loaded machine. */
static uint64_t wake_limit_ns(void) { return (uint64_t)shmfeed_wait_slice_ns() / 2; }

static int check_woken_promptly(const waiter *w, uint64_t event_ns, const char *what)
{
    uint64_t took = w->returned_ns - event_ns;
    if (took > wake_limit_ns())
        fprintf(stderr, "%s woke %.1f ms after the event; limit %.1f ms\n", what, took / 1e6,
                wake_limit_ns() / 1e6);
    return took <= wake_limit_ns() ? 0 : -1;
}

static int check_commit_wakes_acquire(uint32_t flags)
{
    shmfeed_ring *ring = make_ring(2, 64, flags);
    waiter w;
    CHECK(ring);
    CHECK(start_waiter(&w, ring, WAIT_ACQUIRE, 0, 10000 * MS) == 0);
    CHECK(wait_for_sleepers(sleep_word(ring, flags, WAIT_ACQUIRE, 0), 1) == 0);
    uint64_t event_ns = shmfeed_now_ns();
    CHECK(produce(ring, 0, OWNER_A, 4, 0) == 0);
    CHECK(pthread_join(w.thread, NULL) == 0);
    CHECK_RC(w.rc, SHMFEED_OK);
    CHECK_EQ(w.seq_out, 0);
    CHECK(check_woken_promptly(&w, event_ns, "acquire") == 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int check_release_wakes_claim(uint32_t flags)
{
    shmfeed_ring *ring = make_ring(2, 64, flags);
    waiter w;
    CHECK(ring);
    CHECK(produce(ring, 0, OWNER_A, 4, 0) == 0);
    CHECK(produce(ring, 1, OWNER_A, 4, 1) == 0);
    CHECK(start_waiter(&w, ring, WAIT_CLAIM, 2, 10000 * MS) == 0); /* ring full: waits */
    CHECK(wait_for_sleepers(sleep_word(ring, flags, WAIT_CLAIM, 0), 1) == 0);
    uint64_t event_ns = shmfeed_now_ns();
    CHECK(consume(ring, 0, 4, 0) == 0);
    CHECK(pthread_join(w.thread, NULL) == 0);
    CHECK_RC(w.rc, SHMFEED_OK);
    CHECK_EQ(w.seq_out, 2);
    CHECK(check_woken_promptly(&w, event_ns, "claim") == 0);
    CHECK(consume(ring, 1, 4, 1) == 0);
    CHECK(consume(ring, 2, 0, 0) == 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* The only free slot's owner lock is still held by a committer that has
 * not unlocked yet (its READY CAS is done and the batch already consumed).
 * Unlocking wakes nobody, so the claimer must poll for it rather than sleep
 * until the next release or the end of its slice. */
static int check_claim_proceeds_when_owner_unlocks(uint32_t flags)
{
    shmfeed_ring *ring = make_ring(1, 64, flags);
    waiter w;
    CHECK(ring);
    atomic_store(&slot_desc(ring, 0)->owner, OWNER_A);
    CHECK(start_waiter(&w, ring, WAIT_CLAIM, 0, 10000 * MS) == 0);
    usleep(10000);
    uint64_t event_ns = shmfeed_now_ns();
    uint64_t mine = OWNER_A;
    CHECK(atomic_compare_exchange_strong(&slot_desc(ring, 0)->owner, &mine, 0)); /* commit's unlock */
    CHECK(pthread_join(w.thread, NULL) == 0);
    CHECK_RC(w.rc, SHMFEED_OK);
    CHECK(check_woken_promptly(&w, event_ns, "claim") == 0);
    CHECK(consume(ring, 0, 0, 0) == 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_claim_proceeds_when_owner_unlocks_ordered(void)
{
    return check_claim_proceeds_when_owner_unlocks(SHMFEED_ORDERED);
}
static int test_claim_proceeds_when_owner_unlocks_unordered(void) { return check_claim_proceeds_when_owner_unlocks(0); }

static int test_commit_wakes_acquire_ordered(void) { return check_commit_wakes_acquire(SHMFEED_ORDERED); }
static int test_commit_wakes_acquire_unordered(void) { return check_commit_wakes_acquire(0); }
static int test_release_wakes_claim_ordered(void) { return check_release_wakes_claim(SHMFEED_ORDERED); }
static int test_release_wakes_claim_unordered(void) { return check_release_wakes_claim(0); }

/* A consumer blocked in acquire and a producer blocked in claim, both with
 * no timeout, return E_CLOSED within one wait slice of close() (within half
 * of one, in fact: close wakes them rather than waiting for their slice). */
static int check_close_wakes_waiters(uint32_t flags)
{
    shmfeed_ring *ring = make_ring(2, 64, flags);
    waiter consumer, producer;
    shmfeed_claimed c;
    CHECK(ring);
    /* Slot 0 claimed and never committed: the consumer waits for batch 0,
     * and (ring full) the producer waits for a free slot for batch 2. */
    CHECK_RC(shmfeed_claim(ring, 0, OWNER_A, 0, &c), SHMFEED_OK);
    CHECK_RC(shmfeed_claim(ring, 1, OWNER_B, 0, &c), SHMFEED_OK);
    CHECK(start_waiter(&consumer, ring, WAIT_ACQUIRE, 0, -1) == 0);
    CHECK(start_waiter(&producer, ring, WAIT_CLAIM, 2, -1) == 0);
    if (flags & SHMFEED_ORDERED) { /* both sleep on slot 0's word */
        CHECK(wait_for_sleepers(sleep_word(ring, flags, WAIT_ACQUIRE, 0), 2) == 0);
    } else {
        CHECK(wait_for_sleepers(sleep_word(ring, flags, WAIT_ACQUIRE, 0), 1) == 0);
        CHECK(wait_for_sleepers(sleep_word(ring, flags, WAIT_CLAIM, 0), 1) == 0);
    }

    uint64_t closed_ns = shmfeed_now_ns();
    CHECK_RC(shmfeed_close(ring, 42, "producer 3 raised ValueError"), SHMFEED_OK);
    CHECK(pthread_join(consumer.thread, NULL) == 0);
    CHECK(pthread_join(producer.thread, NULL) == 0);
    CHECK_RC(consumer.rc, SHMFEED_E_CLOSED);
    CHECK_RC(producer.rc, SHMFEED_E_CLOSED);
    CHECK(check_woken_promptly(&consumer, closed_ns, "acquire") == 0);
    CHECK(check_woken_promptly(&producer, closed_ns, "claim") == 0);

    int32_t code;
    char msg[64];
    CHECK_RC(shmfeed_close_reason(ring, &code, msg, sizeof msg), SHMFEED_OK);
    CHECK_EQ(code, 42);
    CHECK(strcmp(msg, "producer 3 raised ValueError") == 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_close_wakes_waiters_ordered(void) { return check_close_wakes_waiters(SHMFEED_ORDERED); }
static int test_close_wakes_waiters_unordered(void) { return check_close_wakes_waiters(0); }

static int test_close_reason_and_after_close(void)
{
    shmfeed_ring *ring = make_ring(2, 64, SHMFEED_ORDERED), *peer;
    shmfeed_claimed c;
    shmfeed_acquired a;
    char path[128], err[256], msg[SHMFEED_CLOSE_MSG_BYTES + 16], small[6];
    int32_t code = 99;
    CHECK(ring);
    CHECK_RC(shmfeed_ring_path(ring, path, sizeof path), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_attach(path, &peer, err, sizeof err), SHMFEED_OK);
    CHECK_RC(shmfeed_close_reason(ring, &code, msg, sizeof msg), SHMFEED_OK);
    CHECK_EQ(code, 0);
    CHECK_EQ(msg[0], '\0');
    CHECK_RC(shmfeed_close(ring, 0, "zero means open"), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_close_reason(ring, &code, NULL, 0), SHMFEED_OK);
    CHECK_EQ(code, 0);

    /* A message longer than the header's field is cut, never overruns. */
    char long_msg[SHMFEED_CLOSE_MSG_BYTES + 100];
    memset(long_msg, 'x', sizeof long_msg - 1);
    long_msg[sizeof long_msg - 1] = '\0';
    long_msg[0] = 'E';
    CHECK_RC(shmfeed_close(peer, -3, long_msg), SHMFEED_OK); /* either side may close */
    CHECK_RC(shmfeed_close(ring, 5, "second close keeps the first reason"), SHMFEED_OK);
    CHECK_RC(shmfeed_close_reason(ring, &code, msg, sizeof msg), SHMFEED_OK);
    CHECK_EQ(code, -3);
    CHECK_EQ(strlen(msg), SHMFEED_CLOSE_MSG_BYTES - 1);
    CHECK_EQ(msg[0], 'E');
    CHECK_RC(shmfeed_close_reason(peer, &code, small, sizeof small), SHMFEED_OK);
    CHECK_EQ(code, -3);
    CHECK(strcmp(small, "Exxxx") == 0);

    /* Nothing waits on a closed ring, even without a timeout. */
    CHECK_RC(shmfeed_claim(ring, 0, OWNER_A, -1, &c), SHMFEED_E_CLOSED);
    CHECK_RC(shmfeed_acquire(ring, -1, &a), SHMFEED_E_CLOSED);
    CHECK_RC(shmfeed_acquire(peer, 0, &a), SHMFEED_E_CLOSED);
    CHECK_RC(shmfeed_ring_detach(peer), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);

    /* NULL message: closed with an empty reason. */
    ring = make_ring(1, 64, 0);
    CHECK(ring);
    CHECK_RC(shmfeed_close(ring, 1, NULL), SHMFEED_OK);
    CHECK_RC(shmfeed_close_reason(ring, &code, msg, sizeof msg), SHMFEED_OK);
    CHECK_EQ(code, 1);
    CHECK_EQ(msg[0], '\0');
    CHECK_RC(shmfeed_close_reason(ring, NULL, msg, sizeof msg), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* ---- counters and seq_committed -------------------------------------------- */

static int test_counters_follow_operations(void)
{
    shmfeed_ring *ring = make_ring(4, 64, SHMFEED_ORDERED);
    shmfeed_claimed c;
    shmfeed_counters k;
    CHECK(ring);
    CHECK_RC(shmfeed_counters_read(ring, &k), SHMFEED_OK);
    CHECK_EQ(k.claims + k.commits + k.aborts + k.acquires + k.releases + k.consumer_head, 0);

    CHECK(produce(ring, 0, OWNER_A, 1, 0) == 0);
    CHECK(produce(ring, 1, OWNER_A, 1, 1) == 0);
    CHECK_RC(shmfeed_claim(ring, 2, OWNER_A, 0, &c), SHMFEED_OK);
    CHECK_RC(shmfeed_abort(ring, &c), SHMFEED_OK);
    CHECK(consume(ring, 0, 1, 0) == 0);
    CHECK_RC(shmfeed_counters_read(ring, &k), SHMFEED_OK);
    CHECK_EQ(k.claims, 3);
    CHECK_EQ(k.commits, 2);
    CHECK_EQ(k.aborts, 1);
    CHECK_EQ(k.acquires, 1);
    CHECK_EQ(k.releases, 1);
    CHECK_EQ(k.consumer_head, 1);
    CHECK_EQ(k.stale_commits, 0);
    CHECK_EQ(k.reclaims, 0);
    CHECK_EQ(k.producer_waits, 0); /* nothing had to sleep */
    CHECK_EQ(k.consumer_waits, 0);

    CHECK(consume(ring, 1, 1, 1) == 0);
    CHECK_RC(shmfeed_counters_read(ring, &k), SHMFEED_OK);
    CHECK_EQ(k.acquires, 2);
    CHECK_EQ(k.releases, 2);
    CHECK_EQ(k.consumer_head, 2);
    CHECK_RC(shmfeed_counters_read(ring, NULL), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_seq_committed(void)
{
    shmfeed_ring *ring = make_ring(2, 64, SHMFEED_ORDERED);
    shmfeed_claimed c;
    shmfeed_acquired a;
    int32_t done = -1;
    CHECK(ring);
    CHECK_RC(shmfeed_seq_committed(ring, 0, &done), SHMFEED_OK);
    CHECK_EQ(done, 0);
    CHECK_RC(shmfeed_claim(ring, 0, OWNER_A, 0, &c), SHMFEED_OK);
    CHECK_RC(shmfeed_seq_committed(ring, 0, &done), SHMFEED_OK);
    CHECK_EQ(done, 0); /* claimed is not committed */
    CHECK_RC(shmfeed_commit(ring, &c, 1), SHMFEED_OK);
    CHECK_RC(shmfeed_seq_committed(ring, 0, &done), SHMFEED_OK);
    CHECK_EQ(done, 1);
    CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_OK);
    CHECK_RC(shmfeed_seq_committed(ring, 0, &done), SHMFEED_OK);
    CHECK_EQ(done, 1);
    CHECK_RC(shmfeed_release(ring, &a), SHMFEED_OK);
    CHECK_RC(shmfeed_seq_committed(ring, 0, &done), SHMFEED_OK);
    CHECK_EQ(done, 1); /* consumed still counts: the slot moved on to batch 2 */
    for (uint64_t seq = 1; seq < 6; seq++) {
        CHECK_RC(shmfeed_seq_committed(ring, seq, &done), SHMFEED_OK);
        CHECK_EQ(done, 0);
    }
    CHECK_RC(shmfeed_claim(ring, 2, OWNER_A, 0, &c), SHMFEED_OK);
    CHECK_RC(shmfeed_seq_committed(ring, 0, &done), SHMFEED_OK);
    CHECK_EQ(done, 1);
    CHECK_RC(shmfeed_seq_committed(ring, 2, &done), SHMFEED_OK);
    CHECK_EQ(done, 0);
    CHECK_RC(shmfeed_seq_committed(ring, 0, NULL), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* ---- scribbled descriptors ------------------------------------------------ */

/* A descriptor no protocol step could have written is CORRUPT at once, and an acquire
 * that refuses moves nothing: the slot stays READY, the head stays put. */
static int test_impossible_descriptors_are_corrupt_and_move_nothing(void)
{
    shmfeed_ring *ring = make_ring(4, 64, SHMFEED_ORDERED);
    shmfeed_acquired a;
    shmfeed_claimed c;
    CHECK(ring);
    CHECK(produce(ring, 0, OWNER_A, 8, 1) == 0);
    shm_slot_desc *d = slot_desc(ring, 0);

    store_relaxed64(&d->payload_len, 65); /* READY(0), but longer than the slot */
    CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_E_CORRUPT);
    CHECK_RC(shmfeed_acquire(ring, 50 * MS, &a), SHMFEED_E_CORRUPT);
    CHECK_EQ(slot_state(ring, 0), SHMFEED_SLOT_READY);
    CHECK_EQ(load_relaxed64(&ring_counters_page(ring)->consumer.head), 0);
    store_relaxed64(&d->payload_len, 8); /* repaired: the batch is still there to take */
    CHECK(consume(ring, 0, 8, 1) == 0);

    /* The consumer at batch 1 looks at slot 1: a sequence that slot never holds, in each state. */
    for (uint64_t st = 0; st < 4; st++) {
        uint64_t saved = load_relaxed64(&slot_desc(ring, 1)->word);
        store_relaxed64(&slot_desc(ring, 1)->word, word_make(0, 1 + 4 * 1000, st));
        CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_E_CORRUPT);
        CHECK_RC(shmfeed_acquire(ring, 50 * MS, &a), SHMFEED_E_CORRUPT); /* not a timeout */
        store_relaxed64(&slot_desc(ring, 1)->word, saved);
    }
    /* Legal ones still wait: free for batch 1, or batch 1 being written. */
    CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_E_AGAIN);
    /* A producer's slot whose sequence is not slot + k*N: nobody wrote it either. */
    store_relaxed64(&slot_desc(ring, 2)->word, word_make(0, 3, SHMFEED_SLOT_FREE));
    CHECK_RC(shmfeed_claim(ring, 2, OWNER_A, 50 * MS, &c), SHMFEED_E_CORRUPT);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* The consumer still holding batch h - N (it may hold several) is a legal sight, not corruption. */
static int test_consumer_holding_a_lap_behind_is_not_corrupt(void)
{
    shmfeed_ring *ring = make_ring(2, 64, SHMFEED_ORDERED);
    shmfeed_acquired held, a;
    CHECK(ring);
    CHECK(produce(ring, 0, OWNER_A, 1, 1) == 0);
    shmfeed_acquired none;
    CHECK_RC(shmfeed_acquire(ring, 0, &held), SHMFEED_OK); /* batch 0, kept */
    CHECK(produce(ring, 1, OWNER_A, 1, 2) == 0);
    CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_OK); /* batch 1 */
    CHECK_RC(shmfeed_acquire(ring, 20 * MS, &none), SHMFEED_E_TIMEOUT); /* slot 0: batch 0, acquired */
    CHECK_RC(shmfeed_release(ring, &held), SHMFEED_OK);
    CHECK_RC(shmfeed_release(ring, &a), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* ---- slot memory: reserved by the first claim (NOTE [slot memory]) ------- */

/* Bytes the ring's backing holds now (st_blocks): what has been reserved. */
static long long backing_bytes(shmfeed_ring *ring)
{
    char path[256];
    struct stat st;
    if (shmfeed_ring_path(ring, path, sizeof path) != SHMFEED_OK || stat(path, &st) != 0)
        return -1;
    return (long long)st.st_blocks * 512;
}

static int test_a_slot_gets_its_pages_at_its_first_claim(void)
{
    const uint64_t bytes = 1 << 20;
    shmfeed_ring *ring = make_ring(3, bytes, SHMFEED_ORDERED);
    shmfeed_geometry g;
    CHECK(ring);
    CHECK_RC(shmfeed_ring_geometry(ring, &g), SHMFEED_OK);
    long long at_create = backing_bytes(ring);
    CHECK(at_create >= (long long)SHMFEED_DESC_OFFSET);
    CHECK(at_create < (long long)(g.data_offset + bytes)); /* no slot's pages yet */
    CHECK_EQ(load_acquire32(&slot_desc(ring, 0)->backed), 0);
    CHECK(produce(ring, 0, OWNER_A, bytes, 7) == 0);
    CHECK_EQ(load_acquire32(&slot_desc(ring, 0)->backed), 1);
    CHECK_EQ(load_acquire32(&slot_desc(ring, 1)->backed), 0);
    CHECK(backing_bytes(ring) >= at_create + (long long)bytes);
    CHECK(consume(ring, 0, bytes, 7) == 0);
    CHECK(produce(ring, 1, OWNER_B, 1, 8) == 0); /* another owner, the next slot */
    CHECK_EQ(load_acquire32(&slot_desc(ring, 1)->backed), 1);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* In this process from now on, every fallocate fails with ENOSPC: the machine out of memory. */
static int fallocate_fails_from_now_on(void)
{
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_fallocate, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSPC & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {(unsigned short)(sizeof filter / sizeof filter[0]), filter};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
        return -1;
    return 0;
}

/* Memory gone between the ring's creation and a slot's first claim: the claim says so, takes
 * itself back, and the slot stays free for its batch; a claim with memory then succeeds. */
static int test_a_claim_with_no_memory_for_its_slot_is_taken_back(void)
{
    shmfeed_ring *ring = make_ring(2, 1 << 16, SHMFEED_ORDERED);
    shmfeed_slot_info info;
    shmfeed_counters k;
    int status;
    CHECK(ring);
    pid_t child = fork();
    CHECK(child >= 0);
    if (child == 0) {
        shmfeed_claimed c;
        if (fallocate_fails_from_now_on() != 0)
            _exit(T_EXIT_SKIP);
        int rc = shmfeed_claim(ring, 0, OWNER_A, 0, &c);
        _exit(rc == SHMFEED_E_NOMEM ? 0 : 10 + (rc < 0 ? -rc : rc));
    }
    CHECK(waitpid(child, &status, 0) == child);
    CHECK(WIFEXITED(status));
    if (WEXITSTATUS(status) == T_EXIT_SKIP) {
        fprintf(stderr, "  (seccomp unavailable: %s checked the claim path only)\n", __func__);
    } else {
        CHECK_EQ(WEXITSTATUS(status), 0); /* the claim returned SHMFEED_E_NOMEM */
        CHECK_RC(shmfeed_slot_info_read(ring, 0, &info), SHMFEED_OK);
        CHECK_EQ(info.state, SHMFEED_SLOT_FREE);
        CHECK_EQ(info.seq, 0);
        CHECK_EQ(info.owner, 0);
        CHECK_EQ(load_acquire32(&slot_desc(ring, 0)->backed), 0);
        CHECK_RC(shmfeed_counters_read(ring, &k), SHMFEED_OK);
        CHECK_EQ(k.aborts, 1);
    }
    CHECK(produce(ring, 0, OWNER_B, 1 << 16, 3) == 0);
    CHECK_EQ(load_acquire32(&slot_desc(ring, 0)->backed), 1);
    CHECK(consume(ring, 0, 1 << 16, 3) == 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

int main(void)
{
    int failures = 0;
    alarm(120); /* a waiter that never wakes fails the test instead of hanging it */
    RUN(failures, test_ordered_claim_commit_acquire_release);
    RUN(failures, test_ordered_producers_stop_one_lap_ahead);
    RUN(failures, test_ordered_delivers_in_sequence_order);
    RUN(failures, test_claim_of_committed_seq_is_stale);
    RUN(failures, test_commit_twice_is_state_error);
    RUN(failures, test_release_twice_or_unacquired_is_an_error);
    RUN(failures, test_payload_longer_than_slot);
    RUN(failures, test_bad_arguments);
    RUN(failures, test_abort_then_claim_same_seq);
    RUN(failures, test_reclaim_frees_a_dead_owners_claims);
    RUN(failures, test_reclaim_reports_overflow_and_bad_arguments);
    RUN(failures, test_reclaim_after_death_between_steps);
    RUN(failures, test_reclaim_reports_the_claimed_seq_of_a_cut_short_claim);
    RUN(failures, test_unordered_delivers_in_commit_order);
    RUN(failures, test_unordered_reuses_released_slots);
    RUN(failures, test_unordered_claim_next_takes_the_segments_counter);
    RUN(failures, test_unordered_abort_and_reclaim);
    RUN(failures, test_timeouts_ordered);
    RUN(failures, test_timeouts_unordered);
    RUN(failures, test_commit_wakes_acquire_ordered);
    RUN(failures, test_commit_wakes_acquire_unordered);
    RUN(failures, test_release_wakes_claim_ordered);
    RUN(failures, test_release_wakes_claim_unordered);
    RUN(failures, test_claim_proceeds_when_owner_unlocks_ordered);
    RUN(failures, test_claim_proceeds_when_owner_unlocks_unordered);
    RUN(failures, test_close_wakes_waiters_ordered);
    RUN(failures, test_close_wakes_waiters_unordered);
    RUN(failures, test_close_reason_and_after_close);
    RUN(failures, test_counters_follow_operations);
    RUN(failures, test_seq_committed);
    RUN(failures, test_impossible_descriptors_are_corrupt_and_move_nothing);
    RUN(failures, test_consumer_holding_a_lap_behind_is_not_corrupt);
    RUN(failures, test_a_slot_gets_its_pages_at_its_first_claim);
    RUN(failures, test_a_claim_with_no_memory_for_its_slot_is_taken_back);
    if (failures)
        fprintf(stderr, "test_protocol: %d failed\n", failures);
    return failures ? T_EXIT_FAIL : T_EXIT_PASS;
}
