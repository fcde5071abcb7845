"""Format pretraining: teach a decoder the LLaMA-O1 node format and its rating tokens (launch/pretrain.py runs it).

LLaMA-O1 got its policy-and-value model by continued pretraining on OpenLongCoT trees. This does the same on
trees built from GSM8K (and MATH) solutions by `o1jax.data.corpus`, with three kinds of records:
  - whole trees (next-token loss on every token): the node syntax, step chains, critics, refinements;
  - (policy prompt, step) pairs, loss on the step only: the exact prompt layout the search sends, ending at
    `<end_of_thought>`;
  - (rating prompt, rating) pairs with matched correct and corrupted steps, loss on the rating only: what the
    value head (the two rating logits) learns from.

The steps run in `o1jax.learn.loop`, so the run is resumable: the train state and the data iterator's position
are checkpointed together every `checkpoint.every` steps, and a restarted run continues at the same step with
the same next batch. Metrics go to TensorBoard event files and to metrics.jsonl in the work directory; a
non-finite loss or gradient norm stops the run before it is checkpointed. At the end the adapter (LoRA matrices
plus the new token rows) is written as one safetensors file (`o1jax.adapter.write`) that
`o1jax.pretrained.load` applies on top of the base model.

`run` is `train(prepare(config, workdir))`: `prepare` reads and checks every input (the config first, then the
model, an init adapter, the data and the checkpoint directory), so that a launcher can report a bad one as a
user error and leave what goes wrong in `train` its traceback.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from o1jax import adapter, checkpoint, parallel, pretrained, thoughts
from o1jax.data import corpus, pipeline, problems as problems_lib
from o1jax.learn import lm, loop


def build_records(split: str, count: int | None, seed: int, *, trees: bool = True, policy: bool = True,
                  rating: bool = True) -> list[Any]:
  """The training records of `split`'s problems: tree texts (str) and (prompt, target) pairs.

  Deterministic from `seed`: problem i uses the generator seeded with (seed, i).
  """
  problems = problems_lib.load(split, 0, count)
  records: list[Any] = []
  for i, problem in enumerate(problems):
    rng = np.random.default_rng([seed, i])
    if trees:
      records.append(corpus.tree_text(problem, rng))
    if policy:
      records.extend(corpus.policy_examples(problem, rng))
    if rating:
      for prompt, is_correct in corpus.rating_examples(problem, rng):
        records.append((prompt, rating_target(is_correct)))
  return records


def rating_target(is_correct: bool) -> str:
  """What follows a rating prompt (which ends in `<start_of_rating>`) for a correct or a wrong step."""
  return thoughts.rating_token(is_correct) + "<end_of_rating>"


def _optimizer_config(config: ml_collections.ConfigDict) -> lm.OptimizerConfig:
  o = config.optimizer
  return lm.OptimizerConfig(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
                            total_steps=config.train.steps, final_fraction=o.final_fraction,
                            weight_decay=o.weight_decay, clip_norm=o.clip_norm,
                            restarts=tuple(o.restarts))


def _lora_config(config: ml_collections.ConfigDict) -> adapter.LoraConfig | None:
  if not config.lora.rank:
    return None
  return adapter.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets))


def _host_metrics(metrics: dict) -> dict[str, float]:
  return {name: float(value) for name, value in jax.device_get(metrics).items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains for config.train.steps steps (resuming from workdir's latest checkpoint) and writes the adapter.

  `train(prepare(config, workdir))`. Returns the last logged train metrics.
  """
  return train(prepare(config, workdir))


@dataclasses.dataclass
class Prepared:
  """A run with its inputs read and checked (by `prepare`), ready to `train`.

  Attributes:
    config: the experiment config.
    workdir: checkpoints, metrics and TensorBoard events.
    base: the base model with the format's special tokens.
    model: what trains (LoRA, frozen layers) on top of the base weights.
    mesh: the device mesh the batch splits over.
    rating_ids: (positive, negative) ids for train.loss="rating", else None.
    optimizer_config, optimizer: the schedule and optimizer settings, and the optax optimizer made from them.
    frozen, state: the frozen weights and the train state (restored from the latest checkpoint, if any),
      replicated over the mesh.
    train_iter: the training batches, from the checkpointed position (`loop.resume`).
    eval_data: the held-out batches.
    checkpointer: open on workdir/checkpoints; `train` closes it.
  """

  config: ml_collections.ConfigDict
  workdir: str
  base: pretrained.Loaded
  model: lm.Model
  mesh: jax.sharding.Mesh
  rating_ids: tuple[int, int] | None
  optimizer_config: lm.OptimizerConfig
  optimizer: Any
  frozen: Any
  state: Any
  train_iter: Any
  eval_data: Any
  checkpointer: checkpoint.Checkpointer


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Prepared:
  """Checks the config, loads the base model and the data, and restores the latest checkpoint.

  Everything that reads an input (the config, the model, an init adapter, the data, the checkpoint directory)
  happens here, so that a bad one fails before training starts; the config alone is checked first, before
  any file is read.
  """
  if config.output.adapter_path and not config.lora.rank:
    raise ValueError(f"output.adapter_path={config.output.adapter_path!r} needs LoRA training (lora.rank > 0); "
                     "set it to '' for a full fine-tune.")
  lora_config = _lora_config(config)
  kinds = dict(trees="trees" in config.data.kinds, policy="policy" in config.data.kinds,
               rating="rating" in config.data.kinds)
  if not any(kinds.values()) or set(config.data.kinds) - set(kinds):
    raise ValueError(f"data.kinds={tuple(config.data.kinds)!r}; expected a non-empty subset of {tuple(kinds)}.")
  _check_loss(config)
  mesh = parallel.make_mesh()
  if config.data.batch_size % parallel.batch_size_multiple(mesh):
    raise ValueError(f"data.batch_size={config.data.batch_size} does not split over the mesh's "
                     f"{parallel.batch_size_multiple(mesh)} batch shards.")
  optimizer_config = _optimizer_config(config)
  os.makedirs(workdir, exist_ok=True)
  if loop.is_writer():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  base = pretrained.load(config.model.path, dtype=config.model.dtype)
  tokenizer = base.tokenizer
  model = lm.Model(config=base.model.config, base_vocab=base.base_vocab, lora=lora_config,
                   frozen_layers=config.train.frozen_layers)
  rating_ids = _rating_ids(config, tokenizer)
  records = build_records(config.data.split, config.data.count, config.data.seed, **kinds)
  train_data = pipeline.text_dataset(records, tokenizer.encode, seq_len=config.data.seq_len,
                                     batch_size=config.data.batch_size, seed=config.data.seed,
                                     shuffle=config.data.shuffle, num_epochs=None)
  eval_records = build_records(config.eval.split, config.eval.count, config.data.seed + 1, **kinds)
  eval_data = pipeline.text_dataset(eval_records, tokenizer.encode, seq_len=config.data.seq_len,
                                    batch_size=config.data.batch_size, seed=0, shuffle=False, num_epochs=1)

  optimizer = optimizer_config.make()
  frozen, trainable = model.split(base.model.weights(), jax.random.key(config.train.seed))
  if config.train.init_adapter:
    trainable = lm.trainable_from_adapter(config.train.init_adapter, model, trainable, base, config.model.path,
                                           what="train.init_adapter")
  state = lm.init_state(trainable, optimizer)
  replicated = parallel.replicated(mesh)
  frozen, state = jax.device_put((frozen, state), replicated)
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=config.checkpoint.every,
                                         keep=config.checkpoint.keep)
  try:
    train_iter = pipeline.iterator(train_data)
    state, start, _ = loop.resume(checkpointer, state, train_iter)
    if start and loop.is_writer():
      print(f"resumed from step {start} in {workdir}")
  except BaseException:
    checkpointer.close()
    raise
  return Prepared(config=config, workdir=workdir, base=base, model=model, mesh=mesh, rating_ids=rating_ids,
                  optimizer_config=optimizer_config, optimizer=optimizer, frozen=frozen, state=state,
                  train_iter=train_iter, eval_data=eval_data, checkpointer=checkpointer)


def train(prepared: Prepared) -> dict[str, float]:
  """Runs the training steps of a prepared run from its restored step (`loop.run`: checkpoints, metrics, a stop
  at a non-finite loss), closes its checkpointer and writes the adapter.

  Returns the last logged train metrics.
  """
  p = prepared
  config, model, mesh, rating_ids, frozen = p.config, p.model, p.mesh, p.rating_ids, p.frozen
  train_step = lm.make_train_step(model, p.optimizer, mesh, rating_ids)
  schedule = p.optimizer_config.schedule()
  started = time.perf_counter()
  tokens_seen = 0.0

  def step_fn(state, batch):
    return train_step(frozen, state, parallel.shard_batch(batch, mesh))

  def summarize(window: Sequence[dict[str, float]], step: int) -> dict[str, float]:
    nonlocal tokens_seen
    tokens_seen += sum(m["tokens"] for m in window)
    return {"loss": float(np.mean([m["loss"] for m in window])),
            "accuracy": float(np.mean([m["accuracy"] for m in window])),
            "grad_norm": float(np.mean([m["grad_norm"] for m in window])),
            "learning_rate": float(schedule(step - 1)),  # the rate of the window's last update
            "target_tokens_per_s": tokens_seen / (time.perf_counter() - started)}

  def evaluate(state) -> dict[str, float]:
    return evaluate_loss(model, frozen, state["trainable"], p.eval_data, mesh, config.eval.batches, rating_ids)

  try:
    state, last = loop.run(step_fn, p.state, p.train_iter, start=int(p.state["step"]), steps=config.train.steps,
                           workdir=p.workdir, checkpointer=p.checkpointer, log_every=config.train.log_every,
                           summarize=summarize, evaluate=evaluate, eval_every=config.eval.every,
                           finite=("loss", "grad_norm"), metadata={"workdir": p.workdir}, desc="pretrain",
                           postfix=("loss", "accuracy"))
  finally:
    p.checkpointer.close()

  if config.output.adapter_path and loop.is_writer():
    write_adapter(config.output.adapter_path, model, state["trainable"], base=config.model.path,
                  special_tokens=p.base.special_tokens, dtype=config.output.adapter_dtype)
    print(f"adapter written to {config.output.adapter_path}")
  return last


def evaluate_loss(model: lm.Model, frozen, trainable, data, mesh, max_batches: int,
                  rating_ids: tuple[int, int] | None = None) -> dict[str, float]:
  """Token-weighted mean loss and accuracy over up to max_batches batches of `data` (from its start)."""
  loss_sum = hits = count = 0.0
  for i, batch in enumerate(data):
    if i >= max_batches:
      break
    m = _host_metrics(lm.eval_loss(model, frozen, trainable, parallel.shard_batch(batch, mesh), rating_ids))
    loss_sum += m["loss"] * m["tokens"]
    hits += m["accuracy"] * m["tokens"]
    count += m["tokens"]
  return {"loss": loss_sum / max(count, 1.0), "accuracy": hits / max(count, 1.0)}


def _check_loss(config: ml_collections.ConfigDict) -> None:
  """train.loss names a loss, and "rating" trains on rating records only."""
  if config.train.loss not in ("next_token", "rating"):
    raise ValueError(f"train.loss={config.train.loss!r}; expected 'next_token' or 'rating'.")
  if config.train.loss == "rating" and tuple(config.data.kinds) != ("rating",):
    raise ValueError("train.loss='rating' trains on rating records only; got "
                     f"data.kinds={tuple(config.data.kinds)!r}.")


def _rating_ids(config: ml_collections.ConfigDict, tokenizer) -> tuple[int, int] | None:
  """(positive, negative) rating ids for train.loss="rating", None for "next_token" (see `_check_loss`)."""
  if config.train.loss == "next_token":
    return None
  return tokenizer.token_to_id(thoughts.POSITIVE_RATING), tokenizer.token_to_id(thoughts.NEGATIVE_RATING)


write_adapter = lm.write_adapter  # the adapter file of a run (kept here for callers of pretrain.write_adapter)
