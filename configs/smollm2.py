"""The CPI-FT benchmark on SmolLM2-135M-Instruct: the same pipeline, a few steps of every stage.

Command (needs the converted model: ``python -m cpift_jax.models.smollm2 --fetch`` once):

    python -m experiments.cpift --config=configs/smollm2.py --workdir=/tmp/smollm2_smoke

Runs every stage of ``configs/toy.py`` (base, probes/experts, cores, overlap and clusters,
fusion, pipeline SFT, the baselines and the forgetting pair) with one seed and 2 optimizer steps
per expert: a check that the pipeline works on a real 135M-parameter checkpoint with a BPE
tokenizer (``HFTokenizer``: tags are spelled, e.g. ``<arith>``). The scores of so short a run
mean nothing. Expected cost on a 2-core CPU: about 2.5 minutes (the train step is compiled once,
its 30 layers scanned), 2.7 GB of Orbax checkpoints in the workdir, about 10 GB peak memory (the
models of a seed stay in memory between stages). Results go to ``<workdir>/results.md``.
"""

import ml_collections

from configs import toy


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, ""):
        raise ValueError(f"configs/smollm2.py has no variant {arg!r}")
    c = toy.get_config()
    c.model.backend = "smollm2"  # cpift_jax.models.smollm2.load(); the toy sizes are ignored
    c.seeds = (0,)
    c.suite.tasks = ("arith", "program", "logic")  # K = 3 needs at least 3 tasks
    c.forgetting.pair = ("arith", "program")
    c.data.n_train, c.data.n_test, c.data.eval_batch_size = 16, 4, 12
    c.data.seq_len = 48  # BPE tokens of "<tag>digits" + "\n" + answer + EOS
    c.train.batch_size = 4
    c.train.steps_per_task = 2
    c.train.optimizer.learning_rate = 1e-5
    c.train.lr_reference_width = 0  # a pretrained checkpoint: the rate above as it is
    c.train.optimizer.warmup_steps = 0
    c.cpift.steps_per_task = 1
    c.forgetting.steps = 1
    # 30 layers: the scanned step compiles one layer, whatever the depth (docs/models.md).
    c.train.step.scan_layers = True
    return c
