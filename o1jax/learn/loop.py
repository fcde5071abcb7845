"""The training loop every learner shares: resume, step, log, evaluate, checkpoint, with a progress bar.

No shape legend of its own: the state, the batches and the metrics are whatever the learner's step function
takes and returns. The loop asks only this of them:

  step_fn(state, batch) -> (state, metrics)    metrics: {name: scalar array}, e.g. {"loss": [], "grad_norm": []}
  evaluate(state) -> {name: float}              optional, every `eval_every` steps and after the last one

A run, from a fresh start or from its latest checkpoint (format pretraining's `o1jax.learn.pretrain.train` is
one):

  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=100, keep=3)
  batches = pipeline.iterator(dataset)
  state, start, _ = loop.resume(checkpointer, state, batches)    # the latest step's state and data position
  state, last = loop.run(step_fn, state, batches, start=start, steps=1000, workdir=workdir,
                         checkpointer=checkpointer, log_every=10, evaluate=evaluate, eval_every=100)
  checkpointer.close()

What the loop does for the learner:
  - checkpoints: every `checkpointer.save_every` steps and after the last one, the state together with the data
    iterator's position (a grain iterator's; any other iterator's position is not saved) and JSON metadata
    ({"step": n} plus the caller's), so that `resume` continues at the same step with the same next batch;
  - metrics: every `log_every` steps one "train" row (the window's metrics summarised, by default their means)
    and after each evaluation an "eval" row, as TensorBoard scalars (<workdir>/tensorboard) and as JSON lines
    (<workdir>/metrics.jsonl, {"step": n, "split": "train" | "eval", **metrics}, appended across restarts);
  - a stop at the first non-finite loss: the metrics named in `finite` are checked for every step before any
    checkpoint that includes it is written, and the run ends with a FloatingPointError naming the metric and
    the step, the last checkpoint untouched;
  - process 0 alone writes metrics and shows the bar (`jax.process_index() == 0`); every process steps,
    evaluates and checkpoints (orbax has each write its own shards).

Metrics stay on the device between log and checkpoint steps: fetching them every step would make the host wait
for each step before dispatching the next.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import numpy as np
import tqdm

from o1jax import checkpoint
from o1jax.data import pipeline

State = Any
Metrics = dict[str, float]


def is_writer() -> bool:
  """Whether this process writes files (metrics, adapters, configs): process 0 of a multi-host job."""
  return jax.process_index() == 0


class MetricsWriter:
  """TensorBoard scalars plus one JSON object per line in metrics.jsonl, written by process 0 only.

  Rows are {"step": step, "split": split, **metrics} and the file is appended to, so a resumed run continues
  it. On any other process every call does nothing (and no file is opened).
  """

  def __init__(self, workdir: str):
    self._writer = self._jsonl = None
    if is_writer():
      import tensorboardX  # only where it writes: the import takes seconds
      self._writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if self._jsonl is None:
      return
    for name, value in metrics.items():
      self._writer.add_scalar(f"{split}/{name}", value, step)
    self._jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._writer.close()
      self._jsonl.close()
      self._writer = self._jsonl = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Resumed(NamedTuple):
  """What `resume` found: the state to continue from, its step (0 for a fresh run) and the step's metadata."""

  state: State
  step: int
  metadata: dict | None


def _has_position(data_iter: Iterator) -> bool:
  """Whether the iterator's position can be saved and restored (a grain DatasetIterator's can)."""
  return hasattr(data_iter, "get_state") and hasattr(data_iter, "set_state")


def resume(checkpointer: checkpoint.Checkpointer, state: State, data_iter: Iterator | None = None) -> Resumed:
  """The latest checkpoint's state (and data position, moved into `data_iter`), or `state` itself at step 0.

  Args:
    checkpointer: the run's checkpoint directory.
    state: the fresh state; its arrays say how the restored ones are placed (sharding, dtype).
    data_iter: the fresh data iterator (over a dataset built as in the checkpointed run), or None.

  Raises:
    ValueError: a damaged checkpoint, one that does not match `state`, or one without the data position
      `data_iter` needs (from `Checkpointer.restore` and `pipeline.set_state`).
  """
  step = checkpointer.latest_step()
  if step is None:
    return Resumed(state, 0, None)
  state, data_state, metadata = checkpointer.restore(step, target=state)
  if data_iter is not None and _has_position(data_iter):
    if data_state is None:
      raise ValueError(f"checkpoint step {step} in {checkpointer.directory!r} holds no data iterator position; "
                       "expected one saved by loop.run with this iterator.")
    pipeline.set_state(data_iter, data_state)
  return Resumed(state, step, metadata)


def mean_metrics(window: Sequence[Metrics], step: int) -> Metrics:
  """The default summary of a log window: each metric's mean over the window's steps."""
  del step
  return {name: float(np.mean([m[name] for m in window])) for name in window[0]}


def run(step_fn: Callable[[State, Any], tuple[State, Mapping[str, Any]]], state: State, data_iter: Iterator, *,
        start: int, steps: int, workdir: str, checkpointer: checkpoint.Checkpointer, log_every: int = 1,
        summarize: Callable[[Sequence[Metrics], int], Metrics] = mean_metrics,
        evaluate: Callable[[State], Metrics] | None = None, eval_every: int | None = None,
        finite: Sequence[str] = ("loss",), metadata: Mapping[str, Any] | None = None, desc: str = "train",
        postfix: Sequence[str] = ("loss",)) -> tuple[State, Metrics]:
  """Runs steps start+1 .. steps, logging, evaluating and checkpointing on the way (see the module docstring).

  Args:
    step_fn: (state, batch) -> (state, metrics), typically a jitted step that donates the state.
    state: the state after `start` steps (from `resume`).
    data_iter: the batches, positioned after `start` steps (from `resume`).
    start: the steps already done: `resume`'s step, which must be the checkpointer's latest step (0 if none).
    steps: the run's total number of steps.
    workdir: where metrics.jsonl and tensorboard/ go.
    checkpointer: saves every `checkpointer.save_every` steps and after the last step; the caller closes it.
    log_every: steps per "train" row.
    summarize: (window of host metrics, step) -> the "train" row; by default each metric's mean.
    evaluate: state -> "eval" row, every `eval_every` steps and after the last step; None for no evaluation.
    eval_every: steps between evaluations (required with `evaluate`).
    finite: metrics that must be finite at every step (e.g. "loss", "grad_norm"); the run stops at the first
      that is not, before checkpointing that step.
    metadata: JSON fields saved with every checkpoint besides {"step": n}.
    desc, postfix: the progress bar's label and the train-row metrics it shows.

  Returns:
    (state after `steps` steps, the last "train" row; {} when there was nothing left to run).

  Raises:
    FloatingPointError: a `finite` metric is NaN or infinite; names it and the step, and the checkpoint that
      holds the last good state.
  """
  if log_every < 1:
    raise ValueError(f"log_every={log_every}; expected a positive number of steps.")
  if evaluate is not None and (eval_every is None or eval_every < 1):
    raise ValueError(f"eval_every={eval_every}; evaluate needs a positive number of steps between evaluations.")
  latest = checkpointer.latest_step() or 0
  if start != latest:
    raise ValueError(f"run starts at step {start}, but {checkpointer.directory!r} holds checkpoint step {latest}; "
                     "start from loop.resume's state and step.")
  extra = dict(metadata or {})
  if "step" in extra:
    raise ValueError("checkpoint metadata field 'step' is the loop's own; pass the other fields only.")
  writer = is_writer()
  log = MetricsWriter(workdir)
  bar = tqdm.tqdm(range(start, steps), initial=start, total=steps, desc=desc, unit="step", dynamic_ncols=True,
                  disable=not writer)
  pending: list[tuple[int, Mapping[str, Any]]] = []  # (step, device metrics) not yet on the host
  window: list[Metrics] = []                         # host metrics since the last train row
  last: Metrics = {}
  try:
    for step in bar:
      state, metrics = step_fn(state, next(data_iter))
      done = step + 1
      pending.append((done, metrics))
      final = done == steps
      log_due = done % log_every == 0 or final
      save_due = done % checkpointer.save_every == 0 or final
      if log_due or save_due:
        window.extend(_fetch(pending, finite, checkpointer))
        pending = []
      if log_due:
        last = summarize(window, done)
        window = []
        log.write(done, "train", last)
        bar.set_postfix({name: f"{last[name]:.3f}" for name in postfix if name in last})
      if evaluate is not None and (done % eval_every == 0 or final):
        log.write(done, "eval", evaluate(state))
      if save_due:
        data_state = pipeline.get_state(data_iter) if _has_position(data_iter) else None
        # Save a host copy (np.array copies): the next step donates the state's buffers and may overwrite them
        # while the checkpoint is still being written in the background; on CPU a device_get can be a view of them.
        checkpointer.save(done, jax.tree.map(np.array, state), data_state=data_state,
                          metadata={"step": done, **extra}, force=final)
  finally:
    bar.close()
    log.close()
    checkpointer.wait()  # a save in flight (the last good one, after a failure) finishes on disk
  return state, last


def _fetch(pending: Sequence[tuple[int, Mapping[str, Any]]], finite: Sequence[str],
           checkpointer: checkpoint.Checkpointer) -> list[Metrics]:
  """The pending steps' metrics as host floats, after checking that the `finite` ones are finite."""
  rows = []
  for (step, _), metrics in zip(pending, jax.device_get([m for _, m in pending])):
    row = {name: float(value) for name, value in metrics.items()}
    for name in finite:
      if name not in row:
        raise ValueError(f"finite names metric {name!r}, which step_fn does not return; it returns {sorted(row)}.")
      if not math.isfinite(row[name]):
        checkpointer.wait()
        good = checkpointer.latest_step()
        where = ("no checkpoint was written before it" if good is None else
                 f"checkpoint step {good} in {checkpointer.directory!r} holds the last good state")
        raise FloatingPointError(f"train {name} is {row[name]} at step {step}; the run stopped before "
                                 f"checkpointing it, and {where}.")
    rows.append(row)
  return rows
