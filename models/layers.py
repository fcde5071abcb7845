"""Building blocks of both decoder families as pure functions over arrays.

Legend: B batch, T time, D model dim, F feed-forward dim, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float, plus_one: bool) -> jax.Array:
  """RMSNorm with float32 statistics.

  Args:
    x: [..., D] activations.
    scale: [D] learned scale.
    eps: added to the mean square.
    plus_one: Gemma multiplies by (1 + scale) in float32 before casting back; Llama casts the normalised
      activations back to x.dtype first and then multiplies by scale. The order matters in bfloat16.

  Returns:
    [..., D] in x.dtype.
  """
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  if plus_one:
    return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
  return scale.astype(x.dtype) * normed.astype(x.dtype)


def gated_mlp(x: jax.Array, gate_up: jax.Array, down: jax.Array, *, gelu: bool) -> jax.Array:
  """SwiGLU (Llama) or GeGLU with tanh-approximated gelu (Gemma-2).

  Args:
    x: [B, T, D].
    gate_up: [D, 2F], the gate and up projections side by side (`fuse_projections`). One [D, 2F] product
      beats two [D, F] ones on XLA:CPU, which would run the two independent dots on one thread each.
    down: [F, D].
    gelu: use gelu(tanh approximation) instead of silu on the gate.

  Returns:
    [B, T, D].
  """
  g, u = jnp.split(jnp.einsum("BTD,DF->BTF", x, gate_up), 2, axis=-1)
  activated = jax.nn.gelu(g, approximate=True) if gelu else jax.nn.silu(g)
  return jnp.einsum("BTF,FD->BTD", activated * u, down)


def embed(tokens: jax.Array, table: jax.Array, *, dtype, scale_by_sqrt_dim: bool) -> jax.Array:
  """Token embedding lookup.

  Args:
    tokens: [B, T] int32.
    table: [V, D].
    dtype: activation dtype.
    scale_by_sqrt_dim: Gemma multiplies by sqrt(D), the constant first rounded to the activation dtype.

  Returns:
    [B, T, D] in dtype.
  """
  x = jnp.take(table, tokens, axis=0).astype(dtype)
  if scale_by_sqrt_dim:
    x = x * jnp.asarray(table.shape[-1] ** 0.5, dtype=dtype)
  return x


def unembed(x: jax.Array, table: jax.Array, *, transposed: bool, final_softcap: float | None) -> jax.Array:
  """Vocabulary head with optional final softcap, returning float32 logits.

  Args:
    x: [..., D] final-normed activations.
    table: [V, D] when tied (transposed=True), else [D, V].
    final_softcap: Gemma-2's tanh(logits / c) * c, applied in float32.

  Returns:
    [..., V] float32.
  """
  eq = "...D,VD->...V" if transposed else "...D,DV->...V"
  logits = jnp.einsum(eq, x, table.astype(x.dtype), preferred_element_type=jnp.float32)
  if final_softcap is not None:
    logits = jnp.tanh(logits / final_softcap) * final_softcap
  return logits
