/*
 * harness.h: the part of the fuzz harnesses shared by every provider.
 *
 * An input is two header bytes and the API's responses:
 *
 *   byte 0    scenario (modulo the target's count): collection, cursor, fields
 *   byte 1    flags:
 *               0x01  sync.reconcile() was called before the first step
 *               0x02  the target's other credentials (OAuth, or no token yet)
 *               0x04  the target's other source options (api_version, ...)
 *               0x08  describe the collection first; its fields are used
 *               0x30  clock moves per step: 0, 61 s, 400 s, 16 days
 *               0xC0  steps at most: 1, 2, 4, 8
 *   then      responses, one per API request in order, separated by "\n--\n".
 *             A response is its body (status 200), or starts with a status
 *             line and headers:  "HTTP/1.1 404\nRetry-After: 5\n\n<body>".
 *
 * Each input: describe (if asked), then the provider's step() again and again
 * with the cursor each step returns, as the worker does, until the responses
 * run out or the step limit; a request with no response left fails as a
 * transfer would. An ERROR from the provider is a fine outcome; a crash, a
 * sanitizer report or a broken invariant (see harness.c) is a bug.
 */
#ifndef FUZZ_HARNESS_H
#define FUZZ_HARNESS_H

#include "sync.h"

#include <stdint.h>

/* The fixed clock runs start at: 2026-01-01T00:00:00Z. */
#define FUZZ_NOW 1767225600

#define FUZZ_FLAG_RECONCILE		0x01
#define FUZZ_FLAG_ALT_CREDENTIALS	0x02
#define FUZZ_FLAG_ALT_OPTIONS	0x04
#define FUZZ_FLAG_DESCRIBE		0x08

typedef struct FuzzCase
{
	SyncSource *source;
	SyncCollection *collection;
	unsigned	flags;
	double		now;			/* the clock at the start */
} FuzzCase;

typedef struct FuzzTarget
{
	const char *kind;
	const SyncProvider *provider;
	int			nscenarios;
	/* Fill fc->source and fc->collection (allocated, defaults set) for a scenario. */
	void		(*setup) (FuzzCase *fc, int scenario);
} FuzzTarget;

extern int	fuzz_test_one_input(const FuzzTarget *target, const uint8_t *data, size_t size);
extern int	fuzz_initialize(const FuzzTarget *target, int *argc, char ***argv);

/* helpers for targets' setup */
extern json_t *fuzz_json(const char *fmt,...) pg_attribute_printf(1, 2);
extern SyncField *fuzz_field(const char *api_field, const char *api_type, const char *column_type,
							 bool is_key, bool is_version);
extern char *fuzz_iso(double epoch);

#endif
