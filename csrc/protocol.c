/*
 * protocol.c — the slot state machine.
 *
 *           claim (producer)          commit (producer)
 *   FREE(s) ───────────────▶ CLAIMED(s) ───────────────▶ READY(s)
 *     ▲  ▲                      │                          │ acquire (consumer)
 *     │  └──── abort/reclaim ───┘                          ▼
 *     └──────────────── release (consumer) ───────── ACQUIRED(s)
 *             ordered: FREE(s+N)    unordered: FREE(lap+1)
 *
 * Every transition is one CAS on the slot word (layout.h), so exactly one
 * side wins each race: commit vs reclaim, claim vs claim. The owner word is
 * a small lock taken *before* the FREE->CLAIMED CAS: a producer that dies at
 * any instant leaves its token in `owner`, so reclaim(owner) finds every
 * slot it touched, and bumps the generation so a late CAS of the dead (or
 * paused) producer fails with SHMFEED_E_STALE.
 *
 * Ordered mode: batch s lives in slot s mod N; the word's sequence field is
 * the batch the slot is free for / holds (the Vyukov bounded-queue scheme).
 * Unordered mode: producers take any FREE slot; each commit takes a ticket
 * and the consumer acquires the READY slot with the smallest ticket, i.e. in
 * commit order. A producer that dies after taking a ticket leaves a gap that
 * nobody waits on.
 *
 * Sleeping: a sleeper increments a waiter count with a seq_cst RMW, re-checks
 * and then futex-waits on the low 32 bits of the word; a waker publishes the
 * new word and reads the waiter count with a seq_cst RMW, making the wake
 * syscall only if somebody sleeps (atomics.h states the pairing).
 *
 * Scribbled descriptors: a slot word that no protocol step could have written
 * (ordered mode: a sequence the ring could not have handed out on that slot)
 * is SHMFEED_E_CORRUPT at once, not a wait that times out forever. Every check
 * of shared data comes before the CAS that would change the slot, so an error
 * never leaves a slot moved that the caller has no token to move back.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <string.h>

#include "ring_internal.h"

#define SEQ_HALF (1ULL << (WORD_SEQ_BITS - 1))
/* Internal stand-in for "the segment's next sequence" (shmfeed_claim_next): callers' seqs are <= WORD_SEQ_MASK. */
#define NEXT_SEQ UINT64_MAX

int is_closed(const shmfeed_ring *r) { return load_acquire32(&ring_header(r)->closed) != 0; }
static int ordered(const shmfeed_ring *r) { return (r->flags & SHMFEED_ORDERED) != 0; }

/* a is after b in the 46-bit sequence space (wrap-safe). */
int seq_after(uint64_t a, uint64_t b)
{
    uint64_t d = (a - b) & WORD_SEQ_MASK;
    return d != 0 && d < SEQ_HALF;
}

void clock_begin(wait_clock *c, int64_t timeout_ns)
{
    c->timeout_ns = timeout_ns;
    c->start_ns = 0;
    c->deadline_ns = 0;
    c->waited = 0;
}

/* Called before each sleep; returns the status to give up with, or OK. */
SHMFEED_MUST_USE int clock_may_sleep(wait_clock *c)
{
    if (c->timeout_ns == 0)
        return SHMFEED_E_AGAIN;
    if (!c->waited) { /* read the clock only once a wait is needed */
        c->waited = 1;
        c->start_ns = shmfeed_clock_ns();
        if (c->timeout_ns > 0)
            c->deadline_ns = c->start_ns + (uint64_t)c->timeout_ns;
        return SHMFEED_OK;
    }
    if (c->deadline_ns && shmfeed_clock_ns() >= c->deadline_ns)
        return SHMFEED_E_TIMEOUT;
    return SHMFEED_OK;
}

void clock_account(const wait_clock *c, atomic_u64 *waits, atomic_u64 *wait_ns)
{
    if (!c->waited)
        return;
    add_relaxed64(waits, 1);
    add_relaxed64(wait_ns, shmfeed_clock_ns() - c->start_ns);
}

void sleep_on_word(shm_slot_desc *d, uint64_t seen, uint64_t deadline_ns)
{
    add_full32(&d->waiters, 1);
    /* Pairs with wake_word's RMW: either the waker sees us, or we see its word. */
    if (load_acquire64(&d->word) == seen)
        shmfeed_futex_wait(word_futex(&d->word), (uint32_t)seen, deadline_ns);
    sub_relaxed32(&d->waiters, 1);
}

void wake_word(shm_slot_desc *d)
{
    if (add_full32(&d->waiters, 0))
        shmfeed_futex_wake_all(word_futex(&d->word));
}

void sleep_on_event(shm_event *ev, uint32_t seen, uint64_t deadline_ns)
{
    add_full32(&ev->waiters, 1);
    if (load_acquire32(&ev->count) == seen)
        shmfeed_futex_wait(&ev->count, seen, deadline_ns);
    sub_relaxed32(&ev->waiters, 1);
}

void signal_event(shm_event *ev)
{
    add_release32(&ev->count, 1);
    if (add_full32(&ev->waiters, 0))
        shmfeed_futex_wake_all(&ev->count);
}

/* A short pause when the owner lock of a FREE slot is still held: either a
 * committer is about to clear it (nanoseconds) or its holder died and
 * reclaim will clear it. Owner changes do not wake futexes, so poll. */
static void pause_for_owner(int spins, uint64_t deadline_ns)
{
    if (spins < 64) {
        cpu_relax();
        return;
    }
    if (spins < 128) {
        sched_yield();
        return;
    }
    static atomic_u32 never_changes; /* a private word: just a bounded sleep */
    uint64_t ms = shmfeed_clock_ns() + 1000000ULL;
    shmfeed_futex_wait(&never_changes, 0, deadline_ns && deadline_ns < ms ? deadline_ns : ms);
}

/* Take the owner lock, then move the slot word from `w` (FREE) to CLAIMED.
 * Returns 1 on success, 0 if the slot moved on or the lock is held. */
SHMFEED_MUST_USE static int try_claim_slot(shmfeed_ring *r, uint32_t slot, uint64_t w, uint64_t seq, uint64_t owner,
                          shmfeed_claimed *out)
{
    shm_slot_desc *d = ring_desc(r, slot);
    uint64_t no_owner = 0;
    if (!cas64(&d->owner, &no_owner, owner))
        return 0;
    uint64_t claimed = word_make(word_gen(w), word_seq(w), SHMFEED_SLOT_CLAIMED);
    uint64_t expected = w;
    uint64_t mine = owner;
    /* batch_seq is published by the claim CAS below, not after it: a claimer
     * killed right after its CAS must not leave reclaim() the previous lap's
     * sequence. While we hold the lock and the word is still FREE(w), nobody
     * reads batch_seq and only reclaim (a generation bump) can move the word,
     * so the store cannot clobber a claimed, ready or acquired slot (unless
     * we are paused here long enough to be reclaimed ourselves: the hazard
     * every store of a stale producer has, like commit's payload_len). */
    if (load_acquire64(&d->word) != w) {
        cas64(&d->owner, &mine, 0);
        return 0;
    }
    /* Taken with the lock held and the slot still FREE, so a claim that waits or fails
     * takes none; only a reclaim between here and the CAS below (a generation bump)
     * loses one, leaving a gap as a producer that dies after its claim does. */
    if (seq == NEXT_SEQ)
        seq = add_relaxed64(&ring_work(r)->claim_seq, 1) & WORD_SEQ_MASK;
    store_relaxed64(&d->batch_seq, seq);
    if (!cas64(&d->word, &expected, claimed)) {
        cas64(&d->owner, &mine, 0); /* give the lock back unless reclaim already did */
        return 0;
    }
    store_relaxed64(&d->claim_ns, shmfeed_clock_ns());
    add_relaxed64(&ring_counters(r)->producer.claims, 1);
    out->slot = slot;
    out->reserved = 0;
    out->seq = seq;
    out->owner = owner;
    out->token = claimed;
    return 1;
}

SHMFEED_MUST_USE static int claim_ordered(shmfeed_ring *r, uint64_t seq, uint64_t owner, wait_clock *c,
                                          shmfeed_claimed *out)
{
    uint32_t slot = (uint32_t)(seq % r->slot_count);
    shm_slot_desc *d = ring_desc(r, slot);
    uint64_t want = seq & WORD_SEQ_MASK;
    int spins = 0, rc;
    for (;;) {
        if ((rc = shmfeed_backing_check(r, 0)))
            return rc;
        if (is_closed(r))
            return SHMFEED_E_CLOSED;
        uint64_t w = load_acquire64(&d->word); /* pairs with release()/abort()/reclaim() */
        uint64_t s = word_seq(w), st = word_state(w);
        if (s == want && st == SHMFEED_SLOT_FREE) {
            if ((rc = shmfeed_backing_check(r, 1))) /* the slot's pages are all there: checked last */
                return rc;
            if (try_claim_slot(r, slot, w, seq, owner, out))
                return SHMFEED_OK;
            if ((rc = clock_may_sleep(c)))
                return rc;
            pause_for_owner(spins++, c->deadline_ns);
            continue;
        }
        /* Slot i only ever holds sequences i, i + N, i + 2N...: any other was written by no
         * claim or release (sequences stay below 2^46 - N, where the 46-bit field would wrap). */
        if (s % r->slot_count != slot)
            return SHMFEED_E_CORRUPT;
        /* Batch `seq` was already committed: a duplicate claim. */
        if (seq_after(s, want) || (s == want && st >= SHMFEED_SLOT_READY))
            return SHMFEED_E_STALE;
        if ((rc = clock_may_sleep(c)))
            return rc;
        sleep_on_word(d, w, c->deadline_ns);
    }
}

SHMFEED_MUST_USE static int claim_unordered(shmfeed_ring *r, uint64_t seq, uint64_t owner, wait_clock *c,
                                            shmfeed_claimed *out)
{
    shm_event *released = &ring_counters(r)->released;
    int rc, spins = 0;
    for (;;) {
        if ((rc = shmfeed_backing_check(r, 1)))
            return rc;
        if (is_closed(r))
            return SHMFEED_E_CLOSED;
        uint32_t seen = load_acquire32(&released->count);
        uint32_t start = load_relaxed32(&r->scan_hint);
        int owner_held = 0; /* a FREE slot whose owner lock is still held */
        for (uint32_t k = 0; k < r->slot_count; k++) {
            uint32_t slot = (start + k) % r->slot_count;
            atomic_u64 *word = &ring_desc(r, slot)->word;
            uint64_t w = load_acquire64(word);
            if (word_state(w) != SHMFEED_SLOT_FREE)
                continue;
            if (try_claim_slot(r, slot, w, seq, owner, out)) {
                store_relaxed32(&r->scan_hint, slot + 1);
                return SHMFEED_OK;
            }
            owner_held |= load_acquire64(word) == w; /* still FREE: the lock, not a rival claim */
        }
        if ((rc = clock_may_sleep(c)))
            return rc;
        /* The unlock that follows a commit signals nothing: poll for it, as
         * claim_ordered does, rather than sleep until the next release. */
        if (owner_held)
            pause_for_owner(spins++, c->deadline_ns);
        else
            sleep_on_event(released, seen, c->deadline_ns);
    }
}

SHMFEED_MUST_USE static int claim(shmfeed_ring *r, uint64_t seq, uint64_t owner, int64_t timeout_ns,
                                   shmfeed_claimed *out)
{
    wait_clock c;
    clock_begin(&c, timeout_ns);
    int rc = ordered(r) ? claim_ordered(r, seq, owner, &c, out) : claim_unordered(r, seq, owner, &c, out);
    if (rc != SHMFEED_OK && shmfeed_backing_check(r, 0))
        return SHMFEED_E_CORRUPT; /* what it read was the SIGBUS guard's zeros, not the ring */
    if (rc == SHMFEED_OK && (rc = shmfeed_slot_reserve(r, out->slot)) != SHMFEED_OK) {
        /* No memory for the slot's pages: give the claim back (the slot stays free for its
         * sequence), so the error is this call's and no write can fault. */
        if (shmfeed_abort(r, out) != SHMFEED_OK) {
            /* reclaimed or closed meanwhile: the slot is not ours either way */
        }
        memset(out, 0, sizeof *out);
    }
    shm_producer_counters *pc = &ring_counters(r)->producer;
    clock_account(&c, &pc->waits, &pc->wait_ns);
    return rc;
}

SHMFEED_MUST_USE int shmfeed_claim(shmfeed_ring *r, uint64_t seq, uint64_t owner, int64_t timeout_ns,
                                   shmfeed_claimed *out)
{
    if (!r || !out || owner == 0 || seq > WORD_SEQ_MASK)
        return SHMFEED_E_INVAL;
    return claim(r, seq, owner, timeout_ns, out);
}

SHMFEED_MUST_USE int shmfeed_claim_next(shmfeed_ring *r, uint64_t owner, int64_t timeout_ns, shmfeed_claimed *out)
{
    if (!r || !out || owner == 0 || ordered(r))
        return SHMFEED_E_INVAL;
    return claim(r, NEXT_SEQ, owner, timeout_ns, out);
}

SHMFEED_MUST_USE static int check_claim(const shmfeed_ring *r, const shmfeed_claimed *c)
{
    if (!r || !c || c->slot >= r->slot_count || word_state(c->token) != SHMFEED_SLOT_CLAIMED)
        return SHMFEED_E_INVAL;
    return SHMFEED_OK;
}

/* Why a CAS from the claim token failed. */
SHMFEED_MUST_USE static int claim_lost(shmfeed_ring *r, const shmfeed_claimed *c, uint64_t now)
{
    if (word_gen(now) == word_gen(c->token) && word_seq(now) == word_seq(c->token) &&
        word_state(now) >= SHMFEED_SLOT_READY)
        return SHMFEED_E_STATE; /* our own commit already happened: committed twice */
    /* A claim we aborted ourselves looks like one reclaim took back (both
     * bump the generation), so a commit after our own abort is reported as
     * stale too; the Python layer refuses it before it gets here. */
    if (is_closed(r))
        return SHMFEED_E_CLOSED;
    add_relaxed64(&ring_counters(r)->producer.stale_commits, 1);
    return SHMFEED_E_STALE;
}

SHMFEED_MUST_USE int shmfeed_commit(shmfeed_ring *r, const shmfeed_claimed *c, uint64_t payload_len)
{
    int rc;
    if ((rc = check_claim(r, c)) || (rc = shmfeed_backing_check(r, 0)))
        return rc;
    if (payload_len > r->slot_bytes)
        return SHMFEED_E_TOOBIG; /* the claim stays valid: abort it or commit less */
    shm_slot_desc *d = ring_desc(r, c->slot);
    uint64_t now = load_acquire64(&d->word);
    if (now != c->token) /* do not touch a descriptor that is no longer ours */
        return claim_lost(r, c, now);
    store_relaxed64(&d->payload_len, payload_len);
    store_relaxed64(&d->commit_ns, shmfeed_clock_ns());
    if (!ordered(r))
        store_relaxed64(&d->commit_order, add_relaxed64(&ring_counters(r)->producer.commit_order, 1));
    uint64_t expected = c->token;
    uint64_t ready = word_make(word_gen(c->token), word_seq(c->token), SHMFEED_SLOT_READY);
    /* Publishes the slot bytes, payload_len, commit_ns and commit_order;
     * pairs with the consumer's load_acquire of the word in acquire(). */
    if (!cas64(&d->word, &expected, ready))
        return claim_lost(r, c, expected);
    uint64_t mine = c->owner;
    cas64(&d->owner, &mine, 0); /* unlock; reclaim may have done it if we were slow */
    add_relaxed64(&ring_counters(r)->producer.commits, 1);
    if (ordered(r))
        wake_word(d);
    else
        signal_event(&ring_counters(r)->committed);
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_abort(shmfeed_ring *r, const shmfeed_claimed *c)
{
    int rc;
    if ((rc = check_claim(r, c)) || (rc = shmfeed_backing_check(r, 0)))
        return rc;
    shm_slot_desc *d = ring_desc(r, c->slot);
    uint64_t expected = c->token;
    /* A new generation, so the aborted token can never commit later. */
    uint64_t freed = word_make(word_gen(c->token) + 1, word_seq(c->token), SHMFEED_SLOT_FREE);
    if (!cas64(&d->word, &expected, freed))
        return claim_lost(r, c, expected);
    uint64_t mine = c->owner;
    cas64(&d->owner, &mine, 0);
    add_relaxed64(&ring_counters(r)->producer.aborts, 1);
    if (ordered(r))
        wake_word(d);
    else
        signal_event(&ring_counters(r)->released);
    return SHMFEED_OK;
}

/* Move READY slot `slot` (word w, payload length len already checked) to ACQUIRED. */
SHMFEED_MUST_USE static int take_ready(shmfeed_ring *r, uint32_t slot, uint64_t w, uint64_t len,
                                       shmfeed_acquired *out)
{
    shm_slot_desc *d = ring_desc(r, slot);
    uint64_t expected = w;
    uint64_t acquired = word_make(word_gen(w), word_seq(w), SHMFEED_SLOT_ACQUIRED);
    if (!cas64(&d->word, &expected, acquired))
        return 0;
    out->slot = slot;
    out->reserved = 0;
    out->seq = ordered(r) ? word_seq(w) : load_relaxed64(&d->batch_seq);
    out->payload_len = len;
    out->commit_ns = load_relaxed64(&d->commit_ns);
    out->token = acquired;
    return 1;
}

/* The payload length of a READY slot whose word the caller read with load_acquire (which
 * pairs with the commit CAS that published the length), or SHMFEED_E_CORRUPT if it does not
 * fit the slot. Read before the take: the length a caller gets is the one checked here. */
SHMFEED_MUST_USE static int ready_length(const shmfeed_ring *r, uint32_t slot, uint64_t *len)
{
    *len = load_relaxed64(&ring_desc(r, slot)->payload_len);
    if (*len > r->slot_bytes) /* never trust a length from shared memory */
        return SHMFEED_E_CORRUPT;
    return shmfeed_backing_check(r, 1); /* and the slot's pages must all be there */
}

/* Ordered mode: can the consumer, at head h, see word w on slot h mod N? Sequence h in any
 * state (free for it, claimed, ready; acquired only in the instant before a racing
 * consumer's head store), or sequence h - N acquired (the consumer still holds that batch:
 * it may hold several). Every other word was written by no protocol step. */
static int ordered_word_possible(const shmfeed_ring *r, uint64_t w, uint64_t head)
{
    uint64_t s = word_seq(w);
    if (s == (head & WORD_SEQ_MASK))
        return 1;
    return s == ((head - r->slot_count) & WORD_SEQ_MASK) && word_state(w) == SHMFEED_SLOT_ACQUIRED;
}

SHMFEED_MUST_USE int shmfeed_acquire(shmfeed_ring *r, int64_t timeout_ns, shmfeed_acquired *out)
{
    wait_clock c;
    int rc = SHMFEED_OK;
    if (!r || !out)
        return SHMFEED_E_INVAL;
    shm_counters *k = ring_counters(r);
    clock_begin(&c, timeout_ns);
    for (;;) {
        uint64_t len;
        if ((rc = shmfeed_backing_check(r, 0)))
            break;
        if (ordered(r)) {
            uint64_t head = load_relaxed64(&k->consumer.head); /* single consumer */
            uint32_t slot = (uint32_t)(head % r->slot_count);
            shm_slot_desc *d = ring_desc(r, slot);
            uint64_t w = load_acquire64(&d->word); /* pairs with commit's CAS */
            if (word_seq(w) == (head & WORD_SEQ_MASK) && word_state(w) == SHMFEED_SLOT_READY) {
                if ((rc = ready_length(r, slot, &len)))
                    break; /* the slot is still READY: nothing was taken, nothing to give back */
                if (take_ready(r, slot, w, len, out)) {
                    store_relaxed64(&k->consumer.head, head + 1);
                    break;
                }
            } else if (!ordered_word_possible(r, w, head) && load_relaxed64(&k->consumer.head) == head) {
                rc = SHMFEED_E_CORRUPT; /* (a head that moved meanwhile: another consumer; look again) */
                break;
            }
            if (is_closed(r)) { rc = SHMFEED_E_CLOSED; break; }
            if ((rc = clock_may_sleep(&c)))
                break;
            sleep_on_word(d, w, c.deadline_ns);
        } else {
            uint32_t seen = load_acquire32(&k->committed.count);
            uint32_t best = UINT32_MAX;
            uint64_t best_order = UINT64_MAX, best_word = 0;
            for (uint32_t i = 0; i < r->slot_count; i++) {
                shm_slot_desc *d = ring_desc(r, i);
                uint64_t w = load_acquire64(&d->word);
                if (word_state(w) != SHMFEED_SLOT_READY)
                    continue;
                uint64_t order = load_relaxed64(&d->commit_order);
                if (order < best_order || best == UINT32_MAX) { /* any order, even UINT64_MAX */
                    best_order = order;
                    best = i;
                    best_word = w;
                }
            }
            if (best != UINT32_MAX) {
                if ((rc = ready_length(r, best, &len)))
                    break; /* before the take: the slot stays READY */
                if (take_ready(r, best, best_word, len, out))
                    break;
            }
            if (best != UINT32_MAX)
                continue; /* lost a race with a hostile writer: rescan */
            if (is_closed(r)) { rc = SHMFEED_E_CLOSED; break; }
            if ((rc = clock_may_sleep(&c)))
                break;
            sleep_on_event(&k->committed, seen, c.deadline_ns);
        }
    }
    if (rc != SHMFEED_OK && shmfeed_backing_check(r, 0))
        return SHMFEED_E_CORRUPT; /* what it read was the SIGBUS guard's zeros, not the ring */
    clock_account(&c, &k->consumer.waits, &k->consumer.wait_ns);
    if (rc)
        return rc;
    add_relaxed64(&k->consumer.acquires, 1);
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_release(shmfeed_ring *r, const shmfeed_acquired *a)
{
    if (!r || !a || a->slot >= r->slot_count || word_state(a->token) != SHMFEED_SLOT_ACQUIRED)
        return SHMFEED_E_INVAL;
    int rc = shmfeed_backing_check(r, 0);
    if (rc)
        return rc;
    shm_slot_desc *d = ring_desc(r, a->slot);
    uint64_t expected = a->token;
    uint64_t next_seq = word_seq(a->token) + (ordered(r) ? r->slot_count : 1);
    uint64_t freed = word_make(word_gen(a->token), next_seq, SHMFEED_SLOT_FREE);
    /* Publishes "done reading"; pairs with the next claimer's load_acquire. */
    if (!cas64(&d->word, &expected, freed))
        return SHMFEED_E_STATE; /* released twice, or never acquired */
    add_relaxed64(&ring_counters(r)->consumer.releases, 1);
    if (ordered(r))
        wake_word(d);
    else
        signal_event(&ring_counters(r)->released);
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_reclaim(shmfeed_ring *r, uint64_t owner, uint64_t *seqs, uint32_t cap, uint32_t *n_out)
{
    uint32_t n = 0;
    if (!r || owner == 0 || !n_out || (cap && !seqs))
        return SHMFEED_E_INVAL;
    int rc = shmfeed_backing_check(r, 0);
    if (rc)
        return rc;
    for (uint32_t i = 0; i < r->slot_count; i++) {
        shm_slot_desc *d = ring_desc(r, i);
        if (load_acquire64(&d->owner) != owner)
            continue;
        uint64_t w = load_acquire64(&d->word);
        for (;;) {
            uint64_t st = word_state(w);
            if (st == SHMFEED_SLOT_READY || st == SHMFEED_SLOT_ACQUIRED)
                break; /* its commit won: nothing to take back */
            /* CLAIMED: take it back. FREE: the owner died between its two
             * CASes; a new generation makes its pending CAS fail. */
            uint64_t freed = word_make(word_gen(w) + 1, word_seq(w), SHMFEED_SLOT_FREE);
            if (cas64(&d->word, &w, freed)) {
                if (st == SHMFEED_SLOT_CLAIMED) {
                    /* Ordered: the word names the claimed batch itself. */
                    if (n < cap)
                        seqs[n] = ordered(r) ? word_seq(w) : load_relaxed64(&d->batch_seq);
                    n++;
                    add_relaxed64(&ring_counters(r)->producer.reclaims, 1);
                }
                break;
            }
        }
        uint64_t mine = owner;
        cas64(&d->owner, &mine, 0);
        wake_word(d);
    }
    if (!ordered(r) && n)
        signal_event(&ring_counters(r)->released);
    *n_out = n;
    if ((rc = shmfeed_backing_check(r, 0))) /* the scan read zeros past a truncated end */
        return rc;
    return n > cap ? SHMFEED_E_TOOBIG : SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_seq_committed(const shmfeed_ring *r, uint64_t seq, int32_t *out)
{
    if (!r || !out || !ordered(r))
        return SHMFEED_E_INVAL;
    uint64_t want = seq & WORD_SEQ_MASK;
    uint64_t w = load_acquire64(&ring_desc(r, (uint32_t)(seq % r->slot_count))->word);
    *out = seq_after(word_seq(w), want) || (word_seq(w) == want && word_state(w) >= SHMFEED_SLOT_READY);
    return shmfeed_backing_check(r, 0);
}

SHMFEED_MUST_USE int shmfeed_close(shmfeed_ring *r, int32_t code, const char *message)
{
    if (!r || code == 0)
        return SHMFEED_E_INVAL;
    shm_header *h = ring_header(r);
    uint32_t open_ = 0;
    if (cas32(&h->closed, &open_, 1)) { /* first closer writes the reason */
        h->close_code = code;
        size_t n = message ? strnlen(message, SHMFEED_CLOSE_MSG_BYTES - 1) : 0;
        if (n)
            memcpy(h->close_msg, message, n);
        h->close_msg[n] = '\0';
        store_release32(&h->closed, 2); /* publishes code and message */
    }
    /* Wake everybody, wherever they sleep; they see `closed` and return. */
    for (uint32_t i = 0; i < r->slot_count; i++)
        shmfeed_futex_wake_all(word_futex(&ring_desc(r, i)->word));
    add_release32(&ring_counters(r)->committed.count, 1);
    add_release32(&ring_counters(r)->released.count, 1);
    shmfeed_futex_wake_all(&ring_counters(r)->committed.count);
    shmfeed_futex_wake_all(&ring_counters(r)->released.count);
    add_release32(&ring_work(r)->posted.count, 1); /* producers waiting for work (work.c) */
    shmfeed_futex_wake_all(&ring_work(r)->posted.count);
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_close_reason(const shmfeed_ring *r, int32_t *code_out, char *buf, size_t buflen)
{
    if (!r || !code_out)
        return SHMFEED_E_INVAL;
    shm_header *h = ring_header(r);
    uint32_t state = load_acquire32(&h->closed);
    for (int spins = 0; state == 1 && spins < 100000; spins++) { /* a closer mid-write */
        sched_yield();
        state = load_acquire32(&h->closed);
    }
    if (buf && buflen)
        buf[0] = '\0';
    if (state == 0) {
        *code_out = 0;
        return SHMFEED_OK;
    }
    *code_out = h->close_code ? h->close_code : -1;
    if (buf && buflen) {
        size_t n = strnlen(h->close_msg, SHMFEED_CLOSE_MSG_BYTES - 1); /* bounded: never trust a NUL */
        if (n >= buflen)
            n = buflen - 1;
        memcpy(buf, h->close_msg, n);
        buf[n] = '\0';
    }
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_counters_read(const shmfeed_ring *r, shmfeed_counters *o)
{
    if (!r || !o)
        return SHMFEED_E_INVAL;
    shm_counters *k = ring_counters(r);
    o->claims = load_relaxed64(&k->producer.claims);
    o->commits = load_relaxed64(&k->producer.commits);
    o->aborts = load_relaxed64(&k->producer.aborts);
    o->stale_commits = load_relaxed64(&k->producer.stale_commits);
    o->reclaims = load_relaxed64(&k->producer.reclaims);
    o->producer_waits = load_relaxed64(&k->producer.waits);
    o->producer_wait_ns = load_relaxed64(&k->producer.wait_ns);
    o->acquires = load_relaxed64(&k->consumer.acquires);
    o->releases = load_relaxed64(&k->consumer.releases);
    o->consumer_waits = load_relaxed64(&k->consumer.waits);
    o->consumer_wait_ns = load_relaxed64(&k->consumer.wait_ns);
    o->consumer_head = load_relaxed64(&k->consumer.head);
    return shmfeed_backing_check(r, 0); /* zeros read past a truncated end are not counters */
}

SHMFEED_MUST_USE int shmfeed_slot_info_read(const shmfeed_ring *r, uint32_t slot, shmfeed_slot_info *o)
{
    if (!r || !o || slot >= r->slot_count)
        return SHMFEED_E_INVAL;
    shm_slot_desc *d = ring_desc(r, slot);
    uint64_t w = load_acquire64(&d->word);
    o->state = (uint32_t)word_state(w);
    o->generation = (uint32_t)word_gen(w);
    o->seq = ordered(r) ? word_seq(w) : load_relaxed64(&d->batch_seq);
    o->owner = load_relaxed64(&d->owner);
    o->payload_len = load_relaxed64(&d->payload_len);
    o->claim_ns = load_relaxed64(&d->claim_ns);
    o->commit_ns = load_relaxed64(&d->commit_ns);
    return shmfeed_backing_check(r, 0);
}
