"""Next-token training: the loss against transformers' own, LoRA mode against its merged weights, sharded steps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference_models as ref
from models import hf_io
from o1jax import adapter, parallel
from o1jax.learn import lm


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """(transformers model, our Decoder) with the same random weights; untied head."""
  directory = tmp_path_factory.mktemp("llama")
  reference = ref.build("llama", directory, tied=False, seed=3)
  return reference, hf_io.load_pretrained(str(directory), dtype="float32")


def _batch(vocab: int, seed: int = 0):
  """Two right-padded rows (lengths 9 and 6) with a loss mask over part of each."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (2, 10)).astype(np.int32)
  valid = np.zeros((2, 10), bool)
  valid[0, :9] = True
  valid[1, :6] = True
  tokens[~valid] = 0
  loss_mask = np.zeros((2, 10), bool)
  loss_mask[0, 2:8] = True   # targets tokens[0, 3:9]
  loss_mask[1, 0:5] = True   # targets tokens[1, 1:6]
  return {"tokens": tokens, "valid": valid, "loss_mask": loss_mask}


def test_loss_equals_transformers(llama):
  """Our masked next-token loss equals transformers' causal-LM loss with the same targets (-100 elsewhere)."""
  reference, model = llama
  batch = _batch(model.config.vocab_size)
  full = lm.Model(config=model.config, base_vocab=model.config.vocab_size, lora=None)
  logits = full.logits({}, model.weights(), jnp.asarray(batch["tokens"]), jnp.asarray(batch["valid"]))
  ours, metrics = lm.next_token_loss(logits, jnp.asarray(batch["tokens"]), jnp.asarray(batch["loss_mask"]))

  labels = np.full(batch["tokens"].shape, -100)
  shifted = np.zeros_like(batch["loss_mask"])
  shifted[:, 1:] = batch["loss_mask"][:, :-1]     # transformers shifts labels itself: label t is predicted at t-1
  labels[shifted] = batch["tokens"][shifted]
  with torch.no_grad():
    out = reference(torch.as_tensor(batch["tokens"], dtype=torch.long),
                    attention_mask=torch.as_tensor(batch["valid"], dtype=torch.long),
                    labels=torch.as_tensor(labels, dtype=torch.long))
  assert float(metrics["tokens"]) == 11
  np.testing.assert_allclose(float(ours), out.loss.item(), rtol=1e-5)


def test_loss_by_hand():
  """Two positions of a 3-token vocabulary, computed on paper."""
  logits = jnp.log(jnp.asarray([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]]]))
  tokens = jnp.asarray([[0, 1, 2]])
  mask = jnp.asarray([[True, True, False]])
  loss, metrics = lm.next_token_loss(logits, tokens, mask)
  np.testing.assert_allclose(float(loss), -(np.log(0.25) + np.log(0.7)) / 2, rtol=1e-6)
  assert float(metrics["accuracy"]) == 0.5   # position 0 predicts 0 (target 1), position 1 predicts 2 (target 2)


@pytest.mark.parametrize("tied", [False, True])
def test_lora_mode_equals_its_merged_weights(tied, tmp_path):
  """The two-part head of LoRA mode (frozen base rows + trainable new rows) equals a plain forward of the merged
  weights, and only the adapter and the new rows get gradients."""
  reference = ref.build("llama", tmp_path, tied=tied, seed=5)
  del reference
  model = hf_io.load_pretrained(str(tmp_path), dtype="float32")
  base_vocab = model.config.vocab_size - 4          # pretend the last 4 ids are new special tokens
  spec = lm.Model(config=model.config, base_vocab=base_vocab,
                  lora=adapter.LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "down")))
  frozen, trainable = spec.split(model.weights(), jax.random.key(0))
  # Give the adapter non-zero b so that merging changes the weights.
  trainable["adapter"] = jax.tree.map(lambda a: a + 0.05, trainable["adapter"])
  batch = _batch(model.config.vocab_size)
  tokens, valid = jnp.asarray(batch["tokens"]), jnp.asarray(batch["valid"])
  got = spec.logits(frozen, trainable, tokens, valid)
  merged = spec.merged(frozen, trainable)
  plain = lm.Model(config=model.config, base_vocab=model.config.vocab_size, lora=None)
  want = plain.logits({}, merged, tokens, valid)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  assert merged["embed"].shape == model.weights()["embed"].shape

  def loss(t):
    return lm.next_token_loss(spec.logits(frozen, t, tokens, valid), tokens, jnp.asarray(batch["loss_mask"]))[0]
  grads = jax.grad(loss)(trainable)
  assert float(jnp.abs(grads["new_rows"]).sum()) > 0
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["adapter"]))


def test_sharded_step_equals_one_device_and_learns(llama):
  """A data-parallel step over 8 devices equals the 1-device step, and repeated steps on one batch lower its loss."""
  _, model = llama
  spec = lm.Model(config=model.config, base_vocab=model.config.vocab_size - 3,
                  lora=adapter.LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down")))
  optimizer = lm.OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10).make()
  rng = np.random.default_rng(1)
  batch = {"tokens": rng.integers(1, model.config.vocab_size, (8, 12)).astype(np.int32),
           "valid": np.ones((8, 12), bool), "loss_mask": np.ones((8, 12), bool)}
  batch["loss_mask"][:, -1] = False

  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices=devices)
    frozen, trainable = spec.split(model.weights(), jax.random.key(0))
    state = lm.init_state(trainable, optimizer)
    step = lm.make_train_step(spec, optimizer, mesh)
    losses = []
    for _ in range(4):
      state, metrics = step(frozen, state, parallel.shard_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
    results.append((losses, jax.device_get(state["trainable"])))
  (one, trained_one), (eight, trained_eight) = results
  np.testing.assert_allclose(one, eight, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), trained_one, trained_eight)
  assert one[-1] < one[0] - 0.05, one


def test_optimizer_schedule_warms_up_then_decays():
  config = lm.OptimizerConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, final_fraction=0.1)
  schedule = config.schedule()
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 5, 10, 110)], [0.0, 0.5, 1.0, 0.1], atol=1e-6)
  assert dataclasses.replace(config, warmup_steps=0).schedule()(0) == pytest.approx(1.0)


def test_optimizer_schedule_restarts_a_cycle():
  short = lm.OptimizerConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, final_fraction=0.1)
  extended = dataclasses.replace(short, total_steps=310, restarts=(110,))
  first, second = short.schedule(), extended.schedule()
  # Before the restart: the short run's schedule; after it, warmup from 0 and a cosine over the 200 steps left.
  np.testing.assert_allclose([float(second(s)) for s in (0, 5, 60, 109)], [float(first(s)) for s in (0, 5, 60, 109)])
  np.testing.assert_allclose([float(second(s)) for s in (110, 115, 120, 215, 310)],  # cosine: 120 -> 310
                             [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1], atol=1e-6)
  for restarts in ((0,), (310,), (200, 150)):
    with pytest.raises(ValueError, match="must rise strictly inside"):
      dataclasses.replace(short, total_steps=310, restarts=restarts).schedule()


def test_frozen_layers_stop_the_backward_pass(llama):
  """frozen_layers=1 leaves the logits unchanged, zeroes the bottom layer's gradient and keeps the top layer's."""
  _, model = llama
  batch = _batch(model.config.vocab_size)
  tokens, valid, mask = (jnp.asarray(batch[k]) for k in ("tokens", "valid", "loss_mask"))
  results = {}
  for frozen_layers in (0, 1):
    spec = lm.Model(config=model.config, base_vocab=model.config.vocab_size, lora=None,
                    frozen_layers=frozen_layers)
    loss = lambda w: lm.next_token_loss(spec.logits({}, w, tokens, valid), tokens, mask)[0]
    results[frozen_layers] = jax.value_and_grad(loss)(model.weights())
  (loss_all, grads_all), (loss_top, grads_top) = results[0], results[1]
  np.testing.assert_allclose(float(loss_all), float(loss_top), rtol=1e-6)
  for name, g in grads_top["layers"].items():
    assert float(jnp.abs(g[0]).max()) == 0.0, name
    assert float(jnp.abs(grads_all["layers"][name][0]).max()) > 0.0, name
    np.testing.assert_allclose(np.asarray(g[1:]), np.asarray(grads_all["layers"][name][1:]), atol=1e-6)
  assert float(jnp.abs(grads_top["embed"]).max()) == 0.0      # the input embedding is below the frozen layer
  assert float(jnp.abs(grads_top["head"]).max()) > 0.0       # the (untied) head is above it
  L = model.config.num_layers
  spec = lm.Model(config=model.config, base_vocab=model.config.vocab_size, lora=None, frozen_layers=L + 1)
  with pytest.raises(ValueError, match=f"frozen_layers={L + 1} must be in \\[0, {L}\\]"):
    spec.logits({}, model.weights(), tokens, valid)


@pytest.mark.parametrize("tied", [False, True])
def test_rating_loss_by_hand(tied, tmp_path):
  """The rating loss is the two-way cross-entropy of the full logits' rating columns at each row's
  <start_of_rating> position, computed here in numpy; a row whose target is no rating token does not count."""
  ref.build("llama", tmp_path, tied=tied, seed=7)
  model = hf_io.load_pretrained(str(tmp_path), dtype="float32")
  V = model.config.vocab_size
  positive, negative = V - 2, V - 1
  spec = lm.Model(config=model.config, base_vocab=V - 4, lora=adapter.LoraConfig(rank=2, alpha=4.0, targets=("q",)))
  frozen, trainable = spec.split(model.weights(), jax.random.key(0))
  trainable["adapter"] = jax.tree.map(lambda a: a + 0.05, trainable["adapter"])
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, V - 4, (3, 8)).astype(np.int32)
  valid = np.ones((3, 8), bool)
  valid[1, 6:] = False
  loss_mask = np.zeros((3, 8), bool)
  tokens[0, 5], loss_mask[0, 4] = positive, True     # rated positive at position 4
  tokens[1, 5], loss_mask[1, 4] = negative, True     # rated negative at position 4
  loss_mask[2, 3] = True                             # an ordinary token target: left out
  batch = {"tokens": jnp.asarray(tokens), "valid": jnp.asarray(valid), "loss_mask": jnp.asarray(loss_mask)}
  loss, metrics = lm.rating_loss(spec, frozen, trainable, batch, positive, negative)

  logits = np.asarray(spec.logits(frozen, trainable, batch["tokens"], batch["valid"]), np.float64)
  def log_p(row, label):
    pair = logits[row, 4, [positive, negative]]
    return pair[label] - np.log(np.exp(pair).sum())
  want = -(log_p(0, 0) + log_p(1, 1)) / 2
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(metrics["tokens"]) == 2
  assert float(metrics["accuracy"]) == ((log_p(0, 0) > np.log(0.5)) + (log_p(1, 1) > np.log(0.5))) / 2
  np.testing.assert_allclose(np.asarray(spec.token_logits(frozen, trainable, spec.hidden(
      frozen, trainable, batch["tokens"], batch["valid"])[:, 4], (3, positive))), logits[:, 4, [3, positive]],
      atol=1e-5)
  with pytest.raises(ValueError, match="not all in the vocabulary"):
    spec.token_logits(frozen, trainable, jnp.zeros((1, model.config.d_model)), (V,))
