"""Next-token training of the decoder: what is trainable, the loss, and one jitted, sharded train step.

Legend: B rows, T time, V vocab (base + new tokens), D model dim, R new token rows.

Two ways to train, picked by `LoraConfig` (None = full):
  - full: every weight is trainable; the trainable tree is the decoder's weights dict.
  - LoRA: the base weights are frozen; the trainable tree is {"adapter": LoRA matrices, "new_rows": [R, D]} plus
    "new_head": [D, R] for an untied head. The rows of the tokens added to the vocabulary (the LLaMA-O1 special
    tokens) must learn too, or every special token would stay at the mean embedding; they are the only
    non-LoRA parameters that train, and they travel with the adapter.

In LoRA mode the vocabulary head is computed as two products, frozen base rows and trainable new rows, and the
logits concatenated. Slicing the new rows' gradient out of a gradient for the whole [V, D] table would cost a
second vocabulary-sized matmul per step for R = 17 rows.

Batches come from `o1jax.data.pipeline.text_dataset`: {"tokens": int32 [B, T], "valid": bool [B, T],
"loss_mask": bool [B, T]}; loss_mask[b, t] says that tokens[b, t + 1] is a target.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from models import decoder, layers
from models.config import DecoderConfig
from o1jax import adapter, parallel, value as value_lib

Tree = Any


@dataclasses.dataclass(frozen=True)
class Model:
  """How to build decoder weights from (frozen, trainable) trees.

  Attributes:
    config: the decoder config (vocab_size includes the new rows).
    base_vocab: rows of the embedding that stay frozen in LoRA mode (the tokenizer's vocabulary before the
      special tokens were added); the rows after it are the new rows.
    lora: the LoRA config, or None to train every weight.
    frozen_layers: the bottom layers that get no gradient (`decoder.forward`'s frozen_layers): their weights
      (or adapter factors) stay as they are, and the backward pass stops above them. The new token rows then
      learn only through the head (a tied one), not as inputs.
  """

  config: DecoderConfig
  base_vocab: int
  lora: adapter.LoraConfig | None
  frozen_layers: int = 0

  def split(self, weights: Tree, key: jax.Array) -> tuple[Tree, Tree]:
    """Full decoder weights -> (frozen, trainable). LoRA mode initialises a fresh adapter from `key`."""
    if self.lora is None:
      return {}, weights
    frozen = dict(weights)
    frozen["embed"] = weights["embed"][:self.base_vocab]
    trainable = {"adapter": adapter.init(weights, self.lora, key), "new_rows": weights["embed"][self.base_vocab:]}
    if "head" in weights:
      frozen["head"] = weights["head"][:, :self.base_vocab]
      trainable["new_head"] = weights["head"][:, self.base_vocab:]
    return frozen, trainable

  def _body_weights(self, frozen: Tree, trainable: Tree) -> dict:
    """LoRA merged and the new rows appended to the embedding table (the head is handled by the callers)."""
    weights = dict(adapter.merge(frozen, trainable["adapter"], self.lora))
    weights["embed"] = jnp.concatenate([frozen["embed"], trainable["new_rows"].astype(frozen["embed"].dtype)])
    return weights

  def merged(self, frozen: Tree, trainable: Tree) -> Tree:
    """The decoder weights the two trees stand for (LoRA merged, new rows appended): what inference uses."""
    if self.lora is None:
      return trainable
    weights = self._body_weights(frozen, trainable)
    if "new_head" in trainable:
      weights["head"] = jnp.concatenate([frozen["head"], trainable["new_head"].astype(frozen["head"].dtype)], 1)
    return weights

  def hidden(self, frozen: Tree, trainable: Tree, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """[B, T] tokens (right-padded; `valid` marks real ones) -> [B, T, D] final-normed activations."""
    positions = decoder.positions_from_mask(valid)
    weights = trainable if self.lora is None else self._body_weights(frozen, trainable)
    return decoder.forward(weights, tokens, positions, config=self.config, frozen_layers=self.frozen_layers)[0]

  def _heads(self, frozen: Tree, trainable: Tree) -> tuple[tuple[jax.Array, bool], ...]:
    """The vocabulary head as (matrix, transposed) parts whose logits, concatenated, cover the vocabulary."""
    if self.lora is None:
      if "head" in trainable:
        return ((trainable["head"], False),)
      return ((trainable["embed"], True),)
    if "new_head" in trainable:
      return (jax.lax.stop_gradient(frozen["head"]), False), (trainable["new_head"], False)
    return (jax.lax.stop_gradient(frozen["embed"]), True), (trainable["new_rows"], True)

  def logits(self, frozen: Tree, trainable: Tree, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """[B, T] tokens (right-padded; `valid` marks real ones) -> [B, T, V] float32 logits."""
    hidden = self.hidden(frozen, trainable, tokens, valid)
    softcap = self.config.final_logit_softcap
    return jnp.concatenate([layers.unembed(hidden, table, transposed=transposed, final_softcap=softcap)
                            for table, transposed in self._heads(frozen, trainable)], axis=-1)

  def token_logits(self, frozen: Tree, trainable: Tree, hidden: jax.Array, ids: tuple[int, ...]) -> jax.Array:
    """[..., D] final-normed activations -> [..., len(ids)] float32 logits of those vocabulary ids only."""
    columns, offset = [], 0
    for table, transposed in self._heads(frozen, trainable):
      size = table.shape[0] if transposed else table.shape[1]
      for i in ids:
        if offset <= i < offset + size:
          columns.append(table[i - offset] if transposed else table[:, i - offset])
      offset += size
    if len(columns) != len(ids):
      raise ValueError(f"token ids {ids} are not all in the vocabulary of {offset} ids.")
    return layers.unembed(hidden, jnp.stack(columns, axis=1), transposed=False,
                          final_softcap=self.config.final_logit_softcap)


def next_token_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict]:
  """Mean cross-entropy of tokens[:, t + 1] under logits[:, t] over the positions where loss_mask is True.

  Args:
    logits: [B, T, V] float32.
    tokens: [B, T] int32.
    loss_mask: [B, T] bool; the last column must be False (it has no next token).

  Returns:
    (loss, metrics) with metrics {"loss", "accuracy", "tokens"} (accuracy: the target has the largest logit).
  """
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  mask = loss_mask.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(mask), 1.0)
  loss = jnp.sum((log_z - target_logit) * mask) / count
  # "The target is the argmax" without jnp.argmax, whose variadic reduce XLA:CPU runs slowly over a vocabulary.
  hits = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  return loss, {"loss": loss, "accuracy": jnp.sum(hits * mask) / count, "tokens": jnp.sum(mask)}


def rating_loss(model: Model, frozen: Tree, trainable: Tree, batch: dict, positive_id: int, negative_id: int
                ) -> tuple[jax.Array, dict]:
  """LLaMA-O1's value loss: cross-entropy over the two rating logits only, where a rating is the target.

  Rows are (rating prompt, rating token) pairs of `pipeline.text_dataset`: loss_mask is True at the row's
  `<start_of_rating>` position t, whose target tokens[t + 1] is `<positive_rating>` (label 1) or
  `<negative_rating>` (label 0). The log-probabilities are the scorer's (`o1jax.value.rating_log_probs`: a
  log-softmax over those two logits, the value being log p(positive)); only the two logits are computed, not the
  vocabulary head. Rows whose masked target is no rating token (or that have no masked position) are left out.

  Returns:
    (loss, metrics) with metrics {"loss", "accuracy" (p(right rating) > 1/2), "tokens" (rated rows)}.
  """
  tokens, loss_mask = batch["tokens"], batch["loss_mask"]
  B = tokens.shape[0]
  position = jnp.argmax(loss_mask, axis=1)  # the first masked position of each row
  target = tokens[jnp.arange(B), jnp.minimum(position + 1, tokens.shape[1] - 1)]
  rated = jnp.any(loss_mask, axis=1) & ((target == positive_id) | (target == negative_id))
  hidden = model.hidden(frozen, trainable, tokens, batch["valid"])[jnp.arange(B), position]
  pair = model.token_logits(frozen, trainable, hidden, (positive_id, negative_id))
  log_p = value_lib.rating_log_probs(pair, 0, 1)  # token_logits put the positive logit in column 0
  right = jnp.where(target == positive_id, log_p[:, 0], log_p[:, 1])
  weight = rated.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weight), 1.0)
  loss = -jnp.sum(right * weight) / count
  return loss, {"loss": loss, "accuracy": jnp.sum((right > jnp.log(0.5)) * weight) / count,
                "tokens": jnp.sum(weight)}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warmup then cosine decay to `final_fraction` of the peak, and global-norm clipping."""

  learning_rate: float = 1e-3
  warmup_steps: int = 20
  total_steps: int = 1000
  final_fraction: float = 0.1
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.98
  # Steps where a new warmup + cosine cycle starts (a run extended past its first schedule: the steps before
  # restarts[0] follow exactly the schedule of a run with total_steps = restarts[0]).
  restarts: tuple[int, ...] = ()

  def schedule(self) -> optax.Schedule:
    """Warmup + cosine over [0, total_steps); with restarts, one such cycle per phase between the restarts."""
    if self.total_steps < 1:
      raise ValueError(f"total_steps={self.total_steps} must be at least 1.")
    bounds = (0, *self.restarts, self.total_steps)
    if any(b >= a for a, b in zip(bounds[1:], bounds)):
      raise ValueError(f"optimizer restarts {tuple(self.restarts)} must rise strictly inside (0, total_steps="
                       f"{self.total_steps}).")
    cycles = [optax.warmup_cosine_decay_schedule(
        0.0, self.learning_rate, warmup_steps=self.warmup_steps, decay_steps=max(end - start, self.warmup_steps + 1),
        end_value=self.learning_rate * self.final_fraction) for start, end in zip(bounds, bounds[1:])]
    return cycles[0] if len(cycles) == 1 else optax.join_schedules(cycles, list(self.restarts))

  def make(self) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(self.clip_norm),
                       optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, weight_decay=self.weight_decay))


def init_state(trainable: Tree, optimizer: optax.GradientTransformation) -> dict[str, Any]:
  """{"step": int32 [], "trainable": tree, "opt_state": tree}: everything a checkpoint must hold to resume."""
  return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable)}


def batch_loss(model: Model, frozen: Tree, trainable: Tree, batch: dict,
               rating_ids: tuple[int, int] | None = None) -> tuple[jax.Array, dict]:
  """`next_token_loss` of the batch, or with rating_ids = (positive, negative) its `rating_loss`."""
  if rating_ids is not None:
    return rating_loss(model, frozen, trainable, batch, *rating_ids)
  logits = model.logits(frozen, trainable, batch["tokens"], batch["valid"])
  return next_token_loss(logits, batch["tokens"], batch["loss_mask"])


def make_train_step(model: Model, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rating_ids: tuple[int, int] | None = None
                    ) -> Callable[[Tree, dict, dict], tuple[dict, dict]]:
  """One jitted step `(frozen, state, batch) -> (state, metrics)` over `mesh` (loss: see `batch_loss`).

  The batch is split over the mesh's batch axes, the weights and optimizer state are replicated (data
  parallelism: GSPMD inserts the gradient all-reduce), and the state is donated so it is updated in place.
  """
  replicated = parallel.replicated(mesh)

  def step(frozen, state, batch):
    def loss_fn(trainable):
      return batch_loss(model, frozen, trainable, batch, rating_ids)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["trainable"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, metrics

  batch_spec = {name: parallel.batch_sharding(mesh, 2) for name in ("tokens", "valid", "loss_mask")}
  return jax.jit(step, in_shardings=(replicated, replicated, batch_spec), out_shardings=(replicated, replicated),
                 donate_argnums=(1,))


@functools.partial(jax.jit, static_argnames=("model", "rating_ids"))
def eval_loss(model: Model, frozen: Tree, trainable: Tree, batch: dict,
              rating_ids: tuple[int, int] | None = None) -> dict:
  """The loss metrics of one batch without an update (see `batch_loss`)."""
  return batch_loss(model, frozen, trainable, batch, rating_ids)[1]


def trainable_from_adapter(path: str, model: Model, trainable: Tree, base, base_name: str, *,
                           what: str = "adapter") -> Tree:
  """The trainable tree initialised from an adapter file (a continuation of an earlier run).

  Args:
    base: the `pretrained.Loaded` base model (its special tokens and vocabulary are checked against the file).
    what: how the file is named in errors (the config field it came from).
  """
  adapter_file = adapter.read(path)
  adapter_file.check(base=base_name, base_vocab=base.base_vocab, special_tokens=base.special_tokens)
  if model.lora is None or adapter_file.config != model.lora:
    raise ValueError(f"{what}={path!r} holds a LoRA of {adapter_file.config}; this run trains "
                     f"{model.lora}.")
  out = {"adapter": jax.tree.map(lambda a, like: jnp.asarray(a, like.dtype), adapter_file.factors,
                                 trainable["adapter"])}
  for name in ("new_rows", "new_head"):
    if name in trainable:
      array = getattr(adapter_file, name)
      if array is None or array.shape != trainable[name].shape:
        raise ValueError(f"{what}={path!r} has no {name} of shape {trainable[name].shape}.")
      out[name] = jnp.asarray(array, trainable[name].dtype)
  return out


def write_adapter(path: str, model: Model, trainable: Tree, *, base: str, special_tokens: Sequence[str],
                  dtype: str) -> None:
  """The trainable tree's LoRA matrices and new token rows as one adapter file (`o1jax.adapter.write`), which
  `o1jax.pretrained.load` applies."""
  if model.lora is None:
    raise ValueError("write_adapter needs LoRA training (lora.rank > 0); a full fine-tune exports with "
                     "models.hf_io.save_pretrained instead.")
  adapter.write(path, trainable["adapter"], model.lora, new_rows=trainable["new_rows"],
                new_head=trainable.get("new_head"), base=base, base_vocab=model.base_vocab,
                special_tokens=special_tokens, dtype=dtype)
