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

Multi-host (JAX's multi-controller model): every process runs the same program on the same host values, and
the devices of all processes form one mesh. `initialize` starts `jax.distributed` from explicit arguments or the
environment (on Cloud TPU VMs from O1JAX_DISTRIBUTED=auto, which launch/pod.sh sets); `put` places a host value
that every process holds on a global sharding, `put_local` builds a global array from each process's own rows,
and `to_host` reads any array back on every process (gathering the shards other processes hold). Files are
written by process 0 only (`is_writer`).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
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
  """Every array of a pytree on `mesh` with its leading axis split over the batch axes (scalars replicated).

  Host values must be the same on every process (see the module docstring).
  """
  def place(a):
    a = np.asarray(a) if not isinstance(a, jax.Array) else a
    return put(a, replicated(mesh) if a.ndim == 0 else batch_sharding(mesh, a.ndim))
  return jax.tree.map(place, tree)


def put(value, sharding: NamedSharding) -> jax.Array:
  """A value every process holds in full, placed on `sharding` (each process fills only its own devices)."""
  if jax.process_count() == 1 or sharding.is_fully_addressable:
    return jax.device_put(value, sharding)
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    return jax.device_put(value, sharding)          # already global: a resharding
  if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
    data = np.asarray(jax.random.key_data(value))   # keys travel as their uint32 data
    spec = P(*sharding.spec, *([None] * (data.ndim - len(sharding.spec))))
    placed = jax.make_array_from_callback(data.shape, NamedSharding(sharding.mesh, spec), lambda i: data[i])
    return jax.random.wrap_key_data(placed, impl=jax.random.key_impl(value))
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def put_local(local_rows, sharding: NamedSharding) -> jax.Array:
  """A global array whose leading axis is every process's own rows, in process order."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local_rows))


def to_host(tree):
  """Every array of a pytree as numpy on every process (shards held by other processes are gathered)."""
  def read(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)
  return jax.tree.map(read, tree)


def is_writer() -> bool:
  """Whether this process writes files (process 0 of a multi-host job)."""
  return jax.process_index() == 0


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
               ) -> None:
  """Starts `jax.distributed` for a multi-host job; a no-op for a single process.

  With no arguments it starts only when the environment describes a multi-process job (JAX finds GKE TPU pods,
  multislice jobs, SLURM and the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables itself).
  A Cloud TPU VM slice (`gcloud compute tpus tpu-vm create`) sets none of those variables: its workers are
  described by the VM metadata, which `jax.distributed.initialize()` reads when called with no arguments. So
  O1JAX_DISTRIBUTED=auto (launch/pod.sh sets it on every worker) starts it that way; explicit arguments still
  take precedence. On CPU the processes exchange collectives over gloo.

  Args:
    coordinator: "host:port" of process 0.
    num_processes, process_id: this job's size and this process's rank.
  """
  env = os.environ
  auto = env.get("O1JAX_DISTRIBUTED", "")
  if auto not in ("", "auto"):
    raise ValueError(f"O1JAX_DISTRIBUTED={auto!r}; expected 'auto' (let JAX find the cluster: Cloud TPU VM "
                     "metadata, SLURM, ...) or unset.")
  coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes if num_processes is not None else int(env.get("JAX_NUM_PROCESSES", "0") or 0)
  process_id = process_id if process_id is not None else (int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env
                                                          else None)
  on_pod = auto == "auto" or any(k in env for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID",
                                                     "MEGASCALE_COORDINATOR_ADDRESS"))
  if not coordinator and not on_pod:
    if num_processes and num_processes > 1:
      raise ValueError(f"num_processes={num_processes} needs a coordinator address (--coordinator=host:port or "
                       "JAX_COORDINATOR_ADDRESS).")
    return
  if coordinator and (not num_processes or process_id is None):
    raise ValueError(f"coordinator {coordinator!r} needs num_processes and process_id (flags or JAX_NUM_PROCESSES "
                     "and JAX_PROCESS_ID).")
  if coordinator and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes}).")
  if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()


def shutdown() -> None:
  """Ends a multi-host job together: every process waits at a barrier before it exits, so that process 0 (the
  coordinator) does not leave while others still report to it. A no-op for a single process."""
  if jax.process_count() > 1:
    jax.distributed.shutdown()


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
                      axes, arrays, is_leaf=_is_names)


def _is_names(x) -> bool:
  """A leaf of a logical-axes tree: a tuple of names (a tuple of subtrees, such as unstacked layers, is not)."""
  return isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x)
