/*
 * test_stress.c — many producers, one consumer, every batch exactly once.
 *
 *   test_stress ordered|unordered thread|process small|large [batches]
 *
 * Producer k of P writes batches k, k+P, k+2P, ...; each payload is a
 * pattern derived from its sequence plus a checksum word, and every 61st
 * batch is first claimed, scribbled over and aborted, then produced for
 * real. The consumer holds up to two batches at a time (as the staging
 * thread does) and checks: every sequence exactly once, in order in
 * ordered mode, the length, the pattern and the checksum; at the end the
 * counters must add up.
 *
 * "process" forks the producers, which attach through the ring's path;
 * "thread" runs them as threads of this process, which is the mode that
 * ThreadSanitizer can check (it does not see across processes), so under
 * TSan "process" is skipped. The batch count defaults per size and is
 * smaller under sanitizers; SHMFEED_STRESS_BATCHES or the 4th argument
 * overrides it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
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

#define PRODUCERS 3
#define HELD 2                       /* batches the consumer holds at once */
#define ABORT_EVERY 61
#define WAIT_NS (30LL * 1000000000LL) /* a healthy run never waits this long */
/* Default batch counts: tens of thousands of small batches, thousands of
 * large ones; fewer under sanitizers (ThreadSanitizer instruments every
 * word of a 1 MiB payload) so that each suite stays within a few minutes. */
#if defined(__SANITIZE_THREAD__)
#define SMALL_BATCHES 200000
#define LARGE_BATCHES 1500
#elif defined(__SANITIZE_ADDRESS__)
#define SMALL_BATCHES 200000
#define LARGE_BATCHES 3000
#else
#define SMALL_BATCHES 300000
#define LARGE_BATCHES 8000
#endif

#define CLOSE_PRODUCER_FAILED 101
#define CLOSE_CONSUMER_FAILED 102

typedef struct config {
    int ordered;
    int processes;
    uint32_t slots;
    uint64_t slot_bytes;
    uint64_t batches;
} config;

/* ---- the payload: [seq][checksum][pattern words ...] ---------------------- */

static uint64_t pattern_word(uint64_t seq, uint64_t i)
{
    return (seq * 0x9e3779b97f4a7c15ULL) ^ (i * 0xbf58476d1ce4e5b9ULL) ^ (i << 32);
}

static uint64_t checksum_step(uint64_t sum, uint64_t word)
{
    return ((sum << 7) | (sum >> 57)) ^ word;
}

/* Payload length of batch seq: a multiple of 8, varying, at most the slot. */
static uint64_t payload_len(const config *cfg, uint64_t seq)
{
    if (cfg->slot_bytes <= 64)
        return 16 + 8 * (seq % ((cfg->slot_bytes - 16) / 8 + 1));
    return cfg->slot_bytes - 4096 * (seq % 8);
}

static void fill_payload(uint64_t *words, uint64_t len, uint64_t seq)
{
    uint64_t n = len / 8, sum = 0;
    for (uint64_t i = 2; i < n; i++) {
        words[i] = pattern_word(seq, i);
        sum = checksum_step(sum, words[i]);
    }
    words[0] = seq;
    words[1] = sum;
}

/* 0 if the payload is batch seq's, intact; else says what is wrong. */
static int verify_payload(const uint64_t *words, uint64_t len, uint64_t seq)
{
    uint64_t n = len / 8, sum = 0;
    if (words[0] != seq) {
        fprintf(stderr, "batch %" PRIu64 ": payload says it is batch %" PRIu64 "\n", seq, words[0]);
        return -1;
    }
    for (uint64_t i = 2; i < n; i++) {
        if (words[i] != pattern_word(seq, i)) {
            fprintf(stderr, "batch %" PRIu64 ": word %" PRIu64 " of %" PRIu64 " is 0x%016" PRIx64
                            ", expected 0x%016" PRIx64 "\n",
                    seq, i, n, words[i], pattern_word(seq, i));
            return -1;
        }
        sum = checksum_step(sum, words[i]);
    }
    if (sum != words[1]) {
        fprintf(stderr, "batch %" PRIu64 ": checksum 0x%016" PRIx64 ", expected 0x%016" PRIx64 "\n", seq, sum,
                words[1]);
        return -1;
    }
    return 0;
}

static uint64_t *slot_words(shmfeed_ring *ring, uint32_t slot)
{
    shmfeed_geometry g;
    uint8_t *base;
    shmfeed_ring_geometry(ring, &g);
    shmfeed_ring_base(ring, &base);
    return (uint64_t *)(void *)(base + g.data_offset + (uint64_t)slot * g.slot_stride);
}

/* ---- producer ------------------------------------------------------------ */

static int producer_fail(shmfeed_ring *ring, const char *what, uint64_t seq, int rc)
{
    char msg[160];
    snprintf(msg, sizeof msg, "producer: %s of batch %" PRIu64 " returned %d (%s)", what, seq, rc,
             shmfeed_strerror(rc));
    fprintf(stderr, "%s\n", msg);
    shmfeed_close(ring, CLOSE_PRODUCER_FAILED, msg);
    return 1;
}

/* Produce batches first, first+step, ... below cfg->batches. */
static int produce_all(shmfeed_ring *ring, const config *cfg, uint64_t first, uint64_t step, uint64_t owner)
{
    for (uint64_t seq = first; seq < cfg->batches; seq += step) {
        shmfeed_claimed c;
        uint64_t len = payload_len(cfg, seq);
        int rc;
        if (seq % ABORT_EVERY == 5) { /* a half-written batch that must never be seen */
            if ((rc = shmfeed_claim(ring, seq, owner, WAIT_NS, &c)))
                return rc == SHMFEED_E_CLOSED ? 1 : producer_fail(ring, "claim (to abort)", seq, rc);
            fill_payload(slot_words(ring, c.slot), len, seq + 1);
            if ((rc = shmfeed_abort(ring, &c)))
                return producer_fail(ring, "abort", seq, rc);
        }
        if ((rc = shmfeed_claim(ring, seq, owner, WAIT_NS, &c)))
            return rc == SHMFEED_E_CLOSED ? 1 : producer_fail(ring, "claim", seq, rc);
        if (c.seq != seq)
            return producer_fail(ring, "claim (wrong seq)", seq, SHMFEED_E_STATE);
        fill_payload(slot_words(ring, c.slot), len, seq);
        if ((rc = shmfeed_commit(ring, &c, len)))
            return rc == SHMFEED_E_CLOSED ? 1 : producer_fail(ring, "commit", seq, rc);
    }
    return 0;
}

static uint64_t aborts_expected(const config *cfg)
{
    uint64_t n = 0;
    for (uint64_t seq = 5; seq < cfg->batches; seq += ABORT_EVERY)
        n++;
    return n;
}

/* ---- consumer ------------------------------------------------------------ */

static int consumer_fail(shmfeed_ring *ring, int rc, const char *what, uint64_t at)
{
    char reason[256] = "";
    int32_t code = 0;
    shmfeed_close_reason(ring, &code, reason, sizeof reason);
    fprintf(stderr, "consumer: %s at batch %" PRIu64 ": %d (%s)%s%s\n", what, at, rc, shmfeed_strerror(rc),
            code ? "; ring closed: " : "", reason);
    shmfeed_close(ring, CLOSE_CONSUMER_FAILED, "consumer failed"); /* stop the producers */
    return 1;
}

static int consume_all(shmfeed_ring *ring, const config *cfg)
{
    shmfeed_acquired held[HELD];
    uint8_t *seen = calloc(cfg->batches, 1);
    uint64_t got = 0;
    int rc;
    CHECK(seen);
    for (got = 0; got < cfg->batches; got++) {
        shmfeed_acquired *a = &held[got % HELD];
        if (got >= HELD && (rc = shmfeed_release(ring, a))) { /* the oldest one */
            free(seen);
            return consumer_fail(ring, rc, "release", a->seq);
        }
        if ((rc = shmfeed_acquire(ring, WAIT_NS, a))) {
            free(seen);
            return consumer_fail(ring, rc, "acquire", got);
        }
        const char *wrong = NULL;
        if (a->seq >= cfg->batches)
            wrong = "sequence out of range";
        else if (seen[a->seq])
            wrong = "delivered twice";
        else if (cfg->ordered && a->seq != got)
            wrong = "out of order";
        else if (a->payload_len != payload_len(cfg, a->seq))
            wrong = "wrong payload length";
        else if (verify_payload(slot_words(ring, a->slot), a->payload_len, a->seq))
            wrong = "corrupt payload";
        if (wrong) {
            fprintf(stderr, "consumer: batch %" PRIu64 " (acquire #%" PRIu64 ", slot %u): %s\n", a->seq, got,
                    a->slot, wrong);
            free(seen);
            return consumer_fail(ring, SHMFEED_E_STATE, wrong, got);
        }
        seen[a->seq] = 1;
    }
    for (uint64_t k = got > HELD ? got - HELD : 0; k < got; k++)
        if ((rc = shmfeed_release(ring, &held[k % HELD]))) {
            free(seen);
            return consumer_fail(ring, rc, "final release", got);
        }
    free(seen); /* got == batches with no duplicate: every sequence was seen */
    shmfeed_acquired extra;
    CHECK_RC(shmfeed_acquire(ring, 0, &extra), SHMFEED_E_AGAIN); /* and nothing else */
    return 0;
}

/* ---- the two ways to run producers ---------------------------------------- */

typedef struct producer_thread {
    shmfeed_ring *ring;
    const config *cfg;
    uint64_t index;
    int rc;
    pthread_t thread;
} producer_thread;

static void *producer_main(void *arg)
{
    producer_thread *p = arg;
    p->rc = produce_all(p->ring, p->cfg, p->index, PRODUCERS, p->index + 1);
    return NULL;
}

static int run_threads(shmfeed_ring *ring, const config *cfg)
{
    producer_thread producers[PRODUCERS];
    int failed = 0;
    for (int k = 0; k < PRODUCERS; k++) {
        producers[k] = (producer_thread){.ring = ring, .cfg = cfg, .index = (uint64_t)k};
        CHECK(pthread_create(&producers[k].thread, NULL, producer_main, &producers[k]) == 0);
    }
    failed |= consume_all(ring, cfg);
    for (int k = 0; k < PRODUCERS; k++) {
        CHECK(pthread_join(producers[k].thread, NULL) == 0);
        if (producers[k].rc) {
            fprintf(stderr, "producer thread %d failed\n", k);
            failed = 1;
        }
    }
    return failed;
}

static int run_processes(shmfeed_ring *ring, const config *cfg)
{
    pid_t pids[PRODUCERS];
    char path[128];
    int failed = 0;
    CHECK_RC(shmfeed_ring_path(ring, path, sizeof path), SHMFEED_OK);
    fflush(NULL);
    for (int k = 0; k < PRODUCERS; k++) {
        pids[k] = fork();
        CHECK(pids[k] >= 0);
        if (pids[k] == 0) {
            shmfeed_ring *mine;
            char err[256];
            if (shmfeed_ring_attach(path, &mine, err, sizeof err) != SHMFEED_OK) {
                fprintf(stderr, "producer %d: attach %s failed: %s\n", k, path, err);
                shmfeed_close(ring, CLOSE_PRODUCER_FAILED, "producer could not attach");
                _exit(2);
            }
            int rc = produce_all(mine, cfg, (uint64_t)k, PRODUCERS, (uint64_t)getpid());
            shmfeed_ring_detach(mine);
            _exit(rc ? 1 : 0);
        }
    }
    failed |= consume_all(ring, cfg);
    for (int k = 0; k < PRODUCERS; k++) {
        int status;
        CHECK(waitpid(pids[k], &status, 0) == pids[k]);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "producer process %d (pid %d) failed: status 0x%x\n", k, (int)pids[k], status);
            failed = 1;
        }
    }
    return failed;
}

/* ---- main ---------------------------------------------------------------- */

static int usage(void)
{
    fprintf(stderr, "usage: test_stress ordered|unordered thread|process small|large [batches]\n");
    return 2;
}

int main(int argc, char **argv)
{
    config cfg = {0};
    if (argc < 4)
        return usage();
    if (!strcmp(argv[1], "ordered"))
        cfg.ordered = 1;
    else if (strcmp(argv[1], "unordered"))
        return usage();
    if (!strcmp(argv[2], "process"))
        cfg.processes = 1;
    else if (strcmp(argv[2], "thread"))
        return usage();
    if (!strcmp(argv[3], "small")) {
        cfg.slots = 8;
        cfg.slot_bytes = 64;
        cfg.batches = SMALL_BATCHES;
    } else if (!strcmp(argv[3], "large")) {
        cfg.slots = 4;
        cfg.slot_bytes = 1 << 20;
        cfg.batches = LARGE_BATCHES;
    } else {
        return usage();
    }
    const char *n = argc > 4 ? argv[4] : getenv("SHMFEED_STRESS_BATCHES");
    if (n && *n)
        cfg.batches = strtoull(n, NULL, 10);
    if (cfg.batches == 0)
        return usage();
#if defined(__SANITIZE_THREAD__)
    if (cfg.processes) {
        printf("skip: ThreadSanitizer does not see across processes; run the thread mode\n");
        return T_EXIT_SKIP;
    }
#endif
    alarm(280); /* below CTest's timeout: a hang fails with a signal, not a silent kill */

    shmfeed_ring *ring;
    char err[256];
    if (shmfeed_ring_create(cfg.slots, cfg.slot_bytes, cfg.ordered ? SHMFEED_ORDERED : 0, &ring, err, sizeof err)) {
        fprintf(stderr, "creating the ring failed: %s\n", err);
        return T_EXIT_FAIL;
    }
    uint64_t t0 = shmfeed_now_ns();
    int failed = cfg.processes ? run_processes(ring, &cfg) : run_threads(ring, &cfg);
    double secs = (double)(shmfeed_now_ns() - t0) / 1e9;

    shmfeed_counters k;
    shmfeed_counters_read(ring, &k);
    if (!failed) {
        uint64_t aborts = aborts_expected(&cfg);
        int bad = k.commits != cfg.batches || k.aborts != aborts || k.claims != cfg.batches + aborts ||
                  k.acquires != cfg.batches || k.releases != cfg.batches || k.stale_commits != 0 ||
                  k.reclaims != 0 || (cfg.ordered && k.consumer_head != cfg.batches);
        if (bad) {
            fprintf(stderr,
                    "counters do not add up: claims %" PRIu64 " commits %" PRIu64 " aborts %" PRIu64
                    " (expected %" PRIu64 ") acquires %" PRIu64 " releases %" PRIu64 " stale %" PRIu64
                    " head %" PRIu64 "\n",
                    k.claims, k.commits, k.aborts, aborts, k.acquires, k.releases, k.stale_commits,
                    k.consumer_head);
            failed = 1;
        }
    }
    printf("%s %s %s: %" PRIu64 " batches of up to %" PRIu64 " bytes, %d producers, %u slots: %.2f s "
           "(%.0f batches/s), producer waits %" PRIu64 ", consumer waits %" PRIu64 "%s\n",
           argv[1], argv[2], argv[3], cfg.batches, cfg.slot_bytes, PRODUCERS, cfg.slots, secs,
           (double)cfg.batches / secs, k.producer_waits, k.consumer_waits, failed ? " FAILED" : "");
    shmfeed_ring_detach(ring);
    return failed ? T_EXIT_FAIL : T_EXIT_PASS;
}
