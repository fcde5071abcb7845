"""Chain, best-of-N, beam search and DVTS on scripted step models: the beams a hand computation keeps."""

import math

import numpy as np
import pytest

from o1jax import thoughts
from o1jax.search import beam, step_model
from o1jax.search import tree as tree_lib
from o1jax.search.result import Problem

CONCLUSION = thoughts.META_ACTIONS.index("<conclusion>")


def by_id(values, texts=None, finished=()):
  """Child id i gets values[i] and texts[i] (default "step i"); ids in `finished` are cut (unfinished) steps."""
  def script(problem, path, child, meta):
    return step_model.ScriptedStep((texts or {}).get(child, f"step {child}"), value=values.get(child, -1.0),
                                   finished=child not in finished)
  return script


def run(config, script, problems=(Problem("p", "Q?"),)):
  model = step_model.ScriptedStepModel(script)
  return beam.search(model, list(problems), config, progress=False), model


def test_chain_by_hand():
  """A: an answer ends it at once. B: two steps, then the forced conclusion at the last round. C: a cut step."""
  texts = {1: "He has 7 apples, \\boxed{7}"}

  def script(problem, path, child, meta):
    if problem == "A":
      return step_model.ScriptedStep(texts[1], value=math.log(0.9))
    if problem == "B":
      text = "Therefore \\boxed{12}" if meta == CONCLUSION else f"Half of {child} is less."
      return step_model.ScriptedStep(text, value=math.log(0.6))
    return step_model.ScriptedStep("and then he", value=-1.0, finished=False)
  results, model = run(beam.BeamConfig(strategy="chain", max_depth=3), script,
                       [Problem("A", "A?"), Problem("B", "B?"), Problem("C", "C?")])
  a, b, c = results
  assert a.answer == "7" and a.num_nodes == 1 and a.answer_path() == [0, 1]
  assert [int(m) for m in b.tree.meta[0, :4]] == [1, 0, 0, CONCLUSION] and b.answer == "12"
  assert b.answer_path() == [0, 1, 2, 3] and b.rounds == 3
  assert c.num_nodes == 1 and bool(c.tree.terminal[0, 1]) and not c.tree.finished[0, 1] and c.answer is None
  # Round 3 prompted only B, with the conclusion's hint.
  assert [[r.problem for r in call] for call in model.calls] == [["A", "B", "C"], ["B"], ["B"]]
  assert model.calls[2][0].hints == (thoughts.CONCLUSION_HINT,)
  for r in results:
    assert thoughts.parse(r.to_text())


def test_a_repeated_step_forces_the_conclusion_next():
  def script(problem, path, child, meta):
    if meta == CONCLUSION:
      return step_model.ScriptedStep("So \\boxed{10}", value=-0.1)
    return step_model.ScriptedStep(" He runs 10 meters. " if child == 2 else "He runs 10 meters.", value=-0.2)
  [r], model = run(beam.BeamConfig(strategy="chain", max_depth=6), script)
  assert [int(m) for m in r.tree.meta[0, :4]] == [1, 0, 0, CONCLUSION] and r.answer == "10"
  assert len(model.calls) == 3   # no rounds 4 to 6


def test_best_of_n_and_its_votes():
  """Four chains from the root: 1 -> 5 (answer 3), 2 (answer 4 at once), 3 -> 6 (answer 4), 4 -> 7 (answer 3).
  Scores ("last"): node 5 0.9, node 2 0.5, node 6 0.3, node 7 0.2."""
  values = {1: -0.1, 2: math.log(0.5), 3: -0.1, 4: -0.1, 5: math.log(0.9), 6: math.log(0.3), 7: math.log(0.2)}
  texts = {2: "\\boxed{4}", 5: "\\boxed{3}", 6: "\\boxed{4}", 7: "\\boxed{3}"}
  script = by_id(values, texts)
  # majority: 3 and 4 tie (two each): the answer seen first (node 2's 4), from its best-scored node.
  for answer, expected_node in (("best", 5), ("majority", 2), ("weighted", 5)):
    [r], model = run(beam.BeamConfig(strategy="best_of_n", n=4, max_depth=4, answer=answer), script)
    assert r.answer_node == expected_node, answer
  assert [len(c) for c in model.calls] == [1, 3]           # the root once with 4 children, then 3 open chains
  assert model.calls[0][0].child_ids == (1, 2, 3, 4)
  # With node 5 worth less, the votes part: best -> 2 (0.5), majority -> 3 vs 4 tie (2 each): first seen (4 at
  # node 2), weighted -> 4: 0.5 + 0.3 = 0.8 against 3: 0.1 + 0.2 = 0.3.
  values[5] = math.log(0.1)
  for answer, expected in (("best", "4"), ("majority", "4"), ("weighted", "4")):
    [r], _ = run(beam.BeamConfig(strategy="best_of_n", n=4, max_depth=4, answer=answer), by_id(values, texts))
    assert r.answer == expected, answer


def test_beam_search_keeps_the_best_n_over_m():
  """n=4, M=2. Round 0: root -> 1..4 with p = .2, .9, .5, .7: keep 2 and 4. Round 1: two beams, 2 children
  each (ids 5, 6 from node 2; 7, 8 from node 4); node 6 completes (answer); open: 5 (.3), 7 (.8), 8 (.6): keep 7
  and 8. Round 2 (the last: conclusions): 7 -> 9, 10; 8 -> 11, 12, all terminal. The answer is the best
  completed beam by its last value."""
  p = {1: .2, 2: .9, 3: .5, 4: .7, 5: .3, 6: .4, 7: .8, 8: .6, 9: .35, 10: .75, 11: .95, 12: .1}
  texts = {6: "\\boxed{6}", 9: "\\boxed{9}", 10: "\\boxed{10}", 11: "\\boxed{11}", 12: "\\boxed{12}"}
  [r], model = run(beam.BeamConfig(strategy="beam", n=4, beam_width=2, max_depth=3),
                   by_id({i: math.log(v) for i, v in p.items()}, texts))
  t = r.tree
  assert list(t.parent[0, 1:13]) == [0, 0, 0, 0, 2, 2, 4, 4, 7, 7, 8, 8]
  assert [[(q.node, q.child_ids) for q in call] for call in model.calls] == [
      [(0, (1, 2, 3, 4))], [(2, (5, 6)), (4, (7, 8))], [(7, (9, 10)), (8, (11, 12))]]
  assert r.answer == "11" and r.answer_path() == [0, 4, 8, 11]
  # With "min" aggregation node 11's path scores min(.7, .6, .95) = .6 and node 10's min(.7, .8, .75) = .7.
  [r], _ = run(beam.BeamConfig(strategy="beam", n=4, beam_width=2, max_depth=3, aggregation="min"),
               by_id({i: math.log(v) for i, v in p.items()}, texts))
  assert r.answer == "10"


def test_beam_repeats_the_remaining_beams_up_to_n():
  """When completed beams leave fewer open beams than n / M, the open ones share all n candidates: here
  round 1 completes 5, 6 and 8, so beam 7 alone gets the 4 children of round 2."""
  p = {1: .9, 2: .8, 3: .1, 4: .1, 5: .5, 6: .6, 7: .7, 8: .2}
  texts = {5: "\\boxed{1}", 6: "\\boxed{2}", 8: "\\boxed{3}"}
  [r], model = run(beam.BeamConfig(strategy="beam", n=4, beam_width=2, max_depth=4),
                   by_id({i: math.log(v) for i, v in p.items()}, texts))
  assert [(q.node, q.child_ids) for q in model.calls[2]] == [(7, (9, 10, 11, 12))]


def test_dvts_keeps_the_best_of_each_subtree():
  """n=4, M=2: subtrees {1, 2} and {3, 4} from the root. Round 1 expands the best of each (2 and 3) into
  M children; subtree 0's best child 6 is terminal, so it stops; subtree 1 continues from 8."""
  p = {1: .2, 2: .9, 3: .7, 4: .5, 5: .3, 6: .8, 7: .4, 8: .6, 9: .7, 10: .1}
  texts = {6: "\\boxed{2}", 9: "\\boxed{3}", 10: "\\boxed{4}"}
  [r], model = run(beam.BeamConfig(strategy="dvts", n=4, beam_width=2, max_depth=5),
                   by_id({i: math.log(v) for i, v in p.items()}, texts))
  assert [[(q.node, q.child_ids) for q in call] for call in model.calls] == [
      [(0, (1, 2, 3, 4))], [(2, (5, 6)), (3, (7, 8))], [(8, (9, 10))]]
  # Candidates: subtree 0's last expansion {5, 6}, subtree 1's {9, 10}; best by last value: 6 (.8).
  assert r.answer == "2" and r.answer_node == 6


def test_all_problems_share_each_round():
  values = {i: -0.1 * i for i in range(1, 40)}
  results, model = run(beam.BeamConfig(strategy="beam", n=4, beam_width=2, max_depth=2), by_id(values),
                       [Problem(f"p{i}", f"Q{i}?") for i in range(3)])
  assert [sorted({q.problem for q in call}) for call in model.calls] == [["p0", "p1", "p2"]] * 2
  for r in results:
    assert r.usage.generated > 0 and r.usage.scored == r.num_nodes


def test_aggregate():
  values = [math.log(0.5), math.log(0.8), math.log(0.4)]
  assert [round(beam.aggregate(values, how), 6) for how in beam.AGGREGATIONS] == [0.4, 0.4, 0.16, 0.566667]


@pytest.mark.parametrize("overrides, message", [
    (dict(strategy="greedy"), "strategy='greedy'; expected one of"),
    (dict(n=10, beam_width=4), "n=10 is not a multiple of beam_width=4"),
    (dict(n=0), "n=0 must be >= 1"),
    (dict(aggregation="max"), "aggregation='max'"),
    (dict(answer="vote"), "answer='vote'"),
])
def test_bad_config(overrides, message):
  with pytest.raises(ValueError, match=message):
    beam.BeamConfig(**overrides)


def test_trees_export_with_their_answer_path():
  p = {1: .2, 2: .9, 3: .5, 4: .7}
  texts = {i: f"\\boxed{{{i}}}" for i in range(5, 13)}
  [r], _ = run(beam.BeamConfig(strategy="beam", n=4, beam_width=2, max_depth=2),
               by_id({i: math.log(v) for i, v in p.items()}, texts))
  record = r.to_json()
  reloaded, _ = tree_lib.from_json(record)
  np.testing.assert_array_equal(reloaded.parent, r.tree.parent)
  assert record["answer_path"] == r.answer_path() and record["nodes"][r.answer_node]["answer"] == r.answer
