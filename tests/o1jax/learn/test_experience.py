"""Rows of experience from search trees: prompts as the search built them, behaviour log-probs in place,
advantages and best traces computed by hand."""

import math

import numpy as np
import pytest

from o1jax import pretrained, thoughts
from o1jax.learn import experience
from o1jax.prompt_tokens import PromptTokens
from o1jax.search import mcts, step_model
from o1jax.search import tree as tree_lib
from o1jax.search.result import Problem


@pytest.fixture(scope="module")
def prompts(tiny_smollm2_checkpoint):
  return PromptTokens(pretrained.load(tiny_smollm2_checkpoint, dtype="float32").tokenizer)


def script(values, texts=None):
  def s(problem, path, child, meta):
    return step_model.ScriptedStep((texts or {}).get(child, f"step {child}"), value=values[child],
                                   log_prob=-0.1 * child)
  return s


# max_children=2, 3 simulations: root -> 1, 2; 1 -> 3, 4; 3 -> 5, 6. Ground truth 7: node 6 is correct.
VALUES = {1: -0.2, 2: -1.0, 3: -0.3, 4: -0.9, 5: -0.5, 6: -0.1}
TEXTS = {5: "\\boxed{8}", 6: "\\boxed{7}"}
CONFIG = mcts.MCTSConfig(num_simulations=3, max_children=2, random_factor=(1.0, 1.0), exploration=1.0,
                         varentropy_weight=0.0, discount=0.5, patience=5)


@pytest.fixture(scope="module")
def result(prompts):
  model = step_model.ScriptedStepModel(script(VALUES, TEXTS), encode=prompts.tokenizer.encode)
  [r] = mcts.search(model, [Problem("p", "What is 3 + 4?", "7")], CONFIG, progress=False)
  assert list(r.tree.parent[0, :7]) == [-1, 0, 0, 1, 1, 3, 3]
  return r


def test_gae_by_hand(result):
  """Node 5: path [5, 3, 1]; delta(5, 3) = R3 + g V3 - V5, delta(3, 1) = R1 + g V1 - V3; A = d1 + g l d2."""
  t = result.tree
  R = experience.rewards(t)
  V = t.value[0].astype(np.float64)
  g, lam = 0.99, 0.95
  d1 = R[3] + g * V[3] - V[5]
  d2 = R[1] + g * V[1] - V[3]
  assert math.isclose(experience.gae_advantage(t, 5, g, lam), d1 + g * lam * d2, rel_tol=1e-9)
  assert experience.gae_advantage(t, 1, g, lam) == 0.0   # a child of the root
  # Rewards are the rectified values where leaves reached the node (every node here).
  assert (t.rectify_visits[0, 1:7] > 0).all() and R[6] == 0.0 and math.isclose(R[5], math.log(1e-6), rel_tol=1e-6)


def test_group_advantage_by_hand(result):
  R = experience.rewards(result.tree)
  r = R[[5, 6]]
  assert math.isclose(experience.group_advantage(result.tree, 6), (R[6] - r.mean()) / (r.std() + 1e-6), rel_tol=1e-9)


def test_best_traces(result):
  assert experience.best_traces(result.tree, 2) == [[0, 1, 3, 6]]   # the only correct leaf
  assert experience.best_traces(result.tree, 0) == []


def test_rows_hold_the_sampled_prompt_and_behaviour(result, prompts):
  config = experience.ExperienceConfig(seq_len=256)
  rows = experience.rows_from_results([result], prompts, config, experience.search_hint(False, False))
  assert len(rows) == 6 and rows.skipped_long == 0
  f = rows.fields
  t = result.tree
  tok = prompts.tokenizer
  for r, node in enumerate(range(1, 7)):
    seq = f["tokens"][r][f["valid"][r]]
    # The sequence is the text prompt the search builds (LLaMA-O1 format), step, <eot><sor>, as ids.
    nodes = tree_lib.to_nodes(t, 0, result.texts)
    path = thoughts.path_to(nodes, int(t.parent[0, node]))
    path = [thoughts.Node(n.parent, n.index, n.meta, n.text, n.rating if n.index else None) for n in path]
    meta = thoughts.meta_prefix(int(t.meta[0, node]))
    text = thoughts.policy_prompt(path, meta, node, hint_text=thoughts.hint(meta))
    step = list(t.tokens[0, node, :t.length[0, node]])
    assert list(seq) == tok.encode(text) + step + [prompts.end_of_thought, prompts.start_of_rating]
    # Targets: the step's tokens and its <end_of_thought>, with the recorded behaviour log-probs.
    targets = np.flatnonzero(f["loss_mask"][r])
    assert len(targets) == len(step) + 1
    np.testing.assert_array_equal(seq[targets + 1], step + [prompts.end_of_thought])
    np.testing.assert_allclose(f["behaviour"][r][targets], -0.1 * node, rtol=1e-6)
    assert seq[f["rating_at"][r]] == prompts.start_of_rating and f["rating_at"][r] == len(seq) - 1
    assert math.isclose(f["value_target"][r], experience.rewards(t)[node], rel_tol=1e-6)
  assert list(f["sft"]) == [True, False, True, False, False, True]
  np.testing.assert_allclose(rows.priorities, np.abs(f["advantage"]))


def test_value_context_and_pairs(result, prompts):
  config = experience.ExperienceConfig(seq_len=256, rating_context="value", pairs=True, advantage="group")
  rows = experience.rows_from_results([result], prompts, config, experience.search_hint(False, False))
  f = rows.fields
  t = result.tree
  # Node 3 (row 2) is the higher-valued child of node 1; its pair is node 4's value prompt.
  assert list(f["has_pair"]) == [True, False, True, False, False, True]
  pair = f["pair_tokens"][2][f["pair_valid"][2]]
  rating = f["rating_tokens"][2][f["rating_valid"][2]]
  step4 = list(t.tokens[0, 4, :t.length[0, 4]])
  assert list(pair[-len(step4) - 2:]) == step4 + [prompts.end_of_thought, prompts.start_of_rating]
  assert thoughts.HINT_OPEN not in prompts.tokenizer.decode(rating)   # LLaMA-O1's value prompt has no hint
  assert f["rating_position"][2] == len(rating) - 1


def test_long_rows_are_left_out(result, prompts):
  rows = experience.rows_from_results([result], prompts, experience.ExperienceConfig(seq_len=40),
                                      experience.search_hint(False, False))
  assert len(rows) + rows.skipped_long == 6 and rows.skipped_long > 0


def test_bad_config():
  with pytest.raises(ValueError, match="advantage='td'"):
    experience.ExperienceConfig(advantage="td")
  with pytest.raises(ValueError, match="rating_context='both'"):
    experience.ExperienceConfig(rating_context="both")
