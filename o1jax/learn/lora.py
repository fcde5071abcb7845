"""LoRA on the decoder's stacked layer weights, as pure functions over plain dicts of arrays.

Legend: L layers, D model dim, N query heads, K kv heads, H head dim, F feed-forward dim, r the LoRA rank.

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
w.r.t. the adapter alone; the base weights stay frozen:

  adapter = lora.init(weights, cfg, key)
  logits = decoder.full_logits(lora.merge(weights, adapter, cfg), tokens, config=model_config)

Merging materialises full-size weights once per step. That keeps the decoder untouched (one forward for base and
adapted models, the fused q/k/v and gate/up projections included), at the cost of one weight-sized temporary per
target (and its cotangent in the backward pass) instead of two thin extra matmuls per projection.

An adapter travels as one safetensors file (`save` / `load`) with flat keys "layers.<target>.a|b", optional extra
arrays under "extra.<name>" (e.g. embedding rows of new special tokens) and the LoraConfig as JSON in the header.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

Adapter = dict[str, Any]  # {"layers": {target: {"a": [L, *in, r], "b": [L, r, *out]}}}

# How many leading (after L) axes of each projection are contracted with the layer input.
INPUT_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

_FORMAT = "o1jax-lora"
_EXPECTED_FILE = "expected a LoRA adapter written by launch.pretrain (lora.save)"


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
         dtype: jnp.dtype | str = jnp.float32) -> Adapter:
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


def _check_adapter(layers: Mapping[str, Any], adapter: Adapter, config: LoraConfig) -> None:
  if set(adapter["layers"]) != set(config.targets):
    raise ValueError(f"adapter holds targets {sorted(adapter['layers'])}; the LoRA config names "
                     f"{sorted(config.targets)}.")
  for target in config.targets:
    expected = factor_shapes(tuple(layers[target].shape), target, config.rank)
    got = (tuple(adapter["layers"][target]["a"].shape), tuple(adapter["layers"][target]["b"].shape))
    if got != expected:
      raise ValueError(f"adapter for {target!r} has shapes a {got[0]}, b {got[1]}; weight {target!r} "
                       f"{tuple(layers[target].shape)} at rank {config.rank} expects a {expected[0]}, b {expected[1]}.")


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [L, *in, r] @ b [L, r, *out] -> [L, *in, *out], contracting r layer by layer (unscaled)."""
  in_axes = "ijk"[:a.ndim - 2]
  out_axes = "uvw"[:b.ndim - 2]
  return jnp.einsum(f"l{in_axes}r,lr{out_axes}->l{in_axes}{out_axes}", a, b)


def merge(weights: Mapping[str, Any], adapter: Adapter, config: LoraConfig) -> dict[str, Any]:
  """The decoder weights with every target replaced by W + (alpha / r) * a @ b; everything else as given.

  Pure and jittable; differentiable w.r.t. the adapter (and the weights). The update is computed in the adapter's
  dtype and added in the weight's dtype, so the result keeps the weights' dtypes.
  """
  layers = _layer_weights(weights)
  _check_targets(layers, config)
  _check_adapter(layers, adapter, config)
  merged_layers = dict(layers)
  for target in config.targets:
    w = layers[target]
    factors = adapter["layers"][target]
    merged_layers[target] = w + (config.scale * delta(factors["a"], factors["b"])).astype(w.dtype)
  return {**weights, "layers": merged_layers}


def save(path: str | os.PathLike, adapter: Adapter, config: LoraConfig, *,
         extra: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None) -> None:
  """Writes the adapter (plus `extra` arrays and JSON `metadata`) as one safetensors file.

  Args:
    path: the file to write.
    adapter: from `init` or training.
    config: the adapter's LoraConfig (stored as JSON in the header).
    extra: named arrays to bundle, e.g. {"embed_rows": [new, D]}; stored as "extra.<name>".
    metadata: any JSON dict (base model, step, ...).
  """
  if set(adapter["layers"]) != set(config.targets):
    raise ValueError(f"adapter holds targets {sorted(adapter['layers'])}; the LoRA config names "
                     f"{sorted(config.targets)}.")
  try:
    metadata_json = json.dumps(dict(metadata or {}), allow_nan=False)
  except (TypeError, ValueError) as e:
    raise TypeError(f"LoRA metadata must hold only JSON values: {e}.") from None
  tensors = {}
  for target in config.targets:
    for factor in ("a", "b"):
      tensors[f"layers.{target}.{factor}"] = np.asarray(adapter["layers"][target][factor])
  for name, array in (extra or {}).items():
    tensors[f"extra.{name}"] = np.asarray(array)
  header = {"format": _FORMAT, "lora_config": config.to_json(), "metadata": metadata_json}
  safetensors.numpy.save_file(tensors, os.fspath(path), metadata=header)


def load(path: str | os.PathLike) -> tuple[Adapter, LoraConfig, dict[str, np.ndarray], dict[str, Any]]:
  """Reads a file written by `save`: (adapter, config, extra, metadata).

  Arrays come back as numpy arrays, bit for bit and dtype for dtype as saved (`jax.device_put` them where they
  should live). A missing file raises FileNotFoundError (IsADirectoryError for a directory); a file that is not
  safetensors (empty, truncated, random bytes) or not an adapter raises ValueError, each naming the file.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f"LoRA adapter file {path!r} is a directory; {_EXPECTED_FILE}.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"LoRA adapter file {path!r} does not exist.")
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
    if group == "extra":
      extra[rest] = array
    elif group == "layers" and rest.count(".") == 1 and rest.split(".")[1] in ("a", "b"):
      target, factor = rest.split(".")
      layers.setdefault(target, {})[factor] = array
    else:
      raise ValueError(f"{path!r} holds tensor {name!r}; expected 'layers.<target>.a|b' or 'extra.<name>'.")
  for target in config.targets:
    if set(layers.get(target, {})) != {"a", "b"}:
      raise ValueError(f"{path!r} lacks factor a or b of LoRA target {target!r}.")
  if set(layers) != set(config.targets):
    raise ValueError(f"{path!r} holds targets {sorted(layers)}; its LoRA config names {sorted(config.targets)}.")
  if not isinstance(metadata, dict):
    raise ValueError(f"LoRA adapter file {path!r} has metadata of type {type(metadata).__name__}; "
                     f"{_EXPECTED_FILE}.")
  return {"layers": layers}, config, extra, metadata
