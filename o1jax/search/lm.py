"""The language model behind the StepModel protocol: batched expansion and rating over the Sampler.

  sampler = Sampler(loaded.model, vocab=loaded.tokenizer.vocab(), mesh=mesh, buckets=lm.search_buckets())
  model = LMStepModel(sampler, loaded.tokenizer, max_new_tokens=64, params=SamplingParams(temperature=0.7))
  results = mcts.search(model, problems, config)

One `expand` call, for all requests of all trees (in chunks of at most `max_rows` children):
  1. path prefix: each request's root-to-node path, as token ids assembled from the tree's token buffers
     (o1jax/prompt_tokens.py), is prefilled once (`path_prefix`, the one place a later page pool slots in);
  2. the prefix is forked into one row per child and each row is extended by the child's hint and header (its own
     meta action and local id), then every row samples one step in ONE decode, each from its child's own key,
     stopping at any format token;
  3. each new node is rated on the same cache (`rating_context="policy"`): the row is cut back to the prompt and
     the step's kept tokens, then `<end_of_thought><start_of_rating>` is appended and the value read there.
     When the child had no hint (a plain expansion in evaluation) that is exactly LLaMA-O1's value prompt; a
     hinted child is rated with its hint in context. `rating_context="value"` instead rates LLaMA-O1's value
     prompt exactly, re-encoding each step's line on the path's cache (no hint), at the price of a second
     extend of about a step's length per child.
`rate` then hands back the values computed in step 3 (the caches are gone by then: one chunk at a time).

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

from o1jax.prompt_tokens import PromptTokens
from o1jax.sampling.buckets import Buckets
from o1jax.sampling.sampler import Prefix, Sampler, SamplingParams
from o1jax.search.step_model import Request, Step

RATING_CONTEXTS = ("policy", "value")


def search_buckets(max_rows: int = 64) -> Buckets:
  """Buckets for a search: batch sizes vary from round to round, and hint / rating suffixes are a few tokens."""
  batch = tuple(sorted({b for b in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256) if b < max_rows}
                       | {max_rows}))
  return Buckets(prompt=(32, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 1024, 1536, 2048),
                 new_tokens=(2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512), batch=batch)


class LMStepModel:
  """A StepModel over a Sampler and its tokenizer (see the module docstring).

  Attributes:
    timings: seconds spent per phase ("prefill", "prompt", "decode", "score") since construction.
  """

  def __init__(self, sampler: Sampler, tokenizer, *, max_new_tokens: int = 64,
               params: SamplingParams = SamplingParams(temperature=0.7), rating_context: str = "policy",
               max_rows: int = 64, seed: int = 0):
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
    self.stop = sorted(self.prompts.special_ids)
    self.timings: collections.Counter = collections.Counter()
    self._questions: dict[str, list[int]] = {}
    self._values: dict[tuple[str, int], float] = {}
    self._calls = 0
    self._seed = seed

  # ------------------------------------------------------------------------------------------------ prompts

  def path_tokens(self, request: Request) -> list[int]:
    """The ids of the request's root-to-node path, one node per line (no hint, no new header)."""
    question = self._questions.get(request.question)
    if question is None:
      question = self._questions[request.question] = self.tokenizer.encode(request.question)
    lines = [self.prompts.line(n.parent, n.index, n.meta, n.tokens, n.rating) for n in request.path]
    return self.prompts.path(self.prompts.root(question), lines)

  def path_prefix(self, paths: Sequence[Sequence[int]], reserve: int) -> Prefix:
    """The cache of every path with `reserve` free slots: where a cache of node prefixes would slot in."""
    return self.sampler.prefill(paths, reserve=reserve)

  # -------------------------------------------------------------------------------------------- the protocol

  def expand(self, requests: Sequence[Request]) -> list[list[Step]]:
    self._values = {}
    out: list[list[Step]] = []
    chunk: list[Request] = []
    rows = 0
    for request in list(requests) + [None]:
      k = 0 if request is None else len(request.child_ids)
      if chunk and (request is None or rows + k > self.max_rows):
        out += self._expand_chunk(chunk)
        chunk, rows = [], 0
      if request is not None:
        chunk.append(request)
        rows += k
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
    keys = []
    for i, r in enumerate(requests):
      if r.keys is None:
        base = jax.random.fold_in(jax.random.fold_in(jax.random.key(self._seed), self._calls), i)
        keys.append(jax.vmap(lambda j, b=base: jax.random.fold_in(b, j))(np.arange(len(r.child_ids), dtype=np.uint32)))
      else:
        keys.append(r.keys)
    return jax.numpy.concatenate(keys)

  def _expand_chunk(self, requests: Sequence[Request]) -> list[list[Step]]:
    buckets = self.sampler.buckets
    paths = [self.path_tokens(r) for r in requests]
    rows, suffixes = [], []
    for i, r in enumerate(requests):
      for child, meta, hint in zip(r.child_ids, r.metas, r.hints):
        rows.append(i)
        suffixes.append(self.prompts.policy_suffix(r.node, child, meta, hint))
    suffix_bucket = buckets.new_token_bucket(max(len(s) for s in suffixes))
    step_bucket = buckets.new_token_bucket(self.max_new_tokens)
    if self.rating_context == "policy":
      reserve = suffix_bucket + step_bucket + buckets.new_token_bucket(2)
    else:
      reserve = max(suffix_bucket + step_bucket, buckets.new_token_bucket(self.max_new_tokens + 24))
    prefix = self._timed("prefill", self.path_prefix, paths, reserve)
    prompted = self._timed("prompt", lambda: self.sampler.extend(self.sampler.fork(prefix, rows), suffixes,
                                                                  bucket=suffix_bucket))
    samples = self._timed("decode", self.sampler.sample, prompted, k=1, stop=self.stop,
                          max_new_tokens=self.max_new_tokens, params=self.params, seed=self._keys(requests))
    prompt_lengths = [len(paths[i]) + len(s) for i, s in zip(rows, suffixes)]
    steps, kept = [], []
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
      kept.append(tokens)
    eot, sor = self.prompts.end_of_thought, self.prompts.start_of_rating
    if self.rating_context == "policy":
      cut = self.sampler.truncate(samples.prefix, [p + len(t) for p, t in zip(prompt_lengths, kept)])
      continuations = [[eot, sor]] * len(kept)
      values = self._timed("score", self.sampler.score, cut, continuations, self.prompts.positive,
                           self.prompts.negative)
    else:
      continuations = []
      for i, r in enumerate(requests):
        for child, meta in zip(r.child_ids, r.metas):
          continuations.append(self.prompts.rating_suffix(r.node, child, meta, kept[len(continuations)]))
      values = self._timed("score", lambda: self.sampler.score(self.sampler.fork(prefix, rows), continuations,
                                                               self.prompts.positive, self.prompts.negative))
    out, j = [], 0
    for i, r in enumerate(requests):
      request_steps = []
      for n, child in enumerate(r.child_ids):
        prompt_tokens = len(suffixes[j]) + (len(paths[i]) if n == 0 else 0)
        request_steps.append(Step(**steps[j], prompt_tokens=prompt_tokens, rating_tokens=len(continuations[j])))
        self._values[(r.problem, child)] = min(float(values[j]), 0.0)
        j += 1
      out.append(request_steps)
    return out
