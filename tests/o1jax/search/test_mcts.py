"""The vectorized MCTS against a plain-Python recursive reference (tests/reference_mcts.py), against itself across
batches and meshes, and on small trees computed by hand."""

import dataclasses
import json
import math
import zlib

import jax
import numpy as np
import pytest

import reference_mcts
from o1jax import parallel, thoughts
from o1jax.search import expansion, mcts, step_model
from o1jax.search import tree as tree_lib
from o1jax.search.result import Problem

CONCLUSION = thoughts.META_ACTIONS.index("<conclusion>")


def hashed_script(problem, path, child, meta):
  """Values, statistics and texts that look random but are a pure function of the node's place in its tree."""
  h = zlib.crc32(f"{problem}/{path}/{child}/{meta}".encode())
  r = (h % 1000) / 1000
  value = -0.05 - 2.0 * r
  log_prob = -0.2 - (h // 1000 % 100) / 50
  varentropy = (h // 100_000 % 100) / 20
  if meta == CONCLUSION or r < 0.2:
    text = f"So the answer is \\boxed{{{h % 3}}}."
  else:
    text = f"step {child} ({h % 97})"
  return step_model.ScriptedStep(text, value=value, log_prob=log_prob, varentropy=varentropy,
                                 finished=h % 23 != 0)


PROBLEMS = [Problem(id=f"p{i}", question=f"Question {i}?", ground_truth="1") for i in range(6)]
CONFIG = mcts.MCTSConfig(num_simulations=10, children_per_expansion=2, max_children=3, max_depth=4, patience=2,
                         random_factor=(1.0, 1.0))


def reference_tree(problem, config, *, feed_factors):
  key = expansion.tree_key(config.seed, problem.id)

  def draws(simulation):
    return [np.asarray(a) for a in mcts.round_randomness(key, simulation, config)[:2]]
  factors = (lambda s, d: draws(s)[0][d]) if feed_factors else None
  reference = reference_mcts.ReferenceMCTS(
      step_model.ScriptedStepModel(hashed_script), problem.id, problem.question, ground_truth=problem.ground_truth,
      num_simulations=config.num_simulations, children_per_expansion=config.children_per_expansion,
      max_children=config.max_children, exploration=config.exploration,
      varentropy_weight=config.varentropy_weight, discount=config.discount, eps=config.eps,
      patience=config.patience, max_depth=config.max_depth, factors=factors, uniforms=lambda s: draws(s)[1])
  return reference.search(), reference.simulations_run


def assert_same_tree(result, nodes, simulations_run):
  t = result.tree
  assert int(t.num_nodes[0]) == len(nodes)
  assert result.rounds == simulations_run
  for node in nodes:
    i = node.index
    assert int(t.parent[0, i]) == (-1 if node.parent is None else node.parent), i
    assert [int(c) for c in t.children[0, i, :t.num_children[0, i]]] == [c.index for c in node.children], i
    assert int(t.meta[0, i]) == node.meta and int(t.depth[0, i]) == node.depth, i
    assert int(t.visits[0, i]) == node.visits, i
    assert bool(t.terminal[0, i]) == node.terminal, i
    assert int(t.rectify_visits[0, i]) == node.rectify_visits, i
    np.testing.assert_allclose(t.value[0, i], node.value, atol=1e-6, err_msg=f"value of node {i}")
    np.testing.assert_allclose(t.rectified[0, i], node.rectified, atol=1e-6, err_msg=f"rectified {i}")
    assert result.texts[i] == (node.text or result.problem.question)


@pytest.mark.parametrize("feed_factors", [False, True])
def test_equals_the_recursive_reference(feed_factors):
  config = CONFIG if not feed_factors else dataclasses.replace(CONFIG, random_factor=(0.8, 1.2))
  results = mcts.search(step_model.ScriptedStepModel(hashed_script), PROBLEMS, config, progress=False)
  shapes = set()
  for problem, result in zip(PROBLEMS, results):
    nodes, simulations_run = reference_tree(problem, config, feed_factors=feed_factors)
    assert_same_tree(result, nodes, simulations_run)
    shapes.add((len(nodes), simulations_run, max(n.depth for n in nodes)))
  # The batch holds trees of different shapes, some of them stopped early by patience.
  assert len(shapes) >= 3 and min(s[1] for s in shapes) < config.num_simulations


def test_a_tree_is_the_same_alone_in_any_batch_and_on_eight_devices():
  config = dataclasses.replace(CONFIG, random_factor=(0.8, 1.2), seed=3)
  model = lambda: step_model.ScriptedStepModel(hashed_script)  # noqa: E731
  together = mcts.search(model(), PROBLEMS, config, progress=False)
  reversed_batch = mcts.search(model(), PROBLEMS[::-1], config, progress=False)[::-1]
  sharded = mcts.search(model(), PROBLEMS[:5], config, mesh=parallel.make_mesh(), progress=False)
  assert jax.device_count() == 8
  for i, problem in enumerate(PROBLEMS):
    [alone] = mcts.search(model(), [problem], config, progress=False)
    others = [reversed_batch[i]] + ([sharded[i]] if i < 5 else [])
    for other in others:
      for name, a in dataclasses.asdict(alone.tree).items():
        np.testing.assert_array_equal(a, getattr(other.tree, name), err_msg=f"{problem.id}: {name}")
    np.testing.assert_array_equal(alone.tree.visits, together[i].tree.visits)
  # Another seed grows other trees.
  other_seed = mcts.search(model(), PROBLEMS, dataclasses.replace(config, seed=4), progress=False)
  assert any(not np.array_equal(a.tree.parent, b.tree.parent) for a, b in zip(together, other_seed))


# --------------------------------------------------------------------------------------------- by hand


def fixed(values, log_probs=None, varentropies=None, texts=None):
  """A script giving child id i the value values[i] (and optional statistics / texts)."""
  def script(problem, path, child, meta):
    return step_model.ScriptedStep(
        texts.get(child, f"step {child}") if texts else f"step {child}", value=values[child],
        log_prob=(log_probs or {}).get(child, -1.0), varentropy=(varentropies or {}).get(child, 0.0))
  return script


def hand_config(**overrides):
  base = dict(num_simulations=3, children_per_expansion=2, max_children=2, random_factor=(1.0, 1.0), max_depth=5,
              exploration=1.0, varentropy_weight=0.0, discount=0.5)
  return mcts.MCTSConfig(**{**base, **overrides})


def test_selection_widening_and_backup_by_hand():
  """max_children=2: the root is expanded once, then the search descends.

  Simulation 1 expands the root into nodes 1 (value -0.2) and 2 (-1.0). Equal priors (0.5) and no visits: scores
  are Q + 0.5 * sqrt(0) / 1 = Q, so node 1 is preferred: root value = 0.5 * -0.2 = -0.1, root visits 1.
  Simulation 2: the root is full; scores Q + 0.5 * sqrt(0) = Q again: node 1 (-0.2) is selected and expanded into
  3 (-0.4) and 4 (-0.8); node 1 takes 0.5 * -0.4 = -0.2 (visits 1); the root takes 0.5 * -0.2 = -0.1,
  mean (-0.1 + -0.1) / 2 = -0.1 (visits 2).
  Simulation 3: at the root, sqrt(1) = 1: node 1 scores -0.2 + 0.5 / 2 = 0.05, node 2 scores -1.0 + 0.5 = -0.5:
  node 1; it is full: node 3 scores -0.4, node 4 -0.8 (no visits below): node 3 is expanded into 5 (-0.6) and
  6 (-0.1). Node 3 takes 0.5 * max-scored child... child scores -0.6 and -0.1: node 6: 0.5 * -0.1 = -0.05
  (visits 1). Node 1: v = 0.5 * -0.05 = -0.025; mean of -0.2 and -0.025 = -0.1125 (visits 2). Root: v = 0.5 *
  -0.1125 = -0.05625; mean of -0.1, -0.1, -0.05625 = -0.0854167 (visits 3).
  """
  values = {1: -0.2, 2: -1.0, 3: -0.4, 4: -0.8, 5: -0.6, 6: -0.1}
  [r] = mcts.search(step_model.ScriptedStepModel(fixed(values)), [Problem("p", "Q?")], hand_config(),
                    progress=False)
  t = r.tree
  assert list(t.parent[0, :7]) == [-1, 0, 0, 1, 1, 3, 3]
  assert list(t.visits[0, :7]) == [3, 2, 0, 1, 0, 0, 0]
  np.testing.assert_allclose(t.value[0, :7], [-0.0854167, -0.1125, -1.0, -0.05, -0.8, -0.6, -0.1], atol=1e-6)


def test_prior_and_varentropy_terms_decide_between_equal_values():
  """Two children of equal value -0.5. An expansion does not visit its children, so at simulation 2 (root full)
  the children's visits sum to 0, the prior term is 0, and the varentropy term decides: child 2 (varentropy 5
  against 0) is expanded into 3 and 4 (value -0.1 each), and takes 0.5 * -0.1 = -0.05 with 1 visit.
  Simulation 3: sqrt(1) = 1. prior = softmax(exp(-0.1), exp(-3.0)) = (0.7017, 0.2983), var = softmax(0, 5) =
  (0.0067, 0.9933):
    child 1: -0.5 + 0.7017 / 1 + 0.1 * 0.0067 = 0.2024;  child 2: -0.05 + 0.2983 / 2 + 0.1 * 0.9933 = 0.1985,
  so the prior makes child 1 the one expanded into 5 and 6.
  """
  values = {1: -0.5, 2: -0.5, 3: -0.1, 4: -0.1, 5: -0.3, 6: -0.3}
  config = hand_config(num_simulations=3, varentropy_weight=0.1, exploration=1.0)
  script = fixed(values, log_probs={1: -0.1, 2: -3.0}, varentropies={1: 0.0, 2: 5.0})
  [r] = mcts.search(step_model.ScriptedStepModel(script), [Problem("p", "Q?")], config, progress=False)
  t = r.tree
  assert list(t.parent[0, :7]) == [-1, 0, 0, 2, 2, 1, 1]
  np.testing.assert_allclose(t.value[0, 2], -0.05, atol=1e-6)
  assert list(t.visits[0, :3]) == [3, 1, 1]


def test_terminals_are_never_expanded_and_back_up_their_own_value():
  """Node 1 states an answer (terminal) and is the better child; once the root is full, selection lands on it,
  and a simulation that reaches it adds no node and backs up its value."""
  values = {1: -0.1, 2: -2.0}
  texts = {1: "The answer is \\boxed{3}."}
  config = hand_config(num_simulations=3, exploration=0.0)
  [r] = mcts.search(step_model.ScriptedStepModel(fixed(values, texts=texts)), [Problem("p", "Q?")], config,
                    progress=False)
  t = r.tree
  assert int(t.num_nodes[0]) == 3 and bool(t.terminal[0, 1]) and not t.terminal[0, 2]
  assert list(t.visits[0, :3]) == [3, 2, 0]
  np.testing.assert_allclose(t.value[0, :3], [0.5 * -0.1, -0.1, -2.0], atol=1e-6)
  assert r.answer == "3" and r.answer_path() == [0, 1]


def test_rectification_by_hand():
  """Leaves in id order pass log 1 (correct) / log eps (wrong) up; each node keeps the running mean of what
  reaches it and passes discount x mean on.

  Tree (max_children=2, 2 simulations): root -> 1, 2; 1 -> 3, 4. Ground truth 7: node 2 and node 3 state 7
  (correct), node 4 states 8 (wrong), so patience (2) is spent by the end of simulation 2.
  Leaves in id order: 2 (0), 3 (0), 4 (log eps).
  Node 2: 0. Root: 0.5 * 0 = 0 (first arrival).
  Node 3: 0. Node 1: 0.5 * 0 = 0. Root: mean(0, 0.5 * 0) = 0.
  Node 4: L = log 1e-6. Node 1: mean(0, 0.5 L) = 0.25 L. Root: mean over 3 of (0, 0, 0.5 * 0.25 L) = L / 24.
  """
  values = {1: -0.1, 2: -0.5, 3: -0.2, 4: -0.3}
  texts = {2: "\\boxed{7}", 3: "\\boxed{7}", 4: "\\boxed{8}"}
  config = hand_config(num_simulations=4, exploration=0.0)
  [r] = mcts.search(step_model.ScriptedStepModel(fixed(values, texts=texts)), [Problem("p", "Q?", "7")], config,
                    progress=False)
  t = r.tree
  assert r.rounds == 2 and int(t.num_nodes[0]) == 5   # patience spent after simulation 2
  assert list(t.outcome[0, 1:5]) == [tree_lib.WRONG, tree_lib.CORRECT, tree_lib.CORRECT, tree_lib.WRONG]
  L = math.log(1e-6)
  np.testing.assert_allclose(t.rectified[0, :5], [L / 24, 0.25 * L, 0.0, 0.0, L], atol=1e-5)
  assert list(t.rectify_visits[0, :5]) == [3, 2, 1, 1, 1]


def test_answer_choice_by_hand():
  """max_reward follows the largest values from the root; the votes count terminal answers (weighted by their
  rated probability)."""
  values = {1: -0.1, 2: -0.2, 3: -3.0, 4: -0.5, 5: -0.05, 6: -1.0}
  texts = {1: "\\boxed{5}", 2: "\\boxed{6}", 3: "\\boxed{6}", 4: "\\boxed{5}", 5: "step", 6: "\\boxed{6}"}
  script = fixed(values, texts=texts)
  problem = [Problem("p", "Q?")]
  # max_children=6 and 3 simulations: the root gets 6 children; the largest value is node 5 ("step": no answer).
  base = dict(num_simulations=3, max_children=6, exploration=0.0)
  [r] = mcts.search(step_model.ScriptedStepModel(script), problem, hand_config(**base), progress=False)
  assert r.answer is None and r.answer_node == -1 and mcts.max_reward_path(r.tree, 0) == [0, 5]
  [r] = mcts.search(step_model.ScriptedStepModel(script), problem, hand_config(**base, answer="majority"),
                    progress=False)
  assert r.answer == "6" and r.answer_node == 2   # three 6s against two 5s; node 2 the best-rated 6
  [r] = mcts.search(step_model.ScriptedStepModel(script), problem, hand_config(**base, answer="weighted"),
                    progress=False)
  # 5: e^-0.1 + e^-0.5 = 1.51; 6: e^-0.2 + e^-3 + e^-1 = 1.23
  assert r.answer == "5" and r.answer_node == 1


def test_meta_actions_follow_the_transition_matrix():
  """With uniforms u fed in, the drawn metas are the inverse CDF of softmax(M[meta(node)]); M from the edges."""
  values = {1: -0.1, 2: -2.0, 3: -0.3, 4: -0.4}
  model = step_model.ScriptedStepModel(fixed(values))
  [r] = mcts.search(model, [Problem("p", "Q?")], hand_config(num_simulations=2), progress=False)
  first, second = model.calls
  key = expansion.tree_key(0, "p")
  config = hand_config(num_simulations=2)
  for simulation, call in enumerate((first, second)):
    u = np.asarray(mcts.round_randomness(key, simulation, config)[1])
    matrix = np.zeros((5, 5))
    if simulation == 1:  # after simulation 1: edges root(<problem>) -> 1, 2 with the values after backup
      for c in (1, 2):
        matrix[1, int(r.tree.meta[0, c])] += math.exp(values[c])
    row = matrix[int(r.tree.meta[0, call[0].node])]
    cdf = np.cumsum(np.exp(row) / np.exp(row).sum())
    assert list(call[0].metas) == [int(np.searchsorted(cdf / cdf[-1], x, side="right")) for x in u]


def test_export_parses_and_reloads():
  results = mcts.search(step_model.ScriptedStepModel(hashed_script), PROBLEMS[:2], CONFIG, progress=False)
  for r in results:
    nodes = thoughts.parse(r.to_text())
    assert len(nodes) == r.num_nodes + 1 and [n.parent for n in nodes[1:]] == list(r.tree.parent[0, 1:len(nodes)])
    record = json.loads(json.dumps(r.to_json()))
    reloaded, texts = tree_lib.from_json(record)
    for name, a in dataclasses.asdict(r.tree).items():
      np.testing.assert_array_equal(a, getattr(reloaded, name), err_msg=name)
    assert texts == r.texts and record["answer"] == r.answer


@pytest.mark.parametrize("overrides, message", [
    (dict(num_simulations=-1), "num_simulations=-1 must be >= 1"),
    (dict(children_per_expansion=6), "children_per_expansion=6 is more than max_children=5"),
    (dict(num_simulations=8, node_budget=10), "node_budget=10 is too small for 8 simulations of 2 children"),
    (dict(answer="best"), "answer='best'; expected one of"),
    (dict(random_factor=(1.2, 0.8)), r"random_factor=\(1.2, 0.8\) must be"),
    (dict(discount=0.0), "discount=0.0 must be in"),
    (dict(llama_o1_compat=True), "llama_o1_compat .* needs ground_truth_hint=True"),
])
def test_bad_config(overrides, message):
  with pytest.raises(ValueError, match=message):
    mcts.MCTSConfig(**overrides)


def test_ground_truth_hint_only_when_asked():
  model = step_model.ScriptedStepModel(fixed({1: -0.1, 2: -0.2, 3: -0.3, 4: -0.4}))
  problem = [Problem("p", "Q?", ground_truth="12")]
  mcts.search(model, problem, hand_config(num_simulations=1), progress=False)
  assert not any("12" in h for h in model.calls[0][0].hints)
  model = step_model.ScriptedStepModel(fixed({1: -0.1, 2: -0.2}))
  mcts.search(model, problem, hand_config(num_simulations=1, ground_truth_hint=True, llama_o1_compat=True),
              progress=False)
  request = model.calls[0][0]
  for meta, hint in zip(request.metas, request.hints):
    expected = thoughts.hint(thoughts.meta_prefix(meta), "12", llama_o1_compat=True)
    assert hint == expected


def test_the_protocol_docstring_example_runs(capsys):
  """o1jax/search/step_model.py's example, as written there (outside checks start from it)."""
  import textwrap
  doc = step_model.__doc__
  code = textwrap.dedent(doc[doc.index("  from o1jax.search import mcts"):doc.index("Legend:")])
  exec(compile(code, "step_model docstring", "exec"), {})
  out = capsys.readouterr().out
  assert out.startswith("4 <start_of_father_id>-1") and len(thoughts.parse(out[2:].strip())) == 13
