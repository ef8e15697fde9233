"""Scale-out with Dask (lumos.scaleout) against the real library.

On a LocalCluster of two worker processes, chunked segmentation and decomposition of
OME-Zarr images must equal the same chunked computation on Dask's synchronous scheduler
in this process (exactly), decomposition must equal the engine's whole-frame
``Model.decompose``, segmentation labels must agree with the whole-frame
``Model.segment`` on >= 99 % of the pixels, each worker loads a model once, and TIFF
folders and OME-Zarr metadata round-trip. Models are tiny and trained here in seconds.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

# scripts/bootstrap.sh installs these (requirements/test.lock): missing or broken, the
# module fails to import, and the test run fails with it
import dask.array  # noqa: E402,F401
import distributed  # noqa: E402
import zarr  # noqa: E402

import lumos  # noqa: E402
from lumos import scaleout as so  # noqa: E402

THREADS = 1  # libtorch threads, the same in the workers and in this process
# nnU-Net with per-image z-score: the whole frame's statistics matter for every chunk
SEG_CONFIG = {"kind": "unet", "unet": {"n_stages": 3, "base_features": 8, "max_features": 32, "convs_per_stage": 2},
              "epochs": 40, "iterations_per_epoch": 25, "batch_size": 4, "patch_size": [32, 32], "learning_rate": 0.03,
              "normalization": [{"method": "per_image_zscore"}], "augmentation": {"enabled": False},
              "val_fraction": 0.0, "seed": 1, "device": "cpu", "threads": THREADS}


def blobs(rng, h, w):
    """Bright discs (class 1) on a noisy background (class 0): image (1, H, W), labels (H, W)."""
    yy, xx = np.mgrid[:h, :w]
    labels = np.zeros((h, w), np.uint8)
    for _ in range(max(1, h * w // 500)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 8)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    image = 100 + 50 * labels + rng.normal(0, 6, (h, w))
    return image.astype(np.float32)[None], labels


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("blobs")
    (d / "images").mkdir()
    (d / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        image, labels = blobs(rng, 64, 64)
        lumos.write_image_tiff(d / "images" / f"b{i}.tif", image)
        lumos.write_mask_tiff(d / "masks" / f"b{i}.tif", labels)
    cfg = dict(lumos.train_recipe("nnunet", "tiny"), **SEG_CONFIG)
    path = d / "seg.lumos"
    lumos.train(d, path, cfg).close()
    return path


@pytest.fixture(scope="module")
def split_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("fluo")
    for sub in ("targets", "inputs"):
        (d / sub).mkdir()
    for i in range(3):
        image, truth = lumos.simulate("fluo", seed=i, size=64)
        lumos.write_image_tiff(d / "targets" / f"f{i}.tif", truth)
        lumos.write_image_tiff(d / "inputs" / f"f{i}.tif", image)
    cfg = dict(lumos.train_recipe("musplit-unet", "tiny"), device="cpu", seed=2, threads=THREADS)
    path = d / "split.lumos"
    m = lumos.train(d, path, cfg)
    assert m.can_decompose and m.metadata["architecture"]["lc_levels"] == 2
    m.close()
    return path


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    # the worker processes import lumos from PYTHONPATH and find the library through
    # LUMOS_LIBRARY, both inherited from this process
    pkg = str(pathlib.Path(lumos.__file__).resolve().parents[1])
    saved = os.environ.get("PYTHONPATH")
    paths = (saved or "").split(os.pathsep)
    if pkg not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([pkg] + [p for p in paths if p])
    try:
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        c = Client(cluster, set_as_default=False)
        yield c
        c.close()
        cluster.close()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def write_image(path, data, axes, version, scale=None):
    """An OME-Zarr input whose Zarr chunks do not match the processing chunks."""
    import dask.array as da

    axes = [{"name": a, "type": {"t": "time", "c": "channel"}.get(a, "space"),
             **({"unit": "micrometer"} if a in "zyx" else {})} for a in axes]
    return so.write_ome_zarr(path, da.from_array(data, chunks=tuple(min(n, 50) for n in data.shape)), axes,
                             scale=scale, version=version)


def read_level0(path):
    img = so.read_ome_zarr(path)
    return img, img.array.compute()


def test_segment_zarr_on_a_cluster_equals_single_process(seg_model, client, tmp_path):
    # 200 x 190 in chunks of 64 (3 x 3 chunks, halo one tile = 32): an arbitrary size
    image, _ = blobs(np.random.default_rng(9), 200, 190)
    src = write_image(tmp_path / "in.ome.zarr", image, "cyx", "0.4", scale=[1.0, 0.65, 0.65])
    kw = dict(chunk=64, threads=THREADS)
    dist = so.segment_zarr(src, tmp_path / "labels.ome.zarr", seg_model, client=client, **kw)
    sync = so.segment_zarr(src, tmp_path / "labels_sync.ome.zarr", seg_model, scheduler="synchronous", **kw)
    img, labels = read_level0(dist)
    _, labels_sync = read_level0(sync)
    assert labels.dtype == np.uint8 and labels.shape == (200, 190)
    assert [a["name"] for a in img.axes] == ["y", "x"] and img.scale == [0.65, 0.65] and img.version == "0.4"
    np.testing.assert_array_equal(labels, labels_sync)

    pdist = so.segment_zarr(src, tmp_path / "prob.ome.zarr", seg_model, client=client, probabilities=True, **kw)
    psync = so.segment_zarr(src, tmp_path / "prob_sync.ome.zarr", seg_model, scheduler="synchronous",
                            probabilities=True, **kw)
    pimg, prob = read_level0(pdist)
    _, prob_sync = read_level0(psync)
    assert prob.dtype == np.float32 and prob.shape == (2, 200, 190)
    assert [a["name"] for a in pimg.axes] == ["c", "y", "x"] and pimg.scale == [1.0, 0.65, 0.65]
    np.testing.assert_array_equal(prob, prob_sync)
    np.testing.assert_array_equal(np.argmax(prob, 0), labels)

    # against the engine's whole-frame segmentation (its tile grid is stretched to fit 200 x 190,
    # so chunk tiles sit elsewhere: agreement, not equality)
    with lumos.Model(seg_model, "cpu") as m:
        whole = m.segment(image)
    agree = float((labels == whole).mean())
    print(f"\nsegment, 200 x 190 in 3 x 3 chunks: labels agree with the whole frame on {agree:.4%} of the pixels")
    assert agree >= 0.99
    assert 0.05 < whole.mean() < 0.5  # the model does segment

    # one model load per worker process, whatever the number of chunks
    counts = client.run(so.load_counts)
    assert len(counts) == 2
    for worker, c in counts.items():
        assert all(n == 1 for n in c.values()), (worker, c)


def test_segment_on_the_tile_grid_equals_whole_frame(seg_model, tmp_path):
    # t, c, z, y, x with H - tile and W - tile multiples of the tile step (16): chunk tiles sit
    # where whole-frame tiles sit, so chunked equals whole-frame; z planes are separate frames
    # with their own statistics
    plane, _ = blobs(np.random.default_rng(4), 208, 176)
    image = np.stack([plane, plane * 3.0 + 500.0], axis=1)[None]  # (1, 1, 2, 208, 176)
    src = write_image(tmp_path / "tczyx.ome.zarr", image, "tczyx", "0.5", scale=[2.0, 1.0, 0.5, 0.1, 0.1])
    out = so.segment_zarr(src, tmp_path / "prob.ome.zarr", seg_model, scheduler="synchronous", chunk=64,
                          probabilities=True, threads=THREADS)
    img, prob = read_level0(out)
    assert [a["name"] for a in img.axes] == ["t", "c", "z", "y", "x"] and img.scale == [2.0, 1.0, 0.5, 0.1, 0.1]
    assert prob.shape == (1, 2, 2, 208, 176)
    with lumos.Model(seg_model, "cpu") as m:
        wholes = [m.segment(image[0, :, z], probabilities=True) for z in range(2)]
        for z in range(2):
            np.testing.assert_allclose(prob[0, :, z], wholes[z], rtol=0, atol=1e-5)
            np.testing.assert_array_equal(np.argmax(prob[0, :, z], 0), m.segment(image[0, :, z]))
        # the whole frame's statistics are what makes a chunk equal: the top-left chunk with its
        # halo (96 x 96) normalized with its own statistics instead is not
        frame = image[0, :, 0]
        corner = frame[:, :96, :96]
        framed = m.segment_region(corner, frame.mean((1, 2), dtype=np.float64), frame.std((1, 2), dtype=np.float64))
        own = m.segment_region(corner)
    np.testing.assert_allclose(framed[:, :64, :64], wholes[0][:, :64, :64], rtol=0, atol=1e-5)
    assert np.abs(own[:, :64, :64] - wholes[0][:, :64, :64]).max() > 1e-3
    # labels drop the channel axis
    lab = so.segment_zarr(src, tmp_path / "labels.ome.zarr", seg_model, scheduler="synchronous", chunk=64,
                          threads=THREADS)
    limg, labels = read_level0(lab)
    assert [a["name"] for a in limg.axes] == ["t", "z", "y", "x"] and limg.scale == [2.0, 0.5, 0.1, 0.1]
    np.testing.assert_array_equal(labels, np.argmax(prob, 1))


def test_decompose_zarr_on_a_cluster_equals_single_process_and_whole_frame(split_model, client, tmp_path):
    image, _ = lumos.simulate("fluo", seed=7, size=176)
    image = np.ascontiguousarray(image[0, :163, :150])  # sizes that are not multiples of keep
    src = write_image(tmp_path / "in.ome.zarr", image, "yx", "0.5", scale=[0.1, 0.1])
    info = so.model_info(split_model)
    g = so.decompose_geometry(info)
    assert (g["tile"], g["keep"], g["context"], g["min_halo"]) == (16, 8, 32, 32)
    kw = dict(chunk=48, threads=THREADS)  # 48, 48, 67 rows and 48, 48, 54 columns: 3 x 3 chunks
    dist = so.decompose_zarr(src, tmp_path / "split.ome.zarr", split_model, client=client, **kw)
    sync = so.decompose_zarr(src, tmp_path / "split_sync.ome.zarr", split_model, scheduler="synchronous", **kw)
    img, split = read_level0(dist)
    _, split_sync = read_level0(sync)
    assert split.shape == (2, 163, 150) and split.dtype == np.float32
    assert [a["name"] for a in img.axes] == ["c", "y", "x"] and img.version == "0.5"
    np.testing.assert_array_equal(split, split_sync)
    with lumos.Model(split_model, "cpu") as m:
        whole = m.decompose(image)
    scale = float(np.abs(whole).max())
    err = float(np.abs(split - whole).max())
    print(f"\ndecompose, 163 x 150 in 3 x 3 chunks: max |chunked - whole| = {err:.3g} (data scale {scale:.3g}, "
          f"relative {err / scale:.2g})")
    np.testing.assert_allclose(split, whole, rtol=0, atol=1e-5 * scale)
    with pytest.raises(ValueError, match="halo"):
        so.decompose_array(image, split_model, axes="yx", chunk=48, halo=16, info=info)


def test_tiff_folders_on_a_cluster(seg_model, split_model, client, tmp_path):
    seg_in, split_in = tmp_path / "seg_in", tmp_path / "split_in"
    seg_in.mkdir()
    split_in.mkdir()
    rng = np.random.default_rng(5)
    seg_images = {f"s{i}": blobs(rng, 48 + 16 * i, 80 - 8 * i)[0] for i in range(3)}
    for name, im in seg_images.items():
        lumos.write_image_tiff(seg_in / f"{name}.tif", im)
    split_images = {f"f{i}": lumos.simulate("fluo", seed=10 + i, size=40 + 8 * i)[0] for i in range(2)}
    for name, im in split_images.items():
        lumos.write_image_tiff(split_in / f"{name}.tif", im)

    written = so.segment_tiffs(seg_in, tmp_path / "seg_out", seg_model, client=client, probabilities=True,
                               threads=THREADS)
    assert sorted(p.name for p in written) == sorted([f"s{i}_mask.tif" for i in range(3)] +
                                                     [f"s{i}_prob.tif" for i in range(3)])
    split_written = so.decompose(split_in, tmp_path / "split_out", split_model, client=client, threads=THREADS)
    assert sorted(p.name for p in split_written) == ["f0_split.tif", "f1_split.tif"]
    with lumos.Model(seg_model, "cpu") as m:
        for name, im in seg_images.items():
            np.testing.assert_array_equal(lumos.read_tiff(tmp_path / "seg_out" / f"{name}_mask.tif")[0], m.segment(im))
            np.testing.assert_array_equal(lumos.read_tiff(tmp_path / "seg_out" / f"{name}_prob.tif"),
                                          m.segment(im, probabilities=True))
    with lumos.Model(split_model, "cpu") as m:
        for name, im in split_images.items():
            np.testing.assert_array_equal(lumos.read_tiff(tmp_path / "split_out" / f"{name}_split.tif"),
                                          m.decompose(im[0]))


def test_preload_plugin_loads_once_per_worker(seg_model, client, tmp_path):
    copy = tmp_path / "copy.lumos"  # a new cache key
    copy.write_bytes(pathlib.Path(seg_model).read_bytes())
    key = f"{copy}|cpu"
    client.register_plugin(so.PreloadModel(copy, "cpu", threads=THREADS))
    assert [c.get(key) for c in client.run(so.load_counts).values()] == [1, 1]
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        lumos.write_image_tiff(src / f"x{i}.tif", blobs(np.random.default_rng(i), 40, 40)[0])
    so.segment_tiffs(src, tmp_path / "out", copy, client=client, threads=THREADS)
    assert [c.get(key) for c in client.run(so.load_counts).values()] == [1, 1]


def test_ome_zarr_round_trip(tmp_path):
    data = np.arange(2 * 3 * 4 * 20 * 30, dtype=np.uint16).reshape(2, 3, 4, 20, 30)
    for version in ("0.4", "0.5"):
        p = write_image(tmp_path / f"v{version}.ome.zarr", data, "tczyx", version, scale=[1.5, 1.0, 2.0, 0.3, 0.3])
        img, back = read_level0(p)
        np.testing.assert_array_equal(back, data)
        assert img.version == version and img.letters == list("tczyx")
        assert img.scale == [1.5, 1.0, 2.0, 0.3, 0.3]
        assert img.axes[0] == {"name": "t", "type": "time"} and img.axes[4]["unit"] == "micrometer"
        if version == "0.4":
            attrs = json.loads((p / ".zattrs").read_text())
            ms = attrs["multiscales"][0]
            assert ms["version"] == "0.4"
            assert json.loads((p / "0" / ".zarray").read_text())["dimension_separator"] == "/"
        else:
            meta = json.loads((p / "zarr.json").read_text())
            assert meta["zarr_format"] == 3 and meta["node_type"] == "group"
            ms = meta["attributes"]["ome"]["multiscales"][0]
            assert meta["attributes"]["ome"]["version"] == "0.5"
            assert json.loads((p / "0" / "zarr.json").read_text())["dimension_names"] == list("tczyx")
        assert ms["datasets"] == [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.5, 1.0, 2.0, 0.3, 0.3]}]}]
    with pytest.raises(FileExistsError):
        write_image(tmp_path / "v0.4.ome.zarr", data, "tczyx", "0.4")
    with pytest.raises(ValueError, match="multiscales"):
        so.read_ome_zarr(tmp_path / "v0.4.ome.zarr" / "0")


def test_command_line(seg_model, client, tmp_path):
    image, _ = blobs(np.random.default_rng(2), 96, 80)
    src = write_image(tmp_path / "in.ome.zarr", image[0], "yx", "0.4")
    out = tmp_path / "cli.ome.zarr"
    args = ["segment", "--model", str(seg_model), "--input", str(src), "--out", str(out), "--chunk", "48",
            "--threads", str(THREADS)]
    assert so.main(args + ["--scheduler", client.scheduler.address]) == 0
    _, via_address = read_level0(out)
    assert so.main(args + ["--synchronous", "--overwrite"]) == 0
    _, local = read_level0(out)
    np.testing.assert_array_equal(via_address, local)
    with pytest.raises(SystemExit):
        so.main(args + ["--synchronous", "--local-workers", "2"])
    # as a program: its tasks must reach the workers' model cache (one load per worker)
    copy = tmp_path / "cli-copy.lumos"
    copy.write_bytes(pathlib.Path(seg_model).read_bytes())
    cmd = [sys.executable, "-m", "lumos.scaleout", "segment", "--model", str(copy), "--input", str(src), "--out",
           str(tmp_path / "program.ome.zarr"), "--chunk", "48", "--threads", str(THREADS),
           "--scheduler", client.scheduler.address]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    _, via_program = read_level0(tmp_path / "program.ome.zarr")
    np.testing.assert_array_equal(via_program, local)
    counts = [c.get(f"{copy}|cpu", 0) for c in client.run(so.load_counts).values()]
    assert max(counts) == 1 and sum(counts) >= 1, counts
