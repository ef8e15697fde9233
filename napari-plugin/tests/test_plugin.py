"""The plugin in a real napari viewer (under Xvfb via pytest-xvfb): each widget docked, run
on sample data, its output layers checked and a screenshot saved and checked not blank."""

from __future__ import annotations

import importlib.resources
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import lumos
from napari_lumos import _compute

PLUGIN = "napari-lumos"
# the installed package's manifest (the source tree's in an editable install; the wheel's
# when scripts/test-installed.sh runs these tests against the installed napari_lumos)
MANIFEST = pathlib.Path(str(importlib.resources.files("napari_lumos") / "napari.yaml"))


def wait_done(qtbot, widget, timeout=120_000):
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def sized(viewer):
    """Gives the window a fixed size and lets Qt lay it out: with a tall dock widget the
    canvas can otherwise be squeezed to nothing, and its screenshot is an empty image."""
    from qtpy.QtWidgets import QApplication

    import time

    viewer.window._qt_window.resize(1400, 800)
    # the layout settles over several event-loop turns (more of them on a busy machine):
    # wait until the canvas has a real size
    native = viewer.window._qt_viewer.canvas._scene_canvas.native
    deadline = time.monotonic() + 10
    while True:
        QApplication.processEvents()
        if (native.width() > 100 and native.height() > 100) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    viewer.reset_view()
    QApplication.processEvents()


def screenshot(viewer, path: pathlib.Path) -> np.ndarray:
    from skimage.io import imsave  # napari depends on scikit-image

    sized(viewer)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    imsave(path, shot, check_contrast=False)
    return shot


def canvas_not_blank(viewer):
    sized(viewer)
    canvas = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
    assert canvas.std() > 5.0, f"the canvas looks blank (std {canvas.std():.2f})"


def test_manifest_validates():
    r = subprocess.run([sys.executable, "-m", "npe2", "validate", PLUGIN], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    from npe2 import PluginManifest

    pm = PluginManifest.from_file(MANIFEST)
    pm.validate_imports()
    assert {w.display_name for w in pm.contributions.widgets} == {"Segment", "Decompose", "Train", "Export to bioimage.io"}


def test_frames_from_arrays():
    a = np.zeros((8, 9), np.float32)
    f, t = _compute.frames_from_arrays([a] * 5, 5)
    assert f.shape == (1, 5, 8, 9) and not t
    f, t = _compute.frames_from_arrays([np.zeros((3, 8, 9))] * 5, 5)
    assert f.shape == (3, 5, 8, 9) and t
    f, t = _compute.frames_from_arrays([np.zeros((5, 8, 9))], 5)
    assert f.shape == (1, 5, 8, 9) and not t
    f, t = _compute.frames_from_arrays([np.zeros((4, 8, 9))], 1)
    assert f.shape == (4, 1, 8, 9) and t
    with pytest.raises(ValueError, match="differ in shape"):
        _compute.frames_from_arrays([a, a, a, a, np.zeros((8, 8))], 5)
    with pytest.raises(ValueError, match=r"\(5, H, W\)"):
        _compute.frames_from_arrays([np.zeros((4, 8, 9))], 5)


def test_sample_data(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "ssqpm")
    assert [l.name for l in viewer.layers] == ["I0", "I45", "I90", "I135", "phase", "cells (truth)"]
    assert viewer.layers["phase"].data.shape == (256, 256)
    viewer.open_sample(PLUGIN, "qpi")
    assert set(np.unique(viewer.layers["live/dead (truth)"].data)) <= {0, 1, 2}
    viewer.open_sample(PLUGIN, "fluo")
    assert viewer.layers["mixed"].data.shape == (256, 256)


def test_segment_dmqpm_from_five_layers(make_napari_viewer, qtbot, models, screenshot_dir):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "ssqpm")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.load(models["dmqpm"], "cpu")
    assert widget.model.kind == "dmqpm"
    # the channels were matched to the layers by name
    assert [c.value for c in widget.channels] == ["I0", "I45", "I90", "I135", "phase"]
    widget.run_button.clicked()
    wait_done(qtbot, widget)
    assert widget.status.value.startswith("done"), widget.status.value
    labels = viewer.layers["phase dmqpm labels"]
    assert labels.data.shape == (256, 256) and labels.data.dtype == np.uint8 and labels.data.max() <= 1
    # the widget gives what the binding gives
    with lumos.Model(models["dmqpm"], device="cpu") as m:
        x = np.stack([viewer.layers[n].data for n in ["I0", "I45", "I90", "I135", "phase"]])
        np.testing.assert_array_equal(labels.data, m.segment(x))
    # the bfloat16 box sets the loaded model's precision, and a reloaded model keeps it
    assert widget.model.precision == "float32"
    widget.bf16.value = True
    assert widget.model.precision == "bfloat16"
    widget.device.value = "auto"
    assert widget.model.precision == "bfloat16"
    widget.bf16.value = False
    assert widget.model.precision == "float32"
    viewer.layers["cells (truth)"].visible = False
    canvas_not_blank(viewer)
    screenshot(viewer, screenshot_dir / "napari-segment-dmqpm.png")


def test_segment_instances_with_measurements(make_napari_viewer, qtbot, models, screenshot_dir):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "ssqpm")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.load(models["dmqpm"], "cpu")
    widget.instances.value = True
    assert not widget.pixel_size.native.isHidden() and not widget.wavelength.native.isHidden()
    widget.pixel_size.value = 0.5
    widget.wavelength.value = 532.0
    widget.run_button.clicked()
    wait_done(qtbot, widget)
    assert widget.status.value.startswith("done"), widget.status.value
    layer = viewer.layers["phase cells"]
    assert layer.data.shape == (256, 256) and layer.data.dtype == np.uint16
    n = int(layer.data.max())
    assert n >= 1
    # one feature row per cell, keyed by its label, with the engine's measurements
    f = layer.features
    assert list(f["index"]) == list(range(1, n + 1)) == list(f["label"])
    for col in ("area_px", "area_um2", "dry_mass_pg", "mean_phase", "class"):
        assert col in f.columns, list(f.columns)
    areas = np.bincount(layer.data.ravel(), minlength=n + 1)[1:]
    np.testing.assert_array_equal(f["area_px"].to_numpy(), areas)
    np.testing.assert_allclose(f["area_um2"].to_numpy(), areas * 0.25)
    # the binding gives the same cells
    with lumos.Model(models["dmqpm"], device="cpu") as m:
        x = np.stack([viewer.layers[c].data for c in ["I0", "I45", "I90", "I135", "phase"]])
        lab, table = m.segment(x, instances=True, pixel_size=0.5, wavelength_nm=532.0)
        np.testing.assert_array_equal(layer.data, lab)
        np.testing.assert_allclose(table["dry_mass_pg"], f["dry_mass_pg"].to_numpy())
    # the table view shows one row per cell
    assert widget.table.shape[0] == n
    viewer.layers["cells (truth)"].visible = False
    canvas_not_blank(viewer)
    screenshot(viewer, screenshot_dir / "napari-instances.png")


def test_segment_one_multichannel_layer_time_series(make_napari_viewer, qtbot, models):
    viewer = make_napari_viewer(show=True)
    stack = np.stack([lumos.simulate("ssqpm", seed=s, size=64)[0] for s in (3, 4)])  # (T, 5, H, W)
    viewer.add_image(stack, name="ssqpm stack")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.load(models["dmqpm"], "cpu")
    widget.layout_choice.value = "one multi-channel layer"
    widget.stacked.value = "ssqpm stack"
    widget.run_button.clicked()
    wait_done(qtbot, widget)
    labels = viewer.layers["ssqpm stack dmqpm labels"].data
    assert labels.shape == (2, 64, 64)
    with lumos.Model(models["dmqpm"], device="cpu") as m:
        for t in range(2):
            np.testing.assert_array_equal(labels[t], m.segment(stack[t]))


def test_segment_pgdiff_one_phase_layer(make_napari_viewer, qtbot, models, screenshot_dir):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "qpi")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.load(models["pgdiff"], "cpu")
    assert not widget.start.native.isHidden() and widget.sampling_steps.value == 3
    assert widget.channels[0].value == "phase" and widget.channels[1].native.isHidden()
    widget.samples.value = 2
    widget.seed.value = 5
    widget.run_button.clicked()
    wait_done(qtbot, widget)
    assert widget.status.value.startswith("done"), widget.status.value
    labels = viewer.layers["phase pgdiff labels"].data
    assert labels.shape == (256, 256) and labels.max() <= 2
    with lumos.Model(models["pgdiff"], device="cpu") as m:
        expect = m.segment(viewer.layers["phase"].data[None], diffusion={"samples": 2, "seed": 5})
    np.testing.assert_array_equal(labels, expect)
    viewer.layers["live/dead (truth)"].visible = False
    canvas_not_blank(viewer)
    screenshot(viewer, screenshot_dir / "napari-segment-pgdiff.png")


def long_pgdiff_job(make_napari_viewer, models, frames: int, sampling_steps: int):
    """A Segment widget started on a PG-DiffSeg job long enough to act on while it runs:
    ``frames`` simulated 256 x 256 phase frames, ``sampling_steps`` DDIM steps each."""
    viewer = make_napari_viewer(show=True)
    stack = np.stack([lumos.simulate("qpi", seed=s, size=256)[0][0] for s in range(frames)])
    viewer.add_image(stack, name="phase")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.load(models["pgdiff"], "cpu")
    widget.sampling_steps.value = sampling_steps
    widget.run_button.clicked()
    return viewer, widget


def test_segment_stops_on_request(make_napari_viewer, qtbot, models):
    viewer, widget = long_pgdiff_job(make_napari_viewer, models, 6, 50)
    qtbot.waitUntil(lambda: widget.progress.max == 6, timeout=60_000)
    widget.stop()
    wait_done(qtbot, widget)
    assert widget.status.value == "stopped"
    assert "phase pgdiff labels" not in viewer.layers


def test_decompose_widget(make_napari_viewer, qtbot, models, screenshot_dir):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "fluo")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Decompose")
    widget.load(models["musplit"], "cpu")
    widget.image.value = "mixed"
    widget.samples.value = 2
    widget.run_button.clicked()
    wait_done(qtbot, widget)
    assert widget.status.value.startswith("done"), widget.status.value
    with lumos.Model(models["musplit"], device="cpu") as m:
        expect = m.decompose(viewer.layers["mixed"].data, samples=2)
        names = m.class_names
    for i, name in enumerate(names):
        np.testing.assert_array_equal(viewer.layers[f"mixed {name}"].data, expect[i])
    canvas_not_blank(viewer)
    screenshot(viewer, screenshot_dir / "napari-decompose.png")


def test_export_widget_writes_a_bioimageio_package(make_napari_viewer, qtbot, models, tmp_path, screenshot_dir):
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Export to bioimage.io")
    widget.load(models["musplit"], "cpu")
    assert str(widget.output.value).endswith(".bioimageio.zip")  # a default next to the model
    out = tmp_path / "split.zip"
    widget.output.value = str(out)
    widget.model_name.value = "napari export test"
    widget.authors.value = "Ada Tester; Imaging Lab | Bo Second"
    widget.run_button.clicked()
    wait_done(qtbot, widget)
    assert widget.status.value.startswith("done"), widget.status.value
    assert widget.last_report["self_check"] < 1e-3
    import yaml  # napari depends on PyYAML
    import zipfile

    with zipfile.ZipFile(out) as z:
        rdf = yaml.safe_load(z.read("rdf.yaml"))
    assert rdf["name"] == "napari export test"
    assert [a["name"] for a in rdf["authors"]] == ["Ada Tester", "Bo Second"]
    assert rdf["authors"][0]["affiliation"] == "Imaging Lab"
    screenshot(viewer, screenshot_dir / "napari-export.png")


def test_segment_widget_refuses_a_decomposition_model(make_napari_viewer, models):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "fluo")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.load(models["musplit"], "cpu")
    widget.run_button.clicked()
    assert not widget.running and "does not segment" in widget.status.value


def test_train_from_layers_then_stop_and_resume(make_napari_viewer, qtbot, tmp_path, screenshot_dir):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "ssqpm")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    widget.method.value = "dm-qpmnet"
    widget.size.value = "tiny"
    widget.source.value = "layers"
    widget.images.value = ["I0", "I45", "I90", "I135", "phase"]
    widget.labels.value = "cells (truth)"
    widget.epochs.value = 2
    widget.device.value = "cpu"
    out = tmp_path / "from_layers.lumos"
    widget.output.value = str(out)
    widget.run_button.clicked()
    wait_done(qtbot, widget)
    assert widget.status.value == f"trained: {out}", widget.status.value
    assert out.is_file() and widget.model.kind == "dmqpm"
    iterations = [e for e in widget.events if e["stage"] == 1]
    assert len(iterations) == 2 * lumos.train_recipe("dm-qpmnet", "tiny")["iterations_per_epoch"]
    assert widget.loss_plot.value.startswith("loss ")
    assert widget.progress.value == widget.progress.max
    canvas_not_blank(viewer)
    screenshot(viewer, screenshot_dir / "napari-train.png")

    # a long training stopped after its first checkpoint keeps that checkpoint
    out2 = tmp_path / "stopped.lumos"
    widget.output.value = str(out2)
    widget.epochs.value = 200
    widget.run_button.clicked()
    qtbot.waitUntil(lambda: any(e["stage"] == 3 for e in widget.events), timeout=60_000)
    widget.stop()
    wait_done(qtbot, widget)
    assert "stopped; last checkpoint kept" in widget.status.value, widget.status.value
    assert not out2.exists() and pathlib.Path(str(out2) + ".ckpt").is_file()


def test_model_inputs_are_locked_while_a_job_runs(make_napari_viewer, qtbot, models, tmp_path):
    """The running job uses the loaded model: the model file, device and precision cannot
    change under it (swapping the model freed it under the running call); a path that is
    not a file drops the loaded model and says so; RGB layers are refused with a message."""
    viewer, widget = long_pgdiff_job(make_napari_viewer, models, 4, 30)
    assert widget.running
    assert not (widget.model_file.enabled or widget.device.enabled or widget.bf16.enabled)
    widget.stop()
    wait_done(qtbot, widget)
    assert widget.model_file.enabled and widget.device.enabled and widget.bf16.enabled

    widget.model_file.value = str(tmp_path / "missing.lumos")
    assert widget.model is None and "no such file" in widget.model_info.value
    widget.run_button.clicked()
    assert not widget.running and "choose a model file" in widget.status.value

    viewer.add_image(np.zeros((64, 64, 3), np.uint8), name="rgb", rgb=True)
    widget.load(models["pgdiff"], "cpu")
    widget.channels[0].value = "rgb"
    widget.run_button.clicked()
    assert not widget.running and "RGB" in widget.status.value, widget.status.value
