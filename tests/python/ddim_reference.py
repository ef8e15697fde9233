"""Reference values for the engine's DDIM sampling and inversion, from diffusers.

Runs diffusers' DDIMScheduler (eta 0 and eta 0.7, with explicit variance noise) and
DDIMInverseScheduler with latent diffusion's schedule (linear in sqrt(beta), 0.0015 to
0.0195, 1000 steps, steps_offset 1, set_alpha_to_one False), feeding both the same
seeded epsilon sequences, and writes every input and output to a JSON fixture that
tests/pgdiff.rs replays through lumos::ddim.

    PYTHONPATH=<dir with torch> python tests/python/ddim_reference.py tests/fixtures/ddim_diffusers.json

Needs torch and diffusers (pip install torch diffusers).
"""
import json
import sys

import numpy as np
import torch
import diffusers
from diffusers import DDIMInverseScheduler, DDIMScheduler

CFG = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
           clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
           prediction_type="epsilon")
SHAPE = (2, 3, 4, 4)
STEPS = 10


def main(path):
    rng = np.random.default_rng(20261123)
    out = {"diffusers_version": diffusers.__version__, "torch_version": torch.__version__, "config": CFG,
           "shape": SHAPE, "steps": STEPS}
    sched = DDIMScheduler(**CFG)
    out["alphas_cumprod"] = sched.alphas_cumprod.double().tolist()
    cases = []
    for eta in (0.0, 0.7):
        sched = DDIMScheduler(**CFG)
        sched.set_timesteps(STEPS)
        x0 = rng.standard_normal(SHAPE)
        eps = [rng.standard_normal(SHAPE) for _ in sched.timesteps]
        noise = [rng.standard_normal(SHAPE) for _ in sched.timesteps]
        x = torch.from_numpy(x0)
        for i, t in enumerate(sched.timesteps):
            x = sched.step(torch.from_numpy(eps[i]), int(t), x, eta=eta,
                           variance_noise=torch.from_numpy(noise[i])).prev_sample
        cases.append({"kind": "sample", "eta": eta, "timesteps": [int(t) for t in sched.timesteps],
                      "x": x0.ravel().tolist(), "eps": [e.ravel().tolist() for e in eps],
                      "noise": [n.ravel().tolist() for n in noise], "result": x.numpy().ravel().tolist()})
    inv = DDIMInverseScheduler(**CFG)
    inv.set_timesteps(STEPS)
    x0 = rng.standard_normal(SHAPE)
    eps = [rng.standard_normal(SHAPE) for _ in inv.timesteps]
    x = torch.from_numpy(x0)
    for i, t in enumerate(inv.timesteps):
        x = inv.step(torch.from_numpy(eps[i]), int(t), x).prev_sample
    cases.append({"kind": "invert", "eta": 0.0, "timesteps": [int(t) for t in inv.timesteps],
                  "x": x0.ravel().tolist(), "eps": [e.ravel().tolist() for e in eps], "noise": [],
                  "result": x.numpy().ravel().tolist()})
    out["cases"] = cases
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"wrote {path}: diffusers {diffusers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/ddim_diffusers.json")
