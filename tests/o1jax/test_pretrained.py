"""pretrained.load: special tokens added as new rows, and an adapter from training turns into the same model.

(The adapter file itself, its format and its errors: tests/o1jax/test_adapter.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o1jax import adapter, pretrained, thoughts
from o1jax.learn import lm, pretrain


def test_load_adds_every_special_token_as_one_new_row(tiny_smollm2_checkpoint):
  loaded = pretrained.load(tiny_smollm2_checkpoint, dtype="float32")
  assert loaded.base_vocab == 49_152
  assert loaded.model.config.vocab_size == 49_152 + len(thoughts.SPECIAL_TOKENS)
  ids = [loaded.tokenizer.encode(t) for t in thoughts.SPECIAL_TOKENS]
  assert ids == [[49_152 + i] for i in range(len(thoughts.SPECIAL_TOKENS))]
  embed = np.asarray(loaded.model.weights()["embed"])
  np.testing.assert_allclose(embed[49_152:], np.broadcast_to(embed[:49_152].mean(0), embed[49_152:].shape),
                             atol=1e-6)


def test_adapter_file_gives_the_trained_model(tiny_smollm2_checkpoint, tmp_path):
  """Logits of (frozen, trainable) as training computes them equal those of load(base, adapter=file)."""
  loaded = pretrained.load(tiny_smollm2_checkpoint, dtype="float32")
  spec = lm.Model(config=loaded.model.config, base_vocab=loaded.base_vocab,
                  lora=adapter.LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "gate")))
  frozen, trainable = spec.split(loaded.model.weights(), jax.random.key(1))
  rng = np.random.default_rng(0)
  trainable = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), trainable)
  path = str(tmp_path / "adapter.safetensors")
  pretrain.write_adapter(path, spec, trainable, base=tiny_smollm2_checkpoint, special_tokens=loaded.special_tokens,
                         dtype="float32")

  adapted = pretrained.load(tiny_smollm2_checkpoint, adapter=path, dtype="float32")
  tokens = jnp.asarray([loaded.tokenizer.encode("<start_of_thought>12+3=15<end_of_thought><start_of_rating>")])
  want = spec.logits(frozen, trainable, tokens, jnp.ones(tokens.shape, bool))
  got = adapted.model(tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
  assert not np.allclose(np.asarray(got), np.asarray(loaded.model(tokens)), atol=1e-2)


def test_adapter_errors(tiny_smollm2_checkpoint, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pretrained.load(tiny_smollm2_checkpoint, adapter=str(tmp_path / "missing.safetensors"))
  loaded = pretrained.load(tiny_smollm2_checkpoint, dtype="float32")
  spec = lm.Model(config=loaded.model.config, base_vocab=loaded.base_vocab,
                  lora=adapter.LoraConfig(rank=2, alpha=2.0))
  _, trainable = spec.split(loaded.model.weights(), jax.random.key(1))
  path = str(tmp_path / "other_base.safetensors")
  pretrain.write_adapter(path, spec, trainable, base="another-model", special_tokens=loaded.special_tokens,
                         dtype="float32")
  with pytest.raises(ValueError, match="was trained on 'another-model'"):
    pretrained.load(tiny_smollm2_checkpoint, adapter=path)


def test_adapter_is_read_before_the_checkpoint(tmp_path):
  """A corrupt adapter fails at once, before the (slow) checkpoint is read: here the checkpoint directory has no
  config.json, and the error is still the adapter's."""
  corrupt = tmp_path / "corrupt.safetensors"
  corrupt.write_bytes(b"\xff" * 64)
  (tmp_path / "model").mkdir()
  with pytest.raises(ValueError, match="corrupt.safetensors' is not a valid safetensors file"):
    pretrained.load(str(tmp_path / "model"), adapter=str(corrupt))
