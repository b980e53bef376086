"""Training-step throughput: our JAX model vs the transformers torch model, same config/batch.

One step = forward + backward + AdamW update, float32, next-token cross-entropy over the whole
sequence (both sides compute logits on all ``seq`` positions and the loss on ``seq - 1``). Both
frameworks live in this process with the same thread count: XLA's CPU thread pool has one
thread per core and ``torch.set_num_threads`` gets ``--threads``, default the core count. As the
CPU may be shared, the two are timed in interleaved rounds (alternating which goes first) and the
median step time of each is reported, warm-up excluded; the load average is printed alongside.
Prints tokens/s of each, the ratio ours/torch against the 0.8x target and our compile time.

    python -m experiments.bench_model                       # both configs (~20 min, 2 busy cores)
    python -m experiments.bench_model --models=10m --rounds=3 --batch=2 --seq=64   # quick
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from cpift_jax import models

CONFIGS = {
    # ~10.5M parameters, untied.
    "10m": models.ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=768,
                              num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
    # SmolLM2-135M's architecture (random weights: throughput does not depend on values).
    "smollm2": models.ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                  num_hidden_layers=30, num_attention_heads=9,
                                  num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                                  max_position_embeddings=8192, tie_word_embeddings=True),
}
DEFAULT_SHAPES = {"10m": (8, 256), "smollm2": (2, 256)}  # (batch, seq)
TARGET_RATIO = 0.8  # ours/torch tokens/s

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["10m", "smollm2"], f"configs to run, from {list(CONFIGS)}")
flags.DEFINE_integer("batch", None, "batch size (default per config)")
flags.DEFINE_integer("seq", None, "sequence length (default per config)")
flags.DEFINE_integer("rounds", 5, "timed rounds; each times --steps_per_round steps of each side")
flags.DEFINE_integer("steps_per_round", 1, "steps per framework per round")
flags.DEFINE_integer("warmup", 2, "untimed steps of each side before the rounds")
flags.DEFINE_integer("threads", None, "torch.set_num_threads (default os.cpu_count(), the size "
                     "of XLA's CPU pool)")
flags.DEFINE_float("lr", 1e-4, "AdamW learning rate (both sides)")


def next_token_loss(config, params, tokens):
    logits = models.logits(config, params, tokens)[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def jax_stepper(config, tokens, lr):
    """-> (step() returning the loss, compile seconds). Params/opt state donated each step."""
    optimizer = optax.adamw(lr, weight_decay=0.0)
    state = {"params": models.init_params(config, 0)}
    state["opt"] = optimizer.init(state["params"])
    tokens = jnp.asarray(tokens)

    def train_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(next_token_loss, argnums=1)(config, params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(
        state["params"], state["opt"], tokens).compile()
    compile_s = time.perf_counter() - start

    def step():
        state["params"], state["opt"], loss = compiled(state["params"], state["opt"], tokens)
        return float(loss)  # blocks until the step is done

    return step, compile_s


def torch_stepper(config, tokens, lr, threads):
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    tokens = torch.as_tensor(tokens)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss  # shifts labels internally
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def timed(step, n):
    start = time.perf_counter()
    for _ in range(n):
        loss = step()
    return (time.perf_counter() - start) / n, loss


def bench(name, batch, seq, threads):
    config = CONFIGS[name]
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (batch, seq))
    sides = {"torch": torch_stepper(config, tokens, FLAGS.lr, threads)}
    sides["ours"], compile_s = jax_stepper(config, tokens, FLAGS.lr)
    for step in sides.values():
        for _ in range(FLAGS.warmup):
            step()
    times, losses = {"torch": [], "ours": []}, {}
    for r in range(FLAGS.rounds):
        order = ["torch", "ours"] if r % 2 == 0 else ["ours", "torch"]
        for side in order:
            seconds, losses[side] = timed(sides[side], FLAGS.steps_per_round)
            times[side].append(seconds)
    n_params = sum(x.size for x in jax.tree.leaves(models.abstract_params(config)))
    # Same init scale, task and step count: both losses start near log(vocab) and move alike.
    print(f"{name}: {n_params / 1e6:.1f}M params, batch {batch} x seq {seq}; final loss "
          f"torch {losses['torch']:.3f} ours {losses['ours']:.3f}; step seconds per round "
          f"torch {[round(t, 2) for t in times['torch']]} "
          f"ours {[round(t, 2) for t in times['ours']]}; load average {os.getloadavg()[0]:.1f}")
    tps = {side: batch * seq / statistics.median(t) for side, t in times.items()}
    return tps["torch"], tps["ours"], compile_s


def main(argv):
    del argv
    threads = FLAGS.threads or os.cpu_count()
    print(f"jax {jax.__version__} devices {jax.devices()}; os.cpu_count() {os.cpu_count()}; "
          f"torch threads {threads}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"load average {os.getloadavg()[0]:.1f}")
    rows = []
    for name in FLAGS.models:
        batch, seq = DEFAULT_SHAPES[name]
        batch, seq = FLAGS.batch or batch, FLAGS.seq or seq
        rows.append((name, batch, seq, *bench(name, batch, seq, threads)))
    print(f"\nmedian of {FLAGS.rounds} interleaved rounds, target ours/torch >= {TARGET_RATIO}")
    print("| config | batch x seq | torch tokens/s | ours tokens/s | ours/torch | target met "
          "| our compile s |")
    print("|---|---|---|---|---|---|---|")
    for name, batch, seq, torch_tps, jax_tps, compile_s in rows:
        ratio = jax_tps / torch_tps
        print(f"| {name} | {batch} x {seq} | {torch_tps:.0f} | {jax_tps:.0f} | {ratio:.2f}x "
              f"| {'yes' if ratio >= TARGET_RATIO else 'NO'} | {compile_s:.1f} |")


if __name__ == "__main__":
    app.run(main)
