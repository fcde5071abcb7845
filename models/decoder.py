"""The decoder: embed -> scan over stacked layers -> final norm -> head -> final softcap.

Legend: B batch, T time, S cache slots, D model dim, N query heads, K kv heads, H head dim, F feed-forward dim,
V vocab, L layers.

The Flax NNX `Decoder` only holds parameters. The computation is the pure function `forward` over a plain dict of
arrays (`Decoder.weights()`), so it can be jitted, sharded and differentiated without NNX in the traced code:

  weights = model.weights()                       # {"embed": [V, D], "layers": {...: [L, ...]}, ...}
  hidden, cache = forward(weights, tokens, positions, config=cfg, cache=cache)
  logits = head_logits(weights, hidden, config=cfg)

Layer weights are stacked along a leading L axis and run with `jax.lax.scan`, so compile time does not grow with
depth. Gemma-2's alternating sliding window is a per-layer flag scanned alongside the weights.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import attention
from models import layers as L
from models import rope
from models.config import DecoderConfig

Weights = Mapping[str, Any]


def weight_shapes(config: DecoderConfig) -> dict[str, Any]:
  """The shape of every weight: {"embed", "layers": {name: (L, ...)}, "final_norm"[, "head"]}."""
  c = config
  per_layer = {
      "attn_norm": (c.d_model,),
      "q": (c.d_model, c.num_heads, c.head_dim),
      "k": (c.d_model, c.num_kv_heads, c.head_dim),
      "v": (c.d_model, c.num_kv_heads, c.head_dim),
      "o": (c.num_heads, c.head_dim, c.d_model),
      "ffw_norm": (c.d_model,),
      "gate": (c.d_model, c.ffw_dim),
      "up": (c.d_model, c.ffw_dim),
      "down": (c.ffw_dim, c.d_model),
  }
  if c.is_gemma:
    per_layer["post_attn_norm"] = (c.d_model,)
    per_layer["post_ffw_norm"] = (c.d_model,)
  shapes: dict[str, Any] = {
      "embed": (c.vocab_size, c.d_model),
      "layers": {name: (c.num_layers, *shape) for name, shape in per_layer.items()},
      "final_norm": (c.d_model,),
  }
  if not c.tie_embeddings:
    shapes["head"] = (c.d_model, c.vocab_size)
  return shapes


def weight_logical_axes(config: DecoderConfig) -> dict[str, Any]:
  """The logical axis names of every weight, in the layout of `weight_shapes` (one name per dimension).

  Names: "vocab", "embed" (d_model), "heads", "kv_heads", "head_dim", "mlp" (ffw_dim), "layers" (the stacked
  layer axis) and "norm" (a norm's scale). A mesh's rules map them onto mesh axes (o1jax.parallel.LOGICAL_RULES);
  the models package itself knows nothing of meshes.
  """
  per_layer = {
      "attn_norm": ("norm",),
      "q": ("embed", "heads", "head_dim"),
      "k": ("embed", "kv_heads", "head_dim"),
      "v": ("embed", "kv_heads", "head_dim"),
      "o": ("heads", "head_dim", "embed"),
      "ffw_norm": ("norm",),
      "gate": ("embed", "mlp"),
      "up": ("embed", "mlp"),
      "down": ("mlp", "embed"),
  }
  if config.is_gemma:
    per_layer["post_attn_norm"] = ("norm",)
    per_layer["post_ffw_norm"] = ("norm",)
  axes: dict[str, Any] = {
      "embed": ("vocab", "embed"),
      "layers": {name: ("layers", *names) for name, names in per_layer.items()},
      "final_norm": ("norm",),
  }
  if not config.tie_embeddings:
    axes["head"] = ("embed", "vocab")
  return axes


def _is_norm(name: str) -> bool:
  return name.endswith("norm")


def init_weights(config: DecoderConfig, key: jax.Array, scale: float = 0.02) -> dict[str, Any]:
  """Random weights: normal(0, scale) matrices; norms at identity (ones, or zeros for Gemma's 1 + scale)."""
  dtype = jnp.dtype(config.param_dtype)
  flat, treedef = jax.tree_util.tree_flatten_with_path(weight_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(flat))
  leaves = []
  for (path, shape), k in zip(flat, keys):
    name = path[-1].key
    if _is_norm(name):
      leaves.append(jnp.zeros(shape, dtype) if config.is_gemma else jnp.ones(shape, dtype))
    else:
      leaves.append((scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def check_weights(config: DecoderConfig, weights: Weights) -> None:
  """Raises ValueError naming the first missing, unexpected or wrongly shaped weight."""
  expected = weight_shapes(config)
  for group in ("embed", "final_norm", "head", "layers"):
    if (group in expected) != (group in weights):
      what = "missing" if group in expected else "unexpected (the config says the head is tied)"
      raise ValueError(f"weight {group!r} is {what}.")
  for name, shape in expected["layers"].items():
    if name not in weights["layers"]:
      raise ValueError(f"layer weight {name!r} is missing.")
  for path, shape in jax.tree_util.tree_flatten_with_path(expected, is_leaf=lambda x: isinstance(x, tuple))[0]:
    value = weights
    for p in path:
      value = value[p.key]
    if tuple(value.shape) != tuple(shape):
      name = "/".join(p.key for p in path)
      raise ValueError(f"weight {name!r} has shape {tuple(value.shape)}; the config expects {tuple(shape)}.")


def positions_from_mask(valid: jax.Array, start: jax.Array | int = 0) -> jax.Array:
  """[B, T] int32 positions of real tokens (start + count of real tokens before them), -1 for padding.

  Args:
    valid: [B, T] bool, True for real tokens.
    start: [B] or scalar, the position the first real token of each row takes.
  """
  start = jnp.asarray(start, jnp.int32)
  if start.ndim == 1:
    start = start[:, None]
  # The running count comes from two products with triangular matrices of ones (within chunks of 128 tokens,
  # then across chunks), not from a cumsum: XLA:CPU lowers a cumsum to a reduce-window tree whose last stage it
  # fuses, with per-element index arithmetic, into every consumer, and every layer's attention mask consumes the
  # positions (1 s of a 64 x 128-token SmolLM2 prefill). A product's result is materialised once. Exact: the
  # terms are 0 or 1 and the sums stay far below 2^24.
  B, T = valid.shape
  chunk = min(T, 128)
  chunks = -(-T // chunk)
  ones = lambda n, k: jnp.triu(jnp.ones((n, n), jnp.float32), k)
  exact = jax.lax.Precision.HIGHEST
  v = jnp.pad(valid.astype(jnp.float32), ((0, 0), (0, chunks * chunk - T))).reshape(B, chunks, chunk)
  within = jnp.dot(v, ones(chunk, 0), precision=exact)  # real tokens up to each one, inside its chunk
  before = jnp.dot(within[..., -1], ones(chunks, 1), precision=exact)  # real tokens in the earlier chunks
  count = (within + before[..., None]).reshape(B, chunks * chunk)[:, :T].astype(jnp.int32)
  return jnp.where(valid, start + count - 1, -1)


def fuse_projections(layer: Weights) -> dict[str, Any]:
  """One layer's (or stacked layers') weights with q/k/v fused into "qkv" [..., D, N + 2K, H] and gate/up into
  "gate_up" [..., D, 2F]: the layout `_block` multiplies with (one dot each instead of three and two)."""
  if "qkv" in layer:
    return dict(layer)
  fused = {name: a for name, a in layer.items() if name not in ("q", "k", "v", "gate", "up")}
  fused["qkv"] = jnp.concatenate([layer["q"], layer["k"], layer["v"]], axis=-2)
  fused["gate_up"] = jnp.concatenate([layer["gate"], layer["up"]], axis=-1)
  return fused


def unstack_layers(weights: Weights, transpose_tied_head: bool | None = None) -> dict[str, Any]:
  """The weights for the cached (sampling) path: "layers" as a tuple of L per-layer dicts with fused projections.

  That path runs layers in a Python loop. Given stacked weights it would slice layer l out of every stacked array
  on every call, and XLA materialises slices and concatenations as copies of all weights per decode step.
  Unstack once per weight update and pass the result to `forward` with a cache.

  Args:
    weights: stacked (or already unstacked) weights.
    transpose_tied_head: for a tied head, also keep the embedding transposed as "head" [D, V]. XLA:CPU multiplies
      a few decode rows by a [D, V] matrix 2-3x faster than by the transposed [V, D] table (measured at V = 49k:
      10 ms vs 30 ms for 16 rows), at the cost of a second copy of the table. Default: on the CPU backend only.
  """
  if transpose_tied_head is None:
    transpose_tied_head = jax.default_backend() == "cpu"
  out = dict(weights)
  if transpose_tied_head and "head" not in out:
    out["head"] = jnp.asarray(weights["embed"]).T
  layers = weights["layers"]
  if not isinstance(layers, (tuple, list)):
    num_layers = next(iter(layers.values())).shape[0]
    layers = [{name: a[l] for name, a in layers.items()} for l in range(num_layers)]
  out["layers"] = tuple(fuse_projections(layer) for layer in layers)
  return out


_FUSED_AXES = {"qkv": ("embed", None, "head_dim"), "gate_up": ("embed", None)}


def unstacked_logical_axes(unstacked: Weights) -> dict[str, Any]:
  """Logical axis names of `unstack_layers`' output (same structure). The fused q/k/v and gate/up axes get no
  name: a split of them would cut across the projections they join."""
  per_layer = lambda layer: {name: _FUSED_AXES.get(name) or  # noqa: E731
                             {"o": ("heads", "head_dim", "embed"), "down": ("mlp", "embed")}.get(name, ("norm",))
                             for name in layer}
  out = {"embed": ("vocab", "embed"), "final_norm": ("norm",),
         "layers": tuple(per_layer(layer) for layer in unstacked["layers"])}
  if "head" in unstacked:
    out["head"] = ("embed", "vocab")
  return out


def _block(x: jax.Array, w: Weights, *, config: DecoderConfig, cos: jax.Array, sin: jax.Array, mask: jax.Array,
           kv: tuple[jax.Array, jax.Array] | None, end: jax.Array | None
           ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """One decoder layer.

  Args:
    x: [B, T, D] residual stream.
    w: this layer's weights (see `weight_shapes`, without the L axis).
    cos, sin: [B, T, 1, H // 2] rotary angles.
    mask: [B, T, S] the layer's attention mask (sliding or full).
    kv: this layer's cache buffers (keys [B, K, H, S], values [B, K, S, H]), or None to attend within the block
      only.
    end: the cache slot where this block's keys and values go.

  Returns:
    x: [B, T, D].
    (k, v): the layer's updated cache buffers, or the block's own keys [B, K, H, T] and values [B, K, T, H]
      without a cache.
  """
  c = config
  dtype = x.dtype

  def norm(h, scale):
    return L.rms_norm(h, scale, eps=c.rms_norm_eps, plus_one=c.is_gemma)

  # Matrices run in the activation dtype; norm scales keep theirs (Gemma adds 1 in float32).
  w = {name: (a if _is_norm(name) else a.astype(dtype)) for name, a in fuse_projections(w).items()}
  h = norm(x, w["attn_norm"])
  # One matmul for queries, keys and values: XLA:CPU runs a [D, (N + 2K) * H] product faster than three.
  qkv = jnp.einsum("BTD,DNH->BTNH", h, w["qkv"])
  q, k, v = jnp.split(qkv, [c.num_heads, c.num_heads + c.num_kv_heads], axis=2)
  q = rope.apply_rope(q, cos, sin)
  k = rope.apply_rope(k, cos, sin).transpose(0, 2, 3, 1)  # [B, K, H, T]
  v = v.transpose(0, 2, 1, 3)  # [B, K, T, H]
  if kv is not None:
    k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, 0, 0, end))
    v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, 0, end, 0))
  a = attention.attend(q, k, v, mask, scale=c.query_scale, softcap=c.attn_logit_softcap)
  # Contract heads as one [N * H] axis: a free reshape of both operands, where the two-axis contraction made
  # XLA:CPU copy the [N, H, D] weight into another layout on every call.
  B, T = a.shape[:2]
  a = jnp.einsum("BTF,FD->BTD", a.reshape(B, T, -1), w["o"].reshape(-1, w["o"].shape[-1]))
  if c.is_gemma:
    a = norm(a, w["post_attn_norm"])
  x = x + a
  m = L.gated_mlp(norm(x, w["ffw_norm"]), w["gate_up"], w["down"], gelu=c.is_gemma)
  if c.is_gemma:
    m = norm(m, w["post_ffw_norm"])
  return x + m, (k, v)


def forward(weights: Weights, tokens: jax.Array, positions: jax.Array, *, config: DecoderConfig,
            cache: attention.KVCache | None = None, frozen_layers: int = 0, new_cache_slots: int | None = None
            ) -> tuple[jax.Array, attention.KVCache | None]:
  """Runs the decoder body over a block of tokens.

  Without a cache the block attends to itself (a plain full forward, for scoring and training) and the stacked
  layers run under `jax.lax.scan`. With a cache the block's keys and values are written to slots
  cache.end .. cache.end + T - 1, the block attends to everything in the cache, and the layers run in a Python
  loop over per-layer buffers (pass `unstack_layers(weights)` on hot paths; see there).

  Args:
    weights: see `weight_shapes`; "layers" stacked, or a tuple of per-layer dicts (`unstack_layers`).
    tokens: [B, T] int32.
    positions: [B, T] int32 position of each token, -1 for padding (see `positions_from_mask`). With a cache (or
      new_cache_slots) every real position must be below the cache's slot count, as positions counted from
      masks are.
    config: the decoder's config (static).
    cache: the cache to extend; the caller guarantees cache.end + T <= S.
    frozen_layers: without a cache, the first this many layers (and the embedding) run as a separate scan whose
      output is under `stop_gradient`, so a backward pass only runs through the layers above it (training
      the top of the model costs a forward of the bottom and nothing more).
    new_cache_slots: without a cache, return a new cache of this many slots (>= T) holding the block in slots
      [0, T). The block attends to itself only, not to the empty slots after it, and runs the per-layer loop
      of the cached path (pass `unstack_layers(weights)`).

  Returns:
    hidden: [B, T, D] final-normed activations in config.dtype (feed to `head_logits`).
    cache: the updated cache, or None.
  """
  c = config
  if new_cache_slots is not None:
    if cache is not None:
      raise ValueError("new_cache_slots builds a cache from scratch; it cannot extend a given cache.")
    if new_cache_slots < tokens.shape[1]:
      raise ValueError(f"new_cache_slots={new_cache_slots} cannot hold a block of {tokens.shape[1]} tokens.")
  dtype = jnp.dtype(c.dtype)
  inv_freq = rope.inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
  # With a cache (or building one) positions are counted from masks and bounded by the slots: tabulate them.
  num_positions = cache.num_slots if cache is not None else new_cache_slots
  cos, sin = rope.rotary_angles(positions, inv_freq, dtype, num_positions=num_positions)
  x = L.embed(tokens, weights["embed"], dtype=dtype, scale_by_sqrt_dim=c.is_gemma)
  windows = c.layer_windows()
  key_positions = positions if cache is None else jax.lax.dynamic_update_slice(
      cache.positions, positions.astype(jnp.int32), (0, cache.end))
  full_mask = attention.attention_mask(positions, key_positions, attention.NO_WINDOW)
  slide_mask = (attention.attention_mask(positions, key_positions, c.sliding_window)
                if c.sliding_window is not None else None)
  block = functools.partial(_block, config=c, cos=cos, sin=sin)

  if cache is None and new_cache_slots is None:
    is_sliding = jnp.asarray([w is not None for w in windows])

    def scan_body(x, scanned):
      w, layer_slides = scanned
      mask = jnp.where(layer_slides, slide_mask, full_mask) if slide_mask is not None else full_mask
      x, _ = block(x, w, mask=mask, kv=None, end=None)
      return x, None

    layers = weights["layers"]
    if isinstance(layers, (tuple, list)):
      layers = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    if not 0 <= frozen_layers <= c.num_layers:
      raise ValueError(f"frozen_layers={frozen_layers} must be in [0, {c.num_layers}].")
    scanned = (layers, is_sliding)
    if frozen_layers:
      bottom = jax.tree.map(lambda a: a[:frozen_layers], scanned)
      x = jax.lax.stop_gradient(jax.lax.scan(scan_body, x, bottom)[0])
      scanned = jax.tree.map(lambda a: a[frozen_layers:], scanned)
    x, _ = jax.lax.scan(scan_body, x, scanned)
    return L.rms_norm(x, weights["final_norm"], eps=c.rms_norm_eps, plus_one=c.is_gemma), None

  if frozen_layers:
    raise ValueError("frozen_layers applies to a forward without a cache (training).")
  per_layer = unstack_layers(weights)["layers"]
  new_k, new_v = [], []
  for l, window in enumerate(windows):
    mask = slide_mask if window is not None else full_mask
    kv = None if cache is None else (cache.k[l], cache.v[l])
    x, (k, v) = block(x, per_layer[l], mask=mask, kv=kv, end=None if cache is None else cache.end)
    new_k.append(k)
    new_v.append(v)
  x = L.rms_norm(x, weights["final_norm"], eps=c.rms_norm_eps, plus_one=c.is_gemma)
  if cache is not None:
    return x, attention.KVCache(k=tuple(new_k), v=tuple(new_v), positions=key_positions,
                                end=cache.end + tokens.shape[1])
  # A new cache: the block's own keys and values, followed by empty slots.
  empty = new_cache_slots - tokens.shape[1]
  return x, attention.KVCache(
      k=tuple(jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, empty))) for k in new_k),
      v=tuple(jnp.pad(v, ((0, 0), (0, 0), (0, empty), (0, 0))) for v in new_v),
      positions=jnp.pad(positions.astype(jnp.int32), ((0, 0), (0, empty)), constant_values=-1),
      end=jnp.asarray(tokens.shape[1], jnp.int32))


def head_logits(weights: Weights, hidden: jax.Array, *, config: DecoderConfig) -> jax.Array:
  """[..., D] final-normed activations -> [..., V] float32 logits (final softcap applied).

  Uses "head" [D, V] when present: the untied head, or a tied model's transposed table (`unstack_layers`).
  """
  if "head" in weights:
    return L.unembed(hidden, weights["head"], transposed=False, final_softcap=config.final_logit_softcap)
  return L.unembed(hidden, weights["embed"], transposed=True, final_softcap=config.final_logit_softcap)


@functools.partial(jax.jit, static_argnames=("config",))
def full_logits(weights: Weights, tokens: jax.Array, *, config: DecoderConfig) -> jax.Array:
  """[B, T] int32 tokens (no padding) -> [B, T, V] float32 logits of one full forward."""
  B, T = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  hidden, _ = forward(weights, tokens, positions, config=config)
  return head_logits(weights, hidden, config=config)


@functools.partial(jax.jit, static_argnames=("config",))
def extend(weights: Weights, cache: attention.KVCache, tokens: jax.Array, valid: jax.Array, *,
           config: DecoderConfig) -> tuple[jax.Array, attention.KVCache]:
  """Appends a block of tokens to a cache and returns the logits of every block position.

  Args:
    cache: slots [0, cache.end) in use; needs cache.end + T <= S.
    tokens: [B, T] int32.
    valid: [B, T] bool, False for padding (padding gets position -1 and is invisible to later tokens).

  Returns:
    logits: [B, T, V] float32.
    cache: the cache with the block written.
  """
  positions = positions_from_mask(valid, cache.next_positions())
  hidden, cache = forward(weights, tokens, positions, config=config, cache=cache)
  return head_logits(weights, hidden, config=config), cache


@functools.partial(jax.jit, static_argnames=("config", "num_slots"))
def prefill(weights: Weights, tokens: jax.Array, valid: jax.Array, *, config: DecoderConfig,
            num_slots: int) -> tuple[jax.Array, attention.KVCache]:
  """Encodes right-padded prompts into a fresh cache; the vocabulary head runs only at each row's last real token.

  The head is a [D, V] product (V = 49k for SmolLM2, 256k for Gemma): computing it at every prompt position
  would cost about a quarter of the whole prefill, for logits nobody reads.

  Args:
    tokens: [B, T] int32, each row's prompt followed by padding.
    valid: [B, T] bool, True on the real tokens (a prefix of each row; at least one per row).
    num_slots: S >= T, the cache size (static).

  Returns:
    logits: [B, V] float32 at each row's last real token.
    cache: num_slots slots with [0, T) written (the prompt tokens attend within their own row's prompt, never to
      the empty slots).
  """
  B, T = tokens.shape
  hidden, cache = forward(weights, tokens, positions_from_mask(valid), config=config, new_cache_slots=num_slots)
  last = jnp.sum(valid.astype(jnp.int32), axis=1) - 1
  return head_logits(weights, hidden[jnp.arange(B), last], config=config), cache


class Decoder(nnx.Module):
  """A Gemma-2 or Llama decoder's parameters, with the pure `forward` behind `__call__`.

  Attributes:
    config: the DecoderConfig.
    embed: nnx.Param [V, D].
    layers: nnx.Dict of nnx.Param, each stacked [L, ...] (see `weight_shapes`).
    final_norm: nnx.Param [D].
    head: nnx.Param [D, V], or None when the head is tied to the embedding.
    tokenizer_files: {file name: text (bytes for binary files such as tokenizer.model)} of the tokenizer the
      checkpoint came with (written back on export), or {}.
  """

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs | None = None,
               weights: Weights | None = None):
    if weights is None:
      key = rngs.params() if rngs is not None else jax.random.key(0)
      weights = init_weights(config, key)
    check_weights(config, weights)
    self.config = config
    self.embed = nnx.Param(jnp.asarray(weights["embed"]))
    self.layers = nnx.Dict({name: nnx.Param(jnp.asarray(a)) for name, a in weights["layers"].items()})
    self.final_norm = nnx.Param(jnp.asarray(weights["final_norm"]))
    self.head = nnx.Param(jnp.asarray(weights["head"])) if "head" in weights else None
    self.tokenizer_files: dict[str, str | bytes] = {}

  def weights(self) -> dict[str, Any]:
    """The parameters as a plain dict of arrays (what `forward` takes)."""
    out = {
        "embed": self.embed[...],
        "layers": {name: p[...] for name, p in self.layers.items()},
        "final_norm": self.final_norm[...],
    }
    if self.head is not None:
      out["head"] = self.head[...]
    return out

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """[B, T] int32 tokens -> [B, T, V] float32 logits."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, time]; got shape {tuple(tokens.shape)}.")
    return full_logits(self.weights(), tokens, config=self.config)

  def init_cache(self, batch_size: int, num_slots: int) -> attention.KVCache:
    c = self.config
    return attention.KVCache.empty(num_layers=c.num_layers, batch_size=batch_size, num_slots=num_slots,
                                   num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=jnp.dtype(c.dtype))

  def extend(self, cache: attention.KVCache, tokens: jax.Array,
             valid: jax.Array | None = None) -> tuple[jax.Array, attention.KVCache]:
    """See the module-level `extend`; checks that the block fits in the cache."""
    tokens = jnp.asarray(tokens, jnp.int32)
    end = int(cache.end)
    if end + tokens.shape[1] > cache.num_slots:
      raise ValueError(f"a block of {tokens.shape[1]} tokens does not fit in a cache with {end} of "
                       f"{cache.num_slots} slots used.")
    if valid is None:
      valid = np.ones(tokens.shape, bool)
    return extend(self.weights(), cache, tokens, jnp.asarray(valid), config=self.config)
