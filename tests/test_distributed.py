"""Many hosts: distributed start-up, barriers, process-0 writes, sharded checkpoints and the
per-process loader across two real processes (4 faked CPU devices each, ``tests/multihost.py``),
and the single-process behaviour of the same functions.

The two-process children are this file run as a script (``python tests/test_distributed.py
<child>``); they compare against NumPy references built from the same seeds.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

if __name__ != "__main__":
    import pytest

    from tests import multihost

HERE = Path(__file__).resolve()
BATCH, SEQ, STEPS_BEFORE, STEPS_AFTER = 8, 6, 3, 2


def reference_params():
    """A model-like tree whose leaf paths the Llama sharding rules cover."""
    rng = np.random.default_rng(0)
    import ml_dtypes

    return {
        "model": {
            "embed_tokens": {"embedding": rng.standard_normal((16, 8)).astype(np.float32)},
            "layers": {"0": {
                "self_attn": {"q_proj": {"kernel": rng.standard_normal((8, 8)).astype(ml_dtypes.bfloat16)}},
                "mlp": {"down_proj": {"kernel": rng.standard_normal((12, 8)).astype(np.float32)}},
                "input_layernorm": {"scale": rng.standard_normal(8).astype(np.float32)},
            }},
        },
        "lm_head": {"kernel": rng.standard_normal((8, 16)).astype(np.float32)},
    }


def reference_masks():
    import jax

    return jax.tree.map(lambda x: np.abs(np.asarray(x, np.float32)) > 1.0, reference_params())


def task_arrays():
    def rows(n, offset):
        tokens = (np.arange(n)[:, None] * 10 + offset + np.arange(SEQ)[None]).astype(np.int32)
        return {"tokens": tokens, "loss_mask": tokens % 3 == 0}

    return {"a": rows(5, 0), "b": rows(7, 1000), "c": rows(3, 2000)}


def batch_source():
    from cpift_jax.data import batching

    return batching.MixtureBatches(task_arrays(), {"a": 0.5, "b": 0.3, "c": 0.2}, BATCH, 7)


def mesh_of(shape, axes=("fsdp", "tensor")):
    import ml_collections

    from cpift_jax import sharding

    config = ml_collections.ConfigDict({"axes": axes, "shape": shape, "max_unsharded_fraction": 1.0})
    return sharding.make_mesh(config)


def place(tree, mesh):
    """``tree`` (NumPy) as global arrays with the Llama rules' shardings on ``mesh``; every
    process holds the whole host tree and hands its devices their slices."""
    import jax

    from cpift_jax import sharding

    shardings = sharding.tree_shardings(tree, sharding.LLAMA_RULES, mesh)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                        tree, shardings)


def gathered(tree):
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def same(a, b) -> bool:
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb))


def shardings_of(tree):
    import jax

    return jax.tree.map(lambda x: x.sharding, tree)


# ----------------------------------------------------------------------------- children


def child_main():
    from tests import multihost as mh

    ctx = mh.child_setup()
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from cpift_jax import distributed
    from cpift_jax.data import loader as loader_lib
    from cpift_jax.training import checkpoints
    from cpift_jax.training.step import TrainState

    wd = ctx.workdir
    out = {"process_count": jax.process_count(), "devices": jax.device_count(),
           "primary": distributed.is_primary()}
    mesh = mesh_of((2, 4))
    params, masks = place(reference_params(), mesh), place(reference_masks(), mesh)
    out["spans_processes"] = not params["lm_head"]["kernel"].is_fully_addressable
    pending = checkpoints.save_params(wd / "params", params, wait=False)
    checkpoints.save_masks(wd / "masks", masks)
    pending.wait()
    distributed.write_text(wd / f"written_by_{ctx.process_id}.txt", "x")
    checkpoints.write_json(wd / "meta.json", {"writer": ctx.process_id})
    distributed.barrier("saved", 30)

    for name, shape in (("same", (2, 4)), ("other", (8, 1))):
        target = place(reference_params(), mesh_of(shape))
        restored = checkpoints.load_params(wd / "params", target)
        restored_masks = checkpoints.load_masks(wd / "masks", target)
        out[f"{name}_shardings"] = (shardings_of(restored) == shardings_of(target)
                                    and shardings_of(restored_masks) == shardings_of(target))
        out[f"{name}_values"] = same(gathered(restored), reference_params())
        out[f"{name}_masks"] = same(gathered(restored_masks), reference_masks())

    # Barrier timeout: process 0 waits at a barrier process 1 never reaches.
    if ctx.process_id == 0:
        start = time.monotonic()
        try:
            distributed.barrier("only_process_0", timeout_s=2)
            out["barrier_timeout"] = "no error"
        except distributed.BarrierTimeoutError as err:
            out["barrier_timeout"] = str(err)
            out["barrier_timeout_s"] = time.monotonic() - start
    distributed.barrier("after_timeout", 30)

    # The loader: local rows, global arrays, and a resume from a train-state checkpoint.
    batch_sharding = NamedSharding(mesh_of((8,), ("data",)), PartitionSpec("data"))
    loader = loader_lib.GlobalBatchLoader(batch_source(), batch_sharding, SEQ)
    out["rows"] = [loader.lo, loader.hi]
    local = []
    for _ in range(STEPS_BEFORE):
        batch = next(loader)
        assert batch["tokens"].sharding == batch_sharding and batch["tokens"].shape == (BATCH, SEQ)
        local.append(np.asarray(gathered(batch["tokens"])).tolist())
    state = TrainState(params, {"mu": params, "count": np.int32(STEPS_BEFORE)},
                       np.int32(STEPS_BEFORE))
    checkpoints.save_train_state(wd / "train_state",
                                 checkpoints.ResumePoint(state, loader.get_state()))
    after = [np.asarray(gathered(next(loader)["loss_mask"])).tolist() for _ in range(STEPS_AFTER)]
    fresh = loader_lib.GlobalBatchLoader(batch_source(), batch_sharding, SEQ)
    target = place(reference_params(), mesh_of((8, 1)))
    resumed = checkpoints.load_train_state(
        wd / "train_state", TrainState(target, {"mu": target, "count": np.int32(0)}, np.int32(0)))
    fresh.set_state(resumed.data_state)
    out["resumed_step"] = int(resumed.state.step)
    out["resumed_params"] = same(gathered(resumed.state.params), reference_params())
    out["resumed_count"] = int(resumed.state.opt_state["count"])
    out["resumed_batches_equal"] = after == [
        np.asarray(gathered(next(fresh)["loss_mask"])).tolist() for _ in range(STEPS_AFTER)]
    out["global_tokens"] = local
    ctx.emit(**out)


def child_die():
    """Process 1 is killed (SIGKILL) after start-up; process 0 then waits in a collective."""
    from tests import multihost as mh

    ctx = mh.child_setup()
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    from cpift_jax import distributed

    distributed.barrier("started", 30)
    print(f"process {ctx.process_id} started", flush=True)
    if ctx.process_id == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    for _ in range(600):  # a collective per 0.1 s, as a training loop would make
        multihost_utils.process_allgather(jnp.ones(4))
        time.sleep(0.1)
    print("process 0 was never stopped", flush=True)


# ------------------------------------------------------------------------------- tests

if __name__ != "__main__":

    @pytest.fixture(scope="module")
    def two_processes(tmp_path_factory):
        workdir = tmp_path_factory.mktemp("two_processes")
        start = time.monotonic()
        results = multihost.run(HERE, 2, workdir=workdir, args=["main"], timeout_s=90)
        return workdir, [multihost.parse(r) for r in results], time.monotonic() - start

    @pytest.mark.slow
    def test_two_processes_save_sharded_and_restore_on_any_mesh(two_processes):
        workdir, outs, _ = two_processes
        for out in outs:
            assert out["process_count"] == 2 and out["devices"] == 8
            assert out["spans_processes"]  # the saved arrays really span both processes
            for name in ("same", "other"):
                assert out[f"{name}_shardings"] and out[f"{name}_values"] and out[f"{name}_masks"]
        assert [o["primary"] for o in outs] == [True, False]

    @pytest.mark.slow
    def test_two_processes_checkpoint_reads_in_one_process(two_processes):
        import jax

        from cpift_jax.training import checkpoints

        workdir, _, _ = two_processes
        mesh = mesh_of((4, 2))  # a third layout, in this 8-device process
        target = place(reference_params(), mesh)
        restored = checkpoints.load_params(workdir / "params", target)
        assert same(restored, reference_params())
        assert shardings_of(restored) == shardings_of(target)
        assert same(checkpoints.load_masks(workdir / "masks", target), reference_masks())
        assert same(checkpoints.load_params(workdir / "params", reference_params()),
                    reference_params())
        assert jax.process_count() == 1

    @pytest.mark.slow
    def test_two_processes_only_process_0_writes_files(two_processes):
        from cpift_jax.training import checkpoints

        workdir, _, _ = two_processes
        assert (workdir / "written_by_0.txt").exists()
        assert not (workdir / "written_by_1.txt").exists()
        assert checkpoints.read_json(workdir / "meta.json") == {"writer": 0}

    @pytest.mark.slow
    def test_two_processes_barrier_timeout_names_the_barrier(two_processes):
        _, outs, _ = two_processes
        message = outs[0]["barrier_timeout"]
        assert "barrier 'only_process_0'" in message and "within 2 s" in message, message
        assert 1.5 < outs[0]["barrier_timeout_s"] < 10

    @pytest.mark.slow
    def test_two_processes_loader_rows_assemble_the_global_batch_and_resume(two_processes):
        _, outs, seconds = two_processes
        source = batch_source()
        assert [o["rows"] for o in outs] == [[0, 4], [4, 8]]
        for out in outs:
            assert out["global_tokens"] == [source[i]["tokens"].tolist() for i in range(STEPS_BEFORE)]
            assert out["resumed_step"] == STEPS_BEFORE and out["resumed_count"] == STEPS_BEFORE
            assert out["resumed_params"] and out["resumed_batches_equal"]
        assert seconds < 60

    @pytest.mark.slow
    def test_a_killed_process_stops_the_other_within_the_heartbeat(tmp_path):
        heartbeat = 3
        with multihost.Launch(HERE, 2, workdir=tmp_path, args=["die"],
                              heartbeat_timeout_s=heartbeat) as launch:
            start = time.monotonic()
            results = launch.wait(timeout_s=60)
            elapsed = time.monotonic() - start
        survivor = results[0]
        assert results[1].returncode == -signal.SIGKILL
        assert "process 0 started" in survivor.stdout
        assert "never stopped" not in survivor.stdout
        # The coordination service declares process 1 dead after the heartbeat timeout and
        # aborts the survivor (SIGABRT) with this message (documented in docs/multihost.md).
        assert survivor.returncode == -signal.SIGABRT, survivor.describe()
        assert "stopped sending heartbeats" in survivor.stderr, survivor.describe()
        assert "another task died" in survivor.stderr, survivor.describe()
        assert elapsed < 30, survivor.describe()

    def test_initialize_without_flags_or_cluster_is_a_no_op(monkeypatch):
        from cpift_jax import distributed

        for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
            monkeypatch.delenv(var, raising=False)
        assert distributed.initialize() is False
        assert not distributed.is_initialized()
        assert distributed.is_primary() and distributed.process_count() == 1
        distributed.barrier("alone", 1)  # nothing to wait for

    def test_initialize_refuses_a_partial_set_of_flags():
        from cpift_jax import distributed

        with pytest.raises(ValueError, match="num_processes, process_id missing"):
            distributed.initialize("127.0.0.1:1234")

    def test_primary_only_writers_write_on_process_0(tmp_path):
        from cpift_jax import distributed

        calls = []
        assert distributed.primary_only(lambda x: calls.append(x) or x)(5) == 5
        distributed.write_json(tmp_path / "a" / "b.json", {"z": 1, "a": [1]})
        assert (tmp_path / "a" / "b.json").read_text() == '{\n  "a": [\n    1\n  ],\n  "z": 1\n}\n'
        assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.json"]

    @pytest.mark.slow
    def test_importing_the_library_starts_no_jax_backend():
        # distributed.initialize must come before the first backend call, so no module may
        # create a device array at import time (a jnp constant at module level would).
        code = ("import cpift_jax.benchmark.pipeline, cpift_jax.training.train, "
                "cpift_jax.streaming.merge, cpift_jax.merges\n"
                "from jax._src import xla_bridge\n"
                "assert not xla_bridge._backends, sorted(xla_bridge._backends)")
        proc = subprocess.run([sys.executable, "-c", code], cwd=HERE.parents[1],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    {"main": child_main, "die": child_die}[sys.argv[1]]()
