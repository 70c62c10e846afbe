/*
 * test_work.c — the work area (NOTE [work hand-out] in csrc/work.c): jobs,
 * takes, re-issue, freeze, ordered gating, and every task taken exactly once
 * by racing threads.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "shmfeed.h"

#define MS 1000000LL
#define OWNER 0xa1ULL

static shmfeed_ring *make_ring(uint32_t slots, uint32_t flags)
{
    shmfeed_ring *ring = NULL;
    char err[256];
    if (shmfeed_ring_create(slots, 64, flags, &ring, err, sizeof err) != SHMFEED_OK)
        fprintf(stderr, "creating a ring failed: %s\n", err);
    return ring;
}

static int post(shmfeed_ring *ring, uint64_t epoch, uint64_t base, uint64_t count, shmfeed_job *job)
{
    memset(job, 0, sizeof *job);
    job->epoch = epoch;
    job->base_seq = base;
    job->count = count;
    return shmfeed_job_post(ring, job);
}

/* Take, claim, commit, acquire, release: one batch through the ring. */
static int run_one(shmfeed_ring *ring, uint32_t rec, shmfeed_task *t)
{
    shmfeed_claimed c;
    shmfeed_acquired a;
    CHECK_RC(shmfeed_take(ring, rec, 100 * MS, t), SHMFEED_OK);
    CHECK_RC(shmfeed_claim(ring, t->seq, OWNER + rec, 0, &c), SHMFEED_OK);
    CHECK_RC(shmfeed_commit(ring, &c, 8), SHMFEED_OK);
    CHECK_RC(shmfeed_task_done(ring, rec, 5), SHMFEED_OK);
    CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_OK);
    CHECK_EQ(a.seq, t->seq);
    CHECK_RC(shmfeed_release(ring, &a), SHMFEED_OK);
    return 0;
}

static int test_tasks_in_order_then_nothing(void)
{
    shmfeed_ring *ring = make_ring(4, SHMFEED_ORDERED);
    shmfeed_job job;
    shmfeed_task t;
    shmfeed_record rec;
    CHECK(ring);
    CHECK_RC(shmfeed_take(ring, 0, 0, &t), SHMFEED_E_STATE); /* record not opened */
    CHECK_RC(shmfeed_record_open(ring, 0, OWNER, 1234), SHMFEED_OK);
    CHECK_RC(shmfeed_take(ring, 0, 0, &t), SHMFEED_E_AGAIN);  /* no job yet */
    CHECK_RC(post(ring, 7, 0, 6, &job), SHMFEED_OK); /* ordered: seqs continue the consumer's */
    CHECK_EQ(job.taken, 0);
    for (uint64_t k = 0; k < 6; k++) {
        if (run_one(ring, 0, &t))
            return 1;
        CHECK_EQ(t.k, k);
        CHECK_EQ(t.seq, k);
        CHECK_EQ(t.epoch, 7);
        CHECK_EQ(t.reissued, 0);
    }
    CHECK_RC(shmfeed_take(ring, 0, 0, &t), SHMFEED_E_AGAIN);
    CHECK_RC(shmfeed_take(ring, 0, 20 * MS, &t), SHMFEED_E_TIMEOUT);
    CHECK_RC(shmfeed_record_read(ring, 0, &rec), SHMFEED_OK);
    CHECK_EQ(rec.task, 0);
    CHECK_EQ(rec.batches, 6);
    CHECK_EQ(rec.busy_ns, 30);
    CHECK_EQ(rec.pid, 1234);
    CHECK_RC(shmfeed_job_read(ring, &job), SHMFEED_OK);
    CHECK_EQ(job.taken, 6);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_ordered_take_waits_for_its_slot(void)
{
    shmfeed_ring *ring = make_ring(2, SHMFEED_ORDERED);
    shmfeed_job job;
    shmfeed_task t;
    shmfeed_claimed c;
    shmfeed_acquired a;
    CHECK(ring);
    CHECK_RC(shmfeed_record_open(ring, 0, OWNER, 1), SHMFEED_OK);
    CHECK_RC(post(ring, 0, 0, 10, &job), SHMFEED_OK);
    for (int i = 0; i < 2; i++) { /* fill both slots */
        CHECK_RC(shmfeed_take(ring, 0, 0, &t), SHMFEED_OK);
        CHECK_RC(shmfeed_claim(ring, t.seq, OWNER, 0, &c), SHMFEED_OK);
        CHECK_RC(shmfeed_commit(ring, &c, 1), SHMFEED_OK);
        CHECK_RC(shmfeed_task_done(ring, 0, 0), SHMFEED_OK);
    }
    /* Batch 2 needs slot 0, which holds batch 0: not taken until released. */
    CHECK_RC(shmfeed_take(ring, 0, 0, &t), SHMFEED_E_AGAIN);
    CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_OK);
    CHECK_RC(shmfeed_take(ring, 0, 0, &t), SHMFEED_E_AGAIN);
    CHECK_RC(shmfeed_release(ring, &a), SHMFEED_OK);
    CHECK_RC(shmfeed_take(ring, 0, 0, &t), SHMFEED_OK);
    CHECK_EQ(t.seq, 2);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_reissued_first_smallest_first(void)
{
    shmfeed_ring *ring = make_ring(8, 0);
    shmfeed_job job;
    shmfeed_task t;
    shmfeed_record rec;
    uint64_t queued[4];
    uint32_t n;
    CHECK(ring);
    CHECK_RC(shmfeed_record_open(ring, 1, OWNER, 1), SHMFEED_OK);
    CHECK_RC(post(ring, 3, 100, 10, &job), SHMFEED_OK);
    CHECK_RC(shmfeed_reissue(ring, 105), SHMFEED_OK);
    CHECK_RC(shmfeed_reissue(ring, 102), SHMFEED_OK);
    CHECK_RC(shmfeed_reissue_read(ring, queued, 4, &n), SHMFEED_OK);
    CHECK_EQ(n, 2);
    CHECK_RC(shmfeed_reissue_read(ring, queued, 1, &n), SHMFEED_E_TOOBIG);
    CHECK_RC(shmfeed_take(ring, 1, 0, &t), SHMFEED_OK);
    CHECK_EQ(t.seq, 102);
    CHECK_EQ(t.k, 2);
    CHECK_EQ(t.epoch, 3);
    CHECK_EQ(t.reissued, 1);
    CHECK_RC(shmfeed_record_read(ring, 1, &rec), SHMFEED_OK);
    CHECK_EQ(rec.task, 103);
    CHECK_EQ(rec.intent, 0);
    CHECK_RC(shmfeed_task_done(ring, 1, 0), SHMFEED_OK);
    CHECK_RC(shmfeed_task_done(ring, 1, 0), SHMFEED_E_STATE);
    CHECK_RC(shmfeed_take(ring, 1, 0, &t), SHMFEED_OK);
    CHECK_EQ(t.seq, 105);
    CHECK_RC(shmfeed_task_done(ring, 1, 0), SHMFEED_OK);
    CHECK_RC(shmfeed_take(ring, 1, 0, &t), SHMFEED_OK); /* then fresh work */
    CHECK_EQ(t.seq, 100);
    CHECK_EQ(t.reissued, 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_freeze_stops_fresh_work_keeps_reissued(void)
{
    shmfeed_ring *ring = make_ring(8, 0);
    shmfeed_job job, frozen;
    shmfeed_task t;
    CHECK(ring);
    CHECK_RC(shmfeed_record_open(ring, 0, OWNER, 1), SHMFEED_OK);
    CHECK_RC(post(ring, 1, 50, 10, &job), SHMFEED_OK);
    CHECK_RC(shmfeed_take(ring, 0, 0, &t), SHMFEED_OK);
    CHECK_RC(shmfeed_take(ring, 0, 0, &t), SHMFEED_OK);
    CHECK_RC(shmfeed_job_freeze(ring, &frozen), SHMFEED_OK);
    CHECK_EQ(frozen.taken, 2);
    CHECK_EQ(frozen.base_seq, 50);
    CHECK(frozen.gen != job.gen);
    CHECK_RC(shmfeed_take(ring, 0, 0, &t), SHMFEED_E_AGAIN);
    CHECK_RC(shmfeed_reissue(ring, 51), SHMFEED_OK);
    CHECK_RC(shmfeed_take(ring, 0, 0, &t), SHMFEED_OK);
    CHECK_EQ(t.seq, 51);
    CHECK_EQ(t.epoch, 1);
    CHECK_EQ(t.k, 1);
    /* The next job: its tasks, and the previous generation handed out none. */
    CHECK_RC(post(ring, 2, 52, 3, &job), SHMFEED_OK);
    CHECK_EQ(job.taken, 0);
    CHECK_RC(shmfeed_take(ring, 0, 0, &t), SHMFEED_OK);
    CHECK_EQ(t.seq, 52);
    CHECK_EQ(t.epoch, 2);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_bad_arguments_and_queue_full(void)
{
    shmfeed_ring *ring = make_ring(2, 0);
    shmfeed_task t;
    shmfeed_record rec;
    int cap = shmfeed_max_producers();
    CHECK(ring);
    CHECK(cap >= 8);
    CHECK_RC(shmfeed_record_open(ring, (uint32_t)cap, OWNER, 1), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_record_open(ring, 0, 0, 1), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_record_open(ring, 0, OWNER, 1), SHMFEED_OK);
    CHECK_RC(shmfeed_record_open(ring, 0, OWNER + 1, 1), SHMFEED_E_STATE); /* somebody else's */
    CHECK_RC(shmfeed_take(ring, (uint32_t)cap, 0, &t), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_record_read(ring, (uint32_t)cap, &rec), SHMFEED_E_INVAL);
    int pushed = 0;
    while (shmfeed_reissue(ring, (uint64_t)pushed) == SHMFEED_OK)
        pushed++;
    CHECK(pushed >= cap);
    CHECK_RC(shmfeed_record_reset(ring, 0), SHMFEED_OK);
    CHECK_RC(shmfeed_record_open(ring, 0, OWNER + 1, 1), SHMFEED_OK);
    CHECK_RC(shmfeed_record_open(ring, 1, OWNER + 2, 1), SHMFEED_OK);
    CHECK_RC(shmfeed_record_stop(ring, 1), SHMFEED_OK); /* a clean stop: no more tasks for record 1 */
    CHECK_RC(shmfeed_take(ring, 1, 0, &t), SHMFEED_E_CLOSED);
    CHECK_RC(shmfeed_record_read(ring, 1, &rec), SHMFEED_OK);
    CHECK_EQ(rec.stop, 1);
    CHECK_RC(shmfeed_record_reset(ring, 1), SHMFEED_OK); /* and a new producer may start there */
    CHECK_RC(shmfeed_record_read(ring, 1, &rec), SHMFEED_OK);
    CHECK_EQ(rec.stop, 0);
    CHECK_RC(shmfeed_close(ring, 1, "done"), SHMFEED_OK);
    CHECK_RC(shmfeed_take(ring, 0, 0, &t), SHMFEED_E_CLOSED);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_round_robin_gives_each_record_its_own_tasks(void)
{
    shmfeed_ring *ring = make_ring(16, 0);
    shmfeed_job job, frozen;
    shmfeed_task t;
    shmfeed_record rec;
    CHECK(ring);
    for (uint32_t r = 0; r < 3; r++)
        CHECK_RC(shmfeed_record_open(ring, r, OWNER + r, 1), SHMFEED_OK);
    memset(&job, 0, sizeof job);
    job.base_seq = 20;
    job.count = 8;
    job.flags = SHMFEED_JOB_ROUND_ROBIN;
    job.stride = 0;
    CHECK_RC(shmfeed_job_post(ring, &job), SHMFEED_E_INVAL); /* a stride is needed */
    job.stride = 3;
    CHECK_RC(shmfeed_job_post(ring, &job), SHMFEED_OK);
    /* Record 2 takes 2 and 5 only (k < 8), whatever the others do. */
    CHECK_RC(shmfeed_take(ring, 2, 0, &t), SHMFEED_OK);
    CHECK_EQ(t.k, 2);
    CHECK_EQ(t.seq, 22);
    CHECK_RC(shmfeed_task_done(ring, 2, 0), SHMFEED_OK);
    CHECK_RC(shmfeed_take(ring, 2, 0, &t), SHMFEED_OK);
    CHECK_EQ(t.k, 5);
    CHECK_RC(shmfeed_task_done(ring, 2, 0), SHMFEED_OK);
    CHECK_RC(shmfeed_take(ring, 2, 0, &t), SHMFEED_E_AGAIN);
    CHECK_RC(shmfeed_take(ring, 0, 0, &t), SHMFEED_OK);
    CHECK_EQ(t.k, 0);
    CHECK_RC(shmfeed_task_done(ring, 0, 0), SHMFEED_OK);
    CHECK_RC(shmfeed_record_read(ring, 0, &rec), SHMFEED_OK);
    CHECK_EQ(rec.next_k, 3);
    CHECK_EQ(rec.next_gen, job.gen);
    /* A freeze stops fresh round-robin work too; the record keeps where it was. */
    CHECK_RC(shmfeed_job_freeze(ring, &frozen), SHMFEED_OK);
    CHECK_EQ(frozen.stride, 3);
    CHECK_RC(shmfeed_take(ring, 0, 0, &t), SHMFEED_E_AGAIN);
    CHECK_RC(shmfeed_take(ring, 1, 0, &t), SHMFEED_E_AGAIN);
    /* A new job restarts every record at its own number. */
    job.base_seq = 30;
    CHECK_RC(shmfeed_job_post(ring, &job), SHMFEED_OK);
    CHECK_RC(shmfeed_take(ring, 1, 0, &t), SHMFEED_OK);
    CHECK_EQ(t.seq, 31);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* ---- racing takers: every task exactly once ------------------------------ */

#define RACE_TASKS 200000u
#define RACE_THREADS 4

struct race {
    shmfeed_ring *ring;
    uint32_t rec;
    unsigned char *seen;
    int failed;
};

static void *taker(void *arg)
{
    struct race *r = arg;
    shmfeed_task t;
    for (;;) {
        int rc = shmfeed_take(r->ring, r->rec, 0, &t);
        if (rc == SHMFEED_E_AGAIN)
            break;
        if (rc != SHMFEED_OK || t.seq >= RACE_TASKS || __atomic_fetch_add(&r->seen[t.seq], 1, __ATOMIC_RELAXED)) {
            r->failed = 1;
            break;
        }
        if (shmfeed_task_done(r->ring, r->rec, 0) != SHMFEED_OK) {
            r->failed = 1;
            break;
        }
    }
    return NULL;
}

static int test_racing_takers_take_each_task_once(void)
{
    shmfeed_ring *ring = make_ring(4, 0); /* unordered: no slot gating, pure hand-out */
    shmfeed_job job;
    pthread_t th[RACE_THREADS];
    struct race rs[RACE_THREADS];
    unsigned char *seen = calloc(RACE_TASKS, 1);
    CHECK(ring && seen);
    CHECK_RC(post(ring, 0, 0, RACE_TASKS, &job), SHMFEED_OK);
    for (uint32_t i = 0; i < RACE_THREADS; i++) {
        CHECK_RC(shmfeed_record_open(ring, i, OWNER + i, 1), SHMFEED_OK);
        rs[i] = (struct race){ring, i, seen, 0};
        CHECK(pthread_create(&th[i], NULL, taker, &rs[i]) == 0);
    }
    for (uint32_t i = 0; i < RACE_THREADS; i++) {
        pthread_join(th[i], NULL);
        CHECK(!rs[i].failed);
    }
    for (uint32_t s = 0; s < RACE_TASKS; s++)
        CHECK_EQ(seen[s], 1);
    free(seen);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* NOTE [fatal signals]: a producer that dies of a signal leaves its number in its record;
 * one whose earlier handler recovers (returns) leaves nothing. */
static volatile sig_atomic_t recovered;
static void recover(int sig) { (void)sig; recovered = 1; }

static int test_a_fatal_signal_is_noted_in_the_record(void)
{
    shmfeed_ring *ring = make_ring(4, 0);
    shmfeed_record rec;
    CHECK(ring);
    CHECK_RC(shmfeed_record_watch_signals(ring, 40), SHMFEED_E_INVAL);
    int sigs[] = {SIGILL, SIGABRT}; /* not SIGSEGV: ASan handles it (and exits) before us */
    for (int i = 0; i < 2; i++) {
        CHECK_RC(shmfeed_record_reset(ring, (uint32_t)i), SHMFEED_OK);
        pid_t child = fork();
        CHECK(child >= 0);
        if (child == 0) { /* the producer: the ring's mapping is shared with the parent */
            if (shmfeed_record_open(ring, (uint32_t)i, OWNER + 1, (uint32_t)getpid()) != SHMFEED_OK ||
                shmfeed_record_watch_signals(ring, (uint32_t)i) != SHMFEED_OK)
                _exit(3);
            raise(sigs[i]);
            _exit(4);
        }
        int status = 0;
        CHECK_EQ(waitpid(child, &status, 0), child);
        CHECK(WIFSIGNALED(status));
        CHECK_EQ(WTERMSIG(status), sigs[i]); /* it still dies of it */
        CHECK_RC(shmfeed_record_read(ring, (uint32_t)i, &rec), SHMFEED_OK);
        CHECK_EQ(rec.signal, (uint32_t)sigs[i]);
        CHECK_EQ(rec.pid, (uint32_t)child);
    }
    CHECK_RC(shmfeed_record_reset(ring, 0), SHMFEED_OK);
    CHECK_RC(shmfeed_record_read(ring, 0, &rec), SHMFEED_OK);
    CHECK_EQ(rec.signal, 0);
    pid_t child = fork(); /* a handler installed before ours handles the signal: nothing is noted */
    CHECK(child >= 0);
    if (child == 0) {
        signal(SIGFPE, recover);
        if (shmfeed_record_open(ring, 0, OWNER + 1, (uint32_t)getpid()) != SHMFEED_OK ||
            shmfeed_record_watch_signals(ring, 0) != SHMFEED_OK)
            _exit(3);
        raise(SIGFPE);
        shmfeed_record r2;
        if (shmfeed_record_read(ring, 0, &r2) != SHMFEED_OK)
            _exit(5);
        _exit(recovered && r2.signal == 0 ? 0 : 6);
    }
    int status = 0;
    CHECK_EQ(waitpid(child, &status, 0), child);
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

int main(void)
{
    int failures = 0;
    alarm(120);
    RUN(failures, test_tasks_in_order_then_nothing);
    RUN(failures, test_ordered_take_waits_for_its_slot);
    RUN(failures, test_reissued_first_smallest_first);
    RUN(failures, test_freeze_stops_fresh_work_keeps_reissued);
    RUN(failures, test_bad_arguments_and_queue_full);
    RUN(failures, test_round_robin_gives_each_record_its_own_tasks);
    RUN(failures, test_racing_takers_take_each_task_once);
    RUN(failures, test_a_fatal_signal_is_noted_in_the_record);
    return failures ? T_EXIT_FAIL : T_EXIT_PASS;
}
