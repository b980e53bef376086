"""End to end: experiments/merge.py and cpift_jax.streaming.merge on tiny Hugging Face checkpoints.

The checkpoints are written here with transformers (LlamaForCausalLM.save_pretrained, tiny
sizes): a base and three fine-tune-like models (base + small noise). Every merged checkpoint is
compared with ``merges.get(op)`` applied in memory to the same parameters.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs.merge import linear as linear_recipe
from configs.merge import slerp as slerp_recipe
from configs.merge import ties as ties_recipe
from cpift_jax.training import checkpoints as checkpoint_lib
from cpift_jax import merges
from cpift_jax.streaming import merge as streaming
from cpift_jax.models import safetensors_io as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
SIZES = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)


def llama_config(vocab=VOCAB):
    return transformers.LlamaConfig(vocab_size=vocab, **SIZES)


def read_dir(path) -> dict[str, np.ndarray]:
    """All tensors of a Hugging Face directory (single file or shards)."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def write_like(path, tensors: dict, vocab=VOCAB):
    """A Hugging Face directory holding ``tensors`` (for deliberately broken inputs)."""
    os.makedirs(path)
    llama_config(vocab).save_pretrained(path)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """base, m0, m1, m2 as Hugging Face directories; base and m0 carry different tokenizers."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config())
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    paths = {}
    for i, name in enumerate(["base", "m0", "m1", "m2"]):
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for key, value in model.state_dict().items():
                noise = 0.0 if name == "base" else 0.05 * torch.randn(value.shape, generator=gen)
                value.copy_(base_state[key] + noise)
        path = root / name
        model.save_pretrained(path)
        (path / "tokenizer_config.json").write_text(json.dumps({"from": name}))
        paths[name] = str(path)
    return paths


def models_of(ckpts, names=("m0", "m1", "m2")):
    return [ckpts[n] for n in names]


def in_memory(op, ckpts, names=("m0", "m1", "m2"), **hp):
    """The operator on whole parameter dicts (no streaming), as float32 numpy."""
    models = [{k: jnp.asarray(v) for k, v in read_dir(ckpts[n]).items()} for n in names]
    base = {k: jnp.asarray(v) for k, v in read_dir(ckpts["base"]).items()}
    out = merges.get(op)(models, base=base, **hp)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def assert_same_tensors(merged_dir, expected: dict, rtol=1e-6, atol=1e-7):
    merged = read_dir(merged_dir)
    assert set(merged) == set(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(merged[name], want, rtol=rtol, atol=atol, err_msg=name)


def run_recipe(module, arg: str, output: str, **overrides):
    """What experiments/merge.py does with ``--config=<module>.py:<arg>`` (its main is this one
    library call; test_cli_* runs the binary itself as a subprocess)."""
    config = module.get_config(arg)
    config.unlock()
    config.output, config.progress = output, False
    for key, value in overrides.items():
        setattr(config, key, value)
    return streaming.merge_from_config(config)


# ---------------------------------------------------------------- the binary vs in-memory merges


@pytest.mark.parametrize("op, arg, hp, overrides", [
    ("linear", "m0,m1,m2", {}, {}),
    ("ties", "base,m0,m1,m2", {"density": 0.5}, {}),
    # A layer gradient of t needs exactly two models; three models fold with t_i = 1/i.
    ("slerp", "m0,m1,m2", {}, {"rules": ()}),
])
@pytest.mark.slow
def test_recipe_merge_of_three_models_equals_the_in_memory_operator(
        ckpts, tmp_path, op, arg, hp, overrides):
    module = {"linear": linear_recipe, "ties": ties_recipe, "slerp": slerp_recipe}[op]
    out = str(tmp_path / "out")
    run_recipe(module, ",".join(ckpts[n] for n in arg.split(",")), out, **overrides)
    assert_same_tensors(out, in_memory(op, ckpts, **hp))


@pytest.mark.slow
def test_slerp_recipe_rules_follow_the_layer_gradient(ckpts, tmp_path):
    """configs/merge/slerp.py: attention t from 0 (layer 0) to 1 (last layer), MLP mirrored."""
    a, b = read_dir(ckpts["m0"]), read_dir(ckpts["m1"])
    out = str(tmp_path / "out")
    run_recipe(slerp_recipe, f"{ckpts['m0']},{ckpts['m1']}", out)
    merged = read_dir(out)
    attn, mlp = "model.layers.{}.self_attn.q_proj.weight", "model.layers.{}.mlp.up_proj.weight"
    np.testing.assert_array_equal(merged[attn.format(0)], a[attn.format(0)])  # t = 0
    np.testing.assert_array_equal(merged[attn.format(1)], b[attn.format(1)])  # t = 1
    np.testing.assert_array_equal(merged[mlp.format(0)], b[mlp.format(0)])
    np.testing.assert_array_equal(merged[mlp.format(1)], a[mlp.format(1)])
    # Tensors no rule matches take params.t = 0.5.
    expected = in_memory("slerp", ckpts, names=("m0", "m1"), t=0.5)
    for name in ("model.norm.weight", "model.layers.1.input_layernorm.weight"):
        np.testing.assert_allclose(merged[name], expected[name], rtol=1e-6, err_msg=name)
        assert not np.array_equal(merged[name], a[name])


def test_per_parameter_rules_override_the_defaults(ckpts, tmp_path):
    out = str(tmp_path / "out")
    streaming.merge_checkpoints(
        models_of(ckpts), out, operator="linear", progress=False,
        params={"weights": (1.0, 1.0, 1.0)},
        rules=[(r".*mlp.*", {"weights": (1.0, 0.0, 0.0)}), (r"lm_head\.weight", {"weights": (0, 0, 1)})])
    merged, m0, m2 = read_dir(out), read_dir(ckpts["m0"]), read_dir(ckpts["m2"])
    np.testing.assert_array_equal(merged["model.layers.1.mlp.down_proj.weight"],
                                  m0["model.layers.1.mlp.down_proj.weight"])
    np.testing.assert_array_equal(merged["lm_head.weight"], m2["lm_head.weight"])
    mean = in_memory("linear", ckpts)["model.norm.weight"]
    np.testing.assert_allclose(merged["model.norm.weight"], mean, rtol=1e-6)


@pytest.mark.slow
def test_cli_writes_a_sharded_checkpoint_that_transformers_loads(ckpts, tmp_path):
    out = tmp_path / "ties"
    arg = ",".join([ckpts["base"], *models_of(ckpts)])
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.merge", f"--config=configs/merge/ties.py:{arg}",
         f"--config.output={out}", "--config.max_shard_size=10KB", "--config.progress=False"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    merged = read_dir(out)
    assert set(index["weight_map"]) == set(merged)
    assert all(st.parse_size("10KB") >= os.path.getsize(out / s) - 4096 for s in shards)
    # Tokenizer files come from the base (m0's differ), the recipe is recorded.
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "base"}
    assert json.loads((out / "merge_config.json").read_text())["operator"] == "ties"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), merged[name], err_msg=name)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------- input checks


def test_mismatched_tensor_names_are_named(ckpts, tmp_path):
    tensors = read_dir(ckpts["m2"])
    del tensors["model.layers.1.mlp.gate_proj.weight"]
    bad = write_like(tmp_path / "bad", tensors)
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.1\.mlp\.gate_proj\.weight'"):
        streaming.merge_checkpoints([ckpts["m0"], bad], str(tmp_path / "out"),
                                    operator="linear", progress=False)
    assert not (tmp_path / "out").exists()


def test_mismatched_shapes_are_named(ckpts, tmp_path):
    tensors = read_dir(ckpts["m2"])
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((31, 16), np.float32)
    bad = write_like(tmp_path / "bad", tensors)
    with pytest.raises(ValueError, match=r"shape mismatch on tensor 'model\.layers\.0\.mlp\.up"):
        streaming.merge_checkpoints([ckpts["m0"], bad], str(tmp_path / "out"),
                                    operator="linear", progress=False)


def bigger_vocab(ckpts, tmp_path, rows=72):
    tensors = read_dir(ckpts["m1"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        extra = np.full((rows - VOCAB, SIZES["hidden_size"]), 7.0, np.float32)
        tensors[name] = np.concatenate([tensors[name], extra])
    return write_like(tmp_path / "big_vocab", tensors, vocab=rows)


def test_vocabulary_mismatch_is_an_error_naming_the_tensor(ckpts, tmp_path):
    big = bigger_vocab(ckpts, tmp_path)
    with pytest.raises(ValueError, match=r"vocabulary mismatch on tensor '(model\.embed_tokens|"
                                         r"lm_head)\.weight'.*truncate_vocab"):
        streaming.merge_checkpoints([ckpts["m0"], big], str(tmp_path / "out"),
                                    operator="linear", progress=False)


def test_truncate_vocab_keeps_the_common_rows_with_a_warning(ckpts, tmp_path, caplog):
    big = bigger_vocab(ckpts, tmp_path)
    out = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING):
        streaming.merge_checkpoints([big, ckpts["m0"]], out, operator="linear",
                                    truncate_vocab=True, progress=False)
    assert any("truncating" in r.getMessage() for r in caplog.records)
    merged, a, b = read_dir(out), read_dir(big), read_dir(ckpts["m0"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape == (VOCAB, SIZES["hidden_size"])
        np.testing.assert_allclose(merged[name], (a[name][:VOCAB] + b[name]) / 2, rtol=1e-6)
    assert json.loads(open(os.path.join(out, "config.json")).read())["vocab_size"] == VOCAB


# ---------------------------------------------------------------- output handling


def test_existing_output_is_refused_unless_overwrite(ckpts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        streaming.merge_checkpoints(models_of(ckpts), str(out), operator="linear",
                                    progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    streaming.merge_checkpoints(models_of(ckpts), str(out), operator="linear", overwrite=True,
                                progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_a_failure_mid_stream_leaves_no_output(ckpts, tmp_path, monkeypatch):
    written = []
    original = st.ShardedWriter.write

    def failing_write(self, name, array):
        if len(written) == 5:
            raise OSError("disk full (simulated)")
        written.append(name)
        return original(self, name, array)

    monkeypatch.setattr(st.ShardedWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        streaming.merge_checkpoints(models_of(ckpts), str(tmp_path / "out"), operator="linear",
                                    progress=False)
    assert written and os.listdir(tmp_path) == []  # neither the output nor its temporary


# ---------------------------------------------------------------- Orbax inputs


def to_orbax(hf_dir, path):
    """Our nested-dict layout: kernels transposed, embeddings named 'embedding'."""
    nested = {}
    for name, value in read_dir(hf_dir).items():
        parts = name.split(".")[:-1]
        if value.ndim == 2 and "embed_tokens" not in name:
            leaf, value = "kernel", value.T
        else:
            leaf = "embedding" if "embed_tokens" in name else "weight"
        node = nested
        for part in parts:
            node = node.setdefault(part, {})
        node[leaf] = value
    checkpoint_lib.save_params(path, nested)
    return str(path)


@pytest.mark.slow
def test_orbax_checkpoints_merge_like_their_hugging_face_originals(ckpts, tmp_path):
    orbax = [to_orbax(ckpts[n], tmp_path / f"orbax_{n}") for n in ("m0", "m1", "m2")]
    out = str(tmp_path / "out")
    streaming.merge_checkpoints(orbax, out, operator="ties", base=ckpts["base"],
                                params={"density": 0.5}, progress=False)
    assert_same_tensors(out, in_memory("ties", ckpts, density=0.5))


def test_linear_recipe_weights_reach_the_operator(ckpts, tmp_path):
    config = linear_recipe.get_config(",".join(models_of(ckpts)))
    config.unlock()
    config.params.weights = (2.0, 1.0, 1.0)
    config.output, config.progress = str(tmp_path / "out"), False
    streaming.merge_from_config(config)
    assert_same_tensors(config.output, in_memory("linear", ckpts, weights=(2.0, 1.0, 1.0)))
    recorded = json.loads(open(os.path.join(config.output, "merge_config.json")).read())
    assert recorded["params"]["weights"] == [2.0, 1.0, 1.0]


def test_operators_ranking_the_whole_model_are_refused_not_run_per_tensor(ckpts, tmp_path):
    # cpi's default scope is global: streaming it tensor by tensor would change its meaning.
    with pytest.raises(ValueError, match="scope='global'"):
        streaming.merge_checkpoints(models_of(ckpts), str(tmp_path / "out"), operator="cpi",
                                    base=ckpts["base"], progress=False)
    with pytest.raises(ValueError, match="scope='global'"):
        streaming.merge_checkpoints(models_of(ckpts), str(tmp_path / "out"), operator="ties",
                                    base=ckpts["base"], params={"scope": "global"},
                                    progress=False)
    assert not (tmp_path / "out").exists()


def test_a_bad_hyperparameter_in_a_late_rule_fails_before_anything_is_written(ckpts, tmp_path):
    with pytest.raises(ValueError, match=r"rejects the hyperparameters of tensor 'lm_head\.weight'"):
        streaming.merge_checkpoints(models_of(ckpts, ("m0", "m1")), str(tmp_path / "out"),
                                    operator="slerp", rules=[(r"lm_head\.weight", {"t": 1.5})],
                                    progress=False)
    assert os.listdir(tmp_path) == []


def test_an_operator_that_does_not_apply_is_refused_with_its_declared_limits(ckpts, tmp_path):
    with pytest.raises(ValueError, match="model_stock merges at least 2 models, got 1"):
        streaming.merge_checkpoints(models_of(ckpts, ("m0",)), str(tmp_path / "out"),
                                    operator="model_stock", base=ckpts["base"], progress=False)
    with pytest.raises(ValueError, match="ties needs a base model"):
        streaming.merge_checkpoints(models_of(ckpts), str(tmp_path / "out"), operator="ties",
                                    progress=False)
    assert os.listdir(tmp_path) == []


def _tensor_inputs(seed, n=3, shape=(8, 6)):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(np.float32) for _ in range(n)]


@pytest.mark.slow
def test_floats_an_operator_needs_as_numbers_are_compiled_in_and_the_switch_is_logged(caplog):
    """ties takes ``density`` only as a Python number: one program per value, said once; slerp
    takes ``t`` traced: one program for every value, nothing said. Results match the operator."""
    inputs, base = _tensor_inputs(0), _tensor_inputs(1, n=1)[0]
    ties = streaming.TensorMerger("ties", "jit")
    with caplog.at_level(logging.WARNING):
        for density in (0.5, 0.25):
            got = ties([x for x in inputs], base, {"density": density})
            want = merges.get("ties")([{"w": x} for x in inputs], base={"w": base},
                                      density=density)["w"]
            np.testing.assert_allclose(got, np.asarray(want), rtol=1e-6, atol=1e-7)
    said = [r.getMessage() for r in caplog.records if "Python numbers" in r.getMessage()]
    assert len(said) == 1 and "'ties' needs density" in said[0]
    assert ties.compilations == 2
    caplog.clear()
    slerp = streaming.TensorMerger("slerp", "jit")
    with caplog.at_level(logging.WARNING):
        for t in (0.2, 0.7):
            got = slerp(inputs[:2], None, {"t": t})
            want = merges.get("slerp")([{"w": x} for x in inputs[:2]], t=t)["w"]
            np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-6)
    assert slerp.compilations == 1 and not caplog.records


def test_recycled_outputs_are_donated_without_a_warning():
    """An output handed back with ``recycle`` becomes the buffer of the next result; JAX warns
    when a donation cannot be used, and no warning is filtered out any more."""
    import warnings

    merger = streaming.TensorMerger("linear", "jit")
    inputs = [jnp.asarray(x) for x in _tensor_inputs(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a donation JAX cannot use would fail the test
        first = merger.merge(inputs, None, {})
        want = np.asarray(first).copy()
        merger.recycle(first)
        second = merger.merge(inputs, None, {})
        np.testing.assert_array_equal(np.asarray(second), want)
    assert first.is_deleted()  # its buffer now holds the second result


# ---------------------------------------------------------------- host buffers and dtypes


@pytest.mark.slow
def test_bfloat16_checkpoints_merge_like_the_in_memory_operator(ckpts, tmp_path):
    """bfloat16 crosses into XLA as raw 16-bit words (DLPack has no bfloat16) and is bit-cast
    back inside the jitted operator."""
    import ml_dtypes

    names = ("m0", "m1", "m2")
    paths = [write_like(tmp_path / f"bf16_{n}", {k: v.astype(ml_dtypes.bfloat16)
                                                for k, v in read_dir(ckpts[n]).items()})
             for n in names]
    out = str(tmp_path / "out")
    streaming.merge_checkpoints(paths, out, operator="slerp", progress=False)
    models = [{k: jnp.asarray(v) for k, v in read_dir(p).items()} for p in paths]
    expected = merges.get("slerp")(models)
    merged = read_dir(out)
    for name, want in expected.items():
        assert merged[name].dtype == ml_dtypes.bfloat16, name
        np.testing.assert_allclose(merged[name].astype(np.float32),
                                   np.asarray(want, np.float32), rtol=1e-2, atol=1e-3,
                                   err_msg=name)


def test_copied_tensors_do_not_hand_out_a_reused_read_buffer(ckpts, tmp_path, monkeypatch):
    """Tensors that are not merged (integer buffers) are passed through as read, i.e. as views of
    a staging buffer that a read a few tensors later refills; with writes lagging behind the
    reads, a missing copy would write the wrong bytes."""
    import time

    rng = np.random.default_rng(0)
    extra = {f"model.buffer_{i}": rng.integers(0, 1000, (64, 16)).astype(np.int32)
             for i in range(6)}
    paths = [write_like(tmp_path / n, {**read_dir(ckpts[n]), **extra}) for n in ("m0", "m1")]
    original = st.ShardedWriter.write

    def slow_write(self, name, array):
        time.sleep(0.02)
        return original(self, name, array)

    monkeypatch.setattr(st.ShardedWriter, "write", slow_write)
    out = str(tmp_path / "out")
    streaming.merge_checkpoints(paths, out, operator="linear", progress=False)
    merged = read_dir(out)
    for name, want in extra.items():
        np.testing.assert_array_equal(merged[name], want, err_msg=name)
