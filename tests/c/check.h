/*
 * check.h — the few macros the C tests share (liburing's test/helpers.h
 * in spirit): a failed check prints file:line, what was expected and what
 * came back, then makes the test function return 1.
 *
 * Each test program is standalone: exit 0 pass, 77 skip, anything else fail.
 */
#ifndef SHMFEED_TEST_CHECK_H
#define SHMFEED_TEST_CHECK_H

#include <stdio.h>
#include <string.h>

#include "shmfeed.h"

#define T_EXIT_PASS 0
#define T_EXIT_FAIL 1
#define T_EXIT_SKIP 77

/* The condition must hold. */
#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "%s:%d: %s: check failed: %s\n", __FILE__, __LINE__, __func__,  \
                    #cond);                                                                  \
            return 1;                                                                        \
        }                                                                                    \
    } while (0)

/* A shmfeed call must return the status `want` (SHMFEED_OK or an error). */
#define CHECK_RC(call, want)                                                                 \
    do {                                                                                     \
        int rc_ = (call);                                                                    \
        int want_ = (want);                                                                  \
        if (rc_ != want_) {                                                                  \
            fprintf(stderr, "%s:%d: %s: %s returned %d (%s), expected %d (%s)\n", __FILE__,  \
                    __LINE__, __func__, #call, rc_, shmfeed_strerror(rc_), want_,            \
                    shmfeed_strerror(want_));                                                \
            return 1;                                                                        \
        }                                                                                    \
    } while (0)

/* Two unsigned integers must be equal. */
#define CHECK_EQ(got, want)                                                                  \
    do {                                                                                     \
        unsigned long long got_ = (unsigned long long)(got);                                 \
        unsigned long long want_ = (unsigned long long)(want);                               \
        if (got_ != want_) {                                                                 \
            fprintf(stderr, "%s:%d: %s: %s is %llu, expected %llu\n", __FILE__, __LINE__,    \
                    __func__, #got, got_, want_);                                            \
            return 1;                                                                        \
        }                                                                                    \
    } while (0)

/* An error text must mention `needle` (the value a person needs to see). */
#define CHECK_MSG(text, needle)                                                              \
    do {                                                                                     \
        if (!strstr((text), (needle))) {                                                     \
            fprintf(stderr, "%s:%d: %s: message \"%s\" does not mention \"%s\"\n", __FILE__, \
                    __LINE__, __func__, (text), (needle));                                   \
            return 1;                                                                        \
        }                                                                                    \
    } while (0)

/* Run one test function; count it if it failed. */
#define RUN(failures, fn)                                                                    \
    do {                                                                                     \
        if (fn()) {                                                                          \
            fprintf(stderr, "FAIL %s\n", #fn);                                               \
            (failures)++;                                                                    \
        }                                                                                    \
    } while (0)

#endif /* SHMFEED_TEST_CHECK_H */
