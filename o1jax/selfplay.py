"""Self-play rounds: search -> experience -> replay -> learner steps -> checkpoint -> the sampler gets the new weights.

  job = selfplay.prepare(config, workdir)      # every config value checked first, then the model, the checkpoint
  job.run()                                   # rounds from the last checkpoint on

Each round searches the next `data.problems_per_round` problems of the training split with LLaMA-O1's MCTS, the
ground truths given (outcome checks, patience, rectification; the ground-truth hint only if the config turns
it on), turns every non-root node into a row of experience (o1jax/learn/experience.py), adds the rows to the
prioritized replay with |advantage| as priority, takes `learner.steps_per_round` sharded learner steps on
batches sampled from it (o1jax/learn/learner.py; priorities updated from |per-row loss|), and checkpoints the
whole state: the trainable weights, the optimizer state, the replay's arrays, the round (which is also the
position in the problem split) and the learner step. The search of round r draws from seed + r, the replay's
batches from its seed and its sample step, so a run killed anywhere and started again with the same command
redoes the unfinished round exactly: it ends in the state an uninterrupted run reaches.

Metrics go to {workdir}/metrics.jsonl and TensorBoard (o1jax/learn/loop.py's writer): per learner step the losses,
PPO ratio statistics, clip fraction, value accuracy; per round the solve rate (trees that found a correct answer),
nodes, tokens and tokens/s. Trees go to {workdir}/trees/round_<r>/<index>.json. On a multi-host job every
process runs the same rounds on the same values, the devices of all processes form one mesh, each process feeds
its own slice of every learner batch, and only process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from o1jax import adapter as adapter_lib
from o1jax import checkpoint, parallel, pretrained
from o1jax.data import problems as problems_lib
from o1jax.learn import experience as experience_lib
from o1jax.learn import learner as learner_lib
from o1jax.learn import lm, loop, replay as replay_lib
from o1jax.sampling.sampler import Sampler, SamplingParams
from o1jax.search import lm as search_lm
from o1jax.search import mcts
from o1jax.search.result import Problem


def search_config(config: ml_collections.ConfigDict, round_index: int = 0) -> mcts.MCTSConfig:
  fields = dict(config.mcts)
  fields["random_factor"] = tuple(fields["random_factor"])
  return mcts.MCTSConfig(**fields, max_step_tokens=config.sampling.max_new_tokens, seed=config.seed + round_index)


def experience_config(config: ml_collections.ConfigDict) -> experience_lib.ExperienceConfig:
  return experience_lib.ExperienceConfig(**config.experience, rating_context=config.sampling.rating_context,
                                         pairs=config.learner.rating_loss == "pairwise")


def learner_config(config: ml_collections.ConfigDict) -> learner_lib.LearnerConfig:
  fields = {k: v for k, v in config.learner.items() if k not in ("batch_size", "steps_per_round")}
  return learner_lib.LearnerConfig(**fields, max_targets=config.sampling.max_new_tokens + 1)


def optimizer_config(config: ml_collections.ConfigDict) -> lm.OptimizerConfig:
  total = config.rounds * config.learner.steps_per_round
  fields = dict(config.optimizer)
  fields["restarts"] = tuple(fields.get("restarts", ()))
  return lm.OptimizerConfig(**{**fields, "total_steps": total})


def check(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Every config value, before any file is read: one sentence per bad value."""
  search_config(config)
  experience_config(config)
  learner_config(config)
  optimizer_config(config)
  SamplingParams(temperature=config.sampling.temperature, top_p=config.sampling.top_p)
  for name in ("rounds", "data.problems_per_round", "learner.batch_size", "learner.steps_per_round",
               "replay.capacity"):
    value = config
    for part in name.split("."):
      value = value[part]
    if value < 1:
      raise ValueError(f"{name}={value} must be >= 1.")
  shards = parallel.batch_size_multiple(mesh) * config.learner.accumulate
  if config.learner.batch_size % shards:
    raise ValueError(f"learner.batch_size={config.learner.batch_size} does not split into learner.accumulate="
                     f"{config.learner.accumulate} micro-batches over the mesh's "
                     f"{parallel.batch_size_multiple(mesh)} batch shards (needs a multiple of {shards}).")
  if config.mcts.ground_truth_hint and config.sampling.rating_context != "value":
    raise ValueError("mcts.ground_truth_hint puts the answer in the policy prompt; rate with "
                     "sampling.rating_context='value' so that the values never see it.")


@dataclasses.dataclass
class Job:
  """A prepared self-play run (see the module docstring)."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  loaded: pretrained.Loaded
  model: lm.Model
  learner: learner_lib.Learner
  frozen: Any
  state: dict
  replay: replay_lib.PrioritizedReplayBuffer
  checkpointer: checkpoint.Checkpointer
  round: int
  sampler: Sampler
  step_model: search_lm.LMStepModel
  reference: Any = None   # the KL term's reference policy (learner.kl_coef > 0): the trainable weights of round 0

  def full_state(self) -> dict:
    """What a checkpoint holds: the train state, the replay's arrays and the round."""
    return {**self.state, "replay": self.replay.state(), "round": np.asarray(self.round, np.int32)}

  def run(self, *, progress: bool = True) -> dict[str, float]:
    """Runs the remaining rounds; returns the last round's metrics."""
    config = self.config
    writer = loop.MetricsWriter(self.workdir)
    last: dict[str, float] = {}
    try:
      for r in tqdm.trange(self.round, config.rounds, desc="self-play rounds", unit="round",
                           initial=self.round, total=config.rounds, disable=not progress):
        last = self._round(r, writer, progress)
        self.round = r + 1
        self.checkpointer.save(self.round, self.full_state(), metadata={"round": self.round,
                                                                         "step": int(self.state["step"])},
                               force=True)
        self.checkpointer.wait()
        self.sampler.set_weights(self.model.merged(self.frozen, self.state["trainable"]))
        self.write_adapter()
    finally:
      self.checkpointer.close()
      writer.close()
    return last

  @property
  def adapter_path(self) -> str:
    return os.path.join(self.workdir, "adapter.safetensors")

  def write_adapter(self) -> None:
    """The trained LoRA and new token rows as {workdir}/adapter.safetensors (process 0; LoRA runs only), which
    `o1jax.pretrained.load(..., adapter=...)` and `launch.solve --config.model.adapter=...` apply."""
    if self.model.lora is None or not parallel.is_writer():
      return
    trainable = parallel.to_host(self.state["trainable"])
    temporary = self.adapter_path + ".tmp"
    lm.write_adapter(temporary, self.model, trainable, base=self.config.model.path,
                     special_tokens=self.loaded.special_tokens, dtype="float32")
    os.replace(temporary, self.adapter_path)   # a reader never sees half a file

  def _round(self, r: int, writer, progress: bool) -> dict[str, float]:
    config = self.config
    P = config.data.problems_per_round
    data = problems_lib.load(config.data.split, config.data.start + r * P, P)
    if not data:
      raise ValueError(f"{config.data.split} has no problems from {config.data.start + r * P} on (round {r}).")
    problems = [Problem(id=p.uid, question=p.question, ground_truth=p.answer) for p in data]
    start = time.perf_counter()
    results = mcts.search(self.step_model, problems, search_config(config, r), mesh=self.mesh, progress=progress)
    search_s = time.perf_counter() - start
    _crash_point(f"after_search:{r}")
    rows = experience_lib.rows_from_results(results, self.step_model.prompts, self.learner.experience,
                                            experience_lib.search_hint(config.mcts.ground_truth_hint,
                                                                       config.mcts.llama_o1_compat))
    if len(rows):
      keep = slice(max(0, len(rows) - self.replay.capacity), None)
      self.replay.add({k: v[keep] for k, v in rows.fields.items()}, rows.priorities[keep])
    if parallel.is_writer():
      directory = os.path.join(self.workdir, "trees", f"round_{r}")
      os.makedirs(directory, exist_ok=True)
      for index, result in zip(range(config.data.start + r * P, config.data.start + (r + 1) * P), results):
        with open(os.path.join(directory, f"{index}.json"), "w") as f:
          json.dump(result.to_json(), f)
    solved = sum(bool((res.tree.outcome[0] == 1).any()) for res in results)
    tokens = sum(res.usage.generated + res.usage.prompted + res.usage.scored for res in results)
    round_metrics = dict(round=r, solve_rate=solved / len(results), nodes=float(np.mean([res.num_nodes for res in results])),
                         rows=len(rows), rows_too_long=rows.skipped_long, replay_rows=len(self.replay),
                         tokens=tokens, search_tokens_per_s=tokens / max(search_s, 1e-9), search_s=search_s)
    for s in range(config.learner.steps_per_round):
      step = int(self.state["step"])
      batch = self.replay.sample(config.learner.batch_size)
      host = {**batch.rows, "weight": batch.weights.astype(np.float32)}
      self.state, per_row, metrics = self.learner.step(self.frozen, self.state, self._global_batch(host),
                                                       self.reference)
      metrics = {k: float(v) for k, v in parallel.to_host(metrics).items()}
      for name in ("loss", "grad_norm"):
        if not math.isfinite(metrics[name]):
          raise FloatingPointError(f"learner {name} is {metrics[name]} at step {step + 1} (round {r}); the run "
                                   f"stopped before checkpointing it, and checkpoint round {self.round} in "
                                   f"{self.checkpointer.directory!r} holds the last good state.")
      self.replay.update_priorities(batch.indices, parallel.to_host(per_row))
      writer.write(step + 1, "train", dict(metrics, beta=batch.beta))
    writer.write(int(self.state["step"]), "round", round_metrics)
    return round_metrics

  def _global_batch(self, host: dict) -> dict:
    """Each process's slice of the (identical on every process) batch, as global arrays."""
    count, index = jax.process_count(), jax.process_index()
    out = {}
    for name, rows in host.items():
      local = np.array_split(rows, count)[index]
      out[name] = parallel.put_local(local, self.learner.batch_shardings({name: rows})[name])
    return out


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Job:
  """Checks the config, loads the model (and the adapter it starts from) and restores the last checkpoint."""
  mesh = parallel.make_mesh(data=None if config.mesh.data <= 0 else config.mesh.data, fsdp=config.mesh.fsdp,
                            tensor=config.mesh.tensor)
  check(config, mesh)
  # The adapter (a few MB) is read before the model, so that a missing or corrupt file fails at once.
  adapter_file = adapter_lib.read(config.model.adapter) if config.model.adapter else None
  loaded = pretrained.load(config.model.path, dtype=config.model.dtype)
  if adapter_file is not None:
    lora = adapter_file.config
  elif config.lora.rank > 0:
    lora = adapter_lib.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets))
  else:
    lora = None   # a full fine-tune
  model = lm.Model(config=loaded.model.config, base_vocab=loaded.base_vocab, lora=lora,
                   frozen_layers=config.model.frozen_layers)
  frozen, trainable = model.split(loaded.model.weights(), jax.random.key(config.seed))
  if adapter_file is not None:
    trainable = lm.trainable_from_adapter(config.model.adapter, model, trainable, loaded, config.model.path,
                                          what="model.adapter")
  optimizer = optimizer_config(config).make()
  rating_ids = tuple(loaded.tokenizer.token_to_id(t) for t in ("<positive_rating>", "<negative_rating>"))
  learner = learner_lib.Learner(model, optimizer, mesh, learner_config(config), experience_config(config),
                                rating_ids)
  frozen, state = learner.place(frozen, lm.init_state(trainable, optimizer))
  # The KL reference is the policy the run started from (the adapter or fresh LoRA above), also after a resume;
  # a copy, since every step donates the state's buffers.
  reference = jax.tree.map(jnp.copy, state["trainable"]) if config.learner.kl_coef > 0 else None
  replay = replay_lib.PrioritizedReplayBuffer(experience_lib.spec(learner.experience), config.replay.capacity,
                                              alpha=config.replay.alpha, beta_start=config.replay.beta_start,
                                              beta_steps=config.replay.beta_steps, seed=config.seed)
  if parallel.is_writer():
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep)
  round_index = 0
  # A failed restore is not followed by checkpointer.close(): orbax's asyncio loop would then close under the
  # tensorstore reads still in flight, whose threads print tracebacks after the one-sentence error.
  if checkpointer.latest_step() is not None:
    target = {**state, "replay": replay.state(), "round": np.zeros((), np.int32)}
    restored, _, _ = checkpointer.restore(target=target)
    replay.load_state({k: np.asarray(v) for k, v in restored.pop("replay").items()})
    round_index = int(restored.pop("round"))
    state = restored
  sampler = Sampler(loaded.model, vocab=loaded.tokenizer.vocab(), mesh=mesh,
                    buckets=search_lm.search_buckets(config.sampling.max_rows))
  sampler.set_weights(model.merged(frozen, state["trainable"]))   # the learner's weights, not the base model's
  step_model = search_lm.LMStepModel(sampler, loaded.tokenizer, max_new_tokens=config.sampling.max_new_tokens,
                                     params=SamplingParams(temperature=config.sampling.temperature,
                                                           top_p=config.sampling.top_p),
                                     rating_context=config.sampling.rating_context, max_rows=config.sampling.max_rows,
                                     compact_every=config.sampling.compact_every, seed=config.seed)
  return Job(config=config, workdir=workdir, mesh=mesh, loaded=loaded, model=model, learner=learner, frozen=frozen,
             state=state, replay=replay, checkpointer=checkpointer, round=round_index, sampler=sampler,
             step_model=step_model, reference=reference)


def _crash_point(name: str) -> None:
  """Fault injection for the resume tests: O1JAX_CRASH_AT=<name> kills this process here with SIGKILL, as a
  preempted TPU VM or an out-of-memory kill would (no cleanup, no final checkpoint)."""
  if os.environ.get("O1JAX_CRASH_AT") == name:
    os.kill(os.getpid(), signal.SIGKILL)
