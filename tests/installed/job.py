"""A real job through the installed lumos wheel (run by scripts/test-installed.sh in a
fresh venv, from a folder outside the checkout): simulate small data, train tiny models,
segment, decompose, check the outputs. Also times a cold ``import lumos`` to the first
segmentation. Prints one JSON line of results; exits non-zero on any failure."""

import json
import os
import pathlib
import subprocess
import sys
import time

t_start = time.perf_counter()
import numpy as np  # noqa: E402

import lumos  # noqa: E402

out = pathlib.Path(sys.argv[1])
checkout = sys.argv[2]
results = {}

# the wheel, not the checkout: the package and its library are installed files
here = pathlib.Path(lumos.__file__).resolve()
assert sys.prefix in str(here), f"lumos imported from {here}, not from the venv {sys.prefix}"
assert not any(p and os.path.realpath(p).startswith(checkout) for p in sys.path), f"the checkout is on sys.path: {sys.path}"
assert "LUMOS_LIBRARY" not in os.environ and checkout not in os.environ.get("LD_LIBRARY_PATH", "")
assert lumos.__version__ == lumos.version(), (lumos.__version__, lumos.version())
results["version"] = lumos.version()
results["library"] = str(pathlib.Path(lumos.__file__).parent / "liblumos.so")
cli = subprocess.run(["lumos", "--version"], check=True, capture_output=True, text=True).stdout.split()
assert cli == ["lumos", lumos.version()], cli


def folder(name, modality, n, size):
    """A training folder written with the engine's TIFF writer (images/ + masks/, or targets/)."""
    root = out / name
    for sub in ("images", "masks", "targets"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for s in range(n):
        frame, truth = lumos.simulate(modality, seed=s, size=size)
        if modality == "fluo":
            lumos.write_image_tiff(root / "targets" / f"t{s}.tif", truth)
        else:
            lumos.write_image_tiff(root / "images" / f"i{s}.tif", frame)
            lumos.write_mask_tiff(root / "masks" / f"i{s}.tif", truth[0].astype(np.uint8))
    return root


def tiny(method, **changes):
    cfg = lumos.train_recipe(method, "tiny")
    cfg.update(device="cpu", seed=1, val_fraction=0.0, **changes)
    return cfg


# DM-QPMNet: train, save, load, segment a held-out frame
t = time.perf_counter()
data = folder("ssqpm", "ssqpm", 3, 64)
model_path = out / "dmqpm.lumos"
lumos.train(data, model_path, tiny("dm-qpmnet", epochs=2, iterations_per_epoch=3, patch_size=[64, 64])).close()
results["train_dmqpm_s"] = round(time.perf_counter() - t, 2)
frame, truth = lumos.simulate("ssqpm", seed=99, size=96)
with lumos.Model(model_path, device="cpu") as m:
    labels = m.segment(frame)
    assert labels.shape == (96, 96) and labels.dtype == np.uint8, (labels.shape, labels.dtype)
    assert set(np.unique(labels)) <= set(range(len(m.class_names))), np.unique(labels)
    probs = m.segment(frame, probabilities=True)
    assert probs.shape[1:] == (96, 96) and np.isfinite(probs).all()
    assert np.allclose(probs.sum(0), 1, atol=1e-3)

# muSplit: train, decompose
t = time.perf_counter()
data = folder("fluo", "fluo", 2, 64)
split_path = out / "musplit.lumos"
lumos.train(data, split_path, tiny("musplit-unet")).close()
results["train_musplit_s"] = round(time.perf_counter() - t, 2)
mix, parts = lumos.simulate("fluo", seed=99, size=96)
with lumos.Model(split_path, device="cpu") as m:
    split = m.decompose(mix[0])
    assert split.shape == (2, 96, 96) and np.isfinite(split).all(), split.shape

# the CLI of the wheel: simulate, segment with the model trained above
cli_out = out / "cli"
subprocess.run(["lumos", "simulate", "ssqpm", "--out", str(cli_out), "--train", "1", "--test", "1", "--size", "64",
                "--seed", "3"], check=True, capture_output=True)
images = sorted((cli_out / "test" / "images").glob("*.tif"))
subprocess.run(["lumos", "segment", "--model", str(model_path), "--input", str(cli_out / "test" / "images"),
                "--out", str(cli_out / "masks"), "--device", "cpu"], check=True, capture_output=True)
masks = sorted((cli_out / "masks").glob("*_mask.tif"))
assert len(masks) == len(images) and lumos.read_tiff(masks[0]).shape[-2:] == (64, 64), masks

# oneDNN (the [onednn] extra): a training step of a network with 16-channel convolutions
# runs the blocked path, which dlopens libdnnl.so.3 from <prefix>/lib through the RUNPATH
cfg = tiny("early-fusion", epochs=1, iterations_per_epoch=1)
cfg["dmqpm"].update(base_features=16, max_features=32, n_stages=2)
lumos.train(out / "ssqpm", out / "onednn.lumos", cfg).close()
maps = pathlib.Path("/proc/self/maps").read_text()
loaded = sorted({line.split()[-1] for line in maps.splitlines() if ".so" in line.split()[-1]})
results["onednn_loaded"] = [p for p in loaded if "libdnnl" in p]
assert results["onednn_loaded"] and results["onednn_loaded"][0].startswith(sys.prefix), results["onednn_loaded"]
results["libtorch"] = sorted({p for p in loaded if "/torch/lib/" in p})
assert all(p.startswith(sys.prefix) for p in results["libtorch"]), results["libtorch"]
assert not any(checkout in p for p in loaded), [p for p in loaded if checkout in p]
results["job_s"] = round(time.perf_counter() - t_start, 2)
print(json.dumps(results))
