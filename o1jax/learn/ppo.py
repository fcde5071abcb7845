"""The learner's losses, as plain functions of log-probs and rating logits: PPO, next-token, rating, KL.

Legend: B rows, T positions. A row is one search node (o1jax/learn/experience.py): its policy prompt and its
step, and the logits of the two rating tokens read after the step. Position t of a row predicts tokens[t + 1];
`mask[b, t]` marks the positions whose next token is one the policy wrote for the step (its tokens and its
`<end_of_thought>`).

  - PPO's clipped surrogate over the step's tokens: ratio = exp(log pi(a) - log pi_behaviour(a)), where the
    behaviour log-probs are the ones recorded when the step was sampled (LLaMA-O1 recomputes its "old" log-probs
    from the model being trained, so its ratio is always 1; here it is 1 only while the model has not changed).
    Per row: -mean over its tokens of min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A).
  - next-token cross-entropy over the same tokens (the supervised mode: the best traces of a tree).
  - rating loss on the two rating logits against the target p = exp(value target) (clamped to [eps, 1]):
      "softmax": two-way softmax cross-entropy, -(p log q+ + (1 - p) log q-) with q the softmax over the two
                 logits (the default; the same two-way read as the search's value);
      "bce":     LLaMA-O1's independent sigmoids: the mean of BCE(logit+, p) and BCE(logit-, 1 - p);
      "pairwise": rStar-Math's preference loss on sibling pairs, -log sigmoid(s_high - s_low), s = logit+ -
                 logit- (the log-odds of a positive rating) of the highest- and the lowest-valued sibling.
  - KL to a reference policy (optional): the k3 estimator exp(r) - r - 1 with r = log pi_ref - log pi, per token,
    whose expectation under pi is KL(pi || pi_ref) and which is never negative.
Every function returns per-row values so that the caller weights them (replay importance weights) and uses
their absolute values as new priorities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from o1jax import value

RATING_LOSSES = ("softmax", "bce", "pairwise")


def token_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """[B, T] log p(tokens[b, t + 1] | tokens[b, :t + 1]) in float32 (0 at the last position).

  Args:
    logits: [B, T, V] the model's logits at every position.
    tokens: [B, T] int32.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  picked = jnp.take_along_axis(log_probs, nxt[..., None], axis=-1)[..., 0]
  return picked.at[:, -1].set(0.0)


def _row_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def ppo_loss(log_probs: jax.Array, behaviour: jax.Array, advantage: jax.Array, mask: jax.Array, *,
             clip: float = 0.2) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-row PPO clipped surrogate (to minimise) and its statistics.

  Args:
    log_probs: [B, T] under the model being trained; behaviour: [B, T] recorded at sampling time.
    advantage: [B] one advantage per row (every token of the step shares it).
    mask: [B, T] bool, the step's positions.

  Returns:
    loss: [B]; stats: ratio_mean, ratio_max, clip_fraction (over masked tokens), approx_kl (mean of
    behaviour - log_probs).
  """
  ratio = jnp.exp(log_probs - behaviour)
  a = advantage[:, None]
  surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * a)
  loss = -_row_mean(surrogate, mask)
  m = mask.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(m), 1.0)
  clipped = (jnp.abs(ratio - 1.0) > clip).astype(jnp.float32)
  stats = dict(ratio_mean=jnp.sum(ratio * m) / count, ratio_max=jnp.max(jnp.where(mask, ratio, 0.0)),
               clip_fraction=jnp.sum(clipped * m) / count, approx_kl=jnp.sum((behaviour - log_probs) * m) / count)
  return loss, stats


def next_token_loss(log_probs: jax.Array, mask: jax.Array) -> jax.Array:
  """[B] mean cross-entropy of the step's tokens (the supervised mode)."""
  return -_row_mean(log_probs, mask)


def rating_targets(value_target: jax.Array, eps: float = 1e-6) -> jax.Array:
  """[B] target p(positive) = exp(value), the value clamped to [log eps, 0] (as LLaMA-O1 clamps it)."""
  return jnp.exp(jnp.clip(value_target.astype(jnp.float32), jnp.log(eps), 0.0))


def rating_loss(positive_logit: jax.Array, negative_logit: jax.Array, value_target: jax.Array, *,
                kind: str = "softmax", eps: float = 1e-6) -> jax.Array:
  """[B] rating loss of each row ("softmax" or "bce"; "pairwise" is `pairwise_rating_loss`)."""
  p = rating_targets(value_target, eps)
  pos, neg = positive_logit.astype(jnp.float32), negative_logit.astype(jnp.float32)
  if kind == "softmax":
    pair = value.rating_log_probs(jnp.stack([pos, neg], axis=-1), 0, 1)   # the search's own value read
    return -(p * pair[..., 0] + (1.0 - p) * pair[..., 1])
  if kind == "bce":
    def bce(logit, target):  # binary cross-entropy with logits, stable for large |logit|
      return jnp.maximum(logit, 0.0) - logit * target + jnp.log1p(jnp.exp(-jnp.abs(logit)))
    return 0.5 * (bce(pos, p) + bce(neg, 1.0 - p))
  raise ValueError(f"rating loss {kind!r}; expected 'softmax' or 'bce' (pairs go to pairwise_rating_loss).")


def pairwise_rating_loss(high_positive: jax.Array, high_negative: jax.Array, low_positive: jax.Array,
                         low_negative: jax.Array) -> jax.Array:
  """[B] -log sigmoid(s_high - s_low), s = positive logit - negative logit of each sibling of a pair."""
  margin = (high_positive - high_negative) - (low_positive - low_negative)
  return jax.nn.softplus(-margin.astype(jnp.float32))


def kl_to_reference(log_probs: jax.Array, reference: jax.Array, mask: jax.Array) -> jax.Array:
  """[B] mean over the step's tokens of the k3 estimate of KL(pi || pi_ref)."""
  r = reference - log_probs
  return _row_mean(jnp.exp(r) - r - 1.0, mask)
