"""A plain-Python, one-tree-at-a-time, recursive MCTS: LLaMA-O1's algorithm as ../shared/DESIGN.md section 3 states
it, with o1jax's terminals. The vectorized search must build the same trees (tests/o1jax/search/test_mcts.py);
bench/search.py drives it with a transformers-backed step model.

It shares nothing with o1jax.search.mcts but the StepModel protocol (requests in, steps and values out) and the
final-answer reading of a step; its randomness (the selection factors and the meta-action uniforms) is fed in
by the caller, so that a test can give both implementations the same draws.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from o1jax import grading, thoughts
from o1jax.search import answers
from o1jax.search.step_model import PathNode, Request

CONCLUSION = thoughts.META_ACTIONS.index("<conclusion>")


class Node:
  def __init__(self, index, parent, depth, meta, rating=0.0, log_prob=0.0, varentropy=0.0, tokens=(), text="",
               terminal=False, outcome=None, answer=None):
    self.index, self.parent, self.depth, self.meta = index, parent, depth, meta
    self.rating = self.value = rating
    self.log_prob, self.varentropy = log_prob, varentropy
    self.tokens, self.text = np.asarray(tokens, np.int32), text
    self.terminal, self.outcome, self.answer = terminal, outcome, answer
    self.children: list[Node] = []
    self.visits = 0
    self.rectified, self.rectify_visits = 0.0, 0


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max())
  return e / e.sum()


class ReferenceMCTS:
  """One tree. factors(simulation, depth) -> per-child factors; uniforms(simulation) -> k floats in [0, 1)."""

  def __init__(self, model, problem_id: str, question: str, *, ground_truth: str | None, num_simulations: int,
               children_per_expansion: int = 2, max_children: int = 5, exploration: float = 1.414,
               varentropy_weight: float = 0.1, discount: float = 0.9, eps: float = 1e-6, patience: int = 2,
               max_depth: int = 8, factors: Callable[[int, int], Sequence[float]] | None = None,
               uniforms: Callable[[int], Sequence[float]] | None = None, hint: Callable[[int], str] | None = None):
    self.model, self.problem_id, self.question, self.ground_truth = model, problem_id, question, ground_truth
    self.num_simulations, self.k, self.max_children = num_simulations, children_per_expansion, max_children
    self.c, self.lam, self.gamma, self.eps = exploration, varentropy_weight, discount, eps
    self.patience, self.max_depth = patience, max_depth
    self.factors = factors or (lambda simulation, depth: [1.0] * 64)
    self.uniforms = uniforms or (lambda simulation: np.random.default_rng(simulation).random(self.k))
    self.hint = hint or (lambda meta: thoughts.hint(thoughts.meta_prefix(meta)))
    self.nodes = [Node(0, None, 0, thoughts.META_ACTIONS.index("<problem>"))]
    self.simulations_run = 0

  def search(self) -> list[Node]:
    root = self.nodes[0]
    for simulation in range(self.num_simulations):
      self.simulation = simulation
      self.simulate(root)
      self.simulations_run += 1
      if self.patience <= 0:
        break
    self.rectify()
    return self.nodes

  def best(self, node: Node) -> Node:
    total = sum(child.visits for child in node.children)
    prior = _softmax([math.exp(child.log_prob) for child in node.children])
    var = _softmax([child.varentropy for child in node.children])
    factors = self.factors(self.simulation, node.depth)
    scores = [(child.value + self.c * prior[i] * math.sqrt(total) / (1 + child.visits) + self.lam * var[i])
              * factors[i] for i, child in enumerate(node.children)]
    return node.children[int(np.argmax(scores))]

  def simulate(self, node: Node) -> float:
    if node.terminal:
      value = node.value
    elif len(node.children) < self.max_children:
      self.expand(node)
      value = self.gamma * self.best(node).value
    else:
      value = self.gamma * self.simulate(self.best(node))
    node.visits += 1
    node.value += (value - node.value) / node.visits
    return node.value

  def metas(self, node: Node) -> list[int]:
    size = len(thoughts.META_ACTIONS)
    matrix = np.zeros((size, size))
    for child in self.nodes[1:]:
      matrix[self.nodes[child.parent].meta, child.meta] += math.exp(child.value)
    cdf = np.cumsum(_softmax(matrix[node.meta]))
    cdf /= cdf[-1]
    return [min(int(np.searchsorted(cdf, u, side="right")), size - 1) for u in self.uniforms(self.simulation)]

  def path(self, node: Node) -> list[Node]:
    out = []
    while node.parent is not None:
      out.append(node)
      node = self.nodes[node.parent]
    return out[::-1]

  def expand(self, node: Node) -> None:
    metas = self.metas(node)
    ids = tuple(range(len(self.nodes), len(self.nodes) + self.k))
    request = Request(tree=0, problem=self.problem_id, question=self.question,
                      path=tuple(PathNode(n.index, n.parent, n.meta, n.tokens, n.rating) for n in self.path(node)),
                      child_ids=ids, metas=tuple(metas), hints=tuple(self.hint(m) for m in metas))
    [steps] = self.model.expand([request])
    [values] = self.model.rate([request], [steps])
    for index, meta, step, value in zip(ids, metas, steps, values):
      depth = node.depth + 1
      conclusion = meta == CONCLUSION
      answer = answers.node_answer(step.text, conclusion)
      terminal = (conclusion or answers.stated_answer(step.text) is not None or depth >= self.max_depth
                  or not step.finished)
      outcome = None
      if self.ground_truth is not None:
        outcome = answer is not None and grading.is_equivalent(answer, self.ground_truth)
        if outcome:
          self.patience -= 1
      child = Node(index, node.index, depth, meta, rating=min(float(value), 0.0), log_prob=step.log_prob,
                   varentropy=step.varentropy, tokens=step.tokens, text=step.text, terminal=terminal,
                   outcome=outcome, answer=answer)
      self.nodes.append(child)
      node.children.append(child)

  def rectify(self) -> None:
    for leaf in self.nodes[1:]:
      if leaf.children:
        continue
      if leaf.outcome is None:
        reward = leaf.value
      else:
        reward = 0.0 if leaf.outcome else math.log(self.eps)
      node = leaf
      while node is not None:
        node.rectify_visits += 1
        if node.rectify_visits == 1:
          node.rectified = reward
        else:
          node.rectified += (reward - node.rectified) / node.rectify_visits
        reward = self.gamma * node.rectified
        node = self.nodes[node.parent] if node.parent is not None else None
