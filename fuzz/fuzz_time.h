/*
 * fuzz_time.h: force-included (-include) when the extension's sources are
 * compiled for fuzzing, so that their clock is the harness's: runs are
 * reproducible, and an input's steps can move the clock forward.
 */
#ifndef FUZZ_TIME_H
#define FUZZ_TIME_H

#include <time.h>

extern time_t fuzz_time(time_t *t);

#define time(t) fuzz_time(t)

#endif
