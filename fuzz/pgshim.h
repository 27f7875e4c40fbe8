/*
 * pgshim.h: what the fuzz harness needs from its stand-in for the backend.
 */
#ifndef FUZZ_PGSHIM_H
#define FUZZ_PGSHIM_H

#include "postgres.h"

extern bool fuzz_verbose;
/* called with every message below ERROR (LOG, WARNING, NOTICE) when it is emitted */
extern void (*fuzz_log_hook) (ErrorData *edata);

extern MemoryContext fuzz_top_arena(void);
extern MemoryContext fuzz_step_arena(void);
extern void fuzz_arena_reset(MemoryContext arena);
extern ErrorData *fuzz_current_error(void);
extern int	fuzz_error_depth(void);
extern void fuzz_set_stack_base(void);

#endif
