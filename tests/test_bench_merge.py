"""bench_merge's output comparison: counts against the final max |weight| in one pass."""

import numpy as np
from safetensors.numpy import save_file

from experiments import bench_merge


def write(directory, tensors):
    directory.mkdir()
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return str(directory)


def test_max_difference_counts_against_the_final_scale(tmp_path):
    # Tensors are read in name order. The small tensor's difference exceeds tolerance x the
    # max |weight| seen so far (0.2) but not tolerance x the final max |weight| (10): only the
    # big tensor's difference counts.
    ours = write(tmp_path / "ours", {"a_small": [0.1, 0.2], "b_big": [10.0, 0.0]})
    theirs = write(tmp_path / "theirs", {"a_small": [0.1 + 5e-5, 0.2], "b_big": [10.001, 0.0]})
    diff, scale, count = bench_merge.max_difference(ours, theirs, tolerance=1e-5)
    assert scale == 10.0
    assert count == 1
    np.testing.assert_allclose(diff, np.float32(10.001) - np.float32(10.0), rtol=1e-6)


def test_max_difference_of_equal_outputs_is_zero(tmp_path):
    tensors = {"w": [[1.0, -2.0], [3.0, 4.0]], "b": [0.5, 0.25]}
    diff, scale, count = bench_merge.max_difference(write(tmp_path / "x", tensors),
                                                    write(tmp_path / "y", tensors), tolerance=1e-5)
    assert (diff, scale, count) == (0.0, 4.0, 0)


def test_max_difference_counts_in_a_second_read_when_most_entries_differ(tmp_path):
    # Five differing entries, at most three kept: the count comes from the second read.
    ours = write(tmp_path / "ours", {"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0, 6.0]})
    theirs = write(tmp_path / "theirs", {"a": [1.5, 2.5, 3.0], "b": [4.5, 5.5, 6.5]})
    for max_candidates in (3, 1 << 24):
        assert bench_merge.max_difference(ours, theirs, tolerance=1e-5,
                                          max_candidates=max_candidates) == (0.5, 6.0, 5)


def test_max_difference_refilters_kept_candidates_at_the_grown_scale(tmp_path):
    # After "a" (max |w| 0.2) its three differences are candidates; "b" raises the scale to 10
    # and adds a fourth, over the cap of 3: re-filtered at 10 x tolerance, only b's stays.
    ours = write(tmp_path / "ours", {"a": [0.1, 0.2, 0.15], "b": [10.0, 0.0]})
    theirs = write(tmp_path / "theirs", {"a": [0.1 + 5e-5, 0.2 + 5e-5, 0.15 + 5e-5],
                                         "b": [10.01, 0.0]})
    diff, scale, count = bench_merge.max_difference(ours, theirs, tolerance=1e-5,
                                                    max_candidates=3)
    assert (scale, count) == (10.0, 1)
    np.testing.assert_allclose(diff, np.float32(10.01) - np.float32(10.0), rtol=1e-6)
