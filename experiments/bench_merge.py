"""Streaming merge vs mergekit on synthetic Llama checkpoints: wall time, peak RSS, max |diff|.

    # once: mergekit in its own virtualenv (torch pinned: the local CPU wheel, no CUDA download)
    python -m experiments.bench_merge --setup_mergekit     # or, by hand:
    #   python3 -m venv .cache/mergekit-venv && \
    #       .cache/mergekit-venv/bin/pip install torch==2.13.0 mergekit==0.1.5
    python -m experiments.bench_merge                      # 3 x ~1B float32 params (~40 GB disk)
    python -m experiments.bench_merge --params=50e6 --repeats=1   # quick (~1 minute)

Writes a base and 3 fine-tune-like models (base + small noise) of ``--params`` parameters each
(Llama layout, ``config.json`` with model_type llama, safetensors) under ``--workdir`` (reused
when the spec matches), then for each operator runs ``python -m experiments.merge`` with the
recipe in configs/merge/ and ``mergekit-yaml`` with the equivalent YAML, each as its own
subprocess (wall time; peak RSS from ``wait4``'s rusage), ``--repeats`` times alternating
between the tools (median wall time, largest peak RSS), and compares the last two outputs tensor
by tensor. Before each timed run the other checkpoints are dropped from the page cache and its
input files are read once (``--warm_cache``), so neither tool gains from the other's reads
(without it, whichever runs second finds the inputs cached), and
pending writes are flushed (``sync``), so no run pays for the previous run's output.
Both compute in float32 (mergekit's ``dtype: float32``) and store ``--dtype``.

Recipes: linear = equal-weight mean of the 3 models; slerp = models 0 and 1 (mergekit's slerp
takes exactly two) with the layer-gradient t of configs/merge/slerp.py; ties = base + 3 models,
density 0.5, weights 1, lambda 1. Targets: our peak RSS <= mergekit's, our wall time <= 0.5x,
max |diff| at float32 rounding (``--tolerance``, relative to the largest |weight|).
Known semantic differences: both keep floor(density * n) entries per tensor (mergekit at least
one); where several entries' |delta| equals the threshold we keep the earliest ones in
row-major order, mergekit's argsort an unspecified subset, so a handful of embedding / head
entries can differ by one model's delta (~1e-3): counted in the "entries differing" column,
not rounding. A tied sign vote merges to
the base with us, mergekit elects + (no effect: the disjoint mean is then over nobody).
Our SLERP accumulates <a, b> in float32 as row sums then a sum, mergekit as one torch sum
(rounding only).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from cpift_jax.streaming import checkpoint_io as ckpt_lib
from cpift_jax.models import safetensors_io as st

_PARAMS = flags.DEFINE_float("params", 1e9, "parameters per synthetic model")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "checkpoint dtype")
_OPERATORS = flags.DEFINE_list("operators", ["linear", "slerp", "ties"], "operators to run")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_merge", "synthetic checkpoints + outputs")
_MERGEKIT = flags.DEFINE_string("mergekit", ".cache/mergekit-venv/bin/mergekit-yaml",
                                "mergekit-yaml executable, relative to the repository root "
                                "('' skips mergekit)")
_SETUP = flags.DEFINE_bool("setup_mergekit", False,
                           "create the mergekit virtualenv (MERGEKIT_INSTALL) and exit")
_SHARD = flags.DEFINE_string("max_shard_size", "2GB", "output shard size for both tools")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-5, "max |diff| / max |weight| counted as equal")
_KEEP = flags.DEFINE_bool("keep", False, "keep the merged outputs")
_WARM = flags.DEFINE_bool("warm_cache", True, "read a run's input files once before timing it, "
                          "so both tools start from the same page cache")
_JSON = flags.DEFINE_string("json", "", "also write the results here")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per tool and operator, alternating "
                                "between the tools; the table gives medians (times) and maxima "
                                "(peak RSS), and lists every run's time")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MERGEKIT_VENV = os.path.join(REPO, ".cache", "mergekit-venv")
# mergekit 0.1.5 is the newest on PyPI; its dependencies install from PyPI alone (it fetches
# nothing from a model hub for local paths). torch is pinned to the version of our own venv.
MERGEKIT_INSTALL = ("torch==2.13.0", "mergekit==0.1.5")
VOCAB = 32000
NOISE = 0.1  # fine-tune deltas: NOISE x the base's scale


def llama_shape(params: float) -> dict:
    """A Llama-like config with about ``params`` parameters (TinyLlama's at 1e9)."""
    hidden = max(128, 64 * round(math.sqrt(params / 240) / 64))
    inter = 256 * math.ceil(8 * hidden / 3 / 256)
    heads = hidden // 64
    kv_heads = max(1, heads // 8)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * 64 + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * VOCAB * hidden - hidden) / per_layer))
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=2048, tie_word_embeddings=False)


def tensor_specs(shape: dict, dtype) -> list[st.TensorSpec]:
    h, i, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"] * 64
    names = [("model.embed_tokens.weight", (VOCAB, h))]
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        names += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                  (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                  (p + "self_attn.o_proj.weight", (h, h)),
                  (p + "post_attention_layernorm.weight", (h,)),
                  (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                  (p + "mlp.down_proj.weight", (h, i))]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (VOCAB, h))]
    return [st.TensorSpec(n, np.dtype(dtype), s) for n, s in names]


def write_models(workdir: str, shape: dict, dtype, names=("base", "m0", "m1", "m2")) -> list[str]:
    """base and noisy copies, streamed tensor by tensor (a spec file marks a finished set)."""
    import transformers

    spec_file = os.path.join(workdir, "spec.json")
    recipe = {"shape": shape, "dtype": np.dtype(dtype).name, "noise": NOISE, "version": 2}
    paths = [os.path.join(workdir, n) for n in names]
    if os.path.isfile(spec_file):
        with open(spec_file) as f:
            if json.load(f) == recipe:
                return paths
    shutil.rmtree(workdir, ignore_errors=True)
    specs = tensor_specs(shape, dtype)
    shards = st.plan_shards(specs, st.parse_size("2GB"))
    writers = []
    for path in paths:
        os.makedirs(path)
        transformers.LlamaConfig(**shape, dtype=np.dtype(dtype).name,
                                 architectures=["LlamaForCausalLM"]).save_pretrained(path)
        writers.append(st.ShardedWriter(path, shards))
    print(f"writing {len(paths)} x {sum(s.nbytes for s in specs) / 1e9:.2f} GB to {workdir}")
    for k, spec in enumerate(specs):
        rng = np.random.default_rng(k)
        norm = spec.name.endswith("norm.weight")
        base = (1.0 + 0.1 * rng.standard_normal(spec.shape, np.float32)) if norm else \
            0.02 * rng.standard_normal(spec.shape, np.float32)
        writers[0].write(spec.name, base.astype(dtype))
        for writer in writers[1:]:
            noise = rng.standard_normal(spec.shape, np.float32)
            noise *= NOISE * (0.1 if norm else 0.02)
            noise += base
            writer.write(spec.name, noise.astype(dtype))
            del noise
    for writer in writers:
        writer.finish()
    with open(spec_file, "w") as f:
        json.dump(recipe, f)
    return paths


def mergekit_yaml(operator: str, paths: list[str], dtype: str) -> str:
    base, models = paths[0], paths[1:]
    head = f"dtype: float32\nout_dtype: {dtype}\n"
    if operator == "linear":
        entries = "".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in models)
        return f"merge_method: linear\nmodels:\n{entries}{head}"
    if operator == "slerp":
        a, b = models[:2]
        return (f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
                "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
                "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n"
                + head)
    if operator == "ties":
        entries = "".join(f"  - model: {m}\n    parameters: {{density: 0.5, weight: 1.0}}\n"
                          for m in models)
        return (f"merge_method: ties\nbase_model: {base}\nmodels:\n{entries}"
                "parameters:\n  normalize: true\n" + head)
    raise ValueError(f"no mergekit recipe for {operator!r}")


def inputs_of(operator: str, paths: list[str]) -> list[str]:
    base, models = paths[0], paths[1:]
    return {"linear": models, "slerp": models[:2], "ties": [base] + models}[operator]


def warm_cache(directories: list[str], others: list[str]) -> None:
    """Drops ``others``' files from the page cache, then reads every file of ``directories``
    once (into the page cache, not into this process). Without the drop, checkpoints used by
    earlier runs sit on the kernel's active list and this run's inputs, read once, are the
    first pages evicted when a merge allocates memory: timings then depend on run order."""
    for directory in others:
        for name in sorted(os.listdir(directory)):
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    for directory in directories:
        for name in sorted(os.listdir(directory)):
            with open(os.path.join(directory, name), "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass


def our_command(operator: str, paths: list[str], output: str) -> list[str]:
    arg = inputs_of(operator, paths)
    return [sys.executable, "-m", "experiments.merge",
            f"--config=configs/merge/{operator}.py:{','.join(arg)}", f"--config.output={output}",
            f"--config.max_shard_size={_SHARD.value}", "--config.progress=False"]


def measure(command: list[str], log: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one subprocess; raises if it fails. Dirty pages left
    by the previous run (its output) are flushed first, so no run pays for another's writes."""
    os.sync()
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({proc.returncode}); see {log}")
    print(f"  {os.path.basename(command[0])}: {wall:.1f} s wall, {usage.ru_utime:.1f} s user, "
          f"{usage.ru_stime:.1f} s system CPU")
    return wall, usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def max_difference(ours: str, theirs: str, tolerance: float, *,
                   max_candidates: int = 1 << 24) -> tuple[float, float, int]:
    """(max |ours - theirs|, max |ours|, entries differing by more than tolerance x max |ours|)
    over all tensors, in float64, reading each output once: the threshold only grows with the
    running max |ours|, so the differences above the running threshold are a superset of those
    counted at the end. At most ``max_candidates`` differences are kept (float64: 128 MiB by
    default); outputs that differ in more entries than that are counted in a second read."""
    a, b = ckpt_lib.open_checkpoint(ours), ckpt_lib.open_checkpoint(theirs)

    def pairs():
        for name in a.specs:
            x, y = a.read(name).astype(np.float64), b.read(name).astype(np.float64)
            if x.shape != y.shape:
                raise ValueError(f"tensor '{name}': shapes {x.shape} vs {y.shape}")
            yield x, np.abs(x - y)

    try:
        if set(a.specs) != set(b.specs):
            raise ValueError(f"different tensor names: {sorted(set(a.specs) ^ set(b.specs))[:3]}")
        scale, diff, candidates = 0.0, 0.0, []
        for x, d in pairs():
            scale = max(scale, float(np.abs(x).max(initial=0.0)))
            diff = max(diff, float(d.max(initial=0.0)))
            if candidates is not None:
                candidates.append(d[d > tolerance * scale])
                if sum(c.size for c in candidates) > max_candidates:  # re-filter at today's scale
                    kept = np.concatenate(candidates)
                    kept = kept[kept > tolerance * scale]
                    candidates = [kept] if kept.size <= max_candidates else None  # None: second read
        if candidates is None:
            return diff, scale, sum(int((d > tolerance * scale).sum()) for _, d in pairs())
        return diff, scale, int(sum((c > tolerance * scale).sum() for c in candidates))
    finally:
        a.close()
        b.close()


def setup_mergekit() -> None:
    subprocess.run(["python3", "-m", "venv",
                    MERGEKIT_VENV], check=True)
    subprocess.run([os.path.join(MERGEKIT_VENV, "bin", "pip"), "install", *MERGEKIT_INSTALL],
                   check=True)
    print(f"mergekit installed in {MERGEKIT_VENV}")


def main(argv):
    del argv
    if _SETUP.value:
        setup_mergekit()
        return
    if _REPEATS.value < 1:
        raise app.UsageError(f"--repeats must be >= 1, got {_REPEATS.value}")
    shape = llama_shape(_PARAMS.value)
    n_params = sum(math.prod(s.shape) for s in tensor_specs(shape, np.float32))
    print(f"synthetic Llama: {n_params / 1e9:.3f}B parameters, {shape}")
    dtype = np.dtype(st.dtype_from_code({"float32": "F32", "bfloat16": "BF16"}[_DTYPE.value]))
    paths = write_models(_WORKDIR.value, shape, dtype)
    rows = []
    for operator in _OPERATORS.value:
        rows.append(run_operator(operator, paths, dtype))
        print(json.dumps(rows[-1]))
    print_table(rows, n_params)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"params": n_params, "dtype": _DTYPE.value, "rows": rows}, f, indent=2)


def run_operator(operator: str, paths: list[str], dtype: np.dtype) -> dict:
    """Times both tools ``--repeats`` times, alternating, and compares the last outputs."""
    ours_out = os.path.join(_WORKDIR.value, f"out_ours_{operator}")
    kit_out = os.path.join(_WORKDIR.value, f"out_mergekit_{operator}")
    inputs = inputs_of(operator, paths)
    others = [p for p in paths if p not in inputs]
    commands = {"ours": (our_command(operator, paths, ours_out), ours_out)}
    if _MERGEKIT.value:
        recipe = os.path.join(_WORKDIR.value, f"{operator}.yml")
        with open(recipe, "w") as f:
            f.write(mergekit_yaml(operator, paths, _DTYPE.value))
        per_shard = st.parse_size(_SHARD.value) // dtype.itemsize
        commands["kit"] = ([os.path.join(REPO, _MERGEKIT.value), recipe, kit_out, "--no-cuda",
                            "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
                            f"--out-shard-size={per_shard}"], kit_out)
    runs = {tool: [] for tool in commands}
    for repeat in range(_REPEATS.value):
        for tool, (command, out) in commands.items():
            shutil.rmtree(out, ignore_errors=True)
            if _WARM.value:
                warm_cache(inputs, others)
            runs[tool].append(measure(command, f"{out}.run{repeat}.log"))
    row = {"operator": operator}
    for tool, results in runs.items():
        row[f"{tool}_runs_s"] = [wall for wall, _ in results]
        row[f"{tool}_s"] = float(np.median(row[f"{tool}_runs_s"]))
        row[f"{tool}_gb"] = max(gb for _, gb in results)
    if "kit" in commands:
        row["diff"], row["scale"], row["n_differ"] = max_difference(ours_out, kit_out, _TOLERANCE.value)
    if not _KEEP.value:
        for _, out in commands.values():
            shutil.rmtree(out, ignore_errors=True)
    return row


def print_table(rows, n_params) -> None:
    print(f"\n{n_params / 1e9:.3f}B params x {_DTYPE.value}; targets: time <= 0.5x, "
          f"RSS <= mergekit, |diff| <= {_TOLERANCE.value:g} x max|w|")
    print(f"times: medians of {_REPEATS.value} alternating runs per tool; peak RSS: the largest")
    print("| operator | ours s | mergekit s | ratio | ours GB | mergekit GB | max abs diff | "
          "entries differing | time | RSS | equal | runs ours / mergekit (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "kit_s" not in r:
            print(f"| {r['operator']} | {r['ours_s']:.1f} | - | - | {r['ours_gb']:.2f} | - | - "
                  f"| - | - | - | - | {_runs(r['ours_runs_s'])} |")
            continue
        ratio = r["ours_s"] / r["kit_s"]
        verdict = [ratio <= 0.5, r["ours_gb"] <= r["kit_gb"],
                   r["diff"] <= _TOLERANCE.value * r["scale"]]
        marks = " | ".join("PASS" if v else "FAIL" for v in verdict)
        print(f"| {r['operator']} | {r['ours_s']:.1f} | {r['kit_s']:.1f} | {ratio:.2f} | "
              f"{r['ours_gb']:.2f} | {r['kit_gb']:.2f} | {r['diff']:.2e} | "
              f"{r['n_differ']} | {marks} | {_runs(r['ours_runs_s'])} / {_runs(r['kit_runs_s'])} |")


def _runs(seconds: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in seconds)


if __name__ == "__main__":
    app.run(main)
