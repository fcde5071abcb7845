"""Orbax checkpoints: sharded round trips, retention, JSON items, crash safety and errors."""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from o1jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _mesh():
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _train_state(mesh, offset: float = 0.0):
  """Params sharded over "data" (rows) and replicated, plus an adamw state after one update."""
  rows = NamedSharding(mesh, P("data", None))
  params = {
      "w": jax.device_put(jnp.arange(32.0).reshape(16, 2) + offset, rows),
      "b": jax.device_put(jnp.array([1.0, -2.0]) + offset, NamedSharding(mesh, P())),
  }
  tx = optax.adamw(0.1)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return {"params": params, "opt_state": opt_state, "step": jnp.asarray(7, jnp.int32)}


def _abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def test_round_trip_sharded_adamw_state(tmp_path):
  mesh = _mesh()
  state = _train_state(mesh)
  data_state = {"next_index": 1234, "worker_states": [{"seed": 3}], "shuffle": True}
  metadata = {"config": {"lr": 0.1, "model": "tiny_llama"}, "step": 10, "tokens_seen": 40960}
  with checkpoint.Checkpointer(tmp_path / "ckpt", save_every=5) as ckpt:
    assert ckpt.save(10, state, data_state=data_state, metadata=metadata)
    ckpt.wait()
    restored, restored_data, restored_meta = ckpt.restore(target=_abstract(state))

  assert restored_data == data_state and restored_meta == metadata
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  # adamw after one step of unit gradients: count 1, mu = 0.1 (1 - b1), nu = 0.001 (1 - b2).
  np.testing.assert_allclose(restored["opt_state"][0].mu["w"], np.full((16, 2), 0.1), rtol=1e-6)
  np.testing.assert_allclose(restored["opt_state"][0].nu["b"], np.full((2,), 0.001), rtol=1e-6)
  assert int(restored["opt_state"][0].count) == 1 and int(restored["step"]) == 7
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.dtype == want.dtype
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
  w = restored["params"]["w"]
  assert w.sharding.spec == P("data", None) and len(w.addressable_shards) == 8
  assert w.addressable_shards[3].data.shape == (2, 2)


def test_restore_into_other_shardings_and_dtypes(tmp_path):
  mesh = _mesh()
  state = _train_state(mesh)
  with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, state)
    # A concrete target: shardings and dtypes are taken from its arrays (here all replicated, params in bf16).
    target = jax.tree.map(lambda a: jax.device_put(jnp.zeros_like(a), NamedSharding(mesh, P())), state)
    target["params"] = jax.tree.map(lambda a: a.astype(jnp.bfloat16), target["params"])
    restored, data_state, metadata = ckpt.restore(1, target=target)
  assert data_state is None and metadata is None
  w = restored["params"]["w"]
  assert w.dtype == jnp.bfloat16 and w.sharding.spec == P()
  np.testing.assert_array_equal(np.asarray(w, np.float32),
                                np.asarray(state["params"]["w"].astype(jnp.bfloat16), np.float32))


def test_save_every_keep_and_latest_step(tmp_path):
  mesh = _mesh()
  with checkpoint.Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
    assert ckpt.latest_step() is None
    saved = [ckpt.save(step, _train_state(mesh, offset=step), metadata={"step": step}) for step in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]
    assert ckpt.save(7, _train_state(mesh, offset=7), metadata={"step": 7}, force=True)
    ckpt.wait()
    assert ckpt.latest_step() == 7
    assert ckpt.all_steps() == [6, 7]
  assert sorted(os.listdir(tmp_path)) == ["6", "7"]
  # A fresh checkpointer (a restarted job) sees the same steps and reads an older one by number.
  with checkpoint.Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
    assert ckpt.latest_step() == 7
    state, _, metadata = ckpt.restore(6, target=_abstract(_train_state(mesh)))
  assert metadata == {"step": 6}
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(_train_state(mesh, offset=6))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_unfinished_save_is_ignored(tmp_path):
  """A process killed during a save leaves `<step>.orbax-checkpoint-tmp`; the previous step stays the latest."""
  script = textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, {ROOT!r})
      import jax.numpy as jnp
      from orbax.checkpoint._src.path import atomicity
      from o1jax import checkpoint

      ckpt = checkpoint.Checkpointer({str(tmp_path)!r}, save_every=1)
      ckpt.save(1, {{"w": jnp.full((4,), 1.0)}}, metadata={{"step": 1}})
      ckpt.wait()

      async def die(self):  # every file of step 2 is written; the process dies before the commit rename
        os._exit(9)
      atomicity.AtomicRenameTemporaryPath.finalize = die
      ckpt.save(2, {{"w": jnp.full((4,), 2.0)}}, metadata={{"step": 2}})
      ckpt.wait()
      """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 9, result.stderr[-2000:]
  leftovers = sorted(os.listdir(tmp_path))
  assert "1" in leftovers and "2" not in leftovers
  assert any(name.startswith("2.orbax-checkpoint-tmp") for name in leftovers), leftovers

  target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  with checkpoint.Checkpointer(tmp_path, save_every=1, read_only=True) as reader:
    assert reader.latest_step() == 1
    state, _, metadata = reader.restore(target=target)
    with pytest.raises(FileNotFoundError, match=r"no finished checkpoint for step 2 .*finished steps: \[1\]"):
      reader.restore(2, target=target)
  assert metadata == {"step": 1}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4,), 1.0))
  # The job restarts, cleans the leftover and saves step 2 again.
  with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
    assert ckpt.save(2, {"w": jnp.full((4,), 2.0)})
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_errors(tmp_path):
  target = {"w": jnp.zeros((4,))}
  empty = tmp_path / "empty"
  with checkpoint.Checkpointer(empty) as ckpt:
    with pytest.raises(FileNotFoundError, match="no finished checkpoint in .*empty"):
      ckpt.restore(target=target)
    ckpt.save(3, {"w": jnp.ones((4,))})
    with pytest.raises(FileNotFoundError, match=r"no finished checkpoint for step 4 .*finished steps: \[3\]"):
      ckpt.restore(4, target=target)
    with pytest.raises(ValueError, match="step 3 in .* does not match the target"):
      ckpt.restore(3, target={"v": jnp.zeros((4,))})
    with pytest.raises(ValueError, match="step 3 is already checkpointed"):
      ckpt.save(3, {"w": jnp.ones((4,))}, force=True)
    with pytest.raises(TypeError, match="metadata must hold only JSON values"):
      ckpt.save(4, {"w": jnp.ones((4,))}, metadata={"lr": np.float32(0.1)})
  afile = tmp_path / "a_file"
  afile.write_text("not a directory")
  with pytest.raises(ValueError, match="checkpoint directory .*a_file' is an existing file; expected a directory"):
    checkpoint.Checkpointer(afile)
  with pytest.raises(FileNotFoundError, match="checkpoint directory .*missing' does not exist"):
    checkpoint.Checkpointer(tmp_path / "missing", read_only=True)
  with pytest.raises(ValueError, match="keep must be at least 1"):
    checkpoint.Checkpointer(tmp_path / "k", keep=0)


def test_relative_directory(tmp_path, monkeypatch):
  """A relative directory works: orbax's background array writer needs absolute paths and used to fail only at
  the first save's finalize."""
  monkeypatch.chdir(tmp_path)
  state = {"w": jnp.arange(6.0).reshape(2, 3)}
  with checkpoint.Checkpointer("runs/ckpt", keep=2) as ckpt:
    ckpt.save(1, state, data_state={"next_index": 3})
    ckpt.wait()
    restored, data_state, _ = ckpt.restore(target=state)
  assert os.path.isdir(tmp_path / "runs" / "ckpt" / "1")
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert data_state == {"next_index": 3}


def _damage_state_metadata(step_dir):
  (step_dir / "state" / "_METADATA").write_bytes(b"\x87" * 32)


def _truncate_state_metadata(step_dir):
  path = step_dir / "state" / "_METADATA"
  path.write_bytes(path.read_bytes()[:5])


def _delete_state(step_dir):
  shutil.rmtree(step_dir / "state")


def _truncate_array_data(step_dir):
  for path in (step_dir / "state" / "d").iterdir():
    path.write_bytes(path.read_bytes()[:5])


def _overwrite_manifest(step_dir):
  (step_dir / "state" / "manifest.ocdbt").write_bytes(b"\x00garbage")


def _delete_manifest(step_dir):
  (step_dir / "state" / "manifest.ocdbt").unlink()


# When one read of a restore fails, orbax's other reads in flight may finish on its closed event loop: Python then
# reports an ignored RuntimeError ("Event loop is closed"), orbax's cleanup, not the restore's result.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage, reason", [
    # Visible damage is found by reading the files before orbax does (o1jax.checkpoint._first_damaged_file).
    (_damage_state_metadata, r"state/_METADATA is not valid JSON"),
    (_truncate_state_metadata, r"state/_METADATA is not valid JSON"),
    (_overwrite_manifest, r"state/manifest.ocdbt is not an OCDBT manifest"),
    (_delete_state, r"no 'state' item, only \['metadata'\]"),
    (_truncate_array_data, r"OUT_OF_RANGE: .*"),
    (_delete_manifest, r"NOT_FOUND: .* does not exist"),
])
def test_damaged_step_is_named(tmp_path, damage, reason):
  """A step whose files were truncated, overwritten or deleted after it finished: one sentence naming the step's
  directory, not orbax's or TensorStore's own error."""
  state = {"w": jnp.arange(8.0), "step": jnp.asarray(3)}
  with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, state, metadata={"step": 1})
  damage(tmp_path / "1")
  with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
    assert ckpt.latest_step() == 1
    with pytest.raises(ValueError) as error:
      ckpt.restore(target=state)
  message = str(error.value)
  assert re.fullmatch(f"checkpoint step 1 in {re.escape(repr(str(tmp_path)))} is corrupt or incomplete "
                      f"\\({reason}\\); delete {re.escape(repr(str(tmp_path / '1')))} to resume from the step "
                      "before it, or the whole directory to start over.", message), message
  assert "\n" not in message and "tensorstore_spec" not in message and len(message) < 800
