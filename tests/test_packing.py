"""Sequence packing: the packed layout written out, batch streams and the loader carrying the
packed keys, and the model and train step on packed rows equal to the documents run one by one
(logits per position; summed NLL and gradient), on Llama and on a Gemma-2-like config with a
sliding window, with scanned layers and micro-batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cpift_jax import models, optim, sharding
from cpift_jax.data import batching, loader, packing
from cpift_jax.models import scan as scan_lib
from cpift_jax.training import step as step_lib

# ------------------------------------------------------------------------------ layout


def _doc(tokens, mask):
    return np.array(tokens, np.int32), np.array(mask, bool)


DOCS = [_doc([11, 12, 13, 14, 15], [0, 0, 1, 1, 1]),   # 5 tokens
        _doc([21, 22, 23], [1, 1, 1]),                 # 3
        _doc([31, 32, 33, 34], [0, 1, 0, 1]),          # 4
        _doc([41, 42], [0, 1])]                        # 2


def test_pack_layout_written_out():
    # Best-fit decreasing, seq_len 8: doc0 (5) opens row 0 (room 3); doc2 (4) does not fit
    # there and opens row 1 (room 4); doc1 (3) fits row 0 exactly (best fit, not row 1);
    # doc3 (2) goes to row 1, which keeps 2 pads.
    out = packing.pack(DOCS, 8, pad_id=99)
    np.testing.assert_array_equal(out["tokens"], [[11, 12, 13, 14, 15, 21, 22, 23],
                                                  [31, 32, 33, 34, 41, 42, 99, 99]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1, 1, 2, 2, 2],
                                                       [1, 1, 1, 1, 2, 2, 0, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3, 4, 0, 1, 2],
                                                     [0, 1, 2, 3, 0, 1, 0, 0]])
    # Each document's first token is never counted (doc1's 21 and doc3's 41 lose their mask).
    np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 1, 1, 1, 0, 1, 1],
                                                     [0, 1, 0, 1, 0, 1, 0, 0]])
    assert {k: v.dtype for k, v in out.items()} == {
        "tokens": np.int32, "loss_mask": np.bool_, "segment_ids": np.int32,
        "positions": np.int32}
    assert packing.efficiency(out) == 14 / 16


def test_overlong_document_raises_naming_it_unless_truncated():
    with pytest.raises(ValueError, match="document 0 has 5 tokens but seq_len is 4"):
        packing.pack(DOCS, 4)
    with pytest.raises(ValueError, match="'gsm8k/17' has 5 tokens"):
        packing.pack(DOCS, 4, names=["'gsm8k/17'", "b", "c", "d"])
    # Truncated doc0 (4 tokens, the first ones) and doc2 (4) fill rows 0 and 1; doc1 (3)
    # opens row 2; doc3 (2) goes to row 3 (row 2 has room 1 only).
    out = packing.pack(DOCS, 4, truncate=True)
    np.testing.assert_array_equal(out["tokens"], [[11, 12, 13, 14], [31, 32, 33, 34],
                                                  [21, 22, 23, 0], [41, 42, 0, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 1, 1], [0, 1, 0, 1],
                                                     [0, 1, 1, 0], [0, 1, 0, 0]])
    with pytest.raises(ValueError, match="document 1 is empty"):
        packing.pack([DOCS[0], _doc([], [])], 8)


def test_random_documents_round_trip_and_fit():
    rng = np.random.default_rng(0)
    docs = [_doc(rng.integers(1, 50, n), rng.random(n) < 0.5)
            for n in rng.integers(1, 33, 200)]
    out = packing.pack(docs, 32)
    assert packing.pack(docs, 32)["tokens"].tobytes() == out["tokens"].tobytes()  # deterministic
    found = []
    for r in range(len(out["tokens"])):
        seg = out["segment_ids"][r]
        k = seg.max()
        assert (seg[seg > 0] == np.repeat(np.arange(1, k + 1),
                                          np.bincount(seg)[1:])).all()  # contiguous 1..k
        assert (seg[np.argmax(seg == 0):] == 0).all() or (seg > 0).all()  # padding at the end
        for s in range(1, k + 1):
            where = seg == s
            np.testing.assert_array_equal(out["positions"][r][where], np.arange(where.sum()))
            found.append((out["tokens"][r][where].tobytes(), out["loss_mask"][r][where].tobytes()))
    want = [(t.tobytes(), np.concatenate([[False], m[1:]]).tobytes()) for t, m in docs]
    assert sorted(found) == sorted(want)
    total = sum(len(t) for t, _ in docs)
    assert len(out["tokens"]) <= int(np.ceil(11 / 9 * np.ceil(total / 32))) + 1
    assert packing.efficiency(out) == total / out["tokens"].size


def test_documents_from_rows_cut_after_the_last_supervised_token():
    arrays = {"tokens": np.array([[1, 2, 3, 9, 0], [4, 5, 0, 0, 0]], np.int32),
              "loss_mask": np.array([[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]], bool)}
    docs = packing.documents_from_rows(arrays)
    assert [d[0].tolist() for d in docs] == [[1, 2, 3], [4, 5]]
    docs = packing.documents_from_rows(arrays, lengths=[4, 2])
    assert [d[0].tolist() for d in docs] == [[1, 2, 3, 9], [4, 5]]
    arrays["loss_mask"][1] = False
    with pytest.raises(ValueError, match="row 1 has no supervised token"):
        packing.documents_from_rows(arrays)


def test_chat_token_ids_are_encode_chat_unpadded():
    from test_data_chat import char_tokenizer  # tests/ is on sys.path under pytest

    from cpift_jax.data import chat

    tok = char_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, mask = chat.token_ids(tok, messages)
    tokens, loss_mask = chat.encode_chat(tok, messages, len(ids) + 5)
    assert ids.dtype == np.int32 and mask.dtype == np.bool_
    np.testing.assert_array_equal(ids, tokens[:len(ids)])
    np.testing.assert_array_equal(mask, loss_mask[:len(ids)])
    assert not loss_mask[len(ids):].any() and mask.sum() == 3  # "yo" and <|im_end|>


# ------------------------------------------------------------------------------ streams


def _packed_task(offset, n=6):
    rng = np.random.default_rng(offset)
    docs = [_doc(offset + rng.integers(0, 9, k), rng.random(k) < 0.7) for k in (3, 5, 2, 6) * n]
    return packing.pack(docs, 8)


def test_batch_streams_carry_the_packed_keys_together():
    task = _packed_task(100)
    batch = batching.UniformBatches(task, 4, seed=1)[3]
    assert set(batch) == set(batching.PACKED_KEYS)
    rows = [np.flatnonzero((task["tokens"] == t).all(axis=1))[0] for t in batch["tokens"]]
    for key in batching.PACKED_KEYS:  # each row's arrays stay together
        np.testing.assert_array_equal(batch[key], task[key][rows])
    mixture = batching.MixtureBatches({"a": task, "b": _packed_task(200)}, {"a": 1, "b": 1},
                                      4, seed=0)
    assert set(mixture.rows(2, 1, 3)) == set(batching.PACKED_KEYS)
    plain = {k: task[k] for k in batching.KEYS}
    with pytest.raises(ValueError, match=r"packed: \['a'\], not packed: \['b'\]"):
        batching.MixtureBatches({"a": task, "b": plain}, {"a": 1, "b": 1}, 4, seed=0)
    with pytest.raises(ValueError, match="expected keys tokens and loss_mask"):
        batching.UniformBatches({**plain, "segment_ids": task["segment_ids"]}, 4, seed=0)
    with pytest.raises(ValueError, match="positions has shape"):
        batching.UniformBatches({**task, "positions": task["positions"][:, :4]}, 4, seed=0)


def test_loader_carries_the_packed_keys_on_the_batch_sharding():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    source = batching.UniformBatches(_packed_task(100, n=10), 8, seed=2)
    batch = next(loader.GlobalBatchLoader(source, sharding, 8, start=1))
    for key in batching.PACKED_KEYS:
        assert batch[key].sharding == sharding
        np.testing.assert_array_equal(np.asarray(batch[key]), source[1][key])


# ------------------------------------------------------------------------------ model

LLAMA = models.ModelConfig(vocab_size=37, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=64, param_dtype="float32")
# Gemma-2 options (local, global, local layers; window 3 shorter than the documents; both
# soft-caps small enough to bite; a query scale that is not head_dim's).
GEMMA2 = models.ModelConfig.from_hf(
    {"model_type": "gemma2", "vocab_size": 37, "hidden_size": 16, "intermediate_size": 24,
     "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
     "max_position_embeddings": 64, "sliding_window": 3, "query_pre_attn_scalar": 12,
     "final_logit_softcapping": 3.0, "attn_logit_softcapping": 2.0}, param_dtype="float32")
SEQ = 16


def _random_params(config, seed=0, std=0.2):
    """Every leaf random (norm gains too), so no option hides behind an identity."""
    leaves, treedef = jax.tree.flatten(models.abstract_params(config))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([std * jax.random.normal(k, x.shape, x.dtype)
                              for k, x in zip(keys, leaves)])


def _documents(config, lengths=(7, 4, 9, 5, 3, 6, 2), seed=0):
    rng = np.random.default_rng(seed)
    return [_doc(rng.integers(0, config.vocab_size, n), rng.random(n) < 0.8) for n in lengths]


def _padded_rows(docs, seq):
    """The unpacked batch: one document per row, right-padded (the train step's old input)."""
    tokens = np.zeros((len(docs), seq), np.int32)
    mask = np.zeros((len(docs), seq), bool)
    for i, (t, m) in enumerate(docs):
        tokens[i, :len(t)], mask[i, :len(t)] = t, m
    return {"tokens": tokens, "loss_mask": mask}


@pytest.mark.slow
@pytest.mark.parametrize("config", [LLAMA, GEMMA2], ids=["llama", "gemma2"])
def test_packed_logits_equal_each_document_alone(config):
    params = _random_params(config)
    docs = _documents(config)
    packed = packing.pack(docs, SEQ)
    assert len(packed["tokens"]) < len(docs)  # rows really hold several documents
    arrays = {k: jnp.asarray(v) for k, v in packed.items()}
    got = np.asarray(models.logits(config, params, arrays["tokens"],
                                   segment_ids=arrays["segment_ids"],
                                   positions=arrays["positions"]))
    scanned = jax.jit(lambda p, t, s, q: scan_lib.hidden_states(
        config, p, t, scan=True, remat="layer", segment_ids=s, positions=q))
    hidden = np.asarray(scanned(scan_lib.stack_layers(params), arrays["tokens"],
                                arrays["segment_ids"], arrays["positions"]))
    # Each document alone: one right-padded row per document (a causal model never sees the
    # padding after it), unpacked code path, positions 0..seq-1.
    alone = jnp.asarray(_padded_rows(docs, SEQ)["tokens"])
    want_logits = np.asarray(models.logits(config, params, alone))
    want_hidden = np.asarray(jax.jit(lambda t: scan_lib.hidden_states(config, params, t))(alone))
    seen = 0
    for r in range(len(packed["tokens"])):
        for s in range(1, packed["segment_ids"][r].max() + 1):
            where = np.flatnonzero(packed["segment_ids"][r] == s)
            i = next(i for i, d in enumerate(docs) if len(d[0]) == len(where)
                     and (d[0] == packed["tokens"][r, where]).all())
            np.testing.assert_allclose(got[r, where], want_logits[i, :len(where)],
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(hidden[r, where], want_hidden[i, :len(where)],
                                       rtol=1e-5, atol=1e-5)
            seen += 1
    assert seen == len(docs)


def _weighted_sums(config, step_config, params, batch):
    """(summed NLL, summed gradient): the per-token means times the token count."""
    fn = jax.jit(lambda p, b: step_lib.loss_and_grads(config, step_config, p, b))
    loss, count, grads = fn(params, {k: jnp.asarray(v) for k, v in batch.items()})
    return float(loss * count), float(count), jax.tree.map(lambda g: np.asarray(g) * count,
                                                           grads)


@pytest.mark.slow
@pytest.mark.parametrize("config", [LLAMA, GEMMA2], ids=["llama", "gemma2"])
def test_packed_loss_and_gradient_equal_the_unpacked_documents(config):
    params = _random_params(config, seed=1, std=0.1)
    docs = _documents(config, lengths=(7, 4, 9, 5, 3, 6, 2, 8), seed=1)
    packed = _even_rows(packing.pack(docs, SEQ))  # micro_batches=2 needs an even row count
    plain = step_lib.StepConfig()
    nll, count, grads = _weighted_sums(config, plain, params, _padded_rows(docs, SEQ))
    want_count = sum(int(m[1:].sum()) for _, m in docs)
    assert count == want_count
    got_nll, got_count, got_grads = _weighted_sums(config, plain, params, packed)
    assert got_count == want_count
    np.testing.assert_allclose(got_nll, nll, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 got_grads, grads)
    # Scanned layers (stacked layout) with remat, and two micro-batches: the same sums.
    stacked = scan_lib.stack_layers(params)
    for step_config, p in ((step_lib.StepConfig(scan_layers=True, remat="layer"), stacked),
                           (step_lib.StepConfig(micro_batches=2), params)):
        got_nll, got_count, got_grads = _weighted_sums(config, step_config, p, packed)
        assert got_count == want_count
        np.testing.assert_allclose(got_nll, nll, rtol=1e-5)
        if step_config.scan_layers:
            got_grads = scan_lib.unstack_layers(got_grads)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                     got_grads, grads)


def test_batch_keys_are_both_or_neither():
    with pytest.raises(ValueError, match="optionally all of"):
        step_lib.loss_and_grads(LLAMA, step_lib.StepConfig(), {},
                                {"tokens": 0, "loss_mask": 0, "segment_ids": 0})


def _even_rows(arrays):
    """``arrays`` with an all-padding row appended when the row count is odd (two devices)."""
    if len(arrays["tokens"]) % 2 == 0:
        return arrays
    return {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in arrays.items()}


@pytest.mark.slow
def test_compiled_step_keys_packed_apart_and_matches_the_unpacked_loss():
    mesh = sharding.make_mesh(sharding.default_mesh_config(), devices=jax.devices()[:2])
    opt = optim.default_config()
    opt.learning_rate, opt.total_steps, opt.warmup_steps = 1e-2, 2, 0
    docs = _documents(LLAMA, lengths=(7, 4, 9, 5, 3, 6, 2, 8), seed=2)
    packed = _even_rows(packing.pack(docs, SEQ))
    unpacked = _even_rows(_padded_rows(docs, SEQ))
    step_packed = step_lib.train_step(LLAMA, opt, mesh, packed["tokens"].shape, packed=True)
    step_plain = step_lib.train_step(LLAMA, opt, mesh, packed["tokens"].shape)
    assert step_packed is not step_plain
    assert set(step_packed.batch_shardings) == set(batching.PACKED_KEYS)
    assert set(step_plain.batch_shardings) == set(batching.KEYS)
    plain = step_lib.train_step(LLAMA, opt, mesh, unpacked["tokens"].shape)

    def first_step(compiled, batch):
        layout = compiled.layout
        params = jax.device_put(_random_params(LLAMA, seed=3, std=0.1), layout.shardings.params)
        opt_state = layout.init(params, None, optim.schedule_numbers(opt))
        state = step_lib.TrainState(params, opt_state,
                                    step_lib.replicated_step(0, layout.shardings.step))
        placed = {k: jax.device_put(v, compiled.batch_shardings[k]) for k, v in batch.items()}
        state, metrics = compiled.step(state, placed)
        return float(metrics["loss"]), float(metrics["tokens"]), state.params

    loss, tokens, params = first_step(step_packed, packed)
    want_loss, want_tokens, want_params = first_step(plain, unpacked)
    assert tokens == want_tokens == sum(int(m[1:].sum()) for _, m in docs)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-4, atol=1e-6),
                 params, want_params)
