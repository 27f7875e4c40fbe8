#!/bin/bash
# Fuzz every provider's response handling for a bounded time, then replay the
# kept crash cases. Exits non-zero if anything crashed, a sanitizer (ASan,
# UBSan, LeakSanitizer) reported, or a harness invariant broke.
#
#   fuzz/run.sh [seconds per target, default 30] [provider ...]
#
# Environment:
#   FUZZ_DETECT_LEAKS=0      do not count memory leaks (LeakSanitizer) as failures
#   FUZZ_SKIP_CHECKS=a,b     harness invariants to skip (see harness.c), e.g. host
#   FUZZ_SKIP_IF_MISSING=1   exit 0 (skipped) when clang or libFuzzer is not installed
#   FUZZ_KEEP_CORPUS=1       add the inputs found to fuzz/corpus/<provider>/
#   FUZZ_RUNS=N              stop each target after N inputs, with seed FUZZ_SEED (default 1)
#
# New crash inputs land in fuzz/build/artifacts/; a crash that is a bug is
# kept forever: copy it to fuzz/regressions/<provider>/ (any file name).
# Needs clang and libclang-rt-14-dev (Debian), postgresql-server-dev-15,
# libcurl4-openssl-dev, libjansson-dev. Runs as any user that can write fuzz/build.
set -u
cd "$(dirname "$0")"

seconds=${1:-30}
shift $(( $# > 0 ? 1 : 0 ))
providers=("$@")
[ ${#providers[@]} -eq 0 ] && providers=(salesforce stripe hubspot airtable jsonscan)
case "$seconds" in
    ''|*[!0-9]*) echo "usage: $0 [seconds per target] [provider ...]" >&2; exit 2 ;;
esac

missing() {
    if [ "${FUZZ_SKIP_IF_MISSING:-0}" = 1 ]; then
        echo "fuzz: skipped: $1"
        exit 0
    fi
    echo "fuzz: $1 (install clang and libclang-rt-14-dev)" >&2
    exit 2
}
command -v "${CLANG:-clang}" >/dev/null 2>&1 || missing "clang is not installed"
echo 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { return 0; }' > /tmp/fuzz-probe-$$.c
if ! "${CLANG:-clang}" -fsanitize=fuzzer /tmp/fuzz-probe-$$.c -o /tmp/fuzz-probe-$$ >/dev/null 2>&1; then
    rm -f /tmp/fuzz-probe-$$ /tmp/fuzz-probe-$$.c
    missing "clang cannot link libFuzzer (-fsanitize=fuzzer)"
fi
rm -f /tmp/fuzz-probe-$$ /tmp/fuzz-probe-$$.c

echo "fuzz: building"
if ! make -s -j2 >build.log 2>&1; then
    cat build.log >&2
    echo "fuzz: build failed" >&2
    exit 2
fi
rm -f build.log

leaks=${FUZZ_DETECT_LEAKS:-1}
export ASAN_OPTIONS="detect_leaks=$leaks:abort_on_error=0:allocator_may_return_null=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
mkdir -p build/artifacts build/logs
failed=0
summary=()

for p in "${providers[@]}"; do
    bin=build/fuzz_$p
    if [ ! -x "$bin" ]; then
        echo "fuzz: no target $p" >&2
        exit 2
    fi
    work=$(mktemp -d "build/corpus-$p.XXXXXX")
    log=build/logs/$p.log
    echo "fuzz: $p for ${seconds}s"
    # FUZZ_RUNS bounds the run by inputs with a fixed seed: the same inputs every
    # time, so a CI run fails only on a change, never on the luck of the draw.
    "$bin" "$work" corpus/$p -dict=dict/$p.dict -max_total_time="$seconds" -rss_limit_mb=2048 \
        ${FUZZ_RUNS:+-runs="$FUZZ_RUNS" -seed="${FUZZ_SEED:-1}"} \
        -timeout=10 -max_len=65536 -detect_leaks="$leaks" -print_final_stats=1 \
        -artifact_prefix="build/artifacts/$p-" >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -1)
    if [ $rc -ne 0 ]; then
        failed=1
        summary+=("$p: FAILED after ${execs:-?} runs ($cov); log $PWD/$log")
        echo "---- $p: the fuzzer found a failure (exit $rc):" >&2
        grep -E -A40 '==[0-9]+==ERROR|runtime error|fuzz invariant|pgshim:' "$log" | head -80 >&2
        grep -E '^artifact_prefix|Test unit written' "$log" >&2
    else
        summary+=("$p: ok, ${execs:-?} runs in ${seconds}s ($cov)")
    fi
    if [ "${FUZZ_KEEP_CORPUS:-0}" = 1 ]; then
        "$bin" -merge=1 corpus/$p "$work" -max_len=65536 >/dev/null 2>&1
    fi
    rm -rf "$work"
done

echo "fuzz: replaying the regressions"
for p in "${providers[@]}"; do
    for f in regressions/$p/*; do
        [ -f "$f" ] || continue
        if ! ASAN_OPTIONS="$ASAN_OPTIONS:fast_unwind_on_malloc=0" build/fuzz_$p -runs=1 \
            -detect_leaks="$leaks" "$f" >build/logs/regression.log 2>&1; then
            failed=1
            summary+=("$p: regression $f FAILS")
            echo "---- $p: $f still fails:" >&2
            grep -E -A40 '==[0-9]+==ERROR|runtime error|fuzz invariant|pgshim:' build/logs/regression.log | head -30 >&2
        fi
    done
    n=$(find regressions/$p -type f 2>/dev/null | wc -l)
    summary+=("$p: $n regression inputs replayed")
done

printf 'fuzz: %s\n' "${summary[@]}"
if [ $failed -ne 0 ]; then
    echo "fuzz: FAILED" >&2
    exit 1
fi
echo "fuzz: passed"
