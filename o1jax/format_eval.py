"""How well a model speaks the LLaMA-O1 format: the step-format rate and the rating ROC AUC.

Two numbers, measured on held-out problems (GSM8K test by default), before and after format pretraining:
  - step_format_rate: the fraction of sampled policy steps that end with `<end_of_thought>` and parse as one
    thought (`thoughts.parse_step`). Each problem gives one policy prompt: the root and a random-length prefix of
    its reference steps, exactly as the search builds prompts.
  - rating_auc: the ROC AUC of the value (log p(`<positive_rating>`) from the two rating logits) for telling a
    correct reference step from a corrupted one at the same position of the same problem (one such pair per
    problem, from the corpus builder's `rating_examples`). 0.5 is chance.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tqdm

from o1jax import thoughts
from o1jax.data import corpus
from o1jax.data.problems import Problem
from o1jax.sampling.sampler import Sampler, SamplingParams


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
  """Area under the ROC curve: P(score of a random positive > score of a random negative), ties counting 1/2.

  Raises ValueError unless both classes are present.
  """
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
  if scores.shape != labels.shape or scores.ndim != 1:
    raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be two vectors of one length.")
  positives, negatives = scores[labels], scores[~labels]
  if not len(positives) or not len(negatives):
    raise ValueError(f"ROC AUC needs both classes; got {len(positives)} positive and {len(negatives)} negative.")
  # Mann-Whitney U from average ranks (ties share their mean rank).
  order = np.argsort(scores, kind="mergesort")
  ranks = np.empty(len(scores))
  sorted_scores = scores[order]
  i = 0
  while i < len(scores):
    j = i
    while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2 + 1
    i = j + 1
  u = ranks[labels].sum() - len(positives) * (len(positives) + 1) / 2
  return float(u / (len(positives) * len(negatives)))


@dataclasses.dataclass(frozen=True)
class FormatReport:
  step_format_rate: float
  steps: int
  rating_auc: float
  rating_pairs: int
  examples: tuple[str, ...]  # a few sampled steps, as generated

  def as_dict(self) -> dict:
    return {"step_format_rate": self.step_format_rate, "steps": self.steps, "rating_auc": self.rating_auc,
            "rating_pairs": self.rating_pairs}


def policy_prompts(problems: Sequence[Problem], seed: int) -> list[str]:
  """One policy prompt per problem: the root plus a random-length prefix of its reference steps."""
  prompts = []
  for i, problem in enumerate(problems):
    rng = np.random.default_rng([seed, i])
    prompts.append(corpus.sample_policy_prompt(problem, rng))
  return prompts


def step_format_rate(sampler: Sampler, tokenizer, prompts: Sequence[str], *, batch_size: int,
                     max_new_tokens: int, params: SamplingParams, seed: int) -> tuple[float, list[str]]:
  """The fraction of sampled steps (one per prompt) that end with `<end_of_thought>` and parse; and the steps."""
  stop = ["<end_of_thought>"]
  generated: list[str] = []
  for start in tqdm.trange(0, len(prompts), batch_size, desc="sample steps", unit="batch", leave=False):
    chunk = [tokenizer.encode(p) for p in prompts[start:start + batch_size]]
    prefix = sampler.prefill(chunk, reserve=sampler.buckets.new_token_bucket(max_new_tokens))
    samples = sampler.sample(prefix, k=1, stop=stop, max_new_tokens=max_new_tokens, params=params, seed=seed + start)
    generated.extend(tokenizer.decode(ids) for ids in samples.sequences())
  good = 0
  for text in generated:
    try:
      thoughts.parse_step(text)
      good += 1
    except thoughts.ThoughtFormatError:
      pass
  return good / max(len(generated), 1), generated


def _rates_a_conclusion(rating_prompt: str) -> bool:
  return rating_prompt[rating_prompt.rfind(thoughts.START_THOUGHT):].startswith(
      thoughts.START_THOUGHT + "<conclusion>")


def rating_pairs(problems: Sequence[Problem], seed: int) -> list[tuple[str, str]]:
  """One matched (correct, corrupted) pair of rating prompts per problem: a random step position of the corpus
  builder's `rating_examples` (conclusion pairs left out: those compare final answers, not steps)."""
  pairs = []
  for i, problem in enumerate(problems):
    rng = np.random.default_rng([seed, i])
    examples = corpus.rating_examples(problem, rng)
    steps = [(examples[j][0], examples[j + 1][0]) for j in range(0, len(examples), 2)
             if not _rates_a_conclusion(examples[j][0])]
    if steps:
      pairs.append(steps[rng.integers(len(steps))])
  return pairs


def rating_auc(sampler: Sampler, tokenizer, problems: Sequence[Problem], *, batch_size: int, seed: int
               ) -> tuple[float, int]:
  """ROC AUC of the value over one matched (correct, corrupted) step pair per problem; and the number of pairs."""
  pairs = rating_pairs(problems, seed)
  texts = [text for pair in pairs for text in pair]
  labels = [True, False] * len(pairs)
  positive, negative = (tokenizer.token_to_id(t) for t in ("<positive_rating>", "<negative_rating>"))
  encoded = [tokenizer.encode(t) for t in texts]
  # Batches of similar length: each batch is padded to the prompt bucket of its longest text.
  order = np.argsort([len(ids) for ids in encoded], kind="stable")
  values = np.zeros(len(texts))
  for start in tqdm.trange(0, len(texts), batch_size, desc="rate steps", unit="batch", leave=False):
    rows = order[start:start + batch_size]
    values[rows] = np.asarray(sampler.score_texts([encoded[r] for r in rows], positive, negative))
  return roc_auc(values, labels), len(pairs)


def evaluate(sampler: Sampler, tokenizer, problems: Sequence[Problem], *, batch_size: int = 32,
             max_new_tokens: int = 128, params: SamplingParams = SamplingParams(temperature=0.7),
             seed: int = 0) -> FormatReport:
  """Both measurements over `problems` (see the module docstring)."""
  rate, steps = step_format_rate(sampler, tokenizer, policy_prompts(problems, seed), batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, params=params, seed=seed)
  auc, pairs = rating_auc(sampler, tokenizer, problems, batch_size=batch_size, seed=seed)
  return FormatReport(step_format_rate=rate, steps=len(steps), rating_auc=auc, rating_pairs=pairs,
                      examples=tuple(steps[:5]))
