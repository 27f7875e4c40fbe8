#!/usr/bin/env bash
# Bulk API backfill benchmark (issue 7): a backfill of BENCH_RECORDS (default 1,000,000)
# Contacts from the fake Salesforce at the default budget of one request every three
# seconds (requests_per_second 0.3333, burst 1) and the default bulk_threshold. Prints the
# requests made (by kind, from the fake's request log), the elapsed time, records/s and the
# worker's peak memory (VmHWM). The issue's claim: under 10 minutes for a million records.
# Starts a temporary cluster with the extension preloaded and the fake (seeding a million
# records takes ~35 s and ~3.3 GB of RAM); both are stopped on exit.
#   bench/bulk_1m.sh                      as root (the cluster runs as postgres) or as a
#                                         user who can run postgres; uses the installed sync
# Settings (environment): BENCH_RECORDS, BENCH_BUDGET (requests/s, default 0.3333),
# BENCH_OPTIONS (extra source options as JSON members, e.g. '"bulk_chunk_records": 100000'),
# BENCH_TIMEOUT (seconds, default 1200), BENCH_USER (default postgres, as root).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

RECORDS=${BENCH_RECORDS:-1000000}
BUDGET=${BENCH_BUDGET:-0.3333}
TIMEOUT=${BENCH_TIMEOUT:-1200}
EXTRA=${BENCH_OPTIONS:+, $BENCH_OPTIONS}
BIN=$(pg_config --bindir)

if [ "$(id -u)" -eq 0 ]; then
  RUN_AS=${BENCH_USER:-postgres}
  as_user() { runuser -u "$RUN_AS" -- "$@"; }
else
  as_user() { "$@"; }
fi
if [ ! -f "$(pg_config --pkglibdir)/sync.so" ]; then
  echo "sync is not installed: run make install" >&2
  exit 1
fi

DIR=$(mktemp -d /tmp/sync-bulk-bench.XXXXXX)
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

cp "$REPO/test/fake_salesforce.py" "$REPO/test/fakelib.py" "$DIR/"
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
max_wal_size = 4GB
CONF
as_user "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/postgres.log" -w start >/dev/null
psql() { as_user "$BIN/psql" -X -q -At -h "$DIR" -p "$PGPORT_BENCH" -U postgres -d postgres "$@"; }

echo "seeding $RECORDS Contacts in the fake Salesforce ..." >&2
if [ "$(id -u)" -eq 0 ]; then
  setpriv --reuid="$(id -u "$RUN_AS")" --regid="$(id -g "$RUN_AS")" --init-groups \
    /usr/bin/python3 "$DIR/fake_salesforce.py" --port 0 --records "$RECORDS" >"$DIR/fake.out" 2>"$DIR/fake.log" &
else
  /usr/bin/python3 "$DIR/fake_salesforce.py" --port 0 --records "$RECORDS" >"$DIR/fake.out" 2>"$DIR/fake.log" &
fi
FAKE_PID=$!
for _ in $(seq 1 1500); do grep -q "listening on" "$DIR/fake.out" 2>/dev/null && break; sleep 0.2; done
FAKE_PORT=$(sed -n 's/.*listening on \([0-9]*\).*/\1/p' "$DIR/fake.out")
[ -n "$FAKE_PORT" ] || { echo "the fake Salesforce did not start" >&2; cat "$DIR/fake.log" >&2; exit 1; }
FAKE="http://127.0.0.1:$FAKE_PORT"
curl -s -X DELETE "$FAKE/__admin/requests" >/dev/null

psql -c "CREATE EXTENSION sync"
psql -c "SELECT sync.create_source('sf', 'salesforce', '$FAKE', '{\"client_id\": \"test-client\", \"client_secret\": \"test-secret\", \"refresh_token\": \"test-refresh\"}', '{\"requests_per_second\": $BUDGET$EXTRA}')" >/dev/null
T0=$(date +%s.%N)
psql -c "SELECT sync.add_collection('sf', 'Contact')" >/dev/null
PEAK=0
while :; do
  done_=$(psql -c "SELECT backfill_completed_at IS NOT NULL FROM sync.status WHERE source = 'sf'")
  pid=$(psql -c "SELECT sync.worker_pid()")
  if [ -n "$pid" ] && [ -r "/proc/$pid/status" ]; then
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ "${hwm:-0}" -gt "$PEAK" ] && PEAK=$hwm
  fi
  [ "$done_" = "t" ] && break
  now=$(date +%s.%N)
  if [ "$(echo "$now - $T0 > $TIMEOUT" | bc)" = 1 ]; then
    echo "backfill not done after $TIMEOUT s" >&2
    psql -c "SELECT state, phase, backfill_records, backfill_total, last_error FROM sync.status" >&2
    exit 1
  fi
  sleep 1
done
T1=$(date +%s.%N)
ELAPSED=$(echo "$T1 - $T0" | bc)
ROWS=$(psql -c "SELECT count(*) FROM sf.contact")
psql -c "SELECT 'status: ' || state || ', ' || phase || ', records ' || backfill_records || ' of ' || backfill_total || ', requests ' || requests || coalesce(', last_error ' || last_error, '') FROM sync.status WHERE source = 'sf'"
curl -s "$FAKE/__admin/requests" | /usr/bin/python3 -c '
import json, re, sys
log = json.load(sys.stdin)
kinds = {}
for e in log:
    p = e["path"]
    k = ("token" if p.endswith("/oauth2/token") else
         "describe" if p.endswith("/describe") else
         "bulk create" if e["method"] == "POST" and p.endswith("/jobs/query") else
         "bulk results" if p.endswith("/results") else
         "bulk state poll" if "/jobs/query/" in p else
         "REST query" if "/query" in p or "/queryAll" in p else p)
    kinds[k] = kinds.get(k, 0) + 1
print("requests made: %d (%s)" % (len(log), ", ".join("%s %d" % kv for kv in sorted(kinds.items()))))
'
echo "rows in sf.contact: $ROWS (fake: $RECORDS)"
printf 'elapsed (add_collection to backfill completed): %.1f s\n' "$ELAPSED"
printf 'records/s: %.0f\n' "$(echo "$ROWS / $ELAPSED" | bc -l)"
echo "sync worker peak memory (VmHWM): $((PEAK / 1024)) MB"
[ "$ROWS" = "$RECORDS" ]
