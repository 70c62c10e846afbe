/*
 * test_segment.c — creating, attaching and validating the segment.
 *
 * The corruption tests copy a real ring's bytes into a regular file, patch
 * one header field at its layout.h offset, and attach the file: every bad
 * header must be refused with a status and a message, never a crash.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "layout.h"
#include "shmfeed.h"

#define ERRLEN 512

/* ---- a regular-file copy of a segment, for the corruption tests ---------- */

typedef struct seg_copy {
    char path[64];
} seg_copy;

/* Write the first `bytes` bytes of the ring's mapping to a new temp file. */
static int copy_segment(shmfeed_ring *ring, uint64_t bytes, seg_copy *out)
{
    uint8_t *base;
    if (shmfeed_ring_base(ring, &base) != SHMFEED_OK)
        return -1;
    snprintf(out->path, sizeof out->path, "/tmp/shmfeed-test-XXXXXX");
    int fd = mkstemp(out->path);
    if (fd < 0)
        return -1;
    uint64_t done = 0;
    while (done < bytes) {
        ssize_t n = write(fd, base + done, bytes - done);
        if (n <= 0) {
            close(fd);
            unlink(out->path);
            return -1;
        }
        done += (uint64_t)n;
    }
    close(fd);
    return 0;
}

static int write_file(seg_copy *out, const void *bytes, size_t len)
{
    snprintf(out->path, sizeof out->path, "/tmp/shmfeed-test-XXXXXX");
    int fd = mkstemp(out->path);
    if (fd < 0)
        return -1;
    int ok = len == 0 || write(fd, bytes, len) == (ssize_t)len;
    close(fd);
    return ok ? 0 : -1;
}

/* Overwrite `size` bytes of the header at `offset` with the low bytes of v. */
static int patch(const seg_copy *c, size_t offset, size_t size, uint64_t v)
{
    int fd = open(c->path, O_RDWR);
    if (fd < 0)
        return -1;
    int ok = pwrite(fd, &v, size, (off_t)offset) == (ssize_t)size; /* little-endian */
    close(fd);
    return ok ? 0 : -1;
}

#define PATCH(copy, field, value) \
    patch((copy), offsetof(shm_header, field), sizeof(((shm_header *)0)->field), (uint64_t)(value))

/* A small valid ring to copy from. */
static shmfeed_ring *small_ring(void)
{
    shmfeed_ring *ring = NULL;
    char err[ERRLEN];
    if (shmfeed_ring_create(3, 1000, SHMFEED_ORDERED, &ring, err, sizeof err) != SHMFEED_OK) {
        fprintf(stderr, "creating a small ring failed: %s\n", err);
        return NULL;
    }
    return ring;
}

/* Attach `path` expecting status `want`; the message must mention `needle`. */
static int expect_attach_fails(const char *path, int want, const char *needle)
{
    shmfeed_ring *ring = (shmfeed_ring *)1;
    char err[ERRLEN] = "";
    CHECK_RC(shmfeed_ring_attach(path, &ring, err, sizeof err), want);
    CHECK(ring == NULL);
    CHECK(err[0] != '\0');
    if (needle)
        CHECK_MSG(err, needle);
    return 0;
}

/* ---- create ------------------------------------------------------------- */

static int test_create_reports_geometry(void)
{
    shmfeed_ring *ring;
    shmfeed_geometry g;
    uint64_t size;
    uint8_t *base;
    char err[ERRLEN];
    CHECK_RC(shmfeed_ring_create(3, 1000, SHMFEED_ORDERED, &ring, err, sizeof err), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_geometry(ring, &g), SHMFEED_OK);
    CHECK_EQ(g.slot_count, 3);
    CHECK_EQ(g.flags, SHMFEED_ORDERED);
    CHECK_EQ(g.slot_bytes, 1000);
    CHECK_EQ(g.slot_stride, 4096);                    /* page multiple */
    CHECK_EQ(g.data_offset, 12288);                   /* 8192 + 3 * 64, page aligned */
    CHECK_EQ(g.segment_bytes, 12288 + 3 * 4096);
    CHECK_EQ(g.creator_pid, getpid());
    CHECK_EQ(g.creator_uid, getuid());
    CHECK_RC(shmfeed_ring_size_for(3, 1000, &size), SHMFEED_OK);
    CHECK_EQ(size, g.segment_bytes);
    CHECK_RC(shmfeed_ring_base(ring, &base), SHMFEED_OK);
    CHECK(((uintptr_t)base % SHMFEED_PAGE) == 0);
    for (uint32_t i = 0; i < g.slot_count; i++) { /* every slot is writable */
        memset(base + g.data_offset + i * g.slot_stride, 0xa5, g.slot_bytes);
        shmfeed_slot_info info;
        CHECK_RC(shmfeed_slot_info_read(ring, i, &info), SHMFEED_OK);
        CHECK_EQ(info.state, SHMFEED_SLOT_FREE);
        CHECK_EQ(info.seq, i); /* ordered: slot i is free for batch i */
    }
    int32_t code;
    CHECK_RC(shmfeed_close_reason(ring, &code, NULL, 0), SHMFEED_OK);
    CHECK_EQ(code, 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_create_page_sized_slots(void)
{
    shmfeed_ring *ring;
    shmfeed_geometry g;
    char err[ERRLEN];
    CHECK_RC(shmfeed_ring_create(1, 4096, 0, &ring, err, sizeof err), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_geometry(ring, &g), SHMFEED_OK);
    CHECK_EQ(g.slot_stride, 4096);
    CHECK_EQ(g.flags, 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_create(2, 4097, 0, &ring, err, sizeof err), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_geometry(ring, &g), SHMFEED_OK);
    CHECK_EQ(g.slot_stride, 8192);
    CHECK_EQ(g.segment_bytes, 12288 + 2 * 8192);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_size_for_rejects_out_of_range(void)
{
    uint64_t size;
    CHECK_RC(shmfeed_ring_size_for(0, 64, &size), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_ring_size_for(SHMFEED_MAX_SLOTS + 1, 64, &size), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_ring_size_for(4, 0, &size), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_ring_size_for(4, SHMFEED_MAX_SLOT_BYTES + 1, &size), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_ring_size_for(UINT32_MAX, UINT64_MAX, &size), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_ring_size_for(4, 64, NULL), SHMFEED_E_INVAL);
    /* The largest legal shape fits 64 bits: 2^16 slots of 2^40 bytes. */
    CHECK_RC(shmfeed_ring_size_for(SHMFEED_MAX_SLOTS, SHMFEED_MAX_SLOT_BYTES, &size), SHMFEED_OK);
    CHECK_EQ(size, (uint64_t)SHMFEED_MAX_SLOTS * SHMFEED_MAX_SLOT_BYTES + 8192 + SHMFEED_MAX_SLOTS * 64);
    return 0;
}

static int test_create_rejects_bad_arguments(void)
{
    static const struct {
        uint32_t slots;
        uint64_t bytes;
        uint32_t flags;
        const char *needle;
    } cases[] = {
        {0, 64, 0, "slot count 0"},
        {SHMFEED_MAX_SLOTS + 1, 64, 0, "slot count 65537"},
        {UINT32_MAX, 64, 0, "slot count 4294967295"},
        {4, 0, 0, "slot size 0"},
        {4, SHMFEED_MAX_SLOT_BYTES + 1, 0, "slot size 1099511627777"},
        {4, UINT64_MAX, 0, "slot size 18446744073709551615"},
        {4, 64, 0x80, "flags 0x80"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        shmfeed_ring *ring = (shmfeed_ring *)1;
        char err[ERRLEN] = "";
        CHECK_RC(shmfeed_ring_create(cases[i].slots, cases[i].bytes, cases[i].flags, &ring, err, sizeof err),
                 SHMFEED_E_INVAL);
        CHECK(ring == NULL);
        CHECK_MSG(err, cases[i].needle);
    }
    char err[ERRLEN];
    CHECK_RC(shmfeed_ring_create(4, 64, 0, NULL, err, sizeof err), SHMFEED_E_INVAL);
    shmfeed_ring *ring;
    CHECK_RC(shmfeed_ring_create(0, 64, 0, &ring, NULL, 0), SHMFEED_E_INVAL); /* no err buffer: fine */
    return 0;
}

/* More memory than the machine has: refused up front, with the numbers. */
static int test_create_larger_than_memory(void)
{
    uint64_t avail, need;
    uint32_t slots = SHMFEED_MAX_SLOTS;
    char want[32], err[ERRLEN] = "";
    shmfeed_ring *ring = (shmfeed_ring *)1;
    CHECK_RC(shmfeed_memory_available(0, &avail), SHMFEED_OK);
    CHECK(avail > 0);
    CHECK_RC(shmfeed_ring_size_for(slots, SHMFEED_MAX_SLOT_BYTES, &need), SHMFEED_OK);
    if (need <= avail) {
        printf("skip: %" PRIu64 " bytes available, cannot ask for more\n", avail);
        return 0;
    }
    CHECK_RC(shmfeed_ring_create(slots, SHMFEED_MAX_SLOT_BYTES, 0, &ring, err, sizeof err), SHMFEED_E_NOMEM);
    CHECK(ring == NULL);
    snprintf(want, sizeof want, "%" PRIu64 " bytes", need);
    CHECK_MSG(err, want);
    snprintf(want, sizeof want, "%" PRIu64 " bytes are available", avail);
    CHECK_MSG(err, want);
    /* Named rings are also capped by the /dev/shm mount. */
    CHECK_RC(shmfeed_memory_available(SHMFEED_NAMED, &avail), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_size_for(1, SHMFEED_MAX_SLOT_BYTES, &need), SHMFEED_OK);
    if (need > avail) {
        CHECK_RC(shmfeed_ring_create(1, SHMFEED_MAX_SLOT_BYTES, SHMFEED_NAMED, &ring, err, sizeof err),
                 SHMFEED_E_NOMEM);
        snprintf(want, sizeof want, "%" PRIu64 " bytes", need);
        CHECK_MSG(err, want);
    }
    CHECK_RC(shmfeed_memory_available(0, NULL), SHMFEED_E_INVAL);
    return 0;
}

/* ---- attach ------------------------------------------------------------- */

static int test_memfd_path_attach_detach(void)
{
    shmfeed_ring *ring, *peer;
    shmfeed_geometry g, pg;
    char path[128], prefix[64], err[ERRLEN];
    uint8_t *base, *pbase;
    CHECK_RC(shmfeed_ring_create(2, 100, SHMFEED_ORDERED, &ring, err, sizeof err), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_path(ring, path, sizeof path), SHMFEED_OK);
    snprintf(prefix, sizeof prefix, "/proc/%d/fd/", (int)getpid());
    CHECK(strncmp(path, prefix, strlen(prefix)) == 0);
    CHECK_RC(shmfeed_ring_path(ring, path, strlen(path)), SHMFEED_E_INVAL); /* no room for the NUL */

    CHECK_RC(shmfeed_ring_attach(path, &peer, err, sizeof err), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_geometry(ring, &g), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_geometry(peer, &pg), SHMFEED_OK);
    CHECK(memcmp(&g, &pg, sizeof g) == 0);
    CHECK_RC(shmfeed_ring_base(ring, &base), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_base(peer, &pbase), SHMFEED_OK);
    CHECK(base != pbase); /* a second mapping of the same memory */
    base[g.data_offset + g.slot_stride] = 0x5a;
    CHECK_EQ(pbase[g.data_offset + g.slot_stride], 0x5a);
    CHECK_RC(shmfeed_ring_detach(peer), SHMFEED_OK);

    /* After the creator detaches, the fd behind the path is gone. */
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return expect_attach_fails(path, SHMFEED_E_NOENT, path);
}

/* A forked process attaches through the path, commits a batch; we read it. */
static int test_attach_from_forked_process(uint32_t flags)
{
    shmfeed_ring *ring;
    char path[128], err[ERRLEN];
    CHECK_RC(shmfeed_ring_create(2, 256, flags, &ring, err, sizeof err), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_path(ring, path, sizeof path), SHMFEED_OK);
    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        shmfeed_ring *peer;
        shmfeed_claimed c;
        shmfeed_geometry g;
        uint8_t *base;
        if (shmfeed_ring_attach(path, &peer, err, sizeof err) != SHMFEED_OK) {
            fprintf(stderr, "child: attach %s failed: %s\n", path, err);
            _exit(2);
        }
        shmfeed_ring_geometry(peer, &g);
        if (g.creator_pid != (uint32_t)getppid() || g.slot_count != 2 || g.slot_bytes != 256)
            _exit(3);
        if (shmfeed_claim(peer, 0, (uint64_t)getpid(), 1000000000LL, &c) != SHMFEED_OK)
            _exit(4);
        shmfeed_ring_base(peer, &base);
        for (int i = 0; i < 256; i++)
            base[g.data_offset + c.slot * g.slot_stride + i] = (uint8_t)(i ^ 0x3c);
        if (shmfeed_commit(peer, &c, 256) != SHMFEED_OK)
            _exit(5);
        shmfeed_ring_detach(peer); /* an attacher's detach removes nothing */
        _exit(0);
    }
    int status;
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), 0);

    shmfeed_acquired a;
    shmfeed_geometry g;
    uint8_t *base;
    CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_OK);
    CHECK_EQ(a.seq, 0);
    CHECK_EQ(a.payload_len, 256);
    CHECK_RC(shmfeed_ring_geometry(ring, &g), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_base(ring, &base), SHMFEED_OK);
    for (int i = 0; i < 256; i++)
        CHECK_EQ(base[g.data_offset + a.slot * g.slot_stride + i], (uint8_t)(i ^ 0x3c));
    CHECK_RC(shmfeed_release(ring, &a), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

static int test_attach_from_forked_process_memfd(void) { return test_attach_from_forked_process(SHMFEED_ORDERED); }
static int test_attach_from_forked_process_named(void)
{
    return test_attach_from_forked_process(SHMFEED_ORDERED | SHMFEED_NAMED);
}

static int test_attach_rejects_bad_arguments(void)
{
    shmfeed_ring *ring;
    char err[ERRLEN], longpath[300];
    CHECK_RC(shmfeed_ring_attach(NULL, &ring, err, sizeof err), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_ring_attach("/tmp/x", NULL, err, sizeof err), SHMFEED_E_INVAL);
    memset(longpath, 'a', sizeof longpath - 1);
    longpath[0] = '/';
    longpath[sizeof longpath - 1] = '\0';
    CHECK_RC(shmfeed_ring_attach(longpath, &ring, err, sizeof err), SHMFEED_E_INVAL);
    CHECK_RC(shmfeed_ring_detach(NULL), SHMFEED_E_INVAL);
    return 0;
}

static int test_attach_missing_path(void)
{
    return expect_attach_fails("/tmp/shmfeed-test-does-not-exist", SHMFEED_E_NOENT,
                               "/tmp/shmfeed-test-does-not-exist");
}

static int test_attach_not_a_regular_file(void)
{
    return expect_attach_fails("/dev/null", SHMFEED_E_CORRUPT, "not a shared-memory segment");
}

static int test_attach_empty_file(void)
{
    seg_copy c;
    CHECK(write_file(&c, NULL, 0) == 0);
    int rc = expect_attach_fails(c.path, SHMFEED_E_CORRUPT, "less than a header");
    unlink(c.path);
    return rc;
}

static int test_attach_zeros_and_garbage(void)
{
    static uint8_t bytes[16384];
    seg_copy c;
    int rc;
    /* All zeros: the size of a ring, but no magic. */
    CHECK(write_file(&c, bytes, sizeof bytes) == 0);
    rc = expect_attach_fails(c.path, SHMFEED_E_CORRUPT, "bad magic 0x0000000000000000");
    unlink(c.path);
    if (rc)
        return rc;
    /* Deterministic garbage. */
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (size_t i = 0; i < sizeof bytes; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        bytes[i] = (uint8_t)x;
    }
    CHECK(write_file(&c, bytes, sizeof bytes) == 0);
    rc = expect_attach_fails(c.path, SHMFEED_E_CORRUPT, "bad magic");
    unlink(c.path);
    return rc;
}

/* The control for every corruption test: an unmodified copy attaches. */
static int test_attach_valid_copy(void)
{
    shmfeed_ring *ring = small_ring(), *copy;
    shmfeed_geometry g, cg;
    seg_copy c;
    char err[ERRLEN];
    CHECK(ring);
    CHECK_RC(shmfeed_ring_geometry(ring, &g), SHMFEED_OK);
    CHECK(copy_segment(ring, g.segment_bytes, &c) == 0);
    int rc = shmfeed_ring_attach(c.path, &copy, err, sizeof err);
    unlink(c.path);
    CHECK_RC(rc, SHMFEED_OK);
    CHECK_RC(shmfeed_ring_geometry(copy, &cg), SHMFEED_OK);
    CHECK(memcmp(&g, &cg, sizeof g) == 0);
    CHECK_RC(shmfeed_ring_detach(copy), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return 0;
}

/* A valid header, but the file stops before the slots end. */
static int test_attach_truncated_segment(void)
{
    shmfeed_ring *ring = small_ring();
    shmfeed_geometry g;
    seg_copy c;
    int rc;
    CHECK(ring);
    CHECK_RC(shmfeed_ring_geometry(ring, &g), SHMFEED_OK);
    /* Header, counters and descriptors, but no slot data. */
    CHECK(copy_segment(ring, g.data_offset, &c) == 0);
    rc = expect_attach_fails(c.path, SHMFEED_E_CORRUPT, "truncated");
    unlink(c.path);
    if (rc)
        return rc;
    /* One byte short. */
    CHECK(copy_segment(ring, g.segment_bytes - 1, &c) == 0);
    rc = expect_attach_fails(c.path, SHMFEED_E_CORRUPT, "truncated");
    unlink(c.path);
    if (rc)
        return rc;
    /* The header page alone. */
    CHECK(copy_segment(ring, SHMFEED_HEADER_BYTES, &c) == 0);
    rc = expect_attach_fails(c.path, SHMFEED_E_CORRUPT, "less than a header");
    unlink(c.path);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    return rc;
}

/* Copy the small ring, apply one patch, expect attach to fail with `want`. */
static int attach_patched(size_t offset, size_t size, uint64_t value, int want, const char *needle)
{
    shmfeed_ring *ring = small_ring();
    shmfeed_geometry g;
    seg_copy c;
    CHECK(ring);
    CHECK_RC(shmfeed_ring_geometry(ring, &g), SHMFEED_OK);
    CHECK(copy_segment(ring, g.segment_bytes, &c) == 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    int rc = patch(&c, offset, size, value);
    if (rc == 0)
        rc = expect_attach_fails(c.path, want, needle);
    else
        fprintf(stderr, "patching %s at %zu failed\n", c.path, offset);
    if (rc)
        fprintf(stderr, "  (patch: offset %zu, %zu bytes, value %" PRIu64 ")\n", offset, size, value);
    unlink(c.path);
    return rc;
}

#define ATTACH_PATCHED(field, value, want, needle)                                              \
    attach_patched(offsetof(shm_header, field), sizeof(((shm_header *)0)->field), (uint64_t)(value), \
                   (want), (needle))

static int test_attach_wrong_magic(void)
{
    if (ATTACH_PATCHED(magic, SHMFEED_MAGIC ^ 1, SHMFEED_E_CORRUPT, "bad magic 0x314445454648534c"))
        return 1;
    return ATTACH_PATCHED(magic, 0, SHMFEED_E_CORRUPT, "not a pyshmfeed ring");
}

static int test_attach_wrong_version(void)
{
    if (ATTACH_PATCHED(version, SHMFEED_LAYOUT_VERSION + 1, SHMFEED_E_VERSION, "layout version 4"))
        return 1;
    return ATTACH_PATCHED(version, 0, SHMFEED_E_VERSION, "layout version 0");
}

/* Every geometry field checked against the others and the file size. */
static int test_attach_inconsistent_geometry(void)
{
    /* small_ring(): 3 slots of 1000 bytes, stride 4096, data at 12288, 24576 bytes. */
    if (ATTACH_PATCHED(header_bytes, 2048, SHMFEED_E_CORRUPT, "header size 2048"))
        return 1;
    if (ATTACH_PATCHED(slot_count, 0, SHMFEED_E_CORRUPT, "slot count 0"))
        return 1;
    if (ATTACH_PATCHED(slot_count, SHMFEED_MAX_SLOTS + 1, SHMFEED_E_CORRUPT, "slot count 65537"))
        return 1;
    if (ATTACH_PATCHED(slot_count, 4, SHMFEED_E_CORRUPT, "inconsistent geometry")) /* size no longer adds up */
        return 1;
    if (ATTACH_PATCHED(slot_bytes, 0, SHMFEED_E_CORRUPT, "slot size 0"))
        return 1;
    if (ATTACH_PATCHED(slot_bytes, UINT64_MAX, SHMFEED_E_CORRUPT, "slot size 18446744073709551615"))
        return 1;
    if (ATTACH_PATCHED(slot_bytes, 5000, SHMFEED_E_CORRUPT, "stride 4096 (expected 8192)"))
        return 1;
    if (ATTACH_PATCHED(flags, 0x80 | SHMFEED_ORDERED, SHMFEED_E_CORRUPT, "unknown flags 0x81"))
        return 1;
    if (ATTACH_PATCHED(slot_stride, 8192, SHMFEED_E_CORRUPT, "stride 8192 (expected 4096)"))
        return 1;
    if (ATTACH_PATCHED(slot_stride, 0, SHMFEED_E_CORRUPT, "stride 0 (expected 4096)"))
        return 1;
    if (ATTACH_PATCHED(data_offset, 8192, SHMFEED_E_CORRUPT, "data offset 8192 (expected 12288)"))
        return 1;
    if (ATTACH_PATCHED(data_offset, UINT64_MAX, SHMFEED_E_CORRUPT, "inconsistent geometry"))
        return 1;
    if (ATTACH_PATCHED(segment_bytes, 24575, SHMFEED_E_CORRUPT, "size 24575 (expected 24576)"))
        return 1;
    if (ATTACH_PATCHED(segment_bytes, UINT64_MAX, SHMFEED_E_CORRUPT, "inconsistent geometry"))
        return 1;
    if (ATTACH_PATCHED(desc_offset, 4096, SHMFEED_E_CORRUPT, "inconsistent geometry"))
        return 1;
    return ATTACH_PATCHED(desc_stride, 32, SHMFEED_E_CORRUPT, "inconsistent geometry");
}

/* A header that is consistent with itself but describes a 2^56-byte ring:
 * attach must compare it with the real file size, not map or touch it. */
static int test_attach_huge_consistent_geometry(void)
{
    shmfeed_ring *ring = small_ring();
    shmfeed_geometry g;
    seg_copy c;
    uint64_t total, data_offset = 8192 + (uint64_t)SHMFEED_MAX_SLOTS * 64;
    CHECK(ring);
    CHECK_RC(shmfeed_ring_geometry(ring, &g), SHMFEED_OK);
    CHECK(copy_segment(ring, g.segment_bytes, &c) == 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_size_for(SHMFEED_MAX_SLOTS, SHMFEED_MAX_SLOT_BYTES, &total), SHMFEED_OK);
    int ok = PATCH(&c, slot_count, SHMFEED_MAX_SLOTS) == 0 && PATCH(&c, slot_bytes, SHMFEED_MAX_SLOT_BYTES) == 0 &&
             PATCH(&c, slot_stride, SHMFEED_MAX_SLOT_BYTES) == 0 && PATCH(&c, data_offset, data_offset) == 0 &&
             PATCH(&c, segment_bytes, total) == 0;
    int rc = ok ? expect_attach_fails(c.path, SHMFEED_E_CORRUPT, "truncated") : 1;
    unlink(c.path);
    CHECK(ok);
    return rc;
}

/* ---- named backing -------------------------------------------------------- */

static int test_named_segment(void)
{
    shmfeed_ring *ring, *peer;
    char path[128], err[ERRLEN];
    struct stat st;
    uint64_t size;
    CHECK_RC(shmfeed_ring_create(2, 64, SHMFEED_NAMED, &ring, err, sizeof err), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_path(ring, path, sizeof path), SHMFEED_OK);
    CHECK(strncmp(path, "/dev/shm/pyshmfeed-", strlen("/dev/shm/pyshmfeed-")) == 0);
    CHECK(stat(path, &st) == 0);
    CHECK(S_ISREG(st.st_mode));
    CHECK_EQ(st.st_mode & 07777, 0600);
    CHECK_EQ(st.st_uid, getuid());
    CHECK_RC(shmfeed_ring_size_for(2, 64, &size), SHMFEED_OK);
    CHECK_EQ(st.st_size, size);

    /* Two rings never share a name. */
    shmfeed_ring *other;
    char other_path[128];
    CHECK_RC(shmfeed_ring_create(2, 64, SHMFEED_NAMED, &other, err, sizeof err), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_path(other, other_path, sizeof other_path), SHMFEED_OK);
    CHECK(strcmp(path, other_path) != 0);
    CHECK_RC(shmfeed_ring_detach(other), SHMFEED_OK);

    /* An attacher's detach leaves the segment; the creator's removes it. */
    CHECK_RC(shmfeed_ring_attach(path, &peer, err, sizeof err), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_detach(peer), SHMFEED_OK);
    CHECK(stat(path, &st) == 0);
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    CHECK(stat(path, &st) != 0 && errno == ENOENT);
    CHECK(stat(other_path, &st) != 0 && errno == ENOENT);
    return expect_attach_fails(path, SHMFEED_E_NOENT, path);
}

/* ---- faults, round 2 -------------------------------------------------------- */

static int count_fds(void)
{
    int n = 0;
    char path[64];
    for (int fd = 0; fd < 1024; fd++) {
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        n += access(path, F_OK) == 0;
    }
    return n;
}

static int test_memory_available_with_no_out_leaks_nothing(void)
{
    int before = count_fds();
    for (int i = 0; i < 50; i++)
        CHECK_RC(shmfeed_memory_available(0, NULL), SHMFEED_E_INVAL);
    CHECK_EQ(count_fds(), before); /* it used to fopen /proc/meminfo first and never close it */
    return 0;
}

static int test_limits_are_the_layouts(void)
{
    CHECK_EQ(shmfeed_max_slots(), SHMFEED_MAX_SLOTS);
    CHECK_EQ(shmfeed_max_slot_bytes(), SHMFEED_MAX_SLOT_BYTES);
    uint64_t need;
    CHECK_RC(shmfeed_ring_size_for(shmfeed_max_slots(), shmfeed_max_slot_bytes(), &need), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_size_for(1, shmfeed_max_slot_bytes() + 1, &need), SHMFEED_E_INVAL);
    return 0;
}

/* The field table Python reads is layout.h's: a few entries checked against the structs. */
static int test_layout_fields_are_the_structs(void)
{
    const shmfeed_field *fields;
    uint32_t n, seen = 0;
    CHECK_RC(shmfeed_layout_fields(&fields, &n), SHMFEED_OK);
    CHECK_RC(shmfeed_layout_fields(NULL, &n), SHMFEED_E_INVAL);
    CHECK_EQ(shmfeed_layout_magic(), SHMFEED_MAGIC);
    CHECK_EQ(shmfeed_layout_version(), SHMFEED_LAYOUT_VERSION);
    for (uint32_t i = 0; i < n; i++) {
        const shmfeed_field *f = &fields[i];
        if (!strcmp(f->name, "header.creator_pid")) {
            CHECK_EQ(f->offset, offsetof(shm_header, creator_pid));
            CHECK_EQ(f->size, 4);
            seen++;
        } else if (!strcmp(f->name, "consumer.head")) {
            CHECK_EQ(f->offset, SHMFEED_COUNTERS_OFFSET + offsetof(shm_counters, consumer.head));
            seen++;
        } else if (!strcmp(f->name, "desc")) {
            CHECK_EQ(f->offset, SHMFEED_DESC_OFFSET);
            CHECK_EQ(f->size, sizeof(shm_slot_desc));
            seen++;
        } else if (!strcmp(f->name, "desc.waiters")) {
            CHECK_EQ(f->offset, offsetof(shm_slot_desc, waiters));
            seen++;
        }
    }
    CHECK_EQ(seen, 4);
    return 0;
}

/* Retire gives the segment up (name, descriptor, shared pages) but keeps the range readable. */
static int test_retire_keeps_the_range_as_zeros_and_gives_the_segment_up(void)
{
    shmfeed_ring *ring;
    shmfeed_geometry g;
    uint8_t *base;
    char path[128], err[ERRLEN];
    struct stat st;
    int before = count_fds();
    CHECK_RC(shmfeed_ring_create(2, 4096, SHMFEED_NAMED | SHMFEED_ORDERED, &ring, err, sizeof err), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_path(ring, path, sizeof path), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_geometry(ring, &g), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_base(ring, &base), SHMFEED_OK);
    memset(base + g.data_offset, 0x5a, 4096);
    CHECK_RC(shmfeed_ring_retire(ring), SHMFEED_OK);
    CHECK(stat(path, &st) != 0 && errno == ENOENT); /* the creator's retire unlinks the name */
    CHECK_EQ(count_fds(), before);                   /* and closes the descriptor */
    for (uint64_t i = 0; i < g.segment_bytes; i += 512)
        CHECK_EQ(base[i], 0); /* the range is still mapped: zeros, not the ring, and no fault */
    base[g.data_offset] = 1;   /* writable too: a late producer view does not fault either */
    CHECK_RC(shmfeed_ring_retire(ring), SHMFEED_OK); /* idempotent */
    CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    CHECK_RC(shmfeed_ring_retire(NULL), SHMFEED_E_INVAL);
    return 0;
}

/* A fork()ed child that frees (or retires) its copy of the creator's handle keeps the name. */
static int test_forked_child_never_unlinks_its_parents_segment(void)
{
    for (int retire = 0; retire < 2; retire++) {
        shmfeed_ring *ring, *peer;
        char path[128], err[ERRLEN];
        struct stat st;
        int status;
        CHECK_RC(shmfeed_ring_create(2, 64, SHMFEED_NAMED | SHMFEED_ORDERED, &ring, err, sizeof err), SHMFEED_OK);
        CHECK_RC(shmfeed_ring_path(ring, path, sizeof path), SHMFEED_OK);
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            int rc = retire ? shmfeed_ring_retire(ring) : SHMFEED_OK;
            rc |= shmfeed_ring_detach(ring);
            _exit(rc == SHMFEED_OK ? 0 : 1);
        }
        CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
        CHECK(stat(path, &st) == 0);
        CHECK_RC(shmfeed_ring_attach(path, &peer, err, sizeof err), SHMFEED_OK);
        CHECK_RC(shmfeed_ring_detach(peer), SHMFEED_OK);
        CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
        CHECK(stat(path, &st) != 0 && errno == ENOENT); /* the creator itself still removes it */
    }
    return 0;
}

/* Another process truncates a named segment: calls say CORRUPT, reads past the end read zeros. */
static int test_truncated_named_segment_is_corrupt_never_sigbus(void)
{
    static const uint64_t cuts[] = {0, SHMFEED_PAGE, SHMFEED_DESC_OFFSET, 3 * SHMFEED_PAGE};
    for (size_t k = 0; k < sizeof cuts / sizeof cuts[0]; k++) {
        shmfeed_ring *ring;
        shmfeed_geometry g;
        shmfeed_claimed c;
        shmfeed_acquired a;
        shmfeed_counters counters;
        uint8_t *base;
        char path[128], err[ERRLEN] = "";
        CHECK_RC(shmfeed_ring_create(4, 4096, SHMFEED_NAMED | SHMFEED_ORDERED, &ring, err, sizeof err), SHMFEED_OK);
        CHECK_RC(shmfeed_ring_path(ring, path, sizeof path), SHMFEED_OK);
        CHECK_RC(shmfeed_ring_geometry(ring, &g), SHMFEED_OK);
        CHECK_RC(shmfeed_ring_base(ring, &base), SHMFEED_OK);
        CHECK_RC(shmfeed_claim(ring, 0, 1, 0, &c), SHMFEED_OK);
        memset(base + g.data_offset, 7, 4096);
        CHECK_RC(shmfeed_commit(ring, &c, 4096), SHMFEED_OK);
        CHECK_RC(shmfeed_ring_check_backing(ring, err, sizeof err), SHMFEED_OK);
        pid_t pid = fork(); /* "another process" */
        CHECK(pid >= 0);
        if (pid == 0)
            _exit(truncate(path, (off_t)cuts[k]) == 0 ? 0 : 1);
        int status;
        CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
        CHECK_RC(shmfeed_acquire(ring, 0, &a), SHMFEED_E_CORRUPT); /* fstat before handing it out */
        CHECK_RC(shmfeed_claim(ring, 1, 1, 0, &c), SHMFEED_E_CORRUPT);
        CHECK_RC(shmfeed_ring_check_backing(ring, err, sizeof err), SHMFEED_E_CORRUPT);
        CHECK_MSG(err, "truncated");
        CHECK_MSG(err, path);
        /* A read past the new end, as a consumer's view would make: zeros, not SIGBUS. */
        CHECK_EQ(base[g.data_offset + 100], 0);
        CHECK_EQ(base[g.segment_bytes - 1], 0);
        CHECK_RC(shmfeed_counters_read(ring, &counters), SHMFEED_E_CORRUPT); /* the guard marked it lost */
        CHECK_RC(shmfeed_ring_detach(ring), SHMFEED_OK);
    }
    return 0;
}

int main(void)
{
    int failures = 0;
    alarm(60); /* a stuck child or attach fails the test instead of hanging it */
    RUN(failures, test_create_reports_geometry);
    RUN(failures, test_create_page_sized_slots);
    RUN(failures, test_size_for_rejects_out_of_range);
    RUN(failures, test_create_rejects_bad_arguments);
    RUN(failures, test_create_larger_than_memory);
    RUN(failures, test_memfd_path_attach_detach);
    RUN(failures, test_attach_from_forked_process_memfd);
    RUN(failures, test_attach_from_forked_process_named);
    RUN(failures, test_attach_rejects_bad_arguments);
    RUN(failures, test_attach_missing_path);
    RUN(failures, test_attach_not_a_regular_file);
    RUN(failures, test_attach_empty_file);
    RUN(failures, test_attach_zeros_and_garbage);
    RUN(failures, test_attach_valid_copy);
    RUN(failures, test_attach_truncated_segment);
    RUN(failures, test_attach_wrong_magic);
    RUN(failures, test_attach_wrong_version);
    RUN(failures, test_attach_inconsistent_geometry);
    RUN(failures, test_attach_huge_consistent_geometry);
    RUN(failures, test_named_segment);
    RUN(failures, test_memory_available_with_no_out_leaks_nothing);
    RUN(failures, test_limits_are_the_layouts);
    RUN(failures, test_layout_fields_are_the_structs);
    RUN(failures, test_retire_keeps_the_range_as_zeros_and_gives_the_segment_up);
    RUN(failures, test_forked_child_never_unlinks_its_parents_segment);
    RUN(failures, test_truncated_named_segment_is_corrupt_never_sigbus);
    if (failures)
        fprintf(stderr, "test_segment: %d failed\n", failures);
    return failures ? T_EXIT_FAIL : T_EXIT_PASS;
}
