#!/usr/bin/env bash
# Runs every test of sync: pg_regress (sql/, expected/), the fakes' self-tests, bounded
# fuzz runs (fuzz/) and the TAP suites (test/t/).
# Run as root on Debian: installs the packages, builds and installs the extension,
# then runs the tests as the unprivileged "postgres" user in a copy of the tree
# it owns (Postgres refuses to run as root; the checkout may not be writable).
#   scripts/test.sh                 everything
#   PROVE_TESTS=test/t/002_salesforce.pl scripts/test.sh   one TAP suite
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E "$0" "$@"
fi

bash scripts/install-deps.sh
make -s clean
make -s
make -s install

RUN_AS=${SYNC_TEST_USER:-postgres}
work=$(mktemp -d /tmp/sync-test.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -a . "$work/tree"
rm -rf "$work/tree/.git"
chown -R "$RUN_AS" "$work"

status=0
# The fakes must be as strict as the APIs they stand for: their own checks first.
for selftest in test/*_selftest.py; do
  [ -f "$selftest" ] || continue
  runuser -u "$RUN_AS" -- /usr/bin/python3 "$work/tree/$selftest" || status=$?
done
# Each provider's response parsing under libFuzzer for a bounded number of inputs (fixed seed),
# then every kept crash case.
if [ -z "${PROVE_TESTS:-}" ] && [ -x fuzz/run.sh ]; then
  runuser -u "$RUN_AS" -- env FUZZ_RUNS="${SYNC_FUZZ_RUNS:-20000}" \
    bash "$work/tree/fuzz/run.sh" "${SYNC_FUZZ_SECONDS:-120}" || status=$?
fi
runuser -u "$RUN_AS" -- make -C "$work/tree" -s installcheck ${PROVE_TESTS:+PROVE_TESTS="$PROVE_TESTS"} || status=$?
if [ "$status" -ne 0 ]; then
  for f in "$work/tree/regression.diffs" "$work"/tree/tmp_check/log/regress_log_*; do
    [ -f "$f" ] && { echo "=== $f (last 80 lines)"; tail -n 80 "$f"; }
  done
fi
exit "$status"
