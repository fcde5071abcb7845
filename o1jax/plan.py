"""Memory per device of a self-play or solve config on a TPU slice, planned on this machine without a TPU.

  topology = plan.topology("v5e-16")             # 16 chips x 16 GiB (TOPOLOGIES below)
  report = plan.plan(config, topology)           # a Plan: one Entry per group of arrays, a total per phase
  print(report.table()); report.fits; report.summary()
  sentence = plan.advice(config, topology)       # None when it fits, else one sentence: what to change

The mesh is a `jax.sharding.AbstractMesh` over the topology's chips with the config's `mesh` shape (o1jax.parallel's
axes data / fsdp / tensor; mesh.data=-1 takes the devices left over, as o1jax.selfplay.prepare does; a solve
config runs on launch/solve.py's all-data mesh). Every array is a `jax.ShapeDtypeStruct` from `jax.eval_shape` of
the code that builds it, and its bytes on a device come from the shard shape of the sharding that code gives it
(`parallel.logical_shardings` over LOGICAL_RULES, the optimizer state like its parameters, batches over the batch
axes). What is counted, section by section, as o1jax builds it today:

  checkpoint   o1jax.pretrained.load reads the whole checkpoint (its vocabulary grown by the LLaMA-O1 special tokens)
               onto each process's first device, and the self-play Job keeps it there for the whole run
               (Job.loaded). While the first Sampler unstacks it, a second copy of its layers (and the fused
               q/k/v and gate/up) sits there too. No mesh shards this: it often decides what fits.
               `load="sharded"` plans a loader that puts every weight straight onto its shards instead (what a
               fix of pretrained.load would buy; o1jax does not do that yet).
  frozen, trainable, optimizer   the learner's state as Learner.place shards it: the frozen base weights and the
               LoRA factors + new token rows (or every weight for a full fine-tune), AdamW's two moments like
               their parameters (scalars left out).
  sampler      the search's own copy of the weights (layers unstacked, q/k/v and gate/up fused:
               `decoder.unstack_layers`), sharded by the rules when fsdp or tensor > 1, else replicated
               (Sampler.set_weights). On the CPU backend it also keeps a tied model's head transposed.
  kv_cache     the search's caches (o1jax.search.lm.LMStepModel over o1jax.sampling.sampler), rows split over the
               batch axes (data x fsdp), kv heads over tensor where they divide (`cache_bytes`). Each row holds
               L layers x K kv heads x H head dim x S slots x 2 (keys, values) in the activation dtype, plus its
               slot positions (int32 [S]) and the logits after it (float32 [V]). S = the prompt bucket of the
               longest search path (question + one line of up to max_new_tokens + LINE_TOKENS per depth) + the
               free slots LMStepModel reserves (hint and header, the step, the rating suffix) + the rating line's
               last two tokens that a row continued from its rated cache appends. Rows: the path
               caches of this expansion and of the last one (LMStepModel keeps up to `keep_rows` rows of rated and
               path caches, and keeps them after the search, into the learner steps), and DECODE_COPIES x one sampler call's children
               (max_rows): the fork, plus the compacting decode's smaller batches and the gather back into one
               (one more for rating_context="value", which forks the path again to rate).
  search_temp  one decode step's vocabulary-wide float32 arrays (VOCAB_TEMPS per row) and one prefill's attention
               scores (estimate).
  learner_batch  one batch of replay rows (o1jax.learn.experience.spec) on the device.
  activations  what the backward pass keeps for one micro-batch: the residuals of `jax.vjp` of the learner's
               loss, counted exactly from `jax.eval_shape` (`residual_bytes_per_row`; the layer scan is not
               rematerialised), times ACTIVATION_OVERHEAD for the backward's own working set (estimate).
  step_temp    the step's gradients and updates like the trainable tree; for LoRA also the merged target weights
               and their cotangents, and the embedding table with the new rows appended and its cotangent
               (adapter.merge materialises full-size weights once per step); the accumulator when
               learner.accumulate > 1 (estimate).
  update       after each round the sampler takes the new weights: the merged stacked weights (LoRA), their
               unstacked slices and fused projections, and the new copy while the old one is still held.
  replay       the prioritized replay buffer's arrays: host memory of every process, not HBM.

Phases: a section is live in some of them, and the peak is the largest phase total on the fullest device (the
first device of a process, which holds the checkpoint):
  load (prepare: checkpoint read, learner state placed, Sampler built), search (one round's MCTS), learn (the
  learner steps), update (the sampler takes the learner's weights). A solve config has load and search only.
A config fits when its peak is at most USABLE_FRACTION of the chip's HBM (XLA's own buffers, fragmentation, and
the estimates' error take the rest).

Legend: L layers, D model dim, N query heads, K kv heads, H head dim, F feed-forward dim, V vocab, T learner
sequence length, S cache slots, M target slots.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import math
import os
import re
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from models import decoder, presets
from models.config import DecoderConfig
from o1jax import adapter as adapter_lib
from o1jax import parallel, selfplay, thoughts
from o1jax.data import problems as problems_lib
from o1jax.learn import experience as experience_lib
from o1jax.learn import learner as learner_lib
from o1jax.learn import lm
from o1jax.search import lm as search_lm

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: HBM per chip, and what the number in its topology names counts per chip."""

  hbm_bytes: int
  cores_per_chip: int


# v4 and v5p topology names count TensorCores, two per chip (v4-8 is 4 chips, v5p-64 is 32); v5e and v6e names
# count chips (v5e-16 is 16). gcloud's accelerator types spell v5e "v5litepod-N".
#
#   generation  HBM per chip  topology name counts  examples
#   v4          32 GiB        TensorCores (2/chip)  v4-8 = 4 chips, v4-32 = 16 chips
#   v5e         16 GiB        chips                 v5e-8 = v5litepod-8 = 8 chips, v5e-16 = 16 chips
#   v5p         95 GiB        TensorCores (2/chip)  v5p-8 = 4 chips, v5p-64 = 32 chips
#   v6e         32 GiB        chips                 v6e-8 = 8 chips, v6e-16 = 16 chips
CHIPS = {
    "v4": Chip(hbm_bytes=32 * GiB, cores_per_chip=2),
    "v5e": Chip(hbm_bytes=16 * GiB, cores_per_chip=1),
    "v5p": Chip(hbm_bytes=95 * GiB, cores_per_chip=2),
    "v6e": Chip(hbm_bytes=32 * GiB, cores_per_chip=1),
}
_GENERATION_ALIASES = {"v5litepod": "v5e"}

USABLE_FRACTION = 0.9
LINE_TOKENS = 16          # a path line's format tokens: ids, <start_of_thought>, meta, <end_of_thought>, rating, \n
CHARS_PER_TOKEN = 3       # to estimate a text's tokens without its tokenizer (English math runs at 3-4)
DECODE_COPIES = 3         # caches of one sampler call alive at once (fork, compaction parts, gathered result)
VOCAB_TEMPS = 8           # [rows, V] float32 arrays of one decode step (log-softmax, probabilities, filters)
DEFAULT_QUESTION_TOKENS = 256   # when the config's problem split is not installed
# The learner's backward keeps its residuals and works on one layer's cotangents at a time: XLA:CPU's compiled
# step (memory_analysis temp bytes per layer) held 1.15-1.25x the residuals `residual_bytes_per_row` counts, on
# small float32 Gemma-2 and Llama configs (D 256-512, F 1024-2048, T 256-512).
ACTIVATION_OVERHEAD = 1.25
KEEP_ROWS = inspect.signature(search_lm.LMStepModel.__init__).parameters["keep_rows"].default
PHASES = ("load", "search", "learn", "update")
SECTIONS = ("checkpoint", "frozen", "trainable", "optimizer", "sampler", "kv_cache", "search_temp",
            "learner_batch", "activations", "step_temp", "update", "replay")
# Packaged models (o1jax.pretrained.PACKAGED) -> the preset with their shapes.
PACKAGED_PRESETS = {"smollm2-135m-instruct": "smollm2_135m"}
LOADS = ("device", "sharded")


# --------------------------------------------------------------------------------------------- topology, mesh


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  chips: int
  hbm_bytes: int

  @property
  def usable_bytes(self) -> int:
    return int(self.hbm_bytes * USABLE_FRACTION)


def topology(name: str) -> Topology:
  """"v5e-16" (also gcloud's "v5litepod-16"), "v4-8", "v5p-64", "v6e-16" -> its chips and HBM (see CHIPS)."""
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
  expected = "expected <generation>-<size> with a generation of v4, v5e (v5litepod), v5p, v6e, e.g. v5e-16"
  if not match:
    raise ValueError(f"topology {name!r} is not a TPU topology; {expected}.")
  generation = _GENERATION_ALIASES.get(match.group(1), match.group(1))
  if generation not in CHIPS:
    raise ValueError(f"topology {name!r} has the unknown TPU generation {match.group(1)!r}; {expected}.")
  chip, size = CHIPS[generation], int(match.group(2))
  if size < 1 or size % chip.cores_per_chip:
    raise ValueError(f"topology {name!r}: {generation} sizes count {chip.cores_per_chip} cores per chip, so the "
                     f"size must be a positive multiple of {chip.cores_per_chip}.")
  return Topology(name=f"{generation}-{size}", chips=size // chip.cores_per_chip, hbm_bytes=chip.hbm_bytes)


def mesh_axes(mesh: Any, chips: int) -> dict[str, int]:
  """{"data", "fsdp", "tensor"} sizes of a config's mesh field on `chips` devices (data <= 0: the rest)."""
  data, fsdp, tensor = (int(mesh[a]) for a in parallel.AXES)
  if fsdp < 1 or tensor < 1:
    raise ValueError(f"mesh fsdp={fsdp} and tensor={tensor} must be >= 1 (only mesh.data may be -1, the devices "
                     "left over).")
  if data <= 0:
    if chips % (fsdp * tensor):
      raise ValueError(f"{chips} chips do not split into mesh.fsdp={fsdp} x mesh.tensor={tensor}.")
    data = chips // (fsdp * tensor)
  if data * fsdp * tensor != chips:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} is {data * fsdp * tensor} devices; the "
                     f"topology has {chips} chips.")
  return {"data": data, "fsdp": fsdp, "tensor": tensor}


def abstract_mesh(axes: dict[str, int]) -> AbstractMesh:
  return AbstractMesh(tuple(axes[a] for a in parallel.AXES), parallel.AXES,
                      axis_types=(jax.sharding.AxisType.Auto,) * len(parallel.AXES))


def device_bytes(shape: tuple[int, ...], dtype, spec: P, mesh) -> int:
  """Bytes of one device's shard of an array of `shape` and `dtype` placed with `spec` on `mesh`."""
  return math.prod(NamedSharding(mesh, spec).shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


# ------------------------------------------------------------------------------------------------ the report


@dataclasses.dataclass(frozen=True)
class Entry:
  """A group of arrays and its bytes on the fullest device.

  Attributes:
    section: one of SECTIONS.
    name: what it is (a weight's path in its tree; `*` stands for every layer of the unstacked sampler weights).
    shape, dtype: of one array.
    placement: the PartitionSpec, or where it lives ("first device", "host", "estimate: ...").
    bytes: on the fullest device, all `count` arrays together.
    count: how many arrays of this shape.
    phases: the phases it is alive in (empty: host memory).
  """

  section: str
  name: str
  shape: tuple[int, ...]
  dtype: str
  placement: str
  bytes: int
  count: int = 1
  phases: tuple[str, ...] = PHASES


@dataclasses.dataclass(frozen=True)
class Plan:
  """The memory of one config on one topology and mesh (see the module docstring)."""

  kind: str                      # "self-play" or "solve"
  model: str                     # where the shapes came from (a preset, or a checkpoint's config.json)
  decoder: DecoderConfig
  lora: adapter_lib.LoraConfig | None
  topology: Topology
  mesh: dict[str, int]
  load: str
  entries: tuple[Entry, ...]
  question_tokens: int
  cache_slots: int

  @property
  def phases(self) -> dict[str, int]:
    names = PHASES if self.kind == "self-play" else ("load", "search")
    return {p: sum(e.bytes for e in self.entries if p in e.phases) for p in names}

  @property
  def peak_phase(self) -> str:
    phases = self.phases
    return max(phases, key=phases.get)

  @property
  def peak(self) -> int:
    return self.phases[self.peak_phase]

  @property
  def host_bytes(self) -> int:
    return sum(e.bytes for e in self.entries if not e.phases)

  @property
  def fits(self) -> bool:
    return self.peak <= self.topology.usable_bytes

  def section_bytes(self, phase: str | None = None) -> dict[str, int]:
    """Bytes per section (live in `phase`, or in any phase)."""
    out: dict[str, int] = {}
    for e in self.entries:
      if e.phases and (phase is None or phase in e.phases):
        out[e.section] = out.get(e.section, 0) + e.bytes
    return out

  @property
  def mesh_text(self) -> str:
    return ", ".join(f"{a}={self.mesh[a]}" for a in parallel.AXES)

  def table(self) -> str:
    """Every entry with its placement and bytes per device, then the phase totals against the chip's HBM."""
    mode = "full fine-tune" if self.lora is None else f"LoRA rank {self.lora.rank}"
    mode = mode if self.kind == "self-play" else "inference"
    loaded = "onto the first device" if self.load == "device" else "sharded"
    lines = [f"{self.kind} plan: {self.model} ({self.decoder.param_dtype}, {mode}) on {self.topology.name}: "
             f"{self.topology.chips} chips x {_gib(self.topology.hbm_bytes)} HBM, mesh {self.mesh_text}; checkpoint "
             f"loaded {loaded}; cache slots {self.cache_slots} (questions of up to {self.question_tokens} tokens)",
             f"{'section':<13} {'array':<46} {'shape':<24} {'dtype':<9} {'placement':<34} {'per device':>11}"]
    for e in self.entries:
      shape = "[" + ", ".join(map(str, e.shape)) + "]" + (f" x{e.count}" if e.count > 1 else "")
      lines.append(f"{e.section:<13} {e.name[:46]:<46} {shape:<24} {e.dtype:<9} {e.placement[:34]:<34} "
                   f"{_gib(e.bytes):>11}")
    lines.append(f"per phase on the fullest device (usable {_gib(self.topology.usable_bytes)} = "
                 f"{USABLE_FRACTION:.0%} of {_gib(self.topology.hbm_bytes)}):")
    for phase, total in self.phases.items():
      parts = sorted(self.section_bytes(phase).items(), key=lambda kv: -kv[1])[:3]
      mark = "  <- peak" if phase == self.peak_phase else ""
      lines.append(f"  {phase:<7} {_gib(total):>11}   mostly {', '.join(f'{s} {_gib(b)}' for s, b in parts)}{mark}")
    if self.host_bytes:
      lines.append(f"  host    {_gib(self.host_bytes):>11}   the replay buffer, in every process's memory")
    lines.append(f"fits: {'yes' if self.fits else 'no'}")
    return "\n".join(lines)

  def summary(self) -> dict[str, Any]:
    """The totals as one JSON-ready dict (launch/plan.py prints it as its last line)."""
    return dict(kind=self.kind, model=self.model, dtype=self.decoder.param_dtype,
                lora_rank=None if self.lora is None else self.lora.rank, topology=self.topology.name,
                chips=self.topology.chips, hbm_bytes=self.topology.hbm_bytes,
                usable_bytes=self.topology.usable_bytes, mesh=dict(self.mesh), load=self.load,
                bytes_per_device=self.peak, peak_phase=self.peak_phase, phases=self.phases,
                sections=self.section_bytes(), host_bytes=self.host_bytes, cache_slots=self.cache_slots,
                fits=self.fits)


def _gib(n: int) -> str:
  return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / (1 << 20):.1f} MiB"


# ------------------------------------------------------------------------------------------------- planning


def plan(config: ml_collections.ConfigDict, topology: Topology, *, preset: str | None = None, load: str = "device",
         question_tokens: int | None = None, backend: str = "tpu") -> Plan:
  """The memory of `config` (a self-play config when it has a `learner` field, else a solve config) on `topology`.

  Args:
    preset: a models.presets name for the decoder's shapes instead of the config's (model.path's config.json
      when it is on this machine, else model.preset).
    load: "device" (what o1jax.pretrained.load does) or "sharded" (a loader that shards as it reads).
    question_tokens: the longest question in tokens; default: estimated from the problems the config searches.
    backend: the platform the Sampler runs on ("cpu" keeps a tied head transposed as well).

  Raises:
    ValueError: a bad config value, topology or mesh, one sentence naming it.
  """
  if load not in LOADS:
    raise ValueError(f"load={load!r}; expected one of {LOADS}.")
  self_play = "learner" in config
  axes = (mesh_axes(config.mesh, topology.chips) if self_play
          else {"data": topology.chips, "fsdp": 1, "tensor": 1})   # launch/solve.py: parallel.make_mesh()
  mesh = abstract_mesh(axes)
  if self_play:
    selfplay.check(config, mesh)
  dconfig, base_vocab, source = decoder_config(config, preset)
  lora = _lora_config(config) if self_play else None
  if question_tokens is None:
    question_tokens = _question_tokens(config, self_play)
  frozen_layers = int(config.model.frozen_layers) if self_play else 0
  optimizer = selfplay.optimizer_config(config) if self_play else None
  trees = _abstract_trees(dconfig, base_vocab, lora, frozen_layers, optimizer, backend == "cpu")
  entries: list[Entry] = []
  search_phases = ("search", "learn", "update") if self_play else ("search",)
  persistent = PHASES if self_play else ("load", "search")

  if load == "device":
    whole = _whole_weights(trees.checkpoint)
    entries += [dataclasses.replace(e, section="checkpoint", placement="first device",
                                    phases=PHASES if self_play else ("load",)) for e in whole]
    entries += [Entry("checkpoint", f"unstacked copy: {e.name}", e.shape, e.dtype, "first device", e.bytes,
                      e.count, ("load",)) for e in _unstack_copy(trees.checkpoint, None, mesh)]
  else:
    entries += [Entry("checkpoint", f"unstacked copy: {e.name}", e.shape, e.dtype, e.placement, e.bytes, e.count,
                      ("load",)) for e in _unstack_copy(trees.checkpoint, decoder.weight_logical_axes(dconfig), mesh)]

  if self_play:
    learner = learner_lib.Learner(trees.model, trees.optimizer, mesh, selfplay.learner_config(config),
                                  selfplay.experience_config(config), (0, 1))
    frozen_sh, trainable_sh = learner.shardings(trees.frozen, trees.trainable)
    opt_sh = optax.tree_map_params(trees.optimizer, lambda _, s: s, trees.opt_state, trainable_sh,
                                   transform_non_params=lambda _: parallel.replicated(mesh))
    entries += _tree_entries("frozen", trees.frozen, frozen_sh, PHASES)
    entries += _tree_entries("trainable", trees.trainable, trainable_sh, PHASES)
    entries += _tree_entries("optimizer", trees.opt_state, opt_sh, PHASES)
  sampler_sh = sampler_shardings(trees.sampler, mesh)
  replicated = mesh.shape["fsdp"] == mesh.shape["tensor"] == 1
  # Placing the unstacked copy replicated reuses its buffers on the first device (jax.device_put to a sharding
  # that includes the array's own device does not copy there): while loading, that copy is the sampler's there.
  sampler_phases = tuple(p for p in persistent if not (p == "load" and load == "device" and replicated))
  sampler = _tree_entries("sampler", trees.sampler, sampler_sh, sampler_phases)
  entries += sampler
  entries += search_entries(config, dconfig, mesh, question_tokens=question_tokens, self_play=self_play,
                            kept_phases=search_phases)
  if self_play:
    entries += learner_entries(config, dconfig, trees, mesh, frozen_sh, trainable_sh)
    entries += _update_entries(trees, mesh, sampler)
    entries += replay_entries(config)
  slots = next(int(e.shape[-1]) for e in entries if e.section == "kv_cache")
  return Plan(kind="self-play" if self_play else "solve", model=source, decoder=dconfig, lora=lora,
              topology=topology, mesh=axes, load=load, entries=tuple(entries), question_tokens=question_tokens,
              cache_slots=slots)


def decoder_config(config: ml_collections.ConfigDict, preset: str | None = None) -> tuple[DecoderConfig, int, str]:
  """(the decoder's config with the vocabulary grown by the format's special tokens, the checkpoint's own
  vocabulary size, where the shapes came from): `preset`, else model.path's config.json when that directory
  is on this machine, else the config's model.preset, else the preset of a packaged model."""
  path = str(config.model.path)
  name = preset or None
  if name is None and os.path.isfile(os.path.join(path, "config.json")):
    with open(os.path.join(path, "config.json")) as f:
      base = DecoderConfig.from_hf(json.load(f))
    source = path
  else:
    name = name or config.model.get("preset") or PACKAGED_PRESETS.get(path)
    if not name:
      raise ValueError(f"model.path={path!r} is not a checkpoint directory on this machine and the config has no "
                       f"model.preset; set --config.model.preset (or --preset) to one of {sorted(presets.PRESETS)} "
                       "for the shapes.")
    base = presets.get(name)
    source = name
  dtype = str(config.model.dtype)
  grown = base.replace(vocab_size=base.vocab_size + len(thoughts.SPECIAL_TOKENS), dtype=dtype, param_dtype=dtype)
  return grown, base.vocab_size, source


def _lora_config(config: ml_collections.ConfigDict) -> adapter_lib.LoraConfig | None:
  """The LoRA the self-play run trains, as selfplay.prepare picks it (the adapter file's, or config.lora)."""
  if config.model.adapter:
    return adapter_lib.read(config.model.adapter).config
  if config.lora.rank > 0:
    return adapter_lib.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets))
  return None


def _question_tokens(config: ml_collections.ConfigDict, self_play: bool) -> int:
  """The longest question the config searches, in tokens (CHARS_PER_TOKEN characters each)."""
  count = config.rounds * config.data.problems_per_round if self_play else config.num_problems
  try:
    problems = problems_lib.load(config.data.split, config.data.start, count)
  except FileNotFoundError:
    return DEFAULT_QUESTION_TOKENS
  return max([math.ceil(len(p.question) / CHARS_PER_TOKEN) for p in problems] or [DEFAULT_QUESTION_TOKENS])


@dataclasses.dataclass(frozen=True)
class _Trees:
  """The abstract trees of one model and optimizer (cached across meshes)."""

  model: lm.Model
  optimizer: optax.GradientTransformation | None
  checkpoint: Any      # the loaded decoder's weights (grown vocabulary)
  frozen: Any
  trainable: Any
  opt_state: Any
  merged: Any          # what the sampler takes from the learner (or the checkpoint, for solve)
  sampler: Any         # the sampler's unstacked weights


@functools.lru_cache(maxsize=64)
def _abstract_trees(dconfig: DecoderConfig, base_vocab: int, lora, frozen_layers: int,
                    optimizer_config: lm.OptimizerConfig | None, transpose_tied_head: bool) -> _Trees:
  dtype = np.dtype(dconfig.param_dtype)
  weights = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, dtype), decoder.weight_shapes(dconfig),
                         is_leaf=lambda x: isinstance(x, tuple))
  model = lm.Model(config=dconfig, base_vocab=base_vocab, lora=lora, frozen_layers=frozen_layers)
  unstack = functools.partial(decoder.unstack_layers, transpose_tied_head=transpose_tied_head)
  if optimizer_config is None:
    return _Trees(model=model, optimizer=None, checkpoint=weights, frozen={}, trainable={}, opt_state={},
                  merged=weights, sampler=jax.eval_shape(unstack, weights))
  optimizer = optimizer_config.make()
  frozen, trainable = jax.eval_shape(model.split, weights, jax.random.key(0))
  opt_state = jax.eval_shape(optimizer.init, trainable)
  merged = jax.eval_shape(model.merged, frozen, trainable)
  return _Trees(model=model, optimizer=optimizer, checkpoint=weights, frozen=frozen, trainable=trainable,
                opt_state=opt_state, merged=merged, sampler=jax.eval_shape(unstack, merged))


def sampler_shardings(unstacked: Any, mesh) -> Any:
  """The shardings Sampler.set_weights gives its unstacked weights on `mesh`."""
  if mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1:
    return parallel.logical_shardings(decoder.unstacked_logical_axes(unstacked), unstacked, mesh)
  return jax.tree.map(lambda _: parallel.replicated(mesh), unstacked)


def _tree_entries(section: str, tree: Any, shardings: Any, phases: tuple[str, ...]) -> list[Entry]:
  """One Entry per leaf of `tree` (0-d leaves left out); unstacked layers ("layers/<l>/...") grouped as one."""
  groups: dict[str, Entry] = {}
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
    if not leaf.shape:
      continue
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    name = re.sub(r"^(\d+/)+", "", name)                 # optax's chain / inner-state positions
    name = re.sub(r"(^|/)layers/\d+/", r"\1layers/*/", name)
    size = math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    if name in groups:
      old = groups[name]
      groups[name] = dataclasses.replace(old, bytes=old.bytes + size, count=old.count + 1)
    else:
      groups[name] = Entry(section, name, tuple(leaf.shape), str(np.dtype(leaf.dtype)), _spec_text(sharding.spec),
                           size, 1, phases)
  return list(groups.values())


def _spec_text(spec: P) -> str:
  return "P(" + ", ".join("None" if s is None else repr(s) if isinstance(s, str) else
                          "(" + ", ".join(map(repr, s)) + ")" for s in spec) + ")"


def _whole_weights(weights: Any) -> list[Entry]:
  """The checkpoint's weights, each whole on one device."""
  leaves = jax.tree_util.tree_flatten_with_path(weights)[0]
  return [Entry("checkpoint", jax.tree_util.keystr(path, simple=True, separator="/"), tuple(leaf.shape),
                str(np.dtype(leaf.dtype)), "first device", math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize)
          for path, leaf in leaves]


def _unstack_copy(weights: Any, logical_axes: Any, mesh) -> list[Entry]:
  """What `decoder.unstack_layers` holds at once besides its input: a slice of every stacked layer weight and the
  fused q/k/v and gate/up of every layer, whole on one device (logical_axes None) or sharded like the stacked
  weights (`logical_axes` of the stacked tree)."""
  out = []
  for name, leaf in weights["layers"].items():
    fused = name in ("q", "k", "v", "gate", "up")
    if logical_axes is None:
      size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
      placement = "first device"
    else:
      spec = parallel.logical_spec(tuple(logical_axes["layers"][name]), tuple(leaf.shape), mesh)
      size = device_bytes(leaf.shape, leaf.dtype, spec, mesh)
      placement = _spec_text(spec)
    out.append(Entry("checkpoint", f"layers/{name}" + (" (slices and fused)" if fused else " (slices)"),
                     tuple(leaf.shape[1:]), str(np.dtype(leaf.dtype)), placement, size * (2 if fused else 1),
                     leaf.shape[0] * (2 if fused else 1)))
  return out


def _update_entries(trees: _Trees, mesh, sampler: list[Entry]) -> list[Entry]:
  """The sampler's rebuild after a round (Sampler.set_weights(model.merged(...))), sharded like the frozen weights:
  the merged stacked weights (LoRA; a full fine-tune hands over the trainable tree itself), their unstacked slices
  and fused projections, and the new copy while the old is still held."""
  phases = ("update",)
  axes = decoder.weight_logical_axes(trees.model.config)
  entries = [dataclasses.replace(e, section="update", name=e.name.replace("unstacked copy: ", ""), phases=phases)
             for e in _unstack_copy(trees.merged, axes, mesh)]
  if trees.model.lora is not None:
    shardings = parallel.logical_shardings(axes, trees.merged, mesh)
    entries += [dataclasses.replace(e, section="update", name=f"merged: {e.name}")
                for e in _tree_entries("update", trees.merged, shardings, phases)]
  entries += [dataclasses.replace(e, section="update", name=f"new sampler copy: {e.name}", phases=phases)
              for e in sampler]
  return entries


# ------------------------------------------------------------------------------------------------ the search


def cache_bytes(dconfig: DecoderConfig, rows: int, slots: int, mesh) -> int:
  """Bytes on one device of a cache of `rows` rows (padded to the batch shards) and `slots` slots with the logits
  after each row, placed as GSPMD places the sampler's outputs today (seen on the fake CPU mesh): keys and values
  over the batch axes and their kv heads over tensor (when K divides), slot positions over the batch axes, the
  logits over data only and the vocabulary over tensor (when V divides)."""
  c = dconfig
  kv_spec = parallel.logical_spec(("batch", "kv_heads", None, None), (rows, c.num_kv_heads, c.head_dim, slots),
                                  mesh)
  kv = 2 * c.num_layers * device_bytes((rows, c.num_kv_heads, c.head_dim, slots), c.dtype, kv_spec, mesh)
  positions = device_bytes((rows, slots), np.int32, P(parallel.BATCH_AXES), mesh)
  logits_spec = parallel.logical_spec(("batch", "vocab"), (rows, c.vocab_size), mesh,
                                      rules={**parallel.LOGICAL_RULES, "batch": ("data",)})
  return kv + positions + device_bytes((rows, c.vocab_size), np.float32, logits_spec, mesh)


def cache_entry(name: str, dconfig: DecoderConfig, rows: int, slots: int, mesh, phases: tuple[str, ...]) -> Entry:
  """A batch of `rows` cache rows (already padded to the batch shards): see `cache_bytes`."""
  kv_spec = parallel.logical_spec(("batch", "kv_heads", None, None),
                                  (rows, dconfig.num_kv_heads, dconfig.head_dim, slots), mesh)
  return Entry("kv_cache", f"{name}: {rows} rows", (rows, dconfig.num_kv_heads, dconfig.head_dim, slots),
               dconfig.dtype, _spec_text(kv_spec), cache_bytes(dconfig, rows, slots, mesh), 2 * dconfig.num_layers,
               phases)


def _reserve(buckets, max_new_tokens: int, rating_context: str) -> int:
  """The free slots LMStepModel keeps after a path (its __init__), the hints' tokens estimated from characters."""
  longest_hint = max(math.ceil(len(thoughts.hint(m)) / CHARS_PER_TOKEN) for m in thoughts.META_PREFIXES[1:])
  suffix = buckets.new_token_bucket(longest_hint + 16)
  step = buckets.new_token_bucket(max_new_tokens)
  if rating_context == "policy":
    return suffix + step + buckets.new_token_bucket(2)
  return max(suffix + step, buckets.new_token_bucket(max_new_tokens + 24))


def search_entries(config: ml_collections.ConfigDict, dconfig: DecoderConfig, mesh, *, question_tokens: int,
                   self_play: bool, kept_phases: tuple[str, ...]) -> list[Entry]:
  """The search's caches and temporaries (see the module docstring)."""
  sampling = config.sampling
  max_rows, max_new = int(sampling.max_rows), int(sampling.max_new_tokens)
  buckets = dataclasses.replace(search_lm.search_buckets(max_rows), rows=parallel.batch_size_multiple(mesh))
  strategy = "mcts" if self_play else config.strategy
  trees = int(config.data.problems_per_round if self_play else config.batch_size)
  if strategy == "mcts":
    depth, k, requests = int(config.mcts.max_depth), int(config.mcts.children_per_expansion), trees
    depth_field = "mcts.max_depth"
  else:   # beam-like strategies: up to n chains per problem, each a request (an upper bound for beam and dvts)
    depth, k, depth_field = int(config.beam.max_depth), 1, "beam.max_depth"
    requests = trees * (1 if strategy == "chain" else int(config.beam.n))
  path_tokens = question_tokens + (depth + 1) * LINE_TOKENS + depth * max_new
  try:
    prompt = buckets.prompt_bucket(path_tokens)
  except ValueError:
    raise ValueError(f"a search path of up to {path_tokens} tokens (a {question_tokens}-token question and "
                     f"{depth} steps of up to sampling.max_new_tokens={max_new}) exceeds the sampler's largest prompt "
                     f"bucket ({buckets.prompt[-1]}); lower {depth_field} or sampling.max_new_tokens.") from None
  # + the rating token and <end_of_rating> a row continued from its rated cache appends (LMStepModel.path_prefix)
  slots = prompt + _reserve(buckets, max_new, sampling.rating_context) + buckets.new_token_bucket(2)
  path_rows = buckets.padded_rows(min(requests, KEEP_ROWS))
  decode_rows = buckets.padded_rows(min(max_rows, requests * k))
  copies = DECODE_COPIES + (sampling.rating_context == "value")
  entries = [cache_entry("path caches, this expansion", dconfig, path_rows, slots, mesh, ("search",)),
             cache_entry("path caches kept from the last expansion", dconfig, path_rows, slots, mesh, kept_phases),
             cache_entry(f"decode caches ({copies} batches of a call)", dconfig, copies * decode_rows, slots, mesh,
                         ("search",))]
  local_decode = NamedSharding(mesh, P(parallel.BATCH_AXES)).shard_shape((decode_rows,))[0]
  entries.append(Entry("search_temp", "decode step: vocabulary-wide float32", (decode_rows, dconfig.vocab_size),
                       "float32", "estimate: batch-split", local_decode * dconfig.vocab_size * 4 * VOCAB_TEMPS,
                       VOCAB_TEMPS, ("search",)))
  chunk_rows = buckets.padded_rows(min(requests, max(1, max_rows // k)))
  local_chunk = NamedSharding(mesh, P(parallel.BATCH_AXES)).shard_shape((chunk_rows,))[0]
  per_score = 4 * (2 if dconfig.attn_logit_softcap else 1) + np.dtype(dconfig.dtype).itemsize
  entries.append(Entry("search_temp", "prefill attention scores (one layer)",
                       (chunk_rows, dconfig.num_heads, prompt, slots), "float32", "estimate: batch-split",
                       local_chunk * dconfig.num_heads * prompt * slots * per_score, 1, ("search",)))
  return entries


# ------------------------------------------------------------------------------------------------ the learner


@functools.lru_cache(maxsize=64)
def residual_bytes_per_row(model: lm.Model, learner: learner_lib.LearnerConfig,
                           experience: experience_lib.ExperienceConfig) -> int:
  """Bytes the backward pass of the learner's loss keeps per batch row: the residuals of `jax.vjp` of
  `learner.loss_and_rows` w.r.t. the trainable tree (the layer scan is not rematerialised, so every layer's
  are kept), counted from `jax.eval_shape` of the vjp closure, whose leaves they are, at one and two rows."""
  weights = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, np.dtype(model.config.param_dtype)),
                         decoder.weight_shapes(model.config), is_leaf=lambda x: isinstance(x, tuple))
  frozen, trainable = jax.eval_shape(model.split, weights, jax.random.key(0))
  spec = {**experience_lib.spec(experience), "weight": ((), np.float32)}

  def residuals(rows: int) -> int:
    batch = {name: jax.ShapeDtypeStruct((rows, *shape), dtype) for name, (shape, dtype) in spec.items()}

    def pullback(trainable, frozen, batch):
      def loss(t):
        return learner_lib.loss_and_rows(model, frozen, t, batch, config=learner, experience=experience,
                                         rating_ids=(0, 1))[0]
      return jax.vjp(loss, trainable)[1]
    leaves = jax.tree.leaves(jax.eval_shape(pullback, trainable, frozen, batch))
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in leaves)
  return residuals(2) - residuals(1)


def learner_entries(config: ml_collections.ConfigDict, dconfig: DecoderConfig, trees: _Trees, mesh, frozen_sh,
                    trainable_sh) -> list[Entry]:
  """The learner step's batch, activations and temporaries (phase "learn")."""
  phases = ("learn",)
  learner = config.learner
  experience = selfplay.experience_config(config)
  shards = parallel.batch_size_multiple(mesh)
  rows, accumulate = int(learner.batch_size), int(learner.accumulate)
  local_rows = rows // shards
  micro_rows = max(1, local_rows // accumulate)
  T = experience.seq_len
  batch_spec = P(parallel.BATCH_AXES)
  fields = {**experience_lib.spec(experience), "weight": ((), np.float32)}
  row_bytes = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in fields.values())
  entries = [Entry("learner_batch", f"{len(fields)} replay fields", (rows, T), "mixed", _spec_text(batch_spec),
                   local_rows * row_bytes, len(fields), phases)]
  per_row = residual_bytes_per_row(trees.model, selfplay.learner_config(config), experience)
  entries.append(Entry("activations", f"backward residuals: {micro_rows} rows of a micro-batch", (micro_rows, T),
                       "mixed", "estimate: batch-split", int(micro_rows * per_row * ACTIVATION_OVERHEAD), 1,
                       phases))
  trainable = sum(e.bytes for e in _tree_entries("trainable", trees.trainable, trainable_sh, phases))
  entries.append(Entry("step_temp", "gradients and updates (like trainable)", (), "mixed", "like trainable",
                       2 * trainable, 2, phases))
  if accumulate > 1:
    entries.append(Entry("step_temp", "gradient accumulator", (), "mixed", "like trainable", trainable, 1, phases))
  if trees.model.lora is not None:
    frozen_entries = {e.name: e for e in _tree_entries("frozen", trees.frozen, frozen_sh, phases)}
    targets = sum(frozen_entries[f"layers/{t}"].bytes for t in trees.model.lora.targets)
    entries.append(Entry("step_temp", "LoRA-merged target weights + cotangents", (), dconfig.param_dtype,
                         "like frozen", 2 * targets, 2 * len(trees.model.lora.targets), phases))
    embed = frozen_entries["embed"]
    entries.append(Entry("step_temp", "embedding with new rows + cotangent", embed.shape, embed.dtype, "like frozen",
                         2 * embed.bytes, 2, phases))
  return entries


def replay_entries(config: ml_collections.ConfigDict) -> list[Entry]:
  """The replay buffer's arrays (host memory of every process)."""
  capacity = int(config.replay.capacity)
  fields = experience_lib.spec(selfplay.experience_config(config))
  entries = [Entry("replay", f"rows.{name}", (capacity, *shape), str(np.dtype(dtype)), "host",
                   capacity * math.prod(shape) * np.dtype(dtype).itemsize, 1, ()) for name, (shape, dtype)
             in fields.items()]
  leaves = 1 << (capacity - 1).bit_length()
  entries.append(Entry("replay", "priorities + sum tree", (capacity + 2 * leaves,), "float64", "host",
                       8 * (capacity + 2 * leaves), 2, ()))
  return entries


# ------------------------------------------------------------------------------------------------- advice


def advice(config: ml_collections.ConfigDict, topology: Topology, **plan_kwargs) -> str | None:
  """None when `config` fits `topology`, else one sentence: why not, and the first change that makes it fit.

  Changes are tried in this order, each alone: a mesh with more fsdp (then tensor), a smaller search batch
  (sampling.max_rows, then data.problems_per_round / batch_size), more learner micro-batches, the bottom half of
  the layers frozen, LoRA instead of a full fine-tune; then the mesh's and the learner's together.
  """
  report = plan(config, topology, **plan_kwargs)
  if report.fits:
    return None
  parts = sorted(report.section_bytes(report.peak_phase).items(), key=lambda kv: -kv[1])
  head = (f"{report.kind} with {report.model} does not fit {topology.name} ({topology.chips} chips x "
          f"{_gib(topology.hbm_bytes)}): its {report.peak_phase} phase needs {_gib(report.peak)} on the fullest "
          f"device of {_gib(topology.usable_bytes)} usable, {parts[0][0]} ({_gib(parts[0][1])}) the largest part")
  for change, candidate_config in _remedies(config, topology, report):
    try:
      candidate = plan(candidate_config, topology, **plan_kwargs)
    except ValueError:
      continue
    if candidate.fits:
      return f"{head}; {change} ({candidate.mesh_text}: {_gib(candidate.peak)} per device)."
  if report.load == "device" and parts[0][0] == "checkpoint":
    return (f"{head}; no mesh or batch setting changes that, because o1jax.pretrained.load reads the whole "
            "checkpoint onto one device before sharding it: use a chip with more HBM or a smaller model.")
  return (f"{head}; no change of mesh, search batch, learner micro-batches, frozen layers or LoRA makes it fit: use "
          "a chip with more HBM or a smaller model.")


def _remedies(config: ml_collections.ConfigDict, topology: Topology, report: Plan
              ) -> Iterator[tuple[str, ml_collections.ConfigDict]]:
  """(what to change, the changed config), in the order `advice` tries them."""
  def changed(**fields) -> ml_collections.ConfigDict:
    out = copy.deepcopy(config)
    for path, value in fields.items():
      node = out
      *parents, leaf = path.split("__")
      for p in parents:
        node = node[p]
      node[leaf] = value
    return out

  if report.kind == "self-play":
    for fsdp, tensor in mesh_candidates(topology.chips):
      if tensor == report.mesh["tensor"] and fsdp > report.mesh["fsdp"]:
        yield f"raise mesh.fsdp to {fsdp}", changed(mesh__data=-1, mesh__fsdp=fsdp, mesh__tensor=tensor)
    for fsdp, tensor in mesh_candidates(topology.chips):
      if tensor > report.mesh["tensor"]:
        yield (f"set mesh.fsdp={fsdp} and mesh.tensor={tensor}",
               changed(mesh__data=-1, mesh__fsdp=fsdp, mesh__tensor=tensor))
  rows = int(config.sampling.max_rows) // 2
  while rows >= 1:
    yield (f"lower sampling.max_rows to {rows} (children per sampler call)", changed(sampling__max_rows=rows))
    rows //= 2
  field = "data__problems_per_round" if report.kind == "self-play" else "batch_size"
  trees = (int(config.data.problems_per_round) if report.kind == "self-play" else int(config.batch_size)) // 2
  while trees >= 1:
    yield f"lower {field.replace('__', '.')} to {trees} (trees searched together)", changed(**{field: trees})
    trees //= 2
  if report.kind == "self-play":
    accumulate = int(config.learner.accumulate) * 2
    while accumulate <= int(config.learner.batch_size):
      yield (f"raise learner.accumulate to {accumulate} (the same batch in smaller micro-batches)",
             changed(learner__accumulate=accumulate))
      accumulate *= 2
    half = report.decoder.num_layers // 2
    if int(config.model.frozen_layers) < half:
      yield (f"freeze the bottom half of the layers (model.frozen_layers={half}: no gradient and no activations "
             "kept there)", changed(model__frozen_layers=half))
    if report.lora is None:
      yield ("train a LoRA (lora.rank=16) instead of every weight",
             changed(lora__rank=16, lora__alpha=32.0))
    # All of the learner's and the mesh's at once: weights over every chip, micro-batches of one row per device.
    tensor = report.mesh["tensor"]
    fsdp = topology.chips // tensor
    rows = -(-int(config.learner.batch_size) // fsdp) * fsdp
    yield (f"together: mesh.fsdp={fsdp}, learner.batch_size={rows}, learner.accumulate={rows // fsdp}, "
           f"model.frozen_layers={max(half, int(config.model.frozen_layers))}",
           changed(mesh__data=-1, mesh__fsdp=fsdp, learner__batch_size=rows, learner__accumulate=rows // fsdp,
                   model__frozen_layers=max(half, int(config.model.frozen_layers))))


def mesh_candidates(chips: int) -> list[tuple[int, int]]:
  """(fsdp, tensor) pairs of power-of-two sizes that divide `chips`, least model parallelism first: tensor 1
  with fsdp 1, 2, 4, ..., then tensor 2, ... (data takes the rest)."""
  out = []
  tensor = 1
  while tensor <= chips:
    fsdp = 1
    while fsdp * tensor <= chips:
      if chips % (fsdp * tensor) == 0:
        out.append((fsdp, tensor))
      fsdp *= 2
    tensor *= 2
  return out


# -------------------------------------------------------------------------------------------------- the table


def fitting_plan(config: ml_collections.ConfigDict, topology: Topology, **plan_kwargs) -> Plan:
  """The plan of the first mesh of `mesh_candidates` that fits, or, when none fits, the one with the smallest
  peak. For a self-play config each mesh gets learner.batch_size rounded up to its batch shards and micro-batches
  of one row per device (learner.accumulate = the rows per device); a solve config runs on the all-data mesh."""
  best = None
  for fsdp, tensor in mesh_candidates(topology.chips):
    candidate_config = copy.deepcopy(config)
    if "learner" in config:
      candidate_config.mesh.data, candidate_config.mesh.fsdp, candidate_config.mesh.tensor = -1, fsdp, tensor
      shards = topology.chips // tensor
      rows_per_device = -(-int(config.learner.batch_size) // shards)
      candidate_config.learner.batch_size = rows_per_device * shards
      candidate_config.learner.accumulate = rows_per_device
    elif (fsdp, tensor) != (1, 1):
      continue
    try:
      candidate = plan(candidate_config, topology, **plan_kwargs)
    except ValueError:
      continue
    if candidate.fits:
      return candidate
    if best is None or candidate.peak < best.peak:
      best = candidate
  if best is None:
    raise ValueError(f"no mesh of {topology.name} passes the config's checks.")
  return best


def markdown_table(config: ml_collections.ConfigDict, models: list[str], topologies: list[str],
                   **plan_kwargs) -> str:
  """A README table: for each model preset and topology, whether `config` fits and on which mesh (the first of
  `mesh_candidates` that does, see `fitting_plan`), with the checkpoint loaded as o1jax does today and with a
  loader that shards as it reads. Self-play configs train the LoRA of the top half of each model's layers."""
  lines = ["| model | slice | chips x HBM | fits today | mesh (data, fsdp, tensor) | GiB per device (phase) "
           "| fits, sharded load | mesh | GiB per device (phase) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for model in models:
    model_config = copy.deepcopy(config)
    if "learner" in config:
      model_config.model.frozen_layers = presets.get(model).num_layers // 2
    for name in topologies:
      top = topology(name)
      cells = [model, top.name, f"{top.chips} x {top.hbm_bytes // GiB} GiB"]
      for load in LOADS:
        p = fitting_plan(model_config, top, preset=model, load=load, **plan_kwargs)
        mesh = f"{p.mesh['data']}, {p.mesh['fsdp']}, {p.mesh['tensor']}"
        cells += ["yes" if p.fits else "no", mesh if p.fits else f"best: {mesh}",
                  f"{p.peak / GiB:.1f} ({p.peak_phase})"]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
