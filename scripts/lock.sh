#!/usr/bin/env bash
# Regenerates the Python lock files from their inputs with uv (a pinned uv, in a throwaway venv):
#   requirements/test.in  -> requirements/test.lock   .venv: tests, plugins, benchmarks' peers
#   requirements/build.in -> requirements/build.lock  libtorch (.libtorch) and oneDNN (.onednn)
# Resolved for CPython 3.11 on manylinux x86-64, wheels only, every file with its sha256.
# An existing lock is the starting point: a run changes only what the inputs require.
# Extra arguments go to `uv pip compile`, for example:
#   scripts/lock.sh                          after editing a .in file
#   scripts/lock.sh --upgrade-package dask   move one package (and what it needs) to its newest
#   scripts/lock.sh --upgrade                move everything to the newest allowed
# Then run scripts/bootstrap.sh (it brings .venv to the new lock) and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
PYTHON_VERSION=3.11
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
compile() {
    "$tools/venv/bin/uv" pip compile --quiet --python-version "$PYTHON_VERSION" \
        --python-platform x86_64-manylinux_2_28 --generate-hashes --no-build \
        --custom-compile-command "scripts/lock.sh (uv $UV_VERSION pip compile --python-version $PYTHON_VERSION --python-platform x86_64-manylinux_2_28 --generate-hashes --no-build)" "$@"
}
compile requirements/test.in -o requirements/test.lock "${@}"
# the build's libtorch is the tests' torch: build.in takes its versions from test.lock
compile requirements/build.in --no-deps -c requirements/test.lock -o requirements/build.lock "${@}"
echo "lock.sh: requirements/test.lock and requirements/build.lock written; next: scripts/bootstrap.sh"
