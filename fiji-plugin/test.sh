#!/usr/bin/env bash
# Tests the Java binding and the Fiji/ImageJ plugins:
# 1. JUnit 4, truly headless: the binding and each plugin through IJ.runPlugIn on ImagePlus data.
# 2. An ImageJ macro that runs the menu commands (About lumos, Lumos Train, Segment, Decompose)
#    in a real ImageJ under Xvfb, with the two jars laid out as in the bundle (plugins/ and
#    jars/, found through the plugin jar's Class-Path), checks the results and saves
#    screenshots (target/screenshots).
# Needs liblumos.so (LUMOS_LIBRARY, default ../target/debug) and the lumos CLI next to it.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(cd .. && pwd)
LIB=${LUMOS_LIBRARY:-$ROOT/target/debug/liblumos.so}
CLI=$(dirname "$LIB")/lumos
IJ_JAR=${IJ_JAR:-/usr/share/java/ij.jar}
JNA_JAR=${JNA_JAR:-/usr/share/java/jna.jar}
JUNIT_JAR=${JUNIT_JAR:-/usr/share/java/junit4.jar}
HAMCREST_JAR=${HAMCREST_JAR:-/usr/share/java/hamcrest-core.jar}
SHOTS=${LUMOS_SCREENSHOTS:-$ROOT/target/screenshots}
./build.sh
VERSION=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' ../Cargo.toml | head -1)
rm -rf target/test-classes
mkdir -p target/test-classes "$SHOTS"
CP="target/Lumos_Fiji-$VERSION.jar:target/lumos-java-$VERSION.jar:$IJ_JAR:$JNA_JAR"
javac -nowarn --release 8 -encoding UTF-8 -cp "$CP:$JUNIT_JAR" -d target/test-classes \
    $(find src/test/java -name '*.java')
echo "fiji-plugin: JUnit (headless)"
java -Djava.awt.headless=true -Dlumos.library="$LIB" -cp "$CP:target/test-classes:$JUNIT_JAR:$HAMCREST_JAR" \
    org.junit.runner.JUnitCore org.lumos.fiji.PluginsTest

echo "fiji-plugin: ImageJ macro under Xvfb"
work=${LUMOS_FIJI_WORK:-$(mktemp -d)}
[ -n "${LUMOS_FIJI_WORK:-}" ] || trap 'rm -rf "$work"' EXIT
mkdir -p "$work/ij/plugins" "$work/ij/jars"
cp "target/Lumos_Fiji-$VERSION.jar" "$work/ij/plugins/"
# the binding and JNA where the plugin jar's Class-Path (../jars/...) expects them
cp "target/lumos-java-$VERSION.jar" "$work/ij/jars/"
JNA_VERSION=$(unzip -p "$JNA_JAR" META-INF/MANIFEST.MF | tr -d '\r' \
    | sed -n 's/^Implementation-Version: *\([^ ]*\).*/\1/p' | head -1)
cp "$JNA_JAR" "$work/ij/jars/jna-$JNA_VERSION.jar"
"$CLI" simulate ssqpm --out "$work/ssqpm" --train 3 --test 1 --size 64 --seed 1 >/dev/null
"$CLI" simulate fluo --out "$work/fluo" --train 2 --test 1 --size 64 --seed 1 >/dev/null
"$CLI" simulate ssqpm --out "$work/show" --train 1 --test 0 --size 256 --seed 9 >/dev/null
# models trained a little longer (about 20 s each) than the macro's own, so the screenshots
# show real labels and a recognisable decomposition
"$CLI" train --recipe dm-qpmnet --size tiny --data "$work/ssqpm/train" --out "$work/shot.lumos" --epochs 20 \
    --iterations 10 --patch 64 --device cpu >/dev/null
"$CLI" simulate fluo --out "$work/fluo128" --train 4 --test 0 --size 128 --seed 2 >/dev/null
"$CLI" train --recipe musplit-unet --size tiny --data "$work/fluo128/train" --out "$work/shot-split.lumos" \
    --epochs 10 --iterations 20 --patch 64 --device cpu >/dev/null
"$CLI" simulate fluo --out "$work/showfluo" --train 1 --test 0 --size 256 --seed 9 >/dev/null
args="$work/ssqpm/train,$work/show/train/images/$(ls "$work/show/train/images" | head -1),$work/fluo/train"
args="$args,$work/showfluo/train/inputs/$(ls "$work/showfluo/train/inputs" | head -1),$work,$SHOTS,$work/shot.lumos,$work/shot-split.lumos"
timeout 300 xvfb-run -a -s "-screen 0 1400x900x24" java -Dlumos.library="$LIB" -Dplugins.dir="$work/ij" \
    -cp "$IJ_JAR" ij.ImageJ -ijpath "$work/ij" -eval "runMacro('$PWD/tests/plugins.ijm', '$args');" \
    >"$work/ij.log" 2>&1 || true
if ! grep -q "^PASS" "$work/result.txt" 2>/dev/null; then
    echo "fiji-plugin: the macro test failed" >&2
    cat "$work/result.txt" "$work/ij.log" >&2 2>/dev/null || true
    exit 1
fi
cat "$work/result.txt"
