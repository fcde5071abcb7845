"""Torch-free GGUF import for Llama-architecture files (dequantized to float32 with the `gguf` package's numpy code).

llama.cpp's converter stores tensors under its own names and, for the query and key projections, with the rows
of each head permuted: Hugging Face's rotate-half RoPE pairs dimension j with j + H/2, llama.cpp's kernel pairs
2j with 2j + 1, so the converter interleaves the two halves of every head. `_unpermute` undoes that per head.

The tokenizer comes from the GGUF metadata too (vocabulary, merges, token types, the pre-tokenizer name) and is
rebuilt with the `tokenizers` library; its tokenizer.json/tokenizer_config.json text travels with the model.
"""

from __future__ import annotations

import json

import gguf
import numpy as np

from models.config import ConfigError, DecoderConfig

# llama.cpp tensor name (per layer, after "blk.{i}.") -> Hugging Face name (after "model.layers.{i}.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
# GGUF token types (llama.cpp's llama_token_type): 3 = control, 4 = user-defined.
_CONTROL, _USER_DEFINED = 3, 4


def _field(reader: gguf.GGUFReader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _required(reader: gguf.GGUFReader, key: str, path: str):
  value = _field(reader, key)
  if value is None:
    raise ConfigError(f"GGUF file {path} lacks the field {key!r}; expected a complete llama.cpp GGUF file.")
  return value


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's per-head row interleave of q/k projections ([heads * H, D] -> same shape)."""
  rows = w.shape[0]
  return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(reader: gguf.GGUFReader, path: str) -> DecoderConfig:
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ConfigError(f"GGUF file {path} has architecture {arch!r}; o1jax reads 'llama' GGUF files.")
  if reader.fields.get("llama.rope.scaling.type") is not None or any(
      t.name == "rope_freqs.weight" for t in reader.tensors):
    raise ConfigError(f"GGUF file {path} uses RoPE frequency scaling, which the GGUF reader does not support; "
                      "load the Hugging Face checkpoint instead.")
  tokens = _field(reader, "tokenizer.ggml.tokens", [])
  num_heads = int(_required(reader, "llama.attention.head_count", path))
  d_model = int(_required(reader, "llama.embedding_length", path))
  names = {t.name for t in reader.tensors}
  eos = _field(reader, "tokenizer.ggml.eos_token_id")
  return DecoderConfig(
      family="llama",
      vocab_size=int(_field(reader, "llama.vocab_size", len(tokens))),
      d_model=d_model,
      num_layers=int(_required(reader, "llama.block_count", path)),
      num_heads=num_heads,
      num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", num_heads)),
      head_dim=int(_field(reader, "llama.attention.key_length", d_model // num_heads)),
      ffw_dim=int(_required(reader, "llama.feed_forward_length", path)),
      rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(_field(reader, "llama.rope.freq_base", 10_000.0)),
      max_position_embeddings=int(_field(reader, "llama.context_length", 8192)),
      tie_embeddings="output.weight" not in names,
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_ids=() if eos is None else (int(eos),),
      pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
  )


def hf_tensors_from_gguf(reader: gguf.GGUFReader, config: DecoderConfig, path: str) -> dict[str, np.ndarray]:
  """All tensors dequantized to float32, under their Hugging Face names, q/k rows un-permuted."""
  out = {}
  for tensor in reader.tensors:
    name = tensor.name
    if name in _GLOBAL_NAMES:
      hf_name = _GLOBAL_NAMES[name]
    elif name.startswith("blk."):
      _, layer, local = name.split(".", 2)
      if local not in _LAYER_NAMES:
        raise ConfigError(f"GGUF file {path} has tensor {name!r}, which a Llama decoder does not have.")
      hf_name = f"model.layers.{layer}.{_LAYER_NAMES[local]}"
    else:
      raise ConfigError(f"GGUF file {path} has tensor {name!r}, which a Llama decoder does not have.")
    value = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    if _is_layer_tensor(name, "attn_q.weight"):
      value = _unpermute(value, config.num_heads)
    elif _is_layer_tensor(name, "attn_k.weight"):
      value = _unpermute(value, config.num_kv_heads)
    out[hf_name] = value
  return out


def _is_layer_tensor(name: str, local: str) -> bool:
  return name.startswith("blk.") and name.endswith("." + local)


def tokenizer_files_from_gguf(reader: gguf.GGUFReader, path: str) -> dict[str, str]:
  """tokenizer.json + tokenizer_config.json text for a byte-level BPE ("gpt2") GGUF tokenizer.

  The pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre`: "smollm" splits every digit on its own before the
  GPT-2 byte-level split (as SmolLM2's own tokenizer.json does); "gpt2"/"default" is the plain byte-level split.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise ConfigError(f"GGUF file {path} has a {kind!r} tokenizer; o1jax rebuilds byte-level BPE ('gpt2') ones.")
  pre = _field(reader, "tokenizer.ggml.pre", "default")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  types = _field(reader, "tokenizer.ggml.token_type")
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False, byte_fallback=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  if pre == "smollm":
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ("gpt2", "default"):
    tokenizer.pre_tokenizer = byte_level
  else:
    raise ConfigError(f"GGUF file {path} uses pre-tokenizer {pre!r}; o1jax knows 'smollm', 'gpt2' and 'default'.")
  tokenizer.decoder = decoders.ByteLevel()
  special = [AddedToken(tokens[i], special=True, normalized=False)
             for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
  tokenizer.add_special_tokens(special)

  def token(key):
    index = _field(reader, key)
    return None if index is None else tokens[int(index)]

  tokenizer_config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": token("tokenizer.ggml.bos_token_id"),
      "eos_token": token("tokenizer.ggml.eos_token_id"),
      "unk_token": token("tokenizer.ggml.unknown_token_id"),
      "pad_token": token("tokenizer.ggml.padding_token_id"),
      "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
      "add_eos_token": False,
      "clean_up_tokenization_spaces": False,
      "model_max_length": int(_field(reader, "llama.context_length", 8192)),
  }
  template = _field(reader, "tokenizer.chat_template")
  if template is not None:
    tokenizer_config["chat_template"] = template
  return {"tokenizer.json": tokenizer.to_str(),
          "tokenizer_config.json": json.dumps(tokenizer_config, indent=2)}


def read_gguf(path: str) -> tuple[DecoderConfig, dict[str, np.ndarray], dict[str, str]]:
  """Reads a Llama GGUF file: (config, HF-named float32 tensors, tokenizer files)."""
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # the gguf package raises bare ValueError/struct errors on foreign files
    raise ConfigError(f"{path!r} is not a readable GGUF file ({e}); expected a complete llama.cpp GGUF file."
                      ) from None
  config = config_from_gguf(reader, path)
  return config, hf_tensors_from_gguf(reader, config, path), tokenizer_files_from_gguf(reader, path)
