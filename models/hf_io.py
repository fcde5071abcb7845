"""Hugging Face checkpoints: safetensors + config.json in, and out again so that transformers loads the export.

  from models import hf_io
  model = hf_io.load_pretrained(path)    # a directory (config.json + *.safetensors) or a .gguf file
  logits = model(tokens)                 # [B, T] int32 -> [B, T, V] float32
  hf_io.save_pretrained(model, out_dir)  # transformers.AutoModelForCausalLM.from_pretrained(out_dir) loads it

The mapping between Hugging Face tensor names and o1jax weights is the table `_LAYER_TABLE`: each row names the
o1jax weight, the HF tensor (per layer) and how the layout changes. HF stores projections as torch Linear weights
[out, in]; o1jax stores einsum weights with named head axes ([D, N, H] for queries, [N, H, D] for the output).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Callable

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.flax

from models import decoder as decoder_lib
from models.config import ConfigError, DecoderConfig

# Files of a Hugging Face tokenizer that travel with a checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
# Tokenizer files read as bytes (the others are text); `Decoder.tokenizer_files` holds them as bytes.
BINARY_TOKENIZER_FILES = ("tokenizer.model",)


class CheckpointError(ValueError):
  """A checkpoint that cannot be read as the decoder its config describes."""


@dataclasses.dataclass(frozen=True)
class _Row:
  ours: str                     # o1jax layer weight name
  hf: str                       # HF name inside model.layers.{i}.
  to_ours: Callable             # (hf array [out, in], config) -> o1jax array
  to_hf: Callable               # (o1jax array, config) -> hf array


def _heads_in(heads: Callable[[DecoderConfig], int]) -> tuple[Callable, Callable]:
  """[heads * H, D] <-> [D, heads, H] (q, k, v projections)."""
  def to_ours(a, c):
    return a.reshape(heads(c), c.head_dim, c.d_model).transpose(2, 0, 1)

  def to_hf(a, c):
    return a.transpose(1, 2, 0).reshape(heads(c) * c.head_dim, c.d_model)
  return to_ours, to_hf


def _same(a, c):
  return a


def _transpose(a, c):
  return a.T


def _o_to_ours(a, c):  # [D, N * H] -> [N, H, D]
  return a.reshape(c.d_model, c.num_heads, c.head_dim).transpose(1, 2, 0)


def _o_to_hf(a, c):  # [N, H, D] -> [D, N * H]
  return a.transpose(2, 0, 1).reshape(c.d_model, c.num_heads * c.head_dim)


_q = _heads_in(lambda c: c.num_heads)
_kv = _heads_in(lambda c: c.num_kv_heads)
_COMMON_ROWS = (
    _Row("attn_norm", "input_layernorm.weight", _same, _same),
    _Row("q", "self_attn.q_proj.weight", *_q),
    _Row("k", "self_attn.k_proj.weight", *_kv),
    _Row("v", "self_attn.v_proj.weight", *_kv),
    _Row("o", "self_attn.o_proj.weight", _o_to_ours, _o_to_hf),
    _Row("gate", "mlp.gate_proj.weight", _transpose, _transpose),
    _Row("up", "mlp.up_proj.weight", _transpose, _transpose),
    _Row("down", "mlp.down_proj.weight", _transpose, _transpose),
)
# The same HF name means different norms in the two families: Llama's "post_attention_layernorm" is the norm
# before the MLP, Gemma-2's is the norm after attention (Gemma-2 has a separate pre_feedforward_layernorm).
_LAYER_TABLE = {
    "llama": _COMMON_ROWS + (_Row("ffw_norm", "post_attention_layernorm.weight", _same, _same),),
    "gemma2": _COMMON_ROWS + (
        _Row("post_attn_norm", "post_attention_layernorm.weight", _same, _same),
        _Row("ffw_norm", "pre_feedforward_layernorm.weight", _same, _same),
        _Row("post_ffw_norm", "post_feedforward_layernorm.weight", _same, _same),
    ),
}


def _default_dtype() -> str:
  import jax
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def weights_from_hf(tensors: dict[str, np.ndarray], config: DecoderConfig, source: str) -> dict:
  """HF-named tensors -> o1jax weights (stacked layers), checking every name and shape."""
  def get(name: str, shape: tuple[int, ...]):
    if name not in tensors:
      raise CheckpointError(f"checkpoint {source} has no tensor {name!r}.")
    value = tensors[name]
    if tuple(value.shape) != tuple(shape):
      raise CheckpointError(
          f"tensor {name!r} in {source} has shape {tuple(value.shape)}; config.json implies {tuple(shape)}.")
    return value

  c = config
  dtype = jnp.dtype(c.param_dtype)
  hf_shapes = _hf_layer_shapes(c)
  layers = {}
  for row in _LAYER_TABLE[c.family]:
    per_layer = [row.to_ours(get(f"model.layers.{i}.{row.hf}", hf_shapes[row.hf]), c) for i in range(c.num_layers)]
    layers[row.ours] = jnp.stack(per_layer).astype(dtype)
  weights = {
      "embed": jnp.asarray(get("model.embed_tokens.weight", (c.vocab_size, c.d_model)), dtype),
      "layers": layers,
      "final_norm": jnp.asarray(get("model.norm.weight", (c.d_model,)), dtype),
  }
  if not c.tie_embeddings:
    weights["head"] = jnp.asarray(get("lm_head.weight", (c.vocab_size, c.d_model)).T, dtype)
  return weights


def _hf_layer_shapes(c: DecoderConfig) -> dict[str, tuple[int, ...]]:
  shapes = decoder_lib.weight_shapes(c)["layers"]
  out = {}
  for row in _LAYER_TABLE[c.family]:
    ours = np.zeros(shapes[row.ours][1:], np.int8)
    out[row.hf] = row.to_hf(ours, c).shape
  return out


def weights_to_hf(weights: dict, config: DecoderConfig) -> dict[str, np.ndarray]:
  """o1jax weights -> HF-named tensors (contiguous host arrays in the weights' dtype)."""
  c = config
  out = {"model.embed_tokens.weight": weights["embed"], "model.norm.weight": weights["final_norm"]}
  for row in _LAYER_TABLE[c.family]:
    stacked = np.asarray(weights["layers"][row.ours])
    for i in range(c.num_layers):
      out[f"model.layers.{i}.{row.hf}"] = row.to_hf(stacked[i], c)
  if not c.tie_embeddings:
    out["lm_head.weight"] = np.asarray(weights["head"]).T
  return {name: np.ascontiguousarray(np.asarray(a)) for name, a in out.items()}


def _read_safetensors(directory: str) -> dict[str, np.ndarray]:
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise CheckpointError(f"{directory} has a config.json but no *.safetensors file.")
  tensors: dict[str, np.ndarray] = {}
  for file in files:
    try:
      with safetensors.safe_open(file, framework="flax") as f:
        for name in f.keys():
          tensors[name] = np.asarray(f.get_tensor(name))
    except safetensors.SafetensorError as e:  # empty, truncated, or not safetensors at all
      reason = str(e).removeprefix("Error while deserializing header: ")
      raise CheckpointError(f"weights file {file!r} is not a valid safetensors file ({reason}); expected the "
                            "weights of a Hugging Face checkpoint.") from None
  return tensors


def load_pretrained(path: str, *, dtype: str | None = None, param_dtype: str | None = None
                    ) -> decoder_lib.Decoder:
  """Loads a Hugging Face directory or a GGUF file as a Decoder.

  Args:
    path: a directory with config.json and *.safetensors (sharded or not), or a .gguf file.
    dtype: activation dtype; default float32 on CPU, bfloat16 on accelerators.
    param_dtype: weight dtype; default the same as dtype.

  Returns:
    The Decoder, with `tokenizer_files` holding the tokenizer files found beside the weights (or built from the
    GGUF metadata).
  """
  dtype = dtype or _default_dtype()
  param_dtype = param_dtype or dtype
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path {path!r} does not exist.")
  if os.path.isfile(path):
    if not path.endswith(".gguf"):
      raise CheckpointError(f"{path!r} is a file but not a .gguf; pass a GGUF file or a Hugging Face directory.")
    from models import gguf_io
    config, tensors, tokenizer_files = gguf_io.read_gguf(path)
    config = config.replace(dtype=dtype, param_dtype=param_dtype)
    model = decoder_lib.Decoder(config, weights=weights_from_hf(tensors, config, path))
    model.tokenizer_files = tokenizer_files
    return model
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise CheckpointError(f"directory {path!r} has no config.json.")
  with open(config_path, "rb") as f:
    try:
      hf_config = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{config_path!r} is not valid JSON ({e}); expected a Hugging Face config.json."
                            ) from None
  if not isinstance(hf_config, dict):
    raise CheckpointError(f"{config_path!r} holds a JSON {type(hf_config).__name__}; expected a Hugging Face "
                          "config.json (a JSON object).")
  config = DecoderConfig.from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
  weights = weights_from_hf(_read_safetensors(path), config, path)
  model = decoder_lib.Decoder(config, weights=weights)
  for name in TOKENIZER_FILES:
    file = os.path.join(path, name)
    if os.path.isfile(file):
      # tokenizer.model is a sentencepiece protobuf: bytes, not text.
      with open(file, "rb" if name in BINARY_TOKENIZER_FILES else "r") as f:
        model.tokenizer_files[name] = f.read()
  return model


def save_pretrained(model: decoder_lib.Decoder, out_dir: str) -> None:
  """Writes model.safetensors + config.json (+ tokenizer files when the model has them: text, or bytes) to out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  tensors = weights_to_hf(model.weights(), model.config)
  safetensors.flax.save_file({k: jnp.asarray(v) for k, v in tensors.items()},
                             os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(model.config.to_hf(), f, indent=2)
  for name, content in model.tokenizer_files.items():
    with open(os.path.join(out_dir, name), "wb" if isinstance(content, bytes) else "w") as f:
      f.write(content)


__all__ = ["load_pretrained", "save_pretrained", "CheckpointError", "ConfigError"]
