"""Training checkpoints with orbax: sharded array state, the data iterator's state and JSON metadata per step.

This is the only module that imports orbax. One `Checkpointer` owns one directory of numbered steps:

  ckpt = Checkpointer("/runs/gsm8k/checkpoints", save_every=500, keep=3)
  ckpt.save(step, train_state, data_state=iterator.get_state(), metadata={"tokens_seen": n})
  ...
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), train_state)
  train_state, data_state, metadata = ckpt.restore(target=abstract)   # the latest finished step
  ckpt.close()

Each step is a directory `<directory>/<step>/` with up to three items: "state" (the array pytree, written by every
process for its own shards), "data_state" and "metadata" (JSON, written once). Saves run asynchronously: `save`
returns once the arrays are copied off the devices and the files are written by a background thread; the next
`save`, `wait`, `restore` and `close` wait for it.

Crash safety comes from orbax's atomic finalize. A step is written into `<step>.orbax-checkpoint-tmp` and renamed to
`<step>` only after every file (and a commit marker) is on disk; on object stores without atomic renames orbax
commits with the marker file instead. A process killed mid-save therefore leaves a temporary directory that
`latest_step` and `restore` never see, and the previous step stays the latest usable one. A writing `Checkpointer`
deletes leftover temporary directories when it opens the directory; a `read_only` one (an evaluator running beside
the trainer) touches nothing, so it cannot delete a save that is still in flight.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any

_STATE, _DATA_STATE, _METADATA = "state", "data_state", "metadata"


def _check_json(name: str, value: dict | None) -> None:
  if value is None:
    return
  if not isinstance(value, dict):
    raise TypeError(f"{name} must be a JSON dict or None; got {type(value).__name__}.")
  try:
    json.dumps(value, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must hold only JSON values (str, int, float, bool, None, list, dict): {e}.") from None


def _restore_target(target: PyTree) -> PyTree:
  """Concrete jax.Arrays -> ShapeDtypeStructs with their sharding; ShapeDtypeStructs and other leaves as given."""
  def abstract(leaf):
    if isinstance(leaf, jax.Array):
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf
  return jax.tree.map(abstract, target)


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Which orbax handler writes and reads each item. Registered up front (not inferred from the save and restore
  arguments) so that listing a step's items does not log a warning per item it has no handler for yet."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  state_handler = ocp.StandardCheckpointHandler()
  registry.add(_STATE, ocp.args.StandardSave, state_handler)
  registry.add(_STATE, ocp.args.StandardRestore, state_handler)
  for name in (_DATA_STATE, _METADATA):
    json_handler = ocp.JsonCheckpointHandler()
    registry.add(name, ocp.args.JsonSave, json_handler)
    registry.add(name, ocp.args.JsonRestore, json_handler)
  return registry


def _is_damage(error: Exception) -> bool:
  """Whether an exception from orbax's restore means the files on disk are damaged, not that the target differs.

  Damaged files surface as a missing item or key (KeyError), a missing or unreadable file (OSError), undecodable
  JSON metadata (UnicodeDecodeError, JSONDecodeError), or a TensorStore read error: a ValueError whose text
  starts with an absl status code ("DATA_LOSS: ...", "NOT_FOUND: ...", "OUT_OF_RANGE: ..."). A target of
  another tree or shape is a plain ValueError in orbax's own words.
  """
  if isinstance(error, (KeyError, OSError, UnicodeDecodeError, json.JSONDecodeError)):
    return True
  return isinstance(error, ValueError) and re.match(r"[A-Z][A-Z_]+: ", str(error)) is not None


# What a step's files start with: OCDBT manifests their magic number; orbax's metadata files are JSON.
_OCDBT_MAGIC = b"\x0c\xdb\x3a\x2a"
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")


def _first_damaged_file(step_directory: str) -> str | None:
  """A file of the step that is visibly damaged (a manifest without OCDBT's magic, metadata that is not JSON).

  Checked before orbax reads the step: orbax's restore runs on an asyncio loop that it closes when a read
  fails, and TensorStore reads still in flight then print "Event loop is closed" tracebacks from their threads
  after the one-sentence error. What this check cannot see (damaged array chunks) still surfaces through
  orbax's own errors.
  """
  for root, _, files in os.walk(step_directory):
    for name in sorted(files):
      path = os.path.join(root, name)
      try:
        if name == "manifest.ocdbt":
          with open(path, "rb") as f:
            if f.read(len(_OCDBT_MAGIC)) != _OCDBT_MAGIC:
              return f"{os.path.relpath(path, step_directory)} is not an OCDBT manifest"
        elif name in _JSON_FILES or name.endswith(".json") or os.path.basename(root) == "array_metadatas":
          with open(path, "rb") as f:
            json.loads(f.read().decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{os.path.relpath(path, step_directory)} is not valid JSON"
  return None


def _damage_reason(error: Exception) -> str:
  """The first line of the error, without TensorStore's spec dump, at most 300 characters."""
  if isinstance(error, KeyError):
    return f"no entry {error.args[0]!r}" if error.args else "KeyError"
  lines = str(error).strip().splitlines()
  text = lines[0].split(" [tensorstore_spec")[0] if lines else ""
  if len(text) > 300:
    text = text[:300] + "..."
  if type(error) is ValueError:  # TensorStore's: the text starts with its status code
    return text
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Checkpointer:
  """Numbered checkpoints in one directory: save every `save_every` steps, keep the newest `keep`.

  Every process of a multi-host job must make the same calls (orbax synchronises them); each writes and reads only
  its own shards.

  Args:
    directory: a local path or any path orbax's `epath` understands (e.g. gs://bucket/run/checkpoints).
    save_every: `save` writes only steps that are a multiple of this (unless forced).
    keep: how many of the newest steps stay on disk; older ones are deleted after each save.
    read_only: open an existing directory for restoring only: no saves, no deletions, no directory creation.
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int = 1, keep: int = 3, read_only: bool = False):
    if save_every < 1:
      raise ValueError(f"save_every must be a positive number of steps; got {save_every}.")
    if keep < 1:
      raise ValueError(f"keep must be at least 1 checkpoint; got {keep}.")
    self.directory = str(directory)
    if "://" not in self.directory:  # Local paths only: a bucket has no files posing as directories.
      # orbax's array writer (tensorstore OCDBT) rejects relative paths, and only when the first save runs in
      # the background: make the path absolute here.
      self.directory = os.path.abspath(self.directory)
      if os.path.exists(self.directory) and not os.path.isdir(self.directory):
        raise ValueError(f"checkpoint directory {self.directory!r} is an existing file; expected a directory.")
      if read_only and not os.path.isdir(self.directory):
        raise FileNotFoundError(f"checkpoint directory {self.directory!r} does not exist.")
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=True,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    self.save_every = save_every
    self.keep = keep
    self.read_only = read_only
    self._manager = ocp.CheckpointManager(self.directory, handler_registry=_handler_registry(), options=options)

  def all_steps(self) -> list[int]:
    """The finished steps on disk, ascending (unfinished temporary directories are not steps)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest finished step, or None when the directory holds none."""
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree, *, data_state: dict | None = None, metadata: dict | None = None,
           force: bool = False) -> bool:
    """Starts saving `state` (and the JSON items) as `step` if the step is due; returns whether it saves.

    Args:
      step: the training step; saved when it is a multiple of `save_every` and newer than the latest step.
      state: a pytree of arrays (jax.Arrays of any sharding, numpy arrays, scalars), e.g. params + optax state.
      data_state: the data iterator's state as a JSON dict, or None.
      metadata: any JSON dict (config, tokens seen, ...), or None.
      force: save even when `step` is not a multiple of `save_every` (e.g. the last step before exiting).

    Returns:
      True when a save was started. It finishes in the background; call `wait` to block until it is on disk.
    """
    if self.read_only:
      raise ValueError(f"checkpointer for {self.directory!r} is read-only; open it with read_only=False to save.")
    _check_json("data_state", data_state)
    _check_json("metadata", metadata)
    if force and step in self._manager.all_steps():
      raise ValueError(f"step {step} is already checkpointed in {self.directory!r}; steps are never overwritten.")
    items = {_STATE: ocp.args.StandardSave(state)}
    if data_state is not None:
      items[_DATA_STATE] = ocp.args.JsonSave(data_state)
    if metadata is not None:
      items[_METADATA] = ocp.args.JsonSave(metadata)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int | None = None, *, target: PyTree) -> tuple[PyTree, dict | None, dict | None]:
    """Reads one step back, waiting for a save in flight first.

    Args:
      step: the step to read; default the latest finished one.
      target: a pytree with the saved tree structure whose leaves say how to place each array:
        jax.ShapeDtypeStruct with a sharding (e.g. from `jax.eval_shape` plus the train step's shardings), or
        concrete jax.Arrays whose shardings and dtypes are reused. Arrays come back with the target's sharding
        and dtype (cast if the saved dtype differs).

    Returns:
      (state, data_state, metadata); the JSON items are None when they were not saved.

    Raises:
      FileNotFoundError: no finished step in the directory, or no finished step `step`.
      ValueError: the saved tree does not match the target's structure, or the step's files are damaged
        (truncated, deleted or overwritten): one sentence naming the step's directory.
    """
    self._manager.wait_until_finished()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {self.directory!r}.")
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"no finished checkpoint for step {step} in {self.directory!r}; finished steps: "
                              f"{steps}.")
    damaged = _first_damaged_file(os.path.join(self.directory, str(step)))
    if damaged is not None:
      raise self._damaged(step, damaged)
    try:
      saved_items = {name for name, _ in self._manager.item_metadata(step).items()}
    except Exception as e:
      if _is_damage(e):
        raise self._damaged(step, _damage_reason(e)) from None
      raise
    if _STATE not in saved_items:
      raise self._damaged(step, f"no {_STATE!r} item, only {sorted(saved_items)}")
    items = {_STATE: ocp.args.StandardRestore(_restore_target(target))}
    for name in (_DATA_STATE, _METADATA):
      if name in saved_items:
        items[name] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      if _is_damage(e):
        raise self._damaged(step, _damage_reason(e)) from None
      if isinstance(e, ValueError):
        raise ValueError(f"checkpoint step {step} in {self.directory!r} does not match the target: {e}") from None
      raise
    return restored[_STATE], restored.get(_DATA_STATE), restored.get(_METADATA)

  def _damaged(self, step: int, reason: str) -> ValueError:
    """The error for a step whose files cannot be read back, naming its directory and what to do."""
    step_directory = os.path.join(self.directory, str(step))
    return ValueError(f"checkpoint step {step} in {self.directory!r} is corrupt or incomplete ({reason}); delete "
                      f"{step_directory!r} to resume from the step before it, or the whole directory to start over.")

  def wait(self) -> None:
    """Blocks until a save in flight is on disk (and old steps are deleted)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for a save in flight and releases orbax's threads."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
