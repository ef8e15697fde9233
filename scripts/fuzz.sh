#!/usr/bin/env bash
# Fuzzes the TIFF reader, the model-file loader and the JSON configs with cargo fuzz
# (libFuzzer + AddressSanitizer), each for SECONDS (default 60), starting from the real
# files in fuzz/seeds/. Installs the nightly toolchain and cargo-fuzz when missing.
#   scripts/fuzz.sh [SECONDS] [--report FILE]
# Prints executions and crashes per target; exits non-zero on any crash (the crashing
# input is kept in fuzz/artifacts/TARGET/). With --report, writes a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-60}
REPORT=""
if [ "${2:-}" = "--report" ]; then REPORT=${3:?--report needs a file}; fi
./scripts/bootstrap.sh >/dev/null
[ -z "${HOME:-}" ] || export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v rustup >/dev/null 2>&1; then
    echo "fuzz: rustup is needed (cargo fuzz runs on the nightly toolchain); install Rust with rustup," \
        "or skip fuzzing in scripts/test.sh with LUMOS_SKIP_FUZZ=1" >&2
    exit 1
fi
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz: installing the nightly toolchain (cargo fuzz needs -Zsanitizer)"
    rustup toolchain install nightly --profile minimal >/dev/null
fi
# pinned like every other tool of the test run (requirements/README.md)
CARGO_FUZZ_VERSION=0.13.2
if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --quiet --force
fi
echo "fuzz: $(cargo +nightly --version), $(cargo fuzz --version)"
# libtorch itself is not instrumented: its one-time allocations are not leaks of ours, and
# its allocator pairs differ from ASan's expectations
export ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0"
export LIBTORCH="$PWD/.libtorch/torch" LIBTORCH_CXX11_ABI=1
declare -A SEEDS=([tiff_reader]=tiff [model_file]=model [json_configs]=config)
cargo +nightly fuzz build --fuzz-dir fuzz -O --debug-assertions >/dev/null 2>&1 || cargo +nightly fuzz build --fuzz-dir fuzz -O --debug-assertions
rows=""
status=0
for t in tiff_reader model_file json_configs; do
    corpus="fuzz/corpus/$t"
    rm -rf "fuzz/artifacts/$t" # count this run's crashes only
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    log=$(mktemp)
    set +e
    cargo +nightly fuzz run --fuzz-dir fuzz -O --debug-assertions "$t" "$corpus" "fuzz/seeds/${SEEDS[$t]}" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=4096 -timeout=60 -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    runs=$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)
    crashes=$(find "fuzz/artifacts/$t" -type f | wc -l)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || true)
    echo "fuzz: $t: ${runs:-?} executions in ${SECONDS_PER_TARGET} s, coverage ${cov:-?} edges, $crashes crash(es), exit $rc"
    if [ "$rc" != 0 ] || [ "$crashes" != 0 ]; then
        status=1
        tail -40 "$log" >&2
    fi
    rows="$rows| \`$t\` | ${SECONDS_PER_TARGET} | ${runs:-?} | ${cov:-?} | $crashes |\n"
    rm -f "$log"
done
if [ -n "$REPORT" ]; then
    {
        echo "| target | seconds | executions | coverage (edges) | crashes |"
        echo "|---|---|---|---|---|"
        printf "%b" "$rows"
    } >"$REPORT"
fi
exit $status
