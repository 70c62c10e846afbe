/*
 * segment.c — creating, validating, attaching and detaching the segment.
 *
 * Backing: an anonymous memfd (default) sealed against resizing, so nothing
 * has a name in /dev/shm, nothing outlives the last process that maps it,
 * and the /dev/shm mount size does not matter. Other processes of the same
 * user attach through /proc/<creator pid>/fd/<fd>, which the kernel only
 * lets same-user (ptrace-capable) processes open. The named fallback is a
 * POSIX segment with a random name, O_EXCL and mode 0600.
 *
 * Memory: creation checks that the machine has the whole ring's and reserves
 * the control pages; each slot's pages are reserved by its first claim
 * (NOTE [slot memory]). A machine without the memory fails at creation with
 * the numbers, or, if the memory went after the check, with a clear error from
 * the claim; never with SIGBUS mid-epoch.
 *
 * Attach trusts nothing it reads: it checks every field against the size of
 * the mapping it actually got and keeps its own copy of the geometry.
 *
 * A named segment can be truncated by any process of the user; the SIGBUS
 * guard below keeps that from killing the processes that map it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "ring_internal.h"

static int fail(char *err, size_t errlen, int status, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return status;
}

SHMFEED_MUST_USE static int round_up(uint64_t v, uint64_t align, uint64_t *out)
{
    if (v > UINT64_MAX - (align - 1))
        return -1;
    *out = (v + align - 1) / align * align;
    return 0;
}

/* Offsets of a ring of this shape; -1 on overflow. */
SHMFEED_MUST_USE static int compute_geometry(uint32_t slot_count, uint64_t slot_bytes, uint64_t *stride,
                            uint64_t *data_offset, uint64_t *total)
{
    uint64_t desc_end, slots_bytes;
    if (round_up(slot_bytes, SHMFEED_PAGE, stride))
        return -1;
    desc_end = SHMFEED_DESC_OFFSET + (uint64_t)slot_count * sizeof(shm_slot_desc);
    if (round_up(desc_end, SHMFEED_PAGE, data_offset))
        return -1;
    if (__builtin_mul_overflow(*stride, (uint64_t)slot_count, &slots_bytes))
        return -1;
    if (__builtin_add_overflow(*data_offset, slots_bytes, total))
        return -1;
    return 0;
}

SHMFEED_MUST_USE int shmfeed_ring_size_for(uint32_t slot_count, uint64_t slot_bytes, uint64_t *out)
{
    uint64_t stride, data_offset;
    if (!out || slot_count == 0 || slot_count > SHMFEED_MAX_SLOTS || slot_bytes == 0 ||
        slot_bytes > SHMFEED_MAX_SLOT_BYTES)
        return SHMFEED_E_INVAL;
    if (compute_geometry(slot_count, slot_bytes, &stride, &data_offset, out))
        return SHMFEED_E_INVAL;
    return SHMFEED_OK;
}

static uint64_t read_u64_file(const char *path, int *ok)
{
    char buf[64] = {0};
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    *ok = 0;
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0 || buf[0] < '0' || buf[0] > '9') /* "max" means unlimited */
        return 0;
    *ok = 1;
    return strtoull(buf, NULL, 10);
}

/* Lower *avail to what the memory cgroup in `dir` leaves (v2, then v1 file names). */
static void cap_by_cgroup_dir(const char *dir, uint64_t *avail)
{
    static const char *const names[2][2] = {{"memory.max", "memory.current"},
                                            {"memory.limit_in_bytes", "memory.usage_in_bytes"}};
    char max_path[1100], cur_path[1100];
    for (int i = 0; i < 2; i++) {
        int ok_max, ok_cur;
        snprintf(max_path, sizeof max_path, "%s/%s", dir, names[i][0]);
        snprintf(cur_path, sizeof cur_path, "%s/%s", dir, names[i][1]);
        uint64_t max = read_u64_file(max_path, &ok_max), cur = read_u64_file(cur_path, &ok_cur);
        if (ok_max && ok_cur && (max > cur ? max - cur : 0) < *avail)
            *avail = max > cur ? max - cur : 0;
    }
}

/* Lower *avail to what this process's memory cgroup leaves, v2 or v1: its own
 * directory (from /proc/self/cgroup) and the mount roots, which is what a
 * container sees of its own cgroup. A ring past the limit would not fail
 * cleanly: the kernel OOM-kills the creator while fallocate reserves it. */
static void cap_by_cgroups(uint64_t *avail)
{
    static const char *const roots[] = {"/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/memory"};
    char line[1024], dir[1100];
    for (size_t i = 0; i < sizeof roots / sizeof roots[0]; i++)
        cap_by_cgroup_dir(roots[i], avail);
    FILE *f = fopen("/proc/self/cgroup", "re");
    if (!f)
        return;
    while (fgets(line, sizeof line, f)) { /* "hierarchy:controllers:path" */
        char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (!c2)
            continue;
        *c2 = '\0';
        char *path = c2 + 1, *controllers = c1 + 1;
        path[strcspn(path, "\n")] = '\0';
        if (path[0] != '/' || path[1] == '\0')
            continue; /* the root: read above */
        if (controllers[0] == '\0') { /* v2 */
            snprintf(dir, sizeof dir, "/sys/fs/cgroup%s", path);
            cap_by_cgroup_dir(dir, avail);
            snprintf(dir, sizeof dir, "/sys/fs/cgroup/unified%s", path);
            cap_by_cgroup_dir(dir, avail);
        } else {
            char *save = NULL;
            for (char *c = strtok_r(controllers, ",", &save); c; c = strtok_r(NULL, ",", &save))
                if (strcmp(c, "memory") == 0) {
                    snprintf(dir, sizeof dir, "/sys/fs/cgroup/memory%s", path);
                    cap_by_cgroup_dir(dir, avail);
                }
        }
    }
    fclose(f);
}

/* MemAvailable, capped by the memory cgroup's limit (containers) and, for named
 * segments, by the free space of the /dev/shm mount. */
SHMFEED_MUST_USE int shmfeed_memory_available(uint32_t flags, uint64_t *out)
{
    uint64_t avail = UINT64_MAX;
    char line[256];
    if (!out)
        return SHMFEED_E_INVAL; /* before the fopen: nothing to close on this path */
    FILE *f = fopen("/proc/meminfo", "re");
    if (f) {
        while (fgets(line, sizeof line, f)) {
            unsigned long long kb;
            if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) {
                avail = (uint64_t)kb * 1024ULL;
                break;
            }
        }
        fclose(f);
    }
    cap_by_cgroups(&avail);
    if (flags & SHMFEED_NAMED) {
        struct statvfs sv;
        if (statvfs("/dev/shm", &sv) == 0) {
            uint64_t shm_free = (uint64_t)sv.f_bavail * (uint64_t)sv.f_frsize;
            if (shm_free < avail)
                avail = shm_free;
        }
    }
    *out = avail;
    return SHMFEED_OK;
}

SHMFEED_MUST_USE static int open_backing(shmfeed_ring *r, uint32_t flags, char *err, size_t errlen)
{
    if (!(flags & SHMFEED_NAMED)) {
        r->fd = memfd_create("pyshmfeed-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        if (r->fd < 0)
            return fail(err, errlen, SHMFEED_E_SYS, "memfd_create failed: %s", strerror(errno));
        snprintf(r->path, sizeof r->path, "/proc/%d/fd/%d", (int)getpid(), r->fd);
        return SHMFEED_OK;
    }
    /* Random, unguessable name; O_EXCL so a planted segment is an error. */
    uint64_t rnd[2];
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd)
        return fail(err, errlen, SHMFEED_E_SYS, "getrandom failed: %s", strerror(errno));
    snprintf(r->shm_name, sizeof r->shm_name, "/pyshmfeed-%u-%016llx%016llx", (unsigned)getuid(),
             (unsigned long long)rnd[0], (unsigned long long)rnd[1]);
    r->fd = shm_open(r->shm_name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (r->fd < 0) {
        int e = errno;
        int rc = fail(err, errlen, e == EEXIST ? SHMFEED_E_PERM : SHMFEED_E_SYS, "shm_open(%s) failed: %s",
                      r->shm_name, strerror(e));
        r->shm_name[0] = '\0'; /* not ours: ring_free must not unlink a name somebody else made */
        return rc;
    }
    snprintf(r->path, sizeof r->path, "/dev/shm%s", r->shm_name);
    return SHMFEED_OK;
}

/* ---- the SIGBUS guard (unsealed backings: named segments) ------------------
 *
 * A named segment is a file in /dev/shm that any process of the same user may
 * ftruncate (memfd rings are sealed against that). Touching a mapped page past
 * the file's new end raises SIGBUS, whose default action ends the process, so
 * one stray or hostile program would kill the training run. Two defences,
 * because neither is enough alone:
 *
 *  - Before a slot is handed out (claim, acquire) the protocol fstats the file
 *    and refuses with SHMFEED_E_CORRUPT if it is shorter than the mapping
 *    (shmfeed_backing_check); shmfeed_ring_check_backing says so in words.
 *    That is the error a user sees. But a file truncated after the check,
 *    while a view of a slot is being read (by numpy, not by this library),
 *    would still fault: no check can close that window.
 *  - So a SIGBUS handler: if the faulting address lies in a guarded mapping,
 *    it maps private zero pages over the rest of that mapping (MAP_FIXED: one
 *    system call, safe in a handler) and returns. The access is retried and
 *    reads zeros; the ring is marked lost, so every later call on it returns
 *    SHMFEED_E_CORRUPT. Any other SIGBUS goes on to the handler installed
 *    before ours (faulthandler, say), or to the default action, exactly as if
 *    ours were not there.
 *
 * The handler is installed with the first guarded mapping of the process. A
 * SIGBUS handler installed after it (faulthandler.enable() later on) runs
 * first and may end the process before ours is reached: enable those first.
 */
#define GUARD_RANGES 256 /* unsealed mappings one process can have guarded at once */

typedef struct guard_range {
    atomic_u32 in_use; /* taken by guard_watch with a CAS */
    atomic_u32 lost;   /* the handler replaced part of the range: the ring is corrupt */
    atomic_u64 base;   /* 0 while the entry is not published */
    atomic_u64 len;
} guard_range;

static guard_range guard_ranges[GUARD_RANGES];
static struct sigaction guard_previous; /* written once, before the handler is installed */
static atomic_u32 guard_state;          /* 0 none, 1 installing, 2 installed, 3 sigaction failed */
static uint64_t guard_page = SHMFEED_PAGE;

static void guard_on_sigbus(int sig, siginfo_t *si, void *ucontext)
{
    uint64_t addr = (uint64_t)(uintptr_t)si->si_addr;
    if (si->si_code == BUS_ADRERR) { /* a page past the end of a file, not a raised signal */
        for (int i = 0; i < GUARD_RANGES; i++) {
            guard_range *g = &guard_ranges[i];
            uint64_t base = load_acquire64(&g->base); /* pairs with guard_watch's store_release */
            uint64_t len = load_relaxed64(&g->len);
            if (!base || addr < base || addr - base >= len)
                continue;
            /* A truncation cuts a suffix: every page from the faulting one on is past the end. */
            uint64_t page = addr & ~(guard_page - 1);
            if (mmap((void *)(uintptr_t)page, base + len - page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0) != MAP_FAILED) {
                store_release32(&g->lost, 1);
                return; /* the faulting access runs again, on a zero page */
            }
            break;
        }
    }
    /* Not a guarded mapping: behave as if this handler had never been installed. */
    if (guard_previous.sa_flags & SA_SIGINFO) {
        if (guard_previous.sa_sigaction) {
            guard_previous.sa_sigaction(sig, si, ucontext);
            return;
        }
    } else if (guard_previous.sa_handler != SIG_DFL && guard_previous.sa_handler != SIG_IGN) {
        guard_previous.sa_handler(sig);
        return;
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGBUS, &dfl, NULL);
    raise(sig); /* delivered on return: the default action, as without us */
}

static void guard_install(void)
{
    uint32_t none = 0;
    if (cas32(&guard_state, &none, 1)) {
        long page = sysconf(_SC_PAGESIZE);
        if (page > 0)
            guard_page = (uint64_t)page;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = guard_on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        /* Publishes guard_previous and guard_page to every later guard_watch caller. */
        store_release32(&guard_state, sigaction(SIGBUS, &sa, &guard_previous) == 0 ? 2 : 3);
        return;
    }
    while (load_acquire32(&guard_state) == 1) /* another thread is installing it: microseconds */
        sched_yield();
}

/* Guard r's mapping if its backing can shrink (no F_SEAL_SHRINK: named segments, plain files). */
static void guard_watch(shmfeed_ring *r)
{
    int seals = fcntl(r->fd, F_GET_SEALS);
    r->guard = -1;
    r->unsealed = seals < 0 || !(seals & F_SEAL_SHRINK);
    if (!r->unsealed)
        return;
    guard_install();
    for (int i = 0; i < GUARD_RANGES; i++) {
        uint32_t free_ = 0;
        if (!cas32(&guard_ranges[i].in_use, &free_, 1))
            continue;
        store_relaxed32(&guard_ranges[i].lost, 0);
        store_relaxed64(&guard_ranges[i].len, r->map_bytes);
        store_release64(&guard_ranges[i].base, (uint64_t)(uintptr_t)r->base); /* publishes len */
        r->guard = i;
        return;
    }
    /* All entries taken: this mapping has the fstat checks only. */
}

/* Before the range stops being this file's mapping (munmap, or retire's zero pages). */
static void guard_forget(shmfeed_ring *r)
{
    if (r->guard < 0)
        return;
    guard_range *g = &guard_ranges[r->guard];
    store_release64(&g->base, 0);
    store_relaxed64(&g->len, 0);
    store_release32(&g->in_use, 0);
    r->guard = -1;
}

/* NOTE [slot memory]
 *
 * A slot's pages are reserved (fallocate) by the first claim of that slot, in
 * the process that will write it, not by the ring's creator:
 *
 *  - Reserving is not free: ~11 ms per 48 MB here, done once per page. At
 *    creation it all came before the first batch, in the training process,
 *    on one core (44 ms for the large preset's four 48 MB slots, where the
 *    whole 60-batch run takes 0.25 s). At first claim it is spread over the
 *    producers and overlaps with the consumer reading the slots already made,
 *    as a plain shared-memory ring's first-touch page faults do.
 *  - It still comes before anything writes the slot: a machine that ran out of
 *    memory after creation's check gives the claim SHMFEED_E_NOMEM (the claim is
 *    taken back, the slot stays free), never a SIGBUS in the middle of a write.
 *  - The descriptor's `backed` flag says it was done, for every process: a
 *    second fallocate over reserved pages is not free either (7 ms per 48 MB).
 *    The flag is set after fallocate returns; a claimer killed in between
 *    leaves it 0 and the next claim reserves again, which is harmless.
 *  - FALLOC_FL_KEEP_SIZE: a named segment truncated by another process is
 *    never grown back here; the backing check reports the truncation.
 *  - With CUDA staging, cudaHostRegister pins (and so allocates) every slot's
 *    pages when staging starts; claims then find them there. If the memory is
 *    short, the registration fails and the feed stages through a copy.
 */
SHMFEED_MUST_USE int shmfeed_slot_reserve(shmfeed_ring *r, uint32_t slot)
{
    shm_slot_desc *d = ring_desc(r, slot);
    if (load_acquire32(&d->backed))
        return SHMFEED_OK;
    if (r->fd < 0)
        return SHMFEED_E_CLOSED; /* retired: the segment is given up */
    off_t offset = (off_t)(r->data_offset + (uint64_t)slot * r->slot_stride);
    if (fallocate(r->fd, FALLOC_FL_KEEP_SIZE, offset, (off_t)r->slot_stride) != 0)
        return (errno == ENOSPC || errno == ENOMEM) ? SHMFEED_E_NOMEM : SHMFEED_E_SYS;
    store_release32(&d->backed, 1);
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_backing_check_unsealed(const shmfeed_ring *r, int stat_now)
{
    struct stat st;
    if (r->guard >= 0 && load_acquire32(&guard_ranges[r->guard].lost))
        return SHMFEED_E_CORRUPT;
    if (stat_now && r->fd >= 0 && fstat(r->fd, &st) == 0 && (uint64_t)st.st_size < r->map_bytes)
        return SHMFEED_E_CORRUPT;
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_ring_check_backing(const shmfeed_ring *r, char *err, size_t errlen)
{
    struct stat st;
    if (!r)
        return fail(err, errlen, SHMFEED_E_INVAL, "ring is NULL");
    if (!r->unsealed)
        return SHMFEED_OK;
    if (r->fd >= 0 && fstat(r->fd, &st) == 0 && (uint64_t)st.st_size < r->map_bytes)
        return fail(err, errlen, SHMFEED_E_CORRUPT,
                    "segment %s was truncated to %lld bytes, the ring maps %llu: another process resized it "
                    "(a named segment can be resized by any process of its user; the default memfd backing "
                    "is sealed against that)",
                    r->path, (long long)st.st_size, (unsigned long long)r->map_bytes);
    if (shmfeed_backing_check(r, 0))
        return fail(err, errlen, SHMFEED_E_CORRUPT,
                    "segment %s was truncated by another process: a read past its end was caught (SIGBUS) "
                    "and the rest of the mapping now reads zeros; the ring's contents are lost", r->path);
    return SHMFEED_OK;
}

static void ring_free(shmfeed_ring *r)
{
    guard_forget(r);
    shmfeed_fatal_forget(r);
    if (r->base && r->base != MAP_FAILED)
        munmap(r->base, r->map_bytes);
    if (r->fd >= 0)
        close(r->fd);
    /* Only the process that created the segment removes its name: a fork()ed child that
     * frees its copy of the handle must not take the segment from its parent. */
    if (r->is_creator && r->shm_name[0] && getpid() == r->opened_by)
        shm_unlink(r->shm_name);
    free(r);
}

SHMFEED_MUST_USE int shmfeed_ring_retire(shmfeed_ring *r)
{
    if (!r)
        return SHMFEED_E_INVAL;
    if (r->retired)
        return SHMFEED_OK;
    /* Zero pages over the whole range, in one call that replaces the shared mapping: the
     * segment's memory is released now, and a view still pointing here reads zeros rather
     * than faulting once ring_free unmaps. If the kernel refuses (no memory for the new
     * mapping), the shared mapping stays until ring_free: still safe to read, only later freed. */
    shmfeed_fatal_forget(r);
    void *zeros = mmap(r->base, r->map_bytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    if (zeros != MAP_FAILED) {
        guard_forget(r); /* no file behind the range now: nothing can fault */
    }
    if (r->fd >= 0)
        close(r->fd);
    r->fd = -1;
    if (r->is_creator && r->shm_name[0] && getpid() == r->opened_by)
        shm_unlink(r->shm_name);
    r->shm_name[0] = '\0';
    r->retired = 1;
    return SHMFEED_OK;
}

uint32_t shmfeed_max_slots(void) { return SHMFEED_MAX_SLOTS; }
uint64_t shmfeed_max_slot_bytes(void) { return SHMFEED_MAX_SLOT_BYTES; }

/* The layout as Python reads it: every entry from offsetof/sizeof of layout.h's structs. */
#define FIELD(prefix, type, base, f) {prefix #f, (uint32_t)((base) + offsetof(type, f)), sizeof(((type *)0)->f)}
#define HEADER(f) FIELD("header.", shm_header, 0, f)
#define PRODUCER(f) FIELD("producer.", shm_producer_counters, SHMFEED_COUNTERS_OFFSET + offsetof(shm_counters, producer), f)
#define CONSUMER(f) FIELD("consumer.", shm_consumer_counters, SHMFEED_COUNTERS_OFFSET + offsetof(shm_counters, consumer), f)
#define DESC(f) FIELD("desc.", shm_slot_desc, 0, f)
static const shmfeed_field layout_fields[] = {
    HEADER(magic), HEADER(version), HEADER(header_bytes), HEADER(segment_bytes), HEADER(slot_count),
    HEADER(flags), HEADER(slot_bytes), HEADER(slot_stride), HEADER(desc_offset), HEADER(desc_stride),
    HEADER(data_offset), HEADER(creator_pid), HEADER(creator_uid), HEADER(created_ns), HEADER(closed),
    HEADER(close_code), HEADER(close_msg),
    PRODUCER(claims), PRODUCER(commits), PRODUCER(commit_order), CONSUMER(acquires), CONSUMER(releases), CONSUMER(head),
    {"desc", SHMFEED_DESC_OFFSET, sizeof(shm_slot_desc)},
    DESC(word), DESC(owner), DESC(batch_seq), DESC(payload_len), DESC(claim_ns), DESC(commit_ns),
    DESC(commit_order), DESC(waiters), DESC(backed),
};
#undef FIELD
#undef HEADER
#undef PRODUCER
#undef CONSUMER
#undef DESC

SHMFEED_MUST_USE int shmfeed_layout_fields(const shmfeed_field **out, uint32_t *n_out)
{
    if (!out || !n_out)
        return SHMFEED_E_INVAL;
    *out = layout_fields;
    *n_out = (uint32_t)(sizeof layout_fields / sizeof layout_fields[0]);
    return SHMFEED_OK;
}

uint64_t shmfeed_layout_magic(void) { return SHMFEED_MAGIC; }
uint32_t shmfeed_layout_version(void) { return SHMFEED_LAYOUT_VERSION; }

/* What shmfeed_ring_create checks before it makes anything: the shape, the flags, and that the
 * machine has the memory for the whole ring now. Fills the geometry and the memory available. */
static int check_shape(uint32_t slot_count, uint64_t slot_bytes, uint32_t flags, uint64_t *stride,
                       uint64_t *data_offset, uint64_t *total, uint64_t *avail, char *err, size_t errlen)
{
    if (slot_count == 0 || slot_count > SHMFEED_MAX_SLOTS)
        return fail(err, errlen, SHMFEED_E_INVAL, "slot count %u is out of range: use 1..%u", slot_count,
                    SHMFEED_MAX_SLOTS);
    if (slot_bytes == 0 || slot_bytes > SHMFEED_MAX_SLOT_BYTES)
        return fail(err, errlen, SHMFEED_E_INVAL, "slot size %llu bytes is out of range: use 1..%llu",
                    (unsigned long long)slot_bytes, (unsigned long long)SHMFEED_MAX_SLOT_BYTES);
    if (flags & ~(uint32_t)(SHMFEED_ORDERED | SHMFEED_NAMED))
        return fail(err, errlen, SHMFEED_E_INVAL, "unknown flags 0x%x", flags);
    if (compute_geometry(slot_count, slot_bytes, stride, data_offset, total))
        return fail(err, errlen, SHMFEED_E_INVAL, "%u slots of %llu bytes overflow a 64-bit size",
                    slot_count, (unsigned long long)slot_bytes);
    if (shmfeed_memory_available(flags, avail) != SHMFEED_OK)
        *avail = UINT64_MAX; /* cannot fail with a non-NULL out; were it to, fallocate still checks */
    if (*total > *avail)
        return fail(err, errlen, SHMFEED_E_NOMEM,
                    "the ring needs %llu bytes (%u slots x %llu bytes + %llu bytes of header) but only "
                    "%llu bytes are available; use fewer or smaller slots, or free memory",
                    (unsigned long long)*total, slot_count, (unsigned long long)*stride,
                    (unsigned long long)*data_offset, (unsigned long long)*avail);
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_ring_create(uint32_t slot_count, uint64_t slot_bytes, uint32_t flags,
                                         shmfeed_ring **out, char *err, size_t errlen)
{
    uint64_t stride, data_offset, total, avail;
    int rc;
    if (!out)
        return fail(err, errlen, SHMFEED_E_INVAL, "out pointer is NULL");
    *out = NULL;
    if ((rc = check_shape(slot_count, slot_bytes, flags, &stride, &data_offset, &total, &avail, err, errlen)))
        return rc;

    shmfeed_ring *r = calloc(1, sizeof *r);
    if (!r)
        return fail(err, errlen, SHMFEED_E_NOMEM, "out of memory for the ring handle");
    r->fd = -1;
    r->guard = -1;
    r->is_creator = 1;
    r->opened_by = getpid();
    if ((rc = open_backing(r, flags, err, errlen))) {
        ring_free(r);
        return rc;
    }
    if (ftruncate(r->fd, (off_t)total) != 0) {
        rc = fail(err, errlen, SHMFEED_E_SYS, "sizing the segment to %llu bytes failed: %s",
                  (unsigned long long)total, strerror(errno));
        ring_free(r);
        return rc;
    }
    /* Reserve the control pages now (header, work area, descriptors); the slots' pages are
     * reserved by their first claims, in the producers (NOTE [slot memory]). */
    if ((rc = fallocate(r->fd, 0, 0, (off_t)data_offset)) != 0) {
        int e = errno;
        rc = fail(err, errlen, (e == ENOSPC || e == ENOMEM) ? SHMFEED_E_NOMEM : SHMFEED_E_SYS,
                  "reserving %llu bytes for the ring's header failed: %s (%llu bytes were reported available)",
                  (unsigned long long)data_offset, strerror(e), (unsigned long long)avail);
        ring_free(r);
        return rc;
    }
    /* The seals are what make a memfd ring safe from truncation (no SIGBUS guard, no fstat
     * checks): a memfd that cannot be sealed is refused rather than run unprotected. */
    if (!(flags & SHMFEED_NAMED) && fcntl(r->fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
        rc = fail(err, errlen, SHMFEED_E_SYS,
                  "sealing the memfd against resizing failed: %s; without the seals another process could "
                  "truncate it under the ring (use backing=\"named\", which is guarded instead)", strerror(errno));
        ring_free(r);
        return rc;
    }
    r->map_bytes = total;
    /* No MAP_POPULATE: populating only filled this process's page tables, 0.08-0.11 s for
     * 192 MB before the first batch; each slot's first read faults its pages in instead. */
    r->base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
    if (r->base == MAP_FAILED) {
        rc = fail(err, errlen, SHMFEED_E_NOMEM, "mapping %llu bytes failed: %s", (unsigned long long)total,
                  strerror(errno));
        r->base = NULL;
        ring_free(r);
        return rc;
    }
    guard_watch(r);
    r->slot_count = slot_count;
    r->flags = flags;
    r->slot_bytes = slot_bytes;
    r->slot_stride = stride;
    r->data_offset = data_offset;
    r->creator_pid = (uint32_t)getpid();
    r->creator_uid = (uint32_t)getuid();

    /* The memory is fresh zeroes; fill the header, then the descriptors.
     * No other process can attach before create returns the path, so plain
     * stores suffice; the magic is written last all the same. */
    shm_header *h = ring_header(r);
    h->version = SHMFEED_LAYOUT_VERSION;
    h->header_bytes = SHMFEED_HEADER_BYTES;
    h->segment_bytes = total;
    h->slot_count = slot_count;
    h->flags = flags;
    h->slot_bytes = slot_bytes;
    h->slot_stride = stride;
    h->desc_offset = SHMFEED_DESC_OFFSET;
    h->desc_stride = sizeof(shm_slot_desc);
    h->data_offset = data_offset;
    h->creator_pid = r->creator_pid;
    h->creator_uid = r->creator_uid;
    h->created_ns = r->created_ns = shmfeed_clock_ns();
    for (uint32_t i = 0; i < slot_count; i++)
        store_relaxed64(&ring_desc(r, i)->word, word_make(0, i, SHMFEED_SLOT_FREE));
    store_release_plain64(&h->magic, SHMFEED_MAGIC); /* pairs with validate()'s load_acquire_plain64 */
    *out = r;
    return SHMFEED_OK;
}

/* Validate a header against the real mapping size; fill r's private copy. */
SHMFEED_MUST_USE static int validate(shmfeed_ring *r, char *err, size_t errlen)
{
    /* Validate a private snapshot: a writer changing the header while we
     * check it cannot make us accept one value and use another. */
    shm_header snap;
    const shm_header *h = &snap;
    uint64_t stride, data_offset, total;
    if (load_acquire_plain64(&ring_header(r)->magic) != SHMFEED_MAGIC) /* pairs with create's release */
        return fail(err, errlen, SHMFEED_E_CORRUPT, "bad magic 0x%016llx: not a pyshmfeed ring",
                    (unsigned long long)ring_header(r)->magic);
    memcpy(&snap, ring_header(r), offsetof(shm_header, closed));
    if (h->magic != SHMFEED_MAGIC)
        return fail(err, errlen, SHMFEED_E_CORRUPT, "bad magic 0x%016llx: not a pyshmfeed ring",
                    (unsigned long long)h->magic);
    if (h->version != SHMFEED_LAYOUT_VERSION)
        return fail(err, errlen, SHMFEED_E_VERSION,
                    "layout version %u, this library reads version %u: use the same pyshmfeed on both sides",
                    h->version, SHMFEED_LAYOUT_VERSION);
    if (h->header_bytes != SHMFEED_HEADER_BYTES)
        return fail(err, errlen, SHMFEED_E_CORRUPT, "header size %u, expected %u", h->header_bytes,
                    SHMFEED_HEADER_BYTES);
    if (h->slot_count == 0 || h->slot_count > SHMFEED_MAX_SLOTS)
        return fail(err, errlen, SHMFEED_E_CORRUPT, "slot count %u out of range", h->slot_count);
    if (h->slot_bytes == 0 || h->slot_bytes > SHMFEED_MAX_SLOT_BYTES)
        return fail(err, errlen, SHMFEED_E_CORRUPT, "slot size %llu out of range",
                    (unsigned long long)h->slot_bytes);
    if (h->flags & ~(uint32_t)(SHMFEED_ORDERED | SHMFEED_NAMED))
        return fail(err, errlen, SHMFEED_E_CORRUPT, "unknown flags 0x%x", h->flags);
    if (compute_geometry(h->slot_count, h->slot_bytes, &stride, &data_offset, &total))
        return fail(err, errlen, SHMFEED_E_CORRUPT, "geometry overflows");
    if (h->slot_stride != stride || h->data_offset != data_offset || h->segment_bytes != total ||
        h->desc_offset != SHMFEED_DESC_OFFSET || h->desc_stride != sizeof(shm_slot_desc))
        return fail(err, errlen, SHMFEED_E_CORRUPT,
                    "inconsistent geometry: stride %llu (expected %llu), data offset %llu (expected %llu), "
                    "size %llu (expected %llu)",
                    (unsigned long long)h->slot_stride, (unsigned long long)stride,
                    (unsigned long long)h->data_offset, (unsigned long long)data_offset,
                    (unsigned long long)h->segment_bytes, (unsigned long long)total);
    if (total > r->map_bytes)
        return fail(err, errlen, SHMFEED_E_CORRUPT, "segment is truncated: header says %llu bytes, file has %llu",
                    (unsigned long long)total, (unsigned long long)r->map_bytes);
    r->slot_count = h->slot_count;
    r->flags = h->flags;
    r->slot_bytes = h->slot_bytes;
    r->slot_stride = stride;
    r->data_offset = data_offset;
    r->creator_pid = h->creator_pid;
    r->creator_uid = h->creator_uid;
    r->created_ns = h->created_ns;
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_ring_attach(const char *path, shmfeed_ring **out, char *err, size_t errlen)
{
    struct stat st;
    int rc;
    if (!out || !path)
        return fail(err, errlen, SHMFEED_E_INVAL, "path or out pointer is NULL");
    *out = NULL;
    if (strlen(path) >= sizeof(((shmfeed_ring *)0)->path))
        return fail(err, errlen, SHMFEED_E_INVAL, "path is too long");
    shmfeed_ring *r = calloc(1, sizeof *r);
    if (!r)
        return fail(err, errlen, SHMFEED_E_NOMEM, "out of memory for the ring handle");
    r->guard = -1;
    r->opened_by = getpid();
    r->fd = open(path, O_RDWR | O_CLOEXEC);
    if (r->fd < 0) {
        int e = errno;
        rc = fail(err, errlen, e == ENOENT ? SHMFEED_E_NOENT : (e == EACCES || e == EPERM) ? SHMFEED_E_PERM : SHMFEED_E_SYS,
                  "cannot open ring %s: %s%s", path, strerror(e),
                  e == ENOENT ? " (the process that created it has exited or closed it)" : "");
        ring_free(r);
        return rc;
    }
    if (fstat(r->fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ring_free(r);
        return fail(err, errlen, SHMFEED_E_CORRUPT, "%s is not a shared-memory segment", path);
    }
    if ((uint64_t)st.st_size < SHMFEED_DESC_OFFSET) {
        ring_free(r);
        return fail(err, errlen, SHMFEED_E_CORRUPT, "segment %s is truncated: %lld bytes, less than a header",
                    path, (long long)st.st_size);
    }
    r->map_bytes = (uint64_t)st.st_size;
    r->base = mmap(NULL, r->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
    if (r->base == MAP_FAILED) {
        rc = fail(err, errlen, SHMFEED_E_SYS, "mapping %s failed: %s", path, strerror(errno));
        r->base = NULL;
        ring_free(r);
        return rc;
    }
    guard_watch(r); /* before the first read: the file may be truncated while validate reads it */
    if ((rc = validate(r, err, errlen))) {
        ring_free(r);
        return rc;
    }
    snprintf(r->path, sizeof r->path, "%s", path);
    *out = r;
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_ring_detach(shmfeed_ring *r)
{
    if (!r)
        return SHMFEED_E_INVAL;
    ring_free(r);
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_ring_path(const shmfeed_ring *r, char *buf, size_t buflen)
{
    if (!r || !buf || buflen <= strlen(r->path))
        return SHMFEED_E_INVAL;
    memcpy(buf, r->path, strlen(r->path) + 1);
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_ring_geometry(const shmfeed_ring *r, shmfeed_geometry *g)
{
    if (!r || !g)
        return SHMFEED_E_INVAL;
    g->slot_count = r->slot_count;
    g->flags = r->flags;
    g->slot_bytes = r->slot_bytes;
    g->slot_stride = r->slot_stride;
    g->data_offset = r->data_offset;
    g->segment_bytes = r->map_bytes;
    g->creator_pid = r->creator_pid;
    g->creator_uid = r->creator_uid;
    g->created_ns = r->created_ns;
    return SHMFEED_OK;
}

SHMFEED_MUST_USE int shmfeed_ring_base(const shmfeed_ring *r, uint8_t **out)
{
    if (!r || !out)
        return SHMFEED_E_INVAL;
    *out = r->base;
    return SHMFEED_OK;
}

const char *shmfeed_strerror(int status)
{
    switch (status) {
    case SHMFEED_OK: return "ok";
    case SHMFEED_E_INVAL: return "invalid argument";
    case SHMFEED_E_NOMEM: return "not enough memory for the ring";
    case SHMFEED_E_SYS: return "system call failed";
    case SHMFEED_E_CORRUPT: return "corrupt segment";
    case SHMFEED_E_VERSION: return "layout version mismatch";
    case SHMFEED_E_TIMEOUT: return "timed out";
    case SHMFEED_E_CLOSED: return "ring closed";
    case SHMFEED_E_STALE: return "stale claim: the slot was reclaimed";
    case SHMFEED_E_STATE: return "slot is not in the state this operation needs";
    case SHMFEED_E_TOOBIG: return "payload longer than the slot";
    case SHMFEED_E_NOENT: return "no such segment";
    case SHMFEED_E_PERM: return "permission denied";
    case SHMFEED_E_AGAIN: return "nothing available now";
    default: return "unknown status";
    }
}
