"""Throughput of CPI fusion (SLERP + transplant) and of the global core-mask threshold.

    .venv/bin/python -m experiments.bench_fusion                    # full size (~8 GiB RAM)
    .venv/bin/python -m experiments.bench_fusion --params=32e6 --threshold_values=25e6

Two task models and a backbone of at least ``--params`` float32 entries each, in Llama-like
leaves (embedding, attention and MLP kernels, norm scales), with random 1% core masks. Bytes
counted for a throughput: the two task models' bytes (each read at least once); the bandwidth
is those bytes over the time ``np.copyto`` takes to copy them (same run, interleaved rounds).
The NumPy baseline is the per-tensor float32 way (normalised copies, dot, arccos, sin, as
mergekit's slerp) plus the same transplant. Compile time is reported separately; every other
time is the median over ``--repeats`` rounds (the NumPy baseline, ~20x slower, over its first
``--numpy_repeats``). Each round runs every measurement once, so a round's copy and fusion are
seconds apart: the bandwidth row also gives the range of the per-round ratios, which shows how
much the shared machine moved during the run. The "cpu ms" column is this process's CPU time
(all threads) for the same rounds: when other processes share the cores, wall time includes
waiting for a core and the CPU time shows the work itself. ``--json_out=PATH`` also writes every
round's times, the medians, the verdicts and the agreement checks as JSON.
"""

import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from cpift_jax import fusion, masks

_PARAMS = flags.DEFINE_float("params", 256e6, "float32 entries per model (approximate)")
_THRESHOLD_VALUES = flags.DEFINE_float("threshold_values", 100e6, "scores ranked by the threshold")
_FRACTION = flags.DEFINE_float("core_fraction", 0.01, "core mask density")
_REPEATS = flags.DEFINE_integer("repeats", 11, "timed rounds after one warm-up round")
_NUMPY_REPEATS = flags.DEFINE_integer("numpy_repeats", 3, "timed rounds of the NumPy baseline (at most --repeats)")
_OVERLAP = flags.DEFINE_enum("overlap", "max_delta", list(fusion.OVERLAP_RULES), "overlap rule")
_JSON_OUT = flags.DEFINE_string("json_out", "", "also write the measured rows and checks here")

TARGETS = {"bandwidth": 0.70, "numpy": 4.0, "threshold": 2.0}


def leaf_shapes(params: float) -> list[tuple[int, ...]]:
    """3 layers of attention (d, d) x4, MLP (d, f) x2 + (f, d), norms, and an embedding (v, d)
    whose v (a multiple of 128, about 16 d) brings the total to at least ``params``."""
    d = max(128, int(round((params / 52.75) ** 0.5 / 128)) * 128)
    f = int(round(2.75 * d / 256)) * 256
    layer = [(d, d)] * 4 + [(d, f), (d, f), (f, d), (d,), (d,)]
    layers = layer * 3 + [(d,)]
    rest = params - sum(int(np.prod(s)) for s in layers)
    v = max(128, -(-int(np.ceil(rest / d)) // 128) * 128)
    return [(v, d)] + layers


def make_models(shapes, fraction):
    key = jax.random.PRNGKey(0)
    backbone, tuned, cores = [], ([], []), ([], [])
    for i, shape in enumerate(shapes):
        kb, k0, k1, m0, m1 = jax.random.split(jax.random.fold_in(key, i), 5)
        b = 0.02 * jax.random.normal(kb, shape, jnp.float32)
        backbone.append(b)
        for j, (kt, km) in enumerate(((k0, m0), (k1, m1))):
            tuned[j].append(b + 1e-3 * jax.random.normal(kt, shape, jnp.float32))
            cores[j].append(jax.random.uniform(km, shape) < fraction)
    return jax.block_until_ready((backbone, list(tuned), list(cores)))


def numpy_fusion(backbone, tuned, cores, t=0.5, eps=1e-8, threshold=0.9995):
    """Per tensor, float32 NumPy: SLERP of the non-core entries, max-|delta| transplant."""
    out = []
    for base, a, b, m0, m1 in zip(backbone, *tuned, *cores):
        base, a, b, m0, m1 = map(np.asarray, (base, a, b, m0, m1))
        union = m0 | m1
        a_nc, b_nc = np.where(union, 0, a), np.where(union, 0, b)
        na, nb = np.linalg.norm(a_nc), np.linalg.norm(b_nc)
        a_n = a_nc / na if na > eps else a_nc
        b_n = b_nc / nb if nb > eps else b_nc
        dot = np.sum(a_n * b_n)
        if abs(dot) > threshold:
            merged = (1 - t) * a + t * b
        else:
            theta = np.arccos(dot)
            merged = (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)
        take0 = m0 & (~m1 | (np.abs(a - base) >= np.abs(b - base)))
        out.append(np.where(take0, a, np.where(m1, b, merged)).astype(np.float32))
    return out


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn, prepare=lambda: ()):
    """(wall seconds, CPU seconds of this process, result) of one call, ``prepare`` untimed."""
    args = jax.block_until_ready(prepare())
    cpu, start = cpu_seconds(), time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, cpu_seconds() - cpu, result


def main(argv):
    del argv
    if _REPEATS.value < 1 or _NUMPY_REPEATS.value < 1:
        raise app.UsageError("--repeats and --numpy_repeats must be at least 1")
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__}, devices {jax.devices()}")
    shapes = leaf_shapes(_PARAMS.value)
    backbone, tuned, cores = make_models(shapes, _FRACTION.value)
    n_params = sum(int(np.prod(s)) for s in shapes)
    counted = 2 * 4 * n_params
    print(f"models: {n_params / 1e6:.1f}M float32 params each in {len(shapes)} leaves "
          f"(largest {max(shapes, key=np.prod)}); counted bytes = 2 task models = {counted / 1e9:.2f} GB")

    sources = [np.asarray(x) for model in tuned for x in model]
    sinks = [np.ones_like(x) for x in sources]  # touched: no page faults in the timed copies
    fresh_backbone = lambda: ([x.copy() for x in backbone],)  # noqa: E731  (donated each round)
    fuse = lambda b: fusion.fuse(b, tuned, cores, overlap=_OVERLAP.value, donate_backbone=True)  # noqa: E731
    runs = {
        "np.copyto": (lambda: [np.copyto(d, s) for d, s in zip(sinks, sources)], lambda: ()),
        "fusion (ours)": (fuse, fresh_backbone),
        "fusion (numpy)": (lambda: numpy_fusion(backbone, tuned, cores), lambda: ()),
    }
    n = int(_THRESHOLD_VALUES.value)
    k = max(1, int(_FRACTION.value * n))
    scores = np.abs(np.random.default_rng(0).standard_normal(n, dtype=np.float32))
    cuts = [0, n // 2, n // 2 + n // 3, n]
    score_tree = {f"w{i}": jnp.asarray(scores[a:b]) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))}
    runs["threshold (masks)"] = (lambda: masks.threshold(score_tree, k), lambda: ())
    runs["threshold (np.partition)"] = (lambda: np.partition(scores, n - k)[n - k], lambda: ())

    times = {name: [] for name in runs}
    cpu_times = {name: [] for name in runs}
    results = {}
    for round_ in range(_REPEATS.value + 1):
        for name, (fn, prepare) in runs.items():
            if name == "fusion (numpy)" and round_ > _NUMPY_REPEATS.value:
                continue
            results.pop(name, None)  # free the last round's output first (peak memory)
            elapsed, cpu, results[name] = timed(fn, prepare)
            times[name].append(elapsed)
            cpu_times[name].append(cpu)
    first = {name: ts[0] for name, ts in times.items()}
    med = {name: float(np.median(ts[1:])) for name, ts in times.items()}
    med_cpu = {name: float(np.median(ts[1:])) for name, ts in cpu_times.items()}

    # Per round, the copy and the fusion ran back to back: their ratio is the paired measurement.
    paired = [c / f for c, f in zip(times["np.copyto"][1:], times["fusion (ours)"][1:])]
    ours, ref = results["fusion (ours)"][0], results["fusion (numpy)"]
    err = max(float(np.max(np.abs(np.asarray(o) - r))) for o, r in zip(jax.tree.leaves(ours), ref))
    bandwidth = counted / med["np.copyto"]
    fusion_rate = counted / med["fusion (ours)"]
    # (run name, label, throughput, ratio text, target met or None)
    rows = [
        ("np.copyto", "np.copyto (bandwidth)", f"{bandwidth / 1e9:.2f} GB/s", "", None),
        ("fusion (ours)", "fusion (ours)", f"{fusion_rate / 1e9:.2f} GB/s",
         f"{fusion_rate / bandwidth:.0%} of bandwidth (rounds {min(paired):.0%}-{max(paired):.0%})",
         fusion_rate / bandwidth >= TARGETS["bandwidth"]),
        ("fusion (numpy)", "fusion (numpy)", f"{counted / med['fusion (numpy)'] / 1e9:.2f} GB/s",
         f"ours {med['fusion (numpy)'] / med['fusion (ours)']:.1f}x faster (target >= {TARGETS['numpy']:.0f}x)",
         med["fusion (numpy)"] / med["fusion (ours)"] >= TARGETS["numpy"]),
        ("threshold (masks)", f"threshold (masks) {n / 1e6:.0f}M", "", "", None),
        ("threshold (np.partition)", f"threshold (np.partition) {n / 1e6:.0f}M", "",
         f"masks {med['threshold (np.partition)'] / med['threshold (masks)']:.1f}x faster "
         f"(target >= {TARGETS['threshold']:.0f}x)",
         med["threshold (np.partition)"] / med["threshold (masks)"] >= TARGETS["threshold"]),
    ]
    print(f"\n{'what':<32} {'median ms':>10} {'cpu ms':>8} {'throughput':>12}  ratio")
    for name, label, rate, ratio, ok in rows:
        verdict = "" if ok is None else ("PASS" if ok else "FAIL")
        print(f"{label:<32} {med[name] * 1e3:>10.1f} {med_cpu[name] * 1e3:>8.1f} {rate:>12}  {ratio} {verdict}")
    numpy_rounds = min(_NUMPY_REPEATS.value, _REPEATS.value)
    thresholds_equal = (float(results["threshold (masks)"])
                        == float(results["threshold (np.partition)"]))
    print(f"\nfirst round (includes compilation): fusion {first['fusion (ours)']:.2f} s, "
          f"threshold {first['threshold (masks)']:.2f} s; median rounds {_REPEATS.value} "
          f"(NumPy baseline {numpy_rounds})")
    print(f"max |ours - numpy| = {err:.2e}; thresholds equal: {thresholds_equal}")
    print(f"report: {results['fusion (ours)'][1]}")
    if _JSON_OUT.value:
        # Per round, the warm-up round (compilation included) first; medians skip it.
        measured = [{"name": name, "label": label, "seconds": times[name],
                     "cpu_seconds": cpu_times[name], "median_s": med[name], "passed": ok}
                    for name, label, _, _, ok in rows]
        with open(_JSON_OUT.value, "w") as f:
            json.dump({"params": n_params, "leaves": len(shapes), "counted_bytes": counted,
                       "repeats": _REPEATS.value, "numpy_repeats": numpy_rounds,
                       "rows": measured, "bandwidth_ratio_per_round": paired,
                       "max_abs_diff": err, "thresholds_equal": thresholds_equal}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
