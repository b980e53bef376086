"""A memory plan without the hardware: compile a config's programs for its slice on faked CPU
devices and print the compiler's per-device bytes next to the device's memory.

    python -m experiments.plan --config=configs/paper/llama2_7b.py:v4-32
    python -m experiments.plan --config=configs/paper/mistral_7b.py:8gpu --parts=step

Fakes ``config.hardware.num_devices`` CPU devices (``XLA_FLAGS``, before JAX starts its
backend), builds ``config.mesh`` on them and plans the ``--parts`` with
``cpift_jax.memory_plan`` (what each part compiles and how its peak is counted is there).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from cpift_jax.memory_plan import (DEVICE_MEMORY_GIB, GIB, format_plan, plan_fusion, plan_masks,
                                   plan_step)

PARTS = ("step", "masks", "fusion")

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/paper/*.py:<variant> file",
                                          lock_config=True)
_PARTS = flags.DEFINE_list("parts", list(PARTS), f"programs to plan, of {PARTS}")
_DEVICE = flags.DEFINE_string("device_kind", None, "override config.hardware.device_kind, one "
                              f"of {sorted(DEVICE_MEMORY_GIB)}")
_HEADROOM = flags.DEFINE_float("headroom", 0.9, "fits if the peak is at most this share of HBM")


def main(argv):
    del argv
    c = _CONFIG.value
    kind = _DEVICE.value or c.hardware.device_kind
    if kind not in DEVICE_MEMORY_GIB:
        raise app.UsageError(f"device kind {kind!r}; known: {sorted(DEVICE_MEMORY_GIB)}")
    if unknown := sorted(set(_PARTS.value) - set(PARTS)):
        raise app.UsageError(f"unknown parts {unknown}; known: {PARTS}")
    n = int(c.hardware.num_devices)
    # Before JAX starts its backend (the config's imports do not start it).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={n}")
    import jax

    jax.config.update("jax_platforms", "cpu")
    if jax.device_count() != n:
        sys.exit(f"plan: wanted {n} faked CPU devices, JAX has {jax.device_count()} "
                 "(its backend started before XLA_FLAGS was set)")
    from configs import paper
    from cpift_jax import sharding
    from cpift_jax.training.step import StepConfig

    model = paper.model_config(c)
    mesh = sharding.make_mesh(c.mesh)
    batch = (int(c.train.batch_size), int(c.data.seq_len))
    step_config = StepConfig.from_config(c.train.step)
    device_bytes = DEVICE_MEMORY_GIB[kind] * GIB
    print(f"{c.model.hf_name} ({model.model_type}), variant {c.hardware.variant}: {n} x {kind} "
          f"({DEVICE_MEMORY_GIB[kind]} GiB), mesh {dict(mesh.shape)}, batch {batch[0]} x "
          f"{c.data.seq_len} tokens, {step_config}")
    if "step" in _PARTS.value:
        planned = plan_step(model, c.train.optimizer, mesh, batch, step_config,
                            packed=bool(c.data.get("pack", False)))
        print(format_plan(planned, device_bytes, _HEADROOM.value), flush=True)
    if "masks" in _PARTS.value:
        print(format_plan(plan_masks(model, mesh), device_bytes, _HEADROOM.value), flush=True)
    if "fusion" in _PARTS.value:
        print(format_plan(plan_fusion(model, mesh, len(c.data.tasks), c.cpift.merge,
                                      c.cpift.overlap), device_bytes, _HEADROOM.value),
              flush=True)


if __name__ == "__main__":
    app.run(main)
