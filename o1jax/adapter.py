"""LoRA adapters and the adapter file: the math (init, merge) and one writer beside one reader.

Legend: L layers, D model dim, N query heads, K kv heads, H head dim, F feed-forward dim, r the LoRA rank,
R new token rows (the LLaMA-O1 special tokens added to the base vocabulary).

Inference (`o1jax.pretrained.load`) and training (`o1jax.learn`) both use this module, which imports neither.

A target weight W (one of the per-layer projections of `models.decoder.weight_shapes`, stacked over L) gets two
factors, `a` over W's contracted input axes and `b` over its output axes, and the model runs with

  W' = W + (alpha / r) * a @ b            (per layer, contracting the rank axis)

  weight  W                a                 b
  q       [L, D, N, H]     [L, D, r]         [L, r, N, H]
  k, v    [L, D, K, H]     [L, D, r]         [L, r, K, H]
  o       [L, N, H, D]     [L, N, H, r]      [L, r, D]
  gate/up [L, D, F]        [L, D, r]         [L, r, F]
  down    [L, F, D]        [L, F, r]         [L, r, D]

`a` starts as Gaussian noise with standard deviation 1 / sqrt(fan-in) and `b` at zero (as in the LoRA paper), so
the adapted model starts out equal to the base model, and the first gradient reaches `b` only. Training differentiates
w.r.t. the factors alone; the base weights stay frozen:

  factors = adapter.init(weights, cfg, key)
  logits = decoder.full_logits(adapter.merge(weights, factors, cfg), tokens, config=model_config)

Merging materialises full-size weights once per step. That keeps the decoder untouched (one forward for base and
adapted models, the fused q/k/v and gate/up projections included), at the cost of one weight-sized temporary per
target (and its cotangent in the backward pass) instead of two thin extra matmuls per projection.

An adapter travels as one safetensors file, written by `write` and read by `read`:

  adapter.write(path, factors, cfg, new_rows=rows, base="smollm2-135m-instruct", base_vocab=49152,
                special_tokens=thoughts.SPECIAL_TOKENS, dtype="bfloat16")
  file = adapter.read(path)                  # AdapterFile: config, factors, new_rows, new_head, base, ...
  file.check(base="smollm2-135m-instruct", base_vocab=49152, special_tokens=thoughts.SPECIAL_TOKENS)

  tensors   "layers.<target>.a", "layers.<target>.b"   the factors, one pair per target
            "extra.new_rows"    [R, D]                 the new tokens' embedding rows
            "extra.new_head"    [D, R]                 their head columns (untied heads only)
  header    "format": "o1jax-lora", "lora_config": the LoraConfig as JSON, "metadata": JSON with "base" (the
            base model's name or path), "base_vocab" (the first new id), "special_tokens" (the new tokens in
            id order) and any further fields the writer was given.

The committed adapters (configs/adapters/*.safetensors) are such files; their format predates this module (it
began as `o1jax.learn.lora`'s) and must stay readable as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

Factors = dict[str, Any]  # {"layers": {target: {"a": [L, *in, r], "b": [L, r, *out]}}}

# How many leading (after L) axes of each projection are contracted with the layer input.
INPUT_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

_FORMAT = "o1jax-lora"  # the header's "format" entry (kept from the module's first name, o1jax.learn.lora)
_EXPECTED_FILE = "expected a LoRA adapter written by launch.pretrain (o1jax.adapter.write)"
_WRITTEN_BY = "expected an adapter written by launch.pretrain"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which projections get an adapter, and its size.

  Attributes:
    rank: r, the inner dimension of a @ b.
    alpha: the update is scaled by alpha / rank (so changing the rank does not change the update's size).
    targets: names of the adapted layer weights, a subset of ALL_TARGETS.
  """

  rank: int
  alpha: float
  targets: tuple[str, ...] = ALL_TARGETS

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoRA rank must be a positive integer; got {self.rank!r}.")
    if not self.alpha > 0:
      raise ValueError(f"LoRA alpha must be positive; got {self.alpha!r}.")
    if not self.targets:
      raise ValueError(f"LoRA targets must name at least one of {ALL_TARGETS}; got none.")
    for target in self.targets:
      if target not in INPUT_AXES:
        raise ValueError(f"unknown LoRA target {target!r}; expected some of {ALL_TARGETS}.")
    if len(set(self.targets)) != len(self.targets):
      raise ValueError(f"LoRA targets {self.targets} name a weight twice.")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def to_json(self) -> str:
    return json.dumps({"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)})

  @classmethod
  def from_json(cls, text: str) -> LoraConfig:
    fields = json.loads(text)
    return cls(rank=int(fields["rank"]), alpha=float(fields["alpha"]), targets=tuple(fields["targets"]))


def _layer_weights(weights: Mapping[str, Any]) -> Mapping[str, Any]:
  layers = weights["layers"] if "layers" in weights else None
  if not isinstance(layers, Mapping):
    raise ValueError("LoRA needs the decoder's stacked weights ({'layers': {name: [L, ...]}}); got "
                     f"{'no layers' if layers is None else type(layers).__name__ + ' layers'}.")
  return layers


def _check_targets(layers: Mapping[str, Any], config: LoraConfig) -> None:
  for target in config.targets:
    if target not in layers:
      present = tuple(t for t in ALL_TARGETS if t in layers)
      raise ValueError(f"LoRA target {target!r} is not a layer weight of this model; expected some of {present}.")


def factor_shapes(weight_shape: tuple[int, ...], target: str, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The shapes of `a` [L, *in, r] and `b` [L, r, *out] for a stacked weight [L, *in, *out]."""
  num_in = INPUT_AXES[target]
  layers, in_axes, out_axes = weight_shape[0], weight_shape[1:1 + num_in], weight_shape[1 + num_in:]
  return (layers, *in_axes, rank), (layers, rank, *out_axes)


def init(weights: Mapping[str, Any], config: LoraConfig, key: jax.Array, *,
         dtype: jnp.dtype | str = jnp.float32) -> Factors:
  """A fresh adapter: `a` ~ normal(0, 1 / fan-in), `b` = 0.

  Args:
    weights: the decoder's weights (arrays or jax.ShapeDtypeStructs: only shapes are read).
    config: which targets, which rank.
    key: PRNG key for the `a` factors.
    dtype: the adapter's dtype (float32 by default, whatever the base weights are).

  Returns:
    {"layers": {target: {"a": [L, *in, r], "b": [L, r, *out]}}}.
  """
  layers = _layer_weights(weights)
  _check_targets(layers, config)
  shapes = tuple((target, *factor_shapes(tuple(layers[target].shape), target, config.rank))
                 for target in config.targets)
  return {"layers": _init_factors(key, shapes, jnp.dtype(dtype))}


@functools.partial(jax.jit, static_argnames=("shapes", "dtype"))
def _init_factors(key: jax.Array, shapes: tuple, dtype: jnp.dtype) -> dict[str, dict[str, jax.Array]]:
  """All `a` factors are slices of one normal draw: XLA:CPU compiles every `jax.random.normal` call on its own
  (measured on the project's 2-core machine: 2 s for one draw, 9-11 s for seven draws in one jit, 2 s for one)."""
  sizes = [math.prod(a_shape) for _, a_shape, _ in shapes]
  noise = jax.random.normal(key, (sum(sizes),), jnp.float32)
  factors, start = {}, 0
  for (target, a_shape, b_shape), size in zip(shapes, sizes):
    fan_in = math.prod(a_shape[1:-1])
    a = noise[start:start + size].reshape(a_shape) / math.sqrt(fan_in)
    factors[target] = {"a": a.astype(dtype), "b": jnp.zeros(b_shape, dtype)}
    start += size
  return factors


def _check_factors(layers: Mapping[str, Any], factors: Factors, config: LoraConfig) -> None:
  if set(factors["layers"]) != set(config.targets):
    raise ValueError(f"adapter holds targets {sorted(factors['layers'])}; the LoRA config names "
                     f"{sorted(config.targets)}.")
  for target in config.targets:
    expected = factor_shapes(tuple(layers[target].shape), target, config.rank)
    got = (tuple(factors["layers"][target]["a"].shape), tuple(factors["layers"][target]["b"].shape))
    if got != expected:
      raise ValueError(f"adapter for {target!r} has shapes a {got[0]}, b {got[1]}; weight {target!r} "
                       f"{tuple(layers[target].shape)} at rank {config.rank} expects a {expected[0]}, b {expected[1]}.")


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [L, *in, r] @ b [L, r, *out] -> [L, *in, *out], contracting r layer by layer (unscaled)."""
  in_axes = "ijk"[:a.ndim - 2]
  out_axes = "uvw"[:b.ndim - 2]
  return jnp.einsum(f"l{in_axes}r,lr{out_axes}->l{in_axes}{out_axes}", a, b)


def merge(weights: Mapping[str, Any], factors: Factors, config: LoraConfig) -> dict[str, Any]:
  """The decoder weights with every target replaced by W + (alpha / r) * a @ b; everything else as given.

  Pure and jittable; differentiable w.r.t. the factors (and the weights). The update is computed in the factors'
  dtype and added in the weight's dtype, so the result keeps the weights' dtypes.
  """
  layers = _layer_weights(weights)
  _check_targets(layers, config)
  _check_factors(layers, factors, config)
  merged_layers = dict(layers)
  for target in config.targets:
    w = layers[target]
    a, b = factors["layers"][target]["a"], factors["layers"][target]["b"]
    merged_layers[target] = w + (config.scale * delta(a, b)).astype(w.dtype)
  return {**weights, "layers": merged_layers}


# --- the adapter file ------------------------------------------------------------------------------------------

_FORMAT_METADATA = ("base", "base_vocab", "special_tokens")
_EXTRA_ARRAYS = ("new_rows", "new_head")


def write(path: str | os.PathLike, factors: Factors, config: LoraConfig, *, new_rows: Any, new_head: Any = None,
          base: str, base_vocab: int, special_tokens: Sequence[str], dtype: str | None = None,
          metadata: Mapping[str, Any] | None = None) -> None:
  """Writes an adapter as one safetensors file (the format is in the module docstring); `read` reads it back.

  Args:
    path: the file to write (its directory is made if missing).
    factors: from `init` or training: {"layers": {target: {"a", "b"}}} for exactly config.targets.
    config: the adapter's LoraConfig.
    new_rows: [R, D] embedding rows of the tokens added to the base vocabulary.
    new_head: [D, R] head columns of those tokens, for a model whose head is not the embedding; else None.
    base: the base model's name or path (what `o1jax.pretrained.load` was given).
    base_vocab: the first id of the added tokens.
    special_tokens: the added tokens, in id order.
    dtype: every array is cast to this dtype (e.g. "bfloat16"); None keeps each array's own dtype.
    metadata: further JSON fields for the header (e.g. the step), beside base, base_vocab and special_tokens.
  """
  if set(factors["layers"]) != set(config.targets):
    raise ValueError(f"adapter holds targets {sorted(factors['layers'])}; the LoRA config names "
                     f"{sorted(config.targets)}.")
  taken = sorted(set(metadata or {}) & set(_FORMAT_METADATA))
  if taken:
    raise ValueError(f"adapter metadata fields {taken} are written from the arguments of the same name; pass "
                     "them there.")
  fields = {"base": base, "base_vocab": base_vocab, "special_tokens": list(special_tokens), **(metadata or {})}
  try:
    metadata_json = json.dumps(fields, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise TypeError(f"adapter metadata must hold only JSON values: {e}.") from None
  # Cast with XLA's conversion (round to nearest even), as the committed adapters were cast.
  # C order: safetensors writes an array's memory as it lies, so a transposed view would be stored scrambled.
  cast = lambda a: np.ascontiguousarray(a if dtype is None else jnp.asarray(a, jnp.dtype(dtype)))
  tensors = {}
  for target in config.targets:
    for factor in ("a", "b"):
      tensors[f"layers.{target}.{factor}"] = cast(factors["layers"][target][factor])
  tensors["extra.new_rows"] = cast(new_rows)
  if new_head is not None:
    tensors["extra.new_head"] = cast(new_head)
  header = {"format": _FORMAT, "lora_config": config.to_json(), "metadata": metadata_json}
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  safetensors.numpy.save_file(tensors, path, metadata=header)


@dataclasses.dataclass(frozen=True)
class AdapterFile:
  """An adapter file's contents (from `read`), arrays as numpy, bit for bit and dtype for dtype as written.

  Attributes:
    path: the file it was read from (named in every error about it).
    config: its LoraConfig.
    factors: {"layers": {target: {"a": [L, *in, r], "b": [L, r, *out]}}}.
    new_rows: [R, D] embedding rows of the added tokens.
    new_head: [D, R] their head columns, or None (a tied head: the rows are the head).
    metadata: the header's JSON metadata: "base", "base_vocab", "special_tokens" and any further fields.
  """

  path: str
  config: LoraConfig
  factors: Factors
  new_rows: np.ndarray
  new_head: np.ndarray | None
  metadata: dict[str, Any]

  @property
  def base(self) -> str | None:
    """The base model the adapter was trained on (None in a file that does not say)."""
    return self.metadata.get("base")

  @property
  def base_vocab(self) -> int:
    return self.metadata["base_vocab"]

  @property
  def special_tokens(self) -> tuple[str, ...]:
    return tuple(self.metadata["special_tokens"])

  def check(self, *, base: str, base_vocab: int, special_tokens: Sequence[str]) -> None:
    """Raises ValueError unless the adapter was trained on `base` with these special tokens from `base_vocab` on.

    (Whether its arrays fit the model's shapes is checked where they are applied, by `merge`.)
    """
    if list(self.metadata["special_tokens"]) != list(special_tokens) or self.base_vocab != base_vocab:
      raise ValueError(f"adapter {self.path!r} was trained for special tokens from id {self.base_vocab} "
                       f"({self.metadata['special_tokens']}); this model has them from id {base_vocab}.")
    if self.base not in (None, base):
      raise ValueError(f"adapter {self.path!r} was trained on {self.base!r}, not on {base!r}.")


def read(path: str | os.PathLike) -> AdapterFile:
  """Reads a file written by `write` (the format is in the module docstring).

  A missing file raises FileNotFoundError (IsADirectoryError for a directory); a file that is not safetensors
  (empty, truncated, random bytes), not an adapter, or an adapter without the format's metadata and rows raises
  ValueError, each naming the file. `AdapterFile.check` then says whether it belongs to a model.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f"LoRA adapter file {path!r} is a directory; {_EXPECTED_FILE}.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"adapter {path!r} does not exist; run launch.pretrain to make one.")
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      header = f.metadata() or {}
      tensors = {name: f.get_tensor(name) for name in f.keys()}
  except safetensors.SafetensorError as e:
    reason = str(e).removeprefix("Error while deserializing header: ")
    raise ValueError(f"LoRA adapter file {path!r} is not a valid safetensors file ({reason}); {_EXPECTED_FILE}."
                     ) from None
  if header.get("format") != _FORMAT or "lora_config" not in header:
    raise ValueError(f"{path!r} is not an o1jax LoRA adapter file (its header has no {_FORMAT!r} config); "
                     f"{_EXPECTED_FILE}.")
  try:
    config = LoraConfig.from_json(header["lora_config"])
    metadata = json.loads(header.get("metadata", "{}"))
  except (ValueError, KeyError, TypeError) as e:  # JSON, a missing field, a bad rank or target
    raise ValueError(f"LoRA adapter file {path!r} has an unreadable header ({type(e).__name__}: {e}); "
                     f"{_EXPECTED_FILE}.") from None
  layers: dict[str, dict[str, np.ndarray]] = {}
  extra: dict[str, np.ndarray] = {}
  for name, array in tensors.items():
    group, _, rest = name.partition(".")
    if group == "extra" and rest in _EXTRA_ARRAYS:
      extra[rest] = array
    elif group == "layers" and rest.count(".") == 1 and rest.split(".")[1] in ("a", "b"):
      target, factor = rest.split(".")
      layers.setdefault(target, {})[factor] = array
    else:
      raise ValueError(f"{path!r} holds tensor {name!r}; expected 'layers.<target>.a|b' or "
                       f"{' or '.join(repr('extra.' + e) for e in _EXTRA_ARRAYS)}.")
  for target in config.targets:
    if set(layers.get(target, {})) != {"a", "b"}:
      raise ValueError(f"{path!r} lacks factor a or b of LoRA target {target!r}.")
  if set(layers) != set(config.targets):
    raise ValueError(f"{path!r} holds targets {sorted(layers)}; its LoRA config names {sorted(config.targets)}.")
  if not isinstance(metadata, dict):
    raise ValueError(f"LoRA adapter file {path!r} has metadata of type {type(metadata).__name__}; "
                     f"{_EXPECTED_FILE}.")
  missing = [key for key in ("special_tokens", "base_vocab") if key not in metadata]
  missing += ["the new_rows array"] if "new_rows" not in extra else []
  if missing:
    raise ValueError(f"adapter {path!r} lacks {' and '.join(missing)}; {_WRITTEN_BY}.")
  return AdapterFile(path=path, config=config, factors={"layers": layers}, new_rows=extra["new_rows"],
                     new_head=extra.get("new_head"), metadata=metadata)
