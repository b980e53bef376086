"""``ModelConfig``: one frozen, hashable description of a Llama-family decoder.

Field names follow the Hugging Face configs (``LlamaConfig``, ``MistralConfig``, ``Qwen2Config``)
so that ``ModelConfig.from_hf(hf_config)`` and ``to_hf_dict()`` are renames. The config is a
frozen dataclass of Python scalars and tuples, so it can be a static argument of ``jax.jit``.

What differs between the supported families is only:

* Llama (1/2/3): optional ``attention_bias`` (q/k/v *and* o biases), optional ``mlp_bias``,
  llama3 / linear RoPE scaling.
* Mistral: a ``sliding_window`` (each token attends to the last ``sliding_window`` positions).
* Qwen2: q/k/v biases, no o bias.
* Gemma-2 (Gemma Team 2024, arXiv 2408.00118), options that are all off for the families above:
  ``hidden_act="gelu_pytorch_tanh"`` (GeGLU), ``final_logit_softcapping`` and
  ``attn_logit_softcapping`` (``cap * tanh(x / cap)``), ``sandwich_norms`` (RMSNorms after the
  attention and feed-forward outputs too), ``norm_unit_offset`` (RMSNorm gain ``1 + weight``),
  ``query_pre_attn_scalar`` (scores scaled by its ``**-0.5`` instead of ``head_dim**-0.5``),
  ``scale_embeddings`` (embedding output times ``sqrt(hidden_size)``) and ``layer_types``
  (which layers use the ``sliding_window``; Gemma-2 alternates local and global layers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_PARAM_DTYPES = ("float32", "bfloat16")
# "gelu_pytorch_tanh": GELU with the tanh approximation (Hendrycks & Gimpel 2016), Gemma's GeGLU.
SUPPORTED_HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
SLIDING_ATTENTION, FULL_ATTENTION = "sliding_attention", "full_attention"  # HF ``layer_types``

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}

# The Gemma-2 options (module docstring): model_type "gemma2" has exactly these values, except
# the two soft-caps and query_pre_attn_scalar, which its checkpoints set.
_GEMMA2_FIXED = dict(hidden_act="gelu_pytorch_tanh", sandwich_norms=True, norm_unit_offset=True,
                     scale_embeddings=True, mlp_bias=False)

# HF "dtype" strings -> our param_dtype. float16 checkpoints are upcast: bf16 or f32 only here.
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a Llama-family causal LM (see module docstring).

    ``head_dim=None`` means ``hidden_size // num_attention_heads`` and
    ``num_key_value_heads=None`` means ``num_attention_heads`` (no GQA); both are resolved in
    ``__post_init__`` so a config always holds concrete values.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    # RoPE, as transformers 5 ``rope_parameters``: {"rope_type", "rope_theta", "factor", ...}.
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v projections
    attention_out_bias: bool = False  # bias on o_proj (Llama ``attention_bias=True`` sets both)
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral; None = full causal attention
    # Per layer SLIDING_ATTENTION (uses sliding_window) or FULL_ATTENTION; None: every layer
    # uses sliding_window (if any).
    layer_types: tuple[str, ...] | None = None
    hidden_act: str = "silu"  # the MLP gate: SwiGLU ("silu") or GeGLU ("gelu_pytorch_tanh")
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    query_pre_attn_scalar: int | None = None  # None: head_dim (an int in HF's Gemma2Config)
    sandwich_norms: bool = False  # pre_feedforward / post_feedforward RMSNorms (Gemma-2)
    norm_unit_offset: bool = False  # RMSNorm gain is 1 + weight (weights initialised to 0)
    scale_embeddings: bool = False  # embedding output times sqrt(hidden_size), compute dtype
    param_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_type {self.rope_type!r}; supported: {list(SUPPORTED_ROPE_TYPES)}"
            )
        if self.rope_type == "llama3" and self.rope_original_max_position_embeddings is None:
            raise ValueError("rope_type 'llama3' needs rope_original_max_position_embeddings")
        if self.param_dtype not in SUPPORTED_PARAM_DTYPES:
            raise ValueError(
                f"param_dtype must be one of {list(SUPPORTED_PARAM_DTYPES)}, got {self.param_dtype!r}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        self._check_gemma2_options()

    def _check_gemma2_options(self):
        if self.hidden_act not in SUPPORTED_HIDDEN_ACTS:
            raise ValueError(f"hidden_act must be one of {list(SUPPORTED_HIDDEN_ACTS)}, "
                             f"got {self.hidden_act!r}")
        for key in ("final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"{key} must be > 0 or None, got {value!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries, expected "
                                 f"num_hidden_layers = {self.num_hidden_layers}")
            for i, kind in enumerate(self.layer_types):
                if kind not in (SLIDING_ATTENTION, FULL_ATTENTION):
                    raise ValueError(f"layer_types[{i}] is {kind!r}; expected "
                                     f"{SLIDING_ATTENTION!r} or {FULL_ATTENTION!r}")
            if SLIDING_ATTENTION in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window "
                                 "is None")
        if self.model_type == "gemma2":
            for key, value in _GEMMA2_FIXED.items():
                if getattr(self, key) != value:
                    raise ValueError(f"model_type 'gemma2' needs {key}={value!r}, got "
                                     f"{getattr(self, key)!r}")
            if self.attention_bias != self.attention_out_bias:
                raise ValueError("HF Gemma-2 has one 'attention_bias' flag for q/k/v and o; this "
                                 f"config has attention_bias={self.attention_bias}, "
                                 f"attention_out_bias={self.attention_out_bias}")

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's attention window (``None``: full causal attention)."""
        if self.layer_types is None:
            return (self.sliding_window,) * self.num_hidden_layers
        return tuple(self.sliding_window if kind == SLIDING_ATTENTION else None
                     for kind in self.layer_types)

    @property
    def attention_scale(self) -> float:
        """The factor on ``q . k``: ``query_pre_attn_scalar**-0.5``, by default ``head_dim**-0.5``."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """``eos_token_id`` as a (possibly empty) tuple."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, tuple):
            return self.eos_token_id
        return (self.eos_token_id,)

    # ------------------------------------------------------------------ Hugging Face conversion

    @classmethod
    def from_hf(cls, hf_config: Any, *, param_dtype: str | None = None) -> ModelConfig:
        """From a transformers config object or its ``config.json`` dict.

        ``param_dtype=None`` takes the checkpoint's ``dtype`` (``torch_dtype`` in older files):
        bfloat16 stays bfloat16, float16 and missing become float32. Fields that would change
        the maths but that this model does not implement raise ``ValueError`` naming the key.
        """
        d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in the Hugging Face config; "
                f"supported: {list(SUPPORTED_MODEL_TYPES)}"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if d.get(key) is None:
                raise ValueError(f"Hugging Face config is missing required key {key!r}")
        if model_type == "gemma2":
            act_key = "hidden_activation" if d.get("hidden_activation") else "hidden_act"
            act = d.get(act_key) or "gelu_pytorch_tanh"
            if act != "gelu_pytorch_tanh":
                raise ValueError(f"config key {act_key!r} is {act!r}; Gemma-2 supports only "
                                 "'gelu_pytorch_tanh' (GeGLU)")
        else:
            act = d.get("hidden_act", "silu")
            if act != "silu":
                raise ValueError(f"config key 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is "
                                 "supported")
        if model_type == "qwen2" and d.get("use_sliding_window"):
            raise ValueError("config key 'use_sliding_window' is true; Qwen2 sliding-window "
                             "layers are not supported")
        rope = _rope_from_hf(d)
        if model_type == "llama":
            qkv_bias = out_bias = bool(d.get("attention_bias", False))
            mlp_bias = bool(d.get("mlp_bias", False))
            sliding_window = None
        elif model_type == "qwen2":
            qkv_bias, out_bias, mlp_bias, sliding_window = True, False, False, None
        elif model_type == "gemma2":
            qkv_bias = out_bias = bool(d.get("attention_bias", False))
            mlp_bias, sliding_window = False, d.get("sliding_window")
        else:  # mistral
            qkv_bias = out_bias = mlp_bias = False
            sliding_window = d.get("sliding_window")
        gemma2 = _gemma2_from_hf(d) if model_type == "gemma2" else {}
        if param_dtype is None:
            hf_dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
            hf_dtype = str(hf_dtype).removeprefix("torch.")
            if hf_dtype not in _HF_DTYPES:
                raise ValueError(f"config key 'dtype' is {hf_dtype!r}; expected one of "
                                 f"{list(_HF_DTYPES)}")
            param_dtype = _HF_DTYPES[hf_dtype]
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            # Gemma-2 ties its embeddings unless the config says otherwise (transformers' default).
            tie_word_embeddings=bool(d.get("tie_word_embeddings", model_type == "gemma2")),
            attention_bias=qkv_bias,
            attention_out_bias=out_bias,
            mlp_bias=mlp_bias,
            sliding_window=sliding_window,
            param_dtype=param_dtype,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            **rope,
            **gemma2,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers 5 ``AutoConfig`` reads back to this model."""
        if self.model_type == "llama" and self.attention_bias != self.attention_out_bias:
            raise ValueError("HF Llama has one 'attention_bias' flag for q/k/v and o; this config "
                             f"has attention_bias={self.attention_bias}, "
                             f"attention_out_bias={self.attention_out_bias}")
        if self.model_type == "qwen2" and (not self.attention_bias or self.attention_out_bias
                                           or self.mlp_bias):
            raise ValueError("HF Qwen2 always has q/k/v biases and no o/mlp biases")
        if self.model_type == "mistral" and (self.attention_bias or self.attention_out_bias
                                             or self.mlp_bias):
            raise ValueError("HF Mistral has no biases")
        gemma_options = {key: getattr(self, key) for key in (
            "layer_types", "final_logit_softcapping", "attn_logit_softcapping",
            "query_pre_attn_scalar", "sandwich_norms", "norm_unit_offset", "scale_embeddings")}
        if self.model_type != "gemma2" and (self.hidden_act != "silu" or any(
                v not in (None, False) for v in gemma_options.values())):
            raise ValueError(f"HF {self.model_type} has no Gemma-2 options; this config sets "
                             f"hidden_act={self.hidden_act!r}, {gemma_options}")
        d: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": self._rope_parameters(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": self.param_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                             else self.eos_token_id),
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        elif self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        elif self.model_type == "gemma2":
            d["hidden_activation"] = self.hidden_act
            d["attention_bias"] = self.attention_bias
            d["sliding_window"] = self.sliding_window
            d["layer_types"] = list(self.layer_types or (
                [SLIDING_ATTENTION if self.sliding_window else FULL_ATTENTION]
                * self.num_hidden_layers))
            d["final_logit_softcapping"] = self.final_logit_softcapping
            d["attn_logit_softcapping"] = self.attn_logit_softcapping
            d["query_pre_attn_scalar"] = self.query_pre_attn_scalar or self.head_dim
        else:
            d["use_sliding_window"] = False
        return d

    def _rope_parameters(self) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope["low_freq_factor"] = self.rope_low_freq_factor
            rope["high_freq_factor"] = self.rope_high_freq_factor
            rope["original_max_position_embeddings"] = self.rope_original_max_position_embeddings
        return rope


def _gemma2_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    """The Gemma-2 fields of ``ModelConfig`` from an HF ``Gemma2Config`` dict."""
    if d.get("use_bidirectional_attention"):
        raise ValueError("config key 'use_bidirectional_attention' is true; only causal "
                         "attention is supported")
    layer_types = d.get("layer_types")
    if layer_types is None:  # transformers' default: local layers at even indices
        layer_types = [SLIDING_ATTENTION if i % 2 == 0 else FULL_ATTENTION
                       for i in range(d["num_hidden_layers"])]

    def optional_float(key, default=None):
        value = d.get(key, default)
        return None if value is None else float(value)

    fixed = {key: value for key, value in _GEMMA2_FIXED.items() if key != "mlp_bias"}
    # Missing keys take transformers' Gemma2Config defaults.
    return dict(
        fixed,
        layer_types=tuple(layer_types),
        final_logit_softcapping=optional_float("final_logit_softcapping", 30.0),
        attn_logit_softcapping=optional_float("attn_logit_softcapping", 50.0),
        query_pre_attn_scalar=int(d.get("query_pre_attn_scalar", 256)),
    )


def _rope_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE fields from transformers 5 ``rope_parameters`` or the older ``rope_scaling`` +
    top-level ``rope_theta``."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope = dict(rope)
    if rope and not isinstance(next(iter(rope.values())), (str, int, float, type(None))):
        raise ValueError("per-layer-type 'rope_parameters' are not supported")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config 'rope_parameters.rope_type' is {rope_type!r}; supported: "
                         f"{list(SUPPORTED_ROPE_TYPES)}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config 'rope_parameters.partial_rotary_factor' != 1 is not supported")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(rope["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(rope["low_freq_factor"])
        out["rope_high_freq_factor"] = float(rope["high_freq_factor"])
        out["rope_original_max_position_embeddings"] = int(
            rope.get("original_max_position_embeddings", d.get("max_position_embeddings"))
        )
    return out
