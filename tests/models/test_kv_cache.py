"""Prefill + token-by-token decode through the KV cache equals one full forward, padding included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decoder, presets

TOLERANCE = 1e-5


def log_softmax(x):
  return np.asarray(jax.nn.log_softmax(np.asarray(x, np.float32), axis=-1))


@pytest.mark.parametrize("preset", ["tiny_gemma2", "tiny_llama"])
def test_prefill_then_decode_equals_full_forward(preset):
  config = presets.get(preset)
  model = decoder.Decoder(config, rngs=None, weights=decoder.init_weights(config, jax.random.key(3), scale=0.2))
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (3, 16)).astype(np.int32)
  full = log_softmax(model(tokens))

  cache = model.init_cache(batch_size=3, num_slots=20)
  prefix = 7  # longer than the tiny Gemma window (5), so decode steps meet both layer kinds
  logits, cache = model.extend(cache, tokens[:, :prefix])
  stepped = [log_softmax(logits)]
  for t in range(prefix, tokens.shape[1]):
    logits, cache = model.extend(cache, tokens[:, t:t + 1])
    stepped.append(log_softmax(logits))
  stepped = np.concatenate(stepped, axis=1)
  assert int(cache.end) == 16
  np.testing.assert_array_less(np.abs(stepped - full).max(), TOLERANCE)


@pytest.mark.parametrize("preset", ["tiny_gemma2", "tiny_llama"])
def test_right_padded_batch_equals_rows_alone(preset):
  """Rows of lengths 9, 4 and 6, padded to 9 in one prefill, then 5 decode steps: each row equals itself alone."""
  config = presets.get(preset)
  model = decoder.Decoder(config, weights=decoder.init_weights(config, jax.random.key(4), scale=0.2))
  rng = np.random.default_rng(1)
  lengths = [9, 4, 6]
  rows = [rng.integers(0, config.vocab_size, n + 5).astype(np.int32) for n in lengths]

  batch = np.zeros((3, 9), np.int32)
  valid = np.zeros((3, 9), bool)
  for i, (row, n) in enumerate(zip(rows, lengths)):
    batch[i, :n], valid[i, :n] = row[:n], True
  cache = model.init_cache(3, 16)
  logits, cache = model.extend(cache, batch, valid)
  batched = [[log_softmax(logits[i, n - 1])] for i, n in enumerate(lengths)]
  for step in range(5):
    next_tokens = np.array([[row[n + step]] for row, n in zip(rows, lengths)], np.int32)
    logits, cache = model.extend(cache, next_tokens)
    for i in range(3):
      batched[i].append(log_softmax(logits[i, 0]))

  for i, (row, n) in enumerate(zip(rows, lengths)):
    alone = log_softmax(model(row[None, :n + 5]))[0, n - 1:n + 5]
    np.testing.assert_array_less(np.abs(np.stack(batched[i]) - alone).max(), TOLERANCE)


def test_extend_rejects_a_block_that_does_not_fit():
  config = presets.get("tiny_llama")
  model = decoder.Decoder(config)
  cache = model.init_cache(1, 4)
  with pytest.raises(ValueError, match="does not fit"):
    model.extend(cache, np.zeros((1, 5), np.int32))


@pytest.mark.parametrize("length", [1, 7, 128, 300])
def test_positions_from_mask_equal_a_running_count(length):
  """Positions across several 128-token chunks (the count runs on over chunk borders), any mask, per-row start."""
  rng = np.random.default_rng(length)
  valid = rng.random((3, length)) < 0.7
  start = np.array([0, 5, 1000], np.int32)
  expected = np.where(valid, start[:, None] + np.cumsum(valid, axis=1) - 1, -1)
  np.testing.assert_array_equal(np.asarray(decoder.positions_from_mask(jnp.asarray(valid), jnp.asarray(start))),
                                expected)
  np.testing.assert_array_equal(np.asarray(decoder.positions_from_mask(jnp.asarray(valid))),
                                np.where(valid, np.cumsum(valid, axis=1) - 1, -1))
