"""What every search strategy takes (problems) and gives back (one tree per problem, its answer and its cost)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from o1jax.search import tree as tree_lib


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem to search.

  Attributes:
    id: unique in a run; the tree's randomness derives from it (and the seed), never from its batch position.
    question: the root's text.
    ground_truth: the final answer, given only in self-play (the outcome check, patience and the ground-truth
      hint use it); evaluation leaves it None, so the search never sees the answer.
  """

  id: str
  question: str
  ground_truth: str | None = None


@dataclasses.dataclass
class Usage:
  """Model work spent on one problem, in tokens.

  Attributes:
    generated: tokens sampled (each step's tokens and the token that stopped it).
    prompted: tokens encoded to prompt the steps (paths, headers, hints).
    scored: tokens encoded to rate the new nodes.
  """

  generated: int = 0
  prompted: int = 0
  scored: int = 0

  def add(self, step) -> None:
    self.generated += step.generated
    self.prompted += step.prompt_tokens
    self.scored += step.rating_tokens

  def as_dict(self) -> dict[str, int]:
    return {"tokens_generated": self.generated, "tokens_prompted": self.prompted, "tokens_scored": self.scored}


@dataclasses.dataclass
class Result:
  """One problem's search.

  Attributes:
    problem: the Problem.
    strategy: "mcts", "beam", "dvts", "best_of_n", "weighted_best_of_n", "majority" or "chain".
    tree: the problem's tree as a 1-tree `tree.Tree` of numpy arrays.
    texts: [num_nodes] each node's text (texts[0] the question).
    answers: [num_nodes] each node's final answer (`answers.node_answer`), None where it states none.
    answer: the chosen final answer (None when the search found none).
    answer_node: the node it comes from (-1 when none).
    usage: the model work spent on the problem.
    rounds: simulations (MCTS) or expansion rounds (the others) the tree took part in.
  """

  problem: Problem
  strategy: str
  tree: tree_lib.Tree
  texts: list[str]
  answers: list[str | None]
  answer: str | None
  answer_node: int
  usage: Usage
  rounds: int

  @property
  def num_nodes(self) -> int:
    """Nodes besides the root."""
    return int(np.asarray(self.tree.num_nodes)[0]) - 1

  def answer_path(self) -> list[int]:
    """Node ids from the root to the answer node ([] when there is no answer)."""
    if self.answer_node < 0:
      return []
    path, node = [], self.answer_node
    while node != tree_lib.NO_PARENT:
      path.append(node)
      node = int(self.tree.parent[0, node])
    return path[::-1]

  def to_text(self) -> str:
    """The tree in the LLaMA-O1 text format (one node per line, ratings from the model's values)."""
    return tree_lib.to_text(self.tree, 0, self.texts)

  def to_json(self) -> dict[str, Any]:
    """Every node's fields and the result's own (problem, strategy, answer, usage), JSON-ready."""
    record = tree_lib.to_json(
        self.tree, 0, self.texts, problem=self.problem.id, question=self.problem.question, strategy=self.strategy,
        answer=self.answer, answer_node=self.answer_node, answer_path=self.answer_path(), rounds=self.rounds,
        **self.usage.as_dict())
    for node, answer in zip(record["nodes"], self.answers):
      node["answer"] = answer
    return record
