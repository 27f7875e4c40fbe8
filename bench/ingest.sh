#!/usr/bin/env bash
# Ingest benchmark: for N Salesforce Contacts (default 100,000 and 1,000,000), the backfill
# rate of sync (records/s) against COPY of the same rows into an identical table, their
# ratio, the incremental apply rate (changes/s), the worker's peak memory, the CPU split
# (worker / fake / rest of Postgres), and how fast the fake alone serves the same listing
# (so that the ratio is known not to measure the fake). Starts a temporary cluster with the
# extension preloaded; bench/ingest.py starts one fake Salesforce per N. See bench/README.md.
#   bench/ingest.sh                       as root (the cluster runs as postgres) or as a
#                                         user who can run postgres
#   bench/ingest.sh 100000                the Ns as arguments
#   BENCH_QUICK=1 bench/ingest.sh         smoke test: N = 20000
# Settings (environment): BENCH_RECORDS (default "100000 1000000"; arguments win),
# BENCH_UPDATES (K changed records for the incremental rate; default min(N/5, max(20000, N/20))),
# BENCH_PATHS ("rest", "bulk" or "rest bulk"; default: both when the installed sync has Bulk API
# backfills, else rest), BENCH_PERF=1 (perf record the worker during the backfill; prints its hottest functions),
# BENCH_LOG=FILE (keep the server's log there), BENCH_USER (default postgres, as root), BENCH_PGPORT, BENCH_INSTALL=1 (as root: make install
# first; default: use the installed sync).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

if [ $# -gt 0 ]; then
  RECORDS="$*"
elif [ -n "${BENCH_QUICK:-}" ]; then
  RECORDS=20000
else
  RECORDS=${BENCH_RECORDS:-100000 1000000}
fi
BIN=$(pg_config --bindir)

if [ "$(id -u)" -eq 0 ]; then
  RUN_AS=${BENCH_USER:-postgres}
  if [ -n "${BENCH_INSTALL:-}" ]; then
    make -s
    make -s install
  fi
  as_user() { runuser -u "$RUN_AS" -- "$@"; }
else
  as_user() { "$@"; }
fi
if [ ! -f "$(pg_config --pkglibdir)/sync.so" ] || [ ! -f "$(pg_config --sharedir)/extension/sync.control" ]; then
  echo "sync is not installed: run make install (or BENCH_INSTALL=1 as root)" >&2
  exit 1
fi

SO="$(pg_config --pkglibdir)/sync.so"
# The bulk path needs a sync with Bulk API 2.0 backfills (option bulk_threshold).
if [ -z "${BENCH_PATHS:-}" ]; then
  if grep -q "Bulk API 2.0 query job" "$SO"; then BENCH_PATHS="rest bulk"; else BENCH_PATHS=rest; fi
fi

DIR=$(mktemp -d /tmp/sync-ingest.XXXXXX)
PGPORT_BENCH=${BENCH_PGPORT:-$((20000 + RANDOM % 20000))}
BENCH_PID=
cleanup() {
  status=$?
  if [ -n "$BENCH_PID" ]; then           # interrupted: stop ingest.py (it stops its fake)
    kill "$BENCH_PID" 2>/dev/null || true
    wait "$BENCH_PID" 2>/dev/null || true
  fi
  as_user "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true
  for f in "$DIR"/fake_*.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  if [ "$status" -ne 0 ] && [ -f "$DIR/postgres.log" ]; then
    echo "=== $DIR/postgres.log (last 30 lines)" >&2
    tail -n 30 "$DIR/postgres.log" >&2
    for f in "$DIR"/fake_*.log; do
      [ -s "$f" ] && { echo "=== $f (last 20 lines)" >&2; tail -n 20 "$f" >&2; }
    done
  fi
  [ -n "${BENCH_LOG:-}" ] && [ -f "$DIR/postgres.log" ] && cp "$DIR/postgres.log" "$BENCH_LOG"
  rm -rf "$DIR"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The scripts run as the cluster's user from a copy it can read; the COPY file goes there too.
cp "$REPO/test/fake_salesforce.py" "$REPO/test/fakelib.py" "$REPO/bench/ingest.py" "$DIR/"
[ "$(id -u)" -eq 0 ] && chown -R "$RUN_AS" "$DIR"

as_user "$BIN/initdb" -D "$DIR/data" -A trust -U postgres >/dev/null
cat >> "$DIR/data/postgresql.conf" <<CONF
shared_preload_libraries = 'sync'
port = $PGPORT_BENCH
listen_addresses = ''
unix_socket_directories = '$DIR'
timezone = 'UTC'
sync.launcher_naptime = 1
max_worker_processes = 16
CONF
as_user "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/postgres.log" -w start >/dev/null

echo "sync ingest benchmark: N = $RECORDS; $(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GB RAM," \
     "load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%Y-%m-%dT%H:%MZ)," \
     "repo at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'), installed sync.so of" \
     "$(date -u -r "$SO" +%Y-%m-%dT%H:%MZ) (md5 $(md5sum "$SO" | cut -c1-8)); paths: $BENCH_PATHS" >&2
# In the background (and waited for) so that an INT/TERM runs the cleanup at once.
as_user /usr/bin/python3 "$DIR/ingest.py" --host "$DIR" --port "$PGPORT_BENCH" --psql "$BIN/psql" \
  --user postgres --fake-script "$DIR/fake_salesforce.py" --workdir "$DIR" --records "$RECORDS" --paths "$BENCH_PATHS" \
  ${BENCH_UPDATES:+--updates "$BENCH_UPDATES"} ${BENCH_PERF:+--perf} &
BENCH_PID=$!
wait "$BENCH_PID"
BENCH_PID=
