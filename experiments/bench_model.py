"""Training-step throughput: our JAX model vs the transformers torch model, same config/batch.

One step = forward + backward + AdamW update, float32, next-token cross-entropy over the whole
sequence. Both sides run in this process, one after the other (torch with
``torch.set_num_threads(--threads)``, XLA with its default CPU thread pool), warm-up excluded.
Prints tokens/s of each, the ratio ours/torch and our compile time.

    python -m experiments.bench_model                       # both configs
    python -m experiments.bench_model --models=10m --steps=3 --batch=2 --seq=64   # quick
"""

from __future__ import annotations

import gc
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

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["10m", "smollm2"], f"configs to run, from {list(CONFIGS)}")
flags.DEFINE_integer("batch", None, "batch size (default per config)")
flags.DEFINE_integer("seq", None, "sequence length (default per config)")
flags.DEFINE_integer("steps", 5, "timed steps (after 2 warm-up steps)")
flags.DEFINE_integer("threads", 2, "torch.set_num_threads")
flags.DEFINE_float("lr", 1e-4, "AdamW learning rate (both sides)")


def next_token_loss(config, params, tokens):
    logits = models.logits(config, params, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_jax_step(config, optimizer):
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(next_token_loss, argnums=1)(config, params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def bench_jax(config, tokens, steps, lr):
    optimizer = optax.adamw(lr, weight_decay=0.0)
    params = models.init_params(config, 0)
    opt_state = optimizer.init(params)
    tokens = jnp.asarray(tokens)
    start = time.perf_counter()
    step = make_jax_step(config, optimizer).lower(params, opt_state, tokens).compile()
    compile_s = time.perf_counter() - start
    for _ in range(2):
        params, opt_state, loss = step(params, opt_state, tokens)
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, tokens)
    jax.block_until_ready(loss)
    return (time.perf_counter() - start) / steps, compile_s, float(loss)


def bench_torch(config, tokens, steps, lr, threads):
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
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    return (time.perf_counter() - start) / steps, float(loss)


def main(argv):
    del argv
    print(f"jax {jax.__version__} devices {jax.devices()}; torch threads {FLAGS.threads}")
    rows = []
    for name in FLAGS.models:
        config = CONFIGS[name]
        batch, seq = DEFAULT_SHAPES[name]
        batch, seq = FLAGS.batch or batch, FLAGS.seq or seq
        tokens = np.random.RandomState(0).randint(0, config.vocab_size, (batch, seq))
        n_params = sum(x.size for x in jax.tree.leaves(models.abstract_params(config)))
        torch_s, torch_loss = bench_torch(config, tokens, FLAGS.steps, FLAGS.lr, FLAGS.threads)
        gc.collect()
        jax_s, compile_s, jax_loss = bench_jax(config, tokens, FLAGS.steps, FLAGS.lr)
        gc.collect()
        # Both losses start near log(vocab): a sanity check that both sides train the same task.
        print(f"{name}: {n_params / 1e6:.1f}M params, batch {batch} x seq {seq}; "
              f"loss after warm-up+steps torch {torch_loss:.3f} ours {jax_loss:.3f}")
        rows.append((name, batch * seq / torch_s, batch * seq / jax_s, compile_s))
    print("\n| config | torch tokens/s | ours tokens/s | ours/torch | our compile s |")
    print("|---|---|---|---|---|")
    for name, torch_tps, jax_tps, compile_s in rows:
        print(f"| {name} | {torch_tps:.0f} | {jax_tps:.0f} | {jax_tps / torch_tps:.2f}x "
              f"| {compile_s:.1f} |")


if __name__ == "__main__":
    app.run(main)
