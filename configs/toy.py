"""CPI-FT benchmark on the synthetic 5-task suite with a small character-level Llama.

Command (the main job):

    python -m experiments.cpift --config=configs/toy.py --workdir=workdir/toy

Runs, over seeds 0-4: the toy base model (pretrained once, cached under ``$CPIFT_CACHE``), the
single-task experts (probes), core masks, clusters, fusion and pipeline SFT (CPI-FT), the
baselines (full multi-task SFT at equal compute and at equal steps, multi-stage SFT with random
and heuristic groups, fusion only) and the forgetting pair (logic -> strings). Results go to
``<workdir>/results.json``, ``results.md`` and ``plots/``; measured tables and wall times are in
docs/results.md (about 11 minutes on a 2-core CPU).

Variants:
- ``configs/toy.py:smoke``: one seed, a 6k-parameter model, a few steps per stage (about a
  minute; the end-to-end tests use it).
- ``configs/toy.py:ablations``: the default plus the CPI-FT ablations, the stage-order
  ablations, the core-stability analysis and the merge-only block.
- ``configs/toy.py:sweep``: seeds 0-2, the forgetting pair and the merge-only block, half the
  budgets, for ``experiments/sweep.py`` (e.g. ``--knob=capacity --values=64,128``;
  docs/cpift_benchmark.md "Sweeps").

The setting: every prompt is the bare payload (``suite.similarity = 1``) with one weak tag
token naming the task, so the same digits ask for a different answer per task; 500 held-out
payloads per task. The model (128 wide, 2 layers) and the expert budget (300 steps x 32 rows,
cosine-decayed rate) are chosen so that every single-task expert learns its task (>= 80% on
every seed) while full multi-task SFT at equal compute does not learn all five (the seesaw);
docs/results.md, "How the default was chosen", lists the runs. Prompts with domain text
(``suite.similarity < 1`` or ``suite.tag=strong``) need ``--config.data.seq_len=72``.
"""

import ml_collections

from cpift_jax import optim, sharding
from cpift_jax.training import pretrain
from cpift_jax.data import suite


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seeds = (0, 1, 2, 3, 4)  # paired intervals over seeds need several (docs/cpift_benchmark.md)
    c.methods = ("single_task", "multitask_sft", "multitask_sft_equal_steps",
                 "multistage_random", "multistage_heuristic", "fused_only", "cpift")
    # Devices (cpift_jax.sharding): axes and sizes, -1 takes the remaining devices. The default
    # (-1, 1, 1) spreads each batch's rows over every visible device (one on a plain CPU host);
    # --config.mesh.shape='(-1,2,1)' also splits the weights in two.
    c.mesh = sharding.default_mesh_config()
    c.progress = True  # tqdm bars on a terminal only (not part of the pinned config)
    c.compile_cache = True  # XLA persistent cache in $CPIFT_CACHE/xla (cpift_jax.cache)

    c.suite = suite.default_config()
    c.suite.tag = "weak"  # one tag token names the task
    c.suite.similarity = 1.0  # every prompt bare: same digits, a different answer per task
    c.suite.min_digits, c.suite.max_digits = 2, 4

    c.data = ml_collections.ConfigDict()
    c.data.n_train = 2000  # train examples per task per seed (sampled with repeats)
    c.data.n_test = 500  # held-out examples per task (distinct payloads; SE of 50% = 2.2 points)
    c.data.seq_len = 16  # BOS tag digits SEP answer EOS; a longer example raises, naming it
    c.data.eval_batch_size = 128

    c.model = ml_collections.ConfigDict()
    c.model.backend = "toy"  # "toy" (pretrained here) | "smollm2" (configs/smollm2.py)
    c.model.hidden_size, c.model.intermediate_size = 128, 256
    c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 2, 4, 2

    c.base = ml_collections.ConfigDict()
    # The pretrained base is cached in $CPIFT_CACHE/toy_base/<hash of its settings and corpus>.
    c.base.pretrain = pretrain.default_config()
    c.base.pretrain.steps = 300
    c.base.pretrain.batch_size = 16
    c.base.pretrain.seq_len = 64

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32
    c.train.steps_per_task = 300  # S: one expert's budget; the other budgets derive from it
    c.train.optimizer = optim.default_config()
    c.train.optimizer.learning_rate = 3e-3  # peak, at the reference width below
    c.train.optimizer.warmup_steps = 20
    # Cosine decay to 0 after warm-up: with a constant rate the arith experts stall or land
    # anywhere between 26% and 66% across seeds; annealed, every expert reaches >= 80%
    # (docs/results.md, "How the default was chosen"). "constant" compiles the same step.
    c.train.optimizer.schedule = "cosine"
    # The rate above is tuned at this width; other widths (the capacity knob) scale it by
    # lr_reference_width / hidden_size (config_checks.learning_rate); 0 turns the rule off.
    c.train.lr_reference_width = 128
    # How the compiled step computes (cpift_jax.training.step.StepConfig, docs/models.md):
    # gradient accumulation, remat, scanned layers, bfloat16 compute, vocabulary-chunked loss.
    c.train.step = ml_collections.ConfigDict(dict(
        micro_batches=1, remat="none", scan_layers=False, compute_dtype="float32",
        vocab_chunk=0))
    # Mid-stage train-state checkpoints every that many steps (0: off); an interrupted stage
    # then resumes each training run from its last checkpoint (docs/multihost.md).
    c.train.checkpoint_every = 0

    # CPI-FT; every gap of the paper is an option with a default.
    c.cpift = ml_collections.ConfigDict()
    c.cpift.p = 0.01  # core fraction (paper: 1%)
    c.cpift.tau = 0.1  # overlap threshold linking two tasks (paper: 0.1)
    c.cpift.scope = "global"  # rank |delta| over the whole model (paper) or "leaf"
    c.cpift.core_exclude = ()  # leaf-path regexes never in a core, e.g. ("embed", "lm_head")
    c.cpift.stage_order = "random"  # paper; or given | largest_first | overlap_desc
    c.cpift.overlap = "max_delta"  # an entry in several cores: largest |delta| | mean | first
    # Non-core merge: "slerp" = sequential fold with t_i = 1/i (equal shares); or any registry
    # operator, e.g. "multislerp" (one-step), "karcher", "linear" (plain averaging).
    c.cpift.merge = "slerp"
    c.cpift.granularity = "leaf"  # SLERP angle per leaf or per "row"
    c.cpift.backbone = "base"  # "base" | "multitask_sft" | path to an Orbax checkpoint
    c.cpift.freeze = True  # freeze earlier groups' cores during pipeline SFT
    c.cpift.freeze_current = False  # also freeze the current group's own core
    c.cpift.replay = 0.2  # share of each later-stage batch drawn from earlier groups' tasks
    c.cpift.steps_per_task = 150  # pipeline SFT: stage g trains |g| * this many steps

    c.multistage = ml_collections.ConfigDict()
    c.multistage.k = 3  # random groups (paper: K = 3)
    c.multistage.replay = c.cpift.get_ref("replay")  # same rule as CPI-FT's stages

    c.forgetting = ml_collections.ConfigDict()
    c.forgetting.enabled = True
    c.forgetting.pair = ("logic", "strings")  # A -> B: tasks whose experts beat chance clearly
    c.forgetting.steps = 150  # steps per leg (A, then B); the A leg of full SFT is E_A itself

    c.ablations = ml_collections.ConfigDict()
    c.ablations.enabled = False
    c.ablations.p_values = (0.005, 0.05)  # the p sweep (1% is the main CPI-FT row)
    # Stage orders against the main row's random order (clustering.STAGE_ORDERS): guided by the
    # probes' backward transfer (most fragile last) and structure (clearest first).
    c.ablations.stage_orders = ("backward_transfer", "structured_first")

    # Is the core structural? Half-budget probes per task (S/2 more steps per task and seed) and
    # the Jaccard of each task's core across seeds and lengths against chance
    # (cpift_jax.benchmark.core_stability; results/core_stability.md).
    c.analysis = ml_collections.ConfigDict(dict(core_stability=False))

    c.merge_only = ml_collections.ConfigDict()
    c.merge_only.enabled = False
    c.merge_only.operators = ()  # () = every operator in cpift_jax.merges.available()

    if arg in (None, ""):
        pass
    elif arg == "smoke":
        c.seeds = (0,)
        c.data.n_train, c.data.n_test, c.data.eval_batch_size = 64, 8, 64
        c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 16, 32, 1
        c.model.num_heads, c.model.num_kv_heads = 2, 1
        c.base.pretrain.steps, c.base.pretrain.optimizer.warmup_steps = 20, 5
        c.train.batch_size = 8
        c.train.steps_per_task = 6
        c.train.optimizer.warmup_steps = 2
        c.cpift.steps_per_task = 4
        c.cpift.p = 0.05
        c.forgetting.steps = 4
    elif arg == "sweep":  # experiments/sweep.py: every cell of the regime map
        c.seeds = (0, 1, 2)  # the regime map's intervals need seeds (issue: at least 3)
        c.forgetting.enabled = True
        c.merge_only.enabled = True  # every registry operator: the best one is compared
        c.train.steps_per_task, c.cpift.steps_per_task, c.forgetting.steps = 150, 75, 75
    elif arg == "ablations":
        c.ablations.enabled = True
        c.analysis.core_stability = True
        c.merge_only.enabled = True
    else:
        raise ValueError(f"unknown variant {arg!r} of configs/toy.py; known: smoke, sweep, ablations")
    return c
