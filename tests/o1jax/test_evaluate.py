"""The accuracy-against-compute sweep on a scripted step model: its rows, resuming without the model, the votes
of subsampled best_of_n chains, Wilson intervals and FLOPs by hand, the plots, and bad values refused."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from configs import smollm2_gsm8k
from models import presets
from o1jax import evaluate, thoughts
from o1jax.data import problems as problems_lib
from o1jax.search import beam, step_model
from o1jax.search.result import Problem

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")
CONCLUSION = thoughts.META_ACTIONS.index("<conclusion>")
GOLD = {p.uid: p.answer for p in problems_lib.load("gsm8k_test", 0, 2)}
# Root children 1..4 answer at once: (right or wrong, p(positive)). Later ids answer right with p = 0.5.
CHAINS = {1: (True, 0.4), 2: (False, 0.9), 3: (True, 0.3), 4: (True, 0.25)}
# By hand, over the first n chains (candidates in id order; ties go to the answer seen first):
#   n = 1: chain 1 alone -> right for every vote.
#   n = 2: best -> chain 2 (0.9, wrong); majority 1-1 tie -> chain 1's (right); weighted 0.4 vs 0.9 -> wrong.
#   n = 4: best -> chain 2 (wrong); majority 3-1 -> right; weighted 0.4 + 0.3 + 0.25 = 0.95 vs 0.9 -> right.
EXPECTED = {"best_of_n": {1: True, 2: False, 4: False}, "majority": {1: True, 2: True, 4: True},
            "weighted_best_of_n": {1: True, 2: False, 4: True}}
STRATEGIES = "chain,best_of_n,weighted_best_of_n,majority,beam,dvts,mcts"


def script(problem, path, child, meta):
  right, p = CHAINS.get(child, (True, 0.5))
  answer = GOLD[problem] if right else str(int(GOLD[problem]) + 1)
  return step_model.ScriptedStep(f"So the answer is \\boxed{{{answer}}}.", value=math.log(p))


def config(**eval_fields):
  c = smollm2_gsm8k.get_config()
  c.num_problems = 2
  c.beam.beam_width = 2
  c.eval.strategies = STRATEGIES
  c.eval.budgets = "1,2,4"
  c.eval.update(eval_fields)
  return c


class Models:
  """model_for: a fresh scripted model per search, each one's calls kept."""

  def __init__(self):
    self.made: list[tuple[str, step_model.ScriptedStepModel]] = []

  def __call__(self, run_config):
    model = step_model.ScriptedStepModel(script)
    self.made.append((run_config.strategy, model))
    return model

  @property
  def calls(self) -> int:
    return sum(len(m.calls) for _, m in self.made)


def sweep(workdir, c=None):
  s = evaluate.prepare(c or config(), str(workdir))
  models = Models()
  s.run(models, presets.smollm2_135m(), progress=False)
  return s, models


def test_the_sweep_writes_one_row_per_strategy_budget_and_problem(tmp_path):
  s, models = sweep(tmp_path)
  rows = evaluate.read_rows(s.rows_path)
  cells = {(r["strategy"], r["budget"]) for r in rows}
  expected = {("chain", 1)} | {(x, b) for x in STRATEGIES.split(",")[1:] for b in (1, 2, 4)}
  assert cells == expected and len(rows) == 2 * len(expected)
  assert all(set(r) == set(evaluate.ROW_KEYS) for r in rows)
  assert sorted({r["index"] for r in rows}) == [0, 1]
  # best_of_n and its votes: one search at the largest budget; the others one per budget (the chain once).
  assert sorted(strategy for strategy, _ in models.made) == sorted(["best_of_n", "chain"] + ["beam", "dvts",
                                                                                            "mcts"] * 3)
  assert {r["run"] for r in rows if r["strategy"] == "majority"} == {"best_of_n@4"}
  assert {(r["budget"], r["beam_width"]) for r in rows if r["strategy"] == "dvts"} == {(1, 1), (2, 2), (4, 2)}
  for r in rows:
    assert r["correct"] == (r["answer"] == GOLD[r["uid"]])
    total = r["tokens_generated"] + r["tokens_prompted"] + r["tokens_scored"]
    assert r["flops"] == pytest.approx(evaluate.forward_flops(presets.smollm2_135m(), total, r["context"]), rel=1e-4)
    assert r["tokens_generated"] > 0 and r["flops"] > 0
  # Subsampled tokens: the scripted steps are equally long, so n of 4 chains cost n / 4 of the run.
  bon = {r["budget"]: r["tokens_generated"] for r in rows if r["strategy"] == "best_of_n" and r["index"] == 0}
  assert bon[4] == 2 * bon[2] == 4 * bon[1]


def test_subsampled_votes_by_hand(tmp_path):
  s, _ = sweep(tmp_path, config(strategies="best_of_n,weighted_best_of_n,majority"))
  rows = evaluate.read_rows(s.rows_path)
  for r in rows:
    assert r["correct"] == EXPECTED[r["strategy"]][r["budget"]], r
  assert len(rows) == 3 * 3 * 2


def test_subsampling_all_chains_gives_the_searchs_own_vote():
  model = step_model.ScriptedStepModel(script)
  problem = Problem(id=next(iter(GOLD)), question="Q?")
  for rule in ("best", "weighted", "majority"):
    [result] = beam.search(model, [problem], beam.BeamConfig(strategy="best_of_n", n=4, max_depth=3, answer=rule),
                           progress=False)
    chains = evaluate.chains(result, "last")
    assert [c.start for c in chains] == [1, 2, 3, 4]
    assert [c.score for c in chains] == pytest.approx([0.4, 0.9, 0.3, 0.25], rel=1e-6)
    assert evaluate.subsample_answer(chains, 4, rule) == result.answer


def test_a_rerun_adds_nothing_and_calls_no_model(tmp_path):
  s, _ = sweep(tmp_path)
  with open(s.rows_path) as f:
    before = f.read()
  again = evaluate.prepare(config(), str(tmp_path))
  assert again.pending == []
  models = Models()
  again.run(models, presets.smollm2_135m(), progress=False)
  assert models.calls == 0 and models.made == []
  with open(s.rows_path) as f:
    assert f.read() == before
  # Rows lost for one cell: only that search runs again, and only those rows come back.
  rows = before.splitlines()
  kept = [line for line in rows if not (json.loads(line)["strategy"] == "mcts" and json.loads(line)["budget"] == 4)]
  with open(s.rows_path, "w") as f:
    f.write("\n".join(kept) + "\n")
  third = evaluate.prepare(config(), str(tmp_path))
  assert [run.name for run in third.pending] == ["mcts@4"]
  models = Models()
  third.run(models, presets.smollm2_135m(), progress=False)
  assert [strategy for strategy, _ in models.made] == ["mcts"] and models.calls > 0
  assert len(evaluate.read_rows(s.rows_path)) == len(rows)


def test_a_rerun_with_other_search_settings_is_refused(tmp_path):
  evaluate.prepare(config(), str(tmp_path))
  c = config(budgets="1,8")          # another sweep over the same search settings resumes
  evaluate.prepare(c, str(tmp_path))
  c.sampling.temperature = 1.0
  with pytest.raises(ValueError, match=r"sampling.temperature differ"):
    evaluate.prepare(c, str(tmp_path))


def test_wilson_by_hand():
  # 8 of 10, z = 1.96: center (0.8 + 1.96^2 / 20) / (1 + 1.96^2 / 10) = 0.99208 / 1.38416 = 0.716738;
  # half 1.96 sqrt(0.8 * 0.2 / 10 + 1.96^2 / 400) / 1.38416 = 1.96 * 0.160012 / 1.38416 = 0.226581.
  low, high = evaluate.wilson(8, 10)
  assert low == pytest.approx(0.490157, abs=1e-6) and high == pytest.approx(0.943319, abs=1e-6)
  assert evaluate.wilson(0, 0) == (0.0, 1.0)
  assert evaluate.wilson(5, 5)[1] == 1.0


def test_forward_flops_by_hand():
  # SmolLM2-135M: per layer q,k,v,o 576 * 64 * (9 + 3 + 3 + 9) = 884_736, MLP 3 * 576 * 1536 = 2_654_208,
  # two norms 1152: 3_540_096; 30 layers 106_202_880, plus the final norm 576 = 106_203_456 non-embedding
  # parameters (the tied 49152 x 576 table not counted). Attention: 4 * 30 layers * 9 heads * 64 = 69_120 per key.
  per_token = 2 * 106_203_456 + 69_120 * 100
  assert evaluate.forward_flops(presets.smollm2_135m(), 10, 100) == 10 * per_token == 2_193_189_120
  # An untied head is not counted either.
  untied = presets.smollm2_135m(tie_embeddings=False)
  assert evaluate.forward_flops(untied, 1, 0) == 2 * 106_203_456


def test_mean_context_by_hand():
  """A chain "abc" -> "\\boxed{7}" (one token per byte, plus each step's stopping token): step 1's 4 tokens sit at
  0..3 (sum 6), step 2's 10 at 4..13 (sum 10 * 4 + 45 = 85): (6 + 85) / 14 = 6.5."""
  def chain(problem, path, child, meta):
    return step_model.ScriptedStep("abc" if child == 1 else "\\boxed{7}", value=-0.1)
  [result] = beam.search(step_model.ScriptedStepModel(chain), [Problem("p", "Q?")],
                         beam.BeamConfig(strategy="chain", max_depth=3), progress=False)
  assert result.num_nodes == 2
  assert evaluate.mean_context(result) == pytest.approx(6.5)
  assert evaluate.mean_context(result, [1]) == pytest.approx(1.5)


def test_the_report_writes_the_table_and_two_pngs(tmp_path):
  sweep(tmp_path)
  cells = evaluate.report(str(tmp_path))
  table = (tmp_path / "table.md").read_text()
  assert table.count("\n") == 2 + len(cells) == 2 + 1 + 6 * 3
  # best_of_n at 2 on both problems: wrong twice (see EXPECTED); Wilson of 0 / 2 is [0, 0.658].
  assert "| best_of_n | 2 | 0/2 = 0.000 | [0.000, 0.658] |" in table
  for name in ("accuracy_vs_tokens.png", "accuracy_vs_flops.png"):
    data = (tmp_path / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


@pytest.mark.parametrize("field, value, message", [
    ("strategies", "beam,greedy", "eval.strategies has 'greedy'"),
    ("strategies", ",", "eval.strategies=',' is empty"),
    ("budgets", "4,0", "eval.budgets has 0; every budget must be >= 1."),
    ("budgets", "4,x", "eval.budgets has 'x'"),
    ("budgets", "2,6", "beam.beam_width=4 does not divide budget 6"),
    ("probe", -1, "eval.probe=-1 must be >= 0"),
])
def test_bad_values_raise_one_sentence(tmp_path, field, value, message):
  c = config(**{field: value})
  c.beam.beam_width = 4
  with pytest.raises(ValueError) as error:
    evaluate.prepare(c, str(tmp_path))
  text = str(error.value)
  assert message in text and "\n" not in text and text.endswith(".")
  assert not os.path.exists(tmp_path / "config.json")


def test_the_launcher_prints_one_error_line_and_exits_2(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", "launch.evaluate", "--config=configs/smollm2_gsm8k.py",
                           "--config.eval.budgets=1,-2", f"--workdir={tmp_path}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  lines = [line for line in result.stderr.splitlines() if line.strip() and not _LOG_LINE.match(line)]
  assert "Traceback" not in result.stderr and result.returncode == 2, result.stderr
  assert lines == ["error: eval.budgets has -2; every budget must be >= 1."], result.stderr


def test_agreement_and_allocation_by_hand():
  assert evaluate.agreement(["3", "3.0", "5", None]) == 0.5     # "3" and "3.0" are one answer
  assert evaluate.agreement([None, None]) == 0.0
  # Difficulties 0, 0.5, 0.25; probe 4 each, 6 more by D'Hondt: quotients 0.5 (p1), 0.25 vs 0.25 (p1, earlier),
  # 0.25 (p2) vs 0.167, 0.167 (p1), 0.125 vs 0.125 (p1), 0.125 (p2) vs 0.1: p1 +4, p2 +2.
  assert evaluate.allocate([0.0, 0.5, 0.25], 18, 4, 32) == [4, 8, 6]
  # At most 7 each: p1 stops at 7, the rest goes to p2.
  assert evaluate.allocate([0.0, 0.5, 0.25], 18, 4, 7) == [4, 7, 7]
  # No difficulty left below the cap: evenly over the open problems.
  assert evaluate.allocate([0.0, 0.0, 1.0], 9, 2, 3) == [3, 3, 3]
  with pytest.raises(ValueError, match=r"total=5 samples cannot give 3 problems probe=2 each"):
    evaluate.allocate([0.0, 0.0, 0.0], 5, 2, 4)


def test_compute_optimal_by_hand():
  """Problem A: all 4 chains say 1 (easy, right). Problem B: 2, 3, 2, 2 with gold 2 (first 2 disagree).
  Probe 2, budget 3 (6 samples): uniform gives 3 each, B's first 3 -> 2 wins 2-1 (right); adaptive gives
  A 2 and B 4 -> 3 of 4 say 2 (right). Tokens: chain i costs i tokens."""
  def record(answers, gold):
    return dict(gold=gold, chains=[dict(answer=a, score=0.5, tokens=i + 1) for i, a in enumerate(answers)])
  records = [record(["1", "1", "1", "1"], "1"), record(["2", "3", "2", "2"], "2")]
  [c] = evaluate.compute_optimal(records, [1, 2, 3, 8], probe=2, rules=("majority",))
  assert c == dict(rule="majority", budget=3, problems=2, uniform_correct=2, adaptive_correct=2,
                   uniform_tokens=(6 + 6) / 2, adaptive_tokens=(3 + 10) / 2, samples=[2, 4])
  # Problem C: its first 2 agree (easy by the probe) though its later chains do not. 9 samples: B (difficulty
  # 0.5) gets 2 more up to the run's 4, the last one goes evenly to A and C: A, the earlier.
  records.append(record(["4", "4", "5", "6"], "4"))
  [c] = evaluate.compute_optimal(records, [3], probe=2, rules=("majority",))
  assert c["samples"] == [3, 4, 2] and (c["uniform_correct"], c["adaptive_correct"]) == (3, 3)
  records.pop()
  # Budget 2 is the probe itself: nothing to compare; 8 is more than the run's 4 chains.
  records[1] = record(["3", "2", "3", "2"], "2")   # B: a 1-1 tie goes to the first answer, 3 (wrong) ...
  [c] = evaluate.compute_optimal(records, [3], probe=2, rules=("majority",))
  assert (c["uniform_correct"], c["adaptive_correct"]) == (1, 1)   # ... uniform 3, 2, 3: wrong; adaptive 2-2: 3


def test_the_report_compares_uniform_and_adaptive_from_the_runs_chains(tmp_path):
  s, _ = sweep(tmp_path, config(strategies="majority", budgets="1,2,4", probe=1))
  records = evaluate.read_rows(s.chains_path)
  assert [(r["run"], r["index"], len(r["chains"])) for r in records] == [("best_of_n@4", 0, 4), ("best_of_n@4", 1, 4)]
  # A rerun that searches again (the rows of majority@2 lost) adds no second record of the same run.
  with open(s.rows_path) as f:
    kept = [line for line in f if json.loads(line)["budget"] != 2]
  with open(s.rows_path, "w") as f:
    f.writelines(kept)
  _, models = sweep(tmp_path, config(strategies="majority", budgets="1,2,4", probe=1))
  assert models.calls > 0 and len(evaluate.read_rows(s.chains_path)) == 2
  assert len(evaluate.read_rows(s.rows_path)) == 6
  evaluate.report(str(tmp_path), probe=1)
  text = (tmp_path / "compute_optimal.md").read_text()
  # Uniform at b samples is majority@b of rows.jsonl: 2/2 at 2 and 4 (EXPECTED); every probe (chain 1) agrees
  # with itself, so the allocation is even and adaptive is uniform.
  assert "| majority | 2 | 2/2 [0.342, 1.000] | 2/2 [0.342, 1.000] |" in text
  assert "| majority | 4 | 2/2 [0.342, 1.000] | 2/2 [0.342, 1.000] |" in text


def _write_rows(workdir, rows):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "rows.jsonl"), "w") as f:
    for strategy, budget, index, correct, tokens in rows:
      f.write(json.dumps(dict(strategy=strategy, budget=budget, index=index, correct=correct,
                              tokens_generated=tokens, flops=1e9 * tokens)) + "\n")


def test_compare_puts_two_sweeps_side_by_side(tmp_path):
  # before: mcts@2 1 of 2 right (100 and 300 tokens), chain 0 of 2; after: mcts@2 2 of 2 and best_of_n@4.
  _write_rows(tmp_path / "a", [("mcts", 2, 0, True, 100), ("mcts", 2, 1, False, 300), ("chain", 1, 0, False, 10),
                               ("chain", 1, 1, False, 30)])
  _write_rows(tmp_path / "b", [("mcts", 2, 0, True, 200), ("mcts", 2, 1, True, 200), ("best_of_n", 4, 0, True, 50),
                               ("mcts", 2, 2, True, 900)])   # problem 2: not in "a", left out of mcts@2
  groups = evaluate.compare({"before": str(tmp_path / "a"), "after": str(tmp_path / "b")}, str(tmp_path / "out"))
  assert list(groups) == ["before", "after"]
  lines = (tmp_path / "out" / "compare.md").read_text().splitlines()
  assert lines[0] == ("| strategy | budget | before: accuracy [95%], tokens / problem | after: accuracy [95%], "
                      "tokens / problem |")
  # Cells in REPORT_ORDER; Wilson of 1 / 2 is [0.095, 0.905], of 2 / 2 [0.342, 1.000], of 1 / 1 [0.207, 1.000].
  assert lines[2:] == ["| chain | 1 | 0/2 [0.000, 0.658], 20 |  |",
                       "| best_of_n | 4 |  | 1/1 [0.207, 1.000], 50 |",
                       "| mcts | 2 | 1/2 [0.095, 0.905], 200 | 2/2 [0.342, 1.000], 200 |"]
  for name in ("compare_vs_tokens.png", "compare_vs_flops.png"):
    data = (tmp_path / "out" / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
  with pytest.raises(ValueError, match=r"has no rows.jsonl rows to compare\.$"):
    evaluate.compare({"before": str(tmp_path / "a"), "none": str(tmp_path / "missing")}, str(tmp_path / "out"))


@pytest.mark.parametrize("value, message", [
    ("before:runs/a", "names 1 sweep; expected at least two label:workdir items."),
    ("before:runs/a,runs/b", "--compare has 'runs/b'; expected label:workdir items"),
    ("x:runs/a,x:runs/b", "names the label 'x' twice"),
    ("before:runs/a,after:", "--compare has 'after:'"),
])
def test_bad_compare_values_raise_one_sentence(value, message):
  with pytest.raises(ValueError) as error:
    evaluate.parse_compare(value)
  assert message in str(error.value) and str(error.value).endswith(".")
  assert evaluate.parse_compare("before:runs/a, after:runs/b") == {"before": "runs/a", "after": "runs/b"}


def test_the_uniform_vote_breaks_ties_in_leaf_order_as_the_rows_do():
  # Chains 1 and 2 tie 1-1 under majority; chain 2 ended first (the smaller leaf id), so its answer wins, as
  # subsample_answer and beam.search choose; without leaf ids the sampling order decides.
  record = dict(gold="5", chains=[dict(answer="4", score=0.9, tokens=10, leaf=7),
                                  dict(answer="5", score=0.1, tokens=30, leaf=3)])
  assert evaluate._vote(record, 2, "majority") == (True, 40)
  for c in record["chains"]:
    del c["leaf"]
  assert evaluate._vote(record, 2, "majority") == (False, 40)
