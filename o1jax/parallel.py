"""Device meshes and shardings.

Axes: `data` (pure data parallelism), `fsdp` (data parallelism with sharded parameters) and `tensor` (model
parallelism). Batches are split over ("data", "fsdp"). Meshes use Auto axis types so that GSPMD propagates
shardings through jitted code (`jax.make_mesh` defaults to Explicit axes).

Parameters carry logical axis names (`models.decoder.weight_logical_axes`, `o1jax.adapter`'s for LoRA factors)
and one table, LOGICAL_RULES, maps each name onto mesh axes, as maxtext's `logical_axis_rules` do:

  shardings = parallel.logical_shardings(decoder.weight_logical_axes(config), weights, mesh)
  weights = jax.device_put(weights, shardings)

A dimension stays replicated where its size does not divide by the mesh axes' size (SmolLM2's 3 kv heads on a
tensor axis of 2), and a mesh axis shards at most one dimension of an array.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axes (None: replicated). Weights shard their model dimension over fsdp (each device
# keeps a slice and GSPMD gathers it for the matmul) and their heads / mlp / vocab over tensor.
LOGICAL_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": None,
    "layers": None,
    "norm": None,
    "lora_rank": None,
}


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


def logical_spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                 rules: dict[str, tuple[str, ...] | None] | None = None) -> P:
  """The PartitionSpec of an array with logical axis `names` (see the module docstring)."""
  rules = LOGICAL_RULES if rules is None else rules
  if len(names) != len(shape):
    raise ValueError(f"logical axes {names} name {len(names)} dimensions; the array has shape {tuple(shape)}.")
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    if name is not None and name not in rules:
      raise ValueError(f"logical axis {name!r} has no rule; expected one of {sorted(rules)}.")
    axes = tuple(a for a in (rules.get(name) or ()) if mesh.shape[a] > 1 and a not in used)
    width = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or size % width:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def logical_shardings(axes, arrays, mesh: Mesh, rules: dict[str, tuple[str, ...] | None] | None = None):
  """A NamedSharding for every array of a pytree from the matching pytree of logical axis names (tuples)."""
  return jax.tree.map(lambda names, a: NamedSharding(mesh, logical_spec(tuple(names), tuple(a.shape), mesh, rules)),
                      axes, arrays, is_leaf=lambda x: isinstance(x, tuple))
