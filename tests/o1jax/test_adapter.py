"""o1jax.adapter: LoRA identity at init, the merge formula written out in numpy, gradients; the adapter file:
its format, the committed adapters read as they were written, sizes, and an error sentence for each bad file."""

import functools
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from models import decoder, presets
from o1jax import adapter, thoughts

CONFIG = presets.get("tiny_llama")  # L=2, D=32, N=4, K=2, H=8, F=64, V=128
TOKENS = jnp.array([[1, 5, 9, 17, 33, 65, 3, 7], [2, 4, 8, 16, 32, 64, 127, 0]], jnp.int32)


# Test inputs come from numpy's generator, and the code under test runs jitted: on this CPU every op-by-op shape
# and every jax.random.normal call compiles separately, about a second each.
_merge = jax.jit(adapter.merge, static_argnums=2)


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
  factors = adapter.init(weights, config, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return {"layers": {target: {"a": pair["a"], "b": _normal(rng, pair["b"].shape, 0.1)}
                     for target, pair in factors["layers"].items()}}


def test_factor_shapes_and_init():
  weights = _weights()
  factors = adapter.init(weights, adapter.LoraConfig(rank=3, alpha=6.0), jax.random.key(1))
  shapes = {t: (f["a"].shape, f["b"].shape) for t, f in factors["layers"].items()}
  assert shapes == {
      "q": ((2, 32, 3), (2, 3, 4, 8)), "k": ((2, 32, 3), (2, 3, 2, 8)), "v": ((2, 32, 3), (2, 3, 2, 8)),
      "o": ((2, 4, 8, 3), (2, 3, 32)), "gate": ((2, 32, 3), (2, 3, 64)), "up": ((2, 32, 3), (2, 3, 64)),
      "down": ((2, 64, 3), (2, 3, 32)),
  }
  for target, pair in factors["layers"].items():
    assert not np.any(np.asarray(pair["b"])), target
    fan_in = {"o": 32, "down": 64}.get(target, 32)
    # std 1 / sqrt(fan-in): 1/sqrt(32) = 0.177, 1/sqrt(64) = 0.125, from 192 samples each (+-15%).
    assert abs(float(np.std(pair["a"])) * np.sqrt(fan_in) - 1.0) < 0.15, target
  assert not np.array_equal(factors["layers"]["q"]["a"], factors["layers"]["k"]["a"])


def test_zero_b_gives_the_base_model_exactly():
  weights = _weights()
  config = adapter.LoraConfig(rank=4, alpha=8.0)
  factors = adapter.init(weights, config, jax.random.key(1))
  base = decoder.full_logits(weights, TOKENS, config=CONFIG)
  adapted = decoder.full_logits(adapter.merge(weights, factors, config), TOKENS, config=CONFIG)
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))
  merged_in_jit = _merge(weights, factors, config)
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
  config = adapter.LoraConfig(rank=3, alpha=5.0, targets=(target,))
  factors = _random_adapter(weights, config)
  merged = _merge(weights, factors, config)
  a = np.asarray(factors["layers"][target]["a"], np.float64)
  b = np.asarray(factors["layers"][target]["b"], np.float64)
  expected = np.asarray(weights["layers"][target], np.float64) + (5.0 / 3.0) * np.einsum(subscripts, a, b)
  assert np.abs(np.einsum(subscripts, a, b)).max() > 1e-2  # the update is not negligible
  np.testing.assert_allclose(np.asarray(merged["layers"][target]), expected, rtol=1e-5, atol=1e-6)
  for name, w in weights["layers"].items():
    if name != target:
      np.testing.assert_array_equal(np.asarray(merged["layers"][name]), np.asarray(w), err_msg=name)
  np.testing.assert_array_equal(np.asarray(merged["embed"]), np.asarray(weights["embed"]))


def test_merge_keeps_the_weight_dtype():
  weights = _weights(jnp.bfloat16)
  config = adapter.LoraConfig(rank=2, alpha=2.0, targets=("q",))
  merged = _merge(weights, _random_adapter(weights, config), config)
  assert merged["layers"]["q"].dtype == jnp.bfloat16


def _loss(factors, weights, config):
  """Next-token cross-entropy of the adapted model on TOKENS."""
  logits = decoder.full_logits(adapter.merge(weights, factors, config), TOKENS[:, :-1], config=CONFIG)
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, TOKENS[:, 1:, None], axis=-1))


_loss_and_grad = jax.jit(jax.value_and_grad(_loss), static_argnums=2)


def test_gradients_through_merge_and_forward():
  weights = _weights()
  config = adapter.LoraConfig(rank=4, alpha=8.0)
  _, grads = _loss_and_grad(adapter.init(weights, config, jax.random.key(1)), weights, config)
  for target, g in grads["layers"].items():
    assert np.all(np.isfinite(g["b"])) and np.abs(g["b"]).max() > 0, target
    # dL/da = (alpha / r) * dL/dW' @ b^T: exactly zero while b is zero.
    assert not np.any(np.asarray(g["a"])), target
  factors = _random_adapter(weights, config)
  loss, grads = _loss_and_grad(factors, weights, config)
  for target, g in grads["layers"].items():
    assert np.all(np.isfinite(g["a"])) and np.abs(g["a"]).max() > 0 and np.abs(g["b"]).max() > 0, target
  # The gradient is the loss's: a small step against it lowers the loss (first-order descent).
  stepped = jax.tree.map(lambda p, g: p - 1e-2 * g, factors, grads)
  stepped_loss, _ = _loss_and_grad(stepped, weights, config)
  assert float(stepped_loss) < float(loss)


def _header(path) -> dict:
  """A safetensors file's JSON header, parsed by hand: an 8-byte little-endian length, then the JSON."""
  with open(path, "rb") as f:
    raw = f.read()
  (header_len,) = struct.unpack("<Q", raw[:8])
  return json.loads(raw[8:8 + header_len])


def _raw_tensor(path, name) -> bytes:
  """The bytes a safetensors file stores for one tensor (read without the safetensors library)."""
  with open(path, "rb") as f:
    raw = f.read()
  (header_len,) = struct.unpack("<Q", raw[:8])
  begin, end = json.loads(raw[8:8 + header_len])[name]["data_offsets"]
  return raw[8 + header_len + begin:8 + header_len + end]


_TOKENS = ("<a>", "<b>", "<c>")


def test_write_read_round_trip(tmp_path):
  weights = _weights()
  config = adapter.LoraConfig(rank=2, alpha=16.0, targets=("q", "o", "down"))
  factors = _random_adapter(weights, config)
  factors["layers"]["o"] = {k: jnp.asarray(np.asarray(a).astype(jnp.bfloat16))
                            for k, a in factors["layers"]["o"].items()}
  rows = np.arange(3 * 32, dtype=np.float32).reshape(3, 32) / 7
  head = -rows.T
  path = tmp_path / "sub" / "adapter.safetensors"    # the directory is made
  adapter.write(path, factors, config, new_rows=rows, new_head=head, base="tiny_llama", base_vocab=125,
                special_tokens=_TOKENS, metadata={"step": 12})

  file = adapter.read(path)
  assert file.path == str(path) and file.config == config
  assert file.metadata == {"base": "tiny_llama", "base_vocab": 125, "special_tokens": list(_TOKENS), "step": 12}
  assert (file.base, file.base_vocab, file.special_tokens) == ("tiny_llama", 125, _TOKENS)
  assert jax.tree.structure(file.factors) == jax.tree.structure(factors)
  for got, want in zip(jax.tree.leaves(file.factors), jax.tree.leaves(factors)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.view(np.uint8), np.asarray(want).view(np.uint8))
  np.testing.assert_array_equal(file.new_rows, rows)
  np.testing.assert_array_equal(file.new_head, head)

  # The file is plain safetensors (format spec: https://github.com/huggingface/safetensors).
  header = _header(path)
  assert sorted(k for k in header if k != "__metadata__") == [
      "extra.new_head", "extra.new_rows", "layers.down.a", "layers.down.b", "layers.o.a", "layers.o.b",
      "layers.q.a", "layers.q.b"]
  assert header["layers.o.a"] == {"dtype": "BF16", "shape": [2, 4, 8, 2],
                                  "data_offsets": header["layers.o.a"]["data_offsets"]}
  assert header["__metadata__"]["format"] == "o1jax-lora"
  assert json.loads(header["__metadata__"]["lora_config"]) == {"rank": 2, "alpha": 16.0,
                                                              "targets": ["q", "o", "down"]}

  # dtype casts every array, the rows and the head too.
  adapter.write(path, factors, config, new_rows=rows, base="tiny_llama", base_vocab=125, special_tokens=_TOKENS,
                dtype="bfloat16")
  header = _header(path)
  assert {header[name]["dtype"] for name in header if name != "__metadata__"} == {"BF16"}
  assert "extra.new_head" not in header and adapter.read(path).new_head is None


@pytest.mark.parametrize("name", ["format", "rating"])
def test_committed_adapters_read_as_written(name, tmp_path):
  """configs/adapters/*.safetensors: every array comes back with the bytes the file stores for it, the header as
  launch.pretrain wrote it, and writing the contents again gives the same header and the same bytes."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  path = os.path.join(root, "configs", "adapters", f"smollm2_135m_{name}.safetensors")
  file = adapter.read(path)
  assert file.config == adapter.LoraConfig(rank=8, alpha=16.0, targets=adapter.ALL_TARGETS)
  assert file.metadata == {"base": "smollm2-135m-instruct", "base_vocab": 49_152,
                           "special_tokens": list(thoughts.SPECIAL_TOKENS)}
  assert file.new_rows.shape == (len(thoughts.SPECIAL_TOKENS), 576) and file.new_head is None
  arrays = {f"layers.{t}.{k}": a for t, pair in file.factors["layers"].items() for k, a in pair.items()}
  arrays["extra.new_rows"] = file.new_rows
  header = _header(path)
  assert sorted(arrays) == sorted(k for k in header if k != "__metadata__")
  assert arrays["layers.q.a"].shape == (30, 576, 8) and arrays["layers.o.a"].shape == (30, 9, 64, 8)
  for key, array in arrays.items():
    assert header[key]["dtype"] == "BF16" and list(array.shape) == header[key]["shape"], key
    assert array.tobytes() == _raw_tensor(path, key), key
  file.check(base="smollm2-135m-instruct", base_vocab=49_152, special_tokens=thoughts.SPECIAL_TOKENS)

  again = tmp_path / "again.safetensors"
  adapter.write(again, file.factors, file.config, new_rows=file.new_rows, base=file.base,
                base_vocab=file.base_vocab, special_tokens=file.special_tokens, dtype="bfloat16")
  # safetensors writes the __metadata__ entries in no fixed order: compare the parsed header, then the bytes.
  assert _header(again) == header
  with open(path, "rb") as f, open(again, "rb") as g:
    original, rewritten = f.read(), g.read()
  assert len(rewritten) == len(original)
  data_start = 8 + struct.unpack("<Q", original[:8])[0]
  assert rewritten[data_start:] == original[data_start:]


def test_smollm2_rank8_qv_file_size(tmp_path):
  """SmolLM2-135M (L=30, D=576, 9 heads and 3 kv heads of 64): a rank-8 q,v adapter with the 17 new rows is under
  2 MB in float32."""
  shapes = decoder.weight_shapes(presets.get("smollm2_135m"))
  weights = {"layers": {name: jax.ShapeDtypeStruct(shape, jnp.float32)
                        for name, shape in shapes["layers"].items()}}
  config = adapter.LoraConfig(rank=8, alpha=16.0, targets=("q", "v"))
  factors = adapter.init(weights, config, jax.random.key(0))
  params = 30 * (576 * 8 + 8 * 9 * 64) + 30 * (576 * 8 + 8 * 3 * 64)
  assert params == 460_800
  assert sum(a.size for a in jax.tree.leaves(factors)) == params
  path = tmp_path / "smollm2_qv.safetensors"
  adapter.write(path, factors, config, new_rows=np.zeros((17, 576), np.float32), base="smollm2-135m-instruct",
                base_vocab=49_152, special_tokens=thoughts.SPECIAL_TOKENS)
  raw = path.read_bytes()
  (header_len,) = struct.unpack("<Q", raw[:8])
  assert len(raw) == 8 + header_len + 4 * (params + 17 * 576)
  assert 1.5e6 < len(raw) < 2.0e6


def test_errors(tmp_path):
  with pytest.raises(ValueError, match=r"unknown LoRA target 'qkv'; expected some of \('q', 'k'"):
    adapter.LoraConfig(rank=4, alpha=8.0, targets=("q", "qkv"))
  with pytest.raises(ValueError, match="LoRA rank must be a positive integer; got 0"):
    adapter.LoraConfig(rank=0, alpha=8.0)
  weights = _weights()
  del weights["layers"]["up"]
  with pytest.raises(ValueError, match="LoRA target 'up' is not a layer weight of this model"):
    adapter.init(weights, adapter.LoraConfig(rank=4, alpha=8.0, targets=("q", "up")), jax.random.key(0))
  weights = _weights()
  factors = adapter.init(weights, adapter.LoraConfig(rank=4, alpha=8.0, targets=("q",)), jax.random.key(0))
  with pytest.raises(ValueError, match=r"adapter for 'q' has shapes a \(2, 32, 4\).* at rank 2 expects a \(2, 32, 2\)"):
    adapter.merge(weights, factors, adapter.LoraConfig(rank=2, alpha=8.0, targets=("q",)))
  not_lora = tmp_path / "plain.safetensors"
  safetensors.numpy.save_file({"x": np.zeros(2, np.float32)}, str(not_lora))
  with pytest.raises(ValueError, match="is not an o1jax LoRA adapter file"):
    adapter.read(not_lora)
  with pytest.raises(FileNotFoundError) as error:
    adapter.read(tmp_path / "nope.safetensors")
  assert str(error.value) == (f"adapter {str(tmp_path / 'nope.safetensors')!r} does not exist; run "
                              "launch.pretrain to make one.")
  rows = np.zeros((3, 32), np.float32)
  with pytest.raises(ValueError, match=r"adapter holds targets \['q'\]; the LoRA config names \['q', 'v'\]"):
    adapter.write(tmp_path / "a.safetensors", factors, adapter.LoraConfig(rank=4, alpha=8.0, targets=("q", "v")),
                  new_rows=rows, base="tiny", base_vocab=125, special_tokens=_TOKENS)
  with pytest.raises(ValueError, match=r"metadata fields \['base_vocab'\] are written from the arguments"):
    adapter.write(tmp_path / "a.safetensors", factors, adapter.LoraConfig(rank=4, alpha=8.0, targets=("q",)),
                  new_rows=rows, base="tiny", base_vocab=125, special_tokens=_TOKENS, metadata={"base_vocab": 1})
  assert not os.path.exists(tmp_path / "a.safetensors")


def _adapter_file(tmp_path, **header_changes) -> str:
  """A small valid adapter file (rank 2 on q), with entries of its safetensors header replaced."""
  weights = _weights()
  config = adapter.LoraConfig(rank=2, alpha=4.0, targets=("q",))
  path = str(tmp_path / "adapter.safetensors")
  adapter.write(path, adapter.init(weights, config, jax.random.key(0)), config,
                new_rows=np.zeros((3, 32), np.float32), base="tiny", base_vocab=125, special_tokens=_TOKENS)
  if header_changes:
    tensors = safetensors.numpy.load_file(path)
    header = {**_header(path)["__metadata__"], **header_changes}
    safetensors.numpy.save_file(tensors, path, metadata=header)
  return path


@pytest.mark.parametrize("damage, reason", [
    (lambda raw: b"", "header too small"),
    (lambda raw: raw[:-3], "incomplete metadata, file not fully covered"),
    (lambda raw: raw[:40], "invalid header length"),
    (lambda raw: bytes(range(256)) * 8, "header too large"),
])
def test_read_names_a_file_that_is_not_safetensors(tmp_path, damage, reason):
  path = _adapter_file(tmp_path)
  with open(path, "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(damage(raw))
  with pytest.raises(ValueError) as error:
    adapter.read(path)
  assert str(error.value) == (f"LoRA adapter file {path!r} is not a valid safetensors file ({reason}); expected a "
                              "LoRA adapter written by launch.pretrain (o1jax.adapter.write).")


@pytest.mark.parametrize("header, message", [
    (dict(lora_config="{rank: 2"), r"has an unreadable header \(JSONDecodeError: Expecting property name"),
    (dict(lora_config='{"rank": 2}'), r"has an unreadable header \(KeyError: 'alpha'\)"),
    (dict(lora_config='{"rank": 0, "alpha": 1.0, "targets": ["q"]}'),
     r"has an unreadable header \(ValueError: LoRA rank must be a positive integer; got 0.\)"),
    (dict(metadata="[1, 2]"), "has metadata of type list"),
])
def test_read_names_a_file_with_a_bad_header(tmp_path, header, message):
  path = _adapter_file(tmp_path, **header)
  with pytest.raises(ValueError, match=f"LoRA adapter file '.*adapter.safetensors' {message}"):
    adapter.read(path)


def test_read_names_a_directory(tmp_path):
  with pytest.raises(IsADirectoryError, match=f"LoRA adapter file {str(tmp_path)!r} is a directory; expected a LoRA"):
    adapter.read(tmp_path)


def _bare_file(path: str, *, metadata: dict, extra: dict) -> str:
  """An adapter file for a made-up 1-layer model with the given metadata and extra arrays, written the way
  `adapter.write` lays a file out but without its fields (only the file's contents matter to these checks)."""
  config = adapter.LoraConfig(rank=1, alpha=1.0, targets=("q",))
  tensors = {"layers.q.a": np.zeros((1, 4, 1), np.float32), "layers.q.b": np.zeros((1, 1, 2, 2), np.float32),
             **{f"extra.{name}": array for name, array in extra.items()}}
  safetensors.numpy.save_file(tensors, path, metadata={"format": "o1jax-lora", "lora_config": config.to_json(),
                                                       "metadata": json.dumps(metadata)})
  return path


@pytest.mark.parametrize("metadata, extra, lacks", [
    ({}, {"new_rows": np.zeros((2, 4), np.float32)}, "special_tokens and base_vocab"),
    ({"special_tokens": ["<a>"]}, {"new_rows": np.zeros((2, 4), np.float32)}, "base_vocab"),
    ({"special_tokens": ["<a>"], "base_vocab": 8}, {}, "the new_rows array"),
])
def test_read_needs_the_format_metadata(tmp_path, metadata, extra, lacks):
  path = _bare_file(str(tmp_path / "bare.safetensors"), metadata=metadata, extra=extra)
  with pytest.raises(ValueError) as error:
    adapter.read(path)
  assert str(error.value) == f"adapter {path!r} lacks {lacks}; expected an adapter written by launch.pretrain."


def test_read_refuses_an_unknown_tensor(tmp_path):
  path = _bare_file(str(tmp_path / "odd.safetensors"), metadata={"special_tokens": ["<a>"], "base_vocab": 8},
                    extra={"new_rows": np.zeros((1, 4), np.float32), "embed_rows": np.zeros((1, 4), np.float32)})
  with pytest.raises(ValueError, match=r"holds tensor 'extra.embed_rows'; expected 'layers.<target>.a\|b' or "
                                       r"'extra.new_rows' or 'extra.new_head'"):
    adapter.read(path)


def test_check_names_the_model_it_does_not_fit(tmp_path):
  file = adapter.read(_adapter_file(tmp_path))
  file.check(base="tiny", base_vocab=125, special_tokens=_TOKENS)
  with pytest.raises(ValueError) as error:
    file.check(base="tiny", base_vocab=124, special_tokens=_TOKENS)
  assert str(error.value) == (f"adapter {file.path!r} was trained for special tokens from id 125 (['<a>', '<b>', "
                              "'<c>']); this model has them from id 124.")
  with pytest.raises(ValueError, match=r"was trained for special tokens from id 125"):
    file.check(base="tiny", base_vocab=125, special_tokens=_TOKENS[::-1])
  with pytest.raises(ValueError, match=r"adapter '.*' was trained on 'tiny', not on 'other'\.$"):
    file.check(base="other", base_vocab=125, special_tokens=_TOKENS)
  nameless = adapter.read(_bare_file(str(tmp_path / "nameless.safetensors"),
                                     metadata={"special_tokens": ["<a>"], "base_vocab": 8},
                                     extra={"new_rows": np.zeros((1, 4), np.float32)}))
  assert nameless.base is None
  nameless.check(base="any", base_vocab=8, special_tokens=("<a>",))   # a file without "base" fits any base
