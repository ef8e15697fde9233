#!/usr/bin/env bash
# Builds fiji-plugin/target/Lumos_Fiji-0.1.0.jar (the JNA binding in bindings/java + the
# ImageJ plugins) with plain javac --release 8 against ij.jar and jna.jar.
# IJ_JAR / JNA_JAR override Debian's /usr/share/java paths.
set -euo pipefail
cd "$(dirname "$0")"
IJ_JAR=${IJ_JAR:-/usr/share/java/ij.jar}
JNA_JAR=${JNA_JAR:-/usr/share/java/jna.jar}
for j in "$IJ_JAR" "$JNA_JAR"; do
    [ -f "$j" ] || { echo "build.sh: $j not found (Debian: apt-get install imagej libjna-java)" >&2; exit 1; }
done
rm -rf target/classes && mkdir -p target/classes
javac -nowarn --release 8 -encoding UTF-8 -cp "$IJ_JAR:$JNA_JAR" -d target/classes \
    $(find ../bindings/java/src/main/java src/main/java -name '*.java')
cp src/main/resources/plugins.config target/classes/
jar cf target/Lumos_Fiji-0.1.0.jar -C target/classes .
echo "built fiji-plugin/target/Lumos_Fiji-0.1.0.jar"
