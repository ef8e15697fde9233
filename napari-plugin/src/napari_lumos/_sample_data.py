"""Sample data from the engine's simulators (``lumos_simulate``): a new frame per seed."""

from __future__ import annotations

import lumos

SSQPM_CHANNELS = ("I0", "I45", "I90", "I135", "phase")


def ssqpm_sample(seed: int = 0, size: int = 256):
    """Four polarized intensities (ADU) and the phase (rad) as five layers, and the cell mask."""
    image, truth = lumos.simulate("ssqpm", seed=seed, size=size)
    layers = [(image[i], {"name": name, "colormap": "gray", "blending": "additive", "visible": name == "phase"},
               "image") for i, name in enumerate(SSQPM_CHANNELS)]
    layers.append((truth[0].astype("uint8"), {"name": "cells (truth)", "opacity": 0.4}, "labels"))
    return layers


def qpi_sample(seed: int = 0, size: int = 256):
    """A phase image (rad) of live and dead cells, and its mask (1 live, 2 dead)."""
    image, truth = lumos.simulate("qpi", seed=seed, size=size)
    return [(image[0], {"name": "phase", "colormap": "gray"}, "image"),
            (truth[0].astype("uint8"), {"name": "live/dead (truth)", "opacity": 0.4}, "labels")]


def fluo_sample(seed: int = 0, size: int = 256):
    """The superimposed image (photo-electrons) and the two structures it is made of."""
    image, truth = lumos.simulate("fluo", seed=seed, size=size)
    return [(image[0], {"name": "mixed", "colormap": "gray"}, "image"),
            (truth[0], {"name": "structure 1 (truth)", "colormap": "magenta", "blending": "additive",
                        "visible": False}, "image"),
            (truth[1], {"name": "structure 2 (truth)", "colormap": "green", "blending": "additive",
                        "visible": False}, "image")]
