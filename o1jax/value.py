"""The one value read: LLaMA-O1's value head is a two-way softmax over the two rating logits.

Legend: V vocab; `...` any leading axes (B rows, or B rows x T positions).

A node's value is read from the logits after `...<end_of_thought><start_of_rating>`: a log-softmax over the logits
of `<positive_rating>` and `<negative_rating>` only (every other token, `<unknown_rating>` included, is left out),
and the value is log p(positive), so it lies in (-inf, 0]. The scorer (`sampling.sampler.Sampler.score`) and the
rating loss (`learn.lm.rating_loss`) both read it here, so that the search rates a step with exactly the number
the learner trains.

  values = value(logits, positive_id, negative_id)                  # [B, V] -> [B], log p(positive)
  log_p = rating_log_probs(logits, positive_id, negative_id)        # [B, V] -> [B, 2], (positive, negative)

The two logits are cast to float32 before the softmax: bfloat16 logits carry 8 bits of mantissa, and a value
near 0 (p(positive) near 1) would round away in bfloat16 arithmetic. The log-softmax subtracts the larger logit
first, so logits of any size (1e4, -1e4) give finite values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rating_log_probs(logits: jax.Array, positive_id: int, negative_id: int) -> jax.Array:
  """Two-way log-softmax over the rating logits: log p(positive) and log p(negative).

  Args:
    logits: [..., V] logits of any float dtype (V may be 2, e.g. logits computed for the two rating ids only:
      then pass the columns, 0 and 1).
    positive_id, negative_id: the ids (columns of `logits`) of `<positive_rating>` and `<negative_rating>`.

  Returns:
    [..., 2] float32: [..., 0] = log p(positive), [..., 1] = log p(negative); exp of a row sums to 1.
  """
  pair = jnp.stack([logits[..., positive_id], logits[..., negative_id]], axis=-1).astype(jnp.float32)
  return jax.nn.log_softmax(pair, axis=-1)


def value(logits: jax.Array, positive_id: int, negative_id: int) -> jax.Array:
  """A node's value: log p(positive) of `rating_log_probs`.

  Args:
    logits: [..., V] logits read after `<start_of_rating>`.
    positive_id, negative_id: the rating token ids.

  Returns:
    [...] float32 values, <= 0.
  """
  return rating_log_probs(logits, positive_id, negative_id)[..., 0]
