#!/usr/bin/env bash
# Budget and lag benchmark: for 1, 5 and 20 collections of one Salesforce source at a
# budget of 4 requests/s, the requests/s achieved during a long backfill (vs the budget)
# and the lag of ~30 random changes (p50, p99, max vs sync.status.est_max_lag).
# Starts a temporary cluster with the extension preloaded and the fake Salesforce
# (test/fake_salesforce.py); both are stopped on exit. See bench/README.md.
#   bench/lag.sh                              as root (the cluster runs as postgres) or as a
#                                             user who can run postgres
#   BENCH_BUDGET=8 BENCH_COLLECTIONS="1 5" bench/lag.sh
# Settings (environment): BENCH_BUDGET (requests/s, default 4), BENCH_COLLECTIONS
# (default "1 5 20"), BENCH_CHANGES (default 30), BENCH_BACKFILL_SECONDS (backfill
# length at the budget, default 30), BENCH_SEED, BENCH_USER (default postgres, as
# root), BENCH_INSTALL=1 (as root: make install first; default: use the installed sync).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

BUDGET=${BENCH_BUDGET:-4}
COLLECTIONS=${BENCH_COLLECTIONS:-1 5 20}
CHANGES=${BENCH_CHANGES:-30}
BACKFILL_SECONDS=${BENCH_BACKFILL_SECONDS:-30}
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

DIR=$(mktemp -d /tmp/sync-bench.XXXXXX)
PGPORT_BENCH=${BENCH_PGPORT:-$((20000 + RANDOM % 20000))}
FAKE_PID=
cleanup() {
  status=$?
  as_user "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true
  if [ -n "$FAKE_PID" ]; then
    kill "$FAKE_PID" 2>/dev/null || true
    wait "$FAKE_PID" 2>/dev/null || true
  fi
  if [ "$status" -ne 0 ] && [ -f "$DIR/postgres.log" ]; then
    echo "=== $DIR/postgres.log (last 30 lines)" >&2
    tail -n 30 "$DIR/postgres.log" >&2
  fi
  rm -rf "$DIR"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The scripts run as the cluster's user from a copy it can read.
cp "$REPO/test/fake_salesforce.py" "$REPO/test/fakelib.py" "$REPO/bench/lag.py" "$DIR/"
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

# The fake is started directly (not through runuser) so that $! is its own pid.
if [ "$(id -u)" -eq 0 ]; then
  setpriv --reuid="$(id -u "$RUN_AS")" --regid="$(id -g "$RUN_AS")" --init-groups \
    /usr/bin/python3 "$DIR/fake_salesforce.py" --port 0 --records 100 >"$DIR/fake.out" 2>"$DIR/fake.log" &
else
  /usr/bin/python3 "$DIR/fake_salesforce.py" --port 0 --records 100 >"$DIR/fake.out" 2>"$DIR/fake.log" &
fi
FAKE_PID=$!
for _ in $(seq 1 100); do grep -q "listening on" "$DIR/fake.out" 2>/dev/null && break; sleep 0.2; done
FAKE_PORT=$(sed -n 's/.*listening on \([0-9]*\).*/\1/p' "$DIR/fake.out")
[ -n "$FAKE_PORT" ] || { echo "the fake Salesforce did not start" >&2; cat "$DIR/fake.log" >&2; exit 1; }

echo "sync lag benchmark: budget $BUDGET req/s, collections $COLLECTIONS, $CHANGES changes each;" \
     "$(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%MZ)" >&2
as_user /usr/bin/python3 "$DIR/lag.py" --fake "http://127.0.0.1:$FAKE_PORT" --host "$DIR" --port "$PGPORT_BENCH" \
  --psql "$BIN/psql" --user postgres --budget "$BUDGET" --collections "$COLLECTIONS" --changes "$CHANGES" \
  --backfill-seconds "$BACKFILL_SECONDS" ${BENCH_SEED:+--seed "$BENCH_SEED"}
