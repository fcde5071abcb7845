"""DecoderConfig: the frozen description of a Gemma-2 or Llama decoder, and its Hugging Face config.json mapping.

One config drives both families; the family only selects defaults and which optional pieces exist (Gemma-2's
post-norms, softcaps, sliding window, embedding scale and (1 + scale) norms). Every numerical choice that differs
between checkpoints (rope theta, llama3 rope scaling, norm eps, query scale, tying) is a field, never a constant.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

FAMILIES = ("llama", "gemma2")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A config.json (or GGUF header) that o1jax cannot turn into a decoder."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 frequency scaling (`rope_scaling` with rope_type "llama3")."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """All that defines a decoder's shapes and numerics.

  Attributes:
    family: "llama" or "gemma2".
    vocab_size, d_model, num_layers, num_heads, num_kv_heads, head_dim, ffw_dim: sizes (V, D, L, N, K, H, F).
    rms_norm_eps: epsilon inside every RMSNorm.
    rope_theta: RoPE base frequency.
    rope_scaling: llama3 frequency scaling, or None.
    max_position_embeddings: the context the checkpoint was trained for (informational, written back to HF).
    tie_embeddings: the head is the transposed embedding table.
    attn_logit_softcap: Gemma-2 attention softcap (tanh(s / c) * c on the scores), or None.
    final_logit_softcap: Gemma-2 softcap on the output logits, or None.
    sliding_window: window W of the sliding layers, or None. A query at p sees keys p-W+1 .. p.
    sliding_window_pattern: layer l slides iff l % pattern == 0 (Gemma-2: 2, so layers 0, 2, 4, ...).
    query_pre_attn_scalar: scores are scaled by this ** -0.5 (Gemma-2); None means head_dim ** -0.5.
    param_dtype: dtype the weights are stored in.
    dtype: activation dtype. Attention scores, softcaps, softmax and norm statistics always run in float32.
    bos_token_id, eos_token_ids, pad_token_id: ids from the checkpoint (eos may be several).
  """

  family: str
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  ffw_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 8192
  tie_embeddings: bool = True
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window: int | None = None
  sliding_window_pattern: int = 2
  query_pre_attn_scalar: float | None = None
  param_dtype: str = "float32"
  dtype: str = "float32"
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ConfigError(f"family {self.family!r} is not supported; expected one of {FAMILIES}.")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffw_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer.")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}.")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {DTYPES}.")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ConfigError(f"sliding_window={self.sliding_window} must be a positive integer or None.")

  @property
  def is_gemma(self) -> bool:
    return self.family == "gemma2"

  @property
  def query_scale(self) -> float:
    scalar = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
    return float(scalar) ** -0.5

  def layer_windows(self) -> list[int | None]:
    """Per-layer sliding window (None = full causal attention)."""
    if self.sliding_window is None:
      return [None] * self.num_layers
    return [self.sliding_window if l % self.sliding_window_pattern == 0 else None
            for l in range(self.num_layers)]

  def replace(self, **changes) -> "DecoderConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count (the head counted once when tied)."""
    D, F, L = self.d_model, self.ffw_dim, self.num_layers
    attn = D * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    norms = (4 if self.is_gemma else 2) * D
    head = 0 if self.tie_embeddings else self.vocab_size * D
    return self.vocab_size * D + L * (attn + 3 * D * F + norms) + D + head

  # --- Hugging Face config.json --------------------------------------------------------------------------------

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "DecoderConfig":
    """Builds a config from a Hugging Face config.json dict (transformers 4.x or 5.x spelling)."""
    model_type = hf.get("model_type")
    family = {"llama": "llama", "gemma2": "gemma2"}.get(model_type)
    if family is None:
      raise ConfigError(
          f"config.json has model_type={model_type!r}; o1jax supports 'llama' and 'gemma2'.")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in hf]
    if missing:
      raise ConfigError(f"config.json lacks the field(s) {missing}.")
    num_heads = hf["num_attention_heads"]
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    rope.update({k: v for k, v in legacy.items() if k not in rope})
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
      scaling = RopeScaling(
          factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
          high_freq_factor=float(rope["high_freq_factor"]),
          original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    elif rope_type == "default":
      scaling = None
    else:
      raise ConfigError(f"config.json rope type {rope_type!r} is not supported; expected 'default' or 'llama3'.")
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    fields = dict(
        family=family,
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        ffw_dim=hf["intermediate_size"],
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        tie_embeddings=bool(hf.get("tie_word_embeddings", family == "gemma2")),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
    )
    if family == "llama":
      act = hf.get("hidden_act", "silu")
      if act != "silu":
        raise ConfigError(f"config.json hidden_act={act!r}; Llama decoders here use 'silu'.")
      if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("config.json asks for attention_bias/mlp_bias; o1jax Llama decoders have no biases.")
    else:
      act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
      if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"config.json hidden_activation={act!r}; Gemma-2 uses 'gelu_pytorch_tanh'.")
      layer_types = hf.get("layer_types")
      if layer_types is not None:
        expected = ["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(len(layer_types))]
        if list(layer_types) != expected:
          raise ConfigError(
              f"config.json layer_types={layer_types} is not Gemma-2's alternation (sliding on even layers).")
      fields.update(
          attn_logit_softcap=hf.get("attn_logit_softcapping", 50.0),
          final_logit_softcap=hf.get("final_logit_softcapping", 30.0),
          sliding_window=hf.get("sliding_window", 4096),
          sliding_window_pattern=2,
          query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
      )
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict[str, Any]:
    """The config.json dict transformers reads back into the same architecture."""
    hf: dict[str, Any] = {
        "architectures": ["Gemma2ForCausalLM" if self.is_gemma else "LlamaForCausalLM"],
        "model_type": self.family,
        "vocab_size": self.vocab_size,
        "hidden_size": self.d_model,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "intermediate_size": self.ffw_dim,
        "rms_norm_eps": self.rms_norm_eps,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                         else (self.eos_token_ids[0] if self.eos_token_ids else None)),
        "pad_token_id": self.pad_token_id,
        "torch_dtype": self.param_dtype,
        "attention_bias": False,
    }
    rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
    if self.rope_scaling is not None:
      rope = {"rope_theta": self.rope_theta, "rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
    # transformers 5 reads `rope_parameters`; 4.x reads `rope_theta` + `rope_scaling`. Write both.
    hf["rope_parameters"] = rope
    hf["rope_theta"] = self.rope_theta
    if self.rope_scaling is not None:
      hf["rope_scaling"] = dict(rope)
    if self.is_gemma:
      hf.update(
          hidden_activation="gelu_pytorch_tanh",
          attn_logit_softcapping=self.attn_logit_softcap,
          final_logit_softcapping=self.final_logit_softcap,
          sliding_window=self.sliding_window,
          query_pre_attn_scalar=self.query_pre_attn_scalar,
          layer_types=["sliding_attention" if w is not None else "full_attention" for w in self.layer_windows()],
      )
    else:
      hf.update(hidden_act="silu", mlp_bias=False)
    return hf

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)
