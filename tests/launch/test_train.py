"""Self-play rounds end to end on a tiny model: metrics, checkpoints, a SIGKILL in the middle of a round and a resume
that ends where an uninterrupted run ends, and bad inputs refused in one sentence."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import smollm2_selfplay
from o1jax import checkpoint, pretrained, selfplay

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")

TINY = """
    c.model.adapter = ""
    c.lora.rank, c.lora.alpha = 2, 4.0
    c.data.problems_per_round = 2
    c.rounds = 2
    c.mcts.num_simulations = 2
    c.sampling.max_new_tokens = 8
    c.sampling.max_rows = 8
    c.experience.seq_len = 384
    c.learner.batch_size = 8
    c.learner.accumulate = 1
    c.learner.steps_per_round = 2
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 1
"""


def tiny_config(model_dir):
  c = smollm2_selfplay.get_config()
  c.model.path = model_dir
  exec(textwrap.dedent(TINY), {"c": c})
  return c


def config_file(tmp_path, model_dir):
  path = tmp_path / "tiny_selfplay.py"
  path.write_text("from configs import smollm2_selfplay\n\n\ndef get_config():\n  c = smollm2_selfplay.get_config()\n"
                  f"  c.model.path = {model_dir!r}\n" + textwrap.indent(textwrap.dedent(TINY), "  ") + "  return c\n")
  return str(path)


def launch(*args, env=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def test_two_rounds_write_metrics_checkpoints_and_resume(tmp_path, tiny_smollm2_checkpoint):
  workdir = str(tmp_path / "run")
  job = selfplay.prepare(tiny_config(tiny_smollm2_checkpoint), workdir)
  assert job.round == 0
  last = job.run(progress=False)
  assert last["round"] == 1 and 0 <= last["solve_rate"] <= 1 and last["rows"] > 0
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and "ratio_mean" in r and "clip_fraction" in r and "value_accuracy" in r
             for r in train)
  assert [r["round"] for r in rows if r["split"] == "round"] == [0, 1]
  assert sorted(os.listdir(os.path.join(workdir, "trees"))) == ["round_0", "round_1"]
  # The trained adapter loads as the search's model: its merged weights are the learner's.
  trained = pretrained.load(tiny_smollm2_checkpoint, adapter=os.path.join(workdir, "adapter.safetensors"),
                            dtype="float32")
  merged = job.model.merged(job.frozen, job.state["trainable"])
  np.testing.assert_allclose(np.asarray(trained.model.weights()["layers"]["q"]), np.asarray(merged["layers"]["q"]),
                             atol=1e-6)
  again = selfplay.prepare(tiny_config(tiny_smollm2_checkpoint), workdir)
  assert again.round == 2 and int(again.state["step"]) == 4 and len(again.replay) == len(job.replay)
  np.testing.assert_array_equal(again.replay.state()["priorities"], job.replay.state()["priorities"])
  again.checkpointer.close()


def test_a_sigkill_in_the_middle_of_a_round_resumes_to_the_uninterrupted_state(tmp_path, tiny_smollm2_checkpoint):
  config = config_file(tmp_path, tiny_smollm2_checkpoint)
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  assert launch(f"--config={config}", f"--workdir={straight}").returncode == 0
  crashed = launch(f"--config={config}", f"--workdir={killed}", env={"O1JAX_CRASH_AT": "after_search:1"})
  assert crashed.returncode == -9   # SIGKILL after round 1's search, before its learner steps and checkpoint
  with checkpoint.Checkpointer(os.path.join(killed, "checkpoints"), read_only=True) as ckpt:
    assert ckpt.all_steps() == [1]
  resumed = launch(f"--config={config}", f"--workdir={killed}")
  assert resumed.returncode == 0, resumed.stderr
  a = selfplay.prepare(tiny_config(tiny_smollm2_checkpoint), straight)
  b = selfplay.prepare(tiny_config(tiny_smollm2_checkpoint), killed)
  assert a.round == b.round == 2 and int(a.state["step"]) == int(b.state["step"]) == 4
  for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for name, array in a.replay.state().items():
    np.testing.assert_array_equal(array, b.replay.state()[name], err_msg=name)
  a.checkpointer.close()
  b.checkpointer.close()


def error_line(result):
  lines = [line for line in result.stderr.splitlines() if line.strip() and not _LOG_LINE.match(line)]
  assert "Traceback" not in result.stderr and result.returncode == 2, result.stderr
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  return lines[0]


def test_bad_inputs(tmp_path, tiny_smollm2_checkpoint):
  config = config_file(tmp_path, tiny_smollm2_checkpoint)
  line = error_line(launch(f"--config={config}", "--config.learner.batch_size=6", f"--workdir={tmp_path}/a"))
  assert "learner.batch_size=6 does not split" in line and "8 batch shards" in line
  missing = str(tmp_path / "missing.safetensors")
  assert missing in error_line(launch(f"--config={config}", f"--config.model.adapter={missing}",
                                      f"--workdir={tmp_path}/a"))
  line = error_line(launch(f"--config={config}", "--coordinator=localhost:1234", f"--workdir={tmp_path}/a"))
  assert "needs num_processes and process_id" in line
  # A damaged checkpoint: one sentence naming it, and nothing is written over it.
  workdir = str(tmp_path / "b")
  job = selfplay.prepare(tiny_config(tiny_smollm2_checkpoint), workdir)
  job.config.rounds = 1
  job.run(progress=False)
  step_dir = os.path.join(workdir, "checkpoints", "1")
  for root, _, files in os.walk(step_dir):
    for name in files:
      if name.endswith(".json") or "manifest" in name:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"\x00garbage")
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  line = error_line(launch(f"--config={config}", f"--workdir={workdir}"))
  assert "checkpoint" in line and "corrupt" in line and workdir in line
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_a_nan_loss_stops_before_its_checkpoint(tmp_path, tiny_smollm2_checkpoint, monkeypatch):
  """Also runs the KL term's path: with kl_coef > 0 the round's learner step gets the run's starting weights as
  its reference policy (a separate copy: the step donates the state's buffers)."""
  workdir = str(tmp_path / "nan")
  config = tiny_config(tiny_smollm2_checkpoint)
  config.learner.kl_coef = 0.1
  job = selfplay.prepare(config, workdir)
  for a, b in zip(jax.tree.leaves(job.reference), jax.tree.leaves(job.state["trainable"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  step = job.learner.step
  seen = []

  def poisoned(frozen, state, batch, reference=None):
    state, per_row, metrics = step(frozen, state, batch, reference)
    seen.append(float(metrics["kl"]))
    return state, per_row, dict(metrics, loss=np.float32("nan"))
  monkeypatch.setattr(job.learner, "step", poisoned)
  with pytest.raises(FloatingPointError, match=r"learner loss is nan at step 1 \(round 0\).*holds the last good"):
    job.run(progress=False)
  assert seen and abs(seen[0]) < 1e-6   # the first step's policy is its reference
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as ckpt:
    assert ckpt.all_steps() == []
