"""The shared training loop: resume at the right step and batch, metrics rows, a stop at a NaN loss that leaves the
checkpoints alone, and writes from process 0 only."""

import json
import math
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o1jax import checkpoint
from o1jax.data import pipeline
from o1jax.learn import loop

_DATA = grain.MapDataset.range(100).map(lambda i: {"x": np.float32(i)})   # batch i is {"x": i}


def _state():
  return {"total": jnp.zeros((), jnp.float32), "steps": jnp.zeros((), jnp.int32)}


class _Stepper:
  """step_fn: adds the batch to the total and reports it as the loss (NaN or inf at the steps in `bad`); records
  the batches it saw."""

  def __init__(self, bad: dict[int, float] | None = None):
    self.seen: list[float] = []
    self.bad = bad or {}

  def __call__(self, state, batch):
    self.seen.append(float(batch["x"]))
    step = int(state["steps"]) + 1
    loss = jnp.float32(self.bad.get(step, batch["x"]))
    state = {"total": state["total"] + batch["x"], "steps": state["steps"] + 1}
    return state, {"loss": loss, "double": 2 * loss}


def _run(workdir, step_fn, *, steps, save_every=3, **kwargs):
  """Resumes from workdir/checkpoints (if any) and runs to `steps`; returns (state, last row, resumed)."""
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=save_every, keep=10) as ckpt:
    data = pipeline.iterator(_DATA)
    resumed = loop.resume(ckpt, _state(), data)
    state, last = loop.run(step_fn, resumed.state, data, start=resumed.step, steps=steps, workdir=workdir,
                           checkpointer=ckpt, metadata={"run": "test"}, **kwargs)
  return state, last, resumed


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_resume_continues_at_the_right_step_with_the_right_data(tmp_path):
  """Run 6 steps (checkpoints 3 and 6); drop step 6 (a run killed after step 3's save); the rerun restores step
  3's state and data position, sees batches 3, 4, 5 again and ends in the same state."""
  workdir = str(tmp_path / "run")
  first = _Stepper()
  state, _, resumed = _run(workdir, first, steps=6)
  assert resumed.step == 0 and resumed.metadata is None
  assert first.seen == [0, 1, 2, 3, 4, 5] and float(state["total"]) == 15
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as ckpt:
    assert ckpt.all_steps() == [3, 6]

  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  second = _Stepper()
  again, _, resumed = _run(workdir, second, steps=6)
  assert resumed.step == 3 and resumed.metadata == {"step": 3, "run": "test"}
  assert float(resumed.state["total"]) == 0 + 1 + 2 and int(resumed.state["steps"]) == 3
  assert second.seen == [3, 4, 5]
  assert float(again["total"]) == 15 and int(again["steps"]) == 6
  # A finished run resumes at its end and runs nothing.
  third = _Stepper()
  _, last, resumed = _run(workdir, third, steps=6)
  assert resumed.step == 6 and third.seen == [] and last == {}


def test_metrics_rows(tmp_path):
  """A train row every log_every steps (and after the last) with the window's means, an eval row after each
  evaluation; TensorBoard events beside them."""
  workdir = str(tmp_path / "run")
  evaluated = []

  def evaluate(state):
    evaluated.append(int(state["steps"]))
    return {"score": float(state["total"])}

  _, last, _ = _run(workdir, _Stepper(), steps=5, log_every=2, evaluate=evaluate, eval_every=4)
  assert _rows(workdir) == [
      {"step": 2, "split": "train", "loss": 0.5, "double": 1.0},
      {"step": 4, "split": "train", "loss": 2.5, "double": 5.0},
      {"step": 4, "split": "eval", "score": 6.0},
      {"step": 5, "split": "train", "loss": 4.0, "double": 8.0},
      {"step": 5, "split": "eval", "score": 10.0},
  ]
  assert evaluated == [4, 5] and last == {"loss": 4.0, "double": 8.0}
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))

  # A custom summary sees each window's host metrics and the step that closes it.
  windows = []
  summarize = lambda window, step: windows.append((step, [m["loss"] for m in window])) or {"n": len(window)}
  _run(str(tmp_path / "other"), _Stepper(), steps=3, log_every=2, summarize=summarize)
  assert windows == [(2, [0.0, 1.0]), (3, [2.0])]
  assert [row["n"] for row in _rows(str(tmp_path / "other"))] == [2, 1]


def _files(directory):
  """Every file under `directory` with its bytes."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
  return out


@pytest.mark.parametrize("bad, log_every", [(math.nan, 1), (math.inf, 1), (math.nan, 10)],
                         ids=["nan", "inf", "nan_seen_at_the_save"])
def test_non_finite_loss_stops_and_leaves_the_checkpoints(tmp_path, bad, log_every):
  """4 good steps (checkpoints 2 and 4), then a run on to 8 whose step 6 has a NaN (or inf) loss: it stops with
  one sentence naming the step, before step 6 is checkpointed (also when no train row is due at step 6, so the
  loss is first fetched for the save), and every checkpoint file is as it was."""
  workdir = str(tmp_path / "run")
  _run(workdir, _Stepper(), steps=4, save_every=2)
  before = _files(os.path.join(workdir, "checkpoints"))
  rows_before = _rows(workdir)
  assert before and [r["step"] for r in rows_before] == [1, 2, 3, 4]

  stepper = _Stepper(bad={6: bad, 7: bad})
  with pytest.raises(FloatingPointError) as error:
    _run(workdir, stepper, steps=8, save_every=2, log_every=log_every)
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  assert str(error.value) == (f"train loss is {bad} at step 6; the run stopped before checkpointing it, and "
                              f"checkpoint step 4 in {directory!r} holds the last good state.")
  assert stepper.seen == [4, 5]
  assert _files(os.path.join(workdir, "checkpoints")) == before
  assert [r["step"] for r in _rows(workdir)] == [1, 2, 3, 4] + ([5] if log_every == 1 else [])
  # The next run resumes from step 4.
  state, _, resumed = _run(workdir, _Stepper(), steps=6, save_every=2)
  assert resumed.step == 4 and float(state["total"]) == 15


def test_non_finite_loss_before_any_checkpoint(tmp_path):
  with pytest.raises(FloatingPointError, match=r"^train loss is nan at step 1; the run stopped before "
                                               r"checkpointing it, and no checkpoint was written before it\.$"):
    _run(str(tmp_path / "run"), _Stepper(bad={1: math.nan}), steps=4)
  assert not os.listdir(tmp_path / "run" / "checkpoints")


class _RecordingCheckpointer:
  """Stands in for checkpoint.Checkpointer: records the saves (orbax itself would coordinate real processes)."""

  directory = "/nowhere"
  save_every = 2

  def __init__(self):
    self.saves = []

  def latest_step(self):
    return None

  def save(self, step, state, *, data_state=None, metadata=None, force=False):
    self.saves.append((step, float(state["total"]), data_state, metadata, force))
    return True

  def wait(self):
    pass


@pytest.mark.parametrize("process", [0, 1])
def test_only_process_0_writes(tmp_path, monkeypatch, capsys, process):
  """Process 0 writes metrics.jsonl and TensorBoard events and shows the bar; any other process writes neither,
  and every process still checkpoints (each writes its own shards)."""
  monkeypatch.setattr(jax, "process_index", lambda: process)
  workdir = str(tmp_path)
  ckpt = _RecordingCheckpointer()
  loop.run(_Stepper(), _state(), pipeline.iterator(_DATA), start=0, steps=5, workdir=workdir, checkpointer=ckpt,
           desc="loop-under-test")
  assert [save[:2] for save in ckpt.saves] == [(2, 1.0), (4, 6.0), (5, 10.0)]
  assert ckpt.saves[-1][2:] == ({"next_index": 5}, {"step": 5}, True)
  written = sorted(os.listdir(workdir))
  bar = "loop-under-test" in capsys.readouterr().err
  if process == 0:
    assert written == ["metrics.jsonl", "tensorboard"] and bar
  else:
    assert written == [] and not bar
    assert not loop.is_writer()


def test_run_errors(tmp_path):
  workdir = str(tmp_path / "run")
  _run(workdir, _Stepper(), steps=3)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=3) as ckpt:
    with pytest.raises(ValueError) as error:
      loop.run(_Stepper(), _state(), pipeline.iterator(_DATA), start=0, steps=6, workdir=workdir,
               checkpointer=ckpt)
  assert str(error.value) == (f"run starts at step 0, but {ckpt.directory!r} holds checkpoint step 3; start from "
                              "loop.resume's state and step.")
  with pytest.raises(ValueError, match=r"finite names metric 'grad_norm', which step_fn does not return; it "
                                       r"returns \['double', 'loss'\]"):
    _run(str(tmp_path / "other"), _Stepper(), steps=2, finite=("loss", "grad_norm"))
  with pytest.raises(ValueError, match="eval_every=None; evaluate needs a positive number of steps"):
    _run(str(tmp_path / "third"), _Stepper(), steps=2, evaluate=lambda state: {})
