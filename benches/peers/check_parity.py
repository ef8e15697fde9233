#!/usr/bin/env python3
"""Proves that the PyTorch peers in models.py are faithful transcriptions of the engine.

For every case it trains a tiny engine model (``lumos train`` through the Python binding,
from a named recipe, 1 epoch on simulated data), loads the model file's weights into the
peer with ``load_state_dict(strict=True)``, compares trainable parameter counts with the
engine's (``lumos info``), and compares outputs on the same input:

- segmentation kinds (unet, dmqpm): ``Model.segment(x, probabilities=True)`` on a frame that
  is exactly one tile (so the Gaussian blending is the identity) against
  ``softmax(peer(normalize(x)))``;
- unet and early-fusion dmqpm also against dynamic_network_architectures' PlainConvUNet
  loaded with the same weights (the "dna" rows);
- musplit: ``Model.decompose`` on a whole frame (inner-padding tiling, lateral context
  mirrored past the borders, outputs in target units) against ``peer.decompose``, which
  re-implements that tiling; the stochastic HVAE with 3 posterior samples from a seed
  (the peer seeds torch's generator as the engine seeds libtorch's, so the draws agree);
- pgdiff: the whole deterministic PG-DiffSeg pipeline (encode, LDM-P DDIM inversion,
  LDM-S DDIM sampling with clipping, eta 0) through ``Model.segment(probabilities=True)``
  against ``peer.predict``; labels for other sampling settings; and the autoencoder's
  decoder (which segmentation never runs) through the reconstruction PSNR the engine
  recorded for the validation image during training.

The engine runs in a child process that does not import torch (two copies of libtorch in
one process are asking for trouble); it writes its outputs to WORK/engine/*.npz.

    PYTHONPATH=/tmp/refenv:bindings/python .venv/bin/python benches/peers/check_parity.py

Exits non-zero on any mismatch. See README.md in this folder.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]

TOL = 1e-4  # float32 outputs: |engine - peer| <= TOL * max(1, max |engine|)

# (name, recipe, data, overrides of the recipe's training config, what to compare)
CASES = [
    ("dm-qpmnet", "dm-qpmnet", "ssqpm", {}, "segment"),
    ("dm-qpmnet bidirectional", "dm-qpmnet", "ssqpm", {"dmqpm": {"bidirectional": True}}, "segment"),
    ("dm-qpmnet concat, stage 1", "dm-qpmnet", "ssqpm", {"dmqpm": {"fusion": "concat", "fusion_stage": 1}}, "segment"),
    ("dm-qpmnet width 24, 3 heads", "dm-qpmnet", "ssqpm", {"dmqpm": {"fusion_width": 24, "heads": 3}}, "segment"),
    ("early-fusion", "early-fusion", "ssqpm", {}, "segment"),
    ("angles-only", "angles-only", "ssqpm", {}, "segment"),
    ("phase-only", "phase-only", "ssqpm", {}, "segment"),
    ("leave-one-out (no I45)", "early-fusion", "ssqpm", {"dmqpm": {"channels": [0, 2, 3, 4]}}, "segment"),
    ("unet 5-ch (4 stages)", "nnunet", "ssqpm",
     {"unet": {"n_stages": 4, "base_features": 8, "max_features": 64}}, "segment"),
    ("nnunet recipe (qpi)", "nnunet", "qpi", {}, "segment"),
    ("musplit-unet", "musplit-unet", "fluo", {}, "decompose"),
    ("musplit-unet lean", "musplit-unet", "fluo", {"musplit": {"lc_merge": "lean"}}, "decompose"),
    ("musplit-unet no LC", "musplit-unet", "fluo", {"musplit": {"lc_levels": 0}}, "decompose"),
    ("musplit-hvae", "musplit-hvae", "fluo", {}, "decompose"),
    ("musplit-hae", "musplit-hvae", "fluo", {"musplit": {"stochastic": False}}, "decompose"),
    ("pg-diffseg", "pg-diffseg", "qpi", {"val_fraction": 0.25}, "pgdiff"),
]

DATA = {  # simulator, folder, flags
    "ssqpm": ["ssqpm", "--train", "4", "--test", "1", "--size", "64", "--seed", "0"],
    "qpi": ["qpi", "--train", "4", "--test", "1", "--size", "64", "--seed", "0"],
    "fluo": ["fluo", "--train", "2", "--test", "1", "--size", "48", "--seed", "0"],
}

PGDIFF_LABEL_RUNS = [
    ("labels, forward start t=0", {"start": "forward", "forward_t": 0}),
    ("labels, prior 20+20 steps, no clip", {"inversion_steps": 20, "sampling_steps": 20, "clip_denoised": False}),
]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def find(name, env):
    """$env, else the newer of target/release/NAME and target/debug/NAME."""
    if os.environ.get(env):
        return os.environ[env]
    found = [p for p in (ROOT / "target" / prof / name for prof in ("release", "debug")) if p.is_file()]
    if not found:
        sys.exit(f"{name} not found: build it, or set ${env}")
    return str(max(found, key=lambda p: p.stat().st_mtime))


# ---------------------------------------------------------------------------------------
# Engine side (child process, no torch)


def engine_side(work: pathlib.Path, lumos_bin: str, threads: int, fresh: bool) -> None:
    import numpy as np
    import lumos

    def run(*args):
        r = subprocess.run([lumos_bin, *args], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{lumos_bin} {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
        return r.stdout

    for name, flags in DATA.items():
        d = work / "data" / name
        if fresh and d.exists():
            shutil.rmtree(d)
        if not (d / "train").is_dir():
            run("simulate", flags[0], "--out", str(d), *flags[1:])
    (work / "models").mkdir(parents=True, exist_ok=True)
    (work / "engine").mkdir(parents=True, exist_ok=True)
    manifest = []
    for name, recipe, data, overrides, what in CASES:
        s = slug(name)
        path = work / "models" / f"{s}.lumos"
        if fresh or not path.is_file():
            cfg = merge(lumos.train_recipe(recipe, "tiny"), overrides)
            cfg.update(epochs=1, device="cpu", threads=threads, resume=False)
            lumos.train(work / "data" / data / "train", path, cfg).close()
        info = run("info", str(path))
        params = int(re.search(r"parameters\s*\S\s*(\d+)", info).group(1))
        m = lumos.Model(path, device="cpu")
        rec = {"name": name, "slug": s, "recipe": recipe, "what": what, "model": str(path), "params": params}
        out = {}
        test = work / "data" / data / "test"
        if what == "segment":
            x = lumos.read_tiff(sorted((test / "images").glob("*.tif"))[0])
            _, h, w = x.shape
            out["input"] = x
            out["probs"] = m.segment(x, probabilities=True, tile=(h, w), step_fraction=1.0, batch_size=1)
        elif what == "decompose":
            x = lumos.read_tiff(sorted((test / "inputs").glob("*.tif"))[0])[0]
            out["input"] = x
            out["tiled"] = m.decompose(x, samples=3, seed=7)  # training patch, keep half, batch 16
            out["one_tile"] = m.decompose(x, tile=x.shape[0], keep=x.shape[0], samples=3, seed=11)
        elif what == "pgdiff":
            x = lumos.read_tiff(sorted((test / "images").glob("*.tif"))[0])
            _, h, w = x.shape
            out["input"] = x
            out["probs"] = m.segment(x, probabilities=True, tile=(h, w), step_fraction=1.0, batch_size=1)
            for i, (_, opts) in enumerate(PGDIFF_LABEL_RUNS):
                out[f"labels{i}"] = m.segment(x, tile=(h, w), step_fraction=1.0, batch_size=1, diffusion=opts)
            # the autoencoder's reconstruction PSNR on the validation images, recorded by the
            # engine after the (last) autoencoder epoch; later epochs train only LDM-P / LDM-S
            prov = m.metadata["provenance"]
            ae_epochs = m.metadata["architecture"]["ae_epochs"]
            rec["val_psnr"] = prov["history"][ae_epochs - 1]["val_psnr"]
            rec["val_images"] = prov["val_images"]
            for i, n in enumerate(prov["val_images"]):
                out[f"val{i}"] = lumos.read_tiff(next((work / "data" / data / "train" / "images").glob(f"{n}*")))
        m.close()
        np.savez(work / "engine" / f"{s}.npz", **out)
        manifest.append(rec)
        print(f"  engine: {name}", file=sys.stderr)
    (work / "engine" / "manifest.json").write_text(json.dumps(manifest, indent=1))


# ---------------------------------------------------------------------------------------
# Peer side


# Negative controls: one change per model kind that the comparison must detect (otherwise
# it would be vacuous). (case slug, description, tensor to perturb or None, seed offset)
NEGATIVE = [
    ("dm_qpmnet", "fusion.attn.q_proj.weight perturbed", "fusion.attn.q_proj.weight", 0),
    ("early_fusion", "encoder.stages.3 (bottleneck) conv perturbed", "encoder.stages.3.convs.0.conv.weight", 0),
    ("nnunet_recipe_qpi", "encoder.stages.3 (bottleneck) conv perturbed", "encoder.stages.3.convs.1.conv.weight", 0),
    ("musplit_unet", "stem of LC level 2 perturbed", "encoder.lc.1.stem.block.convs.0.conv.weight", 0),
    ("musplit_hvae", "posterior samples from another seed", None, 1),
    ("pg_diffseg", "LDM-P output conv perturbed (prior inversion only)", "ldm_p.out.2.weight", 0),
    ("pg_diffseg", "autoencoder decoder conv_out perturbed", "ae.decoder.conv_out.weight", 0),
]

# Engine parameter counts published in docs/results (engine-reported, larger sizes than the
# live cases): (what, kind, architecture, input channels, classes, count, source)
PUBLISHED = [
    ("nnU-Net 6 stages, 32 base (5 ch)", "unet", {}, 5, 2, 20620234, "segment_bench.md"),
    ("DM-QPMNet paper (5 stages, 32 base, 8 heads)", "dmqpm", {}, 5, 2, 8230824, "segment_bench.md"),
    ("DM-QPMNet cpu stage 2 MHA", "dmqpm", {"n_stages": 5, "base_features": 16, "max_features": 128, "heads": 4}, 5, 2,
     1405400, "dmqpm/README.md"),
    ("DM-QPMNet cpu stage 3 MHA", "dmqpm", {"n_stages": 5, "base_features": 16, "max_features": 128, "heads": 4,
                                            "fusion_stage": 3}, 5, 2, 1759576, "dmqpm/README.md"),
    ("DM-QPMNet cpu stage 2 concat", "dmqpm", {"n_stages": 5, "base_features": 16, "max_features": 128,
                                               "fusion": "concat"}, 5, 2, 1371864, "dmqpm/README.md"),
    ("DM-QPMNet cpu bidirectional", "dmqpm", {"n_stages": 5, "base_features": 16, "max_features": 128, "heads": 4,
                                              "bidirectional": True}, 5, 2, 1430552, "dmqpm/README.md"),
    ("early fusion cpu (5-ch nnU-Net)", "dmqpm", {"variant": "early_fusion", "n_stages": 5, "base_features": 16,
                                                  "max_features": 128}, 5, 2, 1288680, "dmqpm/README.md"),
    ("LC U-Net cpu (muSplit)", "musplit", {"variant": "unet", "base_channels": 16, "max_channels": 64,
                                           "unet_norm": "batch"}, 1, 2, 757810, "musplit/README.md"),
    ("U-Net cpu (no LC)", "musplit", {"variant": "unet", "base_channels": 16, "max_channels": 64, "lc_levels": 0,
                                      "unet_norm": "batch"}, 1, 2, 487986, "musplit/README.md"),
    ("LC HVAE cpu (muSplit)", "musplit", {"variant": "hvae", "base_channels": 32, "max_channels": 32, "z_dim": 16}, 1, 2,
     607684, "musplit/README.md"),
    ("HVAE cpu (no LC)", "musplit", {"variant": "hvae", "base_channels": 32, "max_channels": 32, "z_dim": 16,
                                     "lc_levels": 0}, 1, 2, 430148, "musplit/README.md"),
]


def peer_side(work: pathlib.Path) -> int:
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    import models as M

    torch.set_grad_enabled(False)
    manifest = json.loads((work / "engine" / "manifest.json").read_text())
    rows, failures = [], []

    def add(kind, case, what, ep, pp, diff, ref_max=1.0, rng="", note=""):
        tol = TOL * max(1.0, ref_max)
        ok = (ep == pp) and diff <= tol
        rows.append((kind, case, what, str(ep), str(pp), f"{diff:.3g}", f"{tol:.3g}", rng, "ok" if ok else "MISMATCH"))
        if note:
            notes.setdefault(note, []).append(f"{case} ({what})")
        if not ok:
            failures.append(f"{case} / {what}")

    notes = {}
    span = lambda a: f"{float(np.min(a)):.3g} .. {float(np.max(a)):.3g}"

    def evaluate(rec, sd, seed_offset=0):
        """[(what, peer params, max abs diff, max |engine|, engine range, note)] of one case."""
        meta = M.read_metadata(rec["model"])
        net = M.build_peer(meta)
        net.load_state_dict(sd, strict=True)
        net.eval()
        pp = M.count_parameters(net)
        arrays = np.load(work / "engine" / f"{rec['slug']}.npz")
        kind = meta["kind"]
        out = []
        if rec["what"] == "segment":
            x = M.normalize(arrays["input"], meta["normalization"])[None]
            ref = arrays["probs"]
            probs = torch.softmax(net(x), 1)[0].numpy()
            out.append(("segment probs", pp, float(np.abs(probs - ref).max()), 1.0, span(ref), ""))
            arch = {**M.DMQPM_DEFAULTS, **meta["architecture"]} if kind == "dmqpm" else {}
            if kind == "unet" or arch.get("variant") == "early_fusion":
                dna = M.dna_plainconvunet(meta).eval()
                M.load_engine_into_dna(dna, sd)
                xi = x if kind == "unet" else x[:, arch["channels"]]
                pd = torch.softmax(dna(xi), 1)[0].numpy()
                out.append(("DNA PlainConvUNet probs", M.count_parameters(dna), float(np.abs(pd - ref).max()), 1.0,
                            span(ref), ""))
        elif rec["what"] == "decompose":
            x = arrays["input"]
            for key, kw in (("tiled", dict(samples=3, seed=7 + seed_offset)),
                            ("one_tile", dict(tile=x.shape[0], keep=x.shape[0], samples=3, seed=11 + seed_offset))):
                ref = arrays[key]
                o = net.decompose(x, meta, **kw)
                what = "decompose, " + ("tiled" if key == "tiled" else "one tile") + (", 3 samples" if net.stochastic else "")
                out.append((what, pp, float(np.abs(o - ref).max()), float(np.abs(ref).max()), span(ref),
                            "target units (photons); tolerance relative"))
        elif rec["what"] == "pgdiff":
            x = M.normalize(arrays["input"], meta["normalization"])[None]
            ref = arrays["probs"]
            probs = net.predict(x)[0].numpy()
            s = net.sampling
            out.append((f"segment probs, prior {s['inversion_steps']}+{s['sampling_steps']} steps, clip", pp,
                        float(np.abs(probs - ref).max()), 1.0, span(ref), ""))
            for i, (what, opts) in enumerate(PGDIFF_LABEL_RUNS):
                lab = net.predict(x, opts)[0].argmax(0).numpy().astype(np.uint8)
                ref = arrays[f"labels{i}"]
                out.append((what, pp, float((lab != ref).mean()), 1.0,
                            "classes " + ",".join(str(c) for c in np.unique(ref)), "difference = fraction of pixels"))
            t = meta["patch_size"][0]
            scores = []
            for i in range(len(rec["val_images"])):
                xi = M.normalize(arrays[f"val{i}"], meta["normalization"])
                _, h, w = xi.shape
                for y0 in range(0, h - t + 1, t):
                    for x0 in range(0, w - t + 1, t):
                        tile = xi[:, y0:y0 + t, x0:x0 + t][None]
                        r = net.ae.decode(net.ae.encode(tile)[0])[0]
                        for c in range(tile.shape[1]):
                            a, b = tile[0, c].double().numpy(), r[c].double().numpy()
                            mse = max(float(((a - b) ** 2).mean()), 1e-20)
                            scores.append(20 * np.log10(max(a.max() - a.min(), 1e-12)) - 10 * np.log10(mse))
            out.append(("autoencoder round trip: PSNR (dB)", pp, abs(float(np.mean(scores)) - rec["val_psnr"]), 1.0,
                        f"{rec['val_psnr']:.4f} dB",
                        "the engine's recorded validation PSNR of encode -> decode (segmentation never decodes)"))
        return out

    for rec in manifest:
        kind = M.read_metadata(rec["model"])["kind"]
        sd = M.engine_state_dict(rec["model"])
        for what, pp, diff, ref_max, rng, note in evaluate(rec, sd):
            add(kind, rec["name"], what, rec["params"], pp, diff, ref_max, rng, note)

    # negative controls
    neg_rows = []
    by_slug = {r["slug"]: r for r in manifest}
    for s, desc, tensor, seed_offset in NEGATIVE:
        rec = by_slug[s]
        sd = M.engine_state_dict(rec["model"])
        if tensor is not None:
            g = torch.Generator().manual_seed(0)
            sd[tensor] = sd[tensor] + 0.05 * sd[tensor].abs().mean().clamp_min(1e-3) * torch.randn(sd[tensor].shape, generator=g)
        res = evaluate(rec, sd, seed_offset)
        if tensor == "ae.decoder.conv_out.weight":
            res = [r for r in res if r[0].startswith("autoencoder")]
        elif tensor is not None and s == "pg_diffseg":
            res = [r for r in res if r[0].startswith("segment")]
        what, _, diff, ref_max, _, _ = res[0]
        tol = TOL * max(1.0, ref_max)
        det = diff > tol
        neg_rows.append((rec["name"], desc, what, f"{diff:.3g}", f"{tol:.3g}", "detected" if det else "NOT DETECTED"))
        if not det:
            failures.append(f"negative control {rec['name']} / {desc}")

    # parameter counts at the sizes published in docs/results
    pub_rows = []
    for what, kind, arch, c_in, k, count, src in PUBLISHED:
        meta = {"kind": kind, "architecture": arch, "input_channels": ["c"] * c_in, "classes": ["k"] * k}
        with torch.device("meta"):
            pp = M.count_parameters(M.build_peer(meta))
            dna = ""
            if kind == "unet" or (kind == "dmqpm" and arch.get("variant") == "early_fusion"):
                dna = str(M.count_parameters(M.dna_plainconvunet(meta)))
        ok = pp == count and (dna in ("", str(count)))
        pub_rows.append((what, src, str(count), str(pp), dna, "ok" if ok else "MISMATCH"))
        if not ok:
            failures.append(f"published count {what}")
    with torch.device("meta"):
        paper = M.build_peer({"kind": "pgdiff", "architecture": {}, "input_channels": ["phase"],
                              "classes": ["background", "live", "dead"]})
        ldm = [(n, M.count_parameters(getattr(paper, n))) for n in ("ae", "ldm_p", "ldm_s")]

    def table(hdr, body):
        widths = [max(len(r[i]) for r in [hdr] + body) for i in range(len(hdr))]
        line = lambda r: "| " + " | ".join(c.ljust(wd) for c, wd in zip(r, widths)) + " |"
        print(line(hdr))
        print("|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
        for r in body:
            print(line(r))

    print("## Parity of outputs (tiny engine models trained for this check)\n")
    table(("kind", "case", "compared", "engine params", "peer params", "max abs diff", "tolerance", "engine output",
           ""), rows)
    print()
    for n, where in notes.items():
        print(f"- {n}: {', '.join(dict.fromkeys(w.split(' (')[0] for w in where))}")
    print("\n## Negative controls (a change the comparison must detect)\n")
    table(("case", "change", "compared", "max abs diff", "tolerance", ""), neg_rows)
    print("\n## Parameter counts at the sizes published in docs/results (peer built on the meta device)\n")
    table(("configuration", "source", "engine (published)", "peer", "DNA PlainConvUNet", ""), pub_rows)
    print("\nPG-DiffSeg at the paper's sizes (peer): " + ", ".join(f"{n} {c:,}" for n, c in ldm) +
          " (the engine's unit test requires LDM-S 84.6M +- 0.6M and LDM-P 274M +- 2M)")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s); tolerance = {TOL:g} x max(1, max |engine|)")
    if failures:
        print(f"\n{len(failures)} MISMATCH(ES): " + "; ".join(failures))
        return 1
    print(f"\nall {len(rows)} comparisons match, {len(neg_rows)} negative controls detected, "
          f"{len(pub_rows)} published counts equal")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/lumos-peers", help="scratch folder (data, models, engine outputs)")
    ap.add_argument("--fresh", action="store_true", help="re-simulate and re-train even if the files exist")
    ap.add_argument("--threads", type=int, default=1, help="threads for the engine's training and torch")
    ap.add_argument("--engine-side", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = pathlib.Path(a.work).resolve()
    lumos_bin = find("lumos", "LUMOS_BIN")
    if a.engine_side:
        engine_side(work, lumos_bin, a.threads, a.fresh)
        return 0
    env = dict(os.environ, LUMOS_LIBRARY=find("liblumos.so", "LUMOS_LIBRARY"), LUMOS_BIN=lumos_bin,
               OMP_NUM_THREADS=str(a.threads))  # libtorch's intra-op threads in the engine child
    py_path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not any(pathlib.Path(p, "lumos", "__init__.py").is_file() for p in py_path):
        py_path.append(str(ROOT / "bindings" / "python"))
    env["PYTHONPATH"] = os.pathsep.join(py_path)
    cmd = [sys.executable, __file__, "--engine-side", "--work", str(work), "--threads", str(a.threads)]
    subprocess.run(cmd + (["--fresh"] if a.fresh else []), env=env, check=True)
    import torch

    torch.set_num_threads(a.threads)
    return peer_side(work)


if __name__ == "__main__":
    sys.exit(main())
