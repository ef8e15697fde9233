"""Fixtures: tiny models of each kind, trained through the engine on simulated data."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

import lumos
from napari_lumos import _compute

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny(method: str, **changes) -> dict:
    cfg = lumos.train_recipe(method, "tiny")
    cfg.update(device="cpu", seed=1, val_fraction=0.0, **changes)
    return cfg


NAMES = {"ssqpm": ["I0", "I45", "I90", "I135", "phase"], "qpi": ["phase"], "fluo": ["structure 1", "structure 2"]}


def simulated_folder(folder: pathlib.Path, modality: str, n: int, size: int) -> pathlib.Path:
    frames, truths = zip(*(lumos.simulate(modality, seed=s, size=size) for s in range(n)))
    if modality == "fluo":
        return _compute.write_training_folder(folder, None, targets=np.stack(truths), channel_names=NAMES[modality])
    return _compute.write_training_folder(folder, np.stack(frames), masks=np.stack(truths)[:, 0].astype(np.uint8),
                                          channel_names=NAMES[modality])


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Paths of tiny trained models: dm-qpmnet, pg-diffseg, musplit-hvae."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    data = simulated_folder(root / "ssqpm", "ssqpm", 3, 64)
    # long enough (about 20 s) for labels worth a screenshot
    cfg = tiny("dm-qpmnet", epochs=20, iterations_per_epoch=10, patch_size=[64, 64])
    lumos.train(data, root / "dmqpm.lumos", cfg).close()
    out["dmqpm"] = root / "dmqpm.lumos"
    data = simulated_folder(root / "qpi", "qpi", 3, 64)
    cfg = tiny("pg-diffseg", epochs=1, iterations_per_epoch=2)
    cfg["pgdiff"]["sampling"].update(inversion_steps=3, sampling_steps=3)
    lumos.train(data, root / "pgdiff.lumos", cfg).close()
    out["pgdiff"] = root / "pgdiff.lumos"
    data = simulated_folder(root / "fluo", "fluo", 2, 64)
    lumos.train(data, root / "musplit.lumos", tiny("musplit-hvae")).close()
    out["musplit"] = root / "musplit.lumos"
    return out


@pytest.fixture(scope="session")
def screenshot_dir():
    d = pathlib.Path(os.environ.get("LUMOS_SCREENSHOTS", ROOT / "target" / "screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d
