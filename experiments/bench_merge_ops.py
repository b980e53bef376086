"""Eager registry operators and ``core_mask`` vs plain NumPy and mergekit, on a Llama-shaped model.

    python -m experiments.bench_merge --setup_mergekit         # once: mergekit's virtualenv
    python -m experiments.bench_merge_ops --out=/tmp/ops.md    # 256M float32 params, ~14 GB RAM
    python -m experiments.bench_merge_ops --params=32e6 --mergekit=    # quick, NumPy only

Builds a base and two fine-tunes (base + small noise) with Llama leaf shapes from random arrays,
then times every operator of ``cpift_jax.merges.available()`` called eagerly (two models, base
where it takes one, default hyperparameters) and ``masks.core_mask(base, model, 0.01)``: median
of ``--repeats`` calls after a warm-up (which compiles). Operators with a ``donate`` argument are
also timed with ``donate=True`` on a fresh copy of the donated input (copy not timed). Ratios:
against the plain NumPy versions below (float32, leaf by leaf; core_mask = |delta| +
``np.partition`` + compare) and against mergekit's own kernels called per tensor on torch
tensors in mergekit's virtualenv (``MERGEKIT_SCRIPT``; inputs as .npy files). Targets (on the
default, non-donating call): SLERP >= 4x NumPy and >= 3x mergekit; TIES, DARE, task arithmetic
>= 2x mergekit; core_mask >= 3x NumPy. Prints a markdown table (and writes it to ``--out``).
"""

from __future__ import annotations

import inspect, json, os, platform, subprocess, sys, tempfile, time  # noqa: E401
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from cpift_jax import masks, merges
from experiments.bench_merge import MERGEKIT_VENV, llama_shape, setup_mergekit, tensor_specs

# --params, --repeats, --mergekit ('' skips mergekit) and --setup_mergekit are bench_merge's
# flags (importing it defines them); the defaults that differ are set here.
FLAGS = flags.FLAGS
FLAGS.set_default("params", 2.6e8)
_OUT = flags.DEFINE_string("out", "", "also write the markdown table here")

TARGETS = {"slerp": (4, 3), "ties": (None, 2), "dare": (None, 2), "task_arithmetic": (None, 2),
           "core_mask": (3, None)}  # (x NumPy, x mergekit)


def make_models(params: float, seed: int = 0):
    """(base, [model0, model1]) as {name: float32 array} with Llama leaf shapes."""
    rng = np.random.default_rng(seed)
    specs = tensor_specs(llama_shape(params), np.float32)
    base = {s.name: rng.standard_normal(s.shape, np.float32) * np.float32(0.02) for s in specs}
    step = np.float32(2e-3)
    return base, [{k: v + rng.standard_normal(v.shape, np.float32) * step for k, v in base.items()}
                  for _ in range(2)]


def timed(call, repeats: int, setup=lambda: None, warmup: bool = True) -> float:
    """Median seconds of ``call(setup())`` (results blocked on), after one untimed call."""
    times = []
    for i in range(repeats + warmup):
        args = setup()
        start = time.perf_counter()
        jax.block_until_ready(call(args))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


# ------------------------------------------------------------ plain NumPy versions (references)

def np_linear(base, models):
    return {k: sum(m[k] for m in models) * np.float32(1 / len(models)) for k in models[0]}


def np_task_arithmetic(base, models, scale=1.0):
    return {k: b + np.float32(scale) * sum(m[k] - b for m in models) for k, b in base.items()}


def np_slerp(base, models, t=0.5, eps=1e-8, dot_threshold=0.9995):
    out = {}
    for k, a in models[0].items():
        b = models[1][k]
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        cos = np.vdot(a, b) / ((na if na > eps else 1.0) * (nb if nb > eps else 1.0))
        theta = np.arccos(np.clip(cos, -1.0, 1.0))
        if abs(cos) > dot_threshold or np.sin(theta) <= 0:
            out[k] = np.float32(1 - t) * a + np.float32(t) * b
        else:
            ca, cb = np.sin((1 - t) * theta) / np.sin(theta), np.sin(t * theta) / np.sin(theta)
            out[k] = np.float32(ca) * a + np.float32(cb) * b
    return out


def top_count(fraction, n):
    return int(Fraction(repr(float(fraction))) * n)  # floor, the decimal as printed


def np_ties(base, models, density=0.2):
    out = {}
    for k, b in base.items():
        trimmed = []
        for m in models:
            d = m[k] - b
            n = d.size - top_count(density, d.size)
            cut = np.partition(np.abs(d).ravel(), n)[n]
            trimmed.append(np.where(np.abs(d) >= cut, d, np.float32(0)))
        sign = np.sign(sum(trimmed))
        agree = [(np.sign(d) == sign) & (d != 0) for d in trimmed]
        count = sum(a.astype(np.float32) for a in agree)
        total = sum(np.where(a, d, np.float32(0)) for a, d in zip(agree, trimmed))
        out[k] = b + total / np.maximum(count, np.float32(1))
    return out


def numpy_keep(i, j, shape, drop_rate):
    """DARE's keep mask as a NumPy user draws it."""
    return np.random.default_rng([i, j]).random(shape, np.float32) >= drop_rate


def np_dare(base, models, drop_rate=0.9, keep=numpy_keep):
    scale = np.float32(1 / (1 - drop_rate))
    return {k: b + sum(np.where(keep(i, j, b.shape, drop_rate), m[k] - b, np.float32(0)) * scale
                       for i, m in enumerate(models)) for j, (k, b) in enumerate(base.items())}


def np_core_mask(base, models, fraction=0.01):
    deltas = {k: np.abs(models[0][k] - b) for k, b in base.items()}
    flat = np.concatenate([d.ravel() for d in deltas.values()])
    n = flat.size - top_count(fraction, flat.size)
    cut = np.partition(flat, n)[n]
    return {k: d >= cut for k, d in deltas.items()}


NUMPY = {"linear": np_linear, "task_arithmetic": np_task_arithmetic, "slerp": np_slerp,
         "ties": np_ties, "dare": np_dare, "core_mask": np_core_mask}


def ours(name: str, base, models, donate: bool = False):
    """``call(fresh)``: the operator on ``models`` (``fresh`` replaces the donated input)."""
    if name == "core_mask":
        return lambda fresh: masks.core_mask(base, models[0], 0.01)
    module = merges.get_module(name)
    if name in ("slerp", "linear"):  # these donate models[0]
        return lambda fresh: module.merge([fresh or models[0], models[1]], donate=donate)
    kw = {"donate": donate} if "donate" in inspect.signature(module.merge).parameters else {}
    with_base = module.REQUIRES_BASE
    return lambda fresh: module.merge(models, base=(fresh or base) if with_base else None, **kw)


MERGEKIT_SCRIPT = r"""
import json, sys, time, numpy as np, torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorBatch, TensorGroup
from mergekit.merge_methods.linear import linear_merge
from mergekit.merge_methods.slerp import slerp
folder, names, repeats = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
load = lambda tag: [torch.from_numpy(np.load(f"{folder}/{tag}_{j}.npy")) for j in range(len(names))]
base, m0, m1 = load("base"), load("m0"), load("m1")
w = {1: 1.0, 2: 1.0}
gta = lambda method, **p: lambda b, x, y: registry.get(method).merge_group(
    TensorGroup.from_tensors([b, x, y], base_index=0),
    **{"int8_mask": False, "lambda": 1.0, "weight": w, **p})
kernels = {
    "linear": lambda b, x, y: linear_merge.implementation(
        TensorBatch((x[None], y[None])), weight=torch.tensor([[0.5, 0.5]]))[0],
    "slerp": lambda b, x, y: slerp(torch.tensor([0.5]), x[None], y[None])[0],
    "task_arithmetic": gta("task_arithmetic", normalize=False, rescale=False),
    "ties": gta("ties", normalize=True, rescale=False, density={1: 0.2, 2: 0.2}),
    "dare": gta("dare_linear", normalize=False, rescale=True, density={1: 0.1, 2: 0.1}),
    "breadcrumbs": gta("breadcrumbs", normalize=False, rescale=False, density={1: 0.1, 2: 0.1},
                       gamma={1: 0.01, 2: 0.01}),
}
out = {}
for name, kernel in kernels.items():
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            for b, x, y in zip(base, m0, m1):
                kernel(b, x, y)
        times.append(time.perf_counter() - start)
    out[name] = float(np.median(times))
print(json.dumps(out))
"""


def run_mergekit(base, models, repeats: int) -> dict:
    """Seconds per operator for mergekit's kernels, per tensor, in its own virtualenv."""
    python = os.path.join(MERGEKIT_VENV, "bin", "python")
    if not os.path.exists(python):
        raise app.UsageError(f"{python} missing: run python -m experiments.bench_merge_ops "
                             "--setup_mergekit")
    with tempfile.TemporaryDirectory() as folder:
        for tag, tree in (("base", base), ("m0", models[0]), ("m1", models[1])):
            for j, leaf in enumerate(tree.values()):
                np.save(f"{folder}/{tag}_{j}.npy", leaf)
        done = subprocess.run([python, "-c", MERGEKIT_SCRIPT, folder, json.dumps(list(base)),
                               str(repeats)], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(params: float, repeats: int, with_mergekit: bool) -> list[dict]:
    """One row per operator: seconds (ours, donated, NumPy, mergekit) and the ratios."""
    base_np, models_np = make_models(params)
    base, models = jax.tree.map(jnp.asarray, (base_np, models_np))
    kit = run_mergekit(base_np, models_np, repeats) if with_mergekit else {}
    rows = []
    for name in merges.available() + ["core_mask"]:
        row = {"operator": name, "ours": timed(ours(name, base, models), repeats)}
        module = merges.get_module(name) if name != "core_mask" else None
        if module is not None and "donate" in inspect.signature(module.merge).parameters:
            src = models[0] if name in ("slerp", "linear") else base
            row["donated"] = timed(ours(name, base, models, donate=True), repeats,
                                   setup=lambda: jax.block_until_ready(jax.tree.map(jnp.copy, src)))
        if name in NUMPY:
            row["numpy"] = timed(lambda _: NUMPY[name](base_np, models_np), repeats, warmup=False)
        if name in kit:
            row["mergekit"] = kit[name]
        rows.append(row)
    return rows


def verdicts(row: dict) -> list[tuple[str, bool | None]]:
    """(target, met) for each target of the row's operator; met is None when not measured."""
    out = []
    for goal, key in zip(TARGETS.get(row["operator"], (None, None)), ("numpy", "mergekit")):
        if goal:
            met = row[key] / row["ours"] >= goal if key in row else None
            out.append((f"{key} >= {goal}x", met))
    return out


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| operator | ours s | donated s | NumPy s | x NumPy | mergekit s | "
             "x mergekit | targets |", "|---" * 8 + "|"]
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    word = {True: "PASS", False: "FAIL", None: "not run"}
    for r in rows:
        x_np = r["numpy"] / r["ours"] if "numpy" in r else None
        x_kit = r["mergekit"] / r["ours"] if "mergekit" in r else None
        targets = "; ".join(f"{word[met]} {what}" for what, met in verdicts(r)) or "-"
        lines.append(f"| {r['operator']} | {fmt(r['ours'])} | {fmt(r.get('donated'))} | "
                     f"{fmt(r.get('numpy'))} | {fmt(x_np, '.2f')} | {fmt(r.get('mergekit'))} | "
                     f"{fmt(x_kit, '.2f')} | {targets} |")
    return "\n".join(lines)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores"


def main(argv):
    del argv
    if FLAGS.setup_mergekit:
        return setup_mergekit()
    rows = measure(FLAGS.params, FLAGS.repeats, bool(FLAGS.mergekit))
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    command = " ".join(["python -m experiments.bench_merge_ops", *sys.argv[1:]])
    header = f"`{command}`; commit {commit}; {machine()}; {FLAGS.params:.3g} params per model"
    text = table(rows, header)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
