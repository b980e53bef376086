"""The paper's setting (arXiv 2508.21741) on a 7B base model: shared by ``configs/paper/*.py``.

One file per base model of the paper: ``llama2_7b.py`` (meta-llama/Llama-2-7b-hf),
``mistral_7b.py`` (mistralai/Mistral-7B-v0.1), ``qwen15_7b.py`` (Qwen/Qwen1.5-7B) and
``gemma2_9b.py`` (google/gemma-2-9b; the paper's "Gemma" without size or version). All share the
variants below; none needs per-model overrides (docs/paper_configs.md has the plans).

Each model file gives its Hugging Face architecture (``ModelConfig`` fields written out from the
public ``config.json``) and calls ``paper_config(architecture, hf_name, arg)``. The result keeps
``configs/toy.py``'s keys (seeds, methods, mesh, data, model, train, cpift, multistage,
forgetting, ablations, merge_only) so the pipeline reads it the same way, with:

- ``model.backend = "hf"``, ``model.hf_path``: a local HF checkpoint directory (config.json and
  safetensors; fetched by the user), ``model.architecture``: the ``ModelConfig`` fields
  (``model_config(c)`` builds it; ``experiments/plan.py`` needs nothing else);
- ``data.tasks``: the five SFT tasks (``real_tasks.task_config``: a reader of
  ``cpift_jax.data.readers``, a path placeholder ``$CPIFT_DATA/<task>.jsonl``, the metric; the
  code task is tested on HumanEval, CodeAlpaca having no tests), the balanced per-task sample
  size, packed rows; ``eval``: ``real_tasks.eval_config()`` (code execution off);
- ``train``: full fine-tuning with AdamW (``optim.default_config()``: peak lr 2e-5, 3% warm-up,
  cosine to 0, no weight decay, clip 1.0), bfloat16 compute on float32 master weights, scanned
  and rematerialised layers, vocabulary-chunked loss;
- ``cpift``: p = 1%, tau = 0.1 (the paper's values), the gaps' defaults of ``configs/toy.py``;
  ``multistage.k = 3``;
- ``hardware``: the device kind whose memory ``experiments/plan.py`` compares against, and the
  number of devices it fakes on a CPU.

Variants (``:v4-32``, ``:v5e-64``, ``:8gpu``) set mesh, device count, batch, micro-batches and
remat for one slice each (``VARIANTS``); no variant means ``:8gpu``.

What the paper does not say, and the default chosen here (docs/paper_configs.md):
optimizer and schedule (the Alpaca SFT recipe: AdamW, lr 2e-5, cosine, 3% warm-up, batch 128
sequences); epochs or steps per stage (1000 steps per probe, 500 per task in pipeline SFT);
sequence length (2048 tokens, packed); per-task sample size (2000 examples per task); the
datasets' splits (a hash of each record's id, ``readers.is_test``); everything listed under
``cpift`` (overlap rule, SLERP fold and granularity, backbone, replay); which Gemma (Gemma-2-9B
base, the same recipe, soft-caps kept in training).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from cpift_jax import optim, sharding
from cpift_jax.benchmark import real_tasks
from cpift_jax.models.config import ModelConfig

# The paper's five SFT tasks: (name, reader of cpift_jax.data.readers, what the paper used).
PAPER_TASKS = (
    # (name, reader of cpift_jax.data.readers, what the paper used, metric, held-out source)
    ("math", "gsm8k", "GSM8K", "math", ""),
    ("code", "alpaca", "CodeAlpaca-20k", "code", "humaneval"),  # CodeAlpaca has no tests
    ("logic", "multiple_choice", "LogiQA", "multiple_choice", ""),
    ("instruction", "alpaca", "Alpaca", "heldout", ""),
    ("chat", "ultrachat", "UltraChat", "heldout", ""),
)

# name -> (device kind, devices, mesh.shape over (data, fsdp, tensor), global batch rows,
# micro-batches, remat). HBM per device kind: experiments/plan.py (DEVICE_MEMORY_GIB).
# TPU v4-32 is 16 chips (the suffix counts TensorCores; JAX sees one device per chip), v5e-64 is
# 64 chips. Weights, Adam moments and masks are split over fsdp; rows over data x fsdp.
VARIANTS = {
    "v4-32": ("tpu-v4", 16, (1, 16, 1), 128, 4, "layer"),
    "v5e-64": ("tpu-v5e", 64, (1, 64, 1), 128, 2, "layer"),
    "8gpu": ("h100", 8, (1, 8, 1), 128, 8, "layer"),
}
DEFAULT_VARIANT = "8gpu"


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
    """The ``ModelConfig`` of a paper config's ``model.architecture``."""
    return ModelConfig(**dict(c.model.architecture))


def paper_config(architecture: ModelConfig, hf_name: str, arg: str | None,
                 config_file: str) -> ml_collections.ConfigDict:
    """The config of ``config_file`` (for error messages) for ``architecture`` and variant
    ``arg`` (module docstring)."""
    arg = arg or DEFAULT_VARIANT
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of {config_file}; known: {sorted(VARIANTS)}")
    kind, devices, mesh_shape, rows, micro, remat = VARIANTS[arg]

    c = ml_collections.ConfigDict()
    c.seeds = (0,)  # a 7B run per seed is costly; add seeds with --config.seeds='(0,1,2)'
    c.methods = ("single_task", "multitask_sft", "multistage_random", "multistage_heuristic",
                 "fused_only", "cpift")
    c.mesh = sharding.default_mesh_config()
    c.mesh.shape = mesh_shape
    c.progress = True
    c.compile_cache = True

    c.hardware = ml_collections.ConfigDict()
    c.hardware.variant = arg
    c.hardware.device_kind = kind  # experiments/plan.py: the HBM it compares against
    c.hardware.num_devices = devices  # devices the slice has (faked on CPU by plan.py)

    c.data = ml_collections.ConfigDict()
    c.data.seq_len = 2048  # tokens per packed row (the paper does not say)
    c.data.n_train = 2000  # balanced sample per task (the paper: "a small balanced sample")
    c.data.n_test = 200
    c.data.test_fraction = 0.1  # readers.is_test: by a hash of each record's id
    c.data.pack = True  # several conversations per row, attention and loss kept per document
    c.data.tasks = ml_collections.ConfigDict()
    for name, reader, original, metric, test_source in PAPER_TASKS:
        # $CPIFT_DATA/<task>.jsonl: the user's local copy of `original` (never fetched here).
        c.data.tasks[name] = real_tasks.task_config(
            f"$CPIFT_DATA/{name}.jsonl", metric, reader=reader, layout="plain",
            test_source=test_source, original=original)
    c.eval = real_tasks.eval_config()

    c.model = ml_collections.ConfigDict()
    c.model.backend = "hf"  # cpift_jax.models.hf.load(model.hf_path)
    c.model.hf_name = hf_name  # where the user downloads it from; never fetched here
    c.model.hf_path = ""  # local HF checkpoint directory (config.json + *.safetensors)
    c.model.architecture = ml_collections.ConfigDict(dataclasses.asdict(architecture))

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = rows  # global rows per optimizer step
    c.train.steps_per_task = 1000  # S: one probe's budget (128 x 2048 tokens per step)
    c.train.optimizer = optim.default_config()  # AdamW 2e-5, cosine, 3% warm-up, clip 1.0
    c.train.optimizer.warmup_steps = 30
    c.train.step = ml_collections.ConfigDict(dict(
        micro_batches=micro, remat=remat, scan_layers=True, compute_dtype="bfloat16",
        vocab_chunk=8192))
    c.train.checkpoint_every = 200

    c.cpift = ml_collections.ConfigDict()
    c.cpift.p = 0.01  # paper
    c.cpift.tau = 0.1  # paper
    c.cpift.scope = "global"
    c.cpift.core_exclude = ()
    c.cpift.stage_order = "random"  # paper
    c.cpift.overlap = "max_delta"
    c.cpift.merge = "slerp"  # paper
    c.cpift.granularity = "leaf"
    c.cpift.backbone = "base"
    c.cpift.freeze = True
    c.cpift.freeze_current = False
    c.cpift.replay = 0.2
    c.cpift.steps_per_task = 500

    c.multistage = ml_collections.ConfigDict()
    c.multistage.k = 3  # paper
    c.multistage.replay = c.cpift.get_ref("replay")

    c.forgetting = ml_collections.ConfigDict()
    c.forgetting.enabled = True
    c.forgetting.pair = ("math", "code")
    c.forgetting.steps = 500

    c.ablations = ml_collections.ConfigDict()
    c.ablations.enabled = False
    c.ablations.p_values = (0.005, 0.05)
    c.merge_only = ml_collections.ConfigDict()
    c.merge_only.enabled = False
    c.merge_only.operators = ()
    return c
