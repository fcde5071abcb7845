"""Step-level search strategies over the same trees and StepModel: greedy chain, best-of-N, beam search, DVTS.

  results = beam.search(step_model, problems, BeamConfig(strategy="beam", n=16, beam_width=4))

Every strategy grows all problems' trees together, one depth per round: each round, every tree's active leaves
go to the StepModel in one call (a leaf asking for several children is prefilled once), the new nodes are rated
in the same call, and each tree then chooses which new nodes stay active. The rules follow huggingface/
search-and-learn (`src/sal/search/`), with LLaMA-O1 steps as its steps and the model's own ratings as its
process reward:
  - chain: one greedy step per round (temperature 0 comes from the StepModel's sampling parameters); the
    one-branch baseline.
  - best_of_n: n independent chains (the root's n children each continue alone).
  - beam: round 0 gives the root n children; each later round the active beams are repeated up to n
    candidates (a beam gets n // active children, the first n % active one more), completed beams (terminal)
    leave, and the n / beam_width best by aggregated score stay active.
  - dvts: n / beam_width subtrees; round 0 gives the root n children in groups of beam_width; each round every
    subtree keeps its best new node (by aggregated score) and expands it into beam_width children; a subtree
    whose best node is terminal stops.
A leaf at depth max_depth - 1, or whose step repeats an earlier step of its path word for word, is prompted
with `<conclusion>` (the chain's rule: a greedy policy that repeats itself would otherwise fill the budget);
every other step is a plain expansion without a hint (these are evaluation strategies: no ground truth).

Scores: the aggregate over a path's steps of p = exp(value): "last", "min", "prod" or "mean" (search-and-learn's
`aggregate_scores`, with "mean" added). Answers: chain takes its last step's; best_of_n votes over the chains'
final nodes, beam over its completed beams (the active ones if none completed), dvts over every subtree's last
expansion; `answer` picks the vote ("best": highest score, "weighted": answer with the largest summed score,
"majority"; o1jax.search.answers).

Legend: B trees, n samples or beams, M = beam_width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from o1jax.search import answers as answers_lib
from o1jax.search import tree as tree_lib
from o1jax.search.expansion import Expansions, Plan, child_keys, tree_key
from o1jax.search.result import Problem, Result
from o1jax.search.step_model import StepModel

STRATEGIES = ("chain", "best_of_n", "beam", "dvts")
AGGREGATIONS = ("last", "min", "prod", "mean")


@dataclasses.dataclass(frozen=True)
class BeamConfig:
  """A step-level strategy.

  Attributes:
    strategy: one of STRATEGIES.
    n: samples (best_of_n) or beams (beam, dvts); chain uses 1.
    beam_width: M, children per kept beam (beam: n / M beams stay; dvts: n / M subtrees).
    max_depth: rounds; the last one prompts <conclusion>.
    aggregation: how a path's step values become its score (AGGREGATIONS).
    answer: "best", "weighted" or "majority" over the final candidates.
    max_step_tokens: token slots of a node's step.
    seed: with each problem's id, the source of all randomness.
  """

  strategy: str = "beam"
  n: int = 16
  beam_width: int = 4
  max_depth: int = 8
  aggregation: str = "last"
  answer: str = "best"
  max_step_tokens: int = 64
  seed: int = 0

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f"strategy={self.strategy!r}; expected one of {STRATEGIES}.")
    for name in ("n", "beam_width", "max_depth", "max_step_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
    if self.strategy in ("beam", "dvts") and self.n % self.beam_width:
      raise ValueError(f"n={self.n} is not a multiple of beam_width={self.beam_width} ({self.strategy} keeps "
                       "n / beam_width beams).")
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"aggregation={self.aggregation!r}; expected one of {AGGREGATIONS}.")
    if self.answer not in answers_lib.VOTES:
      raise ValueError(f"answer={self.answer!r}; expected one of {answers_lib.VOTES}.")

  @property
  def width(self) -> int:
    """Samples per round of one tree (and children slots per node)."""
    return 1 if self.strategy == "chain" else self.n

  @property
  def num_nodes(self) -> int:
    return 1 + self.width * self.max_depth


def aggregate(values: Sequence[float], how: str) -> float:
  """A path's score from its steps' values (log p): the last / min / product / mean of p."""
  p = [math.exp(v) for v in values]
  if not p:
    return 0.0
  return {"last": p[-1], "min": min(p), "prod": math.prod(p), "mean": sum(p) / len(p)}[how]


@jax.jit
def _add_all(trees: tree_lib.Tree, new: dict) -> tree_lib.Tree:
  return jax.vmap(lambda t, n: tree_lib.add_nodes(t, **n))(trees, new)


class _State:
  """One tree's active leaves (with their dvts subtree), candidates and rounds."""

  def __init__(self):
    self.active: list[tuple[int, int]] = [(tree_lib.ROOT, -1)]
    self.completed: list[int] = []        # beam: terminal beams; best_of_n / chain: finished chains
    self.groups: dict[int, list[int]] = {}  # dvts: subtree -> its last expansion's children
    self.rounds = 0


def search(model: StepModel, problems: Sequence[Problem], config: BeamConfig, *, progress: bool = True
           ) -> list[Result]:
  """Runs config.strategy on all problems at once (see the module docstring); one Result per problem."""
  if not problems:
    raise ValueError("search needs at least one problem.")
  problems = [dataclasses.replace(p, ground_truth=None) for p in problems]  # evaluation strategies: no answers
  expansions = Expansions(model, problems, max_depth=config.max_depth, step_slots=config.max_step_tokens)
  B, n, M = len(problems), config.width, config.beam_width
  trees = jax.tree.map(jnp.asarray, tree_lib.empty(B, config.num_nodes, n, config.max_step_tokens))
  keys = [tree_key(config.seed, p.id) for p in problems]
  states = [_State() for _ in problems]
  bar = tqdm.tqdm(total=config.max_depth, desc=f"{config.strategy} rounds", unit="round", disable=not progress)
  for depth in range(config.max_depth):
    host = trees.host()
    plans, groups_of_plan = [], []
    for b, state in enumerate(states):
      if not state.active:
        continue
      counts = _children_counts(config, depth, len(state.active))
      round_keys = child_keys(jax.random.fold_in(keys[b], depth), sum(counts))
      start = 0
      for (node, group), count in zip(state.active, counts):
        if count == 0:
          continue
        conclude = depth == config.max_depth - 1 or _repeats(host, b, node, expansions.texts[b])
        meta = tree_lib.CONCLUSION if conclude else 0
        plans.append(Plan(tree=b, node=node, metas=(meta,) * count, keys=round_keys[start:start + count]))
        groups_of_plan.append(group)
        start += count
      state.rounds += 1
    if not plans:
      break
    requests = expansions.requests(host, plans)
    steps, values = expansions.run(requests)
    new = expansions.new_nodes(host, requests, steps, values, width=n)
    trees = _add_all(trees, new)
    host = trees.host()
    children: dict[int, list[tuple[int, int]]] = {}
    for request, group in zip(requests, groups_of_plan):
      for position, child in enumerate(request.child_ids):
        if config.strategy == "dvts" and depth == 0:
          group = position // M
        children.setdefault(request.tree, []).append((child, group))
    for b, new_children in children.items():
      _choose(config, states[b], host, b, new_children)
    bar.update(1)
    bar.set_postfix(trees_running=sum(bool(s.active) for s in states))
  bar.close()
  host = trees.host()
  results = []
  for b, (problem, state) in enumerate(zip(problems, states)):
    node_answers = expansions.answers[b]
    candidates = _candidates(config, state, host, b)
    scores = [_score(host, b, c, config.aggregation) for c in candidates]
    rule = "best" if config.strategy == "chain" else config.answer
    chosen = answers_lib.vote([node_answers[c] for c in candidates], scores, rule)
    answer_node = -1 if chosen is None else candidates[chosen]
    results.append(Result(problem=problem, strategy=config.strategy, tree=host.select([b]), texts=expansions.texts[b],
                          answers=node_answers, answer=node_answers[answer_node] if answer_node >= 0 else None,
                          answer_node=answer_node, usage=expansions.usage[b], rounds=state.rounds))
  return results


def _children_counts(config: BeamConfig, depth: int, active: int) -> list[int]:
  """Children of each active leaf this round."""
  if config.strategy == "chain":
    return [1] * active
  if depth == 0:
    return [config.n]
  if config.strategy == "best_of_n":
    return [1] * active
  if config.strategy == "dvts":
    return [config.beam_width] * active
  # beam: the active beams repeated up to n candidates, in order.
  return [config.n // active + (1 if i < config.n % active else 0) for i in range(active)]


def _path(tree: tree_lib.Tree, b: int, node: int) -> list[int]:
  path = []
  while node != tree_lib.ROOT:
    path.append(node)
    node = int(tree.parent[b, node])
  return path[::-1]


def _score(tree: tree_lib.Tree, b: int, node: int, how: str) -> float:
  return aggregate([float(tree.rating[b, i]) for i in _path(tree, b, node)], how)


def _repeats(tree: tree_lib.Tree, b: int, node: int, texts: Sequence[str]) -> bool:
  """Whether node's step repeats an earlier step of its path word for word (ignoring surrounding space)."""
  path = _path(tree, b, node)
  steps = [texts[i].strip() for i in path]
  return len(steps) >= 2 and steps[-1] in steps[:-1]


def _choose(config: BeamConfig, state: _State, tree: tree_lib.Tree, b: int,
            children: list[tuple[int, int]]) -> None:
  """Which of a tree's new nodes stay active (see the module docstring)."""
  terminal = lambda c: bool(tree.terminal[b, c])  # noqa: E731
  score = lambda c: _score(tree, b, c, config.aggregation)  # noqa: E731
  if config.strategy in ("chain", "best_of_n"):
    state.active = [(c, g) for c, g in children if not terminal(c)]
    state.completed += [c for c, _ in children if terminal(c)]
  elif config.strategy == "beam":
    state.completed += [c for c, _ in children if terminal(c)]
    open_ = sorted((c for c, _ in children if not terminal(c)), key=lambda c: (-score(c), c))
    state.active = [(c, -1) for c in open_[:config.n // config.beam_width]]
  else:  # dvts
    by_group: dict[int, list[int]] = {}
    for c, g in children:
      by_group.setdefault(g, []).append(c)
    state.active = []
    for g, members in by_group.items():
      state.groups[g] = members
      best = max(members, key=lambda c: (score(c), -c))
      if not terminal(best):
        state.active.append((best, g))


def _candidates(config: BeamConfig, state: _State, tree: tree_lib.Tree, b: int) -> list[int]:
  """The nodes the final answer is chosen from."""
  if config.strategy == "dvts":
    return sorted(c for members in state.groups.values() for c in members)
  if config.strategy == "beam":
    return sorted(state.completed) or sorted(c for c, _ in state.active)
  return sorted(state.completed + [c for c, _ in state.active])
