/*
 * shmfeed.h — the public ABI of the pyshmfeed ring.
 *
 * This file is the one contract between the C core and everything above it.
 * The Python build feeds it to cffi's ffi.cdef() with only its preprocessor
 * lines removed, so it holds nothing but plain declarations: fixed-width
 * types, an enum of status codes, opaque handles and prototypes.
 *
 * Conventions
 *   - Every function returns SHMFEED_OK (0) or a negative shmfeed_status.
 *   - Nothing here prints, aborts or allocates on the hot path
 *     (claim/commit/abort/acquire/release) unless a caller has to sleep.
 *   - Functions that can fail for a reason worth telling a person take
 *     (err, errlen) and write a NUL-terminated explanation there.
 *   - Timeouts are in nanoseconds; a negative timeout waits forever, but
 *     always in bounded slices so that close() is seen within one slice.
 */
#ifndef SHMFEED_H
#define SHMFEED_H

#include <stddef.h>
#include <stdint.h>

typedef enum shmfeed_status {
    SHMFEED_OK = 0,
    SHMFEED_E_INVAL = -1,     /* an argument is out of range */
    SHMFEED_E_NOMEM = -2,     /* the machine cannot back the segment */
    SHMFEED_E_SYS = -3,       /* a system call failed; see err text */
    SHMFEED_E_CORRUPT = -4,   /* the segment fails validation */
    SHMFEED_E_VERSION = -5,   /* the segment has another layout version */
    SHMFEED_E_TIMEOUT = -6,   /* the wait ran out of time */
    SHMFEED_E_CLOSED = -7,    /* the ring was closed by either side */
    SHMFEED_E_STALE = -8,     /* the claim was reclaimed; the batch was re-issued */
    SHMFEED_E_STATE = -9,     /* wrong slot state: commit twice, release unacquired */
    SHMFEED_E_TOOBIG = -10,   /* payload longer than the slot */
    SHMFEED_E_NOENT = -11,    /* no such segment */
    SHMFEED_E_PERM = -12,     /* not allowed to open the segment */
    SHMFEED_E_AGAIN = -13     /* nothing available right now (zero timeout) */
} shmfeed_status;

/* Flags for shmfeed_ring_create. */
enum {
    SHMFEED_ORDERED = 1,      /* batch s lives in slot s mod N (deterministic) */
    SHMFEED_NAMED = 2         /* back with a named POSIX segment, not memfd */
};

/* Slot states, as reported by shmfeed_slot_info. */
enum {
    SHMFEED_SLOT_FREE = 0,
    SHMFEED_SLOT_CLAIMED = 1,
    SHMFEED_SLOT_READY = 2,
    SHMFEED_SLOT_ACQUIRED = 3
};

typedef struct shmfeed_ring shmfeed_ring;   /* process-local handle */

typedef struct shmfeed_geometry {
    uint32_t slot_count;
    uint32_t flags;
    uint64_t slot_bytes;      /* usable bytes per slot */
    uint64_t slot_stride;     /* distance between slots (page multiple) */
    uint64_t data_offset;     /* offset of slot 0 from the mapping base */
    uint64_t segment_bytes;   /* size of the whole mapping */
    uint32_t creator_pid;
    uint32_t creator_uid;
    uint64_t created_ns;      /* when the creator made it: a handle names one ring, not a path's next one */
} shmfeed_geometry;

/* What a producer holds between claim and commit/abort. */
typedef struct shmfeed_claimed {
    uint32_t slot;
    uint32_t reserved;
    uint64_t seq;             /* the batch sequence this claim is for */
    uint64_t owner;
    uint64_t token;           /* the slot word at claim time: proves ownership */
} shmfeed_claimed;

/* What the consumer holds between acquire and release. */
typedef struct shmfeed_acquired {
    uint32_t slot;
    uint32_t reserved;
    uint64_t seq;
    uint64_t payload_len;
    uint64_t commit_ns;       /* CLOCK_MONOTONIC time of the commit */
    uint64_t token;
} shmfeed_acquired;

typedef struct shmfeed_counters {
    uint64_t claims;
    uint64_t commits;
    uint64_t aborts;
    uint64_t stale_commits;
    uint64_t reclaims;
    uint64_t producer_waits;
    uint64_t producer_wait_ns;
    uint64_t acquires;
    uint64_t releases;
    uint64_t consumer_waits;
    uint64_t consumer_wait_ns;
    uint64_t consumer_head;   /* ordered mode: next sequence to acquire */
} shmfeed_counters;

typedef struct shmfeed_slot_info {
    uint32_t state;           /* SHMFEED_SLOT_* */
    uint32_t generation;
    uint64_t seq;
    uint64_t owner;
    uint64_t payload_len;
    uint64_t claim_ns;
    uint64_t commit_ns;
} shmfeed_slot_info;

/* ---- segment lifetime ---------------------------------------------------- */

int shmfeed_ring_create(uint32_t slot_count, uint64_t slot_bytes, uint32_t flags,
                        shmfeed_ring **out, char *err, size_t errlen);
int shmfeed_ring_attach(const char *path, shmfeed_ring **out, char *err, size_t errlen);
int shmfeed_ring_detach(shmfeed_ring *ring);
/* The path another process on this machine opens to attach. */
int shmfeed_ring_path(const shmfeed_ring *ring, char *buf, size_t buflen);
int shmfeed_ring_geometry(const shmfeed_ring *ring, shmfeed_geometry *out);
/* The mapping base; slot i starts at base + data_offset + i * slot_stride. */
int shmfeed_ring_base(const shmfeed_ring *ring, uint8_t **out);
/* Bytes a ring of this shape needs, and bytes the machine can give now. */
int shmfeed_ring_size_for(uint32_t slot_count, uint64_t slot_bytes, uint64_t *out);
int shmfeed_memory_available(uint32_t flags, uint64_t *out);

/* ---- producer side ------------------------------------------------------- */

int shmfeed_claim(shmfeed_ring *ring, uint64_t seq, uint64_t owner, int64_t timeout_ns,
                  shmfeed_claimed *out);
/* Unordered rings: claim a free slot for the next sequence of a counter kept in
 * the segment (out->seq), so that every process attached gets distinct ones. The
 * sequence is taken with the slot, not before the wait: a wait that times out
 * uses none. SHMFEED_E_INVAL on an ordered ring (name the batch: shmfeed_claim). */
int shmfeed_claim_next(shmfeed_ring *ring, uint64_t owner, int64_t timeout_ns, shmfeed_claimed *out);
int shmfeed_commit(shmfeed_ring *ring, const shmfeed_claimed *claim, uint64_t payload_len);
int shmfeed_abort(shmfeed_ring *ring, const shmfeed_claimed *claim);

/* ---- consumer side ------------------------------------------------------- */

int shmfeed_acquire(shmfeed_ring *ring, int64_t timeout_ns, shmfeed_acquired *out);
int shmfeed_release(shmfeed_ring *ring, const shmfeed_acquired *acquired);

/* ---- work hand-out (work.c: NOTE [work hand-out]) --------------------------- */

enum {
    SHMFEED_JOB_RESUME = 1,       /* producers skip what the resumed state delivered */
    SHMFEED_JOB_ROUND_ROBIN = 2,  /* task k goes to record k % stride only (torch's assignment) */
    SHMFEED_JOB_CARRY = 4         /* round robin: the same job re-posted; records go on from carry_gen's */
};

/* A job: tasks k = 0 .. count-1 are batches base_seq + k of `epoch`. */
typedef struct shmfeed_job {
    uint64_t epoch;
    uint64_t base_seq;
    uint64_t count;
    uint64_t start;           /* passed through: where the producers' mapping starts */
    uint64_t flags;           /* SHMFEED_JOB_* */
    uint64_t stride;          /* round robin: the number of producer records taking part */
    uint64_t carry_gen;       /* with SHMFEED_JOB_CARRY */
    uint64_t gen;             /* out: the generation the job was posted (or read) as */
    uint64_t taken;           /* out: tasks handed out (fresh, not re-issued) so far */
} shmfeed_job;

/* A task a producer took. */
typedef struct shmfeed_task {
    uint64_t seq;
    uint64_t k;               /* seq - base_seq */
    uint64_t epoch;
    uint64_t start;
    uint64_t flags;
    uint64_t gen;
    uint32_t reissued;        /* 1: taken from the re-issue queue */
    uint32_t reserved;
} shmfeed_task;

/* A producer record, as the feed reads it. */
typedef struct shmfeed_record {
    uint64_t owner;
    uint64_t task;            /* seq + 1 of the task held; 0: none */
    uint64_t intent;          /* non-zero: a take is in progress */
    uint64_t since_ns;
    uint64_t busy_ns;
    uint64_t batches;
    uint32_t pid;
    uint32_t stop;            /* a stop was requested (shmfeed_record_stop) */
    uint64_t next_gen;        /* round robin: the job generation and ... */
    uint64_t next_k;          /* ... task number it takes next */
    uint32_t signal;          /* the fatal signal its producer died of (shmfeed_record_watch_signals); 0: none */
    uint32_t reserved;
} shmfeed_record;

/* Feed side. post publishes a new job (its generation and the previous
 * job's handed-out count come back in job->gen / job->taken); freeze stops
 * fresh hand-out of the current job (re-issued tasks still go out). */
int shmfeed_job_post(shmfeed_ring *ring, shmfeed_job *job);
int shmfeed_job_freeze(shmfeed_ring *ring, shmfeed_job *out);
int shmfeed_job_read(const shmfeed_ring *ring, shmfeed_job *out);
int shmfeed_reissue(shmfeed_ring *ring, uint64_t seq);
/* The queued re-issued seqs (up to cap) and their number. */
int shmfeed_reissue_read(const shmfeed_ring *ring, uint64_t *seqs, uint32_t cap, uint32_t *n_out);
int shmfeed_record_reset(shmfeed_ring *ring, uint32_t rec);
/* Ask the producer at rec to stop: its next take (or the one it sleeps in)
 * returns SHMFEED_E_CLOSED; a task it holds is finished first. */
int shmfeed_record_stop(shmfeed_ring *ring, uint32_t rec);
int shmfeed_record_read(const shmfeed_ring *ring, uint32_t rec, shmfeed_record *out);
int shmfeed_max_producers(void);
/* Producer side: take the next task (re-issued first), then claim/commit
 * its slot, then task_done. */
int shmfeed_record_open(shmfeed_ring *ring, uint32_t rec, uint64_t owner, uint32_t pid);
/* In the producer's process, after record_open: a fatal signal (SIGSEGV, SIGBUS, SIGFPE, SIGILL,
 * SIGABRT) is written into record rec before the process goes on to die of it, so the feed can
 * say which signal killed it. Handlers installed before this one still run, after it. */
int shmfeed_record_watch_signals(shmfeed_ring *ring, uint32_t rec);
int shmfeed_take(shmfeed_ring *ring, uint32_t rec, int64_t timeout_ns, shmfeed_task *out);
int shmfeed_task_done(shmfeed_ring *ring, uint32_t rec, uint64_t busy_ns);

/* ---- control ------------------------------------------------------------- */

/* Free every claim held by a dead owner; writes the freed sequences to
 * seqs (up to cap) and their number to *n_out. */
int shmfeed_reclaim(shmfeed_ring *ring, uint64_t owner, uint64_t *seqs, uint32_t cap,
                    uint32_t *n_out);
/* Ordered mode: has batch seq been committed (and maybe consumed)? */
int shmfeed_seq_committed(const shmfeed_ring *ring, uint64_t seq, int32_t *out);
int shmfeed_close(shmfeed_ring *ring, int32_t code, const char *message);
/* *code_out is 0 while the ring is open. */
int shmfeed_close_reason(const shmfeed_ring *ring, int32_t *code_out, char *buf, size_t buflen);
int shmfeed_counters_read(const shmfeed_ring *ring, shmfeed_counters *out);
int shmfeed_slot_info_read(const shmfeed_ring *ring, uint32_t slot, shmfeed_slot_info *out);
/* Length of one wait slice in nanoseconds (close is seen within one). */
int64_t shmfeed_wait_slice_ns(void);
/* CLOCK_MONOTONIC now, for latency measurements comparable with commit_ns. */
uint64_t shmfeed_now_ns(void);
const char *shmfeed_strerror(int status);

/* ---- faults, round 2 ---- */

/* Give the segment up but keep its address range: close the descriptor, unlink the
 * name (named backing; only in the process that created the ring, never in a fork()ed
 * child) and put private zero pages over the mapping, which frees the segment's memory
 * now. Memory that outlives the ring (views held by a garbage-collected caller) then
 * reads zeros instead of faulting. The handle stays valid for shmfeed_ring_detach,
 * which unmaps the range and frees the handle; no other call may use a retired handle.
 * Idempotent: a caller interrupted after it may call it again. */
int shmfeed_ring_retire(shmfeed_ring *ring);
/* Named backing: SHMFEED_E_CORRUPT, with the sizes in err, once another process has
 * truncated the segment (protocol calls then return SHMFEED_E_CORRUPT; a read past the
 * end is caught and reads zeros). SHMFEED_OK otherwise, and always for memfd rings,
 * which are sealed against resizing. */
int shmfeed_ring_check_backing(const shmfeed_ring *ring, char *err, size_t errlen);
/* The limits shmfeed_ring_create enforces, so the layers above check the same ones. */
uint32_t shmfeed_max_slots(void);
uint64_t shmfeed_max_slot_bytes(void);

/* ---- the segment layout, for code that reads a segment without attaching it ---- */

/* One field of the segment (csrc/layout.h), as offsetof/sizeof give it. Names are
 * "header.<field>", "producer.<field>" and "consumer.<field>" (counters; offset
 * from the segment's start), "desc"
 * (slot 0's descriptor: offset and size, i.e. the stride) and "desc.<field>"
 * (offset within a descriptor). */
typedef struct shmfeed_field {
    const char *name;
    uint32_t offset;
    uint32_t size;
} shmfeed_field;
/* The table of every field, and its length: the one description of the layout
 * the Python side reads (pyshmfeed cleanup, tests that write into a segment). */
int shmfeed_layout_fields(const shmfeed_field **out, uint32_t *n_out);
/* SHMFEED_MAGIC, the first 8 bytes of every segment, and SHMFEED_LAYOUT_VERSION. */
uint64_t shmfeed_layout_magic(void);
uint32_t shmfeed_layout_version(void);

#endif /* SHMFEED_H */
