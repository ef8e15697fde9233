"""The dock widgets: Segment, Decompose, Train, Export (bioimage.io).

Each widget gathers its inputs on the GUI thread, runs a ``_compute`` generator in a
napari thread worker (the viewer stays responsive), shows progress in its own bar and in
napari's activity dock, and can be stopped: Stop cancels the engine's work through a
``lumos.CancelToken`` (a training keeps its last checkpoint). Results become layers.
"""

from __future__ import annotations

import pathlib
import shutil
from typing import TYPE_CHECKING, Optional

import numpy as np
from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, LineEdit, ProgressBar,
                              PushButton, Select, SpinBox)

import lumos

from . import _compute

if TYPE_CHECKING:
    import napari

SEPARATE = "one layer per channel"
STACKED = "one multi-channel layer"


def _image_names(viewer) -> list:
    from napari.layers import Image

    return [layer.name for layer in viewer.layers if isinstance(layer, Image)]


def _check_layer(layer) -> None:
    """Rejects image layers whose data is not a plain array of intensities."""
    if getattr(layer, "rgb", False):
        raise ValueError(f"layer '{layer.name}' is an RGB(A) image; the models take grey-value channels: split it "
                         "(napari: right-click > Split RGB) and choose the channels")
    if getattr(layer, "multiscale", False):
        raise ValueError(f"layer '{layer.name}' is a multiscale image; open its full-resolution level as a layer")


def _placement(layer, ndim: int) -> dict:
    """The source layer's scale and translate for a result of ``ndim`` dimensions, so that
    it lands on the source: the same axes, or the source's axes without its channel axis
    (third from last) when the source holds the channels ((C, H, W) or (T, C, H, W))."""
    if layer is None:
        return {}
    scale, translate = list(layer.scale), list(layer.translate)
    if len(scale) == ndim + 1:
        del scale[-3], translate[-3]
    if len(scale) != ndim:
        return {}
    return {"scale": scale, "translate": translate}


def _labels_names(viewer) -> list:
    from napari.layers import Labels

    return [layer.name for layer in viewer.layers if isinstance(layer, Labels)]


def _message_label(value: str = "") -> Label:
    """A label for messages of any length (file paths, errors): it wraps and never widens
    the dock, which would squeeze the viewer's canvas; the full text is also its tooltip."""
    from qtpy.QtWidgets import QSizePolicy

    label = Label(value=value)
    label.native.setWordWrap(True)
    label.native.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
    label.native.setMinimumWidth(0)
    label.changed.connect(lambda v: label.native.setToolTip(str(v)))
    return label


class JobFailed(Exception):
    """Carries a job's error (a ``lumos.LumosError`` or other RuntimeError) out of the worker."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class _Job(Container):
    """Shared machinery: a Run and a Stop button, a progress bar and a status line; runs a
    computation in a napari thread worker. Subclasses define `prepare` and `_on_result`."""

    run_text = "Run"

    def __init__(self, viewer: napari.viewer.Viewer):
        # scrollable: a tall widget (Train) then scrolls in its dock instead of squeezing
        # the canvas to nothing on a small screen
        super().__init__(scrollable=True)
        self._viewer = viewer
        self._worker = None
        self._token: Optional[lumos.CancelToken] = None
        self._pbar = None
        self.run_button = PushButton(text=self.run_text)
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, visible=False)
        self.status = _message_label()
        self.run_button.changed.connect(self._start)
        self.stop_button.changed.connect(self.stop)
        # layer choices follow the viewer
        viewer.layers.events.inserted.connect(self.reset_choices)
        viewer.layers.events.removed.connect(self.reset_choices)
        viewer.layers.events.moved.connect(self.reset_choices)

    def _controls(self):
        return [self.run_button, self.stop_button, self.progress, self.status]

    # -- running -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._worker is not None

    def _start(self, *_):
        if self.running:
            return
        try:
            gen = self.prepare()
        except (ValueError, lumos.LumosError, OSError) as e:
            self.status.value = f"cannot start: {e}"
            return
        from napari.qt.threading import create_worker
        from napari.utils import progress

        self._pbar = progress(total=0, desc=self.run_text)
        self.progress.visible = True
        self.progress.value = 0
        self.run_button.enabled = False
        self.stop_button.enabled = True
        self._set_inputs_enabled(False)

        def job():
            try:
                return (yield from gen)
            except RuntimeError as e:
                # superqt's generator worker takes a RuntimeError for "the worker was
                # deleted" and ends without `errored` or `finished`; LumosError is one
                raise JobFailed(e) from e

        self._worker = create_worker(job, _ignore_errors=True)  # _on_error reports them
        self._worker.yielded.connect(self._on_progress)
        self._worker.returned.connect(self._on_result)
        self._worker.errored.connect(self._on_error)
        self._worker.finished.connect(self._on_finished)
        self._worker.start()

    def stop(self, *_):
        """Asks the engine to stop; the worker ends with a CANCELLED error."""
        if self._token is not None:
            self._token.cancel()
            self.status.value = "stopping ..."

    def _on_progress(self, update):
        message, done, total = update[:3]
        self.status.value = message
        if total:
            self.progress.max = total
            self.progress.value = done
            pbar = self._pbar  # updating it may run the event loop, which may finish the job
            if pbar is not None:
                pbar.total = total
                pbar.n = done
                pbar.set_description(message[:60])
                pbar.refresh()
        self.on_event(update)

    def _on_error(self, e):
        e = e.error if isinstance(e, JobFailed) else e
        if isinstance(e, lumos.LumosError) and e.name == "CANCELLED":
            self.status.value = self.cancelled_message()
        else:
            self.status.value = f"failed: {e}"

    def _on_finished(self):
        self._worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.run_button.enabled = True
        self.stop_button.enabled = False
        self._set_inputs_enabled(True)
        if self._token is not None:
            self._token.close()
            self._token = None

    def _new_token(self) -> lumos.CancelToken:
        self._token = lumos.CancelToken()
        return self._token

    # -- for subclasses ------------------------------------------------------------------
    # Each widget defines `prepare()` (reads the inputs on the GUI thread and returns the
    # `_compute` generator to run) and `_on_result(result)` (turns the result into layers);
    # the two hooks below are optional.
    def on_event(self, update):
        pass

    def _set_inputs_enabled(self, enabled: bool):
        """Inputs that must not change while a job runs (a job holds on to them)."""

    def cancelled_message(self) -> str:
        return "stopped"


class _ModelJob(_Job):
    """A job that needs a model file."""

    def __init__(self, viewer):
        super().__init__(viewer)
        self.model_file = FileEdit(label="model", filter="*.lumos", mode="r")
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda"], value="auto")
        self.bf16 = CheckBox(text="bfloat16 (faster on recent GPUs)", value=False,
                             tooltip="inference under bfloat16 autocast: faster on GPUs with tensor cores and on "
                                     "CPUs with AVX-512 BF16; probabilities change at bfloat16 rounding")
        self.model_info = _message_label("no model loaded")
        self.model: Optional[lumos.Model] = None
        self._model_key = None
        self._job_model: Optional[lumos.Model] = None  # the model the running job uses
        self.model_file.changed.connect(self._load_model)
        self.device.changed.connect(self._load_model)
        self.bf16.changed.connect(self._set_precision)

    def _set_precision(self, *_):
        if self.model is not None:
            self.model.precision = "bfloat16" if self.bf16.value else "float32"

    def _set_inputs_enabled(self, enabled: bool):
        # the running job uses the loaded model: no other model, device or precision until it ends
        for w in (self.model_file, self.device, self.bf16):
            w.enabled = enabled

    def _load_model(self, *_):
        raw = str(self.model_file.value or "")
        path = pathlib.Path(raw)
        if raw in ("", ".") or path.is_dir():
            return  # nothing chosen yet
        if not path.is_file():
            # say so, and do not run the next job with the previously loaded model
            self.model_info.value = f"cannot load: no such file {path}"
            if self.model is not None:
                self.model.close()
            self.model, self._model_key = None, None
            return
        key = (str(path), self.device.value)
        if key == self._model_key:
            return
        try:
            model = lumos.Model(path, device=self.device.value)
        except (lumos.LumosError, OSError) as e:  # OSError: LumosLibraryError, the library itself
            self.model_info.value = f"cannot load: {e}"
            return
        if self.model is not None:
            self.model.close()  # waits for calls in progress (none: inputs are locked during jobs)
        self.model, self._model_key = model, key
        self._set_precision()
        self.model_info.value = (f"{model.kind}: {', '.join(model.channel_names)} -> "
                                 f"{', '.join(model.class_names)}")
        self.on_model()

    def load(self, path, device: str = "auto"):
        """Loads a model file (what choosing it in the file field does)."""
        self.device.value = device
        self.model_file.value = str(path)
        self._load_model()

    def on_model(self):
        pass

    def _require_model(self) -> lumos.Model:
        if self.model is None:
            raise ValueError("choose a model file first")
        self._job_model = self.model
        return self.model


def _pixel_size_of(layer) -> float:
    """The layer's pixel size in its scale's units (µm by convention), or 0 when the scale is
    napari's default of 1 (unknown) or not square."""
    if layer is None:
        return 0.0
    sy, sx = (float(v) for v in layer.scale[-2:])
    return sx if sx == sy and sx != 1.0 and sx > 0 else 0.0


class SegmentWidget(_ModelJob):
    """Segments image layers with a DM-QPMNet, nnU-Net or PG-DiffSeg model into a labels layer:
    pixel classes, or one label per cell with a measurement table (instances)."""

    run_text = "Segment"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer)
        self.layout_choice = ComboBox(label="input", choices=[SEPARATE, STACKED], value=SEPARATE)
        self.stacked = ComboBox(label="layer", choices=lambda _: _image_names(viewer), visible=False)
        self.channels = [ComboBox(label=f"channel {i}", choices=lambda _: _image_names(viewer), visible=i == 0)
                         for i in range(5)]
        # PG-DiffSeg sampling
        self.start = ComboBox(label="starting noise", choices=["prior", "random", "forward"], value="prior",
                              visible=False)
        # the engine's DDIM schedules take 1 to 999 steps
        self.inversion_steps = SpinBox(label="inversion steps", min=1, max=999, value=100, visible=False)
        self.sampling_steps = SpinBox(label="sampling steps", min=1, max=999, value=200, visible=False)
        self.samples = SpinBox(label="samples (voting)", min=1, max=50, value=1, visible=False)
        self.eta = FloatSpinBox(label="eta", min=0.0, max=1.0, step=0.1, value=0.0, visible=False)
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0, visible=False)
        # instances: one label per cell, measured
        self.instances = CheckBox(text="instances (one label per cell, with measurements)", value=False)
        self.pixel_size = FloatSpinBox(label="pixel size (µm, 0 = unknown)", min=0.0, max=1000.0, step=0.01,
                                       value=0.0, visible=False)
        self.wavelength = FloatSpinBox(label="wavelength (nm, 0 = no dry mass)", min=0.0, max=10000.0, step=1.0,
                                       value=0.0, visible=False)
        self.min_size = SpinBox(label="smallest cell (pixels)", min=0, max=10**6, value=10, visible=False)
        self.instances.changed.connect(self._show_instance_options)
        self.layout_choice.changed.connect(self._show_inputs)
        self.extend([self.model_file, self.device, self.bf16, self.model_info, self.layout_choice, self.stacked,
                     *self.channels,
                     self.start, self.inversion_steps, self.sampling_steps, self.samples, self.eta, self.seed,
                     self.instances, self.pixel_size, self.wavelength, self.min_size,
                     *self._controls()])

    def _show_instance_options(self, *_):
        on = self.instances.value
        for w in (self.pixel_size, self.wavelength, self.min_size):
            w.visible = on

    def _diffusion_widgets(self):
        return [self.start, self.inversion_steps, self.sampling_steps, self.samples, self.eta, self.seed]

    def on_model(self):
        m = self.model
        names = _image_names(self._viewer)
        for i, combo in enumerate(self.channels):
            if i < m.n_input_channels:
                combo.label = m.channel_names[i]
                combo.reset_choices()
                if m.channel_names[i] in names:  # the simulators' layers carry the channel names
                    combo.value = m.channel_names[i]
        is_diff = m.kind == "pgdiff"
        for w in self._diffusion_widgets():
            w.visible = is_diff
        if is_diff:
            d = m.diffusion_options()
            self.start.value = d["start"]
            self.inversion_steps.value = d["inversion_steps"]
            self.sampling_steps.value = d["sampling_steps"]
            self.samples.value = d["samples"]
            self.eta.value = d["eta"]
            if d["seed"] <= self.seed.max:
                self.seed.value = d["seed"]
            else:  # a seed saved by the library (64-bit) beyond the spin box's range
                self.seed.value = 0
                self.model_info.value += f" (saved seed {d['seed']} is beyond this widget's range; seed set to 0)"
        self._show_inputs()

    def _show_inputs(self, *_):
        n = self.model.n_input_channels if self.model is not None else 1
        stacked = self.layout_choice.value == STACKED
        self.stacked.visible = stacked
        for i, combo in enumerate(self.channels):
            combo.visible = not stacked and i < n

    def prepare(self):
        m = self._require_model()
        if not m.can_segment:
            raise ValueError(f"a {m.kind} model does not segment; use the Decompose widget")
        if self.layout_choice.value == STACKED:
            names = [self.stacked.value]
        else:
            names = [c.value for c in self.channels[:m.n_input_channels]]
        if any(n is None for n in names):
            raise ValueError("choose an image layer for every channel")
        for n in names:
            _check_layer(self._viewer.layers[n])
        frames, has_t = _compute.frames_from_arrays([self._viewer.layers[n].data for n in names], m.n_input_channels)
        self._source = names[-1]
        self._has_t = has_t
        diffusion = None
        if m.kind == "pgdiff":
            diffusion = {"start": self.start.value, "inversion_steps": self.inversion_steps.value,
                         "sampling_steps": self.sampling_steps.value, "samples": self.samples.value,
                         "eta": self.eta.value, "seed": self.seed.value}
        self._instances = self.instances.value
        if self._instances:
            src = self._viewer.layers[names[-1]]
            px = self.pixel_size.value or _pixel_size_of(src)
            return _compute.segment_instances(m, frames, cancel=self._new_token(), pixel_size=px or None,
                                              wavelength_nm=self.wavelength.value or None,
                                              min_size=self.min_size.value, diffusion=diffusion)
        return _compute.segment(m, frames, cancel=self._new_token(), diffusion=diffusion)

    def _on_result(self, result):
        m = self._job_model
        src = self._viewer.layers[self._source] if self._source in self._viewer.layers else None
        if self._instances:
            labels, table = result
            data = labels if self._has_t else labels[0]
            features = {"index": table["label"], **table}
            layer = self._viewer.add_labels(data, name=f"{self._source} cells", features=features,
                                            metadata={"class_names": m.class_names, "measurements": table},
                                            opacity=0.5, **_placement(src, data.ndim))
            self.table = show_table(self._viewer, table, f"{layer.name} measurements")
            self.status.value = f"done: {layer.name}, {len(table['label'])} cells"
            return
        data = result if self._has_t else result[0]
        layer = self._viewer.add_labels(data, name=f"{self._source} {m.kind} labels",
                                        metadata={"class_names": m.class_names}, opacity=0.5, **_placement(src, data.ndim))
        classes = ", ".join(f"{i} {n}" for i, n in enumerate(m.class_names))
        self.status.value = f"done: {layer.name} ({classes})"


def show_table(viewer, table: dict, name: str):
    """Docks a table view of per-cell measurements (one row per cell) below the canvas."""
    from magicgui.widgets import Table

    shown = {k: [v.item() if hasattr(v, "item") else v for v in col] for k, col in table.items()}
    widget = Table(value=shown)
    widget.read_only = True
    viewer.window.add_dock_widget(widget, name=name, area="bottom")
    return widget


class DecomposeWidget(_ModelJob):
    """Splits a fluorescence layer into its two structures with a muSplit model."""

    run_text = "Decompose"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer)
        self.image = ComboBox(label="image", choices=lambda _: _image_names(viewer))
        self.tile = SpinBox(label="tile (0 = training patch)", min=0, max=4096, value=0)
        self.keep = SpinBox(label="kept centre (0 = half)", min=0, max=4096, value=0)
        self.samples = SpinBox(label="posterior samples", min=1, max=100, value=1)
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self.extend([self.model_file, self.device, self.bf16, self.model_info, self.image, self.tile, self.keep,
                     self.samples, self.seed, *self._controls()])

    def prepare(self):
        m = self._require_model()
        if not m.can_decompose:
            raise ValueError(f"a {m.kind} model does not decompose; use the Segment widget")
        if self.image.value is None:
            raise ValueError("choose an image layer")
        _check_layer(self._viewer.layers[self.image.value])
        data = np.asarray(self._viewer.layers[self.image.value].data)
        if data.ndim not in (2, 3):
            raise ValueError(f"the image must be (H, W) or (T, H, W); got shape {data.shape}")
        self._source, self._has_t = self.image.value, data.ndim == 3
        frames = data if self._has_t else data[None]
        return _compute.decompose(m, frames, cancel=self._new_token(), tile=self.tile.value, keep=self.keep.value,
                                  samples=self.samples.value, seed=self.seed.value)

    def _on_result(self, parts):
        m = self._job_model
        names = m.class_names if len(m.class_names) == 2 else ["structure 1", "structure 2"]
        src = self._viewer.layers[self._source] if self._source in self._viewer.layers else None
        for part, name, cmap in zip(parts, names, ("magenta", "green")):
            data = part if self._has_t else part[0]
            self._viewer.add_image(data, name=f"{self._source} {name}", colormap=cmap, blending="additive",
                                   **_placement(src, data.ndim))
        self.status.value = f"done: {self._source} -> {names[0]} + {names[1]}"


class ExportWidget(_ModelJob):
    """Exports a model to the bioimage.io model format in one action (for deepImageJ,
    bioimageio.core and the bioimage.io model zoo)."""

    run_text = "Export to bioimage.io"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer)
        self.output = FileEdit(label="package (.zip or folder)", filter="*.zip", mode="w")
        self.model_name = LineEdit(label="name (empty = from the model)", value="")
        self.authors = LineEdit(label="authors (Name; affiliation; ORCID, separated by |)", value="")
        self.license = LineEdit(label="license (SPDX)", value="CC-BY-4.0")
        self.extend([self.model_file, self.model_info, self.output, self.model_name, self.authors, self.license,
                     *self._controls()])
        self.stop_button.visible = False  # tracing is short and not interruptible

    def on_model(self):
        if not str(self.output.value) or str(self.output.value) == ".":
            path = pathlib.Path(str(self.model_file.value))
            self.output.value = str(path.with_name(path.stem + ".bioimageio.zip"))

    def prepare(self):
        self._require_model()
        out = pathlib.Path(str(self.output.value))
        if not str(self.output.value) or out == pathlib.Path("."):
            raise ValueError("choose where to write the package (.zip or a new folder)")
        options = {"license": self.license.value.strip() or "CC-BY-4.0"}
        if self.model_name.value.strip():
            options["name"] = self.model_name.value.strip()
        authors = [a.strip() for a in self.authors.value.split("|") if a.strip()]
        if authors:
            options["authors"] = [_person(a) for a in authors]
        return _compute.export(pathlib.Path(str(self.model_file.value)), out, **options)

    def _on_result(self, report):
        self.last_report = report
        self.status.value = (f"done: {report['path']} (exported graph vs engine: max difference "
                             f"{report['self_check']:.1e})")


def _person(text: str) -> dict:
    """"Name; affiliation; ORCID" -> the rdf's author fields."""
    parts = [p.strip() for p in text.split(";")]
    person = {"name": parts[0]}
    for key, value in zip(("affiliation", "orcid"), parts[1:]):
        if value:
            person[key] = value
    return person


class TrainWidget(_Job):
    """Trains a model from a data folder or from layers, with live loss and a Stop button."""

    run_text = "Train"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer)
        self.method = ComboBox(label="method", choices=list(lumos.RECIPES), value="dm-qpmnet")
        self.size = ComboBox(label="size", choices=["tiny", "cpu", "paper"], value="cpu")
        self.source = ComboBox(label="data", choices=["folder", "layers"], value="folder")
        self.folder = FileEdit(label="data folder", mode="d")
        self.images = Select(label="image layers (channels, in order)", choices=lambda _: _image_names(viewer),
                             visible=False)
        self.labels = ComboBox(label="labels layer", choices=lambda _: _labels_names(viewer), visible=False)
        self.epochs = SpinBox(label="epochs", min=1, max=100000, value=25)
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda"], value="auto")
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self.output = FileEdit(label="save model as", mode="w", filter="*.lumos", value="model.lumos")
        self.resume = CheckBox(label="resume from the checkpoint", value=False)
        self.loss_plot = Label(value="")
        self.losses: list = []
        self.events: list = []
        self.model: Optional[lumos.Model] = None
        self.method.changed.connect(self._recipe_changed)
        self.size.changed.connect(self._recipe_changed)
        self.source.changed.connect(self._show_source)
        self.extend([self.method, self.size, self.source, self.folder, self.images, self.labels, self.epochs,
                     self.device, self.seed, self.output, self.resume, *self._controls(), self.loss_plot])
        self._recipe_changed()

    def _recipe_changed(self, *_):
        self.epochs.value = lumos.train_recipe(self.method.value, self.size.value)["epochs"]
        self._show_source()

    def _show_source(self, *_):
        layers = self.source.value == "layers"
        self.folder.visible = not layers
        self.images.visible = layers
        self.labels.visible = layers and not self.method.value.startswith("musplit")
        self.images.label = ("structure layers (two)" if self.method.value.startswith("musplit")
                             else "image layers (channels, in order)")

    def config(self) -> dict:
        cfg = lumos.train_recipe(self.method.value, self.size.value)
        cfg.update(epochs=self.epochs.value, device=self.device.value, seed=self.seed.value,
                   resume=bool(self.resume.value))
        return cfg

    def _data_from_layers(self) -> pathlib.Path:
        names = [n for n in _image_names(self._viewer) if n in (self.images.value or [])]  # layer-list order
        if not names:
            raise ValueError("select the image layers to train on")
        for n in names:
            _check_layer(self._viewer.layers[n])
        arrays = [np.asarray(self._viewer.layers[n].data) for n in names]
        folder = _compute.temporary_folder()
        try:
            if self.method.value.startswith("musplit"):
                if len(arrays) != 2:
                    raise ValueError(f"muSplit trains on the two structures: select two layers, not {len(arrays)}")
                targets, _ = _compute.frames_from_arrays(arrays, 2)
                return _compute.write_training_folder(folder, targets, targets=targets, channel_names=names)
            if self.labels.value is None:
                raise ValueError("choose the labels layer with the classes to learn")
            frames, has_t = _compute.frames_from_arrays(arrays, len(arrays))
            masks = np.asarray(self._viewer.layers[self.labels.value].data)
            masks = masks if has_t else masks[None]
            return _compute.write_training_folder(folder, frames, masks=masks, channel_names=names)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def prepare(self):
        cfg = self.config()
        out = pathlib.Path(str(self.output.value))
        if out.suffix != ".lumos":
            raise ValueError(f"the model file should end in .lumos: {out}")
        from_layers = self.source.value == "layers"
        data = self._data_from_layers() if from_layers else pathlib.Path(str(self.folder.value))
        self.losses, self.events = [], []
        self._output = out
        # a folder written from layers is temporary: removed when the training ends
        return _compute.train(data, out, cfg, cancel=self._new_token(), remove_data=from_layers)

    def on_event(self, update):
        ev = update[3]
        self.events.append(ev)
        if ev["stage"] == 1 and ev["loss"] == ev["loss"]:
            self.losses.append(ev["loss"])
            self.loss_plot.value = f"loss {_compute.sparkline(self.losses)} {ev['loss']:.4f}"

    def _on_result(self, model):
        if self.model is not None:
            self.model.close()
        self.model = model
        self.status.value = f"trained: {self._output}"

    def cancelled_message(self) -> str:
        ckpt = pathlib.Path(str(self._output) + ".ckpt")
        kept = f"; last checkpoint kept: {ckpt} (tick 'resume' to continue)" if ckpt.is_file() else ""
        return "stopped" + kept
