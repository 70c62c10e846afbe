/*
 * work.c — handing out work through the segment.
 *
 * NOTE [work hand-out]
 *   Producers take their tasks from the work area (layout.h) instead of
 *   being sent them: nothing per batch goes through Ray or the training
 *   process. A *job* is an epoch's worth of tasks: task k is batch
 *   base_seq + k. The feed posts a job; producers take tasks in increasing
 *   k with one CAS on the task word (generation | next k), so in an ordered
 *   ring the oldest batch in flight is always being made by someone.
 *
 *   re-issue  When a producer dies, the feed (its supervisor) works out
 *             which task it held and pushes its seq onto the re-issue queue;
 *             takes look there first, so the lost batch is the next one
 *             made, by whichever producer is free.
 *   records   Each producer owns a record: owner token, the task it holds
 *             (seq + 1), `intent` while a take is in progress, lease start,
 *             statistics. A take sets `intent` before its CAS and stores the
 *             task before clearing `intent`, so once every live producer's
 *             intent reads 0 the feed knows who holds what: a task handed
 *             out is committed, queued, or in a record (live or dead).
 *   ordered   A fresh task is taken only once its slot is free for it (the
 *             consumer released batch seq - N): no producer ever blocks in
 *             claim holding a task, so a re-issued task always finds a free
 *             producer, never one stuck behind it.
 *   jobs      jobs[gen & 1] holds generation gen's descriptor. The feed
 *             writes the other half, then publishes the new generation by
 *             exchanging the task word; a taker reads the descriptor of the
 *             generation it CASes against, and its CAS fails if a newer one
 *             was published meanwhile, so it never uses a torn descriptor.
 *             Freezing (an abandoned epoch) publishes a copy that hands out
 *             nothing fresh; re-issued tasks of it still go out.
 *   waking    Producers with nothing to take sleep on the `posted` event
 *             (a job posted, a task re-issued, the ring closed), or on the
 *             slot word of the batch they wait to start (ordered).
 */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <string.h>

#include "ring_internal.h"

#define INTENT_QUEUE (1ULL << 63) /* a pop from the re-issue queue is in progress */

static int ordered_ring(const shmfeed_ring *r) { return (r->flags & SHMFEED_ORDERED) != 0; }

static void job_copy_out(const shm_job *j, uint64_t gen, shmfeed_job *out)
{
    out->epoch = load_relaxed64((atomic_u64 *)&j->epoch);
    out->base_seq = load_relaxed64((atomic_u64 *)&j->base_seq);
    out->count = load_relaxed64((atomic_u64 *)&j->count);
    out->start = load_relaxed64((atomic_u64 *)&j->start);
    out->flags = load_relaxed64((atomic_u64 *)&j->flags);
    out->stride = load_relaxed64((atomic_u64 *)&j->stride);
    out->carry_gen = load_relaxed64((atomic_u64 *)&j->carry_gen);
    out->gen = gen;
}

static void wake_takers(shmfeed_ring *r)
{
    signal_event(&ring_work(r)->posted);
    if (ordered_ring(r)) /* takers waiting for their batch's slot sleep on its word */
        for (uint32_t i = 0; i < r->slot_count; i++)
            shmfeed_futex_wake_all(word_futex(&ring_desc(r, i)->word));
}

/* Publish a job as the next generation; *taken_out: fresh tasks the previous
 * generation handed out. Single writer (the feed). */
SHMFEED_MUST_USE static int publish(shmfeed_ring *r, const shmfeed_job *job, uint64_t *gen_out, uint64_t *taken_out)
{
    shm_work *wk = ring_work(r);
    uint64_t old = load_acquire64(&wk->next);
    uint64_t gen = (task_gen(old) + 1) & TASK_GEN_MASK;
    shm_job *j = &wk->jobs[gen & 1];
    /* Nobody reads jobs[gen & 1] until `gen` is published: takers of the
     * current generation read the other half. */
    store_relaxed64(&j->epoch, job->epoch);
    store_relaxed64(&j->base_seq, job->base_seq);
    store_relaxed64(&j->count, job->count);
    store_relaxed64(&j->start, job->start);
    store_relaxed64(&j->flags, job->flags);
    store_relaxed64(&j->stride, job->stride);
    store_relaxed64(&j->carry_gen, job->carry_gen);
    /* Publishes the descriptor; pairs with the taker's load_acquire of `next`.
     * The exchange also tells exactly how many tasks the old one handed out:
     * every later CAS against it fails. */
    old = exchange_acq_rel64(&wk->next, task_make(gen, 0));
    uint64_t old_count = load_relaxed64(&wk->jobs[task_gen(old) & 1].count);
    *gen_out = gen;
    *taken_out = task_k(old) < old_count ? task_k(old) : old_count;
    wake_takers(r);
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_job_post(shmfeed_ring *r, shmfeed_job *job)
{
    if (!r || !job || job->base_seq > WORD_SEQ_MASK || job->count > WORD_SEQ_MASK - job->base_seq)
        return SHMFEED_E_INVAL;
    if ((job->flags & SHMFEED_JOB_ROUND_ROBIN) && (job->stride == 0 || job->stride > SHMFEED_MAX_PRODUCERS))
        return SHMFEED_E_INVAL;
    return publish(r, job, &job->gen, &job->taken);
}

SHMFEED_MUST_USE int shmfeed_job_freeze(shmfeed_ring *r, shmfeed_job *out)
{
    if (!r || !out)
        return SHMFEED_E_INVAL;
    shm_work *wk = ring_work(r);
    uint64_t w = load_acquire64(&wk->next);
    job_copy_out(&wk->jobs[task_gen(w) & 1], task_gen(w), out);
    /* The frozen copy keeps base_seq (re-issued tasks still map through it)
     * and hands out nothing fresh (count 0). */
    shmfeed_job frozen = *out;
    frozen.count = 0;
    return publish(r, &frozen, &out->gen, &out->taken);
}

SHMFEED_MUST_USE int shmfeed_job_read(const shmfeed_ring *r, shmfeed_job *out)
{
    if (!r || !out)
        return SHMFEED_E_INVAL;
    shm_work *wk = ring_work(r);
    uint64_t w = load_acquire64(&wk->next);
    job_copy_out(&wk->jobs[task_gen(w) & 1], task_gen(w), out);
    out->taken = task_k(w) < out->count ? task_k(w) : out->count;
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_reissue(shmfeed_ring *r, uint64_t seq)
{
    if (!r || seq >= WORD_SEQ_MASK)
        return SHMFEED_E_INVAL;
    shm_work *wk = ring_work(r);
    for (uint32_t i = 0; i < SHMFEED_REISSUE_CAP; i++) {
        uint64_t empty = 0;
        /* Publishes the entry; pairs with the taker's load_acquire in pop(). */
        if (cas64(&wk->queue[i], &empty, seq + 1)) {
            add_full32(&wk->reissued, 1);
            wake_takers(r);
            return SHMFEED_OK;
        }
    }
    return SHMFEED_E_TOOBIG;
}

SHMFEED_MUST_USE int shmfeed_reissue_read(const shmfeed_ring *r, uint64_t *seqs, uint32_t cap, uint32_t *n_out)
{
    uint32_t n = 0;
    if (!r || !n_out || (cap && !seqs))
        return SHMFEED_E_INVAL;
    shm_work *wk = ring_work(r);
    for (uint32_t i = 0; i < SHMFEED_REISSUE_CAP; i++) {
        uint64_t v = load_acquire64(&wk->queue[i]);
        if (!v)
            continue;
        if (n < cap)
            seqs[n] = v - 1;
        n++;
    }
    *n_out = n;
    return n > cap ? SHMFEED_E_TOOBIG : SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_max_producers(void) { return SHMFEED_MAX_PRODUCERS; }

SHMFEED_MUST_USE int shmfeed_record_reset(shmfeed_ring *r, uint32_t rec)
{
    if (!r || rec >= SHMFEED_MAX_PRODUCERS)
        return SHMFEED_E_INVAL;
    shm_record *p = &ring_work(r)->records[rec];
    store_relaxed64(&p->task, 0);
    store_relaxed64(&p->intent, 0);
    store_relaxed64(&p->since_ns, 0);
    store_relaxed32(&p->pid, 0);
    store_relaxed16(&p->stop, 0);
    store_relaxed16(&p->signal, 0);
    store_release64(&p->owner, 0);
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_record_stop(shmfeed_ring *r, uint32_t rec)
{
    if (!r || rec >= SHMFEED_MAX_PRODUCERS)
        return SHMFEED_E_INVAL;
    store_release16(&ring_work(r)->records[rec].stop, 1);
    wake_takers(r); /* a producer asleep in take() sees it now */
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_record_read(const shmfeed_ring *r, uint32_t rec, shmfeed_record *out)
{
    if (!r || !out || rec >= SHMFEED_MAX_PRODUCERS)
        return SHMFEED_E_INVAL;
    shm_record *p = &ring_work(r)->records[rec];
    /* intent first: once it reads 0, the task read after it is settled
     * (pairs with the store_release of intent = 0 in take()). */
    out->intent = load_acquire64(&p->intent);
    out->task = load_acquire64(&p->task);
    out->owner = load_acquire64(&p->owner);
    out->since_ns = load_relaxed64(&p->since_ns);
    out->busy_ns = load_relaxed64(&p->busy_ns);
    out->batches = load_relaxed64(&p->batches);
    out->pid = load_relaxed32(&p->pid);
    out->stop = load_relaxed16(&p->stop);
    out->signal = load_acquire16(&p->signal);
    out->reserved = 0;
    uint64_t nx = load_acquire64(&p->next);
    out->next_gen = task_gen(nx);
    out->next_k = task_k(nx);
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_record_open(shmfeed_ring *r, uint32_t rec, uint64_t owner, uint32_t pid)
{
    if (!r || rec >= SHMFEED_MAX_PRODUCERS || owner == 0)
        return SHMFEED_E_INVAL;
    shm_record *p = &ring_work(r)->records[rec];
    uint64_t none = 0;
    if (!cas64(&p->owner, &none, owner)) /* the feed resets a record before it starts a producer there */
        return none == owner ? SHMFEED_OK : SHMFEED_E_STATE;
    store_relaxed32(&p->pid, pid);
    store_relaxed16(&p->signal, 0);
    store_relaxed64(&p->busy_ns, 0);
    store_relaxed64(&p->batches, 0);
    return SHMFEED_OK;
}

/*
 * NOTE [fatal signals]
 *   A producer that dies of a signal tells the feed which one: its record's
 *   `signal` word. shmfeed_record_watch_signals (the producer, after
 *   record_open) installs one handler, per process, for SIGSEGV, SIGBUS,
 *   SIGFPE, SIGILL and SIGABRT, and registers the record's word. The handler
 *   stores the signal number into every registered word, then does what
 *   would have happened without it: the handler installed before it
 *   (faulthandler's traceback, the SIGBUS guard of segment.c) or the default
 *   action. If that earlier handler returns (the SIGBUS guard recovered from
 *   a truncated segment: the process lives on), the words go back to 0.
 *   SA_NODEFER: a handler it calls that re-raises (faulthandler) kills the
 *   process there and then. A mapping about to go (ring_free, retire) is
 *   unregistered first (shmfeed_fatal_forget), so the handler never writes
 *   into memory that is not the segment any more.
 */
#define FATAL_WORDS 32 /* records one process can watch at once */

static const int fatal_signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
#define FATAL_SIGNALS ((int)(sizeof fatal_signals / sizeof fatal_signals[0]))
static atomic_u64 fatal_words[FATAL_WORDS];               /* address of a record's signal word; 0: free */
static struct sigaction fatal_previous[FATAL_SIGNALS];    /* written once, before the handler is installed */
static atomic_u32 fatal_state;                            /* 0 none, 1 installing, 2 installed, 3 failed */

static void fatal_store(uint16_t sig)
{
    for (int i = 0; i < FATAL_WORDS; i++) {
        uint64_t addr = load_acquire64(&fatal_words[i]);
        if (addr)
            store_release16((atomic_u16 *)(uintptr_t)addr, sig);
    }
}

static void fatal_on_signal(int sig, siginfo_t *si, void *ucontext)
{
    int which = 0;
    while (which < FATAL_SIGNALS && fatal_signals[which] != sig)
        which++;
    fatal_store((uint16_t)sig);
    if (which < FATAL_SIGNALS) {
        const struct sigaction *prev = &fatal_previous[which];
        if (prev->sa_flags & SA_SIGINFO) {
            if (prev->sa_sigaction) {
                prev->sa_sigaction(sig, si, ucontext);
                fatal_store(0); /* it returned: handled, the process goes on */
                return;
            }
        } else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
            prev->sa_handler(sig);
            fatal_store(0);
            return;
        }
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    raise(sig); /* the default action, as without us */
}

static int fatal_install(void)
{
    uint32_t none = 0;
    if (cas32(&fatal_state, &none, 1)) {
        int ok = 1;
        for (int i = 0; i < FATAL_SIGNALS && ok; i++)
            ok = sigaction(fatal_signals[i], NULL, &fatal_previous[i]) == 0;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = fatal_on_signal;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        for (int i = 0; i < FATAL_SIGNALS && ok; i++)
            ok = sigaction(fatal_signals[i], &sa, NULL) == 0;
        store_release32(&fatal_state, ok ? 2 : 3); /* publishes fatal_previous */
    }
    while (load_acquire32(&fatal_state) == 1) /* another thread is installing it */
        sched_yield();
    return load_acquire32(&fatal_state) == 2 ? SHMFEED_OK : SHMFEED_E_SYS;
}

SHMFEED_MUST_USE int shmfeed_record_watch_signals(shmfeed_ring *r, uint32_t rec)
{
    if (!r || rec >= SHMFEED_MAX_PRODUCERS)
        return SHMFEED_E_INVAL;
    int rc = fatal_install();
    if (rc != SHMFEED_OK)
        return rc;
    uint64_t addr = (uint64_t)(uintptr_t)&ring_work(r)->records[rec].signal;
    for (int i = 0; i < FATAL_WORDS; i++)
        if (load_acquire64(&fatal_words[i]) == addr)
            return SHMFEED_OK;
    for (int i = 0; i < FATAL_WORDS; i++) {
        uint64_t free_ = 0;
        if (cas64(&fatal_words[i], &free_, addr))
            return SHMFEED_OK;
    }
    return SHMFEED_E_STATE; /* FATAL_WORDS records watched already */
}

void shmfeed_fatal_forget(const shmfeed_ring *r)
{
    uint64_t lo = (uint64_t)(uintptr_t)r->base, hi = lo + r->map_bytes;
    for (int i = 0; i < FATAL_WORDS; i++) {
        uint64_t addr = load_acquire64(&fatal_words[i]);
        if (addr >= lo && addr < hi)
            cas64(&fatal_words[i], &addr, 0); /* lost race: another forget of the same range cleared it */
    }
}

/* Hold `seq` in the record, then end the take. */
static void hold(shm_record *p, uint64_t seq)
{
    store_relaxed64(&p->since_ns, shmfeed_clock_ns());
    store_relaxed64(&p->task, seq + 1);
    /* Publishes task; pairs with the load_acquire of intent in record_read(). */
    store_release64(&p->intent, 0);
}

/* Try the re-issue queue: the smallest seq first (the oldest batch). */
SHMFEED_MUST_USE static int pop_reissued(shmfeed_ring *r, shm_record *p, uint64_t *seq_out)
{
    shm_work *wk = ring_work(r);
    if (load_acquire32(&wk->reissued) == 0)
        return 0;
    for (;;) {
        uint32_t best = SHMFEED_REISSUE_CAP;
        uint64_t best_v = 0;
        for (uint32_t i = 0; i < SHMFEED_REISSUE_CAP; i++) {
            uint64_t v = load_acquire64(&wk->queue[i]);
            if (v && (!best_v || v < best_v)) {
                best_v = v;
                best = i;
            }
        }
        if (best == SHMFEED_REISSUE_CAP)
            return 0;
        /* Announce before taking: the feed reads the queue, then waits for
         * every live intent to clear before it reads records (seq_cst RMW so
         * the intent is visible before the entry disappears). */
        exchange_full64(&p->intent, INTENT_QUEUE | best_v);
        uint64_t expect = best_v;
        if (cas64(&wk->queue[best], &expect, 0)) {
            sub_relaxed32(&wk->reissued, 1);
            hold(p, best_v - 1);
            *seq_out = best_v - 1;
            return 1;
        }
        store_release64(&p->intent, 0); /* someone else took it: look again */
    }
}

static void fill_task(shmfeed_task *out, const shmfeed_job *job, uint64_t seq, uint32_t reissued)
{
    out->seq = seq;
    out->k = seq - job->base_seq;
    out->epoch = job->epoch;
    out->start = job->start;
    out->flags = job->flags;
    out->gen = job->gen;
    out->reissued = reissued;
    out->reserved = 0;
}

SHMFEED_MUST_USE int shmfeed_take(shmfeed_ring *r, uint32_t rec, int64_t timeout_ns, shmfeed_task *out)
{
    wait_clock c;
    int rc;
    if (!r || !out || rec >= SHMFEED_MAX_PRODUCERS)
        return SHMFEED_E_INVAL;
    shm_work *wk = ring_work(r);
    shm_record *p = &wk->records[rec];
    if (load_relaxed64(&p->owner) == 0)
        return SHMFEED_E_STATE; /* record_open first */
    clock_begin(&c, timeout_ns);
    for (;;) {
        if (is_closed(r) || load_acquire16(&p->stop))
            return SHMFEED_E_CLOSED;
        uint32_t seen = load_acquire32(&wk->posted.count);
        uint64_t w = load_acquire64(&wk->next); /* pairs with publish()'s exchange */
        shmfeed_job job;
        job_copy_out(&wk->jobs[task_gen(w) & 1], task_gen(w), &job);
        uint64_t seq;
        if (pop_reissued(r, p, &seq)) {
            /* A re-issued task belongs to the current job (the feed posts a
             * new one only once the old one is drained): map it through the
             * descriptor of the generation current now, read consistently. */
            uint64_t w2;
            do {
                w2 = load_acquire64(&wk->next);
                job_copy_out(&wk->jobs[task_gen(w2) & 1], task_gen(w2), &job);
            } while (load_acquire64(&wk->next) != w2 && task_gen(load_acquire64(&wk->next)) != task_gen(w2));
            fill_task(out, &job, seq, 1);
            return SHMFEED_OK;
        }
        uint64_t k = task_k(w);
        int rr = (job.flags & SHMFEED_JOB_ROUND_ROBIN) != 0;
        if (rr) { /* this record's own sequence of tasks: rec, rec + stride, ... */
            uint64_t nx = load_acquire64(&p->next);
            int same_job = task_gen(nx) == task_gen(w) ||
                           ((job.flags & SHMFEED_JOB_CARRY) && task_gen(nx) == job.carry_gen);
            k = same_job ? task_k(nx) : rec;
        }
        if (k < job.count) {
            seq = job.base_seq + k;
            if (ordered_ring(r)) {
                /* Take batch seq only once its slot is free for it. */
                shm_slot_desc *d = ring_desc(r, (uint32_t)(seq % r->slot_count));
                uint64_t sw = load_acquire64(&d->word);
                if (seq_after(seq & WORD_SEQ_MASK, word_seq(sw))) {
                    if ((rc = clock_may_sleep(&c)))
                        return rc;
                    sleep_on_word(d, sw, c.deadline_ns);
                    continue;
                }
            }
            exchange_full64(&p->intent, w | 1);
            if (rr) {
                /* Nobody else takes this record's tasks; what can change under us is the
                 * job (a freeze or a new post). Hold the task, then look again at the job
                 * word with a seq_cst RMW: either we see the new generation and give the
                 * task back, or the feed, which waits for our intent to clear after it
                 * published, sees the task in this record. */
                store_relaxed64(&p->task, seq + 1);
                if (task_gen(add_full64(&wk->next, 0)) != task_gen(w)) {
                    store_relaxed64(&p->task, 0);
                    store_release64(&p->intent, 0);
                    continue;
                }
                store_relaxed64(&p->next, task_make(task_gen(w), k + job.stride));
                hold(p, seq);
                fill_task(out, &job, seq, 0);
                return SHMFEED_OK;
            }
            uint64_t expect = w;
            /* acq_rel: a success both reads the descriptor of generation
             * task_gen(w) as published and hands task k to us alone. */
            if (cas64(&wk->next, &expect, task_make(task_gen(w), k + 1))) {
                hold(p, seq);
                fill_task(out, &job, seq, 0);
                return SHMFEED_OK;
            }
            store_release64(&p->intent, 0);
            continue; /* lost the race, or a new job: look again at once */
        }
        if ((rc = clock_may_sleep(&c)))
            return rc;
        sleep_on_event(&wk->posted, seen, c.deadline_ns);
    }
}

SHMFEED_MUST_USE int shmfeed_task_done(shmfeed_ring *r, uint32_t rec, uint64_t busy_ns)
{
    if (!r || rec >= SHMFEED_MAX_PRODUCERS)
        return SHMFEED_E_INVAL;
    shm_record *p = &ring_work(r)->records[rec];
    if (load_relaxed64(&p->task) == 0)
        return SHMFEED_E_STATE;
    add_relaxed64(&p->busy_ns, busy_ns);
    add_relaxed64(&p->batches, 1);
    store_release64(&p->task, 0);
    return SHMFEED_OK;
}
