"""The language model behind the StepModel protocol: batched expansion and rating over the Sampler.

  sampler = Sampler(loaded.model, vocab=loaded.tokenizer.vocab(), mesh=mesh, buckets=lm.search_buckets())
  model = LMStepModel(sampler, loaded.tokenizer, max_new_tokens=64, params=SamplingParams(temperature=0.7))
  results = mcts.search(model, problems, config)

One `expand` call, for all requests of all trees (in chunks of at most `max_rows` children):
  1. path prefix: each request's root-to-node path, as token ids assembled from the tree's token buffers
     (o1jax/prompt_tokens.py), is prefilled once, or taken from the last call's caches (`path_prefix`): a node
     expanded again from its path cache, a node sampled in the last call (a chain's next step) from the cache
     it was rated on, so that a chain encodes each step once;
  2. the prefix is forked into one row per child and each row is extended by the child's hint and header (its own
     meta action and local id), then every row samples one step in ONE decode, each from its child's own key,
     stopping at any format token;
  3. each new node is rated on the same cache (`rating_context="policy"`): the row is cut back to the prompt and
     the step's kept tokens, then `<end_of_thought><start_of_rating>` is appended and the value read there.
     When the child had no hint (a plain expansion in evaluation) that is exactly LLaMA-O1's value prompt; a
     hinted child is rated with its hint in context. `rating_context="value"` instead rates LLaMA-O1's value
     prompt exactly, re-encoding each step's line on the path's cache (no hint), at the price of a second
     extend of about a step's length per child.
`rate` then hands back the values computed in step 3. Up to `keep_rows` rows of the rated and the path caches
stay for the next call (the rated ones first); the rest are dropped chunk by chunk.

A step that stopped at a format token other than `<end_of_thought>`, ran out of tokens, or spelled a format
token out of plain pieces is cut before it (`PromptTokens.clean_step`) and reported unfinished; its statistics
are means over the tokens kept (and the `<end_of_thought>` when it has one).

Legend: R requests, k children per request, M new-token bucket.
"""

from __future__ import annotations

import collections
import time
from typing import Sequence

import jax
import numpy as np

from o1jax import thoughts
from o1jax.prompt_tokens import PromptTokens
from o1jax.sampling.buckets import Buckets
from o1jax.sampling.sampler import Prefix, Sampler, SamplingParams
from o1jax.search import expansion
from o1jax.search.step_model import Request, Step

RATING_CONTEXTS = ("policy", "value")


def search_buckets(max_rows: int = 64) -> Buckets:
  """Buckets for a search: batch sizes vary from round to round, and hint / rating suffixes are a few tokens."""
  batch = tuple(sorted({b for b in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256) if b < max_rows}
                       | {max_rows}))
  return Buckets(prompt=(32, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 1024, 1536, 2048),
                 new_tokens=(2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512), batch=batch)


def _place(order: list[tuple[int, int]], requests: Sequence[int], part: int) -> list[tuple[int, int]]:
  """order with request requests[j] at row j of `part`."""
  order = list(order)
  for row, i in enumerate(requests):
    order[i] = (part, row)
  return order


class LMStepModel:
  """A StepModel over a Sampler and its tokenizer (see the module docstring).

  Args:
    max_rows: children per sampler call (requests are split into chunks of at most this many).
    compact_every: decode in segments of this many tokens, moving the running samples into smaller batches
      (Sampler.sample's compact_every; 0 decodes in one segment).
    keep_rows: at most this many cache rows are kept from one call to the next: the children's rated caches
      (their next step continues them), then (keep_paths) the paths, for nodes expanded again.
    keep_paths: False for the step-level strategies (o1jax.search.beam), which never expand a node twice.

  Attributes:
    timings: seconds spent per phase ("prefill", "prompt", "decode", "score") since construction.
  """

  def __init__(self, sampler: Sampler, tokenizer, *, max_new_tokens: int = 64,
               params: SamplingParams = SamplingParams(temperature=0.7), rating_context: str = "policy",
               max_rows: int = 64, compact_every: int = 16, keep_rows: int = 256, keep_paths: bool = True,
               seed: int = 0):
    if rating_context not in RATING_CONTEXTS:
      raise ValueError(f"rating_context={rating_context!r}; expected one of {RATING_CONTEXTS}.")
    if max_rows < 1 or max_new_tokens < 1:
      raise ValueError(f"max_rows={max_rows} and max_new_tokens={max_new_tokens} must be >= 1.")
    self.sampler = sampler
    self.tokenizer = tokenizer
    self.prompts = PromptTokens(tokenizer)
    self.max_new_tokens = max_new_tokens
    self.params = params
    self.rating_context = rating_context
    self.max_rows = max_rows
    self.compact_every = compact_every
    self.keep_rows = keep_rows
    self.keep_paths = keep_paths
    self.stop = sorted(self.prompts.special_ids)
    self.timings: collections.Counter = collections.Counter()
    self._questions: dict[str, list[int]] = {}
    self._values: dict[tuple[str, int], float] = {}
    self._calls = 0
    self._seed = seed
    # Free slots after a path: its longest hint and header, the step, and the rating suffix. Fixed (not sized per
    # call) so that every path cache of one prompt bucket has the same slots and can be reused (`path_prefix`).
    buckets = sampler.buckets
    # A header with 4-digit ids is 11 tokens with its newline and meta; 16 leaves room for a few more digits.
    longest_hint = max(len(tokenizer.encode(thoughts.hint(m))) for m in thoughts.META_PREFIXES[1:])
    self._suffix_slots = buckets.new_token_bucket(longest_hint + 16)
    step = buckets.new_token_bucket(max_new_tokens)
    if rating_context == "policy":
      self._reserve = self._suffix_slots + step + buckets.new_token_bucket(2)
    else:
      self._reserve = max(self._suffix_slots + step, buckets.new_token_bucket(max_new_tokens + 24))
    # The path caches of the last expansion, for nodes expanded again (widening expands a node repeatedly).
    self._kept: list[tuple[Prefix, dict[tuple[str, int], int]]] = []

  # ------------------------------------------------------------------------------------------------ prompts

  def path_tokens(self, request: Request) -> list[int]:
    """The ids of the request's root-to-node path, one node per line (no hint, no new header)."""
    question = self._questions.get(request.question)
    if question is None:
      question = self._questions[request.question] = self.tokenizer.encode(request.question)
    lines = [self.prompts.line(n.parent, n.index, n.meta, n.tokens, n.rating) for n in request.path]
    return self.prompts.path(self.prompts.root(question), lines)

  def path_prefix(self, requests: Sequence[Request], paths: Sequence[Sequence[int]],
                  kept: Sequence[tuple[Prefix, dict[tuple[str, int], tuple[int, tuple[int, ...]]]] | None] = ()
                  ) -> tuple[Prefix, list[int]]:
    """The cache of every request's path, one row per request, and how many of each path's tokens it encoded now.

    A path found in the last `expand` call's caches is taken from there instead of being prefilled: a node that
    call expanded (LLaMA-O1's widening expands a node several simulations in a row) from its path cache, and a
    child that call sampled (a chain's next step, a beam's kept child, a new MCTS leaf) from the cache it was
    rated on, which holds its whole line but the rating token and `<end_of_rating>`: those are appended. A row is
    taken only when the cache's tokens are exactly the start of the path (a hinted child's cache holds its hint,
    which the path does not: it is prefilled). Taken rows are repacked into the slots of the prefill of the
    others, so that all share one cache; this is the one place where a pool of node caches would slot in.
    """
    hits = [self._find(kept, r, path) for r, path in zip(requests, paths)]
    if not any(hits):
      return self.sampler.prefill(paths, reserve=self._reserve), [len(p) for p in paths]
    bucket = self.sampler.buckets.prompt_bucket(max(len(p) for p in paths))
    tails = [paths[i][h[2]:] if h else [] for i, h in enumerate(hits)]
    tail_slots = self.sampler.buckets.new_token_bucket(max(map(len, tails))) if any(tails) else 0
    slots = bucket + tail_slots + self._reserve
    parts, order = [], [(0, 0)] * len(requests)   # order[i]: (part, row) of request i
    for source in sorted({h[0] for h in hits if h}):
      taken = [i for i, h in enumerate(hits) if h and h[0] == source]
      part = self.sampler.repack(self.sampler.gather([kept[source][0]], [(0, hits[i][1]) for i in taken]), slots)
      if any(tails[i] for i in taken):
        part = self.sampler.extend(part, [tails[i] for i in taken], bucket=tail_slots, donate=True)
      order = _place(order, taken, len(parts))
      parts.append(part)
    missing = [i for i, h in enumerate(hits) if h is None]
    if missing:
      order = _place(order, missing, len(parts))
      parts.append(self.sampler.prefill([paths[i] for i in missing], reserve=slots - bucket, bucket=bucket))
    encoded = [len(paths[i]) if h is None else len(tails[i]) for i, h in enumerate(hits)]
    return self.sampler.gather(parts, order), encoded

  @staticmethod
  def _find(kept, request: Request, path: Sequence[int]) -> tuple[int, int, int] | None:
    """(source, row, tokens held) of the kept cache row that starts the request's path, or None."""
    for source, entry in enumerate(kept):
      hit = None if entry is None else entry[1].get((request.problem, request.node))
      if hit is not None and len(hit[1]) <= len(path) and tuple(path[:len(hit[1])]) == hit[1]:
        return source, hit[0], len(hit[1])
    return None

  def _keep(self, prefix: Prefix, rows: dict[tuple[str, int], tuple[int, tuple[int, ...]]]) -> None:
    """Keeps a cache for the next call while the kept rows stay within keep_rows."""
    if sum(p.num_rows for p, _ in self._kept) + prefix.num_rows <= self.keep_rows:
      self._kept.append((prefix, rows))

  # -------------------------------------------------------------------------------------------- the protocol

  def expand(self, requests: Sequence[Request]) -> list[list[Step]]:
    self._values = {}
    kept, self._kept = list(self._kept), []   # this call's chunks keep their caches in place of the last call's
    chunks: list[list[Request]] = [[]]
    rows = 0
    for request in requests:
      k = len(request.child_ids)
      if chunks[-1] and rows + k > self.max_rows:
        chunks.append([])
        rows = 0
      chunks[-1].append(request)
      rows += k
    # A kept cache is dropped after the last chunk that takes rows from it (the memory of a multi-chunk call is
    # then about one call's caches, not two).
    last = {}
    for n, chunk in enumerate(chunks):
      for r in chunk:
        last.update({source: n for source, entry in enumerate(kept) if (r.problem, r.node) in entry[1]})
    kept = [entry if source in last else None for source, entry in enumerate(kept)]
    out: list[list[Step]] = []
    for n, chunk in enumerate(chunks):
      if chunk:
        out += self._expand_chunk(chunk, kept)
      kept = [None if last.get(source) == n else entry for source, entry in enumerate(kept)]
    self._calls += 1
    return out

  def rate(self, requests: Sequence[Request], steps: Sequence[Sequence[Step]]) -> list[list[float]]:
    try:
      return [[self._values[(r.problem, c)] for c in r.child_ids] for r in requests]
    except KeyError as e:
      raise ValueError(f"rate got a request for node {e.args[0]} that the last expand did not sample; call rate "
                       "with the requests of the last expand.") from None

  # ------------------------------------------------------------------------------------------------ the work

  def _timed(self, phase: str, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(out.logits if isinstance(out, Prefix) else
                          out.prefix.logits if hasattr(out, "prefix") else out)
    self.timings[phase] += time.perf_counter() - start
    return out

  def _keys(self, requests: Sequence[Request]) -> jax.Array:
    """One key per child: the requests' own, or (without) keys from the model's seed and call count."""
    data = []
    for i, r in enumerate(requests):
      if r.keys is None:
        base = jax.random.fold_in(jax.random.fold_in(jax.random.key(self._seed), self._calls), i)
        data.append(expansion.child_keys(base, len(r.child_ids)))
      else:
        data.append(np.asarray(r.keys, np.uint32).reshape(len(r.child_ids), -1))
    return jax.random.wrap_key_data(np.concatenate(data))

  def _expand_chunk(self, requests: Sequence[Request], kept) -> list[list[Step]]:
    buckets = self.sampler.buckets
    paths = [self.path_tokens(r) for r in requests]
    rows, suffixes = [], []
    for i, r in enumerate(requests):
      for child, meta, hint in zip(r.child_ids, r.metas, r.hints):
        rows.append(i)
        suffixes.append(self.prompts.policy_suffix(r.node, child, meta, hint))
    suffix_bucket = buckets.new_token_bucket(max(len(s) for s in suffixes))
    if suffix_bucket > self._suffix_slots:
      raise ValueError(f"a hint and header of {max(len(s) for s in suffixes)} tokens do not fit the "
                       f"{self._suffix_slots} slots kept for them (a ground-truth hint this long?).")
    start = time.perf_counter()
    prefix, encoded = self.path_prefix(requests, paths, kept)
    jax.block_until_ready(prefix.logits)
    self.timings["prefill"] += time.perf_counter() - start
    prompted = self._timed("prompt", lambda: self.sampler.extend(self.sampler.fork(prefix, rows), suffixes,
                                                                  bucket=suffix_bucket, donate=True))
    samples = self._timed("decode", self.sampler.sample, prompted, k=1, stop=self.stop,
                          max_new_tokens=self.max_new_tokens, params=self.params, seed=self._keys(requests),
                          donate=True, compact_every=self.compact_every)
    prompt_lengths = [len(paths[i]) + len(s) for i, s in zip(rows, suffixes)]
    steps, kept_tokens = [], []
    sequences = samples.sequences()
    for j, sequence in enumerate(sequences):
      stopped = bool(samples.stopped[j])
      body = sequence[:-1] if stopped else sequence
      tokens, text = self.prompts.clean_step(body)
      finished = stopped and sequence[-1] == self.prompts.end_of_thought and len(tokens) == len(body)
      counted = len(tokens) + int(finished)   # the statistics cover the kept tokens and a final <end_of_thought>
      mean = lambda a: float(np.mean(a[j, :counted])) if counted else 0.0  # noqa: E731
      steps.append(dict(tokens=tokens, text=text, finished=finished,
                        log_prob=mean(samples.model_log_probs), entropy=mean(samples.entropy),
                        varentropy=mean(samples.varentropy),
                        token_log_probs=np.asarray(samples.model_log_probs[j, :counted], np.float32),
                        generated=int(samples.lengths[j])))
      kept_tokens.append(tokens)
    eot, sor = self.prompts.end_of_thought, self.prompts.start_of_rating
    if self.rating_context == "policy":
      cut = self.sampler.truncate(samples.prefix, [p + len(t) for p, t in zip(prompt_lengths, kept_tokens)],
                                  donate=True)
      continuations = [[eot, sor]] * len(kept_tokens)
      values, rated = self._timed("score", self.sampler.score_and_extend, cut, continuations,
                                  self.prompts.positive, self.prompts.negative, donate=True)
      held = [(*paths[i], *suffix, *t, eot, sor) for i, suffix, t in zip(rows, suffixes, kept_tokens)]
    else:
      continuations = []
      for i, r in enumerate(requests):
        for child, meta in zip(r.child_ids, r.metas):
          continuations.append(self.prompts.rating_suffix(r.node, child, meta, kept_tokens[len(continuations)]))
      values, rated = self._timed("score", lambda: self.sampler.score_and_extend(
          self.sampler.fork(prefix, rows), continuations, self.prompts.positive, self.prompts.negative,
          donate=True))
      held = [(*paths[i], *c) for i, c in zip(rows, continuations)]
    # Keep the caches for the next call, up to keep_rows rows: first the children's rated caches (a chain, a beam
    # or a new leaf continues from one of them), then the paths (for nodes expanded again). A round of best-of-N
    # over many problems expands thousands of distinct nodes, none of them twice: their paths would only hold
    # memory.
    children = [(r.problem, c) for r in requests for c in r.child_ids]
    self._keep(rated, {key: (j, tuple(map(int, h))) for j, (key, h) in enumerate(zip(children, held))})
    if self.keep_paths:
      self._keep(prefix, {(r.problem, r.node): (i, tuple(map(int, paths[i]))) for i, r in enumerate(requests)})
    out, j = [], 0
    for i, r in enumerate(requests):
      request_steps = []
      for n, child in enumerate(r.child_ids):
        prompt_tokens = len(suffixes[j]) + (encoded[i] if n == 0 else 0)
        request_steps.append(Step(**steps[j], prompt_tokens=prompt_tokens, rating_tokens=len(continuations[j])))
        self._values[(r.problem, child)] = min(float(values[j]), 0.0)
        j += 1
      out.append(request_steps)
    return out
