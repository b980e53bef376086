"""``hf.load(path, shardings=...)``: an HF checkpoint in two safetensors shards loaded straight
onto a mesh, each block read once and only by the process whose devices hold it.

References: the unsharded ``hf.load`` (bit-exact values) and exact element counts of the blocks
read (``hf_sharded.SliceReader.read`` wrapped). The two-process child is this file run as a
script (``python tests/test_hf_sharded_load.py child <checkpoint>``).
"""

import collections
import json
import math
import sys
from pathlib import Path

import numpy as np

if __name__ != "__main__":
    import pytest

    from tests import multihost

HERE = Path(__file__).resolve()
MESHES = {"fsdp": (1, 8, 1), "data_fsdp": (2, 4, 1), "fsdp_tensor": (1, 2, 4),
          "tensor": (1, 1, 8), "replicated": (8, 1, 1)}
CHILD_MESHES = ("fsdp", "fsdp_tensor")  # over 2 processes x 4 devices


def tiny_config(**changes):
    from cpift_jax import models

    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return models.ModelConfig(**{**fields, **changes})


def distinct_params(config, seed=0):
    """Every entry distinct (norms too), so a wrong block or a missed transpose shows."""
    import jax

    from cpift_jax import models

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32),
                        models.abstract_params(config))


def write_checkpoint(path, config, params):
    """``hf.save`` split into exactly two safetensors files plus the index."""
    from cpift_jax.models import hf

    total = sum(a.nbytes for _, a in hf.hf_tensors(config, params))
    hf.save(path, config, params, max_shard_bytes=int(total * 0.6))
    weight_map = json.loads((Path(path) / hf.INDEX_FILE).read_text())["weight_map"]
    assert len(set(weight_map.values())) == 2, weight_map
    return Path(path)


def mesh_config(shape):
    from cpift_jax import sharding

    config = sharding.default_mesh_config()
    config.shape = tuple(shape)
    return config


def target_shardings(config, shape):
    from cpift_jax import models, sharding

    mc = mesh_config(shape)
    return sharding.shardings(models.abstract_params(config), sharding.make_mesh(mc), mc)


class ReadLog:
    """Wraps ``SliceReader.read``: every (tensor, block) read and its element count."""

    def __init__(self):
        from cpift_jax.models import hf_sharded

        self.reads = []
        original = hf_sharded.SliceReader.read

        def read(reader, name, index):
            block = original(reader, name, index)
            self.reads.append((name, tuple((s.start, s.stop, s.step) for s in index), block.size))
            return block

        self.read = read

    def elements(self) -> dict:
        out = collections.Counter()
        for name, _, size in self.reads:
            out[name] += size
        return dict(out)

    def duplicates(self) -> list:
        counts = collections.Counter((name, key) for name, key, _ in self.reads)
        return [k for k, n in counts.items() if n > 1]


def addressable_elements(shardings, config) -> dict:
    """HF name -> elements in this process's distinct addressable blocks (the share it must
    read), from the shardings alone."""
    from cpift_jax import models, tree
    from cpift_jax.models import hf

    out = {}
    abstract = models.abstract_params(config)
    for path, leaf, sharding in zip(*tree.flatten(abstract)[:2], tree.flatten(shardings)[1]):
        blocks = {tuple(s.indices(n) for s, n in zip(index, leaf.shape))
                  for index in sharding.addressable_devices_indices_map(leaf.shape).values()}
        out[hf.hf_name(path)[0]] = sum(
            math.prod(len(range(*s)) for s in block) for block in blocks)
    return out


# ------------------------------------------------------------------------------- the child


def child_main():
    from tests import multihost as mh

    ctx = mh.child_setup()
    import jax

    from safetensors.numpy import load_file

    from cpift_jax import tree
    from cpift_jax.models import hf, hf_sharded

    path = Path(sys.argv[2])
    config = hf.load_config(path)
    expected = {}
    for file in sorted(path.glob("*.safetensors")):
        expected.update(load_file(file))
    for mesh_name in CHILD_MESHES:
        shardings = target_shardings(config, MESHES[mesh_name])
        log = ReadLog()
        hf_sharded.SliceReader.read = log.read
        _, params = hf.load(path, shardings=shardings)
        values_ok = True
        for p, leaf, want in zip(*tree.flatten(params)[:2], tree.flatten(shardings)[1]):
            name, transposed = hf.hf_name(p)
            full = expected[name].T if transposed else expected[name]
            values_ok &= leaf.sharding == want
            for shard in leaf.addressable_shards:
                values_ok &= bool(np.array_equal(np.asarray(shard.data), full[shard.index]))
        ctx.emit(**{f"{mesh_name}_read": log.elements(),
                    f"{mesh_name}_share": addressable_elements(shardings, config),
                    f"{mesh_name}_duplicates": len(log.duplicates()),
                    f"{mesh_name}_values_ok": bool(values_ok),
                    "process_count": jax.process_count()})


# ------------------------------------------------------------------------------- tests

if __name__ != "__main__":
    import jax

    from cpift_jax import models, tree
    from cpift_jax.models import hf, hf_sharded

    @pytest.fixture(scope="module")
    def checkpoint(tmp_path_factory):
        config = tiny_config()
        return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", config,
                                distinct_params(config))

    @pytest.mark.parametrize("param_dtype", [None, "bfloat16"])
    @pytest.mark.parametrize("mesh_name", list(MESHES))
    def test_sharded_load_equals_unsharded_and_reads_each_block_once(
            checkpoint, mesh_name, param_dtype, monkeypatch):
        config, reference = hf.load(checkpoint, param_dtype=param_dtype)
        shardings = target_shardings(config, MESHES[mesh_name])
        log = ReadLog()
        monkeypatch.setattr(hf_sharded.SliceReader, "read", log.read)
        loaded_config, params = hf.load(checkpoint, param_dtype=param_dtype, shardings=shardings)
        assert loaded_config == config
        for path, leaf, want, ref in zip(*tree.flatten(params)[:2], tree.flatten(shardings)[1],
                                         tree.flatten(reference)[1]):
            assert isinstance(leaf, jax.Array) and leaf.sharding == want, path
            assert leaf.dtype == ref.dtype, path
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref), err_msg=path)
        # One process holds all 8 devices: every tensor is read exactly once in total, in
        # disjoint blocks (a leaf replicated over an axis is not read again per device).
        assert log.duplicates() == []
        sizes = {hf.hf_name(p)[0]: math.prod(x.shape)
                 for p, x in zip(*tree.flatten(models.abstract_params(config))[:2])}
        assert log.elements() == sizes
        if mesh_name == "fsdp":  # the large kernels really arrive in 8 blocks
            blocks = collections.Counter(name for name, _, _ in log.reads)
            assert blocks["model.layers.0.mlp.up_proj.weight"] == 8
            assert blocks["model.norm.weight"] == 1

    def test_kernel_blocks_are_read_in_the_hf_layout(checkpoint, monkeypatch):
        """A kernel split over columns (ours) is read as rows of the HF [out, in] tensor."""
        config = hf.load_config(checkpoint)
        shardings = target_shardings(config, MESHES["fsdp_tensor"])
        log = ReadLog()
        monkeypatch.setattr(hf_sharded.SliceReader, "read", log.read)
        hf.load(checkpoint, shardings=shardings)
        spec = tree.flatten(shardings)[1][
            tree.leaf_paths(shardings).index("model/layers/0/mlp/up_proj/kernel")].spec
        # up_proj kernel is ours [in 64, out 128]; HF stores the weight [out 128, in 64].
        sizes = dict(zip(("data", "fsdp", "tensor"), MESHES["fsdp_tensor"]))
        splits = [sizes[axis] if axis else 1 for axis in spec]
        assert splits[0] * splits[1] > 1, spec  # the test needs a split kernel
        keys = {key for name, key, _ in log.reads if name == "model.layers.0.mlp.up_proj.weight"}
        assert len(keys) == splits[0] * splits[1]
        assert {(k[0][1] - k[0][0], k[1][1] - k[1][0]) for k in keys} == {
            (128 // splits[1], 64 // splits[0])}

    def test_validation_errors_match_the_unsharded_loader(tmp_path):
        config = tiny_config()
        params = distinct_params(config)
        shardings = target_shardings(config, MESHES["fsdp"])

        path = write_checkpoint(tmp_path / "shape", config, params)
        bad = tiny_config(intermediate_size=64)
        (path / "config.json").write_text(json.dumps(bad.to_hf_dict()))
        with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' in "
                                             r"'model-0000\d-of-00002\.safetensors' has shape "
                                             r"\(64, 128\), expected \(64, 64\)"):
            hf.load(path, shardings=target_shardings(bad, MESHES["fsdp"]))

        path = write_checkpoint(tmp_path / "extra", config, params)
        (path / "config.json").write_text(json.dumps(tiny_config(num_hidden_layers=1).to_hf_dict()))
        with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.1\."):
            hf.load(path, shardings=target_shardings(tiny_config(num_hidden_layers=1),
                                                     MESHES["fsdp"]))

        path = write_checkpoint(tmp_path / "missing", config, params)
        (path / "config.json").write_text(json.dumps(tiny_config(num_hidden_layers=3).to_hf_dict()))
        with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.2\."):
            hf.load(path, shardings=target_shardings(tiny_config(num_hidden_layers=3),
                                                     MESHES["fsdp"]))

        path = write_checkpoint(tmp_path / "structure", config, params)
        del shardings["lm_head"]
        with pytest.raises(ValueError, match=r"leaf 'lm_head/kernel' is only in the model's"):
            hf.load(path, shardings=shardings)

    def test_tied_checkpoint_with_a_differing_lm_head_is_refused(tmp_path):
        from safetensors.numpy import load_file, save_file

        config = tiny_config(tie_word_embeddings=True)
        path = write_checkpoint(tmp_path / "tied", config, distinct_params(config))
        index = json.loads((path / hf.INDEX_FILE).read_text())
        file = index["weight_map"]["model.embed_tokens.weight"]
        tensors = load_file(path / file)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
        save_file(tensors, path / file)
        index["weight_map"]["lm_head.weight"] = file
        (path / hf.INDEX_FILE).write_text(json.dumps(index))
        shardings = target_shardings(config, MESHES["fsdp"])
        _, params = hf.load(path, shardings=shardings)  # equal: accepted
        _, reference = hf.load(path)
        jax.tree.map(np.testing.assert_array_equal, params, reference)

        tensors["lm_head.weight"][100, 3] += 1.0
        save_file(tensors, path / file)
        with pytest.raises(ValueError,
                           match=r"'lm_head\.weight' differs .* in block \[0:128, 0:8\]"):
            hf.load(path, shardings=shardings)

    @pytest.mark.slow  # two processes: about 4 s here
    def test_two_processes_read_only_their_own_blocks(checkpoint, tmp_path):
        results = multihost.run(HERE, 2, workdir=tmp_path, args=["child", checkpoint],
                                timeout_s=120)
        outs = [multihost.parse(r) for r in results]
        sizes = {hf.hf_name(p)[0]: math.prod(x.shape)
                 for p, x in zip(*tree.flatten(models.abstract_params(tiny_config()))[:2])}
        for mesh_name in CHILD_MESHES:
            for out in outs:
                assert out["process_count"] == 2
                assert out[f"{mesh_name}_values_ok"]
                assert out[f"{mesh_name}_duplicates"] == 0
                # Exactly this process's distinct addressable blocks, nothing more.
                assert out[f"{mesh_name}_read"] == out[f"{mesh_name}_share"]
            up = "model.layers.0.mlp.up_proj.weight"
            norm = "model.norm.weight"
            assert [o[f"{mesh_name}_read"][up] for o in outs] == [sizes[up] // 2] * 2
            assert [o[f"{mesh_name}_read"][norm] for o in outs] == [sizes[norm]] * 2  # replicated
            assert sum(sum(o[f"{mesh_name}_read"].values()) for o in outs) < 2 * sum(
                sizes.values())


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    {"child": child_main}[sys.argv[1]]()
