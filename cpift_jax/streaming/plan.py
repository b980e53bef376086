"""What a streaming merge will do, decided before any tensor is read.

``plan_tensors`` compares the tensor names, shapes and dtypes of every input checkpoint and
returns one ``TensorPlan`` per output tensor; ``tensor_hparams`` resolves the operator's
hyperparameters for every tensor name. Both fail with a message naming the tensor, so a bad
recipe stops before hours of merging rather than in the middle.

Policies (documented in docs/merging_checkpoints.md):

- **Names.** Every model (and the base) must hold exactly the same tensor names.
- **Shapes.** Must agree, except the first (vocabulary) dimension of embedding / output-head
  tensors (``VOCAB_PATTERN``): a vocabulary mismatch is an error unless ``truncate_vocab``,
  which keeps the first ``min`` rows of every such tensor in every model, with a warning (as
  mergekit's ``--unsafe-truncate-embeddings``: it assumes the shared token ids mean the same).
- **Dtypes.** Without ``dtype`` every model must store a tensor in the same dtype, which the
  output keeps; with ``dtype`` every floating input is cast to it first and the output is
  stored in it. Non-floating tensors (integer buffers) are never merged: they must be equal in
  every model and are copied.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from cpift_jax import hparams as hparams_lib
from cpift_jax import tree as tree_lib
from cpift_jax.streaming.checkpoint_io import Checkpoint
from cpift_jax.models.safetensors_io import TensorSpec

__all__ = [
    "VOCAB_PATTERN",
    "LITERAL_HPARAMS",
    "TensorPlan",
    "plan_tensors",
    "tensor_hparams",
    "check_hparam_names",
]

# Embedding and output-head matrices whose first dimension is the vocabulary.
VOCAB_PATTERN = r"(?:.*\.)?(?:embed_tokens|lm_head|embed_out|embed_in|wte|word_embeddings)\.weight"
# Hyperparameters whose list value is one entry per model, not a layer gradient.
LITERAL_HPARAMS = ("weights",)


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its spec, how many leading rows of each input to keep (``None``: all),
    and whether it goes through the operator (floating point) or is copied (equal elsewhere)."""

    out: TensorSpec
    rows: int | None
    mergeable: bool

    @property
    def name(self) -> str:
        return self.out.name


def _labelled(models: Sequence[Checkpoint], base: Checkpoint | None):
    labelled = [(f"base ({base.path})", base)] if base is not None else []
    return labelled + [(f"models[{i}] ({m.path})", m) for i, m in enumerate(models)]


def _check_names(sources) -> list[str]:
    ref_label, ref = sources[0]
    names = set(ref.specs)
    for label, source in sources[1:]:
        other = set(source.specs)
        if other != names:
            missing = sorted(names - other)
            if missing:
                raise ValueError(f"tensor '{missing[0]}' is in {ref_label} but missing from "
                                 f"{label} ({len(missing)} missing in all)")
            extra = sorted(other - names)
            raise ValueError(f"tensor '{extra[0]}' is in {label} but missing from {ref_label} "
                             f"({len(extra)} such tensors)")
    return list(ref.specs)  # the reference's storage order


def _describe(sources, name, what: Callable[[TensorSpec], Any]) -> str:
    return ", ".join(f"{label}: {what(src.specs[name])}" for label, src in sources)


def plan_tensors(
    models: Sequence[Checkpoint],
    base: Checkpoint | None = None,
    *,
    dtype=None,
    truncate_vocab: bool = False,
    vocab_pattern: str = VOCAB_PATTERN,
) -> tuple[list[TensorPlan], int | None]:
    """``(plans in the reference's storage order, truncated vocabulary size or None)``.

    The reference is the base if given, else ``models[0]``. See the module docstring for the
    policies; every error names the tensor and shows each input's value.
    """
    sources = _labelled(models, base)
    names = _check_names(sources)
    cast = None if dtype is None else np.dtype(dtype)
    vocab_rows = None
    mismatched = []
    for name in names:
        shapes = {src.specs[name].shape for _, src in sources}
        if len(shapes) == 1:
            continue
        same_tail = len({s[1:] for s in shapes}) == 1 and len({len(s) for s in shapes}) == 1
        if not (re.fullmatch(vocab_pattern, name) and same_tail and shapes != {()}):
            raise ValueError(f"shape mismatch on tensor '{name}': "
                             f"{_describe(sources, name, lambda s: s.shape)}")
        mismatched.append(name)
    if mismatched:
        first = mismatched[0]
        smallest = min(src.specs[n].shape[0] for n in names if re.fullmatch(vocab_pattern, n)
                       for _, src in sources)
        if not truncate_vocab:
            raise ValueError(
                f"vocabulary mismatch on tensor '{first}': "
                f"{_describe(sources, first, lambda s: s.shape[0])} rows. Set truncate_vocab=True "
                f"to keep the first {smallest} rows of every embedding (only correct if the "
                "tokenizers agree on those ids)"
            )
        vocab_rows = smallest
        logging.warning("vocabulary mismatch (%s); truncating every embedding/head tensor to its "
                        "first %d rows", _describe(sources, first, lambda s: s.shape[0]), smallest)
    plans = []
    for name in names:
        dtypes = {src.specs[name].dtype for _, src in sources}
        spec = sources[0][1].specs[name]
        # jnp's test: NumPy does not count ml_dtypes' bfloat16 / float8 as floating.
        floating = all(jnp.issubdtype(d, jnp.floating) for d in dtypes)
        if len(dtypes) > 1 and not (floating and cast is not None):
            raise ValueError(
                f"dtype mismatch on tensor '{name}': {_describe(sources, name, lambda s: s.dtype)}"
                + ("; set dtype (e.g. 'bfloat16') to cast every input" if floating else "")
            )
        rows = vocab_rows if vocab_rows is not None and re.fullmatch(vocab_pattern, name) else None
        shape = (rows, *spec.shape[1:]) if rows is not None else spec.shape
        out_dtype = cast if (floating and cast is not None) else spec.dtype
        plans.append(TensorPlan(TensorSpec(name, out_dtype, shape), rows, floating))
    return plans, vocab_rows


class _Unset:
    def __repr__(self):
        return "<operator default>"


_UNSET = _Unset()


def _check_rule_list(rules) -> list[tuple[str, Mapping]]:
    out = []
    for i, rule in enumerate(rules or ()):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
                and isinstance(rule[1], Mapping)):
            raise ValueError(f"rules[{i}] must be a (regex, {{hyperparameter: value}}) pair, "
                             f"got {rule!r}")
        try:
            re.compile(rule[0])
        except re.error as err:
            raise ValueError(f"rules[{i}]: invalid regex {rule[0]!r}: {err}") from None
        out.append((rule[0], dict(rule[1])))
    return out


def _freeze(value):
    """Hashable form of a hyperparameter value (lists become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def tensor_hparams(
    names: Sequence[str],
    params: Mapping[str, Any] | None,
    rules: Sequence[tuple[str, Mapping[str, Any]]] = (),
    *,
    num_layers: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Operator hyperparameters per tensor name.

    ``params`` gives the defaults; ``rules`` are ``(regex, {hyperparameter: value})`` pairs.
    For each hyperparameter, the first rule whose regex fully matches the tensor name *and*
    sets that hyperparameter wins; otherwise ``params``; otherwise the operator's own default.
    A list value is a layer gradient (``cpift_jax.hparams``: anchors spread over layers
    ``0..num_layers-1``, the layer read from the name by ``cpift_jax.tree.layer_index``,
    tensors outside the layer stack take the first anchor), except for ``LITERAL_HPARAMS``
    (``weights`` is one value per model).
    """
    params = dict(params or {})
    rules = _check_rule_list(rules)
    keys = list(params) + [k for _, r in rules for k in r if k not in params]
    result: dict[str, dict[str, Any]] = {name: {} for name in names}
    probe = dict.fromkeys(names, 0)
    for key in dict.fromkeys(keys):
        key_rules = [(pattern, values[key]) for pattern, values in rules if key in values]
        default = params.get(key, _UNSET)
        if key in LITERAL_HPARAMS:
            chosen = {n: _first_match(n, key_rules, default) for n in names}
        else:
            chosen = hparams_lib.resolve(
                probe, key_rules + [(".*", default)], num_layers=num_layers,
            ) if names else {}
        for name in names:
            if chosen[name] is not _UNSET:
                result[name][key] = _freeze(chosen[name])
    return result


def _first_match(name, key_rules, default):
    try:
        return tree_lib.match_rule(name, key_rules)
    except KeyError:
        return default


def check_hparam_names(operator: str, merge_fn, keys) -> None:
    """Fails early if ``params``/``rules`` name a hyperparameter ``merge_fn`` does not take."""
    signature = inspect.signature(merge_fn)
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return
    accepted = [n for n, p in signature.parameters.items()
                if n not in ("models", "base") and p.kind is not p.VAR_POSITIONAL]
    for key in keys:
        if key not in accepted:
            raise ValueError(f"hyperparameter {key!r} is not taken by operator {operator!r}; it "
                             f"takes: {', '.join(accepted)}")
