"""bioimage.io export, checked by the bioimage.io tools themselves (from PyPI).

For each model kind a tiny model is trained and exported with ``lumos.export_bioimageio``;
then, in a separate Python process (PyTorch and liblumos carry two libtorch copies that
must not share a process), bioimageio.spec validates the package, bioimageio.core's
``test_model`` reproduces its test tensors, and bioimageio.core's ``predict`` runs a NEW
input (another simulated frame, not the test tensor) whose result is compared with the
engine's own ``segment`` / ``decompose`` of the same pixels in this process.

Needs ``torch``, ``bioimageio.core`` and ``bioimageio.spec`` in this interpreter
(scripts/bootstrap.sh installs them from requirements/test.lock): without them, or when
one of them cannot be imported, the module fails at collection, naming the import error.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import lumos

CHECK = r"""
import json, sys
import numpy as np
from bioimageio.core import Tensor, predict, test_model
from bioimageio.spec import load_description
from bioimageio.spec.model.v0_5 import ModelDescr

pkg, x_path, y_path = sys.argv[1:4]
summary = test_model(pkg)
details = [(d.name, d.status, [e.msg[:300] for e in d.errors]) for d in summary.details]
descr = load_description(pkg)
assert isinstance(descr, ModelDescr), type(descr)
x = np.load(x_path)
out = predict(model=descr, inputs={descr.inputs[0].id: Tensor.from_numpy(x, dims=("batch", "channel", "y", "x"))})
y = out.members[descr.outputs[0].id].data.values
np.save(y_path, np.asarray(y, dtype=np.float32))
print(json.dumps({"status": summary.status, "format_version": descr.format_version, "details": details}))
"""


def _bioimageio_import_error():
    """None when the packages import in a child interpreter, else what it printed."""
    r = subprocess.run([sys.executable, "-c", "import torch, bioimageio.core, bioimageio.spec"],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]


_IMPORT_ERROR = _bioimageio_import_error()
if _IMPORT_ERROR is not None:
    pytest.fail("torch / bioimageio.core / bioimageio.spec do not import in %s: %s (scripts/bootstrap.sh "
                "installs them from requirements/test.lock)" % (sys.executable, _IMPORT_ERROR), pytrace=False)


NAMES = {"ssqpm": ["I0", "I45", "I90", "I135", "phase"], "qpi": ["phase"], "fluo": ["mixed"]}


def _dataset(root, modality, size):
    d = root / modality
    img_dir = d / ("inputs" if modality == "fluo" else "images")
    img_dir.mkdir(parents=True)
    (d / ("targets" if modality == "fluo" else "masks")).mkdir()
    for i in range(2):
        image, truth = lumos.simulate(modality, seed=10 + i, size=size)
        lumos.write_image_tiff(img_dir / f"f{i}.tif", image, channel_names=NAMES[modality])
        if modality == "fluo":
            lumos.write_image_tiff(d / "targets" / f"f{i}.tif", truth, channel_names=["structure1", "structure2"])
        else:
            lumos.write_mask_tiff(d / "masks" / f"f{i}.tif", truth[0].astype(np.uint8))
    return d


def _train(root, method, data):
    cfg = lumos.train_recipe(method, "tiny")
    cfg.update(device="cpu", val_fraction=0.0, epochs=1)
    out = root / f"{method}.lumos"
    lumos.train(data, out, cfg).close()
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bioimageio")
    ss, qpi, fluo = _dataset(root, "ssqpm", 64), _dataset(root, "qpi", 64), _dataset(root, "fluo", 96)
    return {
        "dm-qpmnet": _train(root, "dm-qpmnet", ss),
        "nnunet": _train(root, "nnunet", qpi),          # per-image z-score -> rdf preprocessing
        "pg-diffseg": _train(root, "pg-diffseg", qpi),  # DDIM inversion + sampling in the graph
        "musplit-unet": _train(root, "musplit-unet", fluo),
    }


def _run_bioimageio(pkg, x, tmp_path):
    x_path, y_path = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(x_path, x.astype(np.float32))
    env = {k: v for k, v in os.environ.items() if k != "LUMOS_LIBRARY"}
    r = subprocess.run([sys.executable, "-c", CHECK, str(pkg), str(x_path), str(y_path)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["status"] == "passed", report["details"]
    assert any("Reproduce test outputs" in name and status == "passed" for name, status, _ in report["details"])
    assert report["format_version"].startswith("0.5.")
    return np.load(y_path)


@pytest.mark.parametrize("method,modality", [("dm-qpmnet", "ssqpm"), ("nnunet", "qpi"), ("pg-diffseg", "qpi")])
def test_segmentation_export_runs_in_bioimageio_core(models, method, modality, tmp_path):
    pkg = tmp_path / f"{method}.zip"
    report = lumos.export_bioimageio(models[method], pkg, authors=["Ada Tester; Imaging Lab"], tags=["test"])
    assert report["self_check"] < 1e-3
    _, _, h, w = report["input_shape"]
    frame, _ = lumos.simulate(modality, seed=99, size=64)  # not the package's test tensor
    x = np.ascontiguousarray(frame[:, 16:16 + h, 8:8 + w])
    with lumos.Model(models[method], device="cpu") as m:
        engine = m.segment(x, probabilities=True, tile=(h, w), step_fraction=1.0, batch_size=1)
    y = _run_bioimageio(pkg, x[None], tmp_path)
    assert y.shape == (1,) + engine.shape
    np.testing.assert_allclose(y[0], engine, atol=1e-4)
    assert (y[0].argmax(0) == engine.argmax(0)).mean() > 0.999


def test_musplit_export_runs_in_bioimageio_core(models, tmp_path):
    pkg = tmp_path / "musplit"
    report = lumos.export_bioimageio(models["musplit-unet"], pkg)
    _, _, wy, _ = report["input_shape"]
    t = report["output_shape"][2]
    frame, _ = lumos.simulate("fluo", seed=99, size=wy + t)
    # the engine's cell j (keep = tile) has all its lateral context inside the frame; the
    # exported graph takes that context window
    j = wy // (2 * t)
    s0 = j * t + t // 2 - wy // 2
    with lumos.Model(models["musplit-unet"], device="cpu") as m:
        engine = m.decompose(frame[0], tile=t, keep=t)[:, j * t:(j + 1) * t, j * t:(j + 1) * t]
    x = frame[:, s0:s0 + wy, s0:s0 + wy][None]
    y = _run_bioimageio(pkg, x, tmp_path)
    assert y.shape == (1,) + engine.shape
    np.testing.assert_allclose(y[0], engine, atol=1e-3 * float(engine.std()))
