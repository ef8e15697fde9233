#!/usr/bin/env bash
# Tests the C/C++ SDK tarball as an integrator gets it (sdk/package.sh makes it), using
# nothing from this checkout but a cmake: in a new temporary folder, with the working
# directory there and no LD_LIBRARY_PATH, PKG_CONFIG_PATH, CMAKE_PREFIX_PATH or LUMOS_*
# in the environment, it
#   1. unpacks the tarball (one top folder lumos-sdk-VERSION-linux-x86_64/; owner 0:0) and
#      checks the layout, the soname (liblumos.so.ABI, the ABI of include/lumos.h) and that
#      every RUNPATH starts at $ORIGIN and the CMake and pkg-config files name no absolute path;
#   2. checks find_package's version rule (same major.minor, at or below the SDK's version);
#   3. copies share/lumos/examples/acquire out of the SDK and builds it with plain
#      `cmake -S -B -DCMAKE_PREFIX_PATH=SDK` (warnings are errors); the programs must need
#      liblumos.so.ABI and resolve liblumos and libtorch inside the SDK;
#   4. simulates ssQPM data and trains a tiny DM-QPMNet with the SDK's bin/lumos;
#   5. runs the C and C++ acquisition programs on simulated frames: exit 0, one line per
#      frame, and for the C one N masks (TIFF) in OUT_DIR;
#   6. builds acquire.c and an ABI check with cc and `pkg-config --cflags --libs lumos`
#      (PKG_CONFIG_PATH=SDK/lib/pkgconfig) and runs them;
#   7. a broken copy of the SDK (lib/libc10.so removed): a program built against it must
#      fail at once with the loader's message naming libc10.so, so must bin/lumos, and
#      find_package(lumos) must report the missing file at configure time.
# Prints the time of each step, the tarball's size and the unpacked size. The temporary
# folder is removed when every check passes and kept (its path printed) otherwise.
#
#   sdk/test.sh TARBALL
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -ne 1 ]; then
    echo "usage: sdk/test.sh lumos-sdk-VERSION-linux-x86_64.tar.gz" >&2
    exit 2
fi
tarball=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
[ -f "$tarball" ] || { echo "sdk/test.sh: $1: no such file" >&2; exit 2; }
cmake=$ROOT/.venv/bin/cmake
[ -x "$cmake" ] || cmake=$(command -v cmake) || { echo "sdk/test.sh: cmake not found (.venv/bin or PATH)" >&2; exit 2; }

# an integrator's environment: nothing that points into this checkout or at another lumos
unset LD_LIBRARY_PATH LD_PRELOAD PKG_CONFIG_PATH CMAKE_PREFIX_PATH CPATH C_INCLUDE_PATH \
    CPLUS_INCLUDE_PATH LIBRARY_PATH
while IFS= read -r name; do unset "$name"; done < <(env | sed -n 's/^\(LUMOS[A-Za-z0-9_]*\)=.*/\1/p')
work=$(mktemp -d "${TMPDIR:-/tmp}/lumos-sdk-test.XXXXXX")
case "$work/" in "$ROOT"/*) echo "sdk/test.sh: the temporary folder $work is inside the checkout" >&2; exit 2 ;; esac
cd "$work"
finish() {
    local rc=$?
    if [ "$rc" -eq 0 ]; then rm -rf "$work"; else echo "sdk/test.sh: FAILED; the files are kept in $work" >&2; fi
}
trap finish EXIT
fail() { echo "sdk/test.sh: FAIL: $*" >&2; exit 1; }
ok() { echo "  ok: $*"; }

# one line per step with its time; the table at the end repeats them
t_start=$(date +%s.%N) t_step=$t_start steps=()
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
step() { echo "== $*"; }
done_step() {
    local t; t=$(now)
    steps+=("$(printf '%-52s %6s s' "$1" "$(secs "$t_step" "$t")")")
    echo "   ($(secs "$t_step" "$t") s)"
    t_step=$t
}
dyn() { readelf -d "$2" | sed -n "s/.*($1).*\[\(.*\)\]/\1/p"; }   # dyn SONAME|RUNPATH|RPATH|NEEDED FILE

step "unpack $(basename "$tarball")"
mkdir unpacked
tar -xzf "$tarball" -C unpacked
tops=$(ls -A unpacked)
[ "$(echo "$tops" | wc -l)" -eq 1 ] || fail "the tarball has more than one top entry: $tops"
case "$tops" in lumos-sdk-*-linux-x86_64) ;; *) fail "top folder '$tops' is not lumos-sdk-VERSION-linux-x86_64" ;; esac
sdk=$work/unpacked/$tops
version=$(cat "$sdk/VERSION")
[ "$tops" = "lumos-sdk-$version-linux-x86_64" ] || fail "top folder $tops, but VERSION says $version"
[ "$(basename "$tarball")" = "$tops.tar.gz" ] || echo "  note: the tarball's name is not $tops.tar.gz"
owners=$(tar -tvzf "$tarball" | awk '{ print $2 }' | sort -u)
[ "$owners" = "0/0" ] || fail "entries not owned by 0/0: $owners"
abi=$(sed -n 's/^#define LUMOS_ABI_VERSION \([0-9]*\)$/\1/p' "$sdk/include/lumos.h")
[ -n "$abi" ] || fail "include/lumos.h defines no LUMOS_ABI_VERSION"
for f in include/lumos.h include/lumos.hpp "lib/liblumos.so.$version" lib/libtorch_cpu.so lib/libc10.so \
    bin/lumos lib/cmake/lumos/lumosConfig.cmake lib/cmake/lumos/lumosConfigVersion.cmake lib/pkgconfig/lumos.pc \
    share/lumos/examples/acquire/CMakeLists.txt share/lumos/examples/acquire/acquire.c \
    share/lumos/examples/acquire/acquire.cpp README.md VERSION LICENSES/THIRD-PARTY.md; do
    [ -f "$sdk/$f" ] && [ ! -L "$sdk/$f" ] || fail "$f missing (or a symlink)"
done
[ "$(readlink "$sdk/lib/liblumos.so.$abi")" = "liblumos.so.$version" ] || fail "lib/liblumos.so.$abi is not a link to liblumos.so.$version"
[ "$(readlink "$sdk/lib/liblumos.so")" = "liblumos.so.$abi" ] || fail "lib/liblumos.so is not a link to liblumos.so.$abi"
ok "layout of $tops (version $version, C ABI $abi)"
soname=$(dyn SONAME "$sdk/lib/liblumos.so.$version")
[ "$soname" = "liblumos.so.$abi" ] || fail "SONAME of lib/liblumos.so.$version is '$soname', expected liblumos.so.$abi"
ok "readelf -d lib/liblumos.so.$version: SONAME $soname"
[ "$(dyn RUNPATH "$sdk/lib/liblumos.so.$version")" = '$ORIGIN' ] || fail "lib/liblumos.so.$version: RUNPATH is not \$ORIGIN"
[ "$(dyn RUNPATH "$sdk/bin/lumos")" = '$ORIGIN/../lib' ] || fail "bin/lumos: RUNPATH is not \$ORIGIN/../lib"
while IFS= read -r f; do
    if [ "$(head -c 4 "$f" | od -An -c | tr -d ' ')" = 177ELF ]; then
        [ -z "$(dyn RPATH "$f")" ] || fail "${f#"$sdk/"} has a DT_RPATH (searched before LD_LIBRARY_PATH)"
        for e in $(dyn RUNPATH "$f" | tr ':' ' '); do
            case "$e" in '$ORIGIN'*) ;; *) fail "${f#"$sdk/"}: RUNPATH entry $e does not start at \$ORIGIN" ;; esac
        done
        for n in $(dyn NEEDED "$f"); do case "$n" in */*) fail "${f#"$sdk/"}: NEEDED $n is a path" ;; esac; done
    fi
done < <(find "$sdk" -type f)
ok "every ELF file: RUNPATH from \$ORIGIN, no RPATH, no NEEDED path"
if grep -nE '(^|[^{}A-Za-z0-9_.])/(tmp|work|home|root|usr|opt)/' "$sdk/lib/cmake/lumos/"*.cmake "$sdk/lib/pkgconfig/lumos.pc"; then
    fail "the CMake or pkg-config files hold an absolute path"
fi
grep -q 'CMAKE_CURRENT_LIST_DIR' "$sdk/lib/cmake/lumos/lumosConfig.cmake" || fail "lumosConfig.cmake does not compute its prefix"
grep -q '^prefix=\${pcfiledir}' "$sdk/lib/pkgconfig/lumos.pc" || fail "lumos.pc does not compute its prefix from \${pcfiledir}"
ok "lumosConfig.cmake and lumos.pc are relocatable"
done_step "unpack and check the layout"

step "find_package(lumos VERSION): the 0.x rule (same major.minor, <= $version)"
IFS=. read -r maj min pat <<<"$version"
prev=
[ "$min" -eq 0 ] || prev=$maj.$((min - 1))   # an older minor: refused as well
mkdir -p versions
{
    echo "cmake_minimum_required(VERSION 3.19)"
    echo "project(versions LANGUAGES NONE)"
    for v in "" "$maj.$min" "$version" "$maj.$min...<$maj.$((min + 1))" "$maj.$min.$((pat + 1))" \
        "$maj.$((min + 1))" "$((maj + 1)).0" "$maj.$((min + 1))...$maj.$((min + 2))" ${prev:+"$prev"}; do
        echo "unset(lumos_DIR CACHE)"
        echo "find_package(lumos $v CONFIG QUIET)"
        echo "message(STATUS \"lumos '$v': found=\${lumos_FOUND} \${lumos_NOT_FOUND_MESSAGE}\")"
        echo "unset(lumos_NOT_FOUND_MESSAGE)"
    done
} >versions/CMakeLists.txt
"$cmake" -S versions -B versions/build -DCMAKE_PREFIX_PATH="$sdk" >versions/log 2>&1 || { cat versions/log; fail "the version probe failed"; }
grep "lumos '" versions/log | sed 's/^-- /  /'
expect() { grep -q "lumos '$1': found=$2" versions/log || { cat versions/log; fail "find_package(lumos $1) should give found=$2"; }; }
expect "" 1
expect "$maj.$min" 1
expect "$version" 1
expect "$maj.$min...<$maj.$((min + 1))" 1
expect "$maj.$min.$((pat + 1))" 0
expect "$maj.$((min + 1))" 0
expect "$((maj + 1)).0" 0
expect "$maj.$((min + 1))...$maj.$((min + 2))" 0
[ -z "$prev" ] || expect "$prev" 0
ok "compatible: none, $maj.$min, $version, $maj.$min...<$maj.$((min + 1)); refused: $maj.$min.$((pat + 1)), $maj.$((min + 1)), $((maj + 1)).0${prev:+, $prev}"
done_step "find_package version rule"

step "build share/lumos/examples/acquire out of tree with CMake"
cp -R "$sdk/share/lumos/examples/acquire" example
"$cmake" -S example -B build -DCMAKE_PREFIX_PATH="$sdk" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_COMPILE_WARNING_AS_ERROR=ON >build.log 2>&1 || { cat build.log; fail "cmake configure failed"; }
"$cmake" --build build -j 2 >>build.log 2>&1 || { cat build.log; fail "cmake --build failed"; }
grep -q "lumos_DIR:PATH=$sdk/lib/cmake/lumos" build/CMakeCache.txt || fail "CMake found another lumos: $(grep lumos_DIR build/CMakeCache.txt)"
for exe in acquire acquire_cpp; do
    needed=$(dyn NEEDED "build/$exe" | tr '\n' ' ')
    case " $needed " in *" liblumos.so.$abi "*) ;; *) fail "build/$exe: NEEDED is '$needed', no liblumos.so.$abi" ;; esac
    case " $needed " in *" liblumos.so "*|*/*) fail "build/$exe: NEEDED '$needed' names the unversioned library or a path" ;; esac
    rp=$(dyn RUNPATH "build/$exe")
    case ":$rp:" in *":$sdk/lib:"*) ;; *) fail "build/$exe: RUNPATH '$rp' lacks $sdk/lib" ;; esac
    # an empty entry would make the loader search the current directory
    case ":$rp:" in *"::"*) fail "build/$exe: RUNPATH '$rp' has an empty entry (the current directory)" ;; esac
    # what the loader really picks: liblumos and libtorch from the SDK, nothing from elsewhere
    for l in "liblumos.so.$abi" libtorch_cpu.so libc10.so libgomp.so.1; do
        where=$(ldd "build/$exe" | awk -v l="$l" '$1 == l { print $3 }')
        [ "$where" -ef "$sdk/lib/$l" ] || fail "build/$exe loads $l from '$where', not from the SDK"
    done
    ok "build/$exe: NEEDED liblumos.so.$abi; liblumos and libtorch resolve in the SDK"
done
done_step "cmake configure + build (acquire, acquire_cpp)"

step "simulate ssQPM data and train a tiny DM-QPMNet with the SDK's bin/lumos"
lumos=$sdk/bin/lumos
[ "$("$lumos" --version)" = "lumos $version" ] || fail "bin/lumos --version says '$("$lumos" --version)'"
"$lumos" simulate ssqpm --out data --train 3 --test 1 --size 64 --seed 1 >simulate.log 2>&1 || { cat simulate.log; fail "lumos simulate failed"; }
[ "$(ls data/train/images | wc -l)" -eq 3 ] || fail "lumos simulate wrote $(ls data/train/images | wc -l) training images, not 3"
done_step "lumos simulate ssqpm (3 + 1 images, 64 px)"
"$lumos" train --recipe dm-qpmnet --size tiny --data data/train --out m.lumos --epochs 1 --iterations 2 \
    --patch 64 --device cpu >train.log 2>&1 || { cat train.log; fail "lumos train failed"; }
[ -s m.lumos ] || fail "lumos train wrote no m.lumos"
"$lumos" info m.lumos >info.log 2>&1 || { cat info.log; fail "lumos info m.lumos failed"; }
grep -q 'kind .* dmqpm' info.log || { cat info.log; fail "lumos info: m.lumos is not a dmqpm model"; }
ok "m.lumos: $(stat -c %s m.lumos) bytes, kind dmqpm"
done_step "lumos train dm-qpmnet tiny (1 epoch, 2 iterations)"

n=3
step "run the CMake-built programs on $n simulated frames"
mkdir masks_c
timeout 300 build/acquire m.lumos simulate ssqpm "$n" masks_c >acquire_c.log 2>&1 || { cat acquire_c.log; fail "build/acquire failed"; }
sed 's/^/  /' acquire_c.log
grep -q "^segmented $n frames$" acquire_c.log || fail "build/acquire did not segment $n frames"
[ "$(grep -c '^frame ' acquire_c.log)" -eq "$n" ] || fail "build/acquire printed $(grep -c '^frame ' acquire_c.log) frame lines, not $n"
check_masks() {   # DIR: exactly n masks, each a TIFF
    [ "$(ls "$1" | wc -l)" -eq "$n" ] || fail "$1 holds $(ls "$1" | wc -l) files, not $n masks"
    for i in $(seq 0 $((n - 1))); do
        m=$(printf '%s/mask_%04d.tif' "$1" "$i")
        [ -s "$m" ] || fail "$m missing"
        case "$(head -c 4 "$m" | od -An -tx1 | tr -d ' ')" in 49492a00|4d4d002a|49492b00|4d4d002b) ;; *) fail "$m is not a TIFF" ;; esac
    done
}
check_masks masks_c
ok "build/acquire: exit 0, $n frames, $n TIFF masks"
done_step "acquire (C, CMake) on $n frames"
# acquire_cpp takes MODEL MODALITY N (no OUT_DIR: it writes no masks)
timeout 300 build/acquire_cpp m.lumos ssqpm "$n" >acquire_cpp.log 2>&1 || { cat acquire_cpp.log; fail "build/acquire_cpp failed"; }
sed 's/^/  /' acquire_cpp.log
grep -q "^processed $n frames$" acquire_cpp.log || fail "build/acquire_cpp did not process $n frames"
[ "$(grep -c '^frame ' acquire_cpp.log)" -eq "$n" ] || fail "build/acquire_cpp printed $(grep -c '^frame ' acquire_cpp.log) frame lines, not $n"
ok "build/acquire_cpp: exit 0, $n frames"
done_step "acquire_cpp (C++, CMake) on $n frames"

step "build with cc and pkg-config (PKG_CONFIG_PATH=SDK/lib/pkgconfig)"
pc() { PKG_CONFIG_PATH=$1/lib/pkgconfig pkg-config "${@:2}" lumos; }
[ "$(pc "$sdk" --modversion)" = "$version" ] || fail "pkg-config --modversion lumos says '$(pc "$sdk" --modversion)'"
echo "  pkg-config --cflags --libs lumos: $(pc "$sdk" --cflags --libs)"
# shellcheck disable=SC2046  # pkg-config's output is meant to be split into words
cc -std=c11 -Wall -Wextra -Werror example/acquire.c -o acquire_pc $(pc "$sdk" --cflags --libs) -Wl,-rpath,"$sdk/lib"
cat >abi_check.c <<'EOF'
/* The header, the library's ABI and its version agree. */
#include <stdio.h>
#include <string.h>
#include "lumos.h"
int main(int argc, char **argv) {
    printf("lumos %s, ABI %u (header %d)\n", lumos_version(), lumos_abi_version(), LUMOS_ABI_VERSION);
    return !(argc == 2 && lumos_abi_version() == LUMOS_ABI_VERSION && strcmp(lumos_version(), argv[1]) == 0);
}
EOF
# shellcheck disable=SC2046
cc -std=c11 -Wall -Wextra -Werror abi_check.c -o abi_check $(pc "$sdk" --cflags --libs) -Wl,-rpath,"$sdk/lib"
for exe in acquire_pc abi_check; do
    case " $(dyn NEEDED "$exe" | tr '\n' ' ') " in *" liblumos.so.$abi "*) ;; *) fail "$exe does not need liblumos.so.$abi" ;; esac
done
./abi_check "$version" | sed 's/^/  /' || fail "abi_check: library version or ABI differ from VERSION $version / header ABI $abi"
mkdir masks_pc
timeout 300 ./acquire_pc m.lumos simulate ssqpm "$n" masks_pc >acquire_pc.log 2>&1 || { cat acquire_pc.log; fail "acquire (pkg-config build) failed"; }
grep -q "^segmented $n frames$" acquire_pc.log || fail "acquire (pkg-config build) did not segment $n frames"
check_masks masks_pc
cmp -s masks_c/mask_0000.tif masks_pc/mask_0000.tif || fail "the CMake and pkg-config builds wrote different masks"
ok "acquire (pkg-config build): exit 0, $n masks, the same as the CMake build's; ABI $abi, version $version"
done_step "cc + pkg-config: build and run acquire.c, ABI check"

step "bad input: a copy of the SDK without lib/libc10.so"
mkdir broken
cp -al "$sdk" broken/    # hard links: removing a file in the copy leaves the SDK whole
bsdk=$work/broken/$tops
# shellcheck disable=SC2046
cc -std=c11 example/acquire.c -o acquire_broken $(pc "$bsdk" --cflags --libs) -Wl,-rpath,"$bsdk/lib"
rm "$bsdk/lib/libc10.so"
expect_loader_error() {   # WHAT CMD...: fails at once (not killed by timeout), the loader names libc10.so
    local what=$1 rc=0 t0; shift
    t0=$(now)
    timeout 60 "$@" >broken.log 2>&1 || rc=$?
    [ "$rc" -ne 0 ] || fail "$what ran without lib/libc10.so"
    [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || fail "$what hung without lib/libc10.so (killed after 60 s)"
    grep -q 'libc10\.so.*cannot open shared object file' broken.log || { cat broken.log; fail "$what: the message does not name libc10.so"; }
    ok "$what: exit $rc after $(secs "$t0" "$(now)") s: $(head -1 broken.log)"
}
expect_loader_error acquire ./acquire_broken m.lumos simulate ssqpm 1 masks_c
expect_loader_error "bin/lumos" "$bsdk/bin/lumos" --help
rc=0
"$cmake" -S example -B build_broken -DCMAKE_PREFIX_PATH="$bsdk" >broken_cmake.log 2>&1 || rc=$?
[ "$rc" -ne 0 ] || fail "find_package(lumos) accepted the SDK without lib/libc10.so"
# CMake wraps the message: compare it as one line
msg=$(tr -s ' \n' '  ' <broken_cmake.log | grep -o 'the lumos SDK in [^ ]* is incomplete: missing [^ ,]*' || true)
case "$msg" in *"/lib/libc10.so") ;; *) cat broken_cmake.log; fail "cmake's message does not name lib/libc10.so" ;; esac
ok "find_package(lumos CONFIG REQUIRED) fails: ${msg//$work\//}"
done_step "bad input: lib/libc10.so missing"

echo "== sizes"
size=$(stat -c %s "$tarball")
unpacked=$(du -sb "$sdk" | cut -f1)
awk -v t="$size" -v u="$unpacked" 'BEGIN { printf "  tarball %.1f MB, unpacked %.1f MB (%.2fx)\n", t / 1e6, u / 1e6, u / t }'
du -sb "$sdk"/lib/libtorch_cpu.so "$sdk"/lib/libdnnl.so.3 "$sdk/lib/liblumos.so.$version" "$sdk"/bin/lumos |
    awk -v s="$sdk/" '{ sub(s, "", $2); printf "  %-24s %7.1f MB\n", $2, $1 / 1e6 }'
echo "== times"
printf '  %s\n' "${steps[@]}"
echo "sdk/test.sh: PASS ($tops; $(secs "$t_start" "$(now)") s)"
