/*
 * fuzz_attach.c — libFuzzer harness over shmfeed_ring_attach and everything
 * that reads a segment another process may have written.
 *
 * Build and run with one command: `make fuzz` (clang, -fsanitize=fuzzer,
 * address,undefined; FUZZ_SECONDS sets the duration). Each input becomes a
 * segment in a fresh memfd, attached through /proc/self/fd/<n> exactly as a
 * producer attaches. Two kinds of input, picked by the first byte:
 *
 *   even: raw   — the rest of the input is the whole segment file (any size),
 *                 so truncation and every header field are reachable;
 *   odd:  patch — a valid ring of a shape taken from the next bytes is made
 *                 with shmfeed_ring_create, then (u16 offset, u8 length,
 *                 bytes) patches overwrite its header, counters and slot
 *                 descriptors. This reaches past validation quickly.
 *
 * When attach accepts a segment the harness drives every call that reads
 * shared memory (slot info, counters, close reason, acquire/release,
 * claim/commit/abort, reclaim, seq_committed) with zero timeouts, and checks
 * the contract: attach either fails with CORRUPT/VERSION and a reason, or
 * yields a geometry that fits inside the mapping; every status is one the
 * header declares; an acquired payload never exceeds the slot. A broken
 * contract is __builtin_trap(): libFuzzer reports it like a crash. ASan
 * catches any out-of-bounds access, UBSan any undefined behaviour.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "shmfeed.h"

#define CHECK(cond)              \
    do {                         \
        if (!(cond))             \
            __builtin_trap();    \
    } while (0)

static int known_status(int rc) { return rc <= 0 && rc >= SHMFEED_E_AGAIN; }

/* Everything a consumer or producer does with an attached, possibly hostile, segment. */
static void exercise(shmfeed_ring *r, const uint8_t *data, size_t size)
{
    shmfeed_geometry g;
    CHECK(shmfeed_ring_geometry(r, &g) == SHMFEED_OK);
    CHECK(g.slot_count >= 1 && g.slot_bytes >= 1 && g.slot_stride >= g.slot_bytes);
    CHECK(g.data_offset + (uint64_t)g.slot_count * g.slot_stride <= g.segment_bytes);

    uint8_t *base = NULL;
    CHECK(shmfeed_ring_base(r, &base) == SHMFEED_OK && base);
    /* Touch the first and last byte of every slot: all inside the mapping. */
    for (uint32_t i = 0; i < g.slot_count && i < 64; i++) {
        volatile uint8_t *slot = base + g.data_offset + (uint64_t)i * g.slot_stride;
        (void)slot[0];
        (void)slot[g.slot_bytes - 1];
    }

    shmfeed_slot_info info;
    uint64_t owner = 0;
    for (uint32_t i = 0; i < g.slot_count && i < 64; i++) {
        CHECK(shmfeed_slot_info_read(r, i, &info) == SHMFEED_OK);
        CHECK(info.state <= SHMFEED_SLOT_ACQUIRED);
        if (info.owner)
            owner = info.owner;
    }
    CHECK(shmfeed_slot_info_read(r, g.slot_count, &info) == SHMFEED_E_INVAL);

    shmfeed_counters counters;
    CHECK(shmfeed_counters_read(r, &counters) == SHMFEED_OK);

    int32_t code = 0;
    char reason[64];
    CHECK(shmfeed_close_reason(r, &code, reason, sizeof reason) == SHMFEED_OK);
    CHECK(memchr(reason, '\0', sizeof reason) != NULL);

    shmfeed_acquired acq;
    int rc = shmfeed_acquire(r, 0, &acq);
    CHECK(known_status(rc));
    if (rc == SHMFEED_OK) {
        CHECK(acq.slot < g.slot_count && acq.payload_len <= g.slot_bytes);
        rc = shmfeed_release(r, &acq);
        CHECK(rc == SHMFEED_OK || rc == SHMFEED_E_STATE);
    }

    uint64_t seq = 0;
    if (size >= 8)
        memcpy(&seq, data + size - 8, 8);
    seq &= (1ULL << 46) - 1;
    shmfeed_claimed claim;
    rc = shmfeed_claim(r, seq % 4096, 0x5eed, 0, &claim);
    CHECK(known_status(rc));
    if (rc == SHMFEED_OK) {
        CHECK(claim.slot < g.slot_count);
        rc = (seq & 1) ? shmfeed_commit(r, &claim, seq % (g.slot_bytes + 2))
                       : shmfeed_abort(r, &claim);
        CHECK(known_status(rc));
    }

    uint64_t seqs[8];
    uint32_t n = 0;
    if (owner) {
        rc = shmfeed_reclaim(r, owner, seqs, 8, &n);
        CHECK(rc == SHMFEED_OK || rc == SHMFEED_E_TOOBIG);
    }
    int32_t committed;
    rc = shmfeed_seq_committed(r, seq, &committed);
    CHECK(rc == SHMFEED_OK || rc == SHMFEED_E_INVAL);

    /* A second pass after our own writes: still consistent. */
    rc = shmfeed_acquire(r, 0, &acq);
    CHECK(known_status(rc));
    if (rc == SHMFEED_OK)
        CHECK(acq.payload_len <= g.slot_bytes);
}

static void attach_and_exercise(int fd, const uint8_t *data, size_t size)
{
    char path[64], err[256];
    shmfeed_ring *r = NULL;
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    err[0] = 'x';
    int rc = shmfeed_ring_attach(path, &r, err, sizeof err);
    CHECK(known_status(rc));
    if (rc != SHMFEED_OK) {
        CHECK(r == NULL);
        CHECK(rc == SHMFEED_E_CORRUPT || rc == SHMFEED_E_VERSION);
        CHECK(memchr(err, '\0', sizeof err) != NULL && err[0] != '\0'); /* a reason, terminated */
        return;
    }
    exercise(r, data, size);
    CHECK(shmfeed_ring_detach(r) == SHMFEED_OK);
}

static void fuzz_raw(const uint8_t *data, size_t size)
{
    int fd = memfd_create("fuzz-raw", MFD_CLOEXEC);
    if (fd < 0)
        return;
    if (size && write(fd, data, size) != (ssize_t)size) {
        close(fd);
        return;
    }
    attach_and_exercise(fd, data, size);
    close(fd);
}

static void fuzz_patch(const uint8_t *data, size_t size)
{
    if (size < 4)
        return;
    uint32_t slots = 1u + data[0] % 8u;
    uint64_t slot_bytes = 1u + ((uint64_t)data[1] | (uint64_t)data[2] << 8);
    uint32_t flags = data[3] & SHMFEED_ORDERED;
    shmfeed_ring *creator = NULL;
    char err[256];
    if (shmfeed_ring_create(slots, slot_bytes, flags, &creator, err, sizeof err) != SHMFEED_OK)
        return;
    shmfeed_geometry g;
    uint8_t *base;
    shmfeed_ring_geometry(creator, &g);
    shmfeed_ring_base(creator, &base);
    /* Patches land in the header, counters and descriptors (the metadata). */
    size_t i = 4;
    while (i + 3 <= size) {
        uint64_t off = ((uint64_t)data[i] | (uint64_t)data[i + 1] << 8) % g.data_offset;
        size_t len = data[i + 2] % 17;
        i += 3;
        if (len > size - i)
            len = size - i;
        if (len > g.data_offset - off)
            len = g.data_offset - off;
        memcpy(base + off, data + i, len);
        i += len;
    }
    char path[128];
    shmfeed_ring_path(creator, path, sizeof path);
    int fd = -1;
    sscanf(path, "/proc/%*d/fd/%d", &fd);
    attach_and_exercise(fd, data, size);
    shmfeed_ring_detach(creator);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    if (data[0] & 1)
        fuzz_patch(data + 1, size - 1);
    else
        fuzz_raw(data + 1, size - 1);
    return 0;
}
