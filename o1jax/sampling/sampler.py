"""Batched, bucketed, data-parallel sampling and value scoring over a KV cache that the caller holds.

Legend: B rows (prompts, or prompts x k samples), T prompt bucket, M new-token bucket, S cache slots, V vocab.

  sampler = Sampler(model, vocab=tokenizer.get_vocab(), mesh=parallel.make_mesh())
  prefix = sampler.prefill(prompt_token_lists, reserve=64 + 16)    # each prompt encoded once
  samples = sampler.sample(prefix, k=4, stop=["<end_of_thought>"], max_new_tokens=64,
                           params=SamplingParams(temperature=0.8), seed=0)
  values = sampler.score(samples.prefix, rating_suffixes, positive_id, negative_id)

A `Prefix` is a cache plus the next-token logits at the end of every row. Prefill encodes right-padded prompts
(padded to a prompt bucket, positions from the mask); `fork` copies rows (a parent's prefix into its k
children's rows); `extend` appends tokens; `sample` forks each row k times and decodes all rows in one jitted
`lax.while_loop` that stops when every row has stopped; `score` reads log p(<positive_rating>) from a two-way
log-softmax at each row's last token (`o1jax.value`, the read the rating loss trains too). Every jitted
program's shapes come from `Buckets`, so a second call with the same buckets compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from models import attention, decoder
from o1jax import parallel, value as value_lib, xla_flags
from o1jax.sampling import statistics
from o1jax.sampling.buckets import Buckets, pad_rows


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How tokens are drawn. temperature=0 or greedy=True takes the argmax (sampling log-prob 0).

  top_k=0 and top_p=1 switch those filters off; they apply after the temperature.
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0.")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 switches it off).")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1].")

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0


@dataclasses.dataclass(frozen=True)
class Prefix:
  """A cache and the next-token logits after each row's last token.

  Attributes:
    cache: KVCache with B' >= num_rows rows (padding rows, if any, come last and are never read).
    logits: [B', V] float32.
    num_rows: the real rows.
  """

  cache: attention.KVCache
  logits: jax.Array
  num_rows: int

  @property
  def free_slots(self) -> int:
    return self.cache.num_slots - int(self.cache.end)


@dataclasses.dataclass(frozen=True)
class Samples:
  """k continuations per prompt, row r = prompt r // k, sample r % k (padding rows already dropped).

  Attributes:
    tokens: [R, M] int32 sampled tokens, 0 after the end of each sample (the stop token itself included).
    lengths: [R] int32 tokens generated, stop token included.
    stopped: [R] bool, True when the sample ended on a stop token, False when it ran into the M budget.
    sampling_log_probs: [R, M] float32 log-prob of each token under the distribution it was drawn from.
    model_log_probs: [R, M] float32 log-prob under the unmodified model (PPO's behaviour log-prob).
    entropy, varentropy: [R, M] float32 of the model distribution at each position.
    step_log_prob, step_entropy, step_varentropy: [R] means over each sample's tokens (LLaMA-O1's step
      statistics: length-normalised log-prob, normalised entropy, varentropy).
    prefix: the cache after sampling (prompt + sample in every row) with the logits after each sample, so the
      rating suffix can be scored on top without re-encoding.
  """

  tokens: np.ndarray
  lengths: np.ndarray
  stopped: np.ndarray
  sampling_log_probs: np.ndarray
  model_log_probs: np.ndarray
  entropy: np.ndarray
  varentropy: np.ndarray
  step_log_prob: np.ndarray
  step_entropy: np.ndarray
  step_varentropy: np.ndarray
  prefix: Prefix

  def sequences(self) -> list[list[int]]:
    return [list(map(int, row[:n])) for row, n in zip(self.tokens, self.lengths)]


# --- jitted programs --------------------------------------------------------------------------------------------

def _extend_rows(weights, cache: attention.KVCache, tokens: jax.Array, valid: jax.Array, logits: jax.Array, *,
                 config) -> tuple[jax.Array, attention.KVCache]:
  """Appends [B, T] tokens; returns the logits after each row's last valid token (rows without any keep `logits`)."""
  positions = decoder.positions_from_mask(valid, cache.next_positions())
  hidden, cache = decoder.forward(weights, tokens, positions, config=config, cache=cache)
  last = jnp.maximum(jnp.sum(valid.astype(jnp.int32), axis=1) - 1, 0)
  new_logits = decoder.head_logits(weights, hidden[jnp.arange(tokens.shape[0]), last], config=config)
  return jnp.where(jnp.any(valid, axis=1)[:, None], new_logits, logits), cache


_extend = jax.jit(_extend_rows, static_argnames=("config",))
# The same with the cache donated: XLA then writes the new slots in place instead of copying every layer's
# buffers first (a 64-row, 270-slot SmolLM2 cache is 0.8 GB, and that copy was most of a 2-token extend).
_extend_in_place = jax.jit(_extend_rows, static_argnames=("config",), donate_argnames=("cache",))


def _truncate_rows(cache: attention.KVCache, lengths: jax.Array) -> attention.KVCache:
  """Slots of row b holding positions >= lengths[b] become empty (position -1; see attention's mask rule)."""
  return dataclasses.replace(cache, positions=jnp.where(cache.positions >= lengths[:, None], -1, cache.positions))


_truncate = jax.jit(_truncate_rows)
_truncate_in_place = jax.jit(_truncate_rows, donate_argnums=0)


def _repack_rows(cache: attention.KVCache, num_slots: int) -> attention.KVCache:
  """Each row's filled slots moved to its front, in slot order, in a cache of num_slots slots (>= every row's
  filled count; attention reads positions, not slot order, so the move changes no result)."""
  extra = max(num_slots - cache.num_slots, 0)
  pad = lambda a, axis: jnp.pad(a, [(0, extra if i == axis else 0) for i in range(a.ndim)])  # noqa: E731
  positions = jnp.pad(cache.positions, ((0, 0), (0, extra)), constant_values=-1)
  filled = positions >= 0
  order = jnp.argsort(jnp.where(filled, 0, 1), axis=1, stable=True)[:, :num_slots]   # [B, num_slots]
  k = tuple(jnp.take_along_axis(pad(a, 3), order[:, None, None, :], axis=3) for a in cache.k)
  v = tuple(jnp.take_along_axis(pad(a, 2), order[:, None, :, None], axis=2) for a in cache.v)
  return attention.KVCache(k=k, v=v, positions=jnp.take_along_axis(positions, order, axis=1),
                           end=jnp.max(jnp.sum(filled, axis=1)).astype(jnp.int32))


_repack = jax.jit(_repack_rows, static_argnames=("num_slots",))


@jax.jit
def _gather(caches: tuple[attention.KVCache, ...], logits: tuple[jax.Array, ...], extra: tuple[jax.Array, ...],
            order: jax.Array) -> tuple[attention.KVCache, jax.Array, tuple[jax.Array, ...]]:
  """Rows `order` of the caches (and logits, and any per-row arrays of `extra`) stacked along the batch."""
  take = lambda arrays: jnp.take(jnp.concatenate(arrays, axis=0), order, axis=0)  # noqa: E731
  cache = attention.KVCache(k=tuple(map(take, zip(*(c.k for c in caches)))),
                            v=tuple(map(take, zip(*(c.v for c in caches)))),
                            positions=take([c.positions for c in caches]),
                            end=jnp.max(jnp.stack([c.end for c in caches])))
  return cache, take(logits), tuple(take([e]) for e in extra)


def _filtered_log_probs(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, *, top_k: int,
                        use_top_p: bool) -> jax.Array:
  """[B, V] log-probs of the sampling distribution: temperature, then top-k, then top-p (nucleus)."""
  x = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(x, top_k)[0][:, -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if use_top_p:
    # Keep the smallest set of most likely tokens whose mass reaches top_p: a token stays if the mass strictly
    # before it (in descending order) is below top_p, so the most likely token always stays.
    sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
    sorted_p = jax.nn.softmax(sorted_x, axis=-1)
    mass_before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_x, kept - 1, axis=-1)
    x = jnp.where(x < threshold, -jnp.inf, x)
  return statistics.log_softmax(x)


def _argmax(x: jax.Array) -> jax.Array:
  """argmax over the last axis (first maximum), as two plain reductions.

  jnp.argmax lowers to a variadic (value, index) reduce that XLA:CPU does not vectorise: over a 49k vocabulary
  it cost more per decode step than the whole vocabulary head.
  """
  top = jnp.max(x, axis=-1, keepdims=True)
  index = jnp.arange(x.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)


_CHUNK = 256  # vocabulary chunk of `_inverse_cdf_draw`


def _inverse_cdf_draw(probs: jax.Array, uniform: jax.Array) -> jax.Array:
  """One token per row drawn from [B, V] probabilities (rows need not sum to exactly 1) by one uniform per row.

  `uniform`: [B] float32 in [0, 1).

  Inverse-CDF sampling in two levels: the row's mass is summed per chunk of `_CHUNK` tokens, a uniform u times the
  total picks the chunk whose cumulative mass first exceeds u, and the chunk's own cumulative sum picks the token.
  That is two passes over the vocabulary and a [B, V / _CHUNK] cumulative sum, where Gumbel-max needs a random
  number per vocabulary entry (3M threefry draws per step at B=64, V=49k). Tokens of probability 0 (filtered by
  top-k / top-p) are never drawn, whatever the rounding of the sums.
  """
  B, V = probs.shape
  chunks = -(-V // _CHUNK)
  blocks = jnp.pad(probs, ((0, 0), (0, chunks * _CHUNK - V))).reshape(B, chunks, _CHUNK)
  chunk_mass = jnp.sum(blocks, axis=-1)
  cumulative = jnp.cumsum(chunk_mass, axis=-1)
  u = uniform[:, None] * cumulative[:, -1:]
  # The first chunk whose cumulative mass exceeds u, clamped to the last chunk with any mass (rounding).
  last_chunk = chunks - 1 - jnp.argmax((chunk_mass > 0)[:, ::-1], axis=-1)
  chunk = jnp.minimum(jnp.sum(cumulative <= u, axis=-1), last_chunk)
  # The chosen chunk gathered from the unpadded rows (no [B, V] copy), zero past the vocabulary's end.
  ids = chunk[:, None] * _CHUNK + jnp.arange(_CHUNK)
  block = jnp.where(ids < V, jnp.take_along_axis(probs, jnp.minimum(ids, V - 1), axis=1), 0.0)
  before = jnp.take_along_axis(cumulative - chunk_mass, chunk[:, None], axis=-1)
  inner = before + jnp.cumsum(block, axis=-1)
  last_token = _CHUNK - 1 - jnp.argmax((block > 0)[:, ::-1], axis=-1)
  index = jnp.minimum(jnp.sum(inner <= u, axis=-1), last_token)
  # A token of zero mass inside the chunk cannot be picked: its cumulative equals its predecessor's.
  return (chunk * _CHUNK + index).astype(jnp.int32)


def _uniforms(rng: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
  """One uniform in [0, 1) per row and the key(s) for the next step.

  rng is one key (the whole batch draws [B] uniforms from it) or [B] keys, one per row: then a row's draws depend
  on its own key only, not on its position in the batch or on the batch size (how the search keeps a tree's
  samples the same whether it runs alone or with others).
  """
  if rng.ndim == 0:
    rng, key = jax.random.split(rng)
    return jax.random.uniform(key, (rows,), jnp.float32), rng
  split = jax.vmap(jax.random.split)(rng)
  return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(split[:, 1]), split[:, 0]


def _decode(weights, cache: attention.KVCache, logits: jax.Array, stop_ids: jax.Array, live: jax.Array,
            rng: jax.Array, temperature: jax.Array, top_p: jax.Array, *, config, max_new: int, greedy: bool,
            plain: bool, top_k: int, use_top_p: bool) -> dict[str, Any]:
  """Samples up to max_new tokens per row in one `lax.while_loop`.

  Args:
    cache: [B] rows, each ending where its sample starts; needs max_new free slots.
    logits: [B, V] next-token logits at the end of each row.
    stop_ids: [B, X] int32 stop tokens per row, -1 for none.
    live: [B] bool, False for padding rows (they count as stopped from the start).
    rng: one PRNG key, or [B] keys (one per row; see `_uniforms`).
    greedy: argmax; plain: sample from the model distribution itself (temperature 1, no filters), which saves
      a second softmax over the vocabulary per step. Otherwise temperature / top_k / top_p filter it.

  Returns:
    A dict of the `Samples` arrays (tokens, lengths, ...), plus "cache" and "logits" after the samples.
  """
  B = logits.shape[0]
  zeros = jnp.zeros((B, max_new), jnp.float32)
  state = dict(step=jnp.zeros((), jnp.int32), cache=cache, logits=logits, rng=rng,
               tokens=jnp.zeros((B, max_new), jnp.int32), sampling_log_probs=zeros, model_log_probs=zeros,
               entropy=zeros, varentropy=zeros, lengths=jnp.zeros((B,), jnp.int32),
               stopped=jnp.zeros((B,), bool), done=~live)

  def cond(s):
    return (s["step"] < max_new) & ~jnp.all(s["done"])

  def body(s):
    step, active = s["step"], ~s["done"]
    model_lp = statistics.log_softmax(s["logits"])
    model_p = jnp.exp(model_lp)
    entropy, varentropy = statistics.entropy_and_varentropy(model_lp, model_p)
    uniform, rng = _uniforms(s["rng"], B)
    if greedy:
      token = _argmax(s["logits"])
      sampling_lp = jnp.zeros((B,), jnp.float32)
    else:
      if plain:
        lp, p = model_lp, model_p
      else:
        lp = _filtered_log_probs(s["logits"], temperature, top_p, top_k=top_k, use_top_p=use_top_p)
        p = jnp.exp(lp)
      token = _inverse_cdf_draw(p, uniform)
      sampling_lp = jnp.take_along_axis(lp, token[:, None], axis=-1)[:, 0]
    token = jnp.where(active, token, 0)
    token_model_lp = jnp.take_along_axis(model_lp, token[:, None], axis=-1)[:, 0]

    def write(buffer, value):
      column = jnp.where(active, value, 0).astype(buffer.dtype)
      return jax.lax.dynamic_update_slice(buffer, column[:, None], (0, step))

    hit_stop = active & jnp.any(token[:, None] == stop_ids, axis=1)
    # The sampled token (a stop token included) enters the cache; rows already done add an invisible slot.
    positions = decoder.positions_from_mask(active[:, None], s["cache"].next_positions())
    hidden, cache = decoder.forward(weights, token[:, None], positions, config=config, cache=s["cache"])
    next_logits = decoder.head_logits(weights, hidden[:, 0], config=config)
    return dict(step=step + 1, cache=cache, logits=jnp.where(active[:, None], next_logits, s["logits"]),
                rng=rng, tokens=write(s["tokens"], token),
                sampling_log_probs=write(s["sampling_log_probs"], sampling_lp),
                model_log_probs=write(s["model_log_probs"], token_model_lp),
                entropy=write(s["entropy"], entropy), varentropy=write(s["varentropy"], varentropy),
                lengths=s["lengths"] + active.astype(jnp.int32), stopped=s["stopped"] | hit_stop,
                done=s["done"] | hit_stop)

  s = jax.lax.while_loop(cond, body, state)
  # Every row's cache advances by the same max_new slots whether or not it ran that long, so that caches of a
  # bucket keep one shape; the loop may end early, leaving empty slots that the next write skips past.
  cache = dataclasses.replace(s["cache"], end=cache.end + max_new)
  out = {k: s[k] for k in ("tokens", "sampling_log_probs", "model_log_probs", "entropy", "varentropy",
                           "lengths", "stopped")}
  out.update(step_log_prob=statistics.step_means(s["model_log_probs"], s["lengths"]),
             step_entropy=statistics.step_means(s["entropy"], s["lengths"]),
             step_varentropy=statistics.step_means(s["varentropy"], s["lengths"]),
             cache=cache, logits=s["logits"], rng=s["rng"])
  return out


@functools.cache
def _decode_program(backend: str, rows: int):
  """`_decode` jitted for `backend` and a batch of `rows`, with their decode compiler options (see `xla_flags`)."""
  return jax.jit(_decode, static_argnames=("config", "max_new", "greedy", "plain", "top_k", "use_top_p"),
                 donate_argnames=("cache",), compiler_options=xla_flags.decode_compiler_options(backend, rows))


# --- the host-side API ------------------------------------------------------------------------------------------

class Sampler:
  """Holds the weights (layers unstacked, replicated over the mesh) and runs the bucketed programs."""

  def __init__(self, model: decoder.Decoder, vocab: Mapping[str, int] | None = None, mesh: Mesh | None = None,
               buckets: Buckets = Buckets()):
    self.config = model.config
    self.vocab = dict(vocab or {})
    self.mesh = mesh
    rows = parallel.batch_size_multiple(mesh) if mesh is not None else 1
    self.buckets = dataclasses.replace(buckets, rows=rows)
    self.set_weights(model.weights())

  def set_weights(self, weights: Mapping[str, Any]) -> None:
    """Uses new weights (after a learner step); layers are unstacked once here, not per call.

    On a mesh with fsdp or tensor axes larger than 1 the weights are sharded by the logical rules (the learner's
    own placement, `o1jax.parallel.LOGICAL_RULES`), so no device holds a replicated copy; GSPMD gathers what a
    program needs. On a pure data-parallel mesh they are replicated.
    """
    weights = decoder.unstack_layers(weights)
    if self.mesh is not None:
      if self.mesh.shape["fsdp"] > 1 or self.mesh.shape["tensor"] > 1:
        shardings = parallel.logical_shardings(decoder.unstacked_logical_axes(weights), weights, self.mesh)
      else:
        shardings = jax.tree.map(lambda _: parallel.replicated(self.mesh), weights)
      weights = jax.tree.map(parallel.put, weights, shardings)
    self.weights = weights

  def _put(self, tree):
    return parallel.shard_batch(tree, self.mesh) if self.mesh is not None else jax.tree.map(jnp.asarray, tree)

  def token_ids(self, stop: Sequence[str | int]) -> tuple[int, ...]:
    """Stop tokens as ids; a string must be a single token of the vocabulary."""
    ids = []
    for s in stop:
      if isinstance(s, (int, np.integer)):
        if not 0 <= int(s) < self.config.vocab_size:
          raise ValueError(f"stop token id {s} is outside the vocabulary [0, {self.config.vocab_size}).")
        ids.append(int(s))
      elif s in self.vocab:
        ids.append(self.vocab[s])
      else:
        raise ValueError(f"stop string {s!r} is not a single token of this tokenizer.")
    return tuple(ids)

  def prefill(self, prompts: Sequence[Sequence[int]], reserve: int = 0, bucket: int | None = None) -> Prefix:
    """Encodes prompts (token lists) once each into a cache with `reserve` free slots after the prompt bucket.

    bucket: the prompt length to pad to instead of the smallest prompt bucket (so that the cache's slots match
    another prefix's).
    """
    if not prompts:
      raise ValueError("prefill needs at least one prompt.")
    for i, p in enumerate(prompts):
      if len(p) == 0:
        raise ValueError(f"prompt {i} is empty.")
    length = bucket or self.buckets.prompt_bucket(max(len(p) for p in prompts))
    if length < max(len(p) for p in prompts):
      raise ValueError(f"a prompt of {max(len(p) for p in prompts)} tokens does not fit bucket={bucket}.")
    rows = self.buckets.padded_rows(len(prompts))
    tokens, valid = pad_rows([list(p) for p in prompts], length, rows)
    valid[len(prompts):, 0] = True  # padding rows hold one dummy token so that every row has a last position
    tokens, valid = self._put((tokens, valid))
    logits, cache = decoder.prefill(self.weights, tokens, valid, config=self.config, num_slots=length + reserve)
    return Prefix(cache=cache, logits=logits, num_rows=len(prompts))

  def fork(self, prefix: Prefix, rows: Sequence[int]) -> Prefix:
    """Row i of the result continues row rows[i] of prefix."""
    rows = np.asarray(rows, np.int32)
    if rows.size == 0 or rows.min() < 0 or rows.max() >= prefix.num_rows:
      raise ValueError(f"fork rows must be indices into the {prefix.num_rows} rows of the prefix; got {rows}.")
    padded = np.zeros(self.buckets.padded_rows(len(rows)), np.int32)
    padded[:len(rows)] = rows
    index = self._put(padded)
    return Prefix(cache=prefix.cache.fork(index), logits=jnp.take(prefix.logits, index, axis=0),
                  num_rows=len(rows))

  def extend(self, prefix: Prefix, continuations: Sequence[Sequence[int]], bucket: int | None = None, *,
             donate: bool = False) -> Prefix:
    """Appends one token list per row (padded to a new-token bucket); the logits follow each row's last token.

    donate: the prefix's cache is not used again by the caller, so it is updated in place (its buffers are
    deleted).
    """
    if len(continuations) != prefix.num_rows:
      raise ValueError(f"extend got {len(continuations)} continuations for {prefix.num_rows} rows.")
    length = bucket or self.buckets.new_token_bucket(max(1, max(len(c) for c in continuations)))
    if length > prefix.free_slots:
      raise ValueError(f"the prefix cache has {prefix.free_slots} free slots; a continuation bucket of {length} "
                       "tokens does not fit (prefill with a larger reserve).")
    tokens, valid = pad_rows([list(c) for c in continuations], length, prefix.cache.batch_size)
    tokens, valid = self._put((tokens, valid))
    # Rows with an empty continuation keep the logits they had.
    logits, cache = (_extend_in_place if donate else _extend)(self.weights, prefix.cache, tokens, valid,
                                                              prefix.logits, config=self.config)
    return Prefix(cache=cache, logits=logits, num_rows=prefix.num_rows)

  def gather(self, prefixes: Sequence[Prefix], rows: Sequence[tuple[int, int]]) -> Prefix:
    """A prefix whose row i is row rows[i][1] of prefixes[rows[i][0]] (all with the same number of slots).

    Rows whose caches end at different slots can share a cache: a row's empty slots (position -1) are invisible
    to its tokens, so the later `end` of the others only leaves a gap in it.
    """
    slots = {p.cache.num_slots for p in prefixes}
    if len(slots) != 1:
      raise ValueError(f"prefixes to gather from have {sorted(slots)} slots; they need the same number.")
    if not rows:
      raise ValueError("gather needs at least one row.")
    offsets = np.cumsum([0] + [p.cache.batch_size for p in prefixes])
    # Padding rows repeat the first row taken: a copy of another row could hold more tokens than any taken one
    # and move the cache's end (and `repack`'s) past them.
    order = np.full(self.buckets.padded_rows(len(rows)), offsets[rows[0][0]] + rows[0][1], np.int32)
    for i, (part, row) in enumerate(rows):
      if not 0 <= row < prefixes[part].num_rows:
        raise ValueError(f"row {row} is not one of the {prefixes[part].num_rows} rows of prefix {part}.")
      order[i] = offsets[part] + row
    cache, logits, _ = _gather(tuple(p.cache for p in prefixes), tuple(p.logits for p in prefixes), (),
                               self._put(order))
    return Prefix(cache=cache, logits=logits, num_rows=len(rows))

  def repack(self, prefix: Prefix, num_slots: int) -> Prefix:
    """The prefix in a cache of num_slots slots with each row's tokens in its first slots (after `truncate` and
    decoding rows of different lengths a row's tokens lie apart), so that a row grown on one cache can continue
    with the free slots of another, or share a cache with freshly prefilled rows (`gather`)."""
    filled = int(np.max(parallel.to_host(jnp.sum(prefix.cache.positions >= 0, axis=1))))
    if num_slots < filled:
      raise ValueError(f"repack to {num_slots} slots would drop tokens of a row that holds {filled}.")
    return dataclasses.replace(prefix, cache=_repack(prefix.cache, num_slots=num_slots))

  def truncate(self, prefix: Prefix, lengths: Sequence[int], *, donate: bool = False) -> Prefix:
    """Row i keeps its first lengths[i] tokens; the later ones become invisible (their slots' positions -1).

    What the search does with a step it cuts (at a stray format token): the cache then holds exactly the prompt
    and the kept part of the step, and the next `extend` continues after it. The logits are left as they were
    (those after the dropped tokens): extend before reading them.
    """
    if len(lengths) != prefix.num_rows:
      raise ValueError(f"truncate got {len(lengths)} lengths for {prefix.num_rows} rows.")
    padded = np.full(prefix.cache.batch_size, np.iinfo(np.int32).max, np.int32)
    padded[:len(lengths)] = lengths
    truncate = _truncate_in_place if donate else _truncate
    return dataclasses.replace(prefix, cache=truncate(prefix.cache, self._put(padded)))

  def sample(self, prefix: Prefix, *, k: int, stop: Sequence[str | int] | Sequence[Sequence[str | int]],
             max_new_tokens: int, params: SamplingParams = SamplingParams(), seed: int | jax.Array = 0,
             donate: bool = False, compact_every: int = 0) -> Samples:
    """k samples per row of prefix (rows forked, never re-encoded), decoded together.

    Args:
      prefix: from `prefill`/`extend`, with at least the new-token bucket of max_new_tokens free slots.
      k: samples per row (>= 1).
      stop: stop tokens (strings or ids) for every row, or one such list per row of the prefix.
      max_new_tokens: the budget; it is rounded up to a new-token bucket and samples that reach the bucket
        without a stop token end there with stopped=False.
      params: temperature / top-k / top-p / greedy.
      seed: an int or a PRNG key for the whole batch, or one key per sample ([num_rows * k] keys, row-major like
        the samples): then each sample's tokens depend on its own key only, whatever else is in the batch.
      donate: the caller does not use prefix again; with k=1 its cache is then decoded in place, not copied.
      compact_every: with per-sample keys, decode in segments of this many tokens and, after each, move the
        samples still running into a smaller batch bucket (`_sample_compacting`). The samples are the same as
        in one segment; the decode's cost follows the running samples instead of the longest one.
    """
    if k < 1:
      raise ValueError(f"k={k} must be at least 1.")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    max_new = self.buckets.new_token_bucket(max_new_tokens)
    if max_new > prefix.free_slots:
      raise ValueError(f"the prefix cache has {prefix.free_slots} free slots; sampling {max_new} tokens (bucket of "
                       f"max_new_tokens={max_new_tokens}) needs that many: prefill with reserve >= {max_new}.")
    per_row = (list(stop) and isinstance(stop[0], (list, tuple)))
    stop_lists = [self.token_ids(s) for s in stop] if per_row else [self.token_ids(stop)] * prefix.num_rows
    if len(stop_lists) != prefix.num_rows:
      raise ValueError(f"got {len(stop_lists)} stop lists for {prefix.num_rows} rows.")
    rows = np.repeat(np.arange(prefix.num_rows), k)
    forked = prefix if donate and k == 1 else self.fork(prefix, rows)
    B = forked.cache.batch_size
    width = max(1, max(len(s) for s in stop_lists))
    stop_ids = np.full((B, width), -1, np.int32)
    for i, r in enumerate(rows):
      stop_ids[i, :len(stop_lists[r])] = stop_lists[r]
    live = np.arange(B) < len(rows)
    stop_ids, live = self._put((stop_ids, live))
    rng = self._row_keys(seed, len(rows), B)
    run = functools.partial(self._decode_segment, params=params)
    if compact_every > 0 and rng.ndim == 1 and max_new > compact_every:
      return self._sample_compacting(run, forked, stop_ids, live, rng, len(rows), max_new, compact_every)
    out = run(forked.cache, forked.logits, stop_ids, live, rng, max_new)
    n = len(rows)
    host = {name: parallel.to_host(out[name])[:n] for name in (
        "tokens", "lengths", "stopped", "sampling_log_probs", "model_log_probs", "entropy", "varentropy",
        "step_log_prob", "step_entropy", "step_varentropy")}
    return Samples(**host, prefix=Prefix(cache=out["cache"], logits=out["logits"], num_rows=n))

  def _decode_segment(self, cache, logits, stop_ids, live, rng, max_new: int, *, params: SamplingParams):
    decode = _decode_program(jax.default_backend(), cache.batch_size)
    return decode(self.weights, cache, logits, stop_ids, live, rng, jnp.float32(max(params.temperature, 1e-6)),
                  jnp.float32(params.top_p), config=self.config, max_new=max_new, greedy=params.is_greedy,
                  top_k=params.top_k, use_top_p=params.top_p < 1,
                  plain=params.temperature == 1 and params.top_k == 0 and params.top_p == 1)

  def _sample_compacting(self, run, forked: Prefix, stop_ids, live, rng, n: int, max_new: int,
                         segment: int) -> Samples:
    """Decodes in segments; after each, the samples that have not stopped continue in a smaller batch.

    A row's draws come from its own key chain (split once per step), and its cache, logits and key travel with
    it when it moves, so every sample is the one a single `max_new` decode would draw. Rows that stopped stay
    in the batch they stopped in (their later slots are invisible, as a single decode leaves them); at the end
    the rows of every batch are gathered back into one prefix in sample order. A batch is only left when the
    running rows fit a batch bucket at most half its size: moving copies their caches, and every batch size
    is a decode program to compile.
    """
    names = ("tokens", "sampling_log_probs", "model_log_probs", "entropy", "varentropy")
    buffers = {name: np.zeros((n, max_new), np.int32 if name == "tokens" else np.float32) for name in names}
    lengths, stopped = np.zeros(n, np.int32), np.zeros(n, bool)
    at = np.arange(n)   # the sample held by each real row of the current batch
    parts, where = [], {}
    cache, logits = forked.cache, forked.logits
    offset = 0
    while True:
      width = min(segment, max_new - offset)
      out = run(cache, logits, stop_ids, live, rng, width)
      count = len(at)
      for name in names:
        buffers[name][at, offset:offset + width] = parallel.to_host(out[name])[:count, :width]
      segment_lengths = parallel.to_host(out["lengths"])[:count]
      lengths[at] += segment_lengths
      stopped[at] |= parallel.to_host(out["stopped"])[:count]
      offset += width
      going = ~stopped[at]
      padded = self.buckets.padded_rows(int(going.sum()))
      # Move only into a batch at most half as large: fewer copies, and few batch sizes to compile.
      padded = padded if padded <= cache.batch_size // 2 else cache.batch_size
      if offset >= max_new or not going.any() or padded < cache.batch_size:
        parts.append(Prefix(cache=out["cache"], logits=out["logits"], num_rows=count))
        for j, sample in enumerate(at):
          where[int(sample)] = (len(parts) - 1, j)
      if offset >= max_new or not going.any():
        break
      if padded < cache.batch_size:  # move the running rows into a smaller batch
        keep = np.flatnonzero(going)
        index = np.zeros(padded, np.int32)
        index[:len(keep)] = keep
        cache, logits, (rng, stop_ids) = _gather((out["cache"],), (out["logits"],), (out["rng"], stop_ids),
                                                 self._put(index))
        live = self._put(np.arange(padded) < len(keep))
        at = at[keep]
      else:               # the stopped rows stay; done rows take no more tokens
        cache, logits, rng = out["cache"], out["logits"], out["rng"]
        live = self._put(np.pad(going, (0, cache.batch_size - count)))
    prefix = self.gather(parts, [where[i] for i in range(n)]) if len(parts) > 1 else parts[0]
    host = dict(buffers, lengths=lengths, stopped=stopped)
    for name, source in (("step_log_prob", "model_log_probs"), ("step_entropy", "entropy"),
                         ("step_varentropy", "varentropy")):
      host[name] = np.asarray(statistics.step_means(jnp.asarray(buffers[source]), jnp.asarray(lengths)))
    return Samples(**host, prefix=prefix)

  def _row_keys(self, seed: int | jax.Array, count: int, padded: int) -> jax.Array:
    """One key for the batch, or `count` per-sample keys padded to `padded` rows and split over the mesh."""
    if isinstance(seed, (int, np.integer)):
      return jax.random.key(seed)
    if not (isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key)):
      raise ValueError(f"seed must be an int or a jax.random.key array; got {type(seed).__name__}.")
    if seed.ndim == 0:
      return seed
    if seed.shape != (count,):
      raise ValueError(f"per-sample keys have shape {seed.shape}; expected ({count},), one per sample.")
    keys = jnp.concatenate([seed, jnp.broadcast_to(seed[:1], (padded - count,))]) if padded > count else seed
    return self._put(keys) if self.mesh is not None else keys

  def score(self, prefix: Prefix, continuations: Sequence[Sequence[int]], positive_id: int,
            negative_id: int, *, donate: bool = False) -> np.ndarray:
    """Values log p(positive) after appending each row's continuation (ending in <start_of_rating>).

    An empty continuation scores the prefix as it stands (its logits already follow the row's last token).
    donate: as in `extend`.
    """
    return self.score_and_extend(prefix, continuations, positive_id, negative_id, donate=donate)[0]

  def score_and_extend(self, prefix: Prefix, continuations: Sequence[Sequence[int]], positive_id: int,
                       negative_id: int, *, donate: bool = False) -> tuple[np.ndarray, Prefix]:
    """`score`, and the prefix extended by the continuations (to continue a rated row without encoding it again)."""
    extended = (self.extend(prefix, continuations, donate=donate) if any(len(c) for c in continuations)
                else prefix)
    values = parallel.to_host(value_lib.value(extended.logits, positive_id, negative_id))[:prefix.num_rows]
    return values, extended

  def score_texts(self, texts: Sequence[Sequence[int]], positive_id: int, negative_id: int) -> np.ndarray:
    """Values of whole token sequences (one prefill each, head only at the last token)."""
    prefix = self.prefill(texts)
    return parallel.to_host(value_lib.value(prefix.logits, positive_id, negative_id))[:len(texts)]
