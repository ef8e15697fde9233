#!/usr/bin/env bash
# The fresh-machine check: what a new user (and CI) gets from the README's two commands.
# Clones this repository's committed HEAD (or REF) into a new temporary folder, so that
# none of .libtorch, .onednn, .venv, target, demo-output or any other git-ignored file comes
# along, then runs there, one after the other:
#   ./scripts/demo.sh      the demo
#   ./scripts/test.sh      every test (what .ci/run calls)
# Each has its own log; one summary line per command gives its exit status and time. LOG
# holds the summary, and each command's full log is copied beside it. Download caches are
# reused (pip's in ~/.cache/pip, cargo's registry in ~/.cargo); the project's installed
# environments are not: bootstrap unpacks libtorch, oneDNN and the locked .venv anew and
# cargo builds from nothing. What the machine itself has stays: the Rust toolchains (the
# nightly of the fuzzing step), cargo-fuzz once installed, the Debian packages.
#
#   scripts/fresh-check.sh [--ref REF] [--keep] [--log LOG]
#     --ref REF   the commit to check (default HEAD); uncommitted changes are never included
#     --keep      keep the clone (by default it is removed when both commands pass)
#     --log LOG   the summary log (default target/fresh-check/fresh-check-<UTC time>.log);
#                 each command's full log is copied beside it (LOG without .log, -demo.log / -test.log)
# Exits 0 when both commands pass, 1 otherwise (the clone is then kept for inspection).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ref=HEAD keep=0 log=
while [ $# -gt 0 ]; do
    case "$1" in
        --ref) ref=${2:?--ref needs a commit}; shift 2 ;;
        --keep) keep=1; shift ;;
        --log) log=${2:?--log needs a path}; shift 2 ;;
        *) echo "fresh-check: unknown argument '$1' (--ref REF, --keep, --log LOG)" >&2; exit 2 ;;
    esac
done
commit=$(git -C "$ROOT" rev-parse --verify "$ref^{commit}")
stamp=$(date -u +%Y%m%dT%H%M%SZ)
[ -n "$log" ] || log=$ROOT/target/fresh-check/fresh-check-$stamp.log
mkdir -p "$(dirname "$log")"
log=$(cd "$(dirname "$log")" && pwd)/$(basename "$log")
if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ] && [ "$ref" = HEAD ]; then
    echo "fresh-check: note: the working tree has uncommitted changes; they are not part of the check" >&2
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/lumos-fresh.XXXXXX")
clone=$work/lumos
say() { echo "$*" | tee -a "$log"; }
: >"$log"
# interrupted or failed before the end: say so and keep what there is
on_abort() {
    local name
    for name in demo test; do [ -f "$work/$name.log" ] && cp "$work/$name.log" "${log%.log}-$name.log"; done
    say "fresh-check: ABORTED before the end ($1); the clone and the logs are kept in $work"
    exit 1
}
trap 'on_abort interrupted' INT TERM
trap 'on_abort "a step of the check itself failed"' ERR
say "fresh-check: commit $commit ($(git -C "$ROOT" log -1 --format=%s "$commit" | cut -c1-80))"
say "fresh-check: clone in $clone; started $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n) ($(nproc) cores)"
git clone --quiet --no-local --no-checkout "$ROOT" "$clone"
git -C "$clone" checkout --quiet --detach "$commit"
# the project's shared folder sits beside a checkout (as CI lays it out); link it if there is one
[ -e "$ROOT/../shared" ] && ln -s "$(cd "$ROOT/../shared" && pwd)" "$work/shared"

# an environment like a new shell's: nothing that points into this checkout's build or a
# virtual environment, no build or install settings (torch-sys, cargo, rustc, pip, Python),
# and a PATH without this checkout's folders or an activated venv
clean_env=(env -u CARGO_TARGET_DIR -u VIRTUAL_ENV -u LD_LIBRARY_PATH -u LD_PRELOAD)
while IFS= read -r name; do clean_env+=(-u "$name"); done < <(env | sed -n \
    's/^\(\(LUMOS\|LIBTORCH\|TORCH\|PIP\|PYTHON\|CARGO_BUILD\|CARGO_PROFILE\|RUSTFLAGS\|RUSTDOCFLAGS\|UV\)[A-Za-z0-9_]*\)=.*/\1/p')
clean_path=$(printf '%s' "$PATH" | tr ':' '\n' | grep -v -e "^$ROOT\(/\|$\)" ${VIRTUAL_ENV:+-e "^$VIRTUAL_ENV/"} | paste -sd: -)
clean_env+=(PATH="$clean_path")

status=0
run() {
    local name=$1
    shift
    local out=$work/$name.log t0 t1 rc
    say "fresh-check: $name: $* (log: $out)"
    t0=$(date +%s)
    rc=0
    (cd "$clone" && "${clean_env[@]}" "$@") >"$out" 2>&1 </dev/null || rc=$?
    t1=$(date +%s)
    say "fresh-check: $name: exit $rc after $(( (t1 - t0) / 60 )) min $(( (t1 - t0) % 60 )) s"
    if [ "$rc" != 0 ]; then
        status=1
        say "fresh-check: $name: last lines of its log:"
        tail -40 "$out" | sed 's/^/  | /' | tee -a "$log"
    fi
}
run demo ./scripts/demo.sh
run test ./scripts/test.sh
# the closing lines of each command's output: the demo's report and the test runners' totals
for name in demo test; do
    say "fresh-check: $name: summary lines:"
    grep -E "^(test result:|fresh|Dice|demo:|[0-9]+ passed|=+ .*(passed|failed|error)|.*PASS)|passed in|tests? run|^OK \(" \
        "$work/$name.log" | tail -30 | sed 's/^/  | /' | tee -a "$log" || true
done
for name in demo test; do cp "$work/$name.log" "${log%.log}-$name.log"; done
say "fresh-check: full logs: ${log%.log}-demo.log, ${log%.log}-test.log"
t_end=$(date -u +%Y-%m-%dT%H:%M:%SZ)
if [ "$status" = 0 ]; then
    say "fresh-check: PASSED (both commands exit 0), finished $t_end"
    if [ "$keep" = 0 ]; then rm -rf "$work"; else say "fresh-check: kept $work"; fi
else
    say "fresh-check: FAILED, finished $t_end; the clone and the logs are kept in $work"
fi
say "fresh-check: summary written to $log"
exit "$status"
