"""Rotary position embedding (rotate-half layout, as Hugging Face Llama and Gemma-2) with llama3 frequency scaling.

Legend: B batch, T time, N heads, H head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """[H // 2] float32 inverse frequencies, with Llama-3's wavelength-dependent scaling when given.

  Llama-3 leaves high frequencies (wavelength < original_context / high_freq_factor) alone, divides low
  frequencies (wavelength > original_context / low_freq_factor) by `factor`, and blends linearly in between.
  Computed in float32 like transformers so that positions far into the context agree to the last bits.
  """
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
  if scaling is None:
    return inv_freq
  old_context = scaling.original_max_position_embeddings
  low_freq_wavelen = old_context / scaling.low_freq_factor
  high_freq_wavelen = old_context / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_context / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rotary_angles(positions: jax.Array, inv_freq: np.ndarray, dtype, num_positions: int | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """cos and sin of every position's angles, computed once per forward and shared by all layers.

  With num_positions, the angles of positions 0 .. num_positions - 1 are tabulated and each token's row is
  gathered: the same values as taking cos and sin of the tokens' own angles, but XLA:CPU fuses those
  transcendentals into every layer's query and key relayouts and evaluates them again for each head (1 s of a
  64 x 128-token SmolLM2 prefill), where a gathered table is read, never recomputed.

  Args:
    positions: [B, T] int32 (padding may carry any value: its output is never read).
    inv_freq: [H // 2] from `inverse_frequencies`.
    num_positions: None, or a bound the caller guarantees: every real position is in [0, num_positions) (the
      cache's slot count bounds positions counted from a mask, since every real token takes a slot).

  Returns:
    cos, sin: [B, T, 1, H // 2] in dtype (the 1 broadcasts over heads).
  """
  if num_positions is None:
    angles = positions.astype(jnp.float32)[..., None, None] * jnp.asarray(inv_freq)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)
  angles = jnp.arange(num_positions, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)
  index = positions[..., None]
  cos = jnp.take(jnp.cos(angles).astype(dtype), index, axis=0, mode="clip")
  sin = jnp.take(jnp.sin(angles).astype(dtype), index, axis=0, mode="clip")
  return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x by the angles from `rotary_angles` (rotate-half layout: dimension j pairs with j + H/2).

  Args:
    x: [B, T, N, H].
    cos, sin: [B, T, 1, H // 2].

  Returns:
    [B, T, N, H] in x.dtype.
  """
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
