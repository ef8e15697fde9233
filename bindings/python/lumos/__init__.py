"""Thin ctypes binding of the lumos C API (include/lumos.h).

It re-implements nothing: every call goes to liblumos.so. Status codes become
``LumosError`` exceptions carrying the library's last-error message; handles are freed
deterministically (``close()`` or a ``with`` block); arrays are passed zero-copy when
they are C-contiguous float32.

The library is found through ``$LUMOS_LIBRARY`` (a path to liblumos.so), else next to
this package (the ``lumos`` wheel carries it there), else, in a source checkout, in the
repository's ``target/release`` or ``target/debug``. The wheel's library takes libtorch
from the installed ``torch`` package: its version is checked before the library is loaded,
so a missing or mismatched torch gives a ``LumosLibraryError`` that says what to install.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import json
import operator
import os
import pathlib
import sys
import threading
from typing import Callable, Optional

import numpy as np

__all__ = ["LumosError", "LumosLibraryError", "Model", "CancelToken", "train", "simulate", "read_tiff", "write_image_tiff",
           "write_mask_tiff", "train_recipe", "RECIPES", "version", "abi_version", "cuda_available",
           "set_num_threads", "export_bioimageio"]

ABI_VERSION = 1

STATUS_NAMES = {
    0: "OK", 1: "NULL_POINTER", 2: "INVALID_ARGUMENT", 3: "SHAPE_MISMATCH", 4: "INVALID_INPUT",
    5: "IO", 6: "TIFF", 7: "MODEL_FORMAT", 8: "UNSUPPORTED", 9: "CANCELLED", 10: "DEVICE",
    11: "INVALID_CONFIG", 12: "TORCH", 13: "BUFFER_TOO_SMALL", 14: "INTERNAL",
}


class LumosError(RuntimeError):
    """A failed lumos call: ``status`` is the C status number, ``name`` its name."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.name = STATUS_NAMES.get(status, str(status))
        super().__init__(f"{self.name}: {message}")


class _Info(C.Structure):
    _fields_ = [("kind", C.c_uint32), ("n_input_channels", C.c_size_t), ("n_classes", C.c_size_t),
                ("patch_height", C.c_size_t), ("patch_width", C.c_size_t),
                ("can_segment", C.c_bool), ("can_decompose", C.c_bool)]


class _Image(C.Structure):
    _fields_ = [("data", C.POINTER(C.c_float)), ("channels", C.c_size_t), ("height", C.c_size_t),
                ("width", C.c_size_t)]


class _TileOptions(C.Structure):
    _fields_ = [("tile_height", C.c_size_t), ("tile_width", C.c_size_t), ("step_fraction", C.c_double),
                ("batch_size", C.c_size_t), ("mirror", C.c_bool)]


class _DecomposeOptions(C.Structure):
    _fields_ = [("tile", C.c_size_t), ("keep", C.c_size_t), ("batch_size", C.c_size_t), ("mirror", C.c_bool),
                ("samples", C.c_size_t), ("seed", C.c_uint64)]


class _DiffusionOptions(C.Structure):
    _fields_ = [("start", C.c_uint32), ("inversion_steps", C.c_size_t), ("sampling_steps", C.c_size_t),
                ("eta", C.c_double), ("samples", C.c_size_t), ("forward_t", C.c_size_t), ("seed", C.c_uint64),
                ("clip_denoised", C.c_bool)]


_STARTS = {"prior": 0, "random": 1, "forward": 2}


class _MeasureOptions(C.Structure):
    _fields_ = [("pixel_size_um", C.c_double), ("wavelength_nm", C.c_double), ("alpha_um3_per_pg", C.c_double),
                ("phase_channel", C.c_int32), ("min_size", C.c_size_t)]


class _Progress(C.Structure):
    _fields_ = [("stage", C.c_uint32), ("epoch", C.c_size_t), ("epochs", C.c_size_t),
                ("iteration", C.c_size_t), ("iterations", C.c_size_t),
                ("loss", C.c_double), ("val_metric", C.c_double)]


_PROGRESS_CB = C.CFUNCTYPE(None, C.POINTER(_Progress), C.c_void_p)
_lib = None
_lib_lock = threading.Lock()


class LumosLibraryError(OSError):
    """liblumos, or a library it needs (libtorch from the ``torch`` package), cannot be
    found or loaded; the message names what is missing and how to install it."""


_HERE = pathlib.Path(__file__).resolve().parent
_LIBNAME = {"darwin": "liblumos.dylib", "win32": "lumos.dll"}.get(sys.platform, "liblumos.so")


def _build_info() -> Optional[dict]:
    """What the wheel was built against (``_build.json``, written by scripts/release.py);
    None in a source checkout."""
    try:
        return json.loads((_HERE / "_build.json").read_text())
    except FileNotFoundError:
        return None


def _installed_version(dist: str) -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _check_torch(build: dict) -> None:
    """The wheel's liblumos.so finds libtorch in the installed torch package (its RUNPATH):
    that package must be there, at the version the library was built against. Checked
    without importing torch."""
    want = build["torch"]
    have = _installed_version("torch")
    how = (f"install it with `pip install torch=={want}` (CUDA build from PyPI), or the CPU-only build with "
           f"`pip install torch=={want} --index-url https://download.pytorch.org/whl/cpu`")
    if have is None:
        raise LumosLibraryError(f"lumos {build['version']} needs PyTorch {want} (libtorch), and the package torch "
                                f"is not installed in {sys.prefix}: {how}")
    if have.split("+")[0] != want:
        raise LumosLibraryError(f"lumos {build['version']} was built against torch {want}, but torch {have} is "
                                f"installed (libtorch's C++ interface changes between releases): {how}")
    # where liblumos.so's RUNPATH looks ($ORIGIN/../torch/lib)
    lib = _HERE.parent / "torch" / "lib"
    if not (lib / "libtorch_cpu.so").is_file():
        raise LumosLibraryError(f"torch {have} is installed but its libtorch (torch/lib/libtorch_cpu.so) is not in "
                                f"{lib}, where liblumos.so looks for it: install lumos "
                                f"and torch into the same environment (reinstall with `pip install --force-reinstall "
                                f"torch=={want}`)")


def _find_library() -> str:
    env = os.environ.get("LUMOS_LIBRARY")
    if env:
        if not os.path.isfile(env):
            raise LumosLibraryError(f"LUMOS_LIBRARY={env}: no such file (it names the path of {_LIBNAME}; unset "
                                    f"it to use the library of this installation)")
        return env
    packaged = _HERE / _LIBNAME
    build = _build_info()
    if build is not None:
        if not packaged.is_file():
            raise LumosLibraryError(f"{packaged} is missing from this lumos {build['version']} installation: "
                                    f"reinstall it (`pip install --force-reinstall lumos-{build['version']}-*.whl`)")
        _check_torch(build)
        return str(packaged)
    candidates = [packaged]
    for up in _HERE.parents:
        candidates += [up / "target" / "release" / _LIBNAME, up / "target" / "debug" / _LIBNAME]
    for c in candidates:
        if c.is_file():
            return str(c)
    raise LumosLibraryError(f"{_LIBNAME} not found: this lumos is a source checkout without a built engine "
                            f"(build it with `cargo build --release`), or set LUMOS_LIBRARY to its path; users "
                            f"install the lumos wheel instead")


def _missing_dependency(message: str) -> Optional[str]:
    """The library the dynamic loader could not find, from its message."""
    import re
    m = re.search(r"([\w.+-]+\.(?:so[\w.]*|dylib|dll)): cannot open shared object file", message)
    return m.group(1) if m else None


def _open(path: str):
    try:
        return C.CDLL(path)
    except OSError as e:
        build = _build_info()
        dep = _missing_dependency(str(e))
        if dep is not None and dep != os.path.basename(path):
            fix = (f"it comes with torch=={build['torch']}: `pip install --force-reinstall torch=={build['torch']}`"
                   if build else "libtorch's lib folder must be on the library path")
            raise LumosLibraryError(f"cannot load {path}: it needs {dep}, which the loader does not find ({fix}); "
                                    f"loader: {e}") from None
        raise LumosLibraryError(f"cannot load {path}: {e} (a damaged or unreadable file: reinstall lumos, or point "
                                f"LUMOS_LIBRARY at a working {_LIBNAME})") from None


def _load():
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        lib = _open(_find_library())
        P, S, st = C.c_void_p, C.c_size_t, C.c_uint32
        sig = {
            "lumos_version": ([], C.c_char_p),
            "lumos_abi_version": ([], C.c_uint32),
            "lumos_last_error_message": ([], C.c_char_p),
            "lumos_cuda_available": ([], C.c_bool),
            "lumos_set_num_threads": ([C.c_uint32], st),
            "lumos_model_load": ([C.c_char_p, C.c_char_p, C.POINTER(P)], st),
            "lumos_model_free": ([P], None),
            "lumos_model_save": ([P, C.c_char_p], st),
            "lumos_model_info": ([P, C.POINTER(_Info)], st),
            "lumos_model_set_precision": ([P, C.c_uint32], st),
            "lumos_model_precision": ([P, C.POINTER(C.c_uint32)], st),
            "lumos_model_kind_name": ([P, C.POINTER(C.c_char_p)], st),
            "lumos_model_channel_name": ([P, S, C.POINTER(C.c_char_p)], st),
            "lumos_model_class_name": ([P, S, C.POINTER(C.c_char_p)], st),
            "lumos_model_metadata_json": ([P, C.POINTER(C.c_char_p)], st),
            "lumos_tile_options_default": ([C.POINTER(_TileOptions)], st),
            "lumos_segment": ([P, P, S, S, S, C.POINTER(_TileOptions), P, P, S], st),
            "lumos_segment_probabilities": ([P, P, S, S, S, C.POINTER(_TileOptions), P, P, S], st),
            "lumos_decompose_options_default": ([C.POINTER(_DecomposeOptions)], st),
            "lumos_diffusion_options_default": ([C.POINTER(_DiffusionOptions)], st),
            "lumos_model_diffusion_options": ([P, C.POINTER(_DiffusionOptions)], st),
            "lumos_segment_diffusion": ([P, P, S, S, S, C.POINTER(_TileOptions), C.POINTER(_DiffusionOptions), P, P,
                                         S], st),
            "lumos_segment_region": ([P, P, S, S, S, P, P, C.POINTER(_TileOptions), C.POINTER(_DiffusionOptions), P, P,
                                      S], st),
            "lumos_decompose": ([P, P, S, S, C.POINTER(_DecomposeOptions), P, P, S], st),
            "lumos_cancel_token_new": ([C.POINTER(P)], st),
            "lumos_cancel_token_cancel": ([P], st),
            "lumos_cancel_token_reset": ([P], st),
            "lumos_cancel_token_free": ([P], None),
            "lumos_train": ([C.c_char_p, C.c_char_p, C.c_char_p, _PROGRESS_CB, P, P, C.POINTER(P)], st),
            "lumos_image_read_tiff": ([C.c_char_p, C.POINTER(_Image)], st),
            "lumos_image_free": ([C.POINTER(_Image)], None),
            "lumos_mask_write_tiff": ([C.c_char_p, P, S, S], st),
            "lumos_image_write_tiff": ([C.c_char_p, P, S, S, S, C.POINTER(C.c_char_p)], st),
            "lumos_train_recipe": ([C.c_char_p, C.c_char_p, C.POINTER(C.c_char_p)], st),
            "lumos_export_bioimageio": ([C.c_char_p, C.c_char_p, C.c_char_p, C.POINTER(C.c_char_p)], st),
            "lumos_simulate": ([C.c_char_p, C.c_char_p, C.c_uint64, C.POINTER(_Image), C.POINTER(_Image)], st),
            "lumos_measure_options_default": ([C.POINTER(_MeasureOptions)], st),
            "lumos_segment_instances": ([P, P, S, S, S, C.POINTER(_TileOptions), C.POINTER(_DiffusionOptions),
                                         C.POINTER(_MeasureOptions), P, P, S, C.POINTER(S), C.POINTER(P)], st),
            "lumos_measure": ([P, S, S, P, S, C.POINTER(_MeasureOptions), C.POINTER(P)], st),
            "lumos_table_shape": ([P, C.POINTER(S), C.POINTER(S)], st),
            "lumos_table_column_name": ([P, S, C.POINTER(C.c_char_p)], st),
            "lumos_table_values": ([P, C.POINTER(C.POINTER(C.c_double))], st),
            "lumos_table_free": ([P], None),
            "lumos_labels_write_tiff": ([C.c_char_p, P, S, S], st),
        }
        for name, (args, res) in sig.items():
            f = getattr(lib, name)
            f.argtypes = args
            f.restype = res
        if lib.lumos_abi_version() != ABI_VERSION:
            raise LumosLibraryError(f"liblumos ABI {lib.lumos_abi_version()} but this binding expects {ABI_VERSION}: "
                                    f"the binding and the library come from different lumos releases")
        _lib = lib
        return lib


def _check(status: int) -> None:
    if status != 0:
        msg = _load().lumos_last_error_message().decode("utf-8", "replace")
        raise LumosError(status, msg)


def version() -> str:
    """The engine's version (``lumos_version()``), which is also ``lumos.__version__``."""
    return _load().lumos_version().decode()


def __getattr__(name: str):
    # lumos.__version__: the wheel's build record, without loading the library; in a source
    # checkout the built library's own version
    if name == "__version__":
        build = _build_info()
        return build["version"] if build is not None else version()
    raise AttributeError(f"module 'lumos' has no attribute {name!r}")


def abi_version() -> int:
    return _load().lumos_abi_version()


def set_num_threads(n: int) -> None:
    """Sets libtorch's intra-op CPU threads for threads that have not yet run a tensor
    operation (call it first, e.g. once per Dask worker). ``n`` >= 1."""
    _check(_load().lumos_set_num_threads(int(n)))


def cuda_available() -> bool:
    return bool(_load().lumos_cuda_available())


class CancelToken:
    """A cancellation flag; ``cancel()`` may be called from any thread."""

    def __init__(self):
        lib = _load()
        h = C.c_void_p()
        _check(lib.lumos_cancel_token_new(C.byref(h)))
        self._h = h

    def cancel(self) -> None:
        _check(_load().lumos_cancel_token_cancel(self._h))

    def reset(self) -> None:
        _check(_load().lumos_cancel_token_reset(self._h))

    def close(self) -> None:
        if self._h:
            _load().lumos_cancel_token_free(self._h)
            self._h = C.c_void_p()

    def __del__(self):
        self.close()


def _size(name: str, v, minimum: int = 0) -> int:
    """A non-negative integer argument (Python or NumPy integer) for a size_t field: ctypes
    would wrap a negative number to a huge one silently."""
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(v).__name__} {v!r}") from None
    if i < minimum:
        raise ValueError(f"{name} = {i}; expected an integer >= {minimum}")
    return i


def _options(tile=None, step_fraction=0.5, batch_size=4, mirror=False) -> _TileOptions:
    o = _TileOptions()
    _check(_load().lumos_tile_options_default(C.byref(o)))
    if tile is not None:
        try:
            th, tw = (tile, tile) if np.ndim(tile) == 0 else tile
        except (TypeError, ValueError):
            raise ValueError(f"tile must be an integer or a (height, width) pair, got {tile!r}") from None
        o.tile_height, o.tile_width = _size("tile height", th, 1), _size("tile width", tw, 1)
    o.step_fraction, o.batch_size, o.mirror = float(step_fraction), _size("batch_size", batch_size, 1), bool(mirror)
    return o


def _as_input(image: np.ndarray, ndim: int) -> np.ndarray:
    if isinstance(image, np.ma.MaskedArray):
        raise TypeError("a masked array: the engine has no notion of masked pixels; pass image.filled(value) "
                        "or the data without the mask")
    if np.iscomplexobj(image):
        raise TypeError("a complex array: the engine expects real intensities or phases (float32); pass "
                        "np.abs(x), np.angle(x) or x.real explicitly")
    a = np.ascontiguousarray(image, dtype=np.float32)  # zero-copy when already float32 C-order
    if a.ndim != ndim:
        raise ValueError(f"expected a {ndim}-D array, got shape {a.shape}")
    return a


_PRECISIONS = {0: "float32", 1: "bfloat16"}


class Model:
    """A loaded model. Thread-safe: calls on one model are serialized by the library, and
    ``close()`` waits for calls in progress on other threads to return before it frees the
    model (a call after ``close()`` raises ``ValueError``)."""

    def __init__(self, path, device: str = "auto", _handle: Optional[C.c_void_p] = None):
        lib = _load()
        self._cv = threading.Condition()
        self._busy = 0
        if _handle is None:
            h = C.c_void_p()
            _check(lib.lumos_model_load(os.fsencode(str(path)), device.encode(), C.byref(h)))
            _handle = h
        self._h = _handle
        info = _Info()
        _check(lib.lumos_model_info(self._h, C.byref(info)))
        self.n_input_channels = info.n_input_channels
        self.n_classes = info.n_classes
        self.patch_size = (info.patch_height, info.patch_width)
        self.can_segment = bool(info.can_segment)
        self.can_decompose = bool(info.can_decompose)
        s = C.c_char_p()
        _check(lib.lumos_model_kind_name(self._h, C.byref(s)))
        self.kind = s.value.decode()
        self.channel_names = []
        for i in range(self.n_input_channels):
            _check(lib.lumos_model_channel_name(self._h, i, C.byref(s)))
            self.channel_names.append(s.value.decode())
        self.class_names = []
        for i in range(self.n_classes):
            _check(lib.lumos_model_class_name(self._h, i, C.byref(s)))
            self.class_names.append(s.value.decode())
        _check(lib.lumos_model_metadata_json(self._h, C.byref(s)))
        self.metadata = json.loads(s.value.decode())

    @contextlib.contextmanager
    def _use(self):
        """The handle, held open for the duration of one call (``close()`` waits for it)."""
        with self._cv:
            if not self._h:
                raise ValueError("this model is closed")
            self._busy += 1
        try:
            yield self._h
        finally:
            with self._cv:
                self._busy -= 1
                self._cv.notify_all()

    @property
    def closed(self) -> bool:
        return not getattr(self, "_h", None)

    def close(self) -> None:
        """Frees the model; waits first for calls running on other threads (a segmentation
        in a worker thread, say) to return."""
        cv = getattr(self, "_cv", None)
        if cv is None:
            return
        with cv:
            cv.wait_for(lambda: self._busy == 0)
            if getattr(self, "_h", None):  # absent when loading failed
                _load().lumos_model_free(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def save(self, path) -> None:
        with self._use() as h:
            _check(_load().lumos_model_save(h, os.fsencode(str(path))))

    @property
    def precision(self) -> str:
        """Inference arithmetic: ``"float32"`` (default) or ``"bfloat16"`` (autocast; the fast
        path on a CUDA GPU with tensor cores; probabilities change at bfloat16 rounding)."""
        v = C.c_uint32()
        with self._use() as h:
            _check(_load().lumos_model_precision(h, C.byref(v)))
        return _PRECISIONS[v.value]

    @precision.setter
    def precision(self, value: str) -> None:
        codes = {v: k for k, v in _PRECISIONS.items()}
        if value not in codes:
            raise ValueError(f"precision {value!r}; expected one of {sorted(codes)}")
        with self._use() as h:
            _check(_load().lumos_model_set_precision(h, codes[value]))

    def diffusion_options(self) -> dict:
        """The sampling a PG-DiffSeg model was saved with (what ``segment`` uses by default)."""
        d = _DiffusionOptions()
        with self._use() as h:
            _check(_load().lumos_model_diffusion_options(h, C.byref(d)))
        start = {v: k for k, v in _STARTS.items()}[d.start]
        return {"start": start, "inversion_steps": d.inversion_steps, "sampling_steps": d.sampling_steps,
                "eta": d.eta, "samples": d.samples, "forward_t": d.forward_t, "seed": d.seed,
                "clip_denoised": bool(d.clip_denoised)}

    def segment(self, image: np.ndarray, *, probabilities: bool = False, instances: bool = False, tile=None,
                step_fraction: float = 0.5, batch_size: int = 4, mirror: bool = False,
                cancel: Optional[CancelToken] = None, diffusion: Optional[dict] = None, pixel_size=None,
                wavelength_nm=None, min_size: int = 10):
        """``image`` is (C, H, W). Returns (H, W) uint8 labels, or (K, H, W) float32 probabilities.

        ``instances=True`` returns ``(labels, table)`` instead: one label per cell and its
        measurements (see ``segment_instances``, which takes all measurement options).

        ``diffusion`` (PG-DiffSeg models, labels only): overrides of the model's sampling, keys
        ``start`` ("prior", "random", "forward"), ``inversion_steps``, ``sampling_steps``, ``eta``,
        ``samples``, ``forward_t``, ``seed``, ``clip_denoised``."""
        if instances:
            if probabilities:
                raise ValueError("instances=True returns labels and a table; drop probabilities=True")
            return self.segment_instances(image, pixel_size=pixel_size, wavelength_nm=wavelength_nm,
                                          min_size=min_size, tile=tile, step_fraction=step_fraction,
                                          batch_size=batch_size, mirror=mirror, cancel=cancel, diffusion=diffusion)
        x = _as_input(image, 3)
        c, h, w = x.shape
        opts = _options(tile, step_fraction, batch_size, mirror)
        tok = cancel._h if cancel is not None else None
        if diffusion is not None:
            if probabilities:
                raise ValueError("diffusion options apply to label output; drop probabilities=True")
            d = self._diffusion(diffusion)
            out = np.empty((h, w), dtype=np.uint8)
            with self._use() as m:
                _check(_load().lumos_segment_diffusion(m, x.ctypes.data, c, h, w, C.byref(opts), C.byref(d), tok,
                                                       out.ctypes.data, out.size))
            return out
        if probabilities:
            out = np.empty((self.n_classes, h, w), dtype=np.float32)
            with self._use() as m:
                _check(_load().lumos_segment_probabilities(m, x.ctypes.data, c, h, w, C.byref(opts), tok,
                                                           out.ctypes.data, out.size))
        else:
            out = np.empty((h, w), dtype=np.uint8)
            with self._use() as m:
                _check(_load().lumos_segment(m, x.ctypes.data, c, h, w, C.byref(opts), tok, out.ctypes.data,
                                             out.size))
        return out

    def segment_instances(self, image: np.ndarray, *, pixel_size=None, wavelength_nm=None, alpha=0.19,
                          phase_channel=None, min_size: int = 10, tile=None, step_fraction: float = 0.5,
                          batch_size: int = 4, mirror: bool = False, cancel: Optional[CancelToken] = None,
                          diffusion: Optional[dict] = None):
        """Instances of ``image`` (C, H, W): ``(labels, table)``.

        ``labels`` is (H, W), one id per cell (0 = background, 1..N), uint16, or uint32 past 65,535
        cells. ``table`` maps each column name (``label``, ``centroid_y``, ``area_px``, ``area_um2``,
        ``mean_<channel>``, ``class``, ``dry_mass_pg``, ...) to a numpy array with one value per cell,
        plus ``class_name``. ``pixel_size`` is in µm, ``wavelength_nm`` enables the dry mass of a phase
        channel in radians (m = λ / (2π α) · Σ φ · pixel area, α in µm³/pg). ``diffusion``: PG-DiffSeg
        sampling overrides, as for ``segment``; each cell takes the class most of its pixels have."""
        x = _as_input(image, 3)
        c, h, w = x.shape
        opts = _options(tile, step_fraction, batch_size, mirror)
        mo = _measure_options(pixel_size, wavelength_nm, alpha, phase_channel, min_size)
        tok = cancel._h if cancel is not None else None
        out = np.empty((h, w), dtype=np.uint32)
        count = C.c_size_t()
        table = C.c_void_p()
        d = C.byref(self._diffusion(diffusion)) if diffusion is not None else None
        with self._use() as m:
            _check(_load().lumos_segment_instances(m, x.ctypes.data, c, h, w, C.byref(opts), d, C.byref(mo), tok,
                                                   out.ctypes.data, out.size, C.byref(count), C.byref(table)))
        columns = _take_table(table)
        if "class" in columns:
            names = self.class_names
            columns["class_name"] = np.array([names[int(k)] if 0 <= int(k) < len(names) else "" for k in columns["class"]],
                                             dtype=object)
        return _narrow_labels(out), columns

    def _diffusion(self, diffusion: dict) -> _DiffusionOptions:
        merged = {**self.diffusion_options(), **diffusion}
        unknown = set(merged) - {"start", "inversion_steps", "sampling_steps", "eta", "samples", "forward_t", "seed",
                                 "clip_denoised"}
        if unknown:
            raise ValueError(f"unknown diffusion options: {sorted(unknown)}")
        if merged["start"] not in _STARTS:
            raise ValueError(f"start = {merged['start']!r}; expected one of {sorted(_STARTS)}")
        return _DiffusionOptions(_STARTS[merged["start"]], merged["inversion_steps"], merged["sampling_steps"],
                                 merged["eta"], merged["samples"], merged["forward_t"], merged["seed"],
                                 merged["clip_denoised"])

    def segment_region(self, region: np.ndarray, frame_mean=None, frame_std=None, *, tile=None,
                       step_fraction: float = 0.5, batch_size: int = 4, mirror: bool = False,
                       cancel: Optional[CancelToken] = None, diffusion: Optional[dict] = None) -> np.ndarray:
        """Class probabilities (K, H, W) of ``region`` (C, H, W), a chunk of a larger frame.

        ``frame_mean`` / ``frame_std``: per-channel mean and population std (ddof 0) of the
        whole frame; channels the model normalizes per image use them instead of the
        region's own (both None = the region's own). Their argmax over K are the labels."""
        x = _as_input(region, 3)
        c, h, w = x.shape
        if (frame_mean is None) != (frame_std is None):
            raise ValueError("pass both frame_mean and frame_std, or neither")
        stats = None
        if frame_mean is not None:
            stats = [np.ascontiguousarray(np.broadcast_to(np.asarray(v, dtype=np.float32).reshape(-1), (c,)))
                     for v in (frame_mean, frame_std)]
        opts = _options(tile, step_fraction, batch_size, mirror)
        # as in the C API, diffusion options are ignored by models that do not sample
        d = C.byref(self._diffusion(diffusion)) if diffusion is not None and self.kind == "pgdiff" else None
        tok = cancel._h if cancel is not None else None
        out = np.empty((self.n_classes, h, w), dtype=np.float32)
        mu, sd = (stats[0].ctypes.data, stats[1].ctypes.data) if stats else (None, None)
        with self._use() as m:
            _check(_load().lumos_segment_region(m, x.ctypes.data, c, h, w, mu, sd, C.byref(opts), d, tok,
                                                out.ctypes.data, out.size))
        return out

    def decompose(self, image: np.ndarray, *, tile: int = 0, keep: int = 0, batch_size: int = 16,
                  mirror: bool = False, samples: int = 1, seed: int = 0,
                  cancel: Optional[CancelToken] = None) -> np.ndarray:
        """Splits a (H, W) image of two superimposed structures (muSplit models).

        Returns (2, H, W) float32 in the targets' units. ``tile`` (0 = training patch) and
        ``keep`` (0 = half the tile) set the inner-padding tiling; ``samples`` posterior
        samples are averaged by hierarchical-VAE models, drawn from ``seed``."""
        x = _as_input(image, 2)
        h, w = x.shape
        out = np.empty((2, h, w), dtype=np.float32)
        opts = _DecomposeOptions()
        _check(_load().lumos_decompose_options_default(C.byref(opts)))
        opts.tile, opts.keep = _size("tile", tile), _size("keep", keep)
        opts.batch_size, opts.mirror = _size("batch_size", batch_size, 1), bool(mirror)
        opts.samples, opts.seed = _size("samples", samples, 1), _size("seed", seed)
        tok = cancel._h if cancel is not None else None
        with self._use() as m:
            _check(_load().lumos_decompose(m, x.ctypes.data, h, w, C.byref(opts), tok, out.ctypes.data, out.size))
        return out


def _take_image(im: _Image) -> np.ndarray:
    """Copies a library-owned image into numpy and frees the library's buffer."""
    try:
        n = im.channels * im.height * im.width
        return np.ctypeslib.as_array(im.data, shape=(n,)).reshape(im.channels, im.height, im.width).copy()
    finally:
        _load().lumos_image_free(C.byref(im))


def read_tiff(path) -> np.ndarray:
    """Reads any TIFF the engine reads as a (C, H, W) float32 array (a copy owned by numpy)."""
    im = _Image()
    _check(_load().lumos_image_read_tiff(os.fsencode(str(path)), C.byref(im)))
    return _take_image(im)


def write_image_tiff(path, image: np.ndarray, channel_names=None) -> None:
    """Writes a (C, H, W) or (H, W) image as a float32 ImageJ TIFF (one page per channel), atomically.

    ``channel_names`` (one per channel) are stored as slice labels; models remember them, and
    the ssQPM names I0, I45, I90, I135, phase select the ssQPM normalization."""
    x = np.ascontiguousarray(image, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"image must be (C, H, W) or (H, W); got shape {x.shape}")
    names = None
    if channel_names is not None:
        if len(channel_names) != x.shape[0]:
            raise ValueError(f"{len(channel_names)} channel names for {x.shape[0]} channels")
        names = (C.c_char_p * x.shape[0])(*[str(n).encode() for n in channel_names])
    _check(_load().lumos_image_write_tiff(os.fsencode(str(path)), x.ctypes.data, *x.shape, names))


def simulate(modality: str, seed: int = 0, **config) -> tuple:
    """One simulated frame and its truth, from the engine's simulators.

    ``modality``: "ssqpm" (image (5, H, W): I0, I45, I90, I135 in ADU and phase in rad;
    truth (1, H, W) 0 background / 1 cell), "qpi" (image (1, H, W) phase in rad; truth
    (1, H, W) 0 background / 1 live / 2 dead) or "fluo" (image (1, H, W) two superimposed
    structures; truth (2, H, W) the structures). ``config``: simulator settings, e.g.
    ``size=256``. Returns ``(image, truth)`` as float32 arrays."""
    im, tr = _Image(), _Image()
    _check(_load().lumos_simulate(modality.encode(), json.dumps(config).encode(), seed, C.byref(im), C.byref(tr)))
    image = _take_image(im)
    return image, _take_image(tr)


def _measure_options(pixel_size, wavelength_nm, alpha, phase_channel, min_size) -> _MeasureOptions:
    mo = _MeasureOptions()
    _check(_load().lumos_measure_options_default(C.byref(mo)))
    mo.pixel_size_um = float("nan") if pixel_size is None else float(pixel_size)
    mo.wavelength_nm = float("nan") if wavelength_nm is None else float(wavelength_nm)
    mo.alpha_um3_per_pg = float(alpha)
    mo.phase_channel = -1 if phase_channel is None else _size("phase_channel", phase_channel)
    mo.min_size = _size("min_size", min_size)
    return mo


def _take_table(handle: C.c_void_p) -> dict:
    """Copies a library table into {column: float64 array} and frees it."""
    lib = _load()
    try:
        rows, cols = C.c_size_t(), C.c_size_t()
        _check(lib.lumos_table_shape(handle, C.byref(rows), C.byref(cols)))
        vals = C.POINTER(C.c_double)()
        _check(lib.lumos_table_values(handle, C.byref(vals)))
        n, k = rows.value, cols.value
        data = np.ctypeslib.as_array(vals, shape=(n * k,)).copy().reshape(n, k) if n * k else np.zeros((n, k))
        out = {}
        for j in range(k):
            name = C.c_char_p()
            _check(lib.lumos_table_column_name(handle, j, C.byref(name)))
            col = data[:, j]
            key = name.value.decode("utf-8")
            out[key] = col.astype(np.int64) if key in ("label", "class", "area_px") else col
        return out
    finally:
        lib.lumos_table_free(handle)


def _narrow_labels(labels: np.ndarray) -> np.ndarray:
    return labels.astype(np.uint16) if labels.size == 0 or labels.max() <= 65535 else labels


def measure(labels: np.ndarray, image: Optional[np.ndarray] = None, *, pixel_size=None, wavelength_nm=None,
            alpha=0.19, phase_channel=None) -> dict:
    """Measures each object of an (H, W) label image (any non-negative integer dtype): a table as
    returned by ``Model.segment_instances``; intensities on ``image`` (C, H, W) when given."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be (H, W); got shape {lab.shape}")
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise ValueError("labels are floats with fractional or non-finite values; labels must be integers")
    elif lab.dtype.kind not in "ui" and lab.dtype != np.bool_:
        raise ValueError(f"labels have dtype {lab.dtype}; expected an integer image")
    if lab.size and lab.min() < 0:
        raise ValueError(f"labels hold the negative value {lab.min()}; labels must be >= 0")
    if lab.size and lab.max() > 0xFFFFFFFF:
        raise ValueError(f"labels hold {lab.max()}, more than uint32 holds")
    lab = np.ascontiguousarray(lab, dtype=np.uint32)
    h, w = lab.shape
    mo = _measure_options(pixel_size, wavelength_nm, alpha, phase_channel, 0)
    ptr, c = None, 0
    if image is not None:
        x = _as_input(image, 3)
        if x.shape[1:] != (h, w):
            raise ValueError(f"image is {x.shape[1]} x {x.shape[2]} but labels are {h} x {w}; they must match")
        ptr, c = x.ctypes.data, x.shape[0]
    table = C.c_void_p()
    _check(_load().lumos_measure(lab.ctypes.data, h, w, ptr, c, C.byref(mo), C.byref(table)))
    return _take_table(table)


def write_labels_tiff(path, labels: np.ndarray) -> None:
    """Writes (H, W) instance labels as a uint16 TIFF (uint32 past 65,535 objects), atomically."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be (H, W); got shape {lab.shape}")
    if lab.size and (lab.min() < 0 or lab.max() > 0xFFFFFFFF):
        raise ValueError("labels must be in 0..4294967295")
    x = np.ascontiguousarray(lab, dtype=np.uint32)
    _check(_load().lumos_labels_write_tiff(os.fsencode(str(path)), x.ctypes.data, x.shape[0], x.shape[1]))


def write_mask_tiff(path, labels: np.ndarray) -> None:
    """Writes (H, W) labels as an 8-bit ImageJ TIFF, atomically."""
    x = np.ascontiguousarray(labels, dtype=np.uint8)
    if x.ndim != 2:
        raise ValueError(f"labels must be (H, W); got shape {x.shape}")
    _check(_load().lumos_mask_write_tiff(os.fsencode(str(path)), x.ctypes.data, x.shape[0], x.shape[1]))


def export_bioimageio(model_path, out, **options) -> dict:
    """Exports a model file to the bioimage.io model format: a folder, or a package when
    ``out`` ends in ``.zip``. Returns the report (``path``, ``input_shape``, ``output_shape``,
    ``self_check``: largest difference between the exported TorchScript and the engine on
    the test tile, ``files`` with sha256).

    Options (all optional): ``name``, ``description``, ``authors`` / ``maintainers`` (lists
    of dicts with ``name``, ``affiliation``, ``email``, ``orcid``, ``github_user``; a
    string is taken as a name), ``license`` (SPDX, default "CC-BY-4.0"), ``tags``,
    ``git_repo``, ``version``, ``tile`` ((height, width), segmentation models), ``sample``
    (path of a (C, H, W) TIFF for the test tile), ``sample_seed``."""
    for key in ("authors", "maintainers"):
        if key in options:
            options[key] = [{"name": p} if isinstance(p, str) else dict(p) for p in options[key]]
    if "sample" in options and options["sample"] is not None:
        options["sample"] = os.fspath(options["sample"])
    if "tile" in options and options["tile"] is not None:
        t = options["tile"]
        options["tile"] = [t, t] if isinstance(t, int) else list(t)
    s = C.c_char_p()
    _check(_load().lumos_export_bioimageio(os.fsencode(str(model_path)), os.fsencode(str(out)),
                                           json.dumps(options).encode(), C.byref(s)))
    return json.loads(s.value.decode())


def train_recipe(method: str, size: str = "cpu") -> dict:
    """The training configuration of a named recipe, to adjust and pass to ``train``.

    ``method``: "dm-qpmnet", "early-fusion", "angles-only", "phase-only", "nnunet",
    "pg-diffseg", "musplit-unet" or "musplit-hvae"; ``size``: "tiny", "cpu" or "paper"."""
    s = C.c_char_p()
    _check(_load().lumos_train_recipe(method.encode(), size.encode(), C.byref(s)))
    return json.loads(s.value.decode())


RECIPES = ("dm-qpmnet", "early-fusion", "angles-only", "phase-only", "nnunet", "pg-diffseg", "musplit-unet",
           "musplit-hvae")


def train(data_dir, output, config: Optional[dict] = None,
          progress: Optional[Callable[[dict], None]] = None, cancel: Optional[CancelToken] = None) -> Model:
    """Trains a model (blocking); ``progress`` receives dicts with stage, epoch, loss, val_metric...

    An exception raised by ``progress`` (KeyboardInterrupt included) cancels the training at
    its next progress report, which keeps the last checkpoint, and is raised here."""
    lib = _load()
    errors = []
    # the library polls one token: the caller's, else one of our own, so that an exception in
    # the callback can always stop the run
    own = CancelToken() if cancel is None else None
    token = cancel if cancel is not None else own

    def cb(p, _user):
        try:
            if progress is not None:
                q = p.contents
                progress({f: getattr(q, f) for f, _ in _Progress._fields_})
        except BaseException as e:  # an exception must not unwind into the library
            errors.append(e)
            try:
                token.cancel()
            except BaseException:
                pass

    c_cb = _PROGRESS_CB(cb)
    h = C.c_void_p()
    cfg = json.dumps(config or {}).encode()
    try:
        status = lib.lumos_train(cfg, os.fsencode(str(data_dir)), os.fsencode(str(output)), c_cb, None, token._h,
                                 C.byref(h))
    finally:
        if own is not None:
            own.close()
    if errors:
        if h:
            lib.lumos_model_free(h)
        raise errors[0]
    _check(status)
    return Model(None, _handle=h)
