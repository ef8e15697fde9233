#!/usr/bin/env bash
# Usage: fiji-plugin/test-bundle.sh ZIP   (ZIP: fiji-plugin/bundle.sh's lumos-fiji-VERSION.zip)
# Tests the Fiji/ImageJ bundle as installed: a fresh ImageJ (Debian's ij.jar as
# TMP/Fiji.app/ij.jar, an empty plugins/) with ZIP unzipped over TMP, run from TMP with no
# lumos.library, no LUMOS_LIBRARY and no LD_LIBRARY_PATH, so everything comes from the bundle.
# 1. job: ImageJ -batch runs tests/bundle.ijm, which calls the menu commands as a user's macro
#    would (About lumos, Lumos Train, Segment, Decompose) and checks their outputs. ImageJ 1's
#    -batch cannot run menu commands with java.awt.headless=true (building its AWT menus throws
#    HeadlessException), so this runs under Xvfb, like test.sh. LD_DEBUG=files on the java
#    process says which libraries it loaded: each shipped library but libdnnl.so.3 (optional)
#    must come from Fiji.app/lib/linux64, and no libtorch/CUDA library from anywhere else.
# 2. headless: java.awt.headless=true, the plugins through IJ.runPlugIn (About, Segment).
# 3. bad install: a copy without lib/linux64/libc10.so; About lumos must log the loader's
#    message naming libc10.so and ImageJ must exit normally.
# Simulated data come from the lumos CLI (LUMOS_CLI; default target/stage/lumos with
# LD_LIBRARY_PATH=target/stage/torch for that step only). LUMOS_BUNDLE_WORK keeps the work folder.
set -euo pipefail
export LC_ALL=C
[ $# -eq 1 ] || { echo "usage: $0 ZIP" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
ZIP=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
IJ_JAR=${IJ_JAR:-/usr/share/java/ij.jar}
MACRO=$HERE/tests/bundle.ijm
EPOCHS=${LUMOS_BUNDLE_EPOCHS:-8}
[ -f "$ZIP" ] || { echo "test-bundle.sh: $ZIP not found" >&2; exit 1; }
start=$(date +%s.%N)
step=$start
# LAP: seconds since the last call (not in a subshell: it moves the mark)
lap() { local now; now=$(date +%s.%N); LAP=$(printf '%.1f' "$(echo "$now - $step" | bc)"); step=$now; }
failures=0
ok() { echo "ok   $*"; }
bad() { echo "FAIL $*"; failures=$((failures + 1)); }

work=${LUMOS_BUNDLE_WORK:-$(mktemp -d)}
[ -n "${LUMOS_BUNDLE_WORK:-}" ] || trap 'rm -rf "$work"' EXIT
mkdir -p "$work"
work=$(cd "$work" && pwd)
case $work/ in "$ROOT"/*) echo "test-bundle.sh: the work folder must be outside $ROOT" >&2; exit 1 ;; esac

echo "test-bundle.sh: $ZIP ($(du -h "$ZIP" | cut -f1))"
# the zip's layout: everything under Fiji.app/, the jars, the libraries, no CUDA compute library
# (grep the listing in a file: grep -q on a pipe would end unzip early, a failure under pipefail)
unzip -Z1 "$ZIP" >"$work/zip.txt"
outside=$(grep -v '^Fiji\.app/' "$work/zip.txt" || true)
[ -z "$outside" ] && ok "every entry is under Fiji.app/" || bad "entries outside Fiji.app/: $outside"
VERSION=$(sed -n 's|^Fiji\.app/plugins/Lumos_Fiji-\(.*\)\.jar$|\1|p' "$work/zip.txt")
[ -n "$VERSION" ] || { echo "test-bundle.sh: no Fiji.app/plugins/Lumos_Fiji-VERSION.jar in $ZIP" >&2; exit 1; }
for f in "jars/lumos-java-$VERSION.jar" lib/linux64/liblumos.so lib/linux64/libtorch_cpu.so lib/linux64/libc10.so \
        lib/linux64/LICENSES/THIRD-PARTY.md README-lumos.md; do
    grep -qx "Fiji\.app/$f" "$work/zip.txt" && ok "the zip holds Fiji.app/$f" || bad "the zip holds Fiji.app/$f"
done
grep -q '^Fiji\.app/jars/jna-.*\.jar$' "$work/zip.txt" && ok "the zip holds JNA" || bad "the zip holds JNA"
cuda=$(grep -E '/(libtorch_cuda|libc10_cuda|libcudnn|libcublas|libcufft|libcurand|libcusparse|libnccl)' "$work/zip.txt" || true)
[ -z "$cuda" ] && ok "no CUDA compute library" || bad "CUDA compute libraries: $cuda"

# a fresh ImageJ, then the bundle unzipped over it
app=$work/Fiji.app
mkdir -p "$app/plugins"
cp "$IJ_JAR" "$app/ij.jar"
unzip -q -o "$ZIP" -d "$work"
runpath=$(readelf -d "$app/lib/linux64/liblumos.so" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p')
[ "$runpath" = '$ORIGIN' ] && ok "liblumos.so's RUNPATH is \$ORIGIN" || bad "liblumos.so's RUNPATH is '$runpath'"
lap
echo "test-bundle.sh: installed into $app in $LAP s"

# simulated data, from the CLI (the only step that uses the checkout)
data=$work/data
if [ -n "${LUMOS_CLI:-}" ]; then
    cli() { "$LUMOS_CLI" "$@"; }
else
    cli() { LD_LIBRARY_PATH="$ROOT/target/stage/torch" "$ROOT/target/stage/lumos" "$@"; }
fi
cli simulate ssqpm --out "$data/ssqpm" --train 3 --test 0 --size 64 --seed 1 >/dev/null
cli simulate ssqpm --out "$data/ssqpm-image" --train 1 --test 0 --size 128 --seed 9 >/dev/null
cli simulate fluo --out "$data/fluo" --train 2 --test 0 --size 64 --seed 1 >/dev/null
cli simulate fluo --out "$data/fluo-image" --train 1 --test 0 --size 128 --seed 9 >/dev/null
image=$data/ssqpm-image/train/images/$(ls "$data/ssqpm-image/train/images" | head -1)
fluo_image=$data/fluo-image/train/inputs/$(ls "$data/fluo-image/train/inputs" | head -1)
args() { echo "$1,$work,$data/ssqpm/train,$image,$data/fluo/train,$fluo_image,$EPOCHS"; }
lap
echo "test-bundle.sh: simulated the data in $LAP s"

# ImageJ as a user starts it: from outside the checkout, nothing pointing at a library
run_ij() { # MODE DIR [java options...]: ImageJ -batch in DIR; stdout to WORK/MODE.out, stderr WORK/MODE.err
    local mode=$1 dir=$2
    shift 2
    (cd "$dir" && env -u LD_LIBRARY_PATH -u LUMOS_LIBRARY -u LD_PRELOAD timeout 600 "$@" \
        "$work/$mode.err" -jar Fiji.app/ij.jar -ijpath Fiji.app -batch "$MACRO" "$(args "$mode")") >"$work/$mode.out"
}
# java with its stderr (the LD_DEBUG trace) to $1
cat >"$work/java-ld-debug" <<'EOF'
#!/bin/sh
err=$1; shift
LD_DEBUG=files exec java "$@" 2>"$err"
EOF
cat >"$work/java-headless" <<'EOF'
#!/bin/sh
err=$1; shift
exec java -Djava.awt.headless=true -Dplugins.dir=Fiji.app "$@" 2>"$err"
EOF
chmod +x "$work/java-ld-debug" "$work/java-headless"
check_result() { # MODE: the macro's own lines, and its final PASS
    local r=$work/result-$1.txt
    [ -f "$r" ] || { bad "the $1 macro wrote no result"; return; }
    sed 's/^/    /' "$r"
    grep -q "^PASS bundle $1\$" "$r" && ok "the $1 macro passed" || bad "the $1 macro passed"
}

# 1. the job
rc=0
run_ij job "$work" xvfb-run -a -s "-screen 0 1280x1024x24" "$work/java-ld-debug" || rc=$?
lap
echo "test-bundle.sh: the job (Xvfb, -batch) ran in $LAP s, exit code $rc"
[ "$rc" = 0 ] && ok "ImageJ exited normally" || bad "ImageJ exited with $rc"
check_result job
about="lumos: plugin $VERSION, binding $VERSION, library $VERSION, C ABI 1, CUDA not available, library file $app/lib/linux64/liblumos.so"
grep -qxF "$about" "$work/job.out" && ok "About lumos: ${about#lumos: }" || bad "About lumos logged '$about'"
grep -q 'lumos: warning' "$work/job.out" && bad "About lumos warned: $(grep 'lumos: warning' "$work/job.out")" || true
grep -q "which does not segment" "$work/job.out" && ok "the wrong model's error went to the Log" \
    || bad "the wrong model's error went to the Log"
grep -q 'Exception' "$work/job.out" && bad "an exception in ImageJ's output: $(grep -m3 Exception "$work/job.out")" || true

# which libraries the job loaded (ld.so calls each loaded object's initialisers once)
sed -n 's/^ *[0-9]*:[[:space:]]*calling init: //p' "$work/job.err" | sort -u >"$work/loaded.txt"
lib=$app/lib/linux64
echo "test-bundle.sh: loaded from Fiji.app/lib/linux64:"
grep "^$lib/" "$work/loaded.txt" | sed "s|^$lib/|    |"
echo "test-bundle.sh: loaded from elsewhere (not the JVM's or the system's C/X11 libraries):"
grep -v "^$lib/" "$work/loaded.txt" | grep -Ev '^(/usr/lib/jvm/|/lib/x86_64-linux-gnu/|/lib64/|/usr/lib/x86_64-linux-gnu/lib[^/]*$)' \
    | sed 's/^/    /' || true
strays=$(grep -v "^$lib/" "$work/loaded.txt" \
    | grep -E '/lib(torch|c10|cuda|cudart|cupti|cudnn|cublas|cufft|curand|cusparse|cusolver|nccl|nvrtc|nvJitLink|nvToolsExt|dnnl|gomp|lumos)[^/]*$' || true)
[ -z "$strays" ] && ok "no libtorch/CUDA library came from outside the bundle" \
    || bad "libtorch/CUDA libraries loaded from outside the bundle: $strays"
for f in $(cd "$lib" && ls -1 ./*.so* | sed 's|^\./||'); do
    if grep -qx "$lib/$f" "$work/loaded.txt"; then
        ok "loaded the bundle's $f"
    elif [ "$f" = libdnnl.so.3 ]; then
        echo "note libdnnl.so.3 was not loaded (oneDNN: only CPU training of convolutions with multiples of 16 channels)"
    else
        bad "the bundle's $f was never loaded"
    fi
done

# 2. truly headless: no menus, the plugin classes through IJ.runPlugIn (model from the job)
rc=0
run_ij headless "$work" "$work/java-headless" || rc=$?
lap
echo "test-bundle.sh: the headless run took $LAP s, exit code $rc"
[ "$rc" = 0 ] && ok "headless ImageJ exited normally" || bad "headless ImageJ exited with $rc"
check_result headless
grep -qxF "$about" "$work/headless.out" && ok "headless About lumos logged the same report" \
    || bad "headless About lumos logged '$about'"

# 3. a bad install: libc10.so missing (a hard-linked copy, without it)
mkdir -p "$work/bad"
cp -al "$app" "$work/bad/Fiji.app"
rm "$work/bad/Fiji.app/lib/linux64/libc10.so"
rc=0
run_ij about "$work/bad" xvfb-run -a "$work/java-ld-debug" || rc=$?
lap
echo "test-bundle.sh: the bad install's About ran in $LAP s, exit code $rc"
[ "$rc" = 0 ] && ok "ImageJ exited normally without libc10.so" || bad "ImageJ exited with $rc without libc10.so"
check_result about
message=$(grep -m1 'lumos: the lumos native library cannot be loaded' "$work/about.out" || true)
if [ -n "$message" ]; then
    echo "    $message"
    case $message in
        *libc10.so*) ok "the message names libc10.so" ;;
        *) bad "the message names libc10.so" ;;
    esac
    case $message in
        *"$work/bad/Fiji.app/lib/linux64/liblumos.so"*"unzip lumos-fiji-$VERSION.zip over the Fiji.app folder again"*)
            ok "the message names the file tried and the fix" ;;
        *) bad "the message names the file tried and the fix" ;;
    esac
else
    bad "About lumos logged the missing-library message (output: $(head -c 600 "$work/about.out"))"
fi
grep -q 'Exception' "$work/about.out" && bad "an exception in ImageJ's output: $(grep -m3 Exception "$work/about.out")" || true

printf 'test-bundle.sh: %.1f s in all\n' "$(echo "$(date +%s.%N) - $start" | bc)"
if [ "$failures" -ne 0 ]; then
    echo "FAIL fiji bundle ($failures failures; work folder $work)" >&2
    [ -n "${LUMOS_BUNDLE_WORK:-}" ] || { trap - EXIT; echo "(kept $work)" >&2; }
    exit 1
fi
echo "PASS fiji bundle"
