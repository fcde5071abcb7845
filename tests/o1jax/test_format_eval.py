"""ROC AUC against hand-counted pairs, and the step-format rate of known continuations."""

import numpy as np
import pytest

from o1jax import format_eval
from o1jax.sampling import buckets


def test_roc_auc_by_hand():
  # Positives 0.9, 0.4; negatives 0.5, 0.1: of the 4 (positive, negative) pairs, 3 are ordered right.
  assert format_eval.roc_auc([0.9, 0.5, 0.4, 0.1], [True, False, True, False]) == 0.75
  # A tie between a positive and a negative counts one half: pairs (0.5 vs 0.5) = 1/2, (0.5 vs 0.2) = 1.
  assert format_eval.roc_auc([0.5, 0.5, 0.2], [True, False, False]) == 0.75
  assert format_eval.roc_auc([3, 2, 1], [True, True, False]) == 1.0
  assert format_eval.roc_auc([1, 2, 3], [True, True, False]) == 0.0


def test_roc_auc_matches_pair_counting_on_random_scores():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 5, 60).astype(float)   # many ties
  labels = rng.random(60) < 0.4
  pos, neg = scores[labels], scores[~labels]
  counted = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
  assert format_eval.roc_auc(scores, labels) == pytest.approx(counted)


def test_roc_auc_needs_both_classes():
  with pytest.raises(ValueError, match="needs both classes; got 2 positive and 0 negative"):
    format_eval.roc_auc([0.1, 0.2], [True, True])


class _FakeTokenizer:
  """Token ids are characters; decode joins them back."""

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids)


class _FakeSampler:
  """Returns fixed continuations, as a sampler that generated them would."""

  def __init__(self, continuations):
    self.continuations = continuations
    self.buckets = buckets.Buckets()   # step_format_rate reserves the step's new-token bucket

  def prefill(self, prompts, reserve=0):
    return len(prompts)

  def sample(self, prefix, *, k, stop, max_new_tokens, params, seed):
    class _Samples:
      def sequences(_):
        return [[ord(c) for c in text] for text in self.continuations[:prefix]]
    return _Samples()


def test_step_format_rate_counts_parsable_steps():
  continuations = [
      "Felix drives 2*66=132 mph.<end_of_thought>",                               # good
      " So the answer is \\boxed{528}<end_of_thought>",                           # good
      "Felix drives 132 mph and then",                                            # ran out of tokens
      "step<end_of_thought><start_of_rating><positive_rating><end_of_rating>",    # wrote past the stop
  ]
  rate, steps = format_eval.step_format_rate(_FakeSampler(continuations), _FakeTokenizer(), ["p"] * 4,
                                             batch_size=4, max_new_tokens=8, params=None, seed=0)
  assert steps == continuations
  assert rate == 0.5


def test_rating_pairs_match_a_real_step_with_its_corruption():
  from o1jax import thoughts
  from o1jax.data import problems
  held_out = problems.load("gsm8k_test", 0, 10)
  pairs = format_eval.rating_pairs(held_out, seed=0)
  assert len(pairs) == 10
  for problem, (right, wrong) in zip(held_out, pairs):
    assert right != wrong and right.endswith(thoughts.START_RATING) and wrong.endswith(thoughts.START_RATING)
    cut = right.rfind(thoughts.START_THOUGHT)
    assert wrong[:cut] == right[:cut]                                      # the same path and node header
    assert not right[cut:].startswith(thoughts.START_THOUGHT + "<conclusion>")
    step = right[cut + len(thoughts.START_THOUGHT):-len(thoughts.END_THOUGHT + thoughts.START_RATING)]
    assert step.strip() and step.strip() in problem.solution              # a line of the reference solution
  assert pairs == format_eval.rating_pairs(held_out, seed=0)


class _RecordingScorer:
  """Scores a token list by a checksum of its ids and records each batch's lengths."""

  def __init__(self):
    self.batches = []

  @staticmethod
  def score(ids):
    return float(sum(i * (k + 1) for k, i in enumerate(ids)) % 1009)

  def score_texts(self, texts, positive_id, negative_id):
    self.batches.append([len(t) for t in texts])
    return np.asarray([self.score(t) for t in texts])


class _IdTokenizer(_FakeTokenizer):
  """Characters plus a text-dependent number of filler ids, so a pair's two texts rarely sort side by side."""

  def encode(self, text):
    ids = super().encode(text)
    return ids + [7] * (sum(ids) % 97)

  def token_to_id(self, token):
    return {"<positive_rating>": 1, "<negative_rating>": 2}[token]


def test_rating_auc_scores_each_text_under_its_own_label():
  from o1jax.data import problems
  held_out = problems.load("gsm8k_test", 0, 12)
  pairs = format_eval.rating_pairs(held_out, seed=0)
  scorer = _RecordingScorer()
  auc, count = format_eval.rating_auc(scorer, _IdTokenizer(), held_out, batch_size=5, seed=0)
  assert count == len(pairs) == 12
  # The AUC counted by hand over the pairs: batching by length must keep each score with its own text.
  right = [scorer.score(_IdTokenizer().encode(r)) for r, _ in pairs]
  wrong = [scorer.score(_IdTokenizer().encode(w)) for _, w in pairs]
  expected = np.mean([(r > w) + 0.5 * (r == w) for r in right for w in wrong])
  assert auc == pytest.approx(expected)
  lengths = [len(_IdTokenizer().encode(text)) for pair in pairs for text in pair]
  assert [n for batch in scorer.batches for n in batch] == sorted(lengths)  # batches of similar length
