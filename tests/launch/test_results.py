"""launch/results.sh, README's Results command: the round, the two sweeps and the comparison, in that order, with
the round's adapter in the second sweep; a rerun trains no second round (a stub python records the commands)."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STUB = """#!/usr/bin/env bash
echo "$*" >> "$LOG"
if [ "$2" = launch.train ]; then
  dir=${!#}; dir=${dir#--workdir=}; mkdir -p "$dir"; touch "$dir/adapter.safetensors"
fi
"""


def run(tmp_path, **env):
  stub = tmp_path / "python"
  stub.write_text(STUB)
  stub.chmod(0o755)
  log = tmp_path / "log"
  result = subprocess.run(["bash", "launch/results.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": str(stub), "LOG": str(log), "OUT": str(tmp_path / "o"),
                               **env})
  assert result.returncode == 0, result.stderr
  return log.read_text().splitlines()


def test_the_round_then_both_sweeps_then_the_comparison(tmp_path):
  out = tmp_path / "o"
  first = run(tmp_path, PROBLEMS="8", BUDGETS="1,2")
  assert [line.split()[1] for line in first] == ["launch.train", "launch.evaluate", "launch.evaluate",
                                                 "launch.evaluate"]
  assert f"--workdir={out}/selfplay_round1" in first[0].split() and "--config.rounds=1" in first[0].split()
  before, after, compare = (line.split() for line in first[1:])
  for sweep in (before, after):
    assert "--config.num_problems=8" in sweep and "--config.eval.budgets=1,2" in sweep
  assert f"--workdir={out}/eval_before" in before and not any(a.startswith("--config.model.adapter") for a in before)
  assert f"--config.model.adapter={out}/selfplay_round1/adapter.safetensors" in after
  assert compare[2:] == [f"--compare=before:{out}/eval_before,after:{out}/eval_after",
                         f"--workdir={out}/eval_compare"]
  again = run(tmp_path)   # the adapter is there: no second round
  assert [line.split()[1] for line in again[4:]] == ["launch.evaluate"] * 3
