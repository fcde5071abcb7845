"""The host side of a search round, shared by every strategy: requests from tree nodes, new nodes from steps.

A strategy decides which nodes of which trees to expand and with which meta actions; `Expansions` turns that into
`step_model.Request`s (the path's nodes read from the tree's token buffers, the hints from the config), runs the
model, and turns the steps and values into the [B, K] arrays `tree.add_nodes` writes. On the way it applies the
rules every strategy shares:
  - a new node is terminal when it is a <conclusion>, states a final answer, reaches the depth limit, or did not
    end with <end_of_thought> (its step was cut);
  - with a ground truth (self-play), its answer is checked against it (outcome CORRECT / WRONG);
  - its text, answer and cost are kept per tree (the tree holds only arrays).

Legend: B trees, K new nodes of one tree in one round, L step-token slots.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import zlib
from typing import Sequence

import jax
import numpy as np

from o1jax import grading, thoughts
from o1jax.search import answers as answers_lib
from o1jax.search import tree as tree_lib
from o1jax.search.result import Problem, Usage
from o1jax.search.step_model import PathNode, Request, Step, StepModel


def tree_key(seed: int, problem_id: str) -> jax.Array:
  """The key a problem's tree draws all its randomness from: the seed and the problem id, nothing else."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(problem_id.encode()))


def child_keys(key: jax.Array, count: int) -> np.ndarray:
  """[count, 2] uint32 per-child key data from one round key (child j's key does not depend on count)."""
  keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(np.arange(count, dtype=np.uint32))
  return np.asarray(jax.random.key_data(keys))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Expand node `node` of tree `tree` into children with these meta actions (and per-child key data)."""

  tree: int
  node: int
  metas: tuple[int, ...]
  keys: np.ndarray | None = None


class Expansions:
  """Requests, steps and per-tree host state (texts, answers, usage) for one batch of problems."""

  def __init__(self, model: StepModel, problems: Sequence[Problem], *, max_depth: int, step_slots: int,
               ground_truth_hint: bool = False, llama_o1_compat: bool = False):
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
      duplicate = next(i for i in ids if ids.count(i) > 1)
      raise ValueError(f"problem id {duplicate!r} appears more than once; ids must be unique in a search.")
    if ground_truth_hint and any(p.ground_truth is None for p in problems):
      missing = next(p.id for p in problems if p.ground_truth is None)
      raise ValueError(f"ground_truth_hint is on but problem {missing!r} has no ground truth.")
    self.model = model
    self.problems = list(problems)
    self.max_depth = max_depth
    self.step_slots = step_slots
    self.ground_truth_hint = ground_truth_hint
    self.llama_o1_compat = llama_o1_compat
    self.texts = [[p.question] for p in problems]
    self.answers: list[list[str | None]] = [[None] for _ in problems]
    self.usage = [Usage() for _ in problems]

  def hint(self, b: int, meta: int) -> str:
    truth = self.problems[b].ground_truth if self.ground_truth_hint else None
    return thoughts.hint(thoughts.meta_prefix(meta), truth, llama_o1_compat=self.llama_o1_compat)

  def requests(self, tree: tree_lib.Tree, plans: Sequence[Plan]) -> list[Request]:
    """One request per plan; `tree` is the host copy (numpy) of the batch. Child ids follow the plans' order."""
    next_id = np.array(tree.num_nodes)
    out = []
    for plan in plans:
      b = plan.tree
      path, node = [], plan.node
      while node != tree_lib.ROOT:
        path.append(PathNode(index=node, parent=int(tree.parent[b, node]), meta=int(tree.meta[b, node]),
                             tokens=tree.tokens[b, node, :tree.length[b, node]], rating=float(tree.rating[b, node])))
        node = int(tree.parent[b, node])
      k = len(plan.metas)
      out.append(Request(tree=b, problem=self.problems[b].id, question=self.problems[b].question,
                         path=tuple(path[::-1]), child_ids=tuple(range(int(next_id[b]), int(next_id[b]) + k)),
                         metas=tuple(int(m) for m in plan.metas), hints=tuple(self.hint(b, m) for m in plan.metas),
                         keys=plan.keys))
      next_id[b] += k
    return out

  def run(self, requests: Sequence[Request]) -> tuple[list[list[Step]], list[list[float]]]:
    """The model's steps and values for the requests, checked."""
    steps = self.model.expand(requests)
    values = self.model.rate(requests, steps)
    if len(steps) != len(requests) or len(values) != len(requests):
      raise ValueError(f"the step model answered {len(steps)} step lists and {len(values)} value lists for "
                       f"{len(requests)} requests.")
    for request, request_steps, request_values in zip(requests, steps, values):
      k = len(request.child_ids)
      if len(request_steps) != k or len(request_values) != k:
        raise ValueError(f"request for node {request.node} of problem {request.problem!r} asked for {k} children; "
                         f"the step model gave {len(request_steps)} steps and {len(request_values)} values.")
      for step, value in zip(request_steps, request_values):
        if len(step.tokens) + int(step.finished) > self.step_slots:
          raise ValueError(f"a step of {len(step.tokens)} tokens (and its end) does not fit the tree's "
                           f"{self.step_slots} step slots; raise the config's max_step_tokens.")
        if not value <= 1e-6:
          raise ValueError(f"the step model rated a node {value}; values are log p(positive) <= 0.")
    return steps, values

  def new_nodes(self, tree: tree_lib.Tree, requests: Sequence[Request], steps: Sequence[Sequence[Step]],
                values: Sequence[Sequence[float]], width: int) -> dict[str, np.ndarray]:
    """The `tree.add_nodes` arguments for every tree ([B, width] rows, `count` [B]), and the host state updated.

    Args:
      tree: the host copy of the batch before the new nodes.
      width: K, at least the number of new nodes of any one tree.
    """
    B, L = tree.batch_size, self.step_slots
    out = dict(parents=np.zeros((B, width), np.int32), count=np.zeros((B,), np.int32),
               tokens=np.zeros((B, width, L), np.int32), log_probs=np.zeros((B, width, L), np.float32),
               length=np.zeros((B, width), np.int32),
               **{name: np.zeros((B, width), dtype) for name, dtype in tree_lib.NODE_FIELDS.items()})
    out["outcome"][:] = tree_lib.UNKNOWN
    to_grade = []  # (b, row, answer, truth)
    for request, request_steps, request_values in zip(requests, steps, values):
      b = request.tree
      depth = int(tree.depth[b, request.node]) + 1
      for meta, step, value in zip(request.metas, request_steps, request_values):
        row = int(out["count"][b])
        if row >= width:
          raise ValueError(f"tree {b} got more than {width} new nodes in one round.")
        conclusion = meta == tree_lib.CONCLUSION
        answer = answers_lib.node_answer(step.text, conclusion)
        stated = answers_lib.stated_answer(step.text) is not None
        out["parents"][b, row] = request.node
        out["tokens"][b, row, :len(step.tokens)] = step.tokens
        if step.token_log_probs is not None:
          behaviour = np.asarray(step.token_log_probs, np.float32)[:L]
          out["log_probs"][b, row, :len(behaviour)] = behaviour
        out["length"][b, row] = len(step.tokens)
        out["meta"][b, row] = meta
        out["rating"][b, row] = min(float(value), 0.0)
        out["step_log_prob"][b, row] = step.log_prob
        out["entropy"][b, row] = step.entropy
        out["varentropy"][b, row] = step.varentropy
        out["finished"][b, row] = step.finished
        out["terminal"][b, row] = conclusion or stated or depth >= self.max_depth or not step.finished
        truth = self.problems[b].ground_truth
        if truth is not None:
          out["outcome"][b, row] = tree_lib.WRONG
          if answer is not None:
            to_grade.append((b, row, answer, truth))
        out["count"][b] += 1
        self.texts[b].append(step.text)
        self.answers[b].append(answer)
        self.usage[b].add(step)
    for (b, row, _, _), correct in zip(to_grade, equivalent_all([(a, t) for _, _, a, t in to_grade])):
      out["outcome"][b, row] = tree_lib.CORRECT if correct else tree_lib.WRONG
    return out


def equivalent_all(pairs: Sequence[tuple[str, str]], max_workers: int = 4) -> list[bool]:
  """`grading.is_equivalent` for each (answer, ground truth) pair, several at once."""
  if not pairs:
    return []
  with concurrent.futures.ThreadPoolExecutor(min(max_workers, len(pairs)), "o1jax-outcome") as pool:
    return list(pool.map(lambda pair: grading.is_equivalent(*pair), pairs))
