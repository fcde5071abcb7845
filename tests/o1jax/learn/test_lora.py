"""LoRA: identity at init, the merge formula written out in numpy, gradients, the file format, sizes, errors."""

import functools
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from models import decoder, presets
from o1jax.learn import lora

CONFIG = presets.get("tiny_llama")  # L=2, D=32, N=4, K=2, H=8, F=64, V=128
TOKENS = jnp.array([[1, 5, 9, 17, 33, 65, 3, 7], [2, 4, 8, 16, 32, 64, 127, 0]], jnp.int32)


# Test inputs come from numpy's generator, and the code under test runs jitted: on this CPU every op-by-op shape
# and every jax.random.normal call compiles separately, about a second each.
_merge = jax.jit(lora.merge, static_argnums=2)


def _normal(rng, shape, scale, dtype=np.float32):
  return jnp.asarray((scale * rng.standard_normal(shape)).astype(dtype))


@functools.cache
def _base_weights():
  rng = np.random.default_rng(0)
  shapes = decoder.weight_shapes(CONFIG)
  return {"embed": _normal(rng, shapes["embed"], 0.02), "head": _normal(rng, shapes["head"], 0.02),
          "final_norm": jnp.ones(shapes["final_norm"]),
          "layers": {name: jnp.ones(shape) if name.endswith("norm") else _normal(rng, shape, 0.02)
                     for name, shape in shapes["layers"].items()}}


def _weights(dtype=np.float32):
  """The tiny model's weights (a fresh dict over the shared arrays, so that a test may drop entries)."""
  weights = _base_weights()
  if dtype != np.float32:
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a).astype(dtype)), weights)
  return {**weights, "layers": dict(weights["layers"])}


def _random_adapter(weights, config, seed=1):
  """An adapter with non-zero `b` as well, so that the merge changes the weights."""
  adapter = lora.init(weights, config, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return {"layers": {target: {"a": factors["a"], "b": _normal(rng, factors["b"].shape, 0.1)}
                     for target, factors in adapter["layers"].items()}}


def test_factor_shapes_and_init():
  weights = _weights()
  adapter = lora.init(weights, lora.LoraConfig(rank=3, alpha=6.0), jax.random.key(1))
  shapes = {t: (f["a"].shape, f["b"].shape) for t, f in adapter["layers"].items()}
  assert shapes == {
      "q": ((2, 32, 3), (2, 3, 4, 8)), "k": ((2, 32, 3), (2, 3, 2, 8)), "v": ((2, 32, 3), (2, 3, 2, 8)),
      "o": ((2, 4, 8, 3), (2, 3, 32)), "gate": ((2, 32, 3), (2, 3, 64)), "up": ((2, 32, 3), (2, 3, 64)),
      "down": ((2, 64, 3), (2, 3, 32)),
  }
  for target, factors in adapter["layers"].items():
    assert not np.any(np.asarray(factors["b"])), target
    fan_in = {"o": 32, "down": 64}.get(target, 32)
    # std 1 / sqrt(fan-in): 1/sqrt(32) = 0.177, 1/sqrt(64) = 0.125, from 192 samples each (+-15%).
    assert abs(float(np.std(factors["a"])) * np.sqrt(fan_in) - 1.0) < 0.15, target
  assert not np.array_equal(adapter["layers"]["q"]["a"], adapter["layers"]["k"]["a"])


def test_zero_b_gives_the_base_model_exactly():
  weights = _weights()
  config = lora.LoraConfig(rank=4, alpha=8.0)
  adapter = lora.init(weights, config, jax.random.key(1))
  base = decoder.full_logits(weights, TOKENS, config=CONFIG)
  adapted = decoder.full_logits(lora.merge(weights, adapter, config), TOKENS, config=CONFIG)
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))
  merged_in_jit = _merge(weights, adapter, config)
  for name, w in weights["layers"].items():
    np.testing.assert_array_equal(np.asarray(merged_in_jit["layers"][name]), np.asarray(w))


@pytest.mark.parametrize("target,subscripts", [
    ("q", "ldr,lrnh->ldnh"),
    ("v", "ldr,lrkh->ldkh"),
    ("o", "lnhr,lrd->lnhd"),
    ("down", "lfr,lrd->lfd"),
])
def test_merge_matches_handwritten_formula(target, subscripts):
  weights = _weights()
  config = lora.LoraConfig(rank=3, alpha=5.0, targets=(target,))
  adapter = _random_adapter(weights, config)
  merged = _merge(weights, adapter, config)
  a = np.asarray(adapter["layers"][target]["a"], np.float64)
  b = np.asarray(adapter["layers"][target]["b"], np.float64)
  expected = np.asarray(weights["layers"][target], np.float64) + (5.0 / 3.0) * np.einsum(subscripts, a, b)
  assert np.abs(np.einsum(subscripts, a, b)).max() > 1e-2  # the update is not negligible
  np.testing.assert_allclose(np.asarray(merged["layers"][target]), expected, rtol=1e-5, atol=1e-6)
  for name, w in weights["layers"].items():
    if name != target:
      np.testing.assert_array_equal(np.asarray(merged["layers"][name]), np.asarray(w), err_msg=name)
  np.testing.assert_array_equal(np.asarray(merged["embed"]), np.asarray(weights["embed"]))


def test_merge_keeps_the_weight_dtype():
  weights = _weights(jnp.bfloat16)
  config = lora.LoraConfig(rank=2, alpha=2.0, targets=("q",))
  merged = _merge(weights, _random_adapter(weights, config), config)
  assert merged["layers"]["q"].dtype == jnp.bfloat16


def _loss(adapter, weights, config):
  """Next-token cross-entropy of the adapted model on TOKENS."""
  logits = decoder.full_logits(lora.merge(weights, adapter, config), TOKENS[:, :-1], config=CONFIG)
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, TOKENS[:, 1:, None], axis=-1))


_loss_and_grad = jax.jit(jax.value_and_grad(_loss), static_argnums=2)


def test_gradients_through_merge_and_forward():
  weights = _weights()
  config = lora.LoraConfig(rank=4, alpha=8.0)
  _, grads = _loss_and_grad(lora.init(weights, config, jax.random.key(1)), weights, config)
  for target, g in grads["layers"].items():
    assert np.all(np.isfinite(g["b"])) and np.abs(g["b"]).max() > 0, target
    # dL/da = (alpha / r) * dL/dW' @ b^T: exactly zero while b is zero.
    assert not np.any(np.asarray(g["a"])), target
  adapter = _random_adapter(weights, config)
  loss, grads = _loss_and_grad(adapter, weights, config)
  for target, g in grads["layers"].items():
    assert np.all(np.isfinite(g["a"])) and np.abs(g["a"]).max() > 0 and np.abs(g["b"]).max() > 0, target
  # The gradient is the loss's: a small step against it lowers the loss (first-order descent).
  stepped = jax.tree.map(lambda p, g: p - 1e-2 * g, adapter, grads)
  stepped_loss, _ = _loss_and_grad(stepped, weights, config)
  assert float(stepped_loss) < float(loss)


def test_save_load_round_trip(tmp_path):
  weights = _weights()
  config = lora.LoraConfig(rank=2, alpha=16.0, targets=("q", "o", "down"))
  adapter = _random_adapter(weights, config)
  adapter["layers"]["o"] = {k: jnp.asarray(np.asarray(a).astype(jnp.bfloat16))
                            for k, a in adapter["layers"]["o"].items()}
  extra = {"embed_rows": np.arange(3 * 32, dtype=np.float32).reshape(3, 32) / 7}
  path = tmp_path / "adapter.safetensors"
  lora.save(path, adapter, config, extra=extra, metadata={"base": "tiny_llama", "step": 12})

  loaded, loaded_config, loaded_extra, metadata = lora.load(path)
  assert loaded_config == config and metadata == {"base": "tiny_llama", "step": 12}
  assert jax.tree.structure(loaded) == jax.tree.structure(adapter)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapter)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.view(np.uint8), np.asarray(want).view(np.uint8))
  assert loaded_extra.keys() == {"embed_rows"}
  np.testing.assert_array_equal(loaded_extra["embed_rows"], extra["embed_rows"])

  # The file is plain safetensors: an 8-byte little-endian header length, then a JSON header (format spec).
  raw = path.read_bytes()
  (header_len,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + header_len])
  assert sorted(k for k in header if k != "__metadata__") == [
      "extra.embed_rows", "layers.down.a", "layers.down.b", "layers.o.a", "layers.o.b", "layers.q.a",
      "layers.q.b"]
  assert header["layers.o.a"] == {"dtype": "BF16", "shape": [2, 4, 8, 2],
                                  "data_offsets": header["layers.o.a"]["data_offsets"]}
  assert json.loads(header["__metadata__"]["lora_config"]) == {"rank": 2, "alpha": 16.0,
                                                              "targets": ["q", "o", "down"]}


def test_smollm2_rank8_qv_file_size(tmp_path):
  """SmolLM2-135M (L=30, D=576, 9 heads and 3 kv heads of 64): a rank-8 q,v adapter is under 2 MB in float32."""
  shapes = decoder.weight_shapes(presets.get("smollm2_135m"))
  weights = {"layers": {name: jax.ShapeDtypeStruct(shape, jnp.float32)
                        for name, shape in shapes["layers"].items()}}
  config = lora.LoraConfig(rank=8, alpha=16.0, targets=("q", "v"))
  adapter = lora.init(weights, config, jax.random.key(0))
  params = 30 * (576 * 8 + 8 * 9 * 64) + 30 * (576 * 8 + 8 * 3 * 64)
  assert params == 460_800
  assert sum(a.size for a in jax.tree.leaves(adapter)) == params
  path = tmp_path / "smollm2_qv.safetensors"
  lora.save(path, adapter, config)
  raw = path.read_bytes()
  (header_len,) = struct.unpack("<Q", raw[:8])
  assert len(raw) == 8 + header_len + 4 * params
  assert 1.5e6 < len(raw) < 2.0e6


def test_errors(tmp_path):
  with pytest.raises(ValueError, match=r"unknown LoRA target 'qkv'; expected some of \('q', 'k'"):
    lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "qkv"))
  with pytest.raises(ValueError, match="LoRA rank must be a positive integer; got 0"):
    lora.LoraConfig(rank=0, alpha=8.0)
  weights = _weights()
  del weights["layers"]["up"]
  with pytest.raises(ValueError, match="LoRA target 'up' is not a layer weight of this model"):
    lora.init(weights, lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "up")), jax.random.key(0))
  weights = _weights()
  adapter = lora.init(weights, lora.LoraConfig(rank=4, alpha=8.0, targets=("q",)), jax.random.key(0))
  with pytest.raises(ValueError, match=r"adapter for 'q' has shapes a \(2, 32, 4\).* at rank 2 expects a \(2, 32, 2\)"):
    lora.merge(weights, adapter, lora.LoraConfig(rank=2, alpha=8.0, targets=("q",)))
  not_lora = tmp_path / "plain.safetensors"
  safetensors.numpy.save_file({"x": np.zeros(2, np.float32)}, str(not_lora))
  with pytest.raises(ValueError, match="is not an o1jax LoRA adapter file"):
    lora.load(not_lora)
  with pytest.raises(FileNotFoundError, match="LoRA adapter file .*nope.safetensors' does not exist"):
    lora.load(tmp_path / "nope.safetensors")


def _adapter_file(tmp_path, **header_changes) -> str:
  """A small valid adapter file (rank 2 on q), with entries of its safetensors header replaced."""
  weights = _weights()
  config = lora.LoraConfig(rank=2, alpha=4.0, targets=("q",))
  path = str(tmp_path / "adapter.safetensors")
  lora.save(path, lora.init(weights, config, jax.random.key(0)), config, metadata={"base": "tiny"})
  if header_changes:
    tensors = safetensors.numpy.load_file(path)
    header = {"format": "o1jax-lora", "lora_config": config.to_json(), "metadata": "{}", **header_changes}
    safetensors.numpy.save_file(tensors, path, metadata=header)
  return path


@pytest.mark.parametrize("damage, reason", [
    (lambda raw: b"", "header too small"),
    (lambda raw: raw[:-3], "incomplete metadata, file not fully covered"),
    (lambda raw: raw[:40], "invalid header length"),
    (lambda raw: bytes(range(256)) * 8, "header too large"),
])
def test_load_names_a_file_that_is_not_safetensors(tmp_path, damage, reason):
  path = _adapter_file(tmp_path)
  with open(path, "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(damage(raw))
  with pytest.raises(ValueError) as error:
    lora.load(path)
  assert str(error.value) == (f"LoRA adapter file {path!r} is not a valid safetensors file ({reason}); expected a "
                              "LoRA adapter written by launch.pretrain (lora.save).")


@pytest.mark.parametrize("header, message", [
    (dict(lora_config="{rank: 2"), r"has an unreadable header \(JSONDecodeError: Expecting property name"),
    (dict(lora_config='{"rank": 2}'), r"has an unreadable header \(KeyError: 'alpha'\)"),
    (dict(lora_config='{"rank": 0, "alpha": 1.0, "targets": ["q"]}'),
     r"has an unreadable header \(ValueError: LoRA rank must be a positive integer; got 0.\)"),
    (dict(metadata="[1, 2]"), "has metadata of type list"),
])
def test_load_names_a_file_with_a_bad_header(tmp_path, header, message):
  path = _adapter_file(tmp_path, **header)
  with pytest.raises(ValueError, match=f"LoRA adapter file '.*adapter.safetensors' {message}"):
    lora.load(path)


def test_load_names_a_directory(tmp_path):
  with pytest.raises(IsADirectoryError, match=f"LoRA adapter file {str(tmp_path)!r} is a directory; expected a LoRA"):
    lora.load(tmp_path)
