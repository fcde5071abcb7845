"""Device meshes and shardings.

Axes: `data` (pure data parallelism), `fsdp` (data parallelism with sharded parameters) and `tensor` (model
parallelism). Batches are split over ("data", "fsdp"). Meshes use Auto axis types so that GSPMD propagates
shardings through jitted code (`jax.make_mesh` defaults to Explicit axes).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int | None = None, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default all); data defaults to whatever is left over."""
  devices = list(jax.devices() if devices is None else devices)
  if data is None:
    if len(devices) % (fsdp * tensor):
      raise ValueError(f"{len(devices)} devices do not split into fsdp={fsdp} x tensor={tensor}.")
    data = len(devices) // (fsdp * tensor)
  if data * fsdp * tensor != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} does not match {len(devices)} devices.")
  grid = np.asarray(devices).reshape(data, fsdp, tensor)
  return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def batch_size_multiple(mesh: Mesh) -> int:
  """Batches must be a multiple of this to split evenly over the batch axes."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(tree, mesh: Mesh):
  """device_put every array of a pytree with its leading axis split over the batch axes (scalars replicated)."""
  def put(a):
    a = np.asarray(a) if not isinstance(a, jax.Array) else a
    return jax.device_put(a, replicated(mesh) if a.ndim == 0 else batch_sharding(mesh, a.ndim))
  return jax.tree.map(put, tree)
