"""Test set-up: eight faked CPU devices, so sharded code paths run on any machine, and caches in
a temporary directory, never the user's home.

The device flag must be set before jax is first imported, hence here at collection time.
"""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def temporary_cache(tmp_path_factory):
    """Points ``$CPIFT_CACHE`` (``cpift_jax.cache``) at a fresh directory for the whole session,
    subprocesses included, so the toy base, XLA's compilation cache and anything else a test
    caches are written there. SmolLM2 and the datasets are the exception: CI fetches them once
    into the real cache (``python -m cpift_jax.models.smollm2 --fetch``, ``python -m
    cpift_jax.data.fetch``), so their directories, if present, are linked into the temporary
    cache rather than fetched again (tests that fetch pass a cache directory of their own)."""
    from cpift_jax import cache
    from cpift_jax.data import fetch
    from cpift_jax.models import smollm2

    fetched = smollm2.hf_dir()  # under the real root, read before it is redirected
    datasets = fetch.cache_dir()
    root = tmp_path_factory.mktemp("cpift_cache")
    if smollm2.is_available():
        os.makedirs(root / "smollm2")
        os.symlink(fetched, root / "smollm2" / smollm2.HF_SUBDIR, target_is_directory=True)
    if datasets.is_dir():  # python -m cpift_jax.data.fetch, run by CI before the tests
        os.symlink(datasets, root / "datasets", target_is_directory=True)
    previous = os.environ.get(cache.ENV_VAR)
    os.environ[cache.ENV_VAR] = str(root)
    yield root
    if previous is None:
        del os.environ[cache.ENV_VAR]
    else:
        os.environ[cache.ENV_VAR] = previous
