"""The main job: results.jsonl and trees/ from a scripted model and from the real SmolLM2, resuming, and bad
configs refused with one sentence before any model is loaded."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import smollm2_gsm8k
from o1jax import thoughts
from o1jax.search import solve, step_model
from o1jax.search import tree as tree_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")
KEYS = {"question", "gold", "answer", "correct", "nodes", "tokens"}


def config(**overrides):
  c = smollm2_gsm8k.get_config()
  c.num_problems = 3
  c.mcts.num_simulations = 2
  for key, value in overrides.items():
    target = c
    *parents, name = key.split(".")
    for p in parents:
      target = target[p]
    target[name] = value
  return c


def script(problem, path, child, meta):
  if child % 2 == 0:
    return step_model.ScriptedStep(f"So the answer is \\boxed{{{child}}}.", value=-0.05 * child)
  return step_model.ScriptedStep(f"Step {child}.", value=-0.2 * child)


def check_workdir(workdir, indices):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "results.jsonl"))]
  assert [r["index"] for r in rows] == indices and all(KEYS <= set(r) for r in rows)
  for r in rows:
    text = open(os.path.join(workdir, "trees", f"{r['index']}.txt")).read()
    nodes = thoughts.parse(text.rstrip("\n"))
    record = json.load(open(os.path.join(workdir, "trees", f"{r['index']}.json")))
    tree, texts = tree_lib.from_json(record)
    assert len(nodes) == int(tree.num_nodes[0]) == r["nodes"] + 1
    assert [n.text for n in nodes] == texts and texts[0] == r["question"]
    assert record["answer"] == r["answer"]
  return rows


def test_job_writes_results_and_trees_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  job = solve.prepare(config(), workdir)
  assert [i for i, _ in job.problems] == [0, 1, 2]
  summary = job.run(step_model.ScriptedStepModel(script), progress=False)
  rows = check_workdir(workdir, [0, 1, 2])
  assert summary["problems"] == 3 and rows[0]["answer"] == "2"   # max reward: node 2 (-0.1) beats 1, 3, 4
  # A rerun skips what is done; more problems only adds the new ones.
  assert solve.prepare(config(), workdir).problems == []
  job = solve.prepare(config(num_problems=5, batch_size=1), workdir)
  assert [i for i, _ in job.problems] == [3, 4]
  job.run(step_model.ScriptedStepModel(script), progress=False)
  check_workdir(workdir, [0, 1, 2, 3, 4])
  with pytest.raises(ValueError, match="holds a run with another config .*strategy"):
    solve.prepare(config(strategy="beam"), workdir)


@pytest.mark.parametrize("strategy", ["beam", "dvts", "best_of_n", "weighted_best_of_n", "majority", "chain"])
def test_every_strategy_runs_through_the_job(tmp_path, strategy):
  job = solve.prepare(config(strategy=strategy, **{"beam.n": 4, "beam.beam_width": 2, "beam.max_depth": 3}),
                      str(tmp_path))
  job.run(step_model.ScriptedStepModel(script), progress=False)
  rows = check_workdir(str(tmp_path), [0, 1, 2])
  assert {r["strategy"] for r in rows} == {strategy}


def test_evaluation_never_sees_the_answer(tmp_path):
  seen = []

  class Spy(step_model.ScriptedStepModel):
    def expand(self, requests):
      seen.extend(requests)
      return super().expand(requests)
  solve.prepare(config(), str(tmp_path)).run(Spy(script), progress=False)
  golds = {"18", "3", "70000"}
  assert seen and not any(g in h for r in seen for h in r.hints for g in golds)


@pytest.mark.parametrize("overrides, message", [
    ({"strategy": "greedy"}, "strategy='greedy' is unknown; expected one of"),
    ({"mcts.num_simulations": -1}, "num_simulations=-1 must be >= 1"),
    ({"mcts.children_per_expansion": 6}, "children_per_expansion=6 is more than max_children=5"),
    ({"mcts.node_budget": 4}, "node_budget=4 is too small for 2 simulations"),
    ({"sampling.temperature": -0.5}, "temperature=-0.5 must be >= 0"),
    ({"sampling.rating_context": "both"}, "rating_context='both'"),
    ({"beam.n": 6, "strategy": "beam"}, "n=6 is not a multiple of beam_width=4"),
    ({"num_problems": 0}, "num_problems=0 must be >= 1"),
    ({"mcts.ground_truth_hint": True}, "ground_truth_hint puts the answer in the policy prompt"),
])
def test_bad_config_values(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    solve.prepare(config(**overrides), str(tmp_path))


def _launch(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", "launch.solve", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  lines = [line for line in result.stderr.splitlines() if line.strip() and not _LOG_LINE.match(line)]
  assert "Traceback" not in result.stderr and result.returncode == 2, result.stderr
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  return lines[0]


def test_the_launcher_prints_one_sentence_and_exits_2(tmp_path):
  workdir = f"--workdir={tmp_path}"
  assert "num_simulations=-1 must be >= 1" in _launch("--config.mcts.num_simulations=-1", workdir)
  corrupt = tmp_path / "corrupt.safetensors"
  corrupt.write_bytes(bytes(range(256)) * 8)
  line = _launch(f"--config.model.adapter={corrupt}", "--config.num_problems=1", workdir)
  assert str(corrupt) in line


def test_real_smollm2_searches_two_gsm8k_problems(tmp_path):
  """The packaged SmolLM2 with the committed adapter, end to end: MCTS on 2 GSM8K problems, 2 simulations."""
  c = config(num_problems=2)
  job = solve.prepare(c, str(tmp_path))
  model = solve.load_step_model(c)
  job.run(model, progress=False)
  rows = check_workdir(str(tmp_path), [0, 1])
  assert all(r["nodes"] == 4 and r["tokens"] > 0 for r in rows)   # 2 simulations x 2 children
  record = json.load(open(os.path.join(tmp_path, "trees", "0.json")))
  reloaded, _ = tree_lib.from_json(record)
  steps = [n for n in record["nodes"][1:]]
  assert all(-20 < n["rating"] <= 0 and n["tokens"] for n in steps)
  assert all(model.tokenizer.decode(n["tokens"]) == n["text"] for n in steps)
  np.testing.assert_array_equal(reloaded.length[0, 1:5], [len(n["tokens"]) for n in steps])
  assert dataclasses.asdict(reloaded).keys() == dataclasses.asdict(tree_lib.empty(1, 1, 1, 1)).keys()
