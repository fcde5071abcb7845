"""Named decoder configs: the published Gemma-2 and Llama-3 sizes, SmolLM2-135M, and tiny test configs.

Each preset is a function so callers can override fields: `presets.get("gemma2_2b", dtype="bfloat16")`.
Sizes follow the checkpoints' own config.json files.
"""

from __future__ import annotations

from typing import Callable

from models.config import DecoderConfig, RopeScaling

_LLAMA3_SCALING_8 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192)
_LLAMA3_SCALING_32 = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192)


def _gemma2(**fields) -> DecoderConfig:
  base = dict(family="gemma2", vocab_size=256_000, rms_norm_eps=1e-6, rope_theta=10_000.0,
              max_position_embeddings=8192, tie_embeddings=True, attn_logit_softcap=50.0,
              final_logit_softcap=30.0, sliding_window=4096, sliding_window_pattern=2,
              bos_token_id=2, eos_token_ids=(1, 107), pad_token_id=0)
  return DecoderConfig(**{**base, **fields})


def _llama3(**fields) -> DecoderConfig:
  base = dict(family="llama", vocab_size=128_256, rms_norm_eps=1e-5, rope_theta=500_000.0,
              bos_token_id=128_000, eos_token_ids=(128_001,))
  return DecoderConfig(**{**base, **fields})


def gemma2_2b(**overrides) -> DecoderConfig:
  return _gemma2(d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256, ffw_dim=9216,
                 query_pre_attn_scalar=256, **overrides)


def gemma2_9b(**overrides) -> DecoderConfig:
  return _gemma2(d_model=3584, num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256, ffw_dim=14336,
                 query_pre_attn_scalar=256, **overrides)


def gemma2_27b(**overrides) -> DecoderConfig:
  # 27B scales queries by (d_model / num_heads) ** -0.5 = 144 ** -0.5, not head_dim ** -0.5.
  return _gemma2(d_model=4608, num_layers=46, num_heads=32, num_kv_heads=16, head_dim=128, ffw_dim=36864,
                 query_pre_attn_scalar=144, **overrides)


def llama3_8b(**overrides) -> DecoderConfig:
  return _llama3(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, ffw_dim=14336,
                 max_position_embeddings=8192, tie_embeddings=False, **overrides)


def llama3_1_8b(**overrides) -> DecoderConfig:
  return _llama3(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, ffw_dim=14336,
                 max_position_embeddings=131_072, tie_embeddings=False, rope_scaling=_LLAMA3_SCALING_8,
                 **{"eos_token_ids": (128_001, 128_008, 128_009), **overrides})


def llama3_2_1b(**overrides) -> DecoderConfig:
  return _llama3(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, ffw_dim=8192,
                 max_position_embeddings=131_072, tie_embeddings=True, rope_scaling=_LLAMA3_SCALING_32,
                 **{"eos_token_ids": (128_001, 128_008, 128_009), **overrides})


def smollm2_135m(**overrides) -> DecoderConfig:
  fields = dict(family="llama", vocab_size=49_152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3,
                head_dim=64, ffw_dim=1536, rms_norm_eps=1e-5, rope_theta=100_000.0, max_position_embeddings=8192,
                tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,), pad_token_id=2)
  return DecoderConfig(**{**fields, **overrides})


def tiny_gemma2(**overrides) -> DecoderConfig:
  """Three layers (sliding, full, sliding) with a window of 5: short test sequences cross the window."""
  return _gemma2(**{**dict(vocab_size=128, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                           ffw_dim=64, sliding_window=5, query_pre_attn_scalar=6, max_position_embeddings=256),
                    **overrides})


def tiny_llama(**overrides) -> DecoderConfig:
  """Two layers, GQA 4:2, llama3 rope scaling with a short original context so the scaling bites."""
  scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
  return _llama3(**{**dict(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                           ffw_dim=64, rope_theta=10_000.0, rope_scaling=scaling, tie_embeddings=False,
                           max_position_embeddings=256, bos_token_id=1, eos_token_ids=(2,)),
                    **overrides})


PRESETS: dict[str, Callable[..., DecoderConfig]] = {
    f.__name__: f for f in (gemma2_2b, gemma2_9b, gemma2_27b, llama3_8b, llama3_1_8b, llama3_2_1b,
                            smollm2_135m, tiny_gemma2, tiny_llama)
}


def get(name: str, **overrides) -> DecoderConfig:
  """The preset called `name`, with `overrides` applied."""
  if name not in PRESETS:
    raise ValueError(f"unknown decoder preset {name!r}; expected one of {sorted(PRESETS)}.")
  return PRESETS[name](**overrides)
