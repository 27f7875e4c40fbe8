EXTENSION    = sync
EXTVERSION   = $(shell grep default_version $(EXTENSION).control | sed -e "s/default_version[[:space:]]*=[[:space:]]*'\([^']*\)'/\1/")
MODULE_big   = sync
OBJS         = $(patsubst %.c,%.o,$(wildcard src/*.c))
DATA         = $(wildcard sql/sync--*.sql)
PG_CPPFLAGS  = -Isrc -DSYNC_VERSION=\"$(EXTVERSION)\" -Wall -Wextra -Wno-unused-parameter -Wno-sign-compare -Wno-missing-field-initializers -Werror
SHLIB_LINK   = -lcurl -ljansson -lmicrohttpd

REGRESS      = api errors
REGRESS_OPTS = --temp-config=test/regress.conf --temp-instance=tmp_regress
TAP_TESTS    = 1
PROVE_TESTS  = $(sort $(wildcard test/t/*.pl))
EXTRA_CLEAN  = tmp_regress tmp_check results regression.diffs regression.out

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# No JIT bitcode: it would need clang on every machine that builds sync.
override with_llvm = no

$(OBJS): src/sync.h
