"""Scale benchmarks, one function per part (``--parts``): what a 135M and a 1B model cost.

    .venv/bin/python -m experiments.bench_scale                         # every part
    .venv/bin/python -m experiments.bench_scale --models=smollm2 --repeats=1

``masks``: ``masks.core_mask(base, tuned, --fraction)`` (global scope, one device) on SmolLM2-135M
(its real weights when ``cpift_jax.models.smollm2`` finds them in the cache, else random weights
with its config) and a 1B Llama config (hidden 2048, 16 layers, vocab 32000, random weights in
``--dtype_1b``), the tuned model being the base plus small noise. Each model runs in a child
process so its memory is its own: after the two models are built the child resets its RSS high
water mark (``/proc/self/clear_refs``), runs the core mask ``--repeats`` times, and reads VmHWM
after each call. Printed: first-call time (compiles included), the median of the rest, and the
peak RSS of the first call over the two models' bytes (target <= 1.3x: no model-sized
temporaries; judged without the runtime the process held besides the models: Python, JAX,
transformers), and with it; the bool masks themselves are 1 byte per entry, 0.125x of two float32 models and
0.25x of two bfloat16 ones. Also the peak after all calls (freed masks the allocator kept) and
the child's whole-life peak (``RUSAGE_CHILDREN``, model building included).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

PARTS = ("masks", "train", "count2g")
MODELS = ("smollm2", "1b")
TARGET_PEAK_RATIO = 1.3

_PARTS = flags.DEFINE_list("parts", list(PARTS), f"benchmark parts to run, of {PARTS}")
_MODELS = flags.DEFINE_list("models", list(MODELS), f"model configs, of {MODELS}")
_FRACTION = flags.DEFINE_float("fraction", 0.01, "core mask fraction p")
_REPEATS = flags.DEFINE_integer("repeats", 3, "core-mask calls per model (the first compiles)")
_DTYPE_1B = flags.DEFINE_enum("dtype_1b", "bfloat16", ["float32", "bfloat16"], "1B parameter dtype")
_CHILD = flags.DEFINE_string("child", "", "internal: PART:MODEL, measured in this process")


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                     platform.processor())
    return f"{model}, {os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


# ------------------------------------------------------------------------------ models


def model_config(name: str):
    from cpift_jax import models
    from cpift_jax.models import smollm2

    if name == "smollm2":
        if smollm2.is_available():
            return "SmolLM2-135M weights", None
        return "SmolLM2-135M config, random weights", models.ModelConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    return f"1B Llama config, random {_DTYPE_1B.value}", models.ModelConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, param_dtype=_DTYPE_1B.value)


def base_and_tuned(name: str):
    """(description, base, tuned) as host arrays; tuned = base + N(0, 1e-3) on every entry."""
    import jax
    import ml_dtypes

    from cpift_jax.models import functional, smollm2

    what, config = model_config(name)
    rng = np.random.default_rng(0)
    if config is None:
        _, base, _ = smollm2.load()
        base = jax.tree.map(np.asarray, base)
    else:  # N(0, 0.02) leaf by leaf in NumPy (an eager nnx init of 1B entries takes minutes)
        dtype = ml_dtypes.bfloat16 if config.param_dtype == "bfloat16" else np.float32
        base = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape, np.float32)).astype(dtype),
                            functional.abstract_params(config))

    def tune(x):
        noise = rng.standard_normal(x.shape, np.float32) * np.float32(1e-3)
        return (x.astype(np.float32) + noise).astype(x.dtype)

    return what, base, jax.tree.map(tune, base)


# ------------------------------------------------------------------------------ parts


def measure_masks(name: str) -> dict:
    """In the child: core-mask times and the peak RSS while masks are computed."""
    import jax

    from cpift_jax import masks

    what, base, tuned = base_and_tuned(name)
    leaves = jax.tree.leaves(base)
    model_bytes = 2 * sum(x.nbytes for x in leaves)
    baseline_kib = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS from here on
        f.write("5")
    times, peaks = [], []
    for _ in range(max(1, _REPEATS.value)):
        start = time.perf_counter()
        mask = jax.block_until_ready(masks.core_mask(base, tuned, _FRACTION.value))
        times.append(time.perf_counter() - start)
        peaks.append(_status_kib("VmHWM"))
        count = masks.density(mask)["count"]
        del mask
    entries = sum(x.size for x in leaves)
    return {"model": what, "entries": entries, "dtype": str(leaves[0].dtype),
            "model_bytes": model_bytes, "rss_before_kib": baseline_kib, "peak_kib": peaks[0],
            "peak_all_calls_kib": peaks[-1], "times_s": times, "core_count": count,
            "expected_count": masks.core_count(_FRACTION.value, entries)}


def run_child(part: str, name: str, extra_env: dict | None = None) -> dict:
    """``part`` for model ``name`` in a fresh process; its JSON result and whole-life peak."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    argv = [sys.executable, "-m", "experiments.bench_scale", f"--child={part}:{name}",
            f"--fraction={_FRACTION.value}", f"--repeats={_REPEATS.value}",
            f"--dtype_1b={_DTYPE_1B.value}"]
    env = {**os.environ, **(extra_env or {})}
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"bench_scale child {part}:{name} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["child_life_peak_kib"] = after if after > before else None  # max over children so far
    return result


def part_masks(names) -> None:
    print(f"\n## masks: core_mask(base, tuned, p={_FRACTION.value}), global scope, one device")
    print(f"{'model':38s} {'entries':>13s} {'first s':>8s} {'median s':>8s} {'peak GiB':>8s} "
          f"{'models GiB':>10s} {'peak/models':>11s} {'(-runtime)':>10s}")
    for name in names:
        r = run_child("masks", name)
        if r["core_count"] != r["expected_count"]:
            raise AssertionError(f"{name}: {r['core_count']} core entries, expected {r['expected_count']}")
        peak, models_b = r["peak_kib"] * 1024, r["model_bytes"]
        runtime = r["rss_before_kib"] * 1024 - models_b  # what the process held besides the models
        rest = r["times_s"][1:] or r["times_s"]
        # The target is on the work's own memory: the runtime held before the models is not it.
        ratio = (peak - runtime) / models_b
        verdict = "ok" if ratio <= TARGET_PEAK_RATIO else f"above {TARGET_PEAK_RATIO}x"
        print(f"{r['model']:38s} {r['entries']:13,d} {r['times_s'][0]:8.2f} "
              f"{statistics.median(rest):8.2f} {peak / 2**30:8.2f} {models_b / 2**30:10.2f} "
              f"{peak / models_b:10.2f}x {ratio:9.2f}x  {verdict}")
        life = r["child_life_peak_kib"]
        print(f"    dtype {r['dtype']}; RSS before the masks {r['rss_before_kib'] / 2**20:.2f} GiB "
              f"(runtime ~{runtime / 2**30:.2f} GiB); peak over all {len(r['times_s'])} calls "
              f"{r['peak_all_calls_kib'] / 2**20:.2f} GiB (freed masks the allocator kept); "
              f"child's whole-life peak {'n/a' if life is None else f'{life / 2**20:.2f} GiB'}; "
              f"times {[round(t, 2) for t in r['times_s']]}")


def measure_count2g() -> dict:
    """In the child (8 faked CPU devices): ``core_mask`` of one bfloat16 leaf of 2^31 + 2^24
    entries sharded over 8 devices, against an exact count of its bit patterns in int64."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from jax.sharding import NamedSharding, PartitionSpec

    from cpift_jax import masks, sharding

    entries = 2**31 + 2**24
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"axes": ("fsdp",), "shape": (8,)}))
    spread = NamedSharding(mesh, PartitionSpec("fsdp"))

    # Non-negative finite bfloat16 values (16-bit patterns below 0x4000: values in [0, 2)) from
    # a multiplicative hash of the index, one fused elementwise loop per shard: a random-bits
    # generator would hold 32-bit words and counters for every entry (17 GB here).
    def tuned_values():
        index = jax.lax.iota(jnp.uint32, entries)
        bits = ((index * jnp.uint32(2654435761)) >> 13).astype(jnp.uint16) & jnp.uint16(0x3FFF)
        return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)

    tuned = jax.jit(tuned_values, out_shardings=spread)()
    base = jax.jit(lambda: jnp.zeros((entries,), jnp.bfloat16), out_shardings=spread)()
    start = time.perf_counter()
    mask = jax.block_until_ready(masks.core_mask({"w": base}, {"w": tuned}, _FRACTION.value))["w"]
    seconds = time.perf_counter() - start
    k = masks.core_count(_FRACTION.value, entries)

    # Reference: the number of entries per 16-bit pattern (int64), so the k-th largest value
    # is exact; the mask must hold every entry above it and exactly k entries.
    histogram = np.zeros(2**16, np.int64)
    for shard in tuned.addressable_shards:
        histogram += np.bincount(np.asarray(shard.data).view(np.uint16), minlength=2**16)
    above = np.cumsum(histogram[::-1])[::-1]  # above[b] = entries with pattern >= b
    kth_bits = int(np.nonzero(above >= k)[0][-1])
    kth = float(np.array([kth_bits], np.uint16).view(jnp.bfloat16)[0])
    chosen, wrong = 0, 0
    for t_shard, m_shard in zip(tuned.addressable_shards, mask.addressable_shards):
        bits, selected = np.asarray(t_shard.data).view(np.uint16), np.asarray(m_shard.data)
        chosen += int(np.count_nonzero(selected))
        wrong += int(np.count_nonzero(selected & (bits < kth_bits)))
        wrong += int(np.count_nonzero(~selected & (bits > kth_bits)))
    return {"entries": entries, "devices": len(mesh.devices.flat), "seconds": seconds, "k": k,
            "chosen": chosen, "misplaced": wrong, "kth_value": kth,
            "mask_sharding": str(mask.sharding.spec), "peak_kib": _status_kib("VmHWM")}


def part_count2g() -> None:
    r = run_child("count2g", "bf16", extra_env={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    ok = r["chosen"] == r["k"] and r["misplaced"] == 0
    print(f"\n## count2g: core_mask on {r['entries']:,d} bfloat16 entries (> 2^31) sharded over "
          f"{r['devices']} faked CPU devices, p={_FRACTION.value}")
    print(f"core_mask {r['seconds']:.1f} s (compiles included); k = {r['k']:,d}, mask holds "
          f"{r['chosen']:,d}; entries on the wrong side of the exact k-th largest value "
          f"{r['kth_value']} (int64 count of the bit patterns): {r['misplaced']}; mask sharding "
          f"{r['mask_sharding']}; peak RSS {r['peak_kib'] / 2**20:.1f} GiB  "
          f"{'exact' if ok else 'WRONG'}")
    if not ok:
        raise AssertionError(f"count2g: {r}")


def part_train() -> None:
    """Train step on one device: lower+compile time and median step time for 2, 8, 32 scanned
    layers (toy width, remat "layer"), with the stack/unstack programs around the state; then
    tokens/s of the plain step (``StepConfig()``) against the scanned one."""
    import jax
    import jax.numpy as jnp

    from cpift_jax import models, optim, sharding
    from cpift_jax.training import step as step_lib

    mesh = sharding.make_mesh(sharding.default_mesh_config(), devices=jax.local_devices()[:1])
    opt = optim.default_config()
    opt.weight_decay = 0.01
    rows, seq, warmup, timed = 32, 16, 2, 7
    rng = np.random.default_rng(0)

    def toy(hidden, layers):
        return models.ModelConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64)

    def measure(config, options):
        step_lib.clear_cache()
        start = time.perf_counter()
        compiled = step_lib.train_step(config, opt, mesh, (rows, seq), options)
        layout = compiled.layout
        built = time.perf_counter() - start
        batch_abstract = {k: jax.ShapeDtypeStruct((rows, seq), d, sharding=compiled.batch_shardings[k])
                          for k, d in (("tokens", jnp.int32), ("loss_mask", jnp.bool_))}
        start = time.perf_counter()
        executable = compiled.step.lower(layout.abstract, batch_abstract).compile()
        compile_s = time.perf_counter() - start
        result = {"build_s": built, "compile_s": compile_s,
                  "leaves": len(jax.tree.leaves(layout.abstract))}
        params = jax.device_put(models.init_params(config, 0), layout.storage_shardings)
        if layout.enter is not None:
            storage = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                   params)
            start = time.perf_counter()
            enter = layout.enter.lower(storage, None).compile()
            result["stack_s"] = time.perf_counter() - start
            start = time.perf_counter()
            layout.leave.lower(layout.abstract.params).compile()
            result["unstack_s"] = time.perf_counter() - start
            params, _ = enter(params, None)
        else:
            params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
        state = step_lib.TrainState(params, layout.init(params, None, optim.schedule_numbers(opt)),
                                    step_lib.replicated_step(0, layout.shardings.step))
        batch = jax.device_put({"tokens": rng.integers(0, 256, (rows, seq)).astype(np.int32),
                                "loss_mask": np.ones((rows, seq), bool)}, compiled.batch_shardings)
        times = []
        for i in range(warmup + timed):
            start = time.perf_counter()
            state, metrics = executable(state, batch)
            jax.block_until_ready(metrics)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        result["step_s"] = statistics.median(times)
        return result

    scanned = step_lib.StepConfig(scan_layers=True, remat="layer")
    print(f"\n## train: train step, one device, toy width (hidden 64, vocab 256), batch {rows}x{seq}, "
          f"scan_layers=True, remat=layer; step time = median of {timed} after {warmup} warm-up")
    print(f"{'layers':>6s} {'state leaves':>12s} {'build s':>8s} {'compile s':>9s} {'stack s':>8s} "
          f"{'unstack s':>9s} {'step ms':>8s}")
    compile_s = {}
    for layers in (2, 8, 32):
        r = measure(toy(64, layers), scanned)
        compile_s[layers] = r["compile_s"]
        print(f"{layers:6d} {r['leaves']:12d} {r['build_s']:8.2f} {r['compile_s']:9.2f} "
              f"{r['stack_s']:8.2f} {r['unstack_s']:9.2f} {1e3 * r['step_s']:8.1f}")
    print(f"compile time 32 / 2 layers: {compile_s[32] / compile_s[2]:.2f}x")

    def reference_step_s(config):
        """The single-device step without a mesh: ``jit`` of value_and_grad of the masked
        cross-entropy of ``models.logits`` plus ``optim.make``'s update, params and optimizer
        state donated (no shardings, schedule compiled in, a Python loop over layers)."""
        from cpift_jax.training import loss as loss_lib
        import optax

        tx = optim.make(opt)

        def loss_fn(params, batch):
            logits = models.logits(config, params, batch["tokens"][:, :-1])
            return loss_lib.masked_cross_entropy(logits, batch["tokens"][:, 1:],
                                                 batch["loss_mask"][:, 1:])[0]

        def step(params, opt_state, batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        step = jax.jit(step, donate_argnums=(0, 1))
        params = jax.device_put(models.init_params(config, 0), jax.local_devices()[0])
        opt_state = tx.init(params)
        batch = {"tokens": rng.integers(0, 256, (rows, seq)).astype(np.int32),
                 "loss_mask": np.ones((rows, seq), bool)}
        times = []
        for i in range(warmup + timed):
            start = time.perf_counter()
            params, opt_state, loss = step(params, opt_state, batch)
            jax.block_until_ready(loss)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    print("\n## train: tokens/s on one device: the single-device reference step (jit of "
          "value_and_grad + optim.make, no mesh) vs train_step with StepConfig() and with "
          "scan_layers=True")
    print(f"{'model':>22s} {'reference':>10s} {'plain tok/s':>12s} {'plain/ref':>9s} "
          f"{'scan tok/s':>11s} {'scan/ref':>8s}")
    for hidden, layers in ((64, 2), (256, 4)):
        config = toy(hidden, layers)
        reference = rows * seq / reference_step_s(config)
        plain = rows * seq / measure(config, step_lib.StepConfig())["step_s"]
        scan = rows * seq / measure(config, step_lib.StepConfig(scan_layers=True))["step_s"]
        print(f"{f'hidden {hidden}, {layers} layers':>22s} {reference:10,.0f} {plain:12,.0f} "
              f"{plain / reference:8.2f}x {scan:11,.0f} {scan / reference:7.2f}x")


def main(argv):
    del argv
    if _CHILD.value:
        part, name = _CHILD.value.split(":")
        if part == "count2g":
            print(json.dumps(measure_count2g()))
            return
        assert part == "masks" and name in MODELS, _CHILD.value
        print(json.dumps(measure_masks(name)))
        return
    import jax

    unknown = sorted(set(_PARTS.value) - set(PARTS)) + sorted(set(_MODELS.value) - set(MODELS))
    if unknown:
        raise app.UsageError(f"unknown part or model {unknown}; parts {PARTS}, models {MODELS}")
    print(f"machine: {machine()}; jax {jax.__version__}; load average {os.getloadavg()}")
    if "masks" in _PARTS.value:
        part_masks(_MODELS.value)
    if "train" in _PARTS.value:
        part_train()
    if "count2g" in _PARTS.value:
        part_count2g()


if __name__ == "__main__":
    app.run(main)
