"""LLaMA-O1's Monte-Carlo tree search, for B trees at once.

  results = mcts.search(step_model, [Problem(id, question), ...], MCTSConfig(num_simulations=16))
  results[i].answer, results[i].to_text(), results[i].to_json()

One simulation for every unfinished tree:
  1. select (vmapped, jitted): from the root, descend through full nodes by LLaMA-O1's score and stop at the
     first node that may still widen (fewer than `max_children` children) or is terminal;
  2. expand: the selected nodes of all trees go to the StepModel in one call, k children each, their meta
     actions drawn from each tree's own transition matrix, each child with its hint;
  3. evaluate: the StepModel rates all new nodes in one call; terminals and (self-play) outcomes are marked;
  4. back up (vmapped, jitted): the selected node takes discount x the value of the child the score now prefers
     (or, at a terminal, its own value), and every node on the path updates its running mean.
Trees that are done (patience spent, node budget full) stop taking rows. After the last simulation values are
rectified from the leaves and each tree chooses its answer.

LLaMA-O1's semantics (`online_train.py`, branch `deprecated`), as ../shared/DESIGN.md states them:
  - simulate(n): if n may still widen, expand it and take v = gamma * value(best child); otherwise recurse into
    the best child and take v = gamma * (its new value). Then visits(n) += 1, value(n) += (v - value(n)) /
    visits(n). So a node is descended through only once it holds `max_children` children; with 2 children per
    expansion and a maximum of 5 it ends with 6. o1jax adds terminals, which are never expanded: a simulation
    that reaches one backs up its own value (and LLaMA-O1 has none of the depth, budget or format limits).
  - score of child c of n: (Q(c) + c_puct * prior(c) * sqrt(sum of the children's visits) / (1 + visits(c))
    + lambda * var(c)) * U, with prior = softmax over the children of exp(step_log_prob) (their length-normalised
    step probabilities), var = softmax over the children of their varentropies, and U ~ U(0.8, 1.2) per child
    per simulation (`random_factor`; (1, 1) switches it off). Ties go to the first child.
  - meta action of a new child: row meta(n) of softmax(M), M[meta(p), meta(c)] = sum of exp(value(c)) over the
    tree's edges (p, c); LLaMA-O1 draws with `np.random.choice`, o1jax by the same inverse CDF from one uniform
    per child.
  - patience: every new child whose final answer equals the ground truth spends one unit; a tree stops after the
    simulation that spends its last. Without a ground truth (evaluation) there is no patience to spend.
  - rectification: every leaf, in id order, passes r = log 1 (correct), log eps (wrong) or, without a ground
    truth, its own value up its path; each node on the way keeps the running mean of what reaches it
    (its first arrival sets it: LLaMA-O1 took a stored 0, a success, for "unset") and passes gamma x that mean on.
  - answer: "max_reward" follows the children of largest value from the root to a leaf (LLaMA-O1's
    `find_max_reward_path`) and takes that leaf's answer; "majority" and "weighted" vote over the terminal
    nodes' answers (weights: their rated probabilities).

Determinism: tree b draws everything (selection factors, meta uniforms, the children's sampling keys) from
`expansion.tree_key(seed, problem id)` folded with the simulation number, so a tree is the same alone, in any
batch, on any mesh, and in a rerun (given a StepModel that is itself batch-independent, as the scripted fakes
are and as LMStepModel is up to floating-point differences between batch shapes).

Legend: B trees, N node slots, C children slots (max_children + k - 1), D max depth, k children per expansion.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from o1jax import parallel, thoughts
from o1jax.search import answers as answers_lib
from o1jax.search import tree as tree_lib
from o1jax.search.expansion import Expansions, Plan, tree_key
from o1jax.search.result import Problem, Result  # noqa: F401  (Problem: mcts.Problem)
from o1jax.search.step_model import StepModel

ANSWER_RULES = ("max_reward", "majority", "weighted")


@dataclasses.dataclass(frozen=True)
class MCTSConfig:
  """Every constant of the search; the defaults are LLaMA-O1's where it has one.

  Attributes:
    num_simulations: simulations per tree (LLaMA-O1: 32).
    children_per_expansion: k, children sampled per expansion (2).
    max_children: a node widens while it has fewer children than this (5).
    exploration: c_puct of the score (1.414).
    varentropy_weight: lambda of the score (0.1).
    random_factor: (low, high) of the uniform factor on every score ((0.8, 1.2)); (1, 1) switches it off.
    discount: gamma of backup and rectification (0.9).
    eps: rectified value of a wrong leaf is log(eps) (1e-6).
    patience: correct children a self-play tree may find before it stops (2).
    max_depth: nodes at this depth are terminal (LLaMA-O1 has no limit but its 1024-token prompt cut).
    node_budget: node slots per tree; 0 means exactly enough: 1 + num_simulations * children_per_expansion.
    max_step_tokens: token slots of a node's step (the sampler's max_new_tokens must not exceed it).
    answer: "max_reward" (LLaMA-O1), "majority" or "weighted" (see the module docstring).
    ground_truth_hint: give plain expansions LLaMA-O1's ground-truth hint (self-play only; needs the answers).
    llama_o1_compat: LLaMA-O1's own hints: the critic hint for <conclusion>, the ground-truth hint for every
      plain expansion (so it needs ground_truth_hint).
    seed: with each problem's id, the source of all randomness.
  """

  num_simulations: int = 32
  children_per_expansion: int = 2
  max_children: int = 5
  exploration: float = 1.414
  varentropy_weight: float = 0.1
  random_factor: tuple[float, float] = (0.8, 1.2)
  discount: float = 0.9
  eps: float = 1e-6
  patience: int = 2
  max_depth: int = 8
  node_budget: int = 0
  max_step_tokens: int = 64
  answer: str = "max_reward"
  ground_truth_hint: bool = False
  llama_o1_compat: bool = False
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "random_factor", tuple(float(f) for f in self.random_factor))
    for name in ("num_simulations", "children_per_expansion", "max_children", "patience", "max_depth",
                 "max_step_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
    if self.children_per_expansion > self.max_children:
      raise ValueError(f"children_per_expansion={self.children_per_expansion} is more than max_children="
                       f"{self.max_children}, the most children a node takes before it stops widening.")
    needed = 1 + self.num_simulations * self.children_per_expansion
    if self.node_budget != 0 and self.node_budget < needed:
      raise ValueError(f"node_budget={self.node_budget} is too small for {self.num_simulations} simulations of "
                       f"{self.children_per_expansion} children; it needs at least {needed} nodes (0 sizes it).")
    low, high = self.random_factor if len(self.random_factor) == 2 else (0.0, -1.0)
    if not 0 < low <= high:
      raise ValueError(f"random_factor={self.random_factor} must be (low, high) with 0 < low <= high.")
    if not 0 < self.discount <= 1:
      raise ValueError(f"discount={self.discount} must be in (0, 1].")
    if not 0 < self.eps < 1:
      raise ValueError(f"eps={self.eps} must be in (0, 1).")
    if self.exploration < 0 or self.varentropy_weight < 0:
      raise ValueError(f"exploration={self.exploration} and varentropy_weight={self.varentropy_weight} must be "
                       ">= 0.")
    if self.answer not in ANSWER_RULES:
      raise ValueError(f"answer={self.answer!r}; expected one of {ANSWER_RULES}.")
    if self.llama_o1_compat and not self.ground_truth_hint:
      raise ValueError("llama_o1_compat gives every plain expansion the ground-truth hint; it needs "
                       "ground_truth_hint=True (self-play).")

  @property
  def num_nodes(self) -> int:
    return self.node_budget or 1 + self.num_simulations * self.children_per_expansion

  @property
  def children_slots(self) -> int:
    return self.max_children + self.children_per_expansion - 1


# --------------------------------------------------------------------------------------- one tree (vmapped)


def _masked_softmax(x: jax.Array, valid: jax.Array) -> jax.Array:
  x = jnp.where(valid, x, -jnp.inf)
  e = jnp.where(valid, jnp.exp(x - jnp.max(x)), 0.0)
  return e / jnp.maximum(jnp.sum(e), 1e-30)


def child_scores(tree: tree_lib.Tree, node: jax.Array, factors: jax.Array, config: MCTSConfig) -> jax.Array:
  """[C] LLaMA-O1's selection score of each child of `node` of ONE tree (-inf for empty slots).

  Args:
    factors: [C] the random factor of each child slot.
  """
  kids = tree.children[node]
  valid = jnp.arange(kids.shape[0]) < tree.num_children[node]
  safe = jnp.maximum(kids, 0)
  visits = jnp.where(valid, tree.visits[safe], 0)
  prior = _masked_softmax(jnp.exp(tree.step_log_prob[safe]), valid)
  var = _masked_softmax(tree.varentropy[safe], valid)
  total = jnp.sum(visits).astype(jnp.float32)
  score = (tree.value[safe] + config.exploration * prior * jnp.sqrt(total) / (1.0 + visits)
           + config.varentropy_weight * var) * factors
  return jnp.where(valid, score, -jnp.inf)


def best_child(tree: tree_lib.Tree, node: jax.Array, factors: jax.Array, config: MCTSConfig) -> jax.Array:
  """The child of `node` with the highest score (the first of equals)."""
  return tree.children[node, jnp.argmax(child_scores(tree, node, factors, config))]


def select(tree: tree_lib.Tree, factors: jax.Array, config: MCTSConfig) -> tuple[jax.Array, jax.Array]:
  """Descends ONE tree from the root through full nodes; returns (node, expandable).

  Args:
    factors: [D + 1, C] the random factors; the choice among the children of a node at depth d uses row d.

  Returns:
    node: [] int32 the first node on the way that may still widen or is terminal.
    expandable: [] bool, False when that node is terminal.
  """
  def descend(node):
    return ~tree.terminal[node] & (tree.num_children[node] >= config.max_children)

  def step(node):
    return best_child(tree, node, factors[tree.depth[node]], config)
  node = jax.lax.while_loop(descend, step, jnp.asarray(tree_lib.ROOT, jnp.int32))
  return node, ~tree.terminal[node]


def transition_matrix(tree: tree_lib.Tree) -> jax.Array:
  """[5, 5] M[meta(parent), meta(child)] = sum over ONE tree's edges of exp(value(child))."""
  n = tree.parent.shape[0]
  edge = (jnp.arange(n) < tree.num_nodes) & (tree.parent >= 0)
  parent_meta = tree.meta[jnp.maximum(tree.parent, 0)]
  weights = jnp.where(edge, jnp.exp(tree.value), 0.0)
  size = len(thoughts.META_ACTIONS)
  return jnp.zeros((size, size), jnp.float32).at[jnp.where(edge, parent_meta, 0),
                                                 jnp.where(edge, tree.meta, 0)].add(weights)


def draw_metas(tree: tree_lib.Tree, node: jax.Array, uniforms: jax.Array) -> jax.Array:
  """[k] meta actions of node's new children: inverse CDF of softmax(M)[meta(node)] at each uniform."""
  probs = jax.nn.softmax(transition_matrix(tree)[tree.meta[node]])
  cdf = jnp.cumsum(probs)
  cdf = cdf / cdf[-1]
  return jnp.minimum(jnp.searchsorted(cdf, uniforms, side="right"), probs.shape[0] - 1).astype(jnp.int32)


def backup(tree: tree_lib.Tree, node: jax.Array, expanded: jax.Array, active: jax.Array, factors: jax.Array,
           config: MCTSConfig) -> tree_lib.Tree:
  """Backs one simulation up ONE tree from `node` (after its new children were added) to the root.

  Args:
    node: the selected node. expanded: it was just expanded (else it is terminal). active: the tree took part
      in this simulation (else nothing changes).
    factors: [D + 1, C] this simulation's factors (the expanded node's choice uses row depth(node)).
  """
  best = best_child(tree, node, factors[tree.depth[node]], config)
  incoming = jnp.where(expanded, config.discount * tree.value[jnp.maximum(best, 0)], tree.value[node])

  def up(_, carry):
    visits, value, n, v = carry
    live = active & (n >= 0)
    at = jnp.maximum(n, 0)
    count = visits[at] + 1
    mean = value[at] + (v - value[at]) / count
    visits = visits.at[at].set(jnp.where(live, count, visits[at]))
    value = value.at[at].set(jnp.where(live, mean, value[at]))
    return visits, value, jnp.where(live, tree.parent[at], n), config.discount * mean
  visits, value, _, _ = jax.lax.fori_loop(0, config.max_depth + 1, up, (tree.visits, tree.value, node, incoming))
  return dataclasses.replace(tree, visits=visits, value=value)


def rectify(tree: tree_lib.Tree, config: MCTSConfig) -> tree_lib.Tree:
  """Values of ONE tree recomputed from its leaves (see the module docstring), into `rectified`."""
  n = tree.parent.shape[0]
  used = jnp.arange(n) < tree.num_nodes
  leaf = used & (tree.num_children == 0) & (tree.parent >= 0)
  reward = jnp.where(tree.outcome == tree_lib.CORRECT, 0.0,
                     jnp.where(tree.outcome == tree_lib.WRONG, math.log(config.eps), tree.value))

  def from_leaf(i, carry):
    def up(_, inner):
      rectified, visits, node, r = inner
      live = leaf[i] & (node >= 0)
      at = jnp.maximum(node, 0)
      count = visits[at] + 1
      mean = jnp.where(count == 1, r, rectified[at] + (r - rectified[at]) / count)
      rectified = rectified.at[at].set(jnp.where(live, mean, rectified[at]))
      visits = visits.at[at].set(jnp.where(live, count, visits[at]))
      return rectified, visits, jnp.where(live, tree.parent[at], node), config.discount * mean
    rectified, visits = carry
    rectified, visits, _, _ = jax.lax.fori_loop(0, config.max_depth + 1, up,
                                                (rectified, visits, jnp.asarray(i, jnp.int32), reward[i]))
    return rectified, visits
  zeros = jnp.zeros_like(tree.value)
  rectified, visits = jax.lax.fori_loop(0, n, from_leaf, (zeros, jnp.zeros_like(tree.visits)))
  return dataclasses.replace(tree, rectified=rectified, rectify_visits=visits)


def round_randomness(key: jax.Array, simulation: int | jax.Array, config: MCTSConfig
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """ONE tree's draws for one simulation: factors [D + 1, C], meta uniforms [k], children's sampling keys [k]."""
  sim_key = jax.random.fold_in(key, simulation)
  factor_key, meta_key, child_key = jax.random.split(sim_key, 3)
  low, high = config.random_factor
  factors = jax.random.uniform(factor_key, (config.max_depth + 1, config.children_slots), jnp.float32, low, high)
  uniforms = jax.random.uniform(meta_key, (config.children_per_expansion,), jnp.float32)
  keys = jax.vmap(lambda j: jax.random.fold_in(child_key, j))(jnp.arange(config.children_per_expansion,
                                                                         dtype=jnp.uint32))
  return factors, uniforms, keys


# ------------------------------------------------------------------------------------- B trees (jitted)


@functools.partial(jax.jit, static_argnames=("config",))
def _select_all(tree: tree_lib.Tree, keys: jax.Array, simulation: jax.Array, *, config: MCTSConfig):
  def one(t, key):
    factors, uniforms, child_keys = round_randomness(key, simulation, config)
    node, expandable = select(t, factors, config)
    return dict(node=node, expandable=expandable, metas=draw_metas(t, node, uniforms), factors=factors,
                keys=child_keys)
  return jax.vmap(one)(tree, keys)


@functools.partial(jax.jit, static_argnames=("config",))
def _grow(tree: tree_lib.Tree, new: dict, node: jax.Array, expanded: jax.Array, active: jax.Array,
          factors: jax.Array, *, config: MCTSConfig) -> tree_lib.Tree:
  tree = jax.vmap(lambda t, n: tree_lib.add_nodes(t, **n))(tree, new)
  return jax.vmap(lambda t, *a: backup(t, *a, config=config))(tree, node, expanded, active, factors)


@functools.partial(jax.jit, static_argnames=("config",))
def _rectify_all(tree: tree_lib.Tree, *, config: MCTSConfig) -> tree_lib.Tree:
  return jax.vmap(lambda t: rectify(t, config))(tree)


# ------------------------------------------------------------------------------------------- the search


def max_reward_path(tree: tree_lib.Tree, b: int) -> list[int]:
  """From the root, the child of largest value (the first of equals) down to a leaf (host arrays)."""
  path = [tree_lib.ROOT]
  while tree.num_children[b, path[-1]] > 0:
    kids = tree.children[b, path[-1], :tree.num_children[b, path[-1]]]
    path.append(int(kids[np.argmax(tree.value[b, kids])]))
  return path


def choose_answer(tree: tree_lib.Tree, b: int, node_answers: Sequence[str | None], rule: str) -> int:
  """The node whose answer tree b gives (-1 when none)."""
  if rule == "max_reward":
    leaf = max_reward_path(tree, b)[-1]
    return leaf if node_answers[leaf] is not None else -1
  n = int(tree.num_nodes[b])
  candidates = [i for i in range(n) if tree.terminal[b, i]]
  chosen = answers_lib.vote([node_answers[i] for i in candidates],
                            [math.exp(float(tree.rating[b, i])) for i in candidates],
                            "majority" if rule == "majority" else "weighted")
  return -1 if chosen is None else candidates[chosen]


def search(model: StepModel, problems: Sequence[Problem], config: MCTSConfig, *, mesh: jax.sharding.Mesh | None = None,
           progress: bool = True, on_simulation: Callable[[int, tree_lib.Tree], None] | None = None
           ) -> list[Result]:
  """Searches all problems at once (see the module docstring); one Result per problem, in order.

  Args:
    model: the StepModel (LMStepModel, or a scripted fake).
    problems: with ground truths only in self-play.
    mesh: when given, the trees are split over its batch axes (padded with idle trees to a multiple).
    on_simulation: called after each simulation with its number and the (device) trees, e.g. for timing.
  """
  if not problems:
    raise ValueError("search needs at least one problem.")
  expansions = Expansions(model, problems, max_depth=config.max_depth, step_slots=config.max_step_tokens,
                          ground_truth_hint=config.ground_truth_hint, llama_o1_compat=config.llama_o1_compat)
  B = len(problems)
  padded = B if mesh is None else -(-B // parallel.batch_size_multiple(mesh)) * parallel.batch_size_multiple(mesh)
  k = config.children_per_expansion
  trees = tree_lib.empty(padded, config.num_nodes, config.children_slots, config.max_step_tokens)
  keys = jnp.stack([tree_key(config.seed, p.id) for p in problems] + [jax.random.key(0)] * (padded - B))
  if mesh is not None:
    trees, keys = parallel.shard_batch((trees, keys), mesh)
  else:
    trees = jax.tree.map(jnp.asarray, trees)
  done = np.arange(padded) >= B
  patience = np.full(padded, config.patience)
  rounds = np.zeros(padded, np.int32)
  bar = tqdm.tqdm(total=config.num_simulations, desc="mcts simulations", unit="sim", disable=not progress)
  for simulation in range(config.num_simulations):
    if done.all():
      break
    chosen = _select_all(trees, keys, jnp.int32(simulation), config=config)
    node, expandable, metas = (parallel.to_host(chosen[name]) for name in ("node", "expandable", "metas"))
    host = trees.host()
    full = expandable & (host.num_nodes + k > config.num_nodes)
    done |= full
    active = ~done
    key_data = parallel.to_host(jax.random.key_data(chosen["keys"]))
    plans = [Plan(tree=b, node=int(node[b]), metas=tuple(metas[b]), keys=key_data[b])
             for b in np.flatnonzero(active & expandable)]
    new = {name: np.zeros((padded, k) + (() if name not in ("tokens", "log_probs") else (config.max_step_tokens,)),
                          dtype)
           for name, dtype in (("parents", np.int32), ("tokens", np.int32), ("log_probs", np.float32),
                               ("length", np.int32), *tree_lib.NODE_FIELDS.items())}
    new["count"] = np.zeros((padded,), np.int32)
    if plans:
      requests = expansions.requests(host, plans)
      steps, values = expansions.run(requests)
      new = expansions.new_nodes(host, requests, steps, values, width=k)
    if mesh is not None:
      placed, active_device, expanded_device = parallel.shard_batch((new, active, active & expandable), mesh)
    else:
      placed, active_device, expanded_device = new, active, active & expandable
    trees = _grow(trees, placed, chosen["node"], expanded_device, active_device, chosen["factors"], config=config)
    rounds += active
    found = (new["outcome"] == tree_lib.CORRECT) & (np.arange(k) < new["count"][:, None])
    patience -= found.sum(axis=1)
    done |= patience <= 0
    if on_simulation is not None:
      on_simulation(simulation, trees)
    bar.update(1)
    bar.set_postfix(trees_running=int((~done).sum()))
  bar.close()
  host = _rectify_all(trees, config=config).host()
  results = []
  for b, problem in enumerate(problems):
    answer_node = choose_answer(host, b, expansions.answers[b], config.answer)
    results.append(Result(problem=problem, strategy="mcts", tree=host.select([b]), texts=expansions.texts[b],
                          answers=expansions.answers[b],
                          answer=expansions.answers[b][answer_node] if answer_node >= 0 else None,
                          answer_node=answer_node, usage=expansions.usage[b], rounds=int(rounds[b])))
  return results
