"""The benchmark pipeline on a mesh and across processes: two processes with four faked CPU
devices each run configs/toy.py:smoke and write the same results.json as one process with eight
devices; a run whose process is killed mid-stage resumes from its training checkpoints and
finishes with the same results."""

import json
import time
from pathlib import Path

import pytest

from configs import toy
from cpift_jax.benchmark import pipeline
from tests import multihost

MESH = (2, 2, 2)  # data x fsdp x tensor: weights sharded, batch rows over 4 devices
CHECKPOINT_EVERY = 2


def _config():
    config = toy.get_config("smoke")
    config.mesh.shape = MESH
    config.train.checkpoint_every = CHECKPOINT_EVERY
    config.progress = False
    return config


def _args(workdir: Path) -> list[str]:
    return ["--config=configs/toy.py:smoke", f"--config.mesh.shape={MESH}",
            f"--config.train.checkpoint_every={CHECKPOINT_EVERY}", "--config.progress=False",
            f"--workdir={workdir}"]


def _flags(launch: multihost.Launch, pid: int) -> list[str]:
    address = f"127.0.0.1:{launch.port}"
    return [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={pid}",
            f"--coordinator_bind_address={address}", "--heartbeat_timeout_s=10"]


class _Binary(multihost.Launch):
    """Both processes run experiments/cpift.py with the distributed flags."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        super().__init__(multihost.REPO / "experiments" / "cpift.py", 2, devices_per_process=4,
                         workdir=workdir.parent, args=_args(workdir), per_process_args=_flags)


def _comparable(workdir: Path) -> dict:
    results = json.loads((workdir / "results.json").read_text())
    results.pop("timings", None)  # wall times differ from run to run
    return results


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: this pytest process, eight faked devices, the same mesh."""
    workdir = tmp_path_factory.mktemp("one") / "wd"
    pipeline.run(_config(), workdir)
    return workdir


@pytest.mark.slow
def test_two_processes_write_the_results_of_one(one_process, tmp_path):
    workdir = tmp_path / "wd"
    with _Binary(workdir) as launch:
        results = launch.wait(timeout_s=600)
    assert [r.returncode for r in results] == [0, 0], "\n".join(r.describe() for r in results)
    assert _comparable(workdir) == _comparable(one_process)
    assert "results:" in results[0].stdout and "results:" not in results[1].stdout


@pytest.mark.slow
def test_a_killed_run_resumes_mid_stage_with_the_same_results(one_process, tmp_path):
    workdir = tmp_path / "wd"
    checkpoint = workdir / "seed0" / "experts" / "train_state"
    with _Binary(workdir) as launch:
        deadline = time.monotonic() + 300
        while not any(p.name.isdigit() for p in checkpoint.glob("*/*")):
            assert time.monotonic() < deadline, "no mid-stage checkpoint within 300 s"
            assert all(p.poll() is None for p in launch.procs), launch.wait(1)
            time.sleep(0.2)
        launch.kill(launch.procs[1])
        survivor = launch.procs[0]
        survivor.wait(timeout=60)  # the heartbeat timeout stops it, it does not hang
        assert survivor.returncode != 0
    assert not (workdir / "seed0" / "experts" / "DONE.json").exists()

    with _Binary(workdir) as launch:
        results = launch.wait(timeout_s=600)
    assert [r.returncode for r in results] == [0, 0], "\n".join(r.describe() for r in results)
    assert "resuming from its training checkpoints" in results[0].stderr
    assert _comparable(workdir) == _comparable(one_process)
