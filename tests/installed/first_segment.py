"""Times a cold start: from the interpreter's start through ``import lumos``, loading a
model and the first segmentation of a 256 x 256 frame (scripts/test-installed.sh runs it
in a new process). Prints JSON."""

import json
import sys
import time

t0 = time.perf_counter()
import lumos  # noqa: E402

t_import = time.perf_counter()
lumos.version()  # loads liblumos.so and libtorch (import lumos itself loads nothing)
t_lib = time.perf_counter()
frame, _ = lumos.simulate("ssqpm", seed=5, size=256)  # the input, not timed
t_sim = time.perf_counter()
with lumos.Model(sys.argv[1], device="cpu") as m:
    t_load = time.perf_counter()
    labels = m.segment(frame)
t_seg = time.perf_counter()
assert labels.shape == (256, 256)
print(json.dumps({"import_s": round(t_import - t0, 3), "library_load_s": round(t_lib - t_import, 3),
                  "model_load_s": round(t_load - t_sim, 3), "first_segment_s": round(t_seg - t_load, 3),
                  "import_to_first_segment_s": round((t_lib - t0) + (t_seg - t_sim), 3)}))
