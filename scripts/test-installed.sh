#!/usr/bin/env bash
# Tests the release artefacts as a user installs them (scripts/test.sh runs it after the
# other tests; scripts/release.sh makes DIST):
#   scripts/test-installed.sh [DIST [PART ...]]   DIST defaults to dist/; PART: python, fiji,
#                                                 sdk (default: all three, and the dist check)
# 1. dist/ itself: SHA256SUMS, the version in every name, no absolute path in any shipped
#    binary (scripts/release.py check).
# 2. Python: a fresh venv, outside the checkout, with no cargo on PATH and the checkout on
#    neither sys.path nor LD_LIBRARY_PATH: pip installs the lumos wheel (with the onednn
#    extra), the napari_lumos wheel and napari[pyqt5] from PyPI (at the versions of
#    requirements/test.lock); then a real job (tests/installed/job.py), a cold start
#    timed to the first segmentation, `npe2 list`, the napari plugin's own tests against the
#    installed packages, and broken installations (no torch, another torch, a missing or
#    damaged liblumos.so) that must give a clear message.
# 3. Fiji: the bundle unzipped over a fresh ImageJ folder, menu commands run headless by
#    macro (fiji-plugin/test-bundle.sh).
# 4. C/C++: the SDK unpacked into a temporary folder and its example built out of tree with
#    plain CMake and with pkg-config, then run (sdk/test.sh).
# Timings go to target/installed/timings.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIST=$(cd "${1:-dist}" && pwd)
[ $# -gt 0 ] && shift
parts=${*:-check python fiji sdk}
part() { [[ " $parts " == *" $1 "* ]]; }
# the fresh venvs are made with the interpreter .venv was made with (the lock's Python)
PY=${LUMOS_INSTALL_PYTHON:-$(.venv/bin/python -c 'import sys; print(sys._base_executable)')}
command -v "$PY" >/dev/null || { echo "test-installed: $PY not found (the lock's Python)" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
mkdir -p target/installed
work=$(mktemp -d /tmp/lumos-installed.XXXXXX)
[ -n "${LUMOS_INSTALLED_KEEP:-}" ] && echo "test-installed: keeping $work" || trap 'rm -rf "$work"' EXIT
t0=$(date +%s)
elapsed() { echo $(($(date +%s) - t0)); }

install_s=null dl_lumos=null dl_napari=null job=null cold=null python_s=null fiji_s=null sdk_s=null
if part check; then
    echo "test-installed: dist/ ($DIST)"
    .venv/bin/python scripts/release.py check --out "$DIST"
fi

if part python; then

    whl=$(ls "$DIST"/lumos-"$version"-*.whl)
    napari_whl=$(ls "$DIST"/napari_lumos-"$version"-*.whl)
    # the versions pip may pick: those of the lock (what the tests ran with), without hashes,
    # as constraints; the wheels it needs are downloaded once into target/wheelhouse
    .venv/bin/python - "$work/constraints.txt" <<'EOF'
import sys
sys.path.insert(0, "scripts")
import pylock
lock = pylock.read_lock("requirements/test.lock")
open(sys.argv[1], "w").write("".join(f"{n}=={v}\n" for n, (v, _) in sorted(lock.items())))
EOF
    want=("$whl[onednn]" "$napari_whl" "napari[pyqt5]" npe2 pytest pytest-qt pytest-xvfb)
    "$PY" -m venv "$work/venv"
    "$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$work/constraints.txt" pip >/dev/null
    echo "test-installed: downloading what pip install needs into target/wheelhouse (once)"
    "$work/venv/bin/python" -m pip download --quiet --disable-pip-version-check --only-binary :all: \
        -c "$work/constraints.txt" -d target/wheelhouse --find-links target/wheelhouse "${want[@]}"
    rm -f target/wheelhouse/lumos-*.whl target/wheelhouse/napari_lumos-*.whl

    # the user's environment: a clean one, without the checkout, cargo or any LUMOS_* setting
    clean_path=$work/venv/bin:/usr/local/bin:/usr/bin:/bin
    user() {
        (cd "$work/home" && env -i HOME="$work/home" PATH="$clean_path" LANG=C.UTF-8 TMPDIR="$work/tmp" \
            ${DISPLAY:+DISPLAY=$DISPLAY} "$@")
    }
    mkdir -p "$work/home" "$work/tmp"
    if user sh -c 'command -v cargo rustc' >/dev/null; then
        echo "test-installed: cargo is on the clean PATH ($clean_path)" >&2
        exit 1
    fi
    t=$(date +%s)
    user python -m pip install --quiet --disable-pip-version-check --no-index --find-links "$ROOT/target/wheelhouse" \
        -c "$work/constraints.txt" "${want[@]}"
    install_s=$(($(date +%s) - t))
    user python -m pip check
    # what a user downloads: the files of the install, without the test tools, for the
    # lumos wheel alone and with the napari plugin (PyPI's torch: the CUDA build)
    download_mb() {
        user python -m pip install --quiet --disable-pip-version-check --dry-run --ignore-installed --no-index \
            --find-links "$ROOT/target/wheelhouse" -c "$work/constraints.txt" --report - "$@" |
            python3 -c 'import json, sys, os, urllib.parse as u
r = json.load(sys.stdin)["install"]
print(round(sum(os.path.getsize(u.unquote(u.urlparse(i["download_info"]["url"]).path)) for i in r) / 1e6))'
    }
    dl_lumos=$(download_mb "$whl[onednn]")
    dl_napari=$(download_mb "$whl[onednn]" "$napari_whl" "napari[pyqt5]")
    echo "test-installed: a user downloads $dl_lumos MB for the lumos wheel with torch (CUDA, PyPI) and oneDNN," \
        "$dl_napari MB with napari_lumos and napari[pyqt5]"
    echo "test-installed: pip install of the two wheels, napari[pyqt5] and the test tools: ${install_s} s" \
        "(from target/wheelhouse; $(du -sh "$work/venv" | cut -f1) installed)"
    user lumos --version | grep -qx "lumos $version" || { echo "test-installed: lumos --version is not lumos $version" >&2; exit 1; }

    echo "test-installed: a real job through the installed wheel"
    mkdir -p "$work/job"
    cp tests/installed/*.py "$work/job/"
    job=$(user python "$work/job/job.py" "$work/job/out" "$ROOT")
    echo "  $job"
    cold=$(user python "$work/job/first_segment.py" "$work/job/out/dmqpm.lumos")
    echo "  cold start: $cold"

    echo "test-installed: napari"
    user npe2 list | grep -q "napari-lumos" || { echo "test-installed: npe2 list does not show napari-lumos" >&2; exit 1; }
    cp -r napari-plugin/tests "$work/napari-tests"
    user env LUMOS_SCREENSHOTS="$work/shots" python -m pytest -q -p no:cacheprovider -o xvfb_width=1600 \
        -o xvfb_height=1000 "$work/napari-tests"

    echo "test-installed: broken installations"
    site=$(user python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$PY" -m venv "$work/bare"
    bare=$work/bare/bin
    # the wheel without its torch dependency (--no-deps): what a partial install leaves
    "$bare/python" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$ROOT/target/wheelhouse" \
        -c "$work/constraints.txt" numpy
    "$bare/python" -m pip install --quiet --disable-pip-version-check --no-deps "$whl"
    bare_site=$("$bare/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    broken() { (cd "$work/home" && env -i HOME="$work/home" PATH="$bare:/usr/bin:/bin" "$bare/python" "$work/job/broken.py" "$@"); }
    broken import "torch is not installed" "pip install torch==" >/dev/null
    out=$(cd "$work/home" && env -i PATH="$bare:/usr/bin:/bin" "$bare/lumos" --version 2>&1) && {
        echo "test-installed: lumos --version worked without torch" >&2; exit 1; }
    grep -q "pip install torch==" <<<"$out" || { echo "test-installed: lumos without torch said: $out" >&2; exit 1; }
    # another torch version (its metadata only: the check runs before anything is loaded)
    mkdir -p "$bare_site/torch-2.10.0.dist-info" "$bare_site/torch"
    printf 'Metadata-Version: 2.1\nName: torch\nVersion: 2.10.0\n' >"$bare_site/torch-2.10.0.dist-info/METADATA"
    touch "$bare_site/torch/__init__.py"
    broken import "built against torch" "2.10.0 is" >/dev/null
    # the right version without its libraries
    mv "$bare_site/torch-2.10.0.dist-info" "$bare_site/torch-2.11.0.dist-info"
    sed -i 's/2.10.0/2.11.0/' "$bare_site/torch-2.11.0.dist-info/METADATA"
    broken import "libtorch_cpu.so" >/dev/null
    # the full install, with liblumos.so damaged, then missing
    cp "$site/lumos/liblumos.so" "$work/liblumos.so.good"
    head -c 4096 "$work/liblumos.so.good" | tail -c 2048 >"$site/lumos/liblumos.so"
    user python "$work/job/broken.py" import "cannot load" "reinstall lumos" >/dev/null
    user env QT_QPA_PLATFORM=offscreen python "$work/job/broken.py" napari "cannot load" >/dev/null
    rm "$site/lumos/liblumos.so"
    user python "$work/job/broken.py" import "liblumos.so is missing" "pip install --force-reinstall" >/dev/null
    cp "$work/liblumos.so.good" "$site/lumos/liblumos.so"
    # libtorch removed under the library: the loader's message is translated
    mv "$site/torch/lib/libc10.so" "$work/libc10.so"
    user python "$work/job/broken.py" import "needs libc10.so" "torch==" >/dev/null
    mv "$work/libc10.so" "$site/torch/lib/libc10.so"
    echo "  no torch, torch 2.10.0, torch without libtorch, a damaged and a missing liblumos.so, a missing libc10.so:" \
        "each named, napari kept running"
    python_s=$(elapsed)
fi

if part fiji; then
    echo "test-installed: Fiji / ImageJ bundle"
    t=$(date +%s)
    # simulated data from the installed CLI when the Python part ran, else the staged one
    cli=$work/venv/bin/lumos
    [ -x "$cli" ] || cli=
    LUMOS_CLI=$cli ./fiji-plugin/test-bundle.sh "$DIST/lumos-fiji-$version.zip"
    fiji_s=$(($(date +%s) - t))
fi

if part sdk; then
    echo "test-installed: C/C++ SDK"
    t=$(date +%s)
    PATH="$ROOT/.venv/bin:$PATH" ./sdk/test.sh "$DIST/lumos-sdk-$version-linux-x86_64.tar.gz"
    sdk_s=$(($(date +%s) - t))
fi

cat >target/installed/timings.json <<EOF
{"version": "$version", "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "machine": "$(nproc) cores, $(uname -m)",
 "pip_install_s": $install_s, "download_mb_lumos": $dl_lumos, "download_mb_lumos_napari": $dl_napari, "job": $job, "cold_start": $cold,
 "python_total_s": $python_s, "fiji_s": $fiji_s, "sdk_s": $sdk_s}
EOF
echo "test-installed: every artefact installed and ran ($(elapsed) s; target/installed/timings.json)"
