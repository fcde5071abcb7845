"""The step chain on scripted model outputs: node structure, ratings, forced conclusion, stop reasons."""

import math

import numpy as np
import pytest

from o1jax import thoughts
from o1jax.sampling.buckets import Buckets
from o1jax.search import chain

SPECIAL_IDS = {token: 1000 + i for i, token in enumerate(thoughts.SPECIAL_TOKENS)}


class _Tokenizer:
  """Encodes a prompt as one id (its index in `prompts`); decodes a step id to its scripted text."""

  def __init__(self, steps):
    self.prompts, self.steps = [], steps

  def encode(self, text):
    self.prompts.append(text)
    return [len(self.prompts) - 1]

  def decode(self, ids):
    return self.steps[ids[0]]

  def token_to_id(self, token):
    return SPECIAL_IDS[token]


class _Sampler:
  """Round r returns, for the i-th open chain, the scripted step script[r][i] and the value values[r][i]."""

  buckets = Buckets()

  def __init__(self, script, values):
    self.script, self.values, self.round, self.calls = script, values, 0, []

  def prefill(self, prompts, reserve=0):
    self.calls.append(("prefill", len(prompts), reserve))
    return len(prompts)

  def sample(self, prefix, *, k, stop, max_new_tokens, params, seed):
    assert k == 1 and stop == [SPECIAL_IDS["<end_of_thought>"]]
    ids = [[step_id] for step_id in self.script[self.round][:prefix]]

    class _Samples:
      prefix = len(ids)

      def sequences(_):
        return ids
    return _Samples()

  def score(self, prefix, continuations, positive, negative):
    assert continuations == [[SPECIAL_IDS["<start_of_rating>"]]] * prefix
    assert (positive, negative) == (SPECIAL_IDS["<positive_rating>"], SPECIAL_IDS["<negative_rating>"])
    values = self.values[self.round][:prefix]
    self.round += 1
    return np.asarray(values)


def test_chain_by_hand():
  steps = [
      "He has 3+4=<<3+4=7>>7 apples.<end_of_thought>",        # 0: plain step
      " So the answer is \\boxed{7}<end_of_thought>",          # 1: an answer ends the chain
      "Half of 10 is 5.<end_of_thought>",                      # 2
      "and then he",                                           # 3: no stop token: unparsable
      " Therefore, the answer is \\boxed{12}<end_of_thought>",  # 4: the forced conclusion
  ]
  tokenizer = _Tokenizer(steps)
  # Problem A: step 0, then 1 (answer). B: step 2, step 2, conclusion 4. C: step 3 (unparsable) at once.
  sampler = _Sampler(script=[[0, 2, 3], [1, 2], [4]],
                     values=[[math.log(0.9), math.log(0.6), -1.0], [math.log(0.2), math.log(0.7)], [-0.1]])
  chains = chain.solve(sampler, tokenizer, ["A?", "B?", "C?"], max_steps=3, max_new_tokens=32)

  a, b, c = chains
  assert [n.text for n in a.nodes] == ["A?", "He has 3+4=<<3+4=7>>7 apples.", " So the answer is \\boxed{7}"]
  assert [n.parent for n in a.nodes] == [-1, 0, 1] and [n.index for n in a.nodes] == [0, 1, 2]
  assert [n.rating for n in a.nodes[1:]] == ["<positive_rating>", "<negative_rating>"]   # p = 0.9, 0.2
  assert a.finished == "answer" and a.final_text.endswith("\\boxed{7}")
  np.testing.assert_allclose(a.values, [math.log(0.9), math.log(0.2)])

  assert [n.meta for n in b.nodes] == ["<problem>", "", "", "<conclusion>"]
  assert b.finished == "conclusion" and len(b.values) == 3

  assert c.finished == "unparsable" and len(c.nodes) == 1 and "expected '<end_of_thought>'" in c.error

  # Round 1 prompts the three roots; round 3 prompts B alone with the conclusion header and hint.
  assert len(tokenizer.prompts) == 3 + 2 + 1
  last = tokenizer.prompts[-1]
  assert last.endswith("<start_of_father_id>2<end_of_father_id><start_of_local_id>3<end_of_local_id>"
                       "<start_of_thought><conclusion>")
  assert thoughts.CONCLUSION_HINT in last
  # The serialised chains parse back to the same nodes.
  for solved in chains:
    assert thoughts.parse(thoughts.serialize(solved.nodes)) == solved.nodes
  # Each prefill reserves the step bucket plus the rating suffix's bucket.
  assert {reserve for _, _, reserve in sampler.calls} == {32 + 16}


def test_a_repeated_step_forces_the_conclusion_next():
  steps = [
      "He runs 60/3=<<60/3=10>>10 meters.<end_of_thought>",   # 0
      " He runs 60/3=<<60/3=10>>10 meters. <end_of_thought>",  # 1: step 0 again, up to surrounding space
      "He runs 3*3=<<3*3=9>>9 sprints.<end_of_thought>",       # 2
      " So the answer is \\boxed{10}<end_of_thought>",        # 3
  ]
  tokenizer = _Tokenizer(steps)
  # A: 0, 1 (repeats 0) -> round 3 is A's conclusion. B: 0, 2, 2 (repeats 2) -> round 4 is B's conclusion,
  # although max_steps leaves room for 6 rounds.
  script = [[0, 0], [1, 2], [3, 2], [3]]
  sampler = _Sampler(script=script, values=[[-0.5] * len(r) for r in script])
  a, b = chain.solve(sampler, tokenizer, ["A?", "B?"], max_steps=6, max_new_tokens=32)

  assert [n.meta for n in a.nodes] == ["<problem>", "", "", "<conclusion>"] and a.finished == "conclusion"
  assert [n.meta for n in b.nodes] == ["<problem>", "", "", "", "<conclusion>"] and b.finished == "conclusion"
  assert sampler.round == 4  # no fifth or sixth round
  # Round 3 prompted A with the conclusion header and B without it.
  round3 = tokenizer.prompts[4:6]
  assert round3[0].endswith("<start_of_thought><conclusion>") and thoughts.CONCLUSION_HINT in round3[0]
  assert round3[1].endswith("<start_of_thought>") and thoughts.CONCLUSION_HINT not in round3[1]


def test_max_steps_must_be_positive():
  with pytest.raises(ValueError, match="max_steps=0 must be >= 1"):
    chain.solve(_Sampler([], []), _Tokenizer([]), ["Q"], max_steps=0)
