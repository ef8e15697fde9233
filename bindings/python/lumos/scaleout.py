"""Scale-out: segment or decompose large OME-Zarr images and folders of TIFFs with Dask.

Every chunk task receives the *path* of a model, never a model object; each worker
process loads the library and each model once (:func:`get_model`, a per-process cache)
and keeps it for all the chunks it is given. Works with ``dask.distributed`` (a
``Client``, a scheduler address, the current client, or a ``LocalCluster`` made on the
spot) and, for reference runs, with Dask's local schedulers (``scheduler="synchronous"``).

Chunking rules (see ``docs/scale-out.md``):

- **segment**: each chunk is extended by a halo (default: one tile = the model's patch
  size) on every side that has a neighbour (``boundary="none"``: nothing is padded at the
  image border), predicted with the engine's sliding window, and only its interior is
  kept. Channels the model normalizes per image use the *whole frame's* mean and
  population std (float64 Dask reductions, computed before the chunks are mapped), so
  every chunk is normalized alike. When ``H - tile`` and ``W - tile`` are multiples of the
  step, chunks place their tiles exactly where the whole frame does and the result equals
  the whole-frame result (up to float rounding); otherwise the engine stretches the
  whole frame's tile grid, chunk tiles sit elsewhere, and how far the results differ
  depends on how shift-invariant the network is.
- **decompose** (muSplit, inner padding): the engine cuts the frame into ``keep x keep``
  cells anchored at the frame origin and predicts each from a tile centred on it plus
  lateral-context crops up to ``tile * 2**lc_levels`` wide. With chunk sizes and halo
  multiples of ``keep`` and a halo of at least ``tile * 2**lc_levels / 2 - keep / 2``
  (rounded up to a multiple of ``keep``), every kept cell sees exactly the pixels it sees
  in the whole frame, so the chunked result equals the whole-frame result (up to float
  rounding of batched convolutions).

Command line::

    python -m lumos.scaleout segment --model m.lumos --input big.ome.zarr --out labels.ome.zarr \\
        --scheduler tcp://scheduler:8786
    python -m lumos.scaleout decompose --model split.lumos --input tiffs/ --out split/ --local-workers 4
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

import lumos

__all__ = ["segment", "decompose", "segment_zarr", "decompose_zarr", "segment_tiffs", "decompose_tiffs",
           "segment_array", "decompose_array", "read_ome_zarr", "write_ome_zarr", "is_ome_zarr", "OmeImage",
           "get_model", "model_info", "load_counts", "PreloadModel", "segment_halo", "segment_step",
           "decompose_geometry", "main"]

# ---------------------------------------------------------------------------------------
# per-process model cache: one library load and one model load per worker process
# ---------------------------------------------------------------------------------------

_CACHE_LOCK = threading.Lock()
_MODELS: dict = {}  # (abs path, device) -> ((mtime_ns, size), lumos.Model)
_LOADS: dict = {}  # (abs path, device) -> number of loads in this process
_TLS = threading.local()  # the libtorch thread count each calling thread has set


def _set_threads(n: Optional[int]) -> None:
    """Sets libtorch's intra-op threads (None = leave them).

    libtorch (OpenMP) keeps the count per calling thread once that thread has run tensor
    operations, and threads that have not take the last value set; so every thread that
    runs chunks sets it once, whichever thread loaded the model."""
    if not n or getattr(_TLS, "threads", None) == n:
        return
    if n < 1:
        raise ValueError(f"threads = {n}; expected >= 1")
    lumos.set_num_threads(int(n))
    _TLS.threads = int(n)


def get_model(path, device: str = "cpu", threads: Optional[int] = None) -> "lumos.Model":
    """The model at ``path`` on ``device``, loaded once per process and then reused.

    The cache is keyed by the absolute path and the device; a file that changed on disk
    (mtime or size) is loaded again. ``threads`` (None = leave as is) sets libtorch's
    intra-op threads for the calling thread (and threads that have not run libtorch yet).
    Thread-safe."""
    p = os.path.abspath(os.fspath(path))
    key = (p, device)
    st = os.stat(p)
    sig = (st.st_mtime_ns, st.st_size)
    _set_threads(threads)
    with _CACHE_LOCK:
        hit = _MODELS.get(key)
        if hit is not None and hit[0] == sig:
            return hit[1]
        m = lumos.Model(p, device)
        _MODELS[key] = (sig, m)
        _LOADS[key] = _LOADS.get(key, 0) + 1
        return m


def load_counts() -> dict:
    """How many times this process loaded each model: ``{"path|device": n}`` (for tests
    and monitoring; run it on every worker with ``client.run(load_counts)``)."""
    with _CACHE_LOCK:
        return {f"{p}|{d}": n for (p, d), n in _LOADS.items()}


try:  # distributed is optional: the local schedulers need only dask
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ModuleNotFoundError as e:  # pragma: no cover
    # only its absence is optional: a distributed that is installed but cannot be imported
    # (a dask it does not match, a missing dependency) is an error the user must see
    if e.name != "distributed":
        raise
    _WorkerPlugin = object


class PreloadModel(_WorkerPlugin):
    """A ``distributed`` worker plugin that loads a model into :func:`get_model`'s cache
    when a worker starts (and on every worker that joins later), so that a broken
    library path or model fails at once and the first chunk pays no load:
    ``client.register_plugin(PreloadModel("model.lumos", "cuda", threads=8))``."""

    def __init__(self, model, device: str = "cpu", threads: Optional[int] = None):
        self.model = os.path.abspath(os.fspath(model))
        self.device, self.threads = device, threads
        self.name = f"lumos-preload:{self.model}|{device}"

    def setup(self, worker=None):
        get_model(self.model, self.device, self.threads)


def model_info(path, device: str = "cpu", threads: Optional[int] = None) -> dict:
    """Plain-data facts about a model (runs where it is called; the scale-out functions
    run it on a worker, so the client process needs neither the library nor libtorch)."""
    m = get_model(path, device, threads)
    return {"kind": m.kind, "patch_size": tuple(m.patch_size), "n_classes": m.n_classes,
            "class_names": list(m.class_names), "channel_names": list(m.channel_names),
            "n_input_channels": m.n_input_channels, "can_segment": m.can_segment,
            "can_decompose": m.can_decompose, "metadata": m.metadata}


def _per_image_channels(info: dict) -> bool:
    chans = (info["metadata"].get("normalization") or {}).get("channels") or []
    return any(c.get("method") == "per_image_zscore" for c in chans)


# ---------------------------------------------------------------------------------------
# geometry: halos and chunk sizes
# ---------------------------------------------------------------------------------------


def _pair(v, what: str) -> tuple:
    if isinstance(v, (int, np.integer)):
        return (int(v), int(v))
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"{what} = {v!r}; expected an int or a (y, x) pair")
    return t


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def segment_halo(info: dict, tile=None) -> tuple:
    """Default (y, x) halo of segmentation chunks: one tile (the patch size by default)."""
    return _pair(tile, "tile") if tile is not None else tuple(info["patch_size"])


def segment_step(info: dict, tile=None, step_fraction: float = 0.5) -> tuple:
    """(y, x) step between sliding-window tiles in pixels when it is a whole number, else 1.

    Chunk edges and halos are rounded up to multiples of it: then a chunk places its tiles
    on the same grid as the whole frame wherever the whole frame's grid is regular, i.e.
    when ``H - tile`` and ``W - tile`` are multiples of the step (or H, W <= tile), and the
    chunked result equals the whole-frame result up to float rounding."""
    steps = []
    for t in (_pair(tile, "tile") if tile is not None else tuple(info["patch_size"])):
        s = t * step_fraction
        steps.append(int(round(s)) if abs(s - round(s)) < 1e-9 and round(s) >= 1 else 1)
    return tuple(steps)


def decompose_geometry(info: dict, tile: int = 0, keep: int = 0) -> dict:
    """Tile, kept centre and halos that make chunked decomposition equal to whole-frame
    decomposition: ``{"tile", "keep", "lc_levels", "context", "min_halo", "halo"}``.

    ``context`` = half the widest lateral-context crop = ``tile * 2**lc_levels / 2``; a kept
    cell centred at c needs the pixels [c - context, c + context), so a chunk whose cells
    start at multiples of ``keep`` needs ``min_halo = roundup(context - keep / 2, keep)``."""
    tile = int(tile) or int(info["patch_size"][0])
    keep = int(keep) or tile // 2
    lc = int((info["metadata"].get("architecture") or {}).get("lc_levels", 0))
    context = (tile << lc) // 2
    min_halo = _round_up(max(context - keep // 2, 0), keep)
    return {"tile": tile, "keep": keep, "lc_levels": lc, "context": context, "min_halo": min_halo,
            "halo": min_halo}


def _axis_chunks(n: int, chunk: int, align: int, halo: int) -> tuple:
    """Chunk sizes along one axis of length n: multiples of ``align``, every chunk >= halo
    (a short last chunk is merged into its neighbour) so that Dask's overlap never
    rechunks."""
    c = _round_up(max(int(chunk), 1), align)
    if c < halo:
        raise ValueError(f"chunk {chunk} is smaller than the halo {halo}; use chunks of at least the halo "
                         f"(a few times larger is cheaper)")
    if n <= c:
        return (n,)
    sizes = [c] * (n // c)
    r = n - c * (n // c)
    if r:
        if r >= halo:
            sizes.append(r)
        else:
            sizes[-1] += r
    return tuple(sizes)


def _default_chunk(halo: int, align: int) -> int:
    return _round_up(max(1024, 4 * halo), align)


# ---------------------------------------------------------------------------------------
# axes: any of y,x / c,y,x / t,c,y,x / t,c,z,y,x <-> canonical (t, z, c, y, x)
# ---------------------------------------------------------------------------------------


def _letters(axes: Sequence[dict]) -> list:
    """Maps NGFF axes to the letters t, c, z, y, x (by name, else by type and order)."""
    out: list = []
    space = [i for i, a in enumerate(axes) if a.get("type") == "space" or a["name"].lower() in ("z", "y", "x")]
    for i, a in enumerate(axes):
        name, typ = a["name"].lower(), a.get("type")
        if name in ("t", "c", "z", "y", "x"):
            out.append(name)
        elif typ == "time":
            out.append("t")
        elif typ == "channel":
            out.append("c")
        elif i in space:
            out.append("zyx"[3 - len(space) + space.index(i)] if len(space) <= 3 else "?")
        else:
            out.append("?")
    if "?" in out or len(set(out)) != len(out) or "y" not in out or "x" not in out:
        raise ValueError(f"axes {[a['name'] for a in axes]}: expected y and x plus any of t, c, z (each once)")
    return out


def _axes_letters(axes) -> list:
    """Letters of ``axes``: a string such as "tczyx" or NGFF axis dicts."""
    if isinstance(axes, str) or all(isinstance(a, str) for a in axes):
        axes = [{"name": a} for a in axes]
    return _letters(axes)


def _canonical(x, letters: Sequence[str]):
    """A Dask array with dims ``letters`` as (t, z, c, y, x) (missing axes of size 1)."""
    import dask.array as da

    x = da.asarray(x)
    if x.ndim != len(letters):
        raise ValueError(f"the array has {x.ndim} dimensions but {len(letters)} axes {list(letters)}")
    missing = [a for a in "tzcyx" if a not in letters]
    if missing:
        x = x[(Ellipsis,) + (None,) * len(missing)]
    ext = list(letters) + missing
    return x.transpose([ext.index(a) for a in "tzcyx"])


def _out_letters(letters: Sequence[str], with_channel: bool) -> list:
    have = set(letters) | ({"c"} if with_channel else set())
    return [a for a in "tczyx" if a in have and (a != "c" or with_channel)]


def _from_canonical(y, letters_out: Sequence[str], with_channel: bool):
    """Canonical (t, z, [k,] y, x) -> the output axes (NGFF order t, c, z, y, x)."""
    canon = ["t", "z", "c", "y", "x"] if with_channel else ["t", "z", "y", "x"]
    drop = tuple(i for i, a in enumerate(canon) if a not in letters_out)
    if drop:
        y = y.squeeze(axis=drop) if hasattr(y, "squeeze") else np.squeeze(y, drop)
    kept = [a for a in canon if a in letters_out]
    return y.transpose([kept.index(a) for a in letters_out])


# ---------------------------------------------------------------------------------------
# chunk functions (run on the workers; they receive the model path)
# ---------------------------------------------------------------------------------------


def _segment_block(block, mean=None, std=None, *, model, device, threads, probabilities, tile, step_fraction,
                   batch_size, mirror, diffusion):
    m = get_model(model, device, threads)
    region = block[0, 0]  # (C, h, w) with its halo
    mu = None if mean is None else np.asarray(mean, np.float64).reshape(-1)
    sd = None if std is None else np.asarray(std, np.float64).reshape(-1)
    p = m.segment_region(region, mu, sd, tile=tile, step_fraction=step_fraction, batch_size=batch_size,
                         mirror=mirror, diffusion=diffusion)
    if probabilities:
        return p[None, None]
    return np.argmax(p, axis=0).astype(np.uint8)[None, None]


def _decompose_block(block, *, model, device, threads, tile, keep, batch_size, mirror, samples, seed):
    m = get_model(model, device, threads)
    out = m.decompose(block[0, 0, 0], tile=tile, keep=keep, batch_size=batch_size, mirror=mirror,
                      samples=samples, seed=seed)
    return out[None, None]


def _overlap(x, halo: tuple):
    """Dask overlap along y, x with boundary "none"; depth 0 along single-chunk axes."""
    import dask.array as da

    depth = {0: 0, 1: 0, 2: 0, 3: halo[0] if len(x.chunks[3]) > 1 else 0,
             4: halo[1] if len(x.chunks[4]) > 1 else 0}
    ov = da.overlap.overlap(x, depth=depth, boundary="none", allow_rechunk=False)
    if ov.numblocks != x.numblocks:
        raise RuntimeError(f"dask rechunked the overlap ({x.numblocks} -> {ov.numblocks} blocks)")
    return ov, depth


def segment_array(image, model, *, axes="cyx", device: str = "cpu", probabilities: bool = False,
                  chunk=None, halo=None, tile=None, step_fraction: float = 0.5, batch_size: int = 4,
                  mirror: bool = False, diffusion: Optional[dict] = None, threads: Optional[int] = None,
                  frame_stats=None, info: Optional[dict] = None, compute=None):
    """Lazy chunked segmentation of a (Dask or NumPy) array with dims ``axes`` (any of
    "yx", "cyx", "tcyx", "tczyx" or another order of those letters; z planes are
    independent 2-D frames).

    Returns a Dask array in NGFF axis order: labels uint8 (axes without c) or
    probabilities float32 (with c = classes). ``chunk`` / ``halo``: int or (y, x) pixels
    (defaults: ``max(1024, 4 * halo)`` and one tile). ``frame_stats`` = (mean, std) arrays of
    shape (T, Z, C) (whole-frame, ddof 0); None = computed here with Dask reductions
    (float64) by ``compute`` (default ``dask.compute``) when the model normalizes a
    channel per image. ``info`` = :func:`model_info` (None = load the model here, on the
    CPU)."""
    import dask
    import dask.array as da

    letters = _axes_letters(axes)
    model = os.path.abspath(os.fspath(model))
    info = info or model_info(model, "cpu")
    if not info["can_segment"]:
        raise ValueError(f"'{model}' is a '{info['kind']}' model; it cannot segment (use decompose)")
    step = segment_step(info, tile, step_fraction)
    halo = _pair(halo, "halo") if halo is not None else segment_halo(info, tile)
    halo = tuple(_round_up(h, s) for h, s in zip(halo, step))
    chunk = _pair(chunk, "chunk") if chunk is not None else tuple(_default_chunk(h, s) for h, s in zip(halo, step))
    x = _canonical(image, letters)
    T, Z, C, H, W = x.shape
    if C != info["n_input_channels"]:
        raise ValueError(f"the image has {C} channels; the model expects {info['n_input_channels']} "
                         f"({', '.join(info['channel_names'])})")
    x = x.rechunk((1, 1, C, _axis_chunks(H, chunk[0], step[0], halo[0]), _axis_chunks(W, chunk[1], step[1], halo[1])))
    args = []
    if _per_image_channels(info):
        if frame_stats is None:
            xf = x.astype(np.float64)
            frame_stats = (compute or dask.compute)(xf.mean(axis=(3, 4)), xf.std(axis=(3, 4)))
        mean, std = (np.asarray(s, np.float64).reshape(T, Z, C) for s in frame_stats)
        args = [da.from_array(mean, chunks=(1, 1, C)), "tzc", da.from_array(std, chunks=(1, 1, C)), "tzc"]
    ov, depth = _overlap(x, halo)
    K = info["n_classes"]
    kw = dict(model=model, device=device, threads=threads, probabilities=probabilities,
              tile=None if tile is None else _pair(tile, "tile"), step_fraction=step_fraction,
              batch_size=batch_size, mirror=mirror, diffusion=diffusion)
    if probabilities:
        y = da.blockwise(_segment_block, "tzcyx", ov, "tzcyx", *args, adjust_chunks={"c": K}, dtype=np.float32,
                         meta=np.empty((0,) * 5, np.float32), **kw)
        y = da.overlap.trim_internal(y, {3: depth[3], 4: depth[4]}, boundary="none")
    else:
        y = da.blockwise(_segment_block, "tzyx", ov, "tzcyx", *args, dtype=np.uint8, concatenate=True,
                         meta=np.empty((0,) * 4, np.uint8), **kw)
        y = da.overlap.trim_internal(y, {2: depth[3], 3: depth[4]}, boundary="none")
    return _from_canonical(y, _out_letters(letters, probabilities), probabilities)


def decompose_array(image, model, *, axes="yx", device: str = "cpu", chunk=None, halo=None, tile: int = 0,
                    keep: int = 0, batch_size: int = 16, mirror: bool = False, samples: int = 1, seed: int = 0,
                    channel: Optional[int] = None, threads: Optional[int] = None, info: Optional[dict] = None):
    """Lazy chunked muSplit decomposition of a (Dask or NumPy) array with dims ``axes``.

    Returns float32 (t, c = 2, z, y, x) in NGFF order (axes absent from the input dropped,
    c added). ``chunk`` and ``halo`` (pixels, int or (y, x)) are rounded up to multiples of
    ``keep``; the halo must be at least :func:`decompose_geometry`'s ``min_halo`` (the
    default), which makes the result equal to whole-frame decomposition. ``channel``
    selects the input channel when the image has several."""
    import dask.array as da

    letters = _axes_letters(axes)
    model = os.path.abspath(os.fspath(model))
    info = info or model_info(model, "cpu")
    if not info["can_decompose"]:
        raise ValueError(f"'{model}' is a '{info['kind']}' model; it cannot decompose (use segment)")
    g = decompose_geometry(info, tile, keep)
    k = g["keep"]
    if halo is None:
        halo = (g["halo"], g["halo"])
    else:
        halo = tuple(_round_up(h, k) for h in _pair(halo, "halo"))
        if min(halo) < g["min_halo"]:
            raise ValueError(f"halo {halo} is below {g['min_halo']} (= roundup(tile * 2**lc_levels / 2 - keep / 2, "
                             f"keep) for tile {g['tile']}, keep {k}, lc_levels {g['lc_levels']}): chunks would not "
                             f"equal the whole frame")
    chunk = _pair(chunk, "chunk") if chunk is not None else (_default_chunk(halo[0], k), _default_chunk(halo[1], k))
    x = _canonical(image, letters)
    T, Z, C, H, W = x.shape
    if C != 1:
        if channel is None:
            raise ValueError(f"the image has {C} channels; decompose takes one: pass channel=")
        x = x[:, :, channel:channel + 1]
    elif channel not in (None, 0):
        raise ValueError(f"channel = {channel} but the image has one channel")
    x = x.rechunk((1, 1, 1, _axis_chunks(H, chunk[0], k, halo[0]), _axis_chunks(W, chunk[1], k, halo[1])))
    ov, depth = _overlap(x, halo)
    K = info["n_classes"]
    y = da.blockwise(_decompose_block, "tzcyx", ov, "tzcyx", adjust_chunks={"c": K}, dtype=np.float32,
                     meta=np.empty((0,) * 5, np.float32), model=model, device=device, threads=threads,
                     tile=g["tile"], keep=k, batch_size=batch_size, mirror=mirror, samples=samples, seed=seed)
    y = da.overlap.trim_internal(y, {3: depth[3], 4: depth[4]}, boundary="none")
    return _from_canonical(y, _out_letters(letters, True), True)


# ---------------------------------------------------------------------------------------
# OME-Zarr (NGFF 0.4 on Zarr v2, 0.5 on Zarr v3)
# ---------------------------------------------------------------------------------------


@dataclass
class OmeImage:
    """Level 0 of an OME-Zarr image: ``array`` (Dask) with ``axes`` (NGFF axis dicts)."""
    path: pathlib.Path
    array: Any
    axes: list
    version: str
    scale: Optional[list] = None
    translation: Optional[list] = None
    name: Optional[str] = None
    attributes: dict = field(default_factory=dict)

    @property
    def letters(self) -> list:
        return _letters(self.axes)


_DEFAULT_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def _norm_axes(axes, ndim: int) -> list:
    if axes is None:  # NGFF 0.1 / 0.2: always t, c, z, y, x
        axes = list("tczyx")[5 - ndim:]
    out = []
    for a in axes:
        if isinstance(a, str):  # NGFF 0.3
            a = {"name": a, "type": _DEFAULT_TYPES.get(a)}
        a = {k: v for k, v in a.items() if v is not None}
        out.append(a)
    return out


def is_ome_zarr(path) -> bool:
    p = pathlib.Path(path)
    return p.is_dir() and ((p / ".zattrs").is_file() or (p / "zarr.json").is_file() or (p / ".zgroup").is_file())


def read_ome_zarr(path) -> OmeImage:
    """Opens level 0 of an OME-Zarr image (NGFF 0.4: Zarr v2 ``.zattrs``; 0.5: Zarr v3
    ``zarr.json`` under the ``ome`` key; a bioformats2raw container opens its series 0)."""
    import dask.array as da
    import zarr

    path = pathlib.Path(path)
    try:
        g = zarr.open_group(str(path), mode="r")
    except Exception as e:  # an array, a missing path, not Zarr at all
        raise ValueError(f"'{path}' is not an OME-Zarr image (no Zarr group with multiscales metadata): {e}") from e
    attrs = dict(g.attrs)
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else None
    if ome is not None and "multiscales" in ome:
        ms, version = ome["multiscales"], str(ome.get("version", "0.5"))
    elif "multiscales" in attrs:
        ms = attrs["multiscales"]
        version = str(ms[0].get("version", "0.4")) if ms else "0.4"
    elif "bioformats2raw.layout" in attrs or (ome or {}).get("bioformats2raw.layout"):
        return read_ome_zarr(path / "0")
    else:
        raise ValueError(f"'{path}' has no OME-Zarr multiscales metadata (.zattrs or zarr.json 'ome')")
    if not ms:
        raise ValueError(f"'{path}': empty multiscales list")
    m = ms[0]
    ds0 = m["datasets"][0]
    arr = da.from_zarr(str(path), component=ds0["path"])
    axes = _norm_axes(m.get("axes"), arr.ndim)
    if len(axes) != arr.ndim:
        raise ValueError(f"'{path}': {len(axes)} axes in the metadata but level 0 has {arr.ndim} dimensions")
    scale = translation = None
    for t in ds0.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = list(t["scale"])
        elif t.get("type") == "translation":
            translation = list(t["translation"])
    return OmeImage(path, arr, axes, version, scale, translation, m.get("name"), attrs)


def write_ome_zarr(path, array, axes: Sequence[dict], *, scale=None, translation=None, version: str = "0.4",
                   name: Optional[str] = None, chunks=None, extra_attrs: Optional[dict] = None, compute=None,
                   overwrite: bool = False):
    """Writes a (Dask) array as a one-level OME-Zarr image: NGFF ``version`` "0.4" (Zarr v2,
    ``/`` chunk keys) or "0.5" (Zarr v3, ``dimension_names``). ``compute`` runs the store
    (default ``dask.compute``); the multiscales metadata is written after the data, so an
    interrupted write is not mistaken for an image. Returns the path."""
    import dask
    import dask.array as da
    import zarr

    path = pathlib.Path(path)
    if version not in ("0.4", "0.5"):
        raise ValueError(f"NGFF version {version!r}; expected '0.4' or '0.5'")
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}' exists; pass overwrite=True (--overwrite) to replace it")
    array = da.asarray(array)
    axes = [dict(a) for a in axes]
    if len(axes) != array.ndim:
        raise ValueError(f"{len(axes)} axes for a {array.ndim}-D array")
    chunks = tuple(chunks) if chunks is not None else tuple(c[0] for c in array.chunks)
    fmt = 2 if version == "0.4" else 3
    g = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    kw = ({"chunk_key_encoding": {"name": "v2", "separator": "/"}} if fmt == 2
          else {"dimension_names": [a["name"] for a in axes]})
    z = g.create_array("0", shape=array.shape, chunks=chunks, dtype=array.dtype, fill_value=0, **kw)
    # every Dask block must cover whole Zarr chunks (no two tasks write one chunk); the
    # scale-out outputs already do (their last block may span a chunk and the partial edge)
    if not all(all(b % c == 0 for b in np.cumsum(bd)[:-1]) for bd, c in zip(array.chunks, chunks)):
        array = array.rechunk(chunks)
    (compute or dask.compute)(da.store(array, z, lock=False, compute=False))
    cts = [{"type": "scale", "scale": [float(s) for s in (scale or [1.0] * array.ndim)]}]
    if translation is not None:
        cts.append({"type": "translation", "translation": [float(t) for t in translation]})
    ms = {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": cts}]}
    if name:
        ms["name"] = name
    attrs = dict(extra_attrs or {})
    if fmt == 2:
        attrs["multiscales"] = [{"version": "0.4", **ms}]
    else:
        attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    g.attrs.update(attrs)
    return path


def _output_axes(img: OmeImage, out_letters: Sequence[str]) -> tuple:
    """Axis dicts, scale and translation of the output from the input's."""
    letters = img.letters
    axes, scale, trans = [], [], []
    for a in out_letters:
        if a in letters:
            i = letters.index(a)
            axes.append(img.axes[i])
            scale.append(img.scale[i] if img.scale else 1.0)
            trans.append(img.translation[i] if img.translation else 0.0)
        else:  # the new channel axis
            axes.append({"name": "c", "type": "channel"})
            scale.append(1.0)
            trans.append(0.0)
    return axes, scale, (trans if img.translation else None)


# ---------------------------------------------------------------------------------------
# where the work runs
# ---------------------------------------------------------------------------------------


class _Runner:
    """Runs Dask collections and single calls on a distributed client (given, at an
    address, the current one, or a LocalCluster made here) or a local Dask scheduler."""

    def __init__(self, client=None, scheduler: Optional[str] = None, local_workers: Optional[int] = None,
                 threads: Optional[int] = None):
        self.client, self.scheduler, self._owned = None, scheduler, []
        self.threads = threads
        if scheduler is not None:
            if client is not None:
                raise ValueError("pass a client or a local scheduler, not both")
            return
        from distributed import Client, LocalCluster, get_client

        if isinstance(client, str):
            self.client = Client(client)
            self._owned.append(self.client)
        elif client is not None:
            self.client = client
        else:
            current = None
            if not local_workers:
                try:
                    current = get_client()
                except ValueError:
                    current = None
            if current is not None:
                self.client = current
            else:
                cpus = os.cpu_count() or 1
                n = int(local_workers or min(4, cpus))
                cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True)
                self.client = Client(cluster)
                self._owned += [cluster, self.client]
                if self.threads is None:
                    self.threads = max(1, cpus // n)

    def compute(self, *collections):
        import dask

        if self.client is not None:
            return tuple(self.client.compute(list(collections), sync=True))
        return dask.compute(*collections, scheduler=self.scheduler)

    def call(self, fn, *args, **kwargs):
        if self.client is not None:
            return self.client.submit(fn, *args, pure=False, **kwargs).result()
        return fn(*args, **kwargs)

    def close(self):
        for o in reversed(self._owned):
            o.close()
        self._owned = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------
# OME-Zarr entry points
# ---------------------------------------------------------------------------------------


def segment_zarr(source, output, model, *, device: str = "cpu", probabilities: bool = False, chunk=None,
                 halo=None, tile=None, step_fraction: float = 0.5, batch_size: int = 4, mirror: bool = False,
                 diffusion: Optional[dict] = None, threads: Optional[int] = None, client=None,
                 scheduler: Optional[str] = None, local_workers: Optional[int] = None,
                 ngff_version: Optional[str] = None, overwrite: bool = False) -> pathlib.Path:
    """Segments level 0 of an OME-Zarr image into a new one-level OME-Zarr image: labels
    uint8 (the input's axes without c) or class probabilities float32 (c = classes), with
    the input's axes, units and scale. ``ngff_version`` ("0.4" or "0.5") defaults to the
    input's. See :func:`segment_array` for the chunking options and the module for where
    the work runs."""
    img = read_ome_zarr(source)
    _check_output(source, output, overwrite)
    model = os.path.abspath(os.fspath(model))
    with _Runner(client, scheduler, local_workers, threads) as run:
        info = run.call(model_info, model, device, run.threads)
        step = segment_step(info, tile, step_fraction)
        halo = tuple(_round_up(h, s) for h, s in zip(
            _pair(halo, "halo") if halo is not None else segment_halo(info, tile), step))
        y = segment_array(img.array, model, axes=img.letters, device=device, probabilities=probabilities,
                          chunk=chunk, halo=halo, tile=tile, step_fraction=step_fraction, batch_size=batch_size,
                          mirror=mirror, diffusion=diffusion, threads=run.threads, info=info, compute=run.compute)
        out_letters = _out_letters(img.letters, probabilities)
        axes, scale, trans = _output_axes(img, out_letters)
        extra = {"lumos": {"verb": "segment", "output": "probabilities" if probabilities else "labels",
                           "model": model, "classes": info["class_names"], "source": str(source),
                           "halo": list(halo)}}
        return write_ome_zarr(output, y, axes, scale=scale, translation=trans, version=ngff_version or _ngff(img),
                              name=img.name, extra_attrs=extra, compute=run.compute, overwrite=overwrite)


def decompose_zarr(source, output, model, *, device: str = "cpu", chunk=None, halo=None, tile: int = 0,
                   keep: int = 0, batch_size: int = 16, mirror: bool = False, samples: int = 1, seed: int = 0,
                   channel: Optional[int] = None, threads: Optional[int] = None, client=None,
                   scheduler: Optional[str] = None, local_workers: Optional[int] = None,
                   ngff_version: Optional[str] = None, overwrite: bool = False) -> pathlib.Path:
    """Decomposes level 0 of an OME-Zarr image (muSplit) into a one-level OME-Zarr image of
    float32 (t, c = 2 structures, z, y, x), axes absent from the input dropped. Chunked
    results equal whole-frame results (see :func:`decompose_array`)."""
    img = read_ome_zarr(source)
    _check_output(source, output, overwrite)
    model = os.path.abspath(os.fspath(model))
    with _Runner(client, scheduler, local_workers, threads) as run:
        info = run.call(model_info, model, device, run.threads)
        y = decompose_array(img.array, model, axes=img.letters, device=device, chunk=chunk, halo=halo, tile=tile,
                            keep=keep, batch_size=batch_size, mirror=mirror, samples=samples, seed=seed,
                            channel=channel, threads=run.threads, info=info)
        axes, scale, trans = _output_axes(img, _out_letters(img.letters, True))
        g = decompose_geometry(info, tile, keep)
        halo = tuple(_round_up(h, g["keep"]) for h in _pair(halo, "halo")) if halo is not None else (g["halo"],) * 2
        extra = {"lumos": {"verb": "decompose", "output": "structures", "model": model,
                           "classes": info["class_names"], "source": str(source), "tile": g["tile"],
                           "keep": g["keep"], "halo": list(halo)}}
        return write_ome_zarr(output, y, axes, scale=scale, translation=trans, version=ngff_version or _ngff(img),
                              name=img.name, extra_attrs=extra, compute=run.compute, overwrite=overwrite)


def _check_output(source, output, overwrite: bool) -> None:
    """Fails before any work when the output exists (and may not be replaced) or is the input."""
    out = pathlib.Path(output).resolve()
    if out == pathlib.Path(source).resolve():
        raise ValueError(f"the output '{output}' is the input")
    if out.exists() and not overwrite:
        raise FileExistsError(f"'{output}' exists; pass overwrite=True (--overwrite) to replace it")


def _ngff(img: OmeImage) -> str:
    return "0.5" if img.version.startswith("0.5") else "0.4"


# ---------------------------------------------------------------------------------------
# folders of TIFFs: one task per file, whole-frame calls (equal to single-process results)
# ---------------------------------------------------------------------------------------

_TIFF_SUFFIXES = (".tif", ".tiff")


def _tiff_files(source) -> list:
    p = pathlib.Path(source)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"'{p}' is neither a TIFF file nor a folder")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in _TIFF_SUFFIXES)
    if not files:
        raise ValueError(f"'{p}' holds no .tif files")
    return files


def _segment_file(src, out_dir, *, model, device, threads, probabilities, tile, step_fraction, batch_size, mirror,
                  diffusion):
    m = get_model(model, device, threads)
    x = lumos.read_tiff(src)
    stem = pathlib.Path(src).stem
    out = []
    kw = dict(tile=tile, step_fraction=step_fraction, batch_size=batch_size, mirror=mirror)
    if probabilities:
        p = m.segment(x, probabilities=True, **kw)
        labels = np.argmax(p, axis=0).astype(np.uint8)  # the engine's labels: first maximum
        path = os.path.join(out_dir, f"{stem}_prob.tif")
        lumos.write_image_tiff(path, p, m.class_names)
        out.append(path)
    else:
        labels = m.segment(x, diffusion=diffusion, **kw)
    path = os.path.join(out_dir, f"{stem}_mask.tif")
    lumos.write_mask_tiff(path, labels)
    return [path] + out


def _decompose_file(src, out_dir, *, model, device, threads, tile, keep, batch_size, mirror, samples, seed,
                    channel):
    m = get_model(model, device, threads)
    x = lumos.read_tiff(src)
    if x.shape[0] != 1 and channel is None:
        raise ValueError(f"'{src}' has {x.shape[0]} channels; decompose takes one: pass channel=")
    y = m.decompose(x[channel or 0], tile=tile, keep=keep, batch_size=batch_size, mirror=mirror, samples=samples,
                    seed=seed)
    path = os.path.join(out_dir, f"{pathlib.Path(src).stem}_split.tif")
    lumos.write_image_tiff(path, y, m.class_names)
    return [path]


def _run_files(fn, source, output, run, **kw) -> list:
    import dask
    from dask.base import tokenize

    files = _tiff_files(source)
    out_dir = os.path.abspath(os.fspath(output))
    os.makedirs(out_dir, exist_ok=True)
    name = fn.__name__.strip("_").replace("_", "-")
    tasks = [dask.delayed(fn)(str(f.resolve()), out_dir, **kw,
                              dask_key_name=f"lumos-{name}-{f.name}-{tokenize(str(f.resolve()), out_dir, kw)}")
             for f in files]
    results = run.compute(*tasks)
    return [pathlib.Path(p) for r in results for p in r]


def segment_tiffs(source, output, model, *, device: str = "cpu", probabilities: bool = False, tile=None,
                  step_fraction: float = 0.5, batch_size: int = 4, mirror: bool = False,
                  diffusion: Optional[dict] = None, threads: Optional[int] = None, client=None,
                  scheduler: Optional[str] = None, local_workers: Optional[int] = None) -> list:
    """Segments every TIFF of a folder (or one TIFF), one task per file, each a whole-frame
    ``Model.segment`` on a worker: writes ``NAME_mask.tif`` (and ``NAME_prob.tif`` with
    ``probabilities``) into ``output`` (as ``lumos segment`` does). The workers must see
    both folders (a shared file system). Returns the written paths."""
    model = os.path.abspath(os.fspath(model))
    with _Runner(client, scheduler, local_workers, threads) as run:
        return _run_files(_segment_file, source, output, run, model=model, device=device, threads=run.threads,
                          probabilities=probabilities, tile=tile, step_fraction=step_fraction,
                          batch_size=batch_size, mirror=mirror, diffusion=diffusion)


def decompose_tiffs(source, output, model, *, device: str = "cpu", tile: int = 0, keep: int = 0,
                    batch_size: int = 16, mirror: bool = False, samples: int = 1, seed: int = 0,
                    channel: Optional[int] = None, threads: Optional[int] = None, client=None,
                    scheduler: Optional[str] = None, local_workers: Optional[int] = None) -> list:
    """Decomposes every TIFF of a folder (or one TIFF), one task per file: writes
    ``NAME_split.tif`` (2 channels named after the structures) into ``output``."""
    model = os.path.abspath(os.fspath(model))
    with _Runner(client, scheduler, local_workers, threads) as run:
        return _run_files(_decompose_file, source, output, run, model=model, device=device, threads=run.threads,
                          tile=tile, keep=keep, batch_size=batch_size, mirror=mirror, samples=samples, seed=seed,
                          channel=channel)


# ---------------------------------------------------------------------------------------
# one entry point per verb
# ---------------------------------------------------------------------------------------


def segment(source, output, model, **kw):
    """:func:`segment_zarr` for an OME-Zarr ``source``, else :func:`segment_tiffs`
    (chunk / halo / ngff_version / overwrite apply to OME-Zarr only)."""
    if is_ome_zarr(source):
        return segment_zarr(source, output, model, **kw)
    for k in ("chunk", "halo", "ngff_version", "overwrite"):
        kw.pop(k, None)
    return segment_tiffs(source, output, model, **kw)


def decompose(source, output, model, **kw):
    """:func:`decompose_zarr` for an OME-Zarr ``source``, else :func:`decompose_tiffs`."""
    if is_ome_zarr(source):
        return decompose_zarr(source, output, model, **kw)
    for k in ("chunk", "halo", "ngff_version", "overwrite"):
        kw.pop(k, None)
    return decompose_tiffs(source, output, model, **kw)


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lumos.scaleout",
                                 description="Segment or decompose a large OME-Zarr image or a folder of TIFFs "
                                             "with Dask (one model load per worker).")
    sub = ap.add_subparsers(dest="verb", required=True)
    for verb in ("segment", "decompose"):
        p = sub.add_parser(verb, help=f"{verb} an OME-Zarr image or a folder of TIFFs")
        p.add_argument("--model", required=True, help="the .lumos model (a path the workers can read)")
        p.add_argument("--input", required=True, help="an OME-Zarr image (NGFF 0.4 / 0.5), a TIFF or a folder of TIFFs")
        p.add_argument("--out", required=True, help="output OME-Zarr (for an OME-Zarr input) or folder (TIFFs)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (on every worker)")
        where = p.add_mutually_exclusive_group()
        where.add_argument("--scheduler", metavar="ADDRESS", help="a dask.distributed scheduler, e.g. tcp://host:8786")
        where.add_argument("--scheduler-file", metavar="PATH", help="a scheduler file (dask scheduler --scheduler-file)")
        where.add_argument("--local-workers", type=int, metavar="N", help="start a LocalCluster of N worker processes")
        where.add_argument("--synchronous", action="store_true", help="no cluster: Dask's synchronous scheduler")
        p.add_argument("--threads", type=int, help="libtorch threads per worker process")
        p.add_argument("--chunk", type=int, help="chunk edge in pixels (OME-Zarr)")
        p.add_argument("--halo", type=int, help="halo in pixels (OME-Zarr; default: see docs/scale-out.md)")
        p.add_argument("--batch", type=int, help="tiles per forward pass")
        p.add_argument("--mirror", action="store_true", help="test-time mirroring")
        p.add_argument("--ngff", choices=("0.4", "0.5"), help="output NGFF version (default: the input's)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output OME-Zarr")
        if verb == "segment":
            p.add_argument("--probabilities", action="store_true", help="class probabilities instead of labels")
            p.add_argument("--tile", type=int, help="sliding-window tile (default: the model's patch)")
            p.add_argument("--step", type=float, default=0.5, help="step between tiles as a fraction of the tile")
        else:
            p.add_argument("--tile", type=int, default=0, help="tile (default: the training patch)")
            p.add_argument("--keep", type=int, default=0, help="kept centre (default: half the tile)")
            p.add_argument("--samples", type=int, default=1, help="HVAE posterior samples")
            p.add_argument("--seed", type=int, default=0, help="HVAE sampling seed")
            p.add_argument("--channel", type=int, help="input channel when the image has several")
    return ap


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    kw: dict = dict(device=a.device, threads=a.threads, mirror=a.mirror, chunk=a.chunk, halo=a.halo,
                    ngff_version=a.ngff, overwrite=a.overwrite)
    client = None
    if a.scheduler_file:
        from distributed import Client

        client = kw["client"] = Client(scheduler_file=a.scheduler_file)
    elif a.scheduler:
        kw["client"] = a.scheduler
    elif a.synchronous:
        kw["scheduler"] = "synchronous"
    else:
        kw["local_workers"] = a.local_workers
    if a.batch:
        kw["batch_size"] = a.batch
    t0 = time.perf_counter()
    try:
        if a.verb == "segment":
            out = segment(a.input, a.out, a.model, probabilities=a.probabilities, tile=a.tile, step_fraction=a.step,
                          **kw)
        else:
            out = decompose(a.input, a.out, a.model, tile=a.tile, keep=a.keep, samples=a.samples, seed=a.seed,
                            channel=a.channel, **kw)
    finally:
        if client is not None:
            client.close()
    what = f"{len(out)} files to {a.out}" if isinstance(out, list) else str(out)
    print(f"{a.verb}: wrote {what} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    # run the functions of the importable module, not of __main__: tasks must pickle them by
    # reference (lumos.scaleout.*) so that workers share one model cache per process
    from lumos import scaleout as _module

    sys.exit(_module.main())
