"""Hugging Face export/import: transformers loads our export unchanged; import -> export -> import is bit-exact;
bad checkpoints get one clear sentence."""

import json
import os
import re

import gguf
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from models import decoder, hf_io, presets
from models.config import ConfigError


def log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def random_model(preset: str, param_dtype: str = "float32", **overrides) -> decoder.Decoder:
  config = presets.get(preset, param_dtype=param_dtype, dtype="float32", **overrides)
  return decoder.Decoder(config, weights=decoder.init_weights(config, jax.random.key(7), scale=0.2))


@pytest.mark.parametrize("preset,tied", [("tiny_gemma2", True), ("tiny_gemma2", False), ("tiny_llama", False),
                                         ("tiny_llama", True)])
def test_transformers_loads_the_export(preset, tied, tmp_path):
  model = random_model(preset, tie_embeddings=tied)
  hf_io.save_pretrained(model, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
  reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
  assert reference.config.model_type == model.config.family
  tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 20)).astype(np.int32)
  with torch.no_grad():
    theirs = log_softmax(reference(torch.as_tensor(tokens)).logits.numpy())
  np.testing.assert_array_less(np.abs(log_softmax(model(tokens)) - theirs).max(), 1e-4)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", ["tiny_gemma2", "tiny_llama"])
def test_import_export_import_is_bit_exact(preset, param_dtype, tmp_path):
  model = random_model(preset, param_dtype)
  hf_io.save_pretrained(model, str(tmp_path / "a"))
  loaded = hf_io.load_pretrained(str(tmp_path / "a"), dtype="float32", param_dtype=param_dtype)
  hf_io.save_pretrained(loaded, str(tmp_path / "b"))
  again = hf_io.load_pretrained(str(tmp_path / "b"), dtype="float32", param_dtype=param_dtype)
  assert loaded.config == again.config == model.config
  for a, b, c in zip(jax.tree.leaves(model.weights()), jax.tree.leaves(loaded.weights()),
                     jax.tree.leaves(again.weights())):
    assert a.dtype == b.dtype == c.dtype == np.dtype(param_dtype)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(b), np.asarray(c))
  with open(tmp_path / "a" / "model.safetensors", "rb") as f1, open(tmp_path / "b" / "model.safetensors", "rb") as f2:
    assert f1.read() == f2.read()


def test_tokenizer_files_travel_with_the_checkpoint(tmp_path):
  model = random_model("tiny_llama")
  model.tokenizer_files = {"tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"})}
  hf_io.save_pretrained(model, str(tmp_path))
  assert hf_io.load_pretrained(str(tmp_path)).tokenizer_files == model.tokenizer_files


# --- bad input --------------------------------------------------------------------------------------------------

@pytest.fixture
def saved_llama(tmp_path):
  hf_io.save_pretrained(random_model("tiny_llama"), str(tmp_path))
  return tmp_path


def test_missing_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf_io.load_pretrained(str(tmp_path / "nowhere"))


def test_directory_without_config(tmp_path):
  with pytest.raises(hf_io.CheckpointError, match="no config.json"):
    hf_io.load_pretrained(str(tmp_path))


def test_unsupported_architecture_in_config(saved_llama):
  config = json.loads((saved_llama / "config.json").read_text())
  config["model_type"] = "mistral"
  (saved_llama / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match="model_type='mistral'"):
    hf_io.load_pretrained(str(saved_llama))


def test_tensor_shape_does_not_match_config(saved_llama):
  config = json.loads((saved_llama / "config.json").read_text())
  config["intermediate_size"] = 80
  (saved_llama / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf_io.CheckpointError, match=r"'model.layers.0.mlp.gate_proj.weight'.*\(64, 32\).*\(80, 32\)"):
    hf_io.load_pretrained(str(saved_llama))


def test_missing_tensor(saved_llama):
  file = str(saved_llama / "model.safetensors")
  tensors = safetensors.numpy.load_file(file)
  del tensors["model.layers.1.self_attn.v_proj.weight"]
  safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(hf_io.CheckpointError, match="no tensor 'model.layers.1.self_attn.v_proj.weight'"):
    hf_io.load_pretrained(str(saved_llama))


def test_unsupported_gguf_architecture(tmp_path):
  path = str(tmp_path / "other.gguf")
  writer = gguf.GGUFWriter(path, "gemma3")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ConfigError, match="architecture 'gemma3'"):
    hf_io.load_pretrained(path)


def test_not_a_gguf_file(tmp_path):
  (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
  with pytest.raises(hf_io.CheckpointError, match="not a .gguf"):
    hf_io.load_pretrained(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("content, reason", [
    (b"{\"model_type\": \"llama\",", "Expecting property name enclosed in double quotes"),
    (b"\xff\xfe garbage", "'utf-8' codec can't decode byte 0xff"),
])
def test_config_json_that_is_not_json(saved_llama, content, reason):
  config_path = str(saved_llama / "config.json")
  (saved_llama / "config.json").write_bytes(content)
  with pytest.raises(hf_io.CheckpointError) as error:
    hf_io.load_pretrained(str(saved_llama))
  message = str(error.value)
  assert message.startswith(f"{config_path!r} is not valid JSON ({reason}"), message
  assert message.endswith("; expected a Hugging Face config.json.")


def test_config_json_that_is_not_an_object(saved_llama):
  (saved_llama / "config.json").write_text("[1, 2]")
  with pytest.raises(hf_io.CheckpointError, match=r"config.json' holds a JSON list; expected a Hugging Face "
                                                  r"config.json \(a JSON object\)"):
    hf_io.load_pretrained(str(saved_llama))


@pytest.mark.parametrize("damage, reason", [
    (lambda raw: raw[:len(raw) // 2], "incomplete metadata, file not fully covered"),
    (lambda raw: b"", "header too small"),
    (lambda raw: b"\x00" * 7 + b"\x7f" + raw[8:], "header too large"),
])
def test_corrupt_safetensors(saved_llama, damage, reason):
  file = saved_llama / "model.safetensors"
  file.write_bytes(damage(file.read_bytes()))
  with pytest.raises(hf_io.CheckpointError) as error:
    hf_io.load_pretrained(str(saved_llama))
  assert str(error.value) == (f"weights file {str(file)!r} is not a valid safetensors file ({reason}); expected "
                              "the weights of a Hugging Face checkpoint.")


def _llama_gguf(path: str, *, head_count: bool = True) -> str:
  """A 1-layer Llama GGUF header with one tensor (enough for the reader to get to the fields)."""
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_block_count(1)
  writer.add_embedding_length(8)
  writer.add_feed_forward_length(16)
  if head_count:
    writer.add_head_count(2)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.mark.parametrize("keep", [0, 4, 30, -1])
def test_truncated_gguf(tmp_path, keep):
  path = _llama_gguf(str(tmp_path / "model.gguf"))
  raw = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(raw[:keep] if keep >= 0 else raw[:-1])
  with pytest.raises(ConfigError, match=f"^{re.escape(repr(path))} is not a readable GGUF file \\(.+\\); expected "
                                        "a complete llama.cpp GGUF file.$"):
    hf_io.load_pretrained(path)


def test_gguf_without_a_required_field(tmp_path):
  path = _llama_gguf(str(tmp_path / "model.gguf"), head_count=False)
  with pytest.raises(ConfigError, match="GGUF file .*model.gguf lacks the field 'llama.attention.head_count'"):
    hf_io.load_pretrained(path)
