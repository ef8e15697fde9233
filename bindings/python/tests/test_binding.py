"""The Python binding against the real library: train, info, segment, errors, cancel."""

import os
import pathlib
import subprocess
import threading

import numpy as np
import pytest

import lumos

ROOT = pathlib.Path(__file__).resolve().parents[3]
TINY = {"unet": {"n_stages": 3, "base_features": 4, "max_features": 16}, "epochs": 2,
        "iterations_per_epoch": 3, "batch_size": 2, "patch_size": [32, 32], "seed": 1, "device": "cpu"}


def lumos_cli():
    for prof in ("debug", "release"):
        p = ROOT / "target" / prof / "lumos"
        if p.is_file():
            return str(p)
    pytest.fail("the lumos CLI is not built in target/debug or target/release (cargo build --bin lumos)",
                pytrace=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    subprocess.run([lumos_cli(), "simulate", "ssqpm", "--out", str(d), "--train", "4", "--test", "1",
                    "--size", "64", "--seed", "3"], check=True, capture_output=True)
    return d


@pytest.fixture(scope="module")
def model(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "m.lumos"
    events = []
    m = lumos.train(data / "train", out, TINY, progress=events.append)
    assert out.is_file()
    assert sum(e["stage"] == 1 for e in events) == 6
    assert any(e["stage"] == 2 and 0.0 <= e["val_metric"] <= 1.0 for e in events)
    yield m
    m.close()


def test_library_facts():
    assert lumos.abi_version() == lumos.ABI_VERSION
    assert lumos.version().count(".") == 2


def test_one_version_everywhere():
    """Cargo.toml's version is the library's, the binding's and the CLI's."""
    import importlib.metadata
    import re
    import sys

    cargo = re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
    assert lumos.version() == cargo
    assert lumos.__version__ == cargo
    assert importlib.metadata.version("lumos") == cargo  # the distribution (bindings/python)
    # the console script `lumos` (lumos._cli) runs the built CLI of this checkout
    cli = pathlib.Path(sys.executable).parent / "lumos"
    out = subprocess.run([str(cli), "--version"], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["lumos", cargo]


def test_missing_library_is_named(tmp_path):
    """LUMOS_LIBRARY naming no file, or a file that is not a library: a LumosLibraryError
    that names the file, never a bare loader error (in a new interpreter: the binding
    loads the library once)."""
    import sys

    bogus = tmp_path / "liblumos.so"
    bogus.write_bytes(b"not a library")
    for path, expected in ((tmp_path / "absent.so", "no such file"), (bogus, "cannot load")):
        code = ("import lumos\ntry:\n    lumos.version()\nexcept lumos.LumosLibraryError as e:\n    print(e)\n"
                "else:\n    raise SystemExit('loaded')")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, LUMOS_LIBRARY=str(path)))
        assert r.returncode == 0, r.stdout + r.stderr
        assert expected in r.stdout and str(path) in r.stdout, r.stdout


def test_info(model):
    assert model.kind == "unet"
    assert model.channel_names == ["I0", "I45", "I90", "I135", "phase"]
    assert model.class_names == ["background", "cell"]
    assert model.patch_size == (32, 32)
    assert model.can_segment and not model.can_decompose
    assert model.metadata["provenance"]["seed"] == 1


def test_segment_and_reload(model, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(1000, 50, size=(5, 40, 70)).astype(np.float32)
    labels = model.segment(x)
    assert labels.shape == (40, 70) and labels.dtype == np.uint8 and labels.max() <= 1
    p = model.segment(x, probabilities=True)
    assert p.shape == (2, 40, 70)
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-4)
    model.save(tmp_path / "copy.lumos")
    with lumos.Model(tmp_path / "copy.lumos", device="cpu") as m2:
        np.testing.assert_array_equal(m2.segment(x), labels)
    # non-contiguous float64 input is converted, not rejected
    np.testing.assert_array_equal(model.segment(x.astype(np.float64)[:, :, :]), labels)


def test_bfloat16_precision(model):
    rng = np.random.default_rng(1)
    x = rng.normal(1000, 50, size=(5, 48, 64)).astype(np.float32)
    p32 = model.segment(x, probabilities=True)
    assert model.precision == "float32"
    model.precision = "bfloat16"
    try:
        assert model.precision == "bfloat16"
        p16 = model.segment(x, probabilities=True)
    finally:
        model.precision = "float32"
    assert p16.dtype == np.float32
    np.testing.assert_allclose(p16.sum(0), 1.0, atol=1e-3)
    d = np.abs(p16 - p32)
    # bfloat16 keeps 8 mantissa bits: the probabilities move (autocast took effect), a little on
    # average, and the argmax changes only where the classes were nearly tied
    assert d.max() > 0 and d.mean() < 0.02, (d.max(), d.mean())
    clear = np.abs(p32[1] - p32[0]) > 0.2
    assert clear.any()
    np.testing.assert_array_equal(p16.argmax(0)[clear], p32.argmax(0)[clear])
    with pytest.raises(ValueError, match="fp16"):
        model.precision = "fp16"
    with pytest.raises(lumos.LumosError, match="INVALID_ARGUMENT.*precision"):
        lumos._check(lumos._load().lumos_model_set_precision(model._h, 7))
    np.testing.assert_array_equal(model.segment(x, probabilities=True), p32)


def test_errors_carry_messages(model, tmp_path):
    with pytest.raises(lumos.LumosError, match="SHAPE_MISMATCH.*expects 5"):
        model.segment(np.zeros((4, 32, 32), np.float32))
    bad = np.zeros((5, 32, 32), np.float32)
    bad[0, 1, 2] = np.nan
    with pytest.raises(lumos.LumosError, match="INVALID_INPUT"):
        model.segment(bad)
    with pytest.raises(lumos.LumosError, match="UNSUPPORTED"):
        model.decompose(np.zeros((32, 32), np.float32))
    with pytest.raises(lumos.LumosError, match="IO"):
        lumos.Model(tmp_path / "missing.lumos")
    (tmp_path / "junk.lumos").write_bytes(b"junk")
    with pytest.raises(lumos.LumosError, match="MODEL_FORMAT"):
        lumos.Model(tmp_path / "junk.lumos")
    with pytest.raises(lumos.LumosError, match="INVALID_CONFIG"):
        lumos.train(tmp_path, tmp_path / "x.lumos", {"epochs": 0})


def test_cancel_from_another_thread(data, tmp_path):
    tok = lumos.CancelToken()
    cfg = dict(TINY, epochs=1000)
    out = tmp_path / "slow.lumos"

    def on_progress(p):
        if p["stage"] == 3:  # first checkpoint written
            threading.Thread(target=tok.cancel).start()

    with pytest.raises(lumos.LumosError, match="CANCELLED"):
        lumos.train(data / "train", out, cfg, progress=on_progress, cancel=tok)
    assert not out.exists()
    assert (tmp_path / "slow.lumos.ckpt").is_file()


def test_tiff_read_write_through_the_library(data, model, tmp_path):
    img_path = sorted((data / "test" / "images").glob("*.tif"))[0]
    x = lumos.read_tiff(img_path)
    assert x.shape == (5, 64, 64) and x.dtype == np.float32 and np.isfinite(x).all()
    labels = model.segment(x)
    out = tmp_path / "mask.tif"
    lumos.write_mask_tiff(out, labels)
    back = lumos.read_tiff(out)
    assert back.shape == (1, 64, 64)
    assert np.array_equal(back[0].astype(np.uint8), labels)
    with pytest.raises(lumos.LumosError) as e:
        lumos.read_tiff(tmp_path / "missing.tif")
    assert "missing.tif" in str(e.value)
    with pytest.raises(ValueError):
        lumos.write_mask_tiff(out, np.zeros((2, 2, 2)))


def test_dmqpm_model_trains_and_segments(data, tmp_path):
    cfg = {"kind": "dmqpm", "dmqpm": {"n_stages": 3, "base_features": 4, "max_features": 16,
                                      "fusion_stage": 1, "heads": 2},
           "epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "patch_size": [32, 32],
           "seed": 1, "device": "cpu", "val_fraction": 0.0}
    m = lumos.train(data / "train", tmp_path / "dm.lumos", cfg)
    assert m.kind == "dmqpm"
    x = lumos.read_tiff(sorted((data / "test" / "images").glob("*.tif"))[0])
    a = m.segment(x)
    m2 = lumos.Model(tmp_path / "dm.lumos", device="cpu")
    assert np.array_equal(a, m2.segment(x))
    with pytest.raises(lumos.LumosError) as e:
        m.segment(x[:4])
    assert "5" in str(e.value)


def test_musplit_decomposes_deterministically(tmp_path):
    d = tmp_path / "fluo"
    subprocess.run([lumos_cli(), "simulate", "fluo", "--out", str(d), "--train", "2", "--test", "1",
                    "--size", "48", "--seed", "4"], check=True, capture_output=True)
    cfg = {"kind": "musplit", "musplit": {"variant": "hvae", "levels": 3, "lc_levels": 2, "base_channels": 4,
                                          "max_channels": 4, "z_dim": 2},
           "epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "patch_size": [16, 16], "val_fraction": 0.0,
           "seed": 2, "device": "cpu"}
    m = lumos.train(d / "train", tmp_path / "s.lumos", cfg)
    assert m.can_decompose and not m.can_segment
    x = lumos.read_tiff(d / "test" / "inputs" / "fluo_0000.tif")[0]
    a = m.decompose(x, samples=2, seed=5)
    assert a.shape == (2, 48, 48) and np.isfinite(a).all()
    again = lumos.Model(tmp_path / "s.lumos").decompose(x, samples=2, seed=5)
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a, m.decompose(x, samples=2, seed=6))
    with pytest.raises(lumos.LumosError, match="UNSUPPORTED"):
        m.segment(x[None])
    with pytest.raises(lumos.LumosError, match="INVALID_ARGUMENT.*even"):
        m.decompose(x, keep=7)


def test_pgdiff_segments_deterministically(tmp_path):
    d = tmp_path / "qpi"
    subprocess.run([lumos_cli(), "simulate", "qpi", "--out", str(d), "--train", "3", "--test", "1",
                    "--size", "64", "--seed", "4"], check=True, capture_output=True)
    unet = {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [2],
            "num_head_channels": 8, "groups": 4}
    cfg = {"kind": "pgdiff",
           "pgdiff": {"autoencoder": {"ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "groups": 4},
                      "ldm_p": unet, "ldm_s": unet, "ae_epochs": 1, "learning_rate": 0.001,
                      "sampling": {"inversion_steps": 4, "sampling_steps": 4}},
           "epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "patch_size": [32, 32], "val_fraction": 0.0,
           "seed": 2, "device": "cpu"}
    m = lumos.train(d / "train", tmp_path / "pg.lumos", cfg)
    assert m.can_segment and not m.can_decompose and m.n_classes == 3
    assert m.diffusion_options()["sampling_steps"] == 4
    x = lumos.read_tiff(d / "test" / "images" / "qpi_0000.tif")
    a = m.segment(x, diffusion={"start": "random", "samples": 2, "eta": 0.3, "seed": 7})
    assert a.shape == (64, 64) and a.max() <= 2
    again = lumos.Model(tmp_path / "pg.lumos").segment(x, diffusion={"start": "random", "samples": 2, "eta": 0.3,
                                                                        "seed": 7})
    np.testing.assert_array_equal(a, again)
    np.testing.assert_array_equal(m.segment(x), m.segment(x, diffusion={}))
    with pytest.raises(lumos.LumosError, match="INVALID_ARGUMENT.*sampling_steps"):
        m.segment(x, diffusion={"sampling_steps": 0})
    with pytest.raises(ValueError):
        m.segment(x, diffusion={"steps": 3})


def test_simulate_and_write_image(tmp_path):
    for modality, channels, truth_channels in (("ssqpm", 5, 1), ("qpi", 1, 1), ("fluo", 1, 2)):
        image, truth = lumos.simulate(modality, seed=3, size=48)
        assert image.shape == (channels, 48, 48) and truth.shape == (truth_channels, 48, 48), modality
        assert image.dtype == np.float32 and np.isfinite(image).all()
        again, _ = lumos.simulate(modality, seed=3, size=48)
        np.testing.assert_array_equal(image, again)
    _, mask = lumos.simulate("qpi", seed=1, size=64)
    assert set(np.unique(mask)) <= {0.0, 1.0, 2.0}
    with pytest.raises(lumos.LumosError, match="INVALID_ARGUMENT.*modality 'sem'"):
        lumos.simulate("sem")
    with pytest.raises(lumos.LumosError, match="INVALID_CONFIG.*sise"):
        lumos.simulate("qpi", sise=64)
    image, _ = lumos.simulate("ssqpm", seed=2, size=32)
    lumos.write_image_tiff(tmp_path / "x.tif", image)
    np.testing.assert_array_equal(lumos.read_tiff(tmp_path / "x.tif"), image)
    names = ["I0", "I45", "I90", "I135", "phase"]
    lumos.write_image_tiff(tmp_path / "named.tif", image, channel_names=names)
    np.testing.assert_array_equal(lumos.read_tiff(tmp_path / "named.tif"), image)
    with pytest.raises(ValueError):
        lumos.write_image_tiff(tmp_path / "named.tif", image, channel_names=names[:2])
    lumos.write_image_tiff(tmp_path / "y.tif", image[4])
    assert lumos.read_tiff(tmp_path / "y.tif").shape == (1, 32, 32)
    with pytest.raises(lumos.LumosError, match="IO"):
        lumos.write_image_tiff(tmp_path / "no" / "such" / "x.tif", image)


def test_train_recipes():
    for method in lumos.RECIPES:
        cfg = lumos.train_recipe(method, "tiny")
        assert cfg["device"] == "auto" and cfg["seed"] == 0
    assert lumos.train_recipe("phase-only", "cpu")["dmqpm"]["channels"] == [4]
    assert lumos.train_recipe("pg-diffseg", "paper")["kind"] == "pgdiff"
    with pytest.raises(lumos.LumosError, match="INVALID_ARGUMENT.*unknown method 'sam'"):
        lumos.train_recipe("sam", "cpu")


def test_close_during_segment_is_safe(model, tmp_path):
    """close() from another thread while a segmentation runs frees the model only after the
    call has returned (freeing it under the running call crashed the process)."""
    path = tmp_path / "copy.lumos"
    model.save(path)
    m = lumos.Model(path, device="cpu")
    big = np.random.default_rng(0).normal(1000, 100, size=(5, 512, 512)).astype(np.float32)
    result = {}

    def work():
        try:
            result["labels"] = m.segment(big)
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion
            result["error"] = e

    t = threading.Thread(target=work)
    t.start()
    while m._busy == 0 and t.is_alive():
        pass
    m.close()  # waits for the segmentation
    t.join()
    assert "error" not in result, result.get("error")
    assert result["labels"].shape == (512, 512)
    assert m.closed
    with pytest.raises(ValueError, match="closed"):
        m.segment(big)


def test_sizes_are_checked_before_the_library(model):
    x = np.zeros((5, 64, 64), np.float32)
    with pytest.raises(ValueError, match="tile height = -64"):
        model.segment(x, tile=-64)
    with pytest.raises(ValueError, match="batch_size = 0"):
        model.segment(x, batch_size=0)
    with pytest.raises(TypeError, match="integer"):
        model.segment(x, tile=32.5)
    # NumPy integers are integers
    assert model.segment(x, tile=np.int64(32)).shape == (64, 64)
    # absurd sizes get the library's message, not an abort
    with pytest.raises(lumos.LumosError, match="at most 16384"):
        model.segment(x, tile=1 << 40)
    with pytest.raises(lumos.LumosError, match="under one pixel"):
        model.segment(x, step_fraction=1e-12)


def test_complex_and_masked_input_are_refused(model):
    x = np.zeros((5, 32, 32), np.complex64)
    with pytest.raises(TypeError, match="complex"):
        model.segment(x)
    with pytest.raises(TypeError, match="masked"):
        model.segment(np.ma.masked_array(np.zeros((5, 32, 32), np.float32)))


def test_an_exception_in_the_progress_callback_stops_training(data, tmp_path):
    """Without a cancel token of the caller's, a failing callback still stops the run at its
    first progress report (not after all epochs)."""
    seen = []

    class Stop(Exception):
        pass

    def progress(ev):
        seen.append(ev)
        raise Stop  # KeyboardInterrupt takes the same path (the callback catches BaseException)

    cfg = dict(TINY, epochs=50)
    with pytest.raises(Stop):
        lumos.train(data / "train", tmp_path / "stopped.lumos", cfg, progress=progress)
    assert len(seen) < 5
    assert not (tmp_path / "stopped.lumos").exists()
