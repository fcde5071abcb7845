"""B search trees as arrays: a frozen dataclass (a pytree) with a static node budget N per tree.

Legend: B trees, N node slots per tree, C children slots per node, L step-token slots per node, K nodes added to
one tree at once, D the deepest depth.

Layout in the style of mctx: node 0 of every tree is the root (the problem); nodes are appended in creation
order, so a parent's id is always smaller than its children's and the ids are the LLaMA-O1 local ids written in
the text format. Slots >= num_nodes are unused and hold the UNUSED / zero fill. Every field is per tree and per
node; functions here are written for one tree (no leading B) and `jax.vmap`ped by the search.

Values are in log space, as LLaMA-O1 keeps them: a node's `rating` is log p(<positive_rating>) read when it was
created (<= 0; the root has none and holds 0), `value` is the search's running estimate that starts at the
rating and is updated by every backup through the node, and `rectified` is the value recomputed from the
leaves after the search (log 1 for a correct leaf, log eps for a wrong one; see mcts.rectify).

A node's step is kept as the token ids the sampler drew (`tokens[:length]`, the stopping `<end_of_thought>`
excluded), so that prompts are assembled from ids (o1jax/prompt_tokens.py) and never by re-tokenizing text.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from o1jax import parallel, thoughts

ROOT = 0        # the root's node id in every tree
NO_PARENT = -1  # the root's parent
UNUSED = -1     # an empty children slot (and the parent / meta of an unused node)

# `outcome` of a node: the rule-based check of its final answer against the ground truth (self-play only).
UNKNOWN, WRONG, CORRECT = -1, 0, 1
OUTCOME_NAMES = {UNKNOWN: "unknown", WRONG: "wrong", CORRECT: "correct"}

ROOT_META = thoughts.meta_index("<problem>")
CONCLUSION = thoughts.meta_index("<conclusion>")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tree:
  """B trees of N node slots.

  Attributes:
    parent: [B, N] int32 parent id (NO_PARENT for the root, UNUSED for unused slots).
    depth: [B, N] int32 edges from the root (root 0).
    meta: [B, N] int32 index into thoughts.META_ACTIONS (the root is <problem>).
    visits: [B, N] int32 backups through the node.
    value: [B, N] float32 running value estimate (log space, <= 0).
    rating: [B, N] float32 the model's value of the node when it was created (log p(positive)).
    step_log_prob: [B, N] float32 mean log-prob of the step's tokens (LLaMA-O1's length-normalised log-prob).
    entropy: [B, N] float32 mean entropy of the model over the step's tokens.
    varentropy: [B, N] float32 mean varentropy over the step's tokens.
    num_children: [B, N] int32.
    children: [B, N, C] int32 child ids in creation order, UNUSED after the last.
    terminal: [B, N] bool never expanded: a <conclusion>, a stated final answer, the depth limit, or a step that
      did not end with <end_of_thought>.
    finished: [B, N] bool the step ended with <end_of_thought> (False: it ran out of tokens or stopped at another
      format token and was cut there).
    outcome: [B, N] int32 UNKNOWN / WRONG / CORRECT (only with a ground truth).
    tokens: [B, N, L] int32 the step's token ids, 0 after `length`.
    log_probs: [B, N, L] float32 the behaviour log-prob of each token the policy wrote for the step, under the
      model that sampled it (the step's tokens, then its <end_of_thought> when finished: length + finished
      entries; 0 after). PPO's old policy, recorded when the step was drawn.
    length: [B, N] int32.
    rectified: [B, N] float32 value from the leaves after the search (0 where rectify_visits is 0).
    rectify_visits: [B, N] int32 leaves whose rectification passed through the node.
    num_nodes: [B] int32 nodes in use (slots [0, num_nodes) of each tree).
  """

  parent: Any
  depth: Any
  meta: Any
  visits: Any
  value: Any
  rating: Any
  step_log_prob: Any
  entropy: Any
  varentropy: Any
  num_children: Any
  children: Any
  terminal: Any
  finished: Any
  outcome: Any
  tokens: Any
  log_probs: Any
  length: Any
  rectified: Any
  rectify_visits: Any
  num_nodes: Any

  @property
  def batch_size(self) -> int:
    return self.parent.shape[0]

  @property
  def num_slots(self) -> int:
    return self.parent.shape[1]

  @property
  def num_children_slots(self) -> int:
    return self.children.shape[2]

  @property
  def step_slots(self) -> int:
    return self.tokens.shape[2]

  def host(self) -> "Tree":
    """The same trees as numpy arrays (on every process of a multi-host job)."""
    return parallel.to_host(self)

  def select(self, rows: Sequence[int] | np.ndarray) -> "Tree":
    """Trees `rows` (numpy arrays)."""
    rows = np.asarray(rows)
    return jax.tree.map(lambda a: np.asarray(a)[rows], self)


# Per-node fields that `add_children` writes, with their dtypes.
NODE_FIELDS = {"meta": np.int32, "rating": np.float32, "step_log_prob": np.float32, "entropy": np.float32,
               "varentropy": np.float32, "terminal": bool, "finished": bool, "outcome": np.int32}


def empty(batch: int, num_nodes: int, num_children: int, step_tokens: int) -> Tree:
  """B trees holding only their root (meta <problem>, value 0, no visits)."""
  if min(batch, num_nodes, num_children, step_tokens) < 1:
    raise ValueError(f"tree sizes batch={batch}, num_nodes={num_nodes}, num_children={num_children}, "
                     f"step_tokens={step_tokens} must all be >= 1.")
  B, N = batch, num_nodes
  zeros = lambda dtype: np.zeros((B, N), dtype)
  meta = np.full((B, N), UNUSED, np.int32)
  meta[:, ROOT] = ROOT_META
  return Tree(parent=np.full((B, N), UNUSED, np.int32), depth=zeros(np.int32), meta=meta, visits=zeros(np.int32),
              value=zeros(np.float32), rating=zeros(np.float32), step_log_prob=zeros(np.float32),
              entropy=zeros(np.float32), varentropy=zeros(np.float32), num_children=zeros(np.int32),
              children=np.full((B, N, num_children), UNUSED, np.int32), terminal=zeros(bool), finished=zeros(bool),
              outcome=np.full((B, N), UNKNOWN, np.int32), tokens=np.zeros((B, N, step_tokens), np.int32),
              log_probs=np.zeros((B, N, step_tokens), np.float32),
              length=zeros(np.int32), rectified=zeros(np.float32), rectify_visits=zeros(np.int32),
              num_nodes=np.ones((B,), np.int32))


def add_nodes(tree: Tree, parents: jax.Array, count: jax.Array, tokens: jax.Array, log_probs: jax.Array,
              length: jax.Array, **fields: jax.Array) -> Tree:
  """Appends `count` (<= K) nodes to ONE tree (no leading B; vmap it).

  Args:
    parents: [K] int32 each new node's parent (an existing node, or an earlier new node of this call).
    count: [] int32 nodes to add (0 adds nothing); rows >= count of the other arguments are ignored.
    tokens: [K, L] int32 their steps; log_probs: [K, L] float32 their behaviour log-probs; length: [K] int32.
    fields: each NODE_FIELDS name as [K].

  The new ids are num_nodes, num_nodes + 1, ... in row order, each appended to its parent's children; a new
  node's value starts at its rating, with no visits.
  """
  K = tokens.shape[0]
  N, C = tree.parent.shape[0], tree.children.shape[1]
  first = tree.num_nodes
  t = dict(parent=tree.parent, depth=tree.depth, value=tree.value, tokens=tree.tokens, log_probs=tree.log_probs,
           length=tree.length,
           children=tree.children, num_children=tree.num_children,
           **{name: getattr(tree, name) for name in NODE_FIELDS})
  for j in range(K):
    ok = j < count
    node = jnp.where(ok, jnp.minimum(first + j, N - 1), N - 1)
    parent = jnp.clip(parents[j], 0, N - 1)

    def put(array, new, at=node, ok=ok):
      return array.at[at].set(jnp.where(ok, new, array[at]))
    t["parent"] = put(t["parent"], parent)
    t["depth"] = put(t["depth"], t["depth"][parent] + 1)
    t["value"] = put(t["value"], fields["rating"][j])
    t["tokens"] = put(t["tokens"], tokens[j])
    t["log_probs"] = put(t["log_probs"], log_probs[j])
    t["length"] = put(t["length"], length[j])
    for name in NODE_FIELDS:
      t[name] = put(t[name], fields[name][j].astype(t[name].dtype))
    slot = jnp.minimum(t["num_children"][parent], C - 1)
    t["children"] = t["children"].at[parent, slot].set(jnp.where(ok, first + j, t["children"][parent, slot]))
    t["num_children"] = t["num_children"].at[parent].add(ok.astype(jnp.int32))
  return dataclasses.replace(tree, **t, num_nodes=first + count)


def path_to(tree: Tree, node: jax.Array, max_depth: int) -> tuple[jax.Array, jax.Array]:
  """The root-to-node path of ONE tree: ([max_depth + 1] int32 ids, UNUSED after the node; [] int32 length)."""
  def step(_, carry):
    path, n = carry
    path = jnp.where(n >= 0, path.at[jnp.maximum(tree.depth[n], 0)].set(n), path)
    return path, jnp.where(n >= 0, tree.parent[jnp.maximum(n, 0)], n)
  path, _ = jax.lax.fori_loop(0, max_depth + 1, step, (jnp.full((max_depth + 1,), UNUSED, jnp.int32), node))
  return path, tree.depth[node] + 1


# ---------------------------------------------------------------------------------------------------- export


def to_nodes(tree: Tree, b: int, texts: Sequence[str]) -> list[thoughts.Node]:
  """Tree b as LLaMA-O1 nodes (id order, parents first), one per line; ratings from each node's rating.

  texts[i] is node i's text (texts[0] the question).
  """
  t = tree.select([b])
  n = int(t.num_nodes[0])
  nodes = []
  for i in range(n):
    nodes.append(thoughts.Node(
        parent=int(t.parent[0, i]), index=i, meta=thoughts.meta_prefix(int(t.meta[0, i])), text=texts[i],
        rating=None if i == ROOT else thoughts.rating_token(min(float(t.rating[0, i]), 0.0)),
        separator=thoughts.PROMPT_SEPARATOR))
  return nodes


def to_text(tree: Tree, b: int, texts: Sequence[str]) -> str:
  """Tree b in the LLaMA-O1 text format (`thoughts.parse` reads it back)."""
  return thoughts.serialize(to_nodes(tree, b, texts))


_FLOAT_FIELDS = ("value", "rating", "step_log_prob", "entropy", "varentropy", "rectified")
_INT_FIELDS = ("parent", "depth", "meta", "visits", "num_children", "length", "rectify_visits", "outcome")
_BOOL_FIELDS = ("terminal", "finished")


def to_json(tree: Tree, b: int, texts: Sequence[str], **extra: Any) -> dict:
  """Tree b as a JSON-ready dict: its sizes, every node's fields (and text), and `extra` top-level entries.

  `from_json` reloads the arrays exactly (floats are written with full float32 precision).
  """
  t = tree.select([b])
  n = int(t.num_nodes[0])
  nodes = []
  for i in range(n):
    node = {"index": i, "text": texts[i], "meta_action": thoughts.META_ACTIONS[int(t.meta[0, i])]}
    for name in _INT_FIELDS:
      node[name] = int(getattr(t, name)[0, i])
    for name in _FLOAT_FIELDS:
      node[name] = float(getattr(t, name)[0, i])
    for name in _BOOL_FIELDS:
      node[name] = bool(getattr(t, name)[0, i])
    node["outcome_name"] = OUTCOME_NAMES[node["outcome"]]
    node["children"] = [int(c) for c in t.children[0, i, :node["num_children"]]]
    node["tokens"] = [int(x) for x in t.tokens[0, i, :node["length"]]]
    node["log_probs"] = [float(x) for x in t.log_probs[0, i, :node["length"] + int(node["finished"])]]
    nodes.append(node)
  return {"num_slots": t.num_slots, "num_children_slots": t.num_children_slots, "step_slots": t.step_slots,
          **extra, "nodes": nodes}


def from_json(record: dict | str) -> tuple[Tree, list[str]]:
  """A tree written by `to_json` (a dict or its JSON text) as a 1-tree `Tree` of numpy arrays, and its texts."""
  if isinstance(record, str):
    record = json.loads(record)
  try:
    nodes = record["nodes"]
    t = empty(1, record["num_slots"], record["num_children_slots"], record["step_slots"])
  except (KeyError, TypeError) as e:
    raise ValueError(f"a tree record needs num_slots, num_children_slots, step_slots and nodes; missing {e}.") from None
  arrays = {name: np.array(getattr(t, name)) for name in dataclasses.asdict(t)}
  for node in nodes:
    i = node["index"]
    for name in _INT_FIELDS + _FLOAT_FIELDS + _BOOL_FIELDS:
      arrays[name][0, i] = node[name]
    arrays["children"][0, i, :len(node["children"])] = node["children"]
    arrays["tokens"][0, i, :len(node["tokens"])] = node["tokens"]
    arrays["log_probs"][0, i, :len(node["log_probs"])] = node["log_probs"]
  arrays["num_nodes"][0] = len(nodes)
  return Tree(**arrays), [node["text"] for node in nodes]
