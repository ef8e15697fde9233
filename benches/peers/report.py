"""Writes docs/benchmarks.md from the measurements of scripts/bench.sh.

    python benches/peers/report.py --results target/bench/results.json --out docs/benchmarks.md

``results.json`` (written by scripts/bench.sh): ``{"run": {...}, "versions": {...},
"measurements": [one JSON object per engine or peer measurement], "gpu_memory": [[unix
time, MiB used], ...]}``. Engine and peer rows are paired by (model, mode, batch, frame,
steps, precision); every ratio is engine / peer from the same run. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess

GOAL = 0.9

MODE_TITLES = {
    "train_step": "Training step (forward, backward, optimizer)",
    "inference": "Inference throughput (network forward without gradients, a batch of tiles)",
    "segment_2048": "Time to segment a {frame} ssQPM frame (sliding window, Gaussian blending of overlapping tiles)",
    "decompose": "muSplit: decompose a fluorescence frame (inner-padding tiling)",
    "pgdiff_tiles": "PG-DiffSeg: tiles per second (encode, DDIM inversion, DDIM sampling)",
}
MODE_ORDER = ["train_step", "inference", "segment_2048", "decompose", "pgdiff_tiles"]


def machine(run: dict) -> dict:
    m = {}
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        m["cpu"] = names[0] if names else platform.processor()
        m["logical_cpus"] = len(names)
    except OSError:
        m["cpu"] = platform.processor() or "unknown"
    try:
        m["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        m["usable_cpus"] = os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(l.split()[1]) for l in f if l.startswith("MemTotal"))
        m["ram_gib"] = kb / 2 ** 20
    except (OSError, StopIteration):
        pass
    m["kernel"] = platform.release()
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        if q.returncode == 0 and q.stdout.strip():
            m["gpu"] = q.stdout.strip().replace("\n", "; ")
    except (OSError, subprocess.SubprocessError):
        pass
    return m


def libtorch_version(root: str) -> str:
    p = os.path.join(root, ".libtorch", "torch", "version.py")
    try:
        with open(p) as f:
            for line in f:
                if line.startswith("__version__"):
                    return line.split("=", 1)[1].strip().strip("'\"")
    except OSError:
        pass
    return os.environ.get("LIBTORCH", "unknown")


def key(r: dict):
    steps = tuple(r.get("steps") or ())
    # whole-frame rows at another sliding-window step are other measurements
    step = float((r.get("sliding_window") or {}).get("step_fraction", 0.5)) if r["mode"] == "segment_2048" else None
    return (r["model"], r["mode"], r["batch"], r.get("frame"), steps, r.get("precision") or "float32", step)


def failure_key(f: str):
    """(model, mode, batch, frame, steps, precision, step) of a bench.sh failure line
    ("MODEL MODE key=value ...: why")."""
    words = f.split(":", 1)[0].split()
    kv = dict(w.split("=", 1) for w in words[2:] if "=" in w)
    try:
        steps = tuple(int(v) for v in kv["steps"].split(",")) if "steps" in kv else ()
        step = float(kv.get("step", 0.5)) if words[1] == "segment_2048" else None
        return (words[0], words[1], int(kv.get("batch", 2)), int(kv.get("frame", 0)), steps,
                kv.get("precision", "float32"), step)
    except (IndexError, ValueError):
        return None


def label(r: dict) -> str:
    """The model's name in a table row, with the inference precision when not float32."""
    p = r.get("precision") or "float32"
    return r["model"] if p == "float32" else f"{r['model']} ({p})"


def fmt(v, digits=3):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.{max(digits - 1, 1)}f}"
        return f"{v:.{digits}g}"
    return str(v)


def check_cell(e, p):
    ce, cp = e.get("check"), p.get("check")
    if ce is None or cp is None:
        return "n/a"
    rel = abs(ce - cp) / max(abs(ce), abs(cp), 1e-12)
    mark = "same" if rel < 1e-3 else f"differ ({rel:.1e})"
    return f"{ce:.5g} / {cp:.5g} ({mark})"


def spread(r) -> float:
    """(max - min) / median of a row's timed repetitions (0 for a single repetition)."""
    t = r.get("times_s") or []
    if len(t) < 2 or not r.get("median_s"):
        return 0.0
    return (max(t) - min(t)) / r["median_s"]


def pool_rounds(rs):
    """One record from the rounds of one measurement (same model, mode, batch, frame, steps,
    precision and side, one run of bench.sh; plan key rounds=R): the timed repetitions of all
    rounds pooled and their median as ``median_s``, throughputs rescaled to it, the medians of
    the breakdown timings, the largest peak memory, the first round's check value, and the
    per-round medians in ``round_medians_s``."""
    if len(rs) == 1:
        return rs[0]
    out = dict(rs[0])
    times = [t for r in rs for t in (r.get("times_s") or [])]
    med = statistics.median(times) if times else float("nan")
    out["times_s"] = times
    out["reps"] = len(times)
    out["median_s"] = med
    out["rounds"] = len(rs)
    out["round_medians_s"] = [r.get("median_s") for r in rs]
    for k in ("mp_per_s", "tiles_per_s"):
        if rs[0].get(k) and rs[0].get("median_s") and med:
            out[k] = rs[0][k] * rs[0]["median_s"] / med
    for k in ("forward_loss_s", "forward_backward_s"):
        v = [r[k] for r in rs if r.get(k) is not None]
        if v:
            out[k] = statistics.median(v)
    for k in ("peak_rss_mib", "cuda_max_allocated_mib", "cuda_max_reserved_mib"):
        v = [r[k] for r in rs if r.get(k) is not None]
        if v:
            out[k] = max(v)
            if k == "peak_rss_mib":
                # the growth column pairs the peak with its own round's resident size at the reset
                top = max((r for r in rs if r.get(k) is not None), key=lambda r: r[k])
                out["base_rss_mib"] = top.get("base_rss_mib")
    # device memory is sampled per round: the other side's process runs between the rounds
    out["_rounds"] = rs
    return out


def round_ratios(e, p):
    """Engine / peer ratio of each round (paired in order), when both sides ran in rounds."""
    a, b = e.get("round_medians_s") or [], p.get("round_medians_s") or []
    if len(a) < 2 or len(a) != len(b):
        return []
    return [x / y for x, y in zip(a, b) if x and y]


def rounds_summary(rounded) -> str:
    """[(model, mode, rounds)] -> "train_step rows in 3", one entry per mode when its
    models agree, else one per model."""
    by_mode = {}
    for m, md, n in rounded:
        by_mode.setdefault(md, set()).add(n)
    parts = []
    for md, ns in sorted(by_mode.items()):
        if len(ns) == 1:
            parts.append(f"{md} rows in {next(iter(ns))}")
        else:
            parts.extend(f"{m} {md} in {n}" for m, md2, n in rounded if md2 == md)
    return "; ".join(parts)


def gpu_peak(samples, r):
    """Device memory in use during the measurement, above its run's idle baseline (the
    largest of its rounds' when it ran in rounds)."""
    if r.get("_rounds"):
        v = [g for g in (gpu_peak(samples, x) for x in r["_rounds"]) if g is not None]
        return max(v) if v else None
    if not samples or r.get("t_start") is None:
        return None
    vals = [mib for (ts, mib) in samples if r["t_start"] - 0.5 <= ts <= r["t_end"] + 0.5]
    if not vals:
        return None
    return max(vals) - r.get("_gpu_base", 0.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", action="append",
                    help="results.json of scripts/bench.sh (default target/bench/results.json); given several "
                         "times, the runs' measurements are merged (a later run's measurement replaces an "
                         "earlier one of the same model, mode, batch, frame, steps and precision)")
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--root", default=".")
    ap.add_argument("--notes", help="a Markdown file included after the summary (observations about this run)")
    a = ap.parse_args()
    runs = []
    for path in a.results or ["target/bench/results.json"]:
        with open(path) as f:
            runs.append(json.load(f))
    res = runs[-1]
    run = dict(res.get("run", {}))
    vers = res.get("versions", {})
    rows = []
    gsamples = []
    # engine and peer rows are paired within each run; a later run's pair replaces an earlier
    # one (a side measured alone in a later run never meets the other side of an earlier run)
    eng, peer = {}, {}
    for r in runs:
        base = r.get("run", {}).get("gpu_memory_baseline_mib") or 0.0
        ms = [dict(m, _gpu_base=base) for m in r.get("measurements", [])]
        rows.extend(ms)
        gsamples.extend(r.get("gpu_memory") or [])
        # a measurement run in rounds (plan key rounds=R) has R records per side: pooled
        ge, gp = {}, {}
        for m in ms:
            if m.get("side") in ("engine", "peer"):
                (ge if m["side"] == "engine" else gp).setdefault(key(m), []).append(m)
        e = {k: pool_rounds(v) for k, v in ge.items()}
        p = {k: pool_rounds(v) for k, v in gp.items()}
        for k in set(e) | set(p):
            if k in e and k in p:
                eng[k], peer[k] = e[k], p[k]
            elif k not in eng and k not in peer:
                if k in e:
                    eng[k] = e[k]
                else:
                    peer[k] = p[k]
    if len(runs) > 1:
        # one device, several calls: name each run; later measurements replace earlier ones
        run["command"] = " ; then ".join(r["run"].get("command", "?") for r in runs)
        run["date"] = " ; ".join(r["run"].get("date", "?") for r in runs)
        run["elapsed_s"] = sum(r["run"].get("elapsed_s") or 0 for r in runs)
        done = {(k[0], k[1], k[2], k[3] or 0, k[4], k[5], k[6]) for k in eng if k in peer}
        fails = {}
        for r in runs:
            for f in r["run"].get("failures") or []:
                k = failure_key(f)
                if k not in done:
                    fails[k or f] = f
        run["failures"] = list(fails.values())
    quick = run.get("profile") == "quick"
    cuda = str(run.get("device", "cpu")).startswith("cuda")
    # the machine that ran the benchmark (recorded by bench.sh), else this one
    mach = run.get("machine") or machine(run)
    L = []
    w = L.append
    w("# lumos against its PyTorch peers")
    w("")
    if quick:
        w("> **QUICK SMOKE CONFIGURATION, NOT THE BENCHMARK.** This file was written by "
          "`scripts/bench.sh --quick`: tiny networks (the recipes' `tiny` size), tiny batches, frames and "
          "repetitions, on a machine shared with other work. It proves that the harness runs end to end; "
          "its figures say nothing about the engine's speed. Run `scripts/bench.sh` (no `--quick`) on an idle "
          "machine for the benchmark.")
        w("")
    w(f"Command: `{run.get('command', 'scripts/bench.sh')}`  ")
    w(f"Date: {run.get('date', 'unknown')} (run took {fmt(run.get('elapsed_s'))} s)  ")
    w(f"Profile: **{run.get('profile', '?')}**, device **{run.get('device', 'cpu')}**, "
      f"{run.get('threads', '?')} intra-op threads for both sides (`tch::set_num_threads` / `torch.set_num_threads`)  ")
    la = run.get("loadavg_start"), run.get("loadavg_end")
    if la[0]:
        w(f"Load average (1, 5, 15 min) at the start: {la[0]}; at the end: {la[1]}")
    w("")
    w("## Machine and versions")
    w("")
    w("| | |")
    w("|---|---|")
    w(f"| CPU | {mach.get('cpu')} ({mach.get('logical_cpus', '?')} logical CPUs, {mach.get('usable_cpus')} usable by this process) |")
    if "ram_gib" in mach:
        w(f"| RAM | {mach['ram_gib']:.1f} GiB |")
    w(f"| GPU | {mach.get('gpu', 'none')} |")
    w(f"| OS kernel | Linux {mach.get('kernel')} |")
    lumos_v = next((r["impl"] for r in rows if r.get("side") == "engine"), "lumos")
    w(f"| engine | {lumos_v}; libtorch {mach.get('libtorch') or libtorch_version(a.root)} (from the PyPI torch wheel); `cargo bench` profile (release) |")
    w(f"| peers | PyTorch {vers.get('torch')} (CUDA {vers.get('torch_cuda')}), Python {vers.get('python')}, "
      f"dynamic_network_architectures {vers.get('dynamic_network_architectures')}, diffusers {vers.get('diffusers')}, "
      f"numpy {vers.get('numpy')} |")
    w("")
    w("## How it was measured")
    w("")
    w("- One measurement per process, engine first (`target/release/deps/compare-*`, built by "
      "`cargo bench --bench compare --no-run`; benches/compare.rs), then the peer "
      "(`benches/peers/bench_peers.py`) with the same arguments: same model file (seeded engine weights, "
      "loaded into the peer), same inputs (simulated frames written by the engine), same batch, tile and "
      "thread count, same hyperparameters (the engine's training config travels with the inputs).")
    reps = sorted({(r["mode"], r["warmup"], r["reps"]) for r in rows})
    w("- Repetitions (untimed warm-up + timed): " + "; ".join(f"{m} {wu} + {rp}" for m, wu, rp in reps)
      + ". **Statistic: the median of the timed repetitions** (all times are in results.json). "
      "Every repetition ends with a device synchronization on CUDA; training steps end with `loss.item()` "
      "on both sides. PG-DiffSeg's warm-up runs 1 inversion + 1 sampling step.")
    rounded = sorted({(k[0], k[1], v["rounds"]) for k, v in eng.items() if v.get("rounds")})
    if rounded:
        w("- Rounds: " + rounds_summary(rounded) + " alternating "
          "rounds (engine, peer, engine, peer, ...; each round a fresh pair of processes, the same arguments), "
          "so that a drift of the machine's speed during the run (a shared VM) weighs on both sides alike. "
          "Each side's timed repetitions of all rounds are pooled and the median is taken over the pool; "
          "the ratio cell adds the range of the per-round ratios (engine median / peer median of the same round).")
    w(f"- Ratio = engine time / peer time (for throughputs: peer throughput / engine throughput). The goal "
      f"is a ratio at or below {GOAL} on every row; *met* / **not met** below says which rows reach it.")
    w("- Peak memory (CPU): the process's resident high-water mark, reset (`/proc/self/clear_refs`) once the "
      "model and inputs are ready, read after the timed repetitions: weights, activations, gradients and "
      "optimizer state of the measured work, plus what each runtime keeps resident (for the peer, the Python "
      "interpreter and torch's modules, about 0.5 GB). In parentheses: the growth over the resident size at the "
      "reset, i.e. the memory the measured work itself added (activations, gradients, optimizer state, buffers).")
    if cuda:
        # the sampling interval of each run (bench.sh --gpumem-interval, default 0.1 s; 0: none)
        ivs = []
        for r in runs:
            m = re.search(r"--gpumem-interval[ =](\S+)", r.get("run", {}).get("command", ""))
            ivs.append(m.group(1) if m else "0.1")
        every = (f"every ~{ivs[0]} s" if len(set(ivs)) == 1
                 else "every S s, S per run in the order of the commands above: " + ", ".join(ivs))
        w("- Peak memory (GPU): device memory in use while the process measured (nvidia-smi, sampled by "
          f"scripts/bench.sh {every}; 0: not sampled, n/a; minus the idle baseline): the CUDA context plus what each caching "
          "allocator reserved, the same method for both sides (tch exposes no allocator statistics). The "
          "peer's `torch.cuda.max_memory_allocated` is listed as well.")
    w("- † after the goal: one side's timed repetitions spread by more than 10 % of their median "
      "((max - min) / median), so the ratio is uncertain (a busy machine, or too few repetitions).")
    w("- Check: a value computed from each side's output on the same inputs (first training loss, output mean, "
      "mean label, mean score); *same* when they agree to 1e-3, which shows that both sides did the same work. "
      "Stochastic cases (HVAE, diffusion training) draw from the same libtorch generator with the same seeds.")
    w("")

    met = total = 0
    not_met = []
    sections = []
    for mode in MODE_ORDER:
        keys = [k for k in eng if k[1] == mode]
        if not keys:
            continue
        S = []
        frames = sorted({f"{eng[k]['frame']} x {eng[k]['frame']}" for k in keys if eng[k].get("frame")})
        S.append("## " + MODE_TITLES[mode].format(frame=" / ".join(frames) or "2048 x 2048"))
        S.append("")
        mem_hdr = ("engine / peer peak device MiB" if cuda
                   else "engine / peer peak RSS MiB (growth during the measurement)")
        mem_ratio_hdr = "memory engine/peer" if cuda else "memory engine/peer: peak (growth)"
        if mode == "train_step":
            S.append(f"| model | parameters | batch x tile | engine s/step | peer s/step | engine/peer | goal <= {GOAL} | {mem_hdr} | {mem_ratio_hdr} | check: first loss engine / peer |")
            S.append("|---|---:|---|---:|---:|---:|---|---:|---:|---|")
        elif mode == "inference":
            S.append(f"| model | parameters | batch x tile | engine MP/s | peer MP/s | engine/peer (time) | goal <= {GOAL} | {mem_hdr} | {mem_ratio_hdr} | check: output mean engine / peer |")
            S.append("|---|---:|---|---:|---:|---:|---|---:|---:|---|")
        elif mode in ("segment_2048", "decompose"):
            S.append(f"| model | parameters | frame (tiles of tile) | engine s | peer s | engine MP/s | peer MP/s | engine/peer | goal <= {GOAL} | {mem_hdr} | {mem_ratio_hdr} | check engine / peer |")
            S.append("|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---|")
        else:
            S.append(f"| model | steps (inversion + sampling) | tiles x tile | engine tiles/s | peer tiles/s | engine MP/s | peer MP/s | engine/peer (time) | goal <= {GOAL} | {mem_hdr} | {mem_ratio_hdr} | check engine / peer |")
            S.append("|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|")
        for k in sorted(keys, key=lambda k: (k[0], k[4], k[5], k[3] or 0, k[2], k[6] or 0)):
            e = eng[k]
            p = peer.get(k)
            if p is None:
                S.append(f"| {label(e)} | {e.get('params')} | | {fmt(e['median_s'])} | **peer failed** | | | | | |")
                continue
            ratio = e["median_s"] / p["median_s"]
            total += 1
            ok = ratio <= GOAL
            met += ok
            if not ok:
                short = MODE_TITLES[mode].format(frame="whole").split(' (')[0].split(':')[0]
                not_met.append(f"{short}: {label(e)}"
                               + (f" {e['steps'][0]}+{e['steps'][1]} steps" if e.get("steps") else "")
                               + f" ({ratio:.2f})")
            goal = "met" if ok else "**not met**"
            noisy = max(spread(e), spread(p)) > 0.1
            if noisy:
                goal += " †"
            ge = gp = None
            if cuda:
                me, mp = gpu_peak(gsamples, e), gpu_peak(gsamples, p)
                extra_alloc = p.get("cuda_max_allocated_mib")
                mem = f"{fmt(me)} / {fmt(mp)}" + (f" (torch allocated {fmt(extra_alloc)})" if extra_alloc else "")
            else:
                ge = gp = None
                me, mp = e.get("peak_rss_mib"), p.get("peak_rss_mib")
                ge = me - e["base_rss_mib"] if (me and e.get("base_rss_mib")) else None
                gp = mp - p["base_rss_mib"] if (mp and p.get("base_rss_mib")) else None
                mem = f"{fmt(me)} / {fmt(mp)} ({fmt(ge)} / {fmt(gp)})"
            mratio = fmt(me / mp, 2) if (me and mp) else "n/a"
            if not cuda and ge and gp:
                mratio += f" ({fmt(ge / gp, 2)})"
            params = e.get("params")
            if params != p.get("params"):
                params = f"{params} (peer {p.get('params')})"
            bt = f"{e['batch']} x {e['tile']}x{e['tile']}"
            chk = check_cell(e, p)
            rr = round_ratios(e, p)
            rcell = f"{ratio:.2f}" + (f" (rounds {min(rr):.2f}-{max(rr):.2f})" if rr else "")
            if mode == "train_step":
                S.append(f"| {label(e)} | {params} | {bt} | {fmt(e['median_s'])} | {fmt(p['median_s'])} | {rcell} | {goal} | {mem} | {mratio} | {chk} |")
            elif mode == "inference":
                S.append(f"| {label(e)} | {params} | {bt} | {fmt(e['mp_per_s'])} | {fmt(p['mp_per_s'])} | {ratio:.2f} | {goal} | {mem} | {mratio} | {chk} |")
            elif mode in ("segment_2048", "decompose"):
                info = e.get("sliding_window") or e.get("tiling") or {}
                stepinfo = (f", step {info['step_fraction']:g}" if info.get("step_fraction") not in (None, 0.5) else "")
                fr = (f"{e['frame']} x {e['frame']} ({fmt(info.get('tiles'))} of {e['tile']}x{e['tile']}, "
                      f"{info.get('batch', e['batch'])} per pass{stepinfo})")
                S.append(f"| {label(e)} | {params} | {fr} | {fmt(e['median_s'])} | {fmt(p['median_s'])} | {fmt(e['mp_per_s'])} | {fmt(p['mp_per_s'])} | {ratio:.2f} | {goal} | {mem} | {mratio} | {chk} |")
            else:
                st = e.get("steps") or [0, 0]
                S.append(f"| {label(e)} | {st[0]} + {st[1]} | {e['batch']} x {e['tile']}x{e['tile']} | {fmt(e.get('tiles_per_s'))} | {fmt(p.get('tiles_per_s'))} | {fmt(e['mp_per_s'])} | {fmt(p['mp_per_s'])} | {ratio:.2f} | {goal} | {mem} | {mratio} | {chk} |")
        S.append("")
        if mode == "train_step":
            S.append("| model | engine: loss and optimizer | peer: loss and optimizer |")
            S.append("|---|---|---|")
            for k in sorted(keys):
                e, p = eng[k], peer.get(k, {})
                S.append(f"| {e['model']} | {e.get('optimizer', '')} | {p.get('optimizer', 'n/a')} |")
            S.append("")
        sections.append(S)
    w("## Summary")
    w("")
    w(f"Goal (engine time at or below {GOAL} x the peer's): **met on {met} of {total} rows**"
      + (f"; not met: {', '.join(not_met)}." if not_met else "."))
    missing = [k for k in eng if k not in peer] + [k for k in peer if k not in eng]
    fails = run.get("failures") or []
    if fails or missing:
        w("")
        w("Failed or unpaired measurements: " + "; ".join([str(f) for f in fails] + [" ".join(map(str, k)) for k in missing]))
    w("")
    if len(runs) > 1:
        w(f"Merged from {len(runs)} runs of scripts/bench.sh on the same machine kind (commands and dates above, "
          "in order); each row comes from the last run that measured it.")
        w("")
    if a.notes:
        with open(a.notes) as f:
            L.append(f.read().rstrip("\n"))
        w("")
    for S in sections:
        L.extend(S)
    bd = [(k, eng[k], peer.get(k)) for k in eng if k[1] == "train_step" and eng[k].get("forward_backward_s")]
    if bd:
        w("## Where a training step's time goes")
        w("")
        w("Forward + loss and forward + loss + backward timed alone (medians, same batch, after the steps); "
          "the rest of a step is `zero_grad`, gradient clipping and the optimizer update. These are differences "
          "of medians: where timing noise exceeds the optimizer's share they can come out negative.")
        w("")
        w("| model | side | step s | forward + loss s | backward s | zero_grad + clip + optimizer s | optimizer share |")
        w("|---|---|---:|---:|---:|---:|---:|")
        for k, e, p in sorted(bd, key=lambda t: t[0]):
            for side, r in (("engine", e), ("peer", p)):
                if not r or not r.get("forward_backward_s"):
                    continue
                f, fb, st = r["forward_loss_s"], r["forward_backward_s"], r["median_s"]
                rest = st - fb
                w(f"| {r['model']} | {side} | {fmt(st)} | {fmt(f)} | {fmt(fb - f)} | {fmt(rest)} | {100 * rest / st:.0f} % |")
        w("")
    w("## What the engine does that the peers do not")
    w("")
    w("Both sides call the same libtorch 2.11 kernels, except for the engine's CPU training convolutions "
      "(oneDNN 3.2, below) and its CUDA InstanceNorm kernels (below); the engine's margin comes from how it "
      "calls them (each is the same function as the peer's, as the check column shows):")
    w("")
    w("- **Blocked training convolutions** (`nn::onednn`, CPU, float32, every network but PG-DiffSeg's): "
      "libtorch's convolutions take and return plain NCHW tensors, so each one reorders its input into "
      "oneDNN's blocked nChw16c layout and its output back, forward and in both backward passes "
      "(a 32-channel 3x3 conv at 256 x 256, batch 2, forward + backward: 54.6 ms through libtorch, 35.5 ms "
      "for the same three oneDNN primitives on blocked tensors). The engine keeps training activations "
      "blocked from layer to layer, as 5-d tensors (N, C/16, H, W, 16) that autograd carries: convolutions "
      "and transposed convolutions are autograd functions over oneDNN primitives (a oneDNN 3.2 library of "
      "its own, the PyPI wheel `onednn-cpu-gomp`, loaded at run time: libtorch's copy is linked with hidden "
      "symbols), InstanceNorm / BatchNorm + activation fused kernels of its own on the blocked tensors, "
      "concatenation and the HVAE's elementwise ops on the blocks as they are. The kernels are the same "
      "jit:avx512_core convolutions (oneDNN time per nnU-Net step on the 2-core AMD EPYC: 1048 ms through "
      "libtorch, 938 ms blocked, the difference being the activation reorders). Unit tests compare every "
      "network's outputs, every gradient and the running statistics with the plain path. "
      "`LUMOS_ONEDNN=0` (or no `libdnnl.so.3`) falls back to libtorch's convolutions.")
    w("- **Allocator** (`device::tune_allocator`): glibc `mallopt` keeps freed tensor memory in the heap "
      "(mmap threshold 32 MiB, trim threshold 1 GiB) instead of returning every large activation to the OS "
      "and faulting it in again on the next step (early-fusion training step, alternating runs on a 2-core "
      "AMD EPYC on 2026-11-26: 0.91-0.94 s tuned, 1.02-1.07 s untuned). "
      "`LUMOS_MALLOC_TUNING=0` turns it off.")
    w("- **InstanceNorm as GroupNorm** (`nn::blocks::InstanceNorm`): one group per channel, libtorch's fused "
      "`group_norm` kernel instead of `instance_norm`'s reshape + batch norm; the conv bias before it is not "
      "added (a per-channel constant cancels in the normalization).")
    w("- **CUDA InstanceNorm** (`nn::blocks::InstanceNorm`, `nn::cuda_norm`, inference on a GPU): the "
      "channels-last maps stay channels-last through the norms (libtorch's CUDA `group_norm` and "
      "`instance_norm` copy them to NCHW, so the following convolutions run on NCHW maps), and each "
      "InstanceNorm + LeakyReLU is two fused kernels of the engine's own (CUDA C++ compiled by NVRTC at first "
      "use: per-(sample, channel) sums in one pass, normalize + affine + LeakyReLU in the other) instead of "
      "a reduction, about ten small kernels and two elementwise passes (H200, DM-QPMNet on 16 tiles, "
      "bfloat16: 12.6 ms with NCHW norms, 8.7 ms channels-last through libtorch before its bfloat16 "
      "precision fix, 6.7 ms fused). "
      "`LUMOS_CUDA_FUSED_NORM=0` / `LUMOS_CUDA_NHWC_NORM=0` switch them off.")
    w("- **Staged frame copies** (`staging`, `tiling::rows_to_device`, CUDA): a frame goes to the GPU through "
      "a ring of page-locked buffers, libtorch's CPU thread pool filling one while the previous one is "
      "transferred, and the host queues the network without waiting for the transfer (libtorch copies from "
      "pageable memory through the driver's single-threaded staging and returns when the copy is done); the "
      "normalization's parameters are uploaded before the frame and the finiteness flag is read after the "
      "first batch, so nothing waits for the copy. H100, 5 x 1024 x 1024 float32 frame: copy 0.80 ms against "
      "1.63 ms, DM-QPMNet step-1.0 frame 8.95 ms against 10.77 ms. `LUMOS_CUDA_STAGED_COPY=0` switches it off.")
    w("- **Channels-last inference** (`Net::infer`, `Model::decompose`): nnU-Net-style networks and both muSplit "
      "networks run NHWC without gradients (oneDNN's native layout; the HVAE's latent draws are made in NCHW "
      "order, so the sample does not depend on the layout), and **packed conv weights** (`nn::packed`): the nnU-Net blocks' "
      "weights are reordered for oneDNN once and reused (`mkldnn::_convolution_pointwise`), as "
      "`torch.jit.freeze` / torch.compile do, instead of on every call. Training does not run channels-last "
      "(its backward passes measured slower: PlainConvUNet step 1.9 s against 1.5 s in PyTorch, same machine and "
      "day) but blocked (above); "
      "the diffusion U-Nets stay NCHW and unpacked (packing measured about 10 % slower there, channels-last "
      "within the noise).")
    w("- **Fused attention** (`nn::ldm`): the diffusion U-Nets' multi-head attention hands q, k and v to "
      "`scaled_dot_product_attention` as (N, heads, T, d) with unit stride along d, the layout libtorch's "
      "flash-attention CPU kernel takes (forward and backward, never materializing the T x T weights); the "
      "transcription keeps openaimodel's legacy QKV shapes, (N x heads, T, d) transposed views, which "
      "`scaled_dot_product_attention` serves with its unfused path (bmm, safe softmax, bmm). At T = 4096 (LDM-S's attention on the "
      "64 x 64 latent) that is 410 ms against 65 ms per call, 2.6x for forward + backward.")
    w("- **LC U-Net inference on the regions the output depends on** (`nn::musplit::LcEncoder::forward_pruned`): "
      "with the regular merge every level from 1 on is a map of the LC crop's side (64 x 64 at paper size, a field "
      "of view 2^k times the patch's), but the decoder reads level k only through its 8 x 8 ... 4 x 4 skip and the "
      "next down block, so the engine works out the centred region each layer's output is needed on (a 3x3 conv "
      "adds a 1-pixel ring, a stride-2 down block doubles it; crops at even offsets) and runs inference on those "
      "crops: the last level's 512-channel layers on 6 x 6 to 20 x 20 instead of 64 x 64 (that level was 50 of the 68 GFLOP per tile). "
      "The same function (a unit test compares every skip with the full forward; the check column agrees); "
      "training runs the full maps (BatchNorm takes batch statistics over them). Its BatchNorms are folded into "
      "the convs' weights in inference, and under bfloat16 autocast the packed weights are cast once.")
    w("- **LC HVAE** (`nn::musplit`): inference skips the KL term and the prior convs that only the loss needs; "
      "the gate `a * sigmoid(b)` is libtorch's fused `glu`; ELU and dropout run in place; dropout (`nn::dropout`, "
      "shared with the diffusion U-Nets) draws "
      "libtorch's own mask (one float64 uniform per element below 1 - p) with `rand` instead of `bernoulli_`, "
      "1.5x faster on CPUs where libtorch samples element by element (all but Intel CPUs with MKL, where it "
      "keeps libtorch's dropout); the masks are equal, a unit test checks it.")
    w("- **Multi-tensor optimizers** (`optim`): libtorch's `_fused_sgd_`, `_fused_adam_` and `_foreach_*` "
      "ops through a small C++ shim (tch binds none of them), gradient clipping by `_foreach_norm`, and "
      "gradients dropped rather than zeroed; the peers use torch.optim's default for the device "
      "(the per-parameter loop on the CPU).")
    w("")
    w("## Peers")
    w("")
    impls = sorted({(r["model"], r["impl"]) for r in rows if r.get("side") == "peer"})
    for m, i in impls:
        w(f"- {m}: {i}")
    w("- Transcriptions: benches/peers/models.py, proven equal to the engine (parameter counts and outputs) by "
      "benches/peers/check_parity.py. Training-step peers: the engine's losses written in PyTorch, `loss.backward()`, "
      "`torch.nn.utils.clip_grad_norm_` / `clip_grad_value_`, `torch.optim` with the engine's settings and torch's "
      "default implementation for the device. Sliding window: PyTorch, nnU-Net's Gaussian (sigma = tile / 8) and "
      "step 0.5, the same tiles per forward pass as the engine (benches/peers/bench_peers.py). PG-DiffSeg sampling: diffusers' `DDIMInverseScheduler` "
      "and `DDIMScheduler` loops.")
    w("")
    w("Raw measurements: " + ", ".join(f"`{p}`" for p in (a.results or ["target/bench/results.json"])) + " (every repetition, pid, start and end times, setup time, "
      "peak memory, inputs and model files).")
    w("")
    with open(a.out, "w") as f:
        f.write("\n".join(L))
    print(f"report: {a.out} ({met} of {total} rows meet the goal)")


if __name__ == "__main__":
    main()
