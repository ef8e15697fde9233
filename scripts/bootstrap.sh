#!/usr/bin/env bash
# Installs what lumos needs to build and test, when missing; a no-op when present.
# - libtorch 2.11.0 (CPU + CUDA libraries) from the PyPI torch wheel into .libtorch/
#   (git-ignored), as tch 0.24 expects; .cargo/config.toml points torch-sys at it.
# - oneDNN 3.2 (libdnnl.so.3, GNU OpenMP build) from the PyPI wheel onednn-cpu-gomp into
#   .onednn/lib (git-ignored): the blocked-layout training convolutions (src/nn/onednn.rs)
#   load it at run time; without it training runs libtorch's convolutions (slower on CPU).
# - a C and C++ compiler for the C API tests.
# - the host applications and Python packages of the plugin tests (see below).
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

TORCH_VERSION=2.11.0
MARKER=.libtorch/.lumos-torch-$TORCH_VERSION

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

if [ ! -f "$MARKER" ] || [ ! -f .libtorch/torch/lib/libtorch_cpu.so ]; then
    echo "bootstrap: installing libtorch $TORCH_VERSION from the PyPI torch wheel into .libtorch (about 1.2 GB) ..."
    tmp=$(mktemp -d .libtorch-partial.XXXXXX)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp" \
        "torch==$TORCH_VERSION" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
    rm -rf .libtorch
    mv "$tmp" .libtorch
    trap - EXIT
    touch "$MARKER"
    echo "bootstrap: libtorch ready in .libtorch"
fi

ONEDNN_WHEEL=onednn-cpu-gomp==2023.2.0
if [ ! -f .onednn/lib/libdnnl.so.3 ]; then
    echo "bootstrap: installing oneDNN 3.2 ($ONEDNN_WHEEL from PyPI) into .onednn (about 55 MB) ..."
    tmp=$(mktemp -d .onednn-partial.XXXXXX)
    trap 'rm -rf "$tmp"' EXIT
    # only the library: its headers are the ones libtorch ships (the same oneDNN 3.x C API)
    if python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$tmp" "$ONEDNN_WHEEL" &&
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
        echo "bootstrap: oneDNN ready in .onednn"
    else
        echo "bootstrap: WARNING: could not install oneDNN; training will use libtorch's convolutions" >&2
    fi
    rm -rf "$tmp"
    trap - EXIT
fi

if [ "$minimal" = 1 ]; then
    exit 0
fi

# Host applications for the plugin tests (apt, as root; otherwise the script stops and
# names them, since the test command needs them; the engine alone needs --minimal only):
# Xvfb + Mesa + the X client libraries Qt needs (napari), ImageJ 1 + JNA + JUnit 4 and a
# JDK (the Fiji plugin), gcc's AddressSanitizer comes with gcc.
host_pkgs=(xvfb xauth libgl1 libegl1 libgl1-mesa-dri libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0
    libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xinerama0
    libxcb-xkb1 libfontconfig1 libdbus-1-3 imagej libjna-java junit4)
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

# Python environment in .venv (git-ignored): numpy + pytest for the binding; napari with
# PyQt5, pytest-qt, pytest-xvfb and npe2 for the plugin (about 900 MB); the binding and
# the plugin installed editable, so napari discovers the plugin through its entry point.
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    # absent, or left broken by an earlier failed creation (a venv without pip)
    echo "bootstrap: creating .venv ..."
    rm -rf .venv
    if ! python3 -m venv .venv; then
        rm -rf .venv
        if ! { python3 -m pip install --quiet virtualenv && python3 -m virtualenv -q .venv; }; then
            rm -rf .venv
            echo "bootstrap: cannot create .venv: install python3-venv (Debian/Ubuntu) or virtualenv" >&2
            exit 1
        fi
    fi
fi
if ! .venv/bin/python -c "import numpy, pytest, napari, npe2, pytestqt, pytest_xvfb" >/dev/null 2>&1; then
    echo "bootstrap: installing numpy, pytest, napari[pyqt5], pytest-qt, pytest-xvfb, npe2 into .venv ..."
    .venv/bin/python -m pip install --quiet --disable-pip-version-check numpy pytest "napari[pyqt5]" pytest-qt \
        pytest-xvfb npe2
fi
# bioimage.io (issue 9): PyTorch (the PyPI wheel of the engine's libtorch version, to run
# exported TorchScript; about 4.6 GB with its CUDA libraries, CPU is enough), bioimageio.core
# and .spec; pydantic < 2.13 because bioimageio.spec 0.5.12's serializers break on 2.14.
# Dask scale-out: dask[array], distributed, zarr (OME-Zarr).
if ! .venv/bin/python -c "import torch, bioimageio.core, dask.array, distributed, zarr" >/dev/null 2>&1; then
    echo "bootstrap: installing torch $TORCH_VERSION, bioimageio.core, dask, distributed, zarr into .venv ..."
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" bioimageio.core \
        "pydantic<2.13" "setuptools<82" "dask[array]" distributed zarr
fi
if ! .venv/bin/python -c "import napari_lumos, lumos" >/dev/null 2>&1; then
    # setuptools >= 70 builds editable wheels without the separate 'wheel' package
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "setuptools>=70,<82"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
        -e bindings/python -e napari-plugin
fi
