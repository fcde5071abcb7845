"""A chain of LLaMA-O1 steps per problem, all problems batched: the simplest policy over the sampler and scorer.

Each round, every unfinished problem gets one new node: the policy prompt of its path (`thoughts.policy_prompt`)
is prefilled, one step is sampled up to `<end_of_thought>`, and the step is rated on the same cache by appending
`<start_of_rating>` (no re-encoding). A chain ends when a step carries a `\\boxed{}` answer, when it ends in a
`<conclusion>` step, or when the model writes something that does not parse. The conclusion is forced at the last
round, and at the round after a step that repeats an earlier step of its chain word for word: a greedy policy
that has started to repeat itself would otherwise fill every remaining round with the same step. The result per
problem is the node list (a tree with one branch, serialisable with `thoughts.serialize`), the values of its steps
and the final answer text.

The tree search (MCTS, beam, best-of-N over the same sampler and scorer) replaces this as the main policy; the
chain stays as its one-branch baseline.

Legend: P problems, M new-token budget of one step.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import tqdm

from o1jax import grading, thoughts
from o1jax.sampling.sampler import Sampler, SamplingParams


@dataclasses.dataclass
class Chain:
  """One problem's chain.

  Attributes:
    nodes: root first; each later node the child of the one before.
    values: [len(nodes) - 1] log p(positive) of each step.
    finished: why the chain ended: "answer", "conclusion", "unparsable" or "" (still open).
    error: the format error of an unparsable step.
  """

  nodes: list[thoughts.Node]
  values: list[float] = dataclasses.field(default_factory=list)
  finished: str = ""
  error: str = ""

  @property
  def final_text(self) -> str:
    return self.nodes[-1].text if len(self.nodes) > 1 else ""


def root(question: str) -> thoughts.Node:
  return thoughts.Node(parent=-1, index=0, meta="<problem>", text=question, rating=None)


def _repeats(chain: Chain) -> bool:
  """Whether the chain's last step repeats one of its earlier steps word for word (ignoring surrounding space)."""
  steps = [node.text.strip() for node in chain.nodes[1:]]
  return len(steps) >= 2 and steps[-1] in steps[:-1]


def solve(sampler: Sampler, tokenizer, questions: Sequence[str], *, max_steps: int = 8, max_new_tokens: int = 96,
          params: SamplingParams = SamplingParams(greedy=True), seed: int = 0) -> list[Chain]:
  """Grows one chain per question (see the module docstring) and returns them in order."""
  if max_steps < 1:
    raise ValueError(f"max_steps={max_steps} must be >= 1.")
  chains = [Chain(nodes=[root(q)]) for q in questions]
  end_of_thought = tokenizer.token_to_id(thoughts.END_THOUGHT)
  start_rating = tokenizer.token_to_id(thoughts.START_RATING)
  positive, negative = (tokenizer.token_to_id(t) for t in (thoughts.POSITIVE_RATING, thoughts.NEGATIVE_RATING))
  for depth in tqdm.trange(max_steps, desc="steps", unit="step", leave=False):
    open_chains = [c for c in chains if not c.finished]
    if not open_chains:
      break
    metas = ["<conclusion>" if depth == max_steps - 1 or _repeats(c) else "" for c in open_chains]
    prompts = [tokenizer.encode(thoughts.policy_prompt(c.nodes, meta, new_index=len(c.nodes)))
               for c, meta in zip(open_chains, metas)]
    # Room for the step and for the one-token rating suffix (extended in the smallest continuation bucket).
    reserve = sampler.buckets.new_token_bucket(max_new_tokens) + sampler.buckets.new_token_bucket(1)
    samples = sampler.sample(sampler.prefill(prompts, reserve=reserve), k=1, stop=[end_of_thought],
                             max_new_tokens=max_new_tokens, params=params, seed=seed + depth)
    values = sampler.score(samples.prefix, [[start_rating]] * len(open_chains), positive, negative)
    for chain, meta, ids, value in zip(open_chains, metas, samples.sequences(), values):
      try:
        text = thoughts.parse_step(tokenizer.decode(ids))
      except thoughts.ThoughtFormatError as e:
        chain.finished, chain.error = "unparsable", str(e)
        continue
      chain.nodes.append(thoughts.Node(parent=chain.nodes[-1].index, index=len(chain.nodes), meta=meta, text=text,
                                       rating=thoughts.rating_token(float(value))))
      chain.values.append(float(value))
      if meta == "<conclusion>":
        chain.finished = "conclusion"
      elif grading.last_boxed(text) is not None:
        chain.finished = "answer"
  return chains
