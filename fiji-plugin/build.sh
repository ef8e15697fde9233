#!/usr/bin/env bash
# Builds, with plain javac --release 8 against ij.jar and jna.jar, two jars:
#   fiji-plugin/target/Lumos_Fiji-VERSION.jar  the ImageJ plugins (for Fiji.app/plugins/); its
#       manifest's Class-Path names ../jars/lumos-java-VERSION.jar and ../jars/jna-JNAVERSION.jar,
#       so that ImageJ 1's plugin class loader (a URLClassLoader) finds them in Fiji.app/jars/;
#   fiji-plugin/target/lumos-java-VERSION.jar  the JNA binding in bindings/java (for Fiji.app/jars/).
# VERSION is Cargo.toml's [package] version; JNAVERSION that of jna.jar's manifest.
# IJ_JAR / JNA_JAR override Debian's /usr/share/java paths; with SOURCE_DATE_EPOCH set, every
# jar entry gets that time (reproducible jars).
set -euo pipefail
cd "$(dirname "$0")"
IJ_JAR=${IJ_JAR:-/usr/share/java/ij.jar}
JNA_JAR=${JNA_JAR:-/usr/share/java/jna.jar}
for j in "$IJ_JAR" "$JNA_JAR"; do
    [ -f "$j" ] || { echo "build.sh: $j not found (Debian: apt-get install imagej libjna-java)" >&2; exit 1; }
done
# the first version = line of Cargo.toml's [package] table
VERSION=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' ../Cargo.toml | head -1)
# "Implementation-Version: 5.13.0 (b0)" -> 5.13.0
JNA_VERSION=$(unzip -p "$JNA_JAR" META-INF/MANIFEST.MF | tr -d '\r' \
    | sed -n 's/^Implementation-Version: *\([^ ]*\).*/\1/p' | head -1)
[ -n "$VERSION" ] || { echo "build.sh: no [package] version in Cargo.toml" >&2; exit 1; }
[ -n "$JNA_VERSION" ] || { echo "build.sh: no Implementation-Version in $JNA_JAR's manifest" >&2; exit 1; }

rm -rf target/classes target/binding-classes target/manifests
rm -f target/Lumos_Fiji-*.jar target/lumos-java-*.jar
mkdir -p target/classes target/binding-classes target/manifests
javac -nowarn --release 8 -encoding UTF-8 -cp "$JNA_JAR" -d target/binding-classes \
    $(find ../bindings/java/src/main/java -name '*.java')
javac -nowarn --release 8 -encoding UTF-8 -cp "target/binding-classes:$IJ_JAR:$JNA_JAR" -d target/classes \
    $(find src/main/java -name '*.java')
cp src/main/resources/plugins.config target/classes/

cat >target/manifests/binding.mf <<EOF
Implementation-Title: lumos-java
Implementation-Version: $VERSION
EOF
cat >target/manifests/plugins.mf <<EOF
Implementation-Title: Lumos_Fiji
Implementation-Version: $VERSION
Class-Path: ../jars/lumos-java-$VERSION.jar ../jars/jna-$JNA_VERSION.jar
EOF
jar_date=()
[ -z "${SOURCE_DATE_EPOCH:-}" ] || jar_date=(--date="$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)")
jar --create --file "target/lumos-java-$VERSION.jar" --manifest target/manifests/binding.mf "${jar_date[@]}" \
    -C target/binding-classes .
jar --create --file "target/Lumos_Fiji-$VERSION.jar" --manifest target/manifests/plugins.mf "${jar_date[@]}" \
    -C target/classes .
echo "built fiji-plugin/target/Lumos_Fiji-$VERSION.jar and fiji-plugin/target/lumos-java-$VERSION.jar (JNA $JNA_VERSION)"
