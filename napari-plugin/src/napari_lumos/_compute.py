"""The plugin's computations, free of Qt and napari.

Each is a generator that yields ``(message, done, total)`` progress and returns its
result (stardist-napari's pattern): the widgets run them in napari thread workers, tests
and scripts run them synchronously with :func:`run`. All work is done by the engine.
"""

from __future__ import annotations

import pathlib
import queue
import shutil
import tempfile
import threading
from typing import Optional, Sequence

import numpy as np

import lumos


def run(gen):
    """Drives a computation to the end synchronously; returns its result."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def frames_from_arrays(arrays: Sequence[np.ndarray], n_channels: int) -> tuple[np.ndarray, bool]:
    """Builds the engine's ``(T, C, H, W)`` float32 input from napari layer data.

    ``arrays`` is either one array per model channel (each ``(H, W)``, or ``(T, H, W)`` for
    a time series; all the same shape) or a single array holding every channel:
    ``(C, H, W)`` / ``(T, C, H, W)``, or ``(H, W)`` / ``(T, H, W)`` for a one-channel
    model. Returns the frames and whether the input had a time axis."""
    arrays = [np.asarray(a) for a in arrays]
    if len(arrays) == n_channels and (n_channels > 1 or arrays[0].ndim in (2, 3)):
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"the {n_channels} channel layers differ in shape: {sorted(shapes)}")
        a = arrays[0]
        if a.ndim == 2:
            return np.stack(arrays)[None].astype(np.float32, copy=False), False
        if a.ndim == 3:
            return np.stack(arrays, axis=1).astype(np.float32, copy=False), True
        raise ValueError(f"a channel layer must be (H, W) or (T, H, W); got shape {a.shape}")
    if len(arrays) != 1:
        raise ValueError(f"the model takes {n_channels} channels; got {len(arrays)} layers")
    a = arrays[0]
    if a.ndim == 3 and a.shape[0] == n_channels and n_channels > 1:
        return a[None].astype(np.float32, copy=False), False
    if a.ndim == 4 and a.shape[1] == n_channels:
        return a.astype(np.float32, copy=False), True
    raise ValueError(
        f"a multi-channel layer for this model must be ({n_channels}, H, W) or (T, {n_channels}, H, W); "
        f"got shape {a.shape}")


def segment(model: lumos.Model, frames: np.ndarray, *, cancel: Optional[lumos.CancelToken] = None,
            diffusion: Optional[dict] = None):
    """Segments ``(T, C, H, W)`` frames one by one; returns ``(T, H, W)`` uint8 labels."""
    n = frames.shape[0]
    out = np.zeros((n,) + frames.shape[2:], dtype=np.uint8)
    for i in range(n):
        yield f"segmenting frame {i + 1} of {n}", i, n
        out[i] = model.segment(frames[i], cancel=cancel, diffusion=diffusion)
    yield "done", n, n
    return out


def segment_instances(model: lumos.Model, frames: np.ndarray, *, cancel: Optional[lumos.CancelToken] = None,
                      pixel_size: Optional[float] = None, wavelength_nm: Optional[float] = None,
                      min_size: int = 10, diffusion: Optional[dict] = None):
    """Segments ``(T, C, H, W)`` frames into cells; returns ``(labels, table)``.

    ``labels`` is ``(T, H, W)``, uint16 (uint32 past 65,535 cells), one label per cell. With
    several frames the labels continue from frame to frame, so that every cell of the stack has
    its own label and its own row. ``table`` maps column names to one value per cell: the
    engine's measurements (see ``lumos.Model.segment_instances``), plus ``frame``."""
    n = frames.shape[0]
    labels, tables = [], []
    offset = 0
    for i in range(n):
        yield f"segmenting cells in frame {i + 1} of {n}", i, n
        lab, table = model.segment_instances(frames[i], pixel_size=pixel_size, wavelength_nm=wavelength_nm,
                                             min_size=min_size, cancel=cancel, diffusion=diffusion)
        lab = lab.astype(np.uint32)
        if offset:
            lab[lab > 0] += offset
            table["label"] = table["label"] + offset
        offset = int(lab.max()) if lab.size and lab.max() > offset else offset
        table["frame"] = np.full(len(table["label"]), i, dtype=np.int64)
        labels.append(lab)
        tables.append(table)
    yield "done", n, n
    out = np.stack(labels)
    if out.size == 0 or out.max() <= 65535:
        out = out.astype(np.uint16)
    merged = {k: np.concatenate([t[k] for t in tables]) for k in tables[0]} if tables else {}
    return out, merged


def decompose(model: lumos.Model, frames: np.ndarray, *, cancel: Optional[lumos.CancelToken] = None,
              **options):
    """Decomposes ``(T, H, W)`` frames; returns ``(2, T, H, W)`` float32 (one per structure)."""
    n = frames.shape[0]
    out = np.zeros((2,) + frames.shape, dtype=np.float32)
    for i in range(n):
        yield f"decomposing frame {i + 1} of {n}", i, n
        out[:, i] = model.decompose(np.asarray(frames[i], dtype=np.float32), cancel=cancel, **options)
    yield "done", n, n
    return out


def write_training_folder(folder: pathlib.Path, images: np.ndarray, masks: Optional[np.ndarray] = None,
                          targets: Optional[np.ndarray] = None, channel_names=None) -> pathlib.Path:
    """Writes layers as a training folder the engine reads, through the engine's TIFF writer.

    Segmentation: ``images`` ``(T, C, H, W)`` and ``masks`` ``(T, H, W)`` -> ``images/`` +
    ``masks/``. Decomposition: ``targets`` ``(T, 2, H, W)`` -> ``targets/`` (the engine takes
    the input as the sum of the two structures). ``channel_names`` (for example the layer
    names) are stored in the TIFFs; the model keeps them, and the ssQPM names I0, I45, I90,
    I135, phase select the ssQPM normalization."""
    folder = pathlib.Path(folder)
    if targets is not None:
        (folder / "targets").mkdir(parents=True, exist_ok=True)
        for i, t in enumerate(targets):
            lumos.write_image_tiff(folder / "targets" / f"frame_{i:04d}.tif", t, channel_names=channel_names)
        return folder
    if masks is None or masks.shape[0] != images.shape[0] or masks.shape[1:] != images.shape[2:]:
        raise ValueError(f"labels of shape {None if masks is None else masks.shape} do not match images "
                         f"{images.shape}; expected (T, H, W) with the images' T, H, W")
    if masks.max() > 255 or masks.min() < 0:
        raise ValueError("class labels must lie in 0..255")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for i, (x, m) in enumerate(zip(images, masks)):
        lumos.write_image_tiff(folder / "images" / f"frame_{i:04d}.tif", x, channel_names=channel_names)
        lumos.write_mask_tiff(folder / "masks" / f"frame_{i:04d}.tif", m.astype(np.uint8))
    return folder


def train(data_dir, output, config: dict, *, cancel: Optional[lumos.CancelToken] = None,
          remove_data: bool = False):
    """Trains through the engine; yields ``(message, done, total, event)`` for every progress
    event (``event`` is the engine's progress dict) and returns the trained ``lumos.Model``.

    The engine's blocking ``lumos_train`` runs on a helper thread; its progress callback
    feeds a queue this generator drains, so a napari worker can stream the events to the
    GUI. Cancelling ``cancel`` stops training at the next iteration; the engine keeps the
    last checkpoint (``OUTPUT.ckpt``) and this generator raises the CANCELLED error. A
    generator closed before the end (its napari worker quit) cancels the training too.
    ``remove_data``: delete ``data_dir`` when the training has ended (a temporary folder
    written from layers)."""
    events: queue.Queue = queue.Queue()
    result: dict = {}
    token = cancel if cancel is not None else lumos.CancelToken()

    def work():
        try:
            result["model"] = lumos.train(data_dir, output, config, progress=events.put, cancel=token)
        except BaseException as e:  # re-raised in the generator's thread
            result["error"] = e
        finally:
            if remove_data:
                shutil.rmtree(data_dir, ignore_errors=True)
            events.put(None)

    thread = threading.Thread(target=work, name="lumos-train", daemon=True)
    thread.start()
    done, total = 0, 0
    finished = False
    try:
        while True:
            ev = events.get()
            if ev is None:
                finished = True
                break
            if ev["stage"] == 1:  # the trainer's own count (PG-DiffSeg reports its autoencoder epochs too)
                total = ev["epochs"] * ev["iterations"]
                done = min(total, ev["epoch"] * ev["iterations"] + ev["iteration"] + 1)
            yield describe(ev), done, total, ev
    finally:
        if not finished:
            # closed early: nobody will read the result, so stop the run (the checkpoint stays)
            token.cancel()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["model"]


STAGES = {0: "preparing", 1: "training", 2: "validated", 3: "checkpoint written", 4: "inference", 5: "finished"}


def export(model_path, out, **options):
    """Exports a model file to the bioimage.io format (a folder, or a .zip package); the
    engine traces the network and checks the saved TorchScript against itself. Returns the
    export report."""
    yield "exporting to bioimage.io (tracing the network) ...", 0, 1
    report = lumos.export_bioimageio(model_path, out, **options)
    yield "exported", 1, 1
    return report


def describe(ev: dict) -> str:
    """One line for a progress event."""
    s = f"{STAGES.get(ev['stage'], ev['stage'])}: epoch {ev['epoch'] + 1}/{ev['epochs']}"
    if ev["stage"] == 1:
        s += f", iteration {ev['iteration'] + 1}/{ev['iterations']}, loss {ev['loss']:.4f}"
    if ev["stage"] == 2 and ev["val_metric"] == ev["val_metric"]:  # not NaN
        s += f", validation {ev['val_metric']:.3f}"
    return s


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """A text plot of the loss history (the last ``width`` values)."""
    v = np.asarray(list(values)[-width:], dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return ""
    lo, hi = v.min(), v.max()
    scale = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    return "".join(SPARK[int(round(s * (len(SPARK) - 1)))] for s in scale)


def temporary_folder(prefix: str = "lumos-layers-") -> pathlib.Path:
    return pathlib.Path(tempfile.mkdtemp(prefix=prefix))
