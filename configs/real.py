"""The CPI-FT benchmark on real tasks: SmolLM2-135M-Instruct, four SFT domains, real metrics.

Commands (once per machine: ``python -m cpift_jax.models.smollm2 --fetch`` and
``python -m cpift_jax.data.fetch``):

    python -m experiments.cpift --config=configs/real.py --workdir=workdir/real          # one GPU
    python -m experiments.cpift --config=configs/real.py:smoke --workdir=/tmp/real_smoke  # CPU

Runs the stages of ``configs/toy.py`` (experts = probes, core masks, clusters, fusion, pipeline
SFT, the baselines and the forgetting pair) with full fine-tuning of SmolLM2-135M-Instruct on the
paper's domains, each from data that installs offline (docs/datasets.md says what stands in for
which paper dataset and why):

    math   GSM8K, split by id: 80% train, 20% test    exact match of the final number
    code   MBPP (train) -> HumanEval (test)           held-out bits per byte; pass@1 with
                                                      --config.eval.allow_code_execution=True
    logic  ARC-Challenge, split by id                 option log-likelihood accuracy (per char)
    chat   CoQA multi-turn dialogue, split by id      held-out bits per byte

Conversations are rendered with the model's chat template, the loss on every assistant turn only,
and packed into 512-token rows with document boundaries. Normalised scores use the base model as
the floor (``cpift_jax.benchmark.tasks``). Results go to ``<workdir>/results.md``.

Expected cost: the default (2 seeds, 300 steps x 16 packed rows per expert) runs 12,600
optimizer steps of 16 x 512 tokens in all (``python -m experiments.step_time
--config=configs/real.py`` counts them and times the step on the machine at hand): about 74 s per
step on a 2-core CPU, about 1-2 hours of training on one A100-class GPU (an estimate from the
step's FLOPs, docs/results.md "Real tasks"). ``:smoke`` (one seed, one step per stage, two test examples per task) runs
end to end on a 2-core CPU in about 4 minutes; its scores mean nothing.
"""

import ml_collections

from configs import toy
from cpift_jax.benchmark import real_tasks


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = toy.get_config()
    del c.suite, c.base  # the synthetic suite and the toy model's pretraining
    c.seeds = (0, 1)
    c.model = ml_collections.ConfigDict(dict(backend="smollm2"))

    c.data = ml_collections.ConfigDict()
    c.data.seq_len = 512  # tokens per packed row (SmolLM2 template: ~30 tokens of system prompt)
    c.data.pack = True  # several conversations per row, attention and loss kept per document
    c.data.n_train = 1000  # conversations sampled per task and seed (balanced, as the paper)
    c.data.n_test = 200  # held-out records per task (all of them where fewer exist)
    c.data.test_fraction = 0.2  # share of a source's ids held out when it has no test_source
    c.data.tasks = ml_collections.ConfigDict()
    c.data.tasks.math = real_tasks.task_config("gsm8k", "math", max_new_tokens=256)
    c.data.tasks.code = real_tasks.task_config("mbpp", "code", test_source="humaneval",
                                               max_new_tokens=384)
    c.data.tasks.logic = real_tasks.task_config("arc_challenge", "multiple_choice")
    c.data.tasks.chat = real_tasks.task_config("coqa", "heldout")
    c.eval = real_tasks.eval_config()

    c.train.batch_size = 16
    c.train.steps_per_task = 300
    c.train.optimizer.learning_rate = 2e-5
    c.train.lr_reference_width = 0  # a pretrained checkpoint: the rate above as it is
    c.train.optimizer.warmup_steps = 10
    c.train.optimizer.schedule = "cosine"
    c.train.step.scan_layers = True  # 30 layers compile as one
    c.train.step.remat = "layer"  # keep one layer's activations, not 30 (16 x 512 tokens)
    c.train.step.vocab_chunk = 8192  # no [tokens, 49152] float32 logits in one piece
    c.cpift.steps_per_task = 150
    c.forgetting.pair = ("math", "code")
    c.forgetting.steps = 150

    if arg in (None, ""):
        pass
    elif arg == "smoke":
        c.seeds = (0,)
        c.data.seq_len = 256
        c.data.n_train, c.data.n_test = 8, 2
        for name in c.data.tasks:
            c.data.tasks[name].max_new_tokens = 16
        c.eval.batch_size = 2
        c.train.batch_size = 2
        c.train.steps_per_task = 1
        c.train.optimizer.warmup_steps = 0
        c.cpift.steps_per_task = 1
        c.forgetting.steps = 1
    else:
        raise ValueError(f"unknown variant {arg!r} of configs/real.py; known: smoke")
    return c
