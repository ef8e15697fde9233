#!/usr/bin/env bash
# Installs what lumos needs to build and test, when missing or not as locked; a no-op when
# everything matches. Every Python package comes at the exact version and sha256 of a lock
# file (requirements/README.md says how to update them):
# - libtorch (CPU + CUDA libraries) from the PyPI torch wheel into .libtorch/ (git-ignored),
#   as tch expects; .cargo/config.toml points torch-sys at it. Pins: requirements/build.lock.
# - oneDNN 3.2 (libdnnl.so.3, GNU OpenMP build) from the PyPI wheel onednn-cpu-gomp into
#   .onednn/lib (git-ignored): the blocked-layout training convolutions (src/nn/onednn.rs)
#   load it at run time; without it training runs libtorch's convolutions (slower on CPU).
#   Pin: requirements/build.lock.
# - a C and C++ compiler for the C API tests.
# - the host applications (Debian packages) and the Python environment .venv of the plugin
#   tests; .venv is brought to requirements/test.lock exactly (see below).
#
#   scripts/bootstrap.sh             everything the tests need (host packages as root with apt)
#   scripts/bootstrap.sh --minimal   only what building and running the engine needs (cargo,
#                                    compilers, libtorch): what scripts/demo.sh uses
set -euo pipefail
cd "$(dirname "$0")/.."

minimal=0
case "${1:-}" in
    --minimal) minimal=1 ;;
    "") ;;
    *) echo "bootstrap: unknown option '$1' (--minimal or nothing)" >&2; exit 2 ;;
esac

BUILD_LOCK=requirements/build.lock
TEST_LOCK=requirements/test.lock

if ! command -v cargo >/dev/null 2>&1; then
    if [ -n "${HOME:-}" ] && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "bootstrap: cargo (Rust >= 1.85) is required; install it with rustup" >&2
        exit 1
    fi
fi

missing_pkgs=()
command -v gcc >/dev/null 2>&1 || missing_pkgs+=(gcc)
command -v g++ >/dev/null 2>&1 || missing_pkgs+=(g++)
if ! command -v python3 >/dev/null 2>&1; then
    missing_pkgs+=(python3 python3-pip python3-venv)
else
    # Debian and Ubuntu ship python3 without pip and without venv's ensurepip
    python3 -m pip --version >/dev/null 2>&1 || missing_pkgs+=(python3-pip)
    [ "$minimal" = 1 ] || python3 -c "import ensurepip" >/dev/null 2>&1 || missing_pkgs+=(python3-venv)
fi
if [ ${#missing_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing ${missing_pkgs[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_pkgs[@]}" >/dev/null
    else
        echo "bootstrap: please install ${missing_pkgs[*]}" >&2
        exit 1
    fi
fi

# libtorch: the marker holds the locked entries it was installed from, so a changed lock
# (another torch, or another hash) installs it again
want_libtorch=$(python3 scripts/pylock.py extract "$BUILD_LOCK" torch nvidia-cuda-runtime nvidia-cuda-cupti)
MARKER=.libtorch/.lumos-lock
if [ ! -f .libtorch/torch/lib/libtorch_cpu.so ] || [ "$(cat "$MARKER" 2>/dev/null)" != "$want_libtorch" ]; then
    torch_version=$(python3 scripts/pylock.py version "$BUILD_LOCK" torch)
    echo "bootstrap: installing libtorch $torch_version from the PyPI torch wheel into .libtorch (about 1.2 GB) ..."
    tmp=$(mktemp -d .libtorch-partial.XXXXXX)
    req=$(mktemp)
    trap 'rm -rf "$tmp" "$req"' EXIT
    printf '%s\n' "$want_libtorch" >"$req"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes --target "$tmp" -r "$req"
    rm -f "$req"
    rm -rf .libtorch
    mv "$tmp" .libtorch
    trap - EXIT
    printf '%s\n' "$want_libtorch" >"$MARKER"
    echo "bootstrap: libtorch ready in .libtorch"
fi

want_onednn=$(python3 scripts/pylock.py extract "$BUILD_LOCK" onednn-cpu-gomp)
if [ ! -f .onednn/lib/libdnnl.so.3 ] || [ "$(cat .onednn/.lumos-lock 2>/dev/null)" != "$want_onednn" ]; then
    echo "bootstrap: installing oneDNN 3.2 ($(grep -o '^onednn-cpu-gomp==[^ ]*' "$BUILD_LOCK") from PyPI) into .onednn (about 55 MB) ..."
    tmp=$(mktemp -d .onednn-partial.XXXXXX)
    trap 'rm -rf "$tmp"' EXIT
    printf '%s\n' "$want_onednn" >"$tmp/req.txt"
    # only the library: its headers are the ones libtorch ships (the same oneDNN 3.x C API)
    if python3 -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes --dest "$tmp" \
        -r "$tmp/req.txt" &&
        python3 - "$tmp" <<'PY'
import glob, os, sys, zipfile
d = sys.argv[1]
(whl,) = glob.glob(os.path.join(d, "*.whl"))
with zipfile.ZipFile(whl) as z:
    (name,) = [n for n in z.namelist() if n.endswith("/lib/libdnnl.so.3.2")]
    os.makedirs(os.path.join(d, "lib"))
    out = os.path.join(d, "lib", "libdnnl.so.3")
    with z.open(name) as src, open(out, "wb") as dst:
        dst.write(src.read())
    os.chmod(out, 0o755)
PY
    then
        rm -rf .onednn
        mkdir .onednn
        mv "$tmp/lib" .onednn/lib
        printf '%s\n' "$want_onednn" >.onednn/.lumos-lock
        echo "bootstrap: oneDNN ready in .onednn"
    else
        if [ "$minimal" = 0 ]; then
            # the tests require it (scripts/test.sh sets LUMOS_REQUIRE_ONEDNN)
            rm -rf "$tmp"
            echo "bootstrap: could not install oneDNN ($BUILD_LOCK) into .onednn; the tests need it" >&2
            exit 1
        fi
        echo "bootstrap: WARNING: could not install oneDNN; training will use libtorch's convolutions" >&2
    fi
    rm -rf "$tmp"
    trap - EXIT
fi

if [ "$minimal" = 1 ]; then
    exit 0
fi

# Host applications for the plugin tests, listed in requirements/debian.txt (apt, as root;
# otherwise the script stops and names them, since the test command needs them; the engine
# alone needs --minimal only): Xvfb + Mesa + the X client libraries Qt needs (napari),
# ImageJ 1 + JNA + JUnit 4 (the Fiji plugin) and a JDK; gcc's AddressSanitizer comes with gcc.
host_pkgs=()
while read -r pkg _; do
    # the JDK listed is the one tested; any JDK that provides javac will do
    case "$pkg" in ''|'#'*|openjdk-*) ;; *) host_pkgs+=("$pkg") ;; esac
done <requirements/debian.txt
command -v javac >/dev/null 2>&1 || host_pkgs+=(default-jdk-headless)
missing_host=()
for p in "${host_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing_host+=("$p")
done
if [ ${#missing_host[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing host-application test packages: ${missing_host[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_host[@]}" >/dev/null
    else
        echo "bootstrap: please install ${missing_host[*]} (needed by the napari and Fiji plugin tests)" >&2
        exit 1
    fi
fi

# The Python environment .venv (git-ignored) of the tests, the plugins and the benchmarks'
# peers: exactly requirements/test.lock (numpy + pytest for the binding; napari with PyQt5,
# pytest-qt, pytest-xvfb and npe2 for the plugin; torch, bioimageio.core and .spec for the
# bioimage.io export; dask, distributed and zarr for the scale-out; about 5.5 GB), then
# the binding and the plugin installed editable, so napari discovers the plugin through
# its entry point. A .venv that does not match the lock is brought to it: packages at
# another version are reinstalled at the locked one, packages missing are installed and
# packages the lock does not name are removed.
lock_python=$(python3 scripts/pylock.py python "$TEST_LOCK")
python_for_venv=
for candidate in "python$lock_python" python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
        [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$lock_python" ]; then
        python_for_venv=$candidate
        break
    fi
done
if [ -z "$python_for_venv" ]; then
    echo "bootstrap: $TEST_LOCK is resolved for Python $lock_python, and neither python$lock_python nor python3" \
        "is Python $lock_python (python3 is $(python3 --version 2>&1)): install Python $lock_python, or" \
        "resolve the lock for this Python (PYTHON_VERSION in scripts/lock.sh)" >&2
    exit 1
fi
venv_python=
[ -x .venv/bin/python ] && venv_python=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
if ! .venv/bin/python -m pip --version >/dev/null 2>&1 || [ "$venv_python" != "$lock_python" ]; then
    # absent, left broken by an earlier failed creation (a venv without pip), or made by
    # another Python than the lock's
    echo "bootstrap: creating .venv with $python_for_venv ..."
    rm -rf .venv
    if ! "$python_for_venv" -m venv .venv; then
        rm -rf .venv
        if ! { "$python_for_venv" -m pip install --quiet virtualenv && "$python_for_venv" -m virtualenv -q .venv; }; then
            rm -rf .venv
            echo "bootstrap: cannot create .venv: install python3-venv (Debian/Ubuntu) or virtualenv" >&2
            exit 1
        fi
    fi
fi
if ! report=$(.venv/bin/python scripts/pylock.py check "$TEST_LOCK"); then
    echo "bootstrap: .venv does not match $TEST_LOCK ($(printf '%s\n' "$report" | wc -l) differences); updating it:"
    printf '%s\n' "$report" | sed -n '1,20s/^/  /p'
    # first remove what the lock does not name and what is broken: an uninstall deletes
    # every file of its record, so run after the install it could delete files that a
    # locked package has just written to the same paths (nvidia-*-cu12 and -cu13 share them)
    remove=$(printf '%s\n' "$report" | sed -n 's/^\(not in the lock\|broken\): \([^=]*\)==.*/\2/p')
    if [ -n "$remove" ]; then
        # shellcheck disable=SC2086
        .venv/bin/python -m pip uninstall --quiet --disable-pip-version-check -y $remove
    fi
    # --no-deps: the lock names every dependency; the hashes make pip refuse any other file
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
        -r "$TEST_LOCK"
    if ! report=$(.venv/bin/python scripts/pylock.py check "$TEST_LOCK"); then
        echo "bootstrap: .venv still differs from $TEST_LOCK after the update:" >&2
        printf '%s\n' "$report" >&2
        exit 1
    fi
    .venv/bin/python -m pip check >/dev/null || {
        echo "bootstrap: the locked packages conflict (pip check):" >&2
        .venv/bin/python -m pip check >&2 || true
        exit 1
    }
    echo "bootstrap: $report"
fi
# (the binding's distribution was called lumos-bindings before 0.1.0 shipped as a wheel:
# an editable install under that name is replaced)
if .venv/bin/python -m pip show lumos-bindings >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall --quiet --disable-pip-version-check -y lumos-bindings
fi
if ! .venv/bin/python -c "import importlib.metadata as m, napari_lumos, lumos; m.version('lumos')" >/dev/null 2>&1 ||
    [ ! -x .venv/bin/lumos ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
        -e bindings/python -e napari-plugin
fi
