"""Search trees -> rows of experience for the learner: one row per non-root node, fixed shapes for the replay.

Legend: T sequence slots (`seq_len`), R rows.

A row holds one node as the learner sees it:
  tokens      [T] int32  the node's policy prompt exactly as it was sampled (root-to-parent path, hint, header, meta;
                         o1jax.prompt_tokens), then its step, `<end_of_thought>`, `<start_of_rating>`
  valid       [T] bool   the real tokens
  loss_mask   [T] bool   position t predicts a token the policy wrote for the step (its tokens, and its
                         `<end_of_thought>` when it finished)
  behaviour   [T] f32    at those positions, the token's log-prob under the model that sampled it (recorded in the
                         tree when the step was drawn: PPO's old policy)
  rating_at   []  int32  the position whose next-token logits rate the node (`<start_of_rating>`): in the
                         "policy" rating context the search rated the node on this very sequence
  advantage   []  f32    GAE along the root path (LLaMA-O1's `compute_gae_from_node`) or group-relative (GRPO:
                         the node's reward standardised over its siblings)
  value_target [] f32    the node's rectified value (its `value` where no leaf reached it), log space
  sft         []  bool   the node lies on one of the tree's best traces (the supervised mode's targets)
With `rating_context="value"` the rating is read from LLaMA-O1's value prompt instead (`rating_tokens`,
`rating_valid`, `rating_position`: the path and the node's line without a hint), and with `pairs` each row of a
highest-valued sibling also carries its lowest-valued sibling's rating sequence (`pair_*`, `has_pair`) for
rStar-Math's pairwise loss.

LLaMA-O1's GAE, as its code computes it: the list from the node up to the root's child, and for each consecutive
(node, parent) pair delta = reward(parent) + gamma * value(parent) - value(node), summed with weights
(gamma * lambda)^i; a child of the root has no pair and advantage 0. reward(n) is the rectified value where it is
set, else the value (LLaMA-O1's true_value_from_tree, else value).

Best traces (rStar-Math's SFT data): among the root-to-leaf paths that end in a CORRECT leaf, the `sft_paths`
with the highest mean value along the path.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from o1jax import thoughts
from o1jax.prompt_tokens import PromptTokens
from o1jax.search import tree as tree_lib
from o1jax.search.result import Result

ADVANTAGES = ("gae", "group")


@dataclasses.dataclass(frozen=True)
class ExperienceConfig:
  """How nodes become rows.

  Attributes:
    seq_len: T; a node whose sequence is longer is left out (and counted).
    advantage: "gae" (LLaMA-O1's, the default) or "group" (GRPO-style over siblings).
    gamma, lam: GAE's discount and lambda (LLaMA-O1's 0.99 and 0.95).
    sft_paths: best traces per tree marked for the supervised mode.
    rating_context: "policy" (rate on the policy sequence, as the search does by default) or "value".
    pairs: attach the lowest-valued sibling to each highest-valued sibling (for the pairwise rating loss).
  """

  seq_len: int = 1024
  advantage: str = "gae"
  gamma: float = 0.99
  lam: float = 0.95
  sft_paths: int = 2
  rating_context: str = "policy"
  pairs: bool = False

  def __post_init__(self):
    if self.advantage not in ADVANTAGES:
      raise ValueError(f"advantage={self.advantage!r}; expected one of {ADVANTAGES}.")
    if self.rating_context not in ("policy", "value"):
      raise ValueError(f"rating_context={self.rating_context!r}; expected 'policy' or 'value'.")
    if self.seq_len < 8 or self.sft_paths < 0:
      raise ValueError(f"seq_len={self.seq_len} must be >= 8 and sft_paths={self.sft_paths} >= 0.")
    if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
      raise ValueError(f"gamma={self.gamma} and lam={self.lam} must be in [0, 1].")


def spec(config: ExperienceConfig) -> dict[str, tuple[tuple[int, ...], type]]:
  """The replay buffer's fields ({name: (per-row shape, dtype)}) for rows of this config."""
  T = config.seq_len
  fields = {"tokens": ((T,), np.int32), "valid": ((T,), bool), "loss_mask": ((T,), bool),
            "behaviour": ((T,), np.float32), "rating_at": ((), np.int32), "advantage": ((), np.float32),
            "value_target": ((), np.float32), "sft": ((), bool)}
  if config.rating_context == "value":
    fields.update(rating_tokens=((T,), np.int32), rating_valid=((T,), bool), rating_position=((), np.int32))
  if config.pairs:
    fields.update(pair_tokens=((T,), np.int32), pair_valid=((T,), bool), pair_at=((), np.int32),
                  has_pair=((), bool))
  return fields


def rewards(tree: tree_lib.Tree) -> np.ndarray:
  """[N] each node's reward: rectified where a leaf reached it, else its running value (tree of 1)."""
  return np.where(tree.rectify_visits[0] > 0, tree.rectified[0], tree.value[0]).astype(np.float64)


def gae_advantage(tree: tree_lib.Tree, node: int, gamma: float, lam: float) -> float:
  """LLaMA-O1's advantage of `node` (see the module docstring)."""
  reward, value = rewards(tree), tree.value[0].astype(np.float64)
  path = []
  n = node
  while n != tree_lib.ROOT:
    path.append(n)
    n = int(tree.parent[0, n])
  gae, factor = 0.0, 1.0
  for current, parent in zip(path, path[1:]):
    gae += factor * (reward[parent] + gamma * value[parent] - value[current])
    factor *= gamma * lam
  return gae


def group_advantage(tree: tree_lib.Tree, node: int) -> float:
  """The node's reward standardised over its siblings (0 for an only child)."""
  reward = rewards(tree)
  parent = int(tree.parent[0, node])
  siblings = tree.children[0, parent, :tree.num_children[0, parent]]
  if len(siblings) < 2:
    return 0.0
  r = reward[siblings]
  return float((reward[node] - r.mean()) / (r.std() + 1e-6))


def best_traces(tree: tree_lib.Tree, count: int) -> list[list[int]]:
  """The `count` root-to-leaf paths ending in a CORRECT leaf with the highest mean value (ids, root first)."""
  n = int(tree.num_nodes[0])
  value = tree.value[0]
  paths = []
  for leaf in range(1, n):
    if tree.num_children[0, leaf] or tree.outcome[0, leaf] != tree_lib.CORRECT:
      continue
    path, node = [], leaf
    while node != tree_lib.NO_PARENT:
      path.append(node)
      node = int(tree.parent[0, node])
    path = path[::-1]
    paths.append((float(np.mean(value[path[1:]])), -leaf, path))
  return [p for _, _, p in sorted(paths, reverse=True)[:count]]


@dataclasses.dataclass
class Rows:
  """Rows of experience (`spec` fields, each [R, ...]) with their initial priorities and what was left out."""

  fields: dict[str, np.ndarray]
  priorities: np.ndarray
  skipped_long: int = 0

  def __len__(self) -> int:
    return len(self.priorities)


def _put(sequence: Sequence[int], length: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.zeros(length, np.int32)
  valid = np.zeros(length, bool)
  tokens[:len(sequence)] = sequence
  valid[:len(sequence)] = True
  return tokens, valid


def rows_from_results(results: Sequence[Result], prompts: PromptTokens, config: ExperienceConfig,
                      hint: Callable[[Result, int], str]) -> Rows:
  """Every non-root node of every result as a row (see the module docstring).

  Args:
    prompts: the token pieces of the model's tokenizer.
    hint: (result, meta) -> the hint block the node was sampled with (the search's own choice: meta hints, and
      the ground-truth hint where self-play turned it on).
  """
  T = config.seq_len
  out: dict[str, list] = {name: [] for name in spec(config)}
  skipped = 0
  eot, sor = prompts.end_of_thought, prompts.start_of_rating
  for result in results:
    t = result.tree
    n = int(t.num_nodes[0])
    question = prompts.tokenizer.encode(result.problem.question)
    on_trace = {node for path in best_traces(t, config.sft_paths) for node in path[1:]}
    lines: dict[int, list[int]] = {}

    def path_ids(node: int) -> list[int]:
      chain = []
      while node != tree_lib.ROOT:
        chain.append(node)
        node = int(t.parent[0, node])
      return chain[::-1]

    def line(i: int) -> list[int]:
      if i not in lines:
        lines[i] = prompts.line(int(t.parent[0, i]), i, int(t.meta[0, i]), t.tokens[0, i, :t.length[0, i]],
                                float(t.rating[0, i]))
      return lines[i]

    def path_tokens(node: int) -> list[int]:   # root .. node's parent
      return prompts.path(prompts.root(question), [line(i) for i in path_ids(node)[:-1]])

    def rating_sequence(node: int, path: list[int]) -> list[int]:
      parent, meta, step = int(t.parent[0, node]), int(t.meta[0, node]), list(t.tokens[0, node, :t.length[0, node]])
      if config.rating_context == "value":
        return path + prompts.rating_suffix(parent, node, meta, step)
      return path + prompts.policy_suffix(parent, node, meta, hint(result, meta)) + step + [eot, sor]

    values = t.value[0]
    low_sibling = {}
    if config.pairs:
      for parent in range(n):
        kids = list(t.children[0, parent, :t.num_children[0, parent]])
        if len(kids) >= 2:
          high = max(kids, key=lambda c: (values[c], -c))
          low = min(kids, key=lambda c: (values[c], c))
          if values[high] > values[low]:
            low_sibling[int(high)] = int(low)
    for node in range(1, n):
      parent, meta = int(t.parent[0, node]), int(t.meta[0, node])
      step = list(t.tokens[0, node, :t.length[0, node]])
      finished = bool(t.finished[0, node])
      path = path_tokens(node)
      policy = path + prompts.policy_suffix(parent, node, meta, hint(result, meta))
      sequence = policy + step + [eot, sor]
      rating = rating_sequence(node, path) if config.rating_context == "value" else sequence
      pair = rating_sequence(low_sibling[node], path) if node in low_sibling else None
      if max(len(sequence), len(rating), len(pair or ())) > T:
        skipped += 1
        continue
      tokens, valid = _put(sequence, T)
      targets = len(step) + int(finished)
      loss_mask = np.zeros(T, bool)
      loss_mask[len(policy) - 1:len(policy) - 1 + targets] = True
      behaviour = np.zeros(T, np.float32)
      behaviour[len(policy) - 1:len(policy) - 1 + targets] = t.log_probs[0, node, :targets]
      advantage = (gae_advantage(t, node, config.gamma, config.lam) if config.advantage == "gae"
                   else group_advantage(t, node))
      reward = rewards(t)[node]
      row = dict(tokens=tokens, valid=valid, loss_mask=loss_mask, behaviour=behaviour,
                 rating_at=np.int32(len(sequence) - 1), advantage=np.float32(advantage),
                 value_target=np.float32(reward), sft=node in on_trace)
      if config.rating_context == "value":
        row["rating_tokens"], row["rating_valid"] = _put(rating, T)
        row["rating_position"] = np.int32(len(rating) - 1)
      if config.pairs:
        row["pair_tokens"], row["pair_valid"] = _put(pair or [], T)
        row["pair_at"] = np.int32(max(len(pair or ()) - 1, 0))
        row["has_pair"] = pair is not None
      for name, value in row.items():
        out[name].append(value)
  fields = {name: np.asarray(values, dtype=spec(config)[name][1]).reshape((-1,) + spec(config)[name][0])
            for name, values in out.items()}
  return Rows(fields=fields, priorities=np.abs(fields["advantage"]).astype(np.float64), skipped_long=skipped)


def search_hint(ground_truth_hint: bool, llama_o1_compat: bool) -> Callable[[Result, int], str]:
  """The hint the search gave a child of meta `meta` (o1jax.search.expansion.Expansions.hint's rule)."""
  def hint(result: Result, meta: int) -> str:
    truth = result.problem.ground_truth if ground_truth_hint else None
    return thoughts.hint(thoughts.meta_prefix(meta), truth, llama_o1_compat=llama_o1_compat)
  return hint
