"""The learner's losses against values computed by hand in numpy on small inputs."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from o1jax.learn import ppo


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def test_token_log_probs():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 4, 6)).astype(np.float32) * 3
  tokens = np.array([[1, 5, 0, 2], [3, 3, 4, 1]], np.int32)
  got = np.asarray(ppo.token_log_probs(jnp.asarray(logits), jnp.asarray(tokens)))
  lp = np_log_softmax(logits)
  expected = np.zeros((2, 4))
  for b in range(2):
    for t in range(3):
      expected[b, t] = lp[b, t, tokens[b, t + 1]]
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_ppo_loss_by_hand():
  """Row 0 (A = +2): ratios e^0.1 = 1.105 (inside the clip) and e^0.5 = 1.649 (clipped to 1.2), mask keeps
  both: -(mean(min(1.105 * 2, 1.105 * 2), min(1.649 * 2, 1.2 * 2))) = -(2.2103 + 2.4) / 2.
  Row 1 (A = -1): ratios e^-0.5 = 0.607 (clipped to 0.8: min(-0.607, -0.8) = -0.8) and a masked position."""
  log_probs = np.array([[-1.0, -0.5, 0.0], [-2.0, -1.0, 0.0]], np.float32)
  behaviour = np.array([[-1.1, -1.0, 0.0], [-1.5, -3.0, 0.0]], np.float32)
  mask = np.array([[True, True, False], [True, False, False]])
  advantage = np.array([2.0, -1.0], np.float32)
  loss, stats = ppo.ppo_loss(jnp.asarray(log_probs), jnp.asarray(behaviour), jnp.asarray(advantage),
                             jnp.asarray(mask), clip=0.2)
  r = np.exp(log_probs - behaviour)
  row0 = -(min(r[0, 0] * 2, np.clip(r[0, 0], 0.8, 1.2) * 2) + min(r[0, 1] * 2, 1.2 * 2)) / 2
  row1 = -min(r[1, 0] * -1, np.clip(r[1, 0], 0.8, 1.2) * -1)
  np.testing.assert_allclose(np.asarray(loss), [row0, row1], rtol=1e-6)
  assert math.isclose(row1, 0.8, rel_tol=1e-6)
  np.testing.assert_allclose(float(stats["ratio_mean"]), (r[0, 0] + r[0, 1] + r[1, 0]) / 3, rtol=1e-6)
  np.testing.assert_allclose(float(stats["clip_fraction"]), 2 / 3, rtol=1e-6)   # 1.649 and 0.607 are outside


def test_the_ratio_of_an_unchanged_policy_is_one():
  log_probs = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32) - 2)
  mask = jnp.ones((3, 5), bool)
  loss, stats = ppo.ppo_loss(log_probs, log_probs, jnp.asarray([1.0, -0.5, 2.0]), mask)
  assert float(stats["ratio_mean"]) == 1.0 and float(stats["clip_fraction"]) == 0.0
  np.testing.assert_allclose(np.asarray(loss), [-1.0, 0.5, -2.0], rtol=1e-6)   # -A when the ratio is 1
  _, changed = ppo.ppo_loss(log_probs + 0.3, log_probs, jnp.asarray([1.0, -0.5, 2.0]), mask)
  assert abs(float(changed["ratio_mean"]) - math.exp(0.3)) < 1e-5


def test_next_token_loss():
  log_probs = np.array([[-1.0, -3.0, -9.0]], np.float32)
  mask = np.array([[True, True, False]])
  np.testing.assert_allclose(np.asarray(ppo.next_token_loss(jnp.asarray(log_probs), jnp.asarray(mask))), [2.0])


def test_rating_losses_by_hand():
  pos = np.array([2.0, -1.0, 30.0], np.float32)
  neg = np.array([0.5, 1.0, -30.0], np.float32)
  value = np.array([math.log(0.7), -50.0, 0.0], np.float32)   # -50 clamps to log 1e-6
  p = np.exp(np.clip(value.astype(np.float64), math.log(1e-6), 0))
  pair = np_log_softmax(np.stack([pos, neg], -1))
  softmax = -(p * pair[:, 0] + (1 - p) * pair[:, 1])
  np.testing.assert_allclose(np.asarray(ppo.rating_loss(jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(value))),
                             softmax, rtol=1e-5, atol=1e-7)
  sig = lambda x: 1 / (1 + np.exp(-x.astype(np.float64)))  # noqa: E731
  bce = lambda x, t: -(t * np.log(sig(x)) + (1 - t) * np.log(1 - sig(x)))  # noqa: E731
  expected = 0.5 * (bce(pos, p) + bce(neg, 1 - p))
  got = np.asarray(ppo.rating_loss(jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(value), kind="bce"))
  np.testing.assert_allclose(got[:2], expected[:2], rtol=1e-5)
  assert np.isfinite(got[2]) and got[2] < 1e-6   # large logits stay finite (stable form)
  with pytest.raises(ValueError, match="rating loss 'mse'"):
    ppo.rating_loss(jnp.asarray(pos), jnp.asarray(neg), jnp.asarray(value), kind="mse")


def test_pairwise_rating_loss_by_hand():
  hp, hn, lp, ln = (np.array(v, np.float32) for v in ([1.0, 0.0], [0.0, 0.0], [0.0, 2.0], [1.0, 0.0]))
  margin = (hp - hn) - (lp - ln)   # [2, -2]
  expected = np.log1p(np.exp(-margin.astype(np.float64)))
  got = ppo.pairwise_rating_loss(*(jnp.asarray(a) for a in (hp, hn, lp, ln)))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)


def test_kl_to_reference():
  log_probs = np.array([[-1.0, -2.0, 0.0]], np.float32)
  reference = np.array([[-1.5, -1.0, 0.0]], np.float32)
  mask = np.array([[True, True, False]])
  r = reference - log_probs
  expected = (np.exp(r[0, :2]) - r[0, :2] - 1).mean()
  got = ppo.kl_to_reference(jnp.asarray(log_probs), jnp.asarray(reference), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), [expected], rtol=1e-6)
  assert float(ppo.kl_to_reference(jnp.asarray(log_probs), jnp.asarray(log_probs), jnp.asarray(mask))[0]) == 0.0
