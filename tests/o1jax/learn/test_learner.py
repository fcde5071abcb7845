"""The sharded PPO + rating step: the same loss and parameters on every mesh shape as on one device, really sharded
parameters, gradient accumulation, and a PPO ratio of 1 until the model changes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import decoder, presets
from o1jax import adapter, parallel
from o1jax.learn import experience, learner, lm

T, M = 24, 6
POSITIVE, NEGATIVE = 60, 61


def tiny(lora: bool, tie: bool = False):
  config = presets.get("tiny_llama", vocab_size=64, tie_embeddings=tie)
  weights = decoder.init_weights(config, jax.random.key(0), scale=0.2)
  model = lm.Model(config=config, base_vocab=56, lora=adapter.LoraConfig(rank=2, alpha=4.0) if lora else None)
  frozen, trainable = model.split(weights, jax.random.key(1))
  if lora:  # a non-zero adapter, so that the b factors get gradients of both signs
    trainable = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), trainable)
  return model, frozen, trainable


def batch(rows=8, seed=0):
  """Rows shaped like experience: a prompt, M - 1 step tokens and <eot>, then <sor>, right-padded."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 56, (rows, T)).astype(np.int32)
  valid = np.zeros((rows, T), bool)
  loss_mask = np.zeros((rows, T), bool)
  rating_at = np.zeros(rows, np.int32)
  for r in range(rows):
    prompt = 6 + r % 5
    targets = 2 + r % (M - 1)
    length = prompt + targets + 1
    valid[r, :length] = True
    loss_mask[r, prompt - 1:prompt - 1 + targets] = True
    rating_at[r] = length - 1
  return {"tokens": tokens, "valid": valid, "loss_mask": loss_mask,
          "behaviour": (-rng.random((rows, T)) * 3).astype(np.float32) * loss_mask, "rating_at": rating_at,
          "advantage": rng.standard_normal(rows).astype(np.float32),
          "value_target": np.log(rng.uniform(0.05, 1.0, rows)).astype(np.float32),
          "sft": rng.random(rows) < 0.5, "weight": rng.uniform(0.3, 1.0, rows).astype(np.float32)}


CONFIG = learner.LearnerConfig(max_targets=M)
EXPERIENCE = experience.ExperienceConfig(seq_len=T)


def run(model, frozen, trainable, mesh, config=CONFIG, steps=1, data=None, optimizer=None, reference=None):
  # SGD by default: its update is linear in the gradient, so parameters compare as closely as gradients do (Adam
  # divides by sqrt(v) and turns a rounding-level difference in a near-zero gradient into a full step).
  optimizer = optimizer or optax.sgd(0.5)
  step = learner.Learner(model, optimizer, mesh, config, EXPERIENCE, (POSITIVE, NEGATIVE))
  trainable = jax.tree.map(jnp.array, trainable)   # the step donates its state: every run gets its own copy
  frozen, state = step.place(frozen, lm.init_state(trainable, optimizer))
  metrics = []
  for i in range(steps):
    b = data or batch(seed=i)
    state, per_row, m = step.step(frozen, state, parallel.shard_batch(b, mesh), reference)
    metrics.append(jax.tree.map(np.asarray, m))
  return state, np.asarray(per_row), metrics


@pytest.mark.parametrize("lora", [False, True])
def test_every_mesh_shape_equals_one_device(lora):
  """One step on 8x1x1, 2x4x1 and 2x2x2 meshes gives the loss and parameters of the 1-device step within
  rtol 2e-5 / atol 2e-6 (sharded reductions sum in another order); the parameters really are sharded, and the
  optimizer state (AdamW's moments) follows them."""
  model, frozen, trainable = tiny(lora)
  one = parallel.make_mesh(devices=jax.devices()[:1])
  reference, ref_rows, ref_metrics = run(model, frozen, trainable, one)
  for shape in ((8, 1, 1), (2, 4, 1), (2, 2, 2)):
    mesh = parallel.make_mesh(*shape)
    state, rows, metrics = run(model, frozen, trainable, mesh)
    np.testing.assert_allclose(metrics[0]["loss"], ref_metrics[0]["loss"], rtol=2e-5)
    np.testing.assert_allclose(rows, ref_rows, rtol=2e-5, atol=2e-6)
    for a, b in zip(jax.tree.leaves(state["trainable"]), jax.tree.leaves(reference["trainable"])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state["trainable"])]
    if shape[1] > 1 or shape[2] > 1:
      assert any(any(axis is not None for axis in spec) for spec in specs), specs
    if not lora:
      q = state["trainable"]["layers"]["q"].sharding.spec
      assert q == jax.sharding.PartitionSpec(None, "fsdp" if shape[1] > 1 else None,
                                             "tensor" if shape[2] > 1 else None, None)
  mesh = parallel.make_mesh(2, 2, 2)
  state, _, _ = run(model, frozen, trainable, mesh, optimizer=optax.adamw(1e-3))
  if not lora:
    q = state["trainable"]["layers"]["q"].sharding.spec
    mu = state["opt_state"][0].mu["layers"]["q"].sharding.spec   # AdamW's first moment follows q
    assert mu == q == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


def test_the_ratio_is_one_until_the_model_changes():
  """Behaviour log-probs taken from the model itself: the first step's ratio is exactly 1 and nothing is clipped;
  after one update the same rows give another ratio."""
  model, frozen, trainable = tiny(lora=True)
  data = batch()
  hidden = model.hidden(frozen, trainable, jnp.asarray(data["tokens"]), jnp.asarray(data["valid"]))
  log_probs, _ = learner._target_log_probs(model, frozen, trainable, hidden, jnp.asarray(data["tokens"]),
                                           jnp.asarray(data["loss_mask"]), M)
  behaviour = np.zeros_like(data["behaviour"])
  for r in range(len(behaviour)):
    start = int(np.argmax(data["loss_mask"][r]))
    n = int(data["loss_mask"][r].sum())
    behaviour[r, start:start + n] = np.asarray(log_probs)[r, :n]
  data = dict(data, behaviour=behaviour)
  _, _, metrics = run(model, frozen, trainable, parallel.make_mesh(), steps=2, data=data)
  assert abs(float(metrics[0]["ratio_mean"]) - 1.0) < 1e-5 and float(metrics[0]["clip_fraction"]) == 0.0
  assert abs(float(metrics[1]["ratio_mean"]) - 1.0) > 1e-3


def test_kl_to_the_reference_policy():
  """kl_coef > 0: a reference equal to the trained weights adds nothing (k3 of equal log-probs is 0); another
  reference adds kl_coef * KL to every row; and the step refuses to run without one."""
  model, frozen, trainable = tiny(lora=True)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  with_kl = dataclasses.replace(CONFIG, kl_coef=0.5)
  _, rows, base = run(model, frozen, trainable, mesh)
  _, same, metrics = run(model, frozen, trainable, mesh, config=with_kl, reference=trainable)
  np.testing.assert_allclose(same, rows, rtol=1e-6, atol=1e-7)
  assert abs(float(metrics[0]["kl"])) < 1e-7
  other = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(7), a.shape), trainable)
  _, _, moved = run(model, frozen, trainable, mesh, config=with_kl, reference=other)
  kl = float(moved[0]["kl"])
  assert kl > 1e-4
  # loss = mean(weight * (policy + rating + kl_coef * kl_row)) with the same policy and rating terms.
  assert float(moved[0]["loss"]) > float(base[0]["loss"]) + 1e-5
  with pytest.raises(ValueError, match="kl_coef=0.5 needs a reference"):
    run(model, frozen, trainable, mesh, config=with_kl)


def test_gradient_accumulation_equals_one_batch():
  model, frozen, trainable = tiny(lora=False)
  mesh = parallel.make_mesh()
  whole, rows, metrics = run(model, frozen, trainable, mesh, data=batch(rows=16))
  split, rows2, metrics2 = run(model, frozen, trainable, mesh, config=dataclasses.replace(CONFIG, accumulate=2),
                               data=batch(rows=16))
  np.testing.assert_allclose(rows2, rows, rtol=2e-5, atol=2e-6)
  for a, b in zip(jax.tree.leaves(split["trainable"]), jax.tree.leaves(whole["trainable"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_step_loss_is_the_weighted_mean_of_its_rows():
  model, frozen, trainable = tiny(lora=True)
  data = batch()
  loss, (per_row, _) = learner.loss_and_rows(model, frozen, trainable, jax.tree.map(jnp.asarray, data),
                                             config=CONFIG, experience=EXPERIENCE, rating_ids=(POSITIVE, NEGATIVE))
  np.testing.assert_allclose(float(loss), np.mean(data["weight"] * np.asarray(per_row)), rtol=1e-6)
  _, rows, metrics = run(model, frozen, trainable, parallel.make_mesh(), data=data)
  np.testing.assert_allclose(rows, np.abs(np.asarray(per_row)), rtol=2e-5, atol=2e-6)


def test_sft_mode_trains_only_the_best_traces():
  model, frozen, trainable = tiny(lora=True)
  data = batch()
  config = dataclasses.replace(CONFIG, mode="sft", rating_coef=0.0)
  _, (per_row, _) = learner.loss_and_rows(model, frozen, trainable, jax.tree.map(jnp.asarray, data), config=config,
                                          experience=EXPERIENCE, rating_ids=(POSITIVE, NEGATIVE))
  per_row = np.asarray(per_row)
  assert (per_row[~data["sft"]] == 0).all() and (per_row[data["sft"]] > 0).all()


def test_bad_config():
  with pytest.raises(ValueError, match="mode='rl'"):
    learner.LearnerConfig(mode="rl")
  with pytest.raises(ValueError, match="rating_loss='mse'"):
    learner.LearnerConfig(rating_loss="mse")
  model, frozen, trainable = tiny(lora=False)
  step = learner.Learner(model, optax.sgd(0.1), parallel.make_mesh(), CONFIG, EXPERIENCE, (POSITIVE, NEGATIVE))
  frozen, state = step.place(frozen, lm.init_state(trainable, optax.sgd(0.1)))
  with pytest.raises(ValueError, match="a batch of 6 rows does not split over the mesh's 8 batch shards"):
    step.step(frozen, state, jax.tree.map(lambda a: a[:6], batch()))
  with pytest.raises(ValueError, match="pairwise' needs experience built with pairs=True"):
    learner.Learner(model, optax.sgd(0.1), parallel.make_mesh(), dataclasses.replace(CONFIG, rating_loss="pairwise"),
                    EXPERIENCE, (POSITIVE, NEGATIVE))


def test_a_checkpoint_restores_onto_another_mesh(tmp_path):
  """The whole train state saved from an 8x1x1 mesh comes back on a 2x2x2 mesh with its values and the new
  mesh's shardings (orbax reads each device's slice)."""
  from o1jax import checkpoint
  model, frozen, trainable = tiny(lora=False)
  optimizer = optax.adamw(1e-3)
  a = learner.Learner(model, optimizer, parallel.make_mesh(8, 1, 1), CONFIG, EXPERIENCE, (POSITIVE, NEGATIVE))
  frozen_a, state_a = a.place(frozen, lm.init_state(jax.tree.map(jnp.array, trainable), optimizer))
  state_a, _, _ = a.step(frozen_a, state_a, parallel.shard_batch(batch(), a.mesh))
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(1, state_a, force=True)
    ckpt.wait()
  b = learner.Learner(model, optimizer, parallel.make_mesh(2, 2, 2), CONFIG, EXPERIENCE, (POSITIVE, NEGATIVE))
  _, target = b.place(frozen, lm.init_state(jax.tree.map(jnp.array, trainable), optimizer))
  with checkpoint.Checkpointer(tmp_path / "ckpt", read_only=True) as ckpt:
    restored, _, _ = ckpt.restore(target=target)
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state_a)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  q = restored["trainable"]["layers"]["q"]
  assert q.sharding.mesh.shape == b.mesh.shape and q.sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor", None)
  # And training continues there.
  frozen_b, _ = b.place(frozen, lm.init_state(jax.tree.map(jnp.array, trainable), optimizer))
  _, rows, _ = b.step(frozen_b, restored, parallel.shard_batch(batch(seed=1), b.mesh))
  assert np.isfinite(np.asarray(rows)).all()
