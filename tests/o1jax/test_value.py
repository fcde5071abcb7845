"""The value read: a two-way log-softmax over the rating logits, against numpy written out by hand."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from o1jax import value

POSITIVE, NEGATIVE = 5, 2


def _by_hand(logits: np.ndarray) -> np.ndarray:
  """[..., V] -> [..., 2]: log p = x - log(exp(x_pos) + exp(x_neg)) in float64, the larger logit taken out first
  (log(e^a + e^b) = m + log(e^(a-m) + e^(b-m)), m = max(a, b)) so that exp never overflows."""
  pair = np.stack([logits[..., POSITIVE], logits[..., NEGATIVE]], axis=-1).astype(np.float64)
  top = pair.max(axis=-1, keepdims=True)
  return pair - (top + np.log(np.exp(pair - top).sum(axis=-1, keepdims=True)))


def _logits(rows):
  """[len(rows), 8] logits, every column but the two rating ones large, so that a read over the whole vocabulary
  (or over the wrong columns) gives other numbers."""
  logits = np.full((len(rows), 8), 40.0, np.float32)
  for i, (positive, negative) in enumerate(rows):
    logits[i, POSITIVE], logits[i, NEGATIVE] = positive, negative
  return logits


def test_two_way_log_softmax_by_hand():
  logits = _logits([(0.0, 0.0), (2.0, -1.0), (-3.0, 4.5), (10.0, 10.0)])
  got = np.asarray(value.rating_log_probs(jnp.asarray(logits), POSITIVE, NEGATIVE))
  assert got.shape == (4, 2) and got.dtype == np.float32
  # Row 0: equal logits, p = 1/2 each. Row 1: log p(pos) = -log(1 + e^-3) = -0.048587.
  np.testing.assert_allclose(got[0], [np.log(0.5), np.log(0.5)], rtol=1e-6)
  np.testing.assert_allclose(got[1, 0], -np.log1p(np.exp(-3.0)), rtol=1e-6)
  np.testing.assert_allclose(got, _by_hand(logits), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.exp(got).sum(axis=-1), 1.0, rtol=1e-6)
  values = np.asarray(value.value(jnp.asarray(logits), POSITIVE, NEGATIVE))
  assert values.shape == (4,)
  np.testing.assert_array_equal(values, got[:, 0])
  assert np.all(values <= 0.0)


def test_large_logits_stay_finite():
  """Logits of 1e4: exp(1e4) overflows float32 (and float64); the read subtracts the larger logit first."""
  logits = _logits([(1e4, 1e4 - 2.0), (-1e4, 1e4), (3e4, -3e4)])
  got = np.asarray(value.rating_log_probs(jnp.asarray(logits), POSITIVE, NEGATIVE))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got[0], [-np.log1p(np.exp(-2.0)), -2.0 - np.log1p(np.exp(-2.0))], rtol=1e-6)
  np.testing.assert_allclose(got[1], [-2e4, 0.0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, _by_hand(logits), rtol=1e-6, atol=1e-6)


def test_bfloat16_logits_are_read_in_float32():
  """bf16 logits 4 and -4: log p(pos) = -log(1 + e^-8) = -3.354e-4. In bf16 arithmetic 1 + 3.4e-4 rounds to 1 (its
  spacing near 1 is 2^-7) and the value to 0; cast to float32 first, the value keeps its digits."""
  logits = _logits([(4.0, -4.0), (0.5, 0.25)]).astype(ml_dtypes.bfloat16)
  got = value.value(jnp.asarray(logits), POSITIVE, NEGATIVE)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _by_hand(logits.astype(np.float32))[:, 0], rtol=1e-3)
  assert float(got[0]) == pytest.approx(-np.log1p(np.exp(-8.0)), rel=1e-3)
  bf16 = jnp.asarray(logits)
  in_bf16 = jax.nn.log_softmax(jnp.stack([bf16[:, POSITIVE], bf16[:, NEGATIVE]], axis=-1), axis=-1)
  assert in_bf16.dtype == jnp.bfloat16 and float(in_bf16[0, 0]) == 0.0   # what the cast saves


def test_leading_axes_and_two_column_logits():
  """[B, T, V] logits read per position; [..., 2] logits of the two rating ids only (as the rating loss computes
  them) are read with columns 0 and 1."""
  rng = np.random.default_rng(0)
  logits = (5 * rng.standard_normal((2, 3, 8))).astype(np.float32)
  got = np.asarray(value.value(jnp.asarray(logits), POSITIVE, NEGATIVE))
  assert got.shape == (2, 3)
  np.testing.assert_allclose(got, _by_hand(logits)[..., 0], rtol=1e-6, atol=1e-6)
  pair = logits[..., [POSITIVE, NEGATIVE]]
  np.testing.assert_array_equal(np.asarray(value.rating_log_probs(jnp.asarray(pair), 0, 1)),
                                np.asarray(value.rating_log_probs(jnp.asarray(logits), POSITIVE, NEGATIVE)))
