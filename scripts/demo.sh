#!/usr/bin/env bash
# The main job, end to end on this machine: installs what sync needs, builds and installs
# it, starts a local cluster with the extension preloaded, starts the bundled fake
# Salesforce, creates a source, syncs Contact and Account, makes changes in the fake and
# shows them arriving, then prints sync.status.
#   sudo scripts/demo.sh            run once and stop everything
#   KEEP=1 sudo scripts/demo.sh     leave the cluster and the fake running to explore
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E "$0" "$@"
fi

bash scripts/install-deps.sh
make -s
make -s install

RUN_AS=${SYNC_DEMO_USER:-postgres}
BIN=$(pg_config --bindir)
DIR=${SYNC_DEMO_DIR:-/tmp/sync-demo}
PORT=${SYNC_DEMO_PORT:-5488}
FAKE_PORT=${SYNC_DEMO_FAKE_PORT:-8788}
as_user() { runuser -u "$RUN_AS" -- "$@"; }
psql_demo() { as_user "$BIN/psql" -X -q -h "$DIR" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 "$@"; }

cleanup() {
  if [ -z "${KEEP:-}" ]; then
    as_user "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true
    pkill -f "fake_salesforce.py --port $FAKE_PORT" 2>/dev/null || true
  fi
}
trap cleanup EXIT

if [ -f "$DIR/data/postmaster.pid" ]; then
  as_user "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true
fi
rm -rf "$DIR"
mkdir -p "$DIR"
chown "$RUN_AS" "$DIR"
as_user "$BIN/initdb" -D "$DIR/data" -A trust -U postgres >/dev/null
cat >> "$DIR/data/postgresql.conf" <<CONF
shared_preload_libraries = 'sync'
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
timezone = 'UTC'
CONF
as_user "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/postgres.log" -w start >/dev/null

as_user /usr/bin/python3 test/fake_salesforce.py --port "$FAKE_PORT" --records 20000 >"$DIR/fake.log" 2>&1 &
FAKE_PID=$!
for _ in $(seq 1 50); do grep -q "listening on" "$DIR/fake.log" 2>/dev/null && break; sleep 0.2; done
FAKE="http://127.0.0.1:$FAKE_PORT"

echo "== a cluster with sync, and a fake Salesforce at $FAKE with 20,000 contacts"
psql_demo <<SQL
CREATE EXTENSION sync;
SELECT sync.create_source('acme', 'salesforce', '$FAKE',
       credentials => '{"client_id": "test-client", "client_secret": "test-secret", "refresh_token": "test-refresh"}',
       options     => '{"requests_per_second": 10, "deleted_interval": 5}');
SELECT sync.add_collection('acme', 'Contact') AS contact_table, sync.add_collection('acme', 'Account') AS account_table;
SQL

echo "== backfilling"
psql_demo -c "SELECT sync.wait_for_backfill('acme', 'Contact', '5 minutes') AND sync.wait_for_backfill('acme', 'Account', '5 minutes') AS backfilled"
psql_demo -c "SELECT collection, backfill_records, backfill_total, backfill_completed_at - backfill_started_at AS took FROM sync.status"

echo "== changing records in the fake: one update, one create, one delete"
ID=$(psql_demo -At -c "SELECT id FROM acme.contact ORDER BY id LIMIT 1")
GONE=$(psql_demo -At -c "SELECT id FROM acme.contact ORDER BY id LIMIT 1 OFFSET 1")
curl -sf -X PATCH "$FAKE/__admin/records/Contact/$ID" -d '{"LastName": "Lovelace", "FirstName": "Ada"}' >/dev/null
curl -sf -X POST "$FAKE/__admin/records/Contact" -d '{"LastName": "Hopper", "FirstName": "Grace"}' >/dev/null
curl -sf -X DELETE "$FAKE/__admin/records/Contact/$GONE" >/dev/null
for _ in $(seq 1 60); do
  n=$(psql_demo -At -c "SELECT count(*) FROM acme.contact WHERE (id = '$ID' AND last_name = 'Lovelace') OR last_name = 'Hopper' OR id = '$GONE'")
  [ "$n" = 2 ] && [ "$(psql_demo -At -c "SELECT count(*) FROM acme.contact WHERE id = '$GONE'")" = 0 ] && break
  sleep 0.5
done
psql_demo -c "SELECT id, first_name, last_name, system_modstamp, _synced_at FROM acme.contact WHERE last_name IN ('Lovelace', 'Hopper')"
psql_demo -c "SELECT count(*) AS deleted_row_left FROM acme.contact WHERE id = '$GONE'"

echo "== sync.status"
psql_demo -x -c "SELECT source, collection, target_table, state, backfill_records, backfill_completed_at, last_poll_at, lag, est_max_lag, records_upserted, records_deleted, requests, last_error FROM sync.status"
echo "== sync.budgets"
psql_demo -x -c "SELECT source, requests_per_second, basis, used_requests_per_second, daily_limit, daily_remaining, quota_headroom, collections, poll_cycle FROM sync.budgets"
if [ -n "${KEEP:-}" ]; then
  echo "Cluster left running: psql -h $DIR -p $PORT -U postgres   (fake Salesforce at $FAKE, pid $FAKE_PID)"
fi
