"""The self-play learner's step: PPO + rating loss on rows of experience, sharded over a (data, fsdp, tensor) mesh.

Legend: B rows, T positions, M target slots (a step's tokens and its `<end_of_thought>`), V vocab, A accumulated
micro-batches.

  learner = Learner(model, optimizer, mesh, LearnerConfig(), experience_config, rating_ids=(positive, negative))
  frozen, state = learner.place(frozen, lm.init_state(trainable, optimizer))   # parameters sharded by the rules
  state, per_row, metrics = learner.step(frozen, state, batch)                 # batch: replay rows + "weight"

One step:
  1. the decoder runs over each row's sequence (policy prompt, step, `<end_of_thought>`, `<start_of_rating>`);
  2. the policy part reads the log-probs of the step's M target tokens only: the hidden states at those positions
     are gathered and only they go through the vocabulary head (a [B, T, V] head would cost T / M times more);
     PPO's clipped surrogate against the behaviour log-probs recorded at sampling time (mode "ppo"), or the
     next-token loss on the rows of the best traces (mode "sft");
  3. the rating part reads the two rating logits at the row's `<start_of_rating>` (`o1jax.value`'s read) and
     takes the configured loss against the rectified value (with `rating_context="value"` from a second
     forward over LLaMA-O1's value prompt; the pairwise loss from the lower sibling's sequence);
  4. optional KL to a reference policy (its log-probs from a forward with the reference weights);
  5. per-row loss = policy + rating_coef * rating + kl_coef * kl; the step minimises its mean weighted by the
     replay's importance weights, and returns |per-row loss| for the new priorities.
Gradients of A micro-batches are summed by a `lax.scan` before one optimizer update (gradient accumulation).

Sharding: every parameter has logical axis names (the decoder's, and for LoRA factors and new token rows those of
the weight they adapt), `o1jax.parallel.LOGICAL_RULES` maps them onto the mesh, the optimizer state follows its
parameters, the batch is split over ("data", "fsdp"), and the step is `jax.jit` with those in/out shardings and
the state donated. GSPMD inserts the all-gathers of fsdp-sharded weights and the gradient reductions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from models import decoder, layers
from o1jax import adapter, parallel, value
from o1jax.learn import lm, ppo
from o1jax.learn.experience import ExperienceConfig

Tree = Any
MODES = ("ppo", "sft")


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
  """The loss and the step.

  Attributes:
    mode: "ppo" (clipped surrogate on every row) or "sft" (next-token loss on the rows of the best traces).
    clip: PPO's epsilon.
    rating_loss: "softmax" (two-way cross-entropy, the default), "bce" (LLaMA-O1's) or "pairwise" (rStar-Math's;
      needs experience with pairs).
    rating_coef, kl_coef: weights of the rating and KL terms (kl_coef 0: no reference forward).
    eps: the rating target's floor, p >= eps.
    accumulate: micro-batches per optimizer update (the batch splits into this many).
    max_targets: M, target slots per row (a step's tokens and its end: the search's max_step_tokens + 1).
  """

  mode: str = "ppo"
  clip: float = 0.2
  rating_loss: str = "softmax"
  rating_coef: float = 1.0
  kl_coef: float = 0.0
  eps: float = 1e-6
  accumulate: int = 1
  max_targets: int = 65

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r}; expected one of {MODES}.")
    if self.rating_loss not in ppo.RATING_LOSSES:
      raise ValueError(f"rating_loss={self.rating_loss!r}; expected one of {ppo.RATING_LOSSES}.")
    if not 0 < self.clip < 1:
      raise ValueError(f"clip={self.clip} must be in (0, 1).")
    if self.rating_coef < 0 or self.kl_coef < 0:
      raise ValueError(f"rating_coef={self.rating_coef} and kl_coef={self.kl_coef} must be >= 0.")
    if self.accumulate < 1 or self.max_targets < 1:
      raise ValueError(f"accumulate={self.accumulate} and max_targets={self.max_targets} must be >= 1.")


# --------------------------------------------------------------------------------------------- shardings


def trainable_logical_axes(model: lm.Model) -> Tree:
  """Logical axis names of the trainable tree (`model.split`'s second half)."""
  weights = decoder.weight_logical_axes(model.config)
  if model.lora is None:
    return weights
  factors = {}
  for target in model.lora.targets:
    names = weights["layers"][target]          # ("layers", *in, *out)
    n_in = adapter.INPUT_AXES[target]
    factors[target] = {"a": (names[0], *names[1:1 + n_in], "lora_rank"),
                       "b": (names[0], "lora_rank", *names[1 + n_in:])}
  axes = {"adapter": {"layers": factors}, "new_rows": (None, "embed")}
  if not model.config.tie_embeddings:
    axes["new_head"] = ("embed", None)
  return axes


def frozen_logical_axes(model: lm.Model) -> Tree:
  """Logical axis names of the frozen tree (empty for a full fine-tune)."""
  return {} if model.lora is None else decoder.weight_logical_axes(model.config)


def _state_shardings(optimizer: optax.GradientTransformation, trainable_shardings: Tree, abstract_state: Tree,
                     mesh: Mesh) -> Tree:
  """The train state's shardings: optimizer moments like their parameters, counters replicated."""
  replicated = parallel.replicated(mesh)
  opt = optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_state["opt_state"],
                              trainable_shardings, transform_non_params=lambda _: replicated)
  return {"step": replicated, "trainable": trainable_shardings, "opt_state": opt}


# -------------------------------------------------------------------------------------------------- loss


def _target_log_probs(model: lm.Model, frozen: Tree, trainable: Tree, hidden: jax.Array, tokens: jax.Array,
                      mask: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
  """log p of each row's target tokens, computed at the M target positions only.

  Returns:
    log_probs: [B, M] (0 where there is no target); target_mask: [B, M].
  """
  B, T = tokens.shape
  start = jnp.argmax(mask, axis=1)                                         # first target position of each row
  index = jnp.minimum(start[:, None] + jnp.arange(slots)[None, :], T - 2)  # [B, M]
  target_mask = jnp.take_along_axis(mask, index, axis=1) & (start[:, None] + jnp.arange(slots) < T - 1)
  h = jnp.take_along_axis(hidden, index[..., None], axis=1)               # [B, M, D]
  softcap = model.config.final_logit_softcap
  logits = jnp.concatenate([layers.unembed(h, table, transposed=transposed, final_softcap=softcap)
                            for table, transposed in model._heads(frozen, trainable)], axis=-1)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nxt = jnp.take_along_axis(tokens, index + 1, axis=1)
  picked = jnp.take_along_axis(log_probs, nxt[..., None], axis=-1)[..., 0]
  return jnp.where(target_mask, picked, 0.0), target_mask


def _rating_logits(model: lm.Model, frozen: Tree, trainable: Tree, hidden: jax.Array, at: jax.Array,
                   ids: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  h = jnp.take_along_axis(hidden, at[:, None, None], axis=1)[:, 0]       # [B, D]
  logits = model.token_logits(frozen, trainable, h, ids)                  # [B, 2]
  return logits[:, 0], logits[:, 1]


def loss_and_rows(model: lm.Model, frozen: Tree, trainable: Tree, batch: dict, *, config: LearnerConfig,
                  experience: ExperienceConfig, rating_ids: tuple[int, int], reference: Tree | None = None
                  ) -> tuple[jax.Array, tuple[jax.Array, dict]]:
  """(mean weighted loss, (per-row loss [B], metrics)) of one batch (see the module docstring)."""
  hidden = model.hidden(frozen, trainable, batch["tokens"], batch["valid"])
  log_probs, target_mask = _target_log_probs(model, frozen, trainable, hidden, batch["tokens"],
                                             batch["loss_mask"], config.max_targets)
  M = config.max_targets
  start = jnp.argmax(batch["loss_mask"], axis=1)
  index = jnp.minimum(start[:, None] + jnp.arange(M)[None, :], batch["tokens"].shape[1] - 1)
  behaviour = jnp.take_along_axis(batch["behaviour"], index, axis=1)
  metrics = {}
  if config.mode == "ppo":
    policy, stats = ppo.ppo_loss(log_probs, behaviour, batch["advantage"], target_mask, clip=config.clip)
    metrics.update(stats)
  else:
    policy = ppo.next_token_loss(log_probs, target_mask) * batch["sft"].astype(jnp.float32)

  if config.rating_loss == "pairwise":
    hp, hn = _rating_logits(model, frozen, trainable, hidden, batch["rating_at"], rating_ids)
    pair_hidden = model.hidden(frozen, trainable, batch["pair_tokens"], batch["pair_valid"])
    lp, ln = _rating_logits(model, frozen, trainable, pair_hidden, batch["pair_at"], rating_ids)
    rating = ppo.pairwise_rating_loss(hp, hn, lp, ln) * batch["has_pair"].astype(jnp.float32)
    positive, negative = hp, hn
  else:
    if experience.rating_context == "value":
      rating_hidden = model.hidden(frozen, trainable, batch["rating_tokens"], batch["rating_valid"])
      positive, negative = _rating_logits(model, frozen, trainable, rating_hidden, batch["rating_position"],
                                          rating_ids)
    else:
      positive, negative = _rating_logits(model, frozen, trainable, hidden, batch["rating_at"], rating_ids)
    rating = ppo.rating_loss(positive, negative, batch["value_target"], kind=config.rating_loss, eps=config.eps)
  per_row = policy + config.rating_coef * rating
  if config.kl_coef > 0:
    ref_hidden = model.hidden(frozen, reference, batch["tokens"], batch["valid"])
    ref_log_probs, _ = _target_log_probs(model, frozen, reference, ref_hidden, batch["tokens"], batch["loss_mask"],
                                         M)
    kl = ppo.kl_to_reference(log_probs, jax.lax.stop_gradient(ref_log_probs), target_mask)
    per_row = per_row + config.kl_coef * kl
    metrics["kl"] = jnp.mean(kl)
  weight = batch["weight"].astype(jnp.float32)
  loss = jnp.sum(weight * per_row) / jnp.maximum(jnp.sum(jnp.ones_like(weight)), 1.0)
  value_pred = value.value(jnp.stack([positive, negative], -1), 0, 1)
  target_positive = batch["value_target"] >= jnp.log(0.5)
  metrics.update(loss=loss, policy_loss=jnp.mean(policy), rating_loss=jnp.mean(rating),
                 value_accuracy=jnp.mean(((value_pred >= jnp.log(0.5)) == target_positive).astype(jnp.float32)))
  return loss, (per_row, metrics)


# -------------------------------------------------------------------------------------------------- step


class Learner:
  """The sharded train step for one model, optimizer and mesh (see the module docstring)."""

  def __init__(self, model: lm.Model, optimizer: optax.GradientTransformation, mesh: Mesh,
               config: LearnerConfig, experience: ExperienceConfig, rating_ids: tuple[int, int]):
    if config.rating_loss == "pairwise" and not experience.pairs:
      raise ValueError("rating_loss='pairwise' needs experience built with pairs=True.")
    self.model, self.optimizer, self.mesh = model, optimizer, mesh
    self.config, self.experience, self.rating_ids = config, experience, tuple(rating_ids)
    self._step = None

  def shardings(self, frozen: Tree, trainable: Tree) -> tuple[Tree, Tree]:
    """NamedShardings of (frozen, trainable) by the logical rules."""
    return (parallel.logical_shardings(frozen_logical_axes(self.model), frozen, self.mesh),
            parallel.logical_shardings(trainable_logical_axes(self.model), trainable, self.mesh))

  def place(self, frozen: Tree, state: dict) -> tuple[Tree, dict]:
    """(frozen, train state) on the mesh, sharded by the rules (the optimizer state like its parameters).

    Arrays already placed as the rules say are not copied, and `step` donates the state: do not reuse the arrays
    of `state` after the first step.
    """
    frozen_sh, trainable_sh = self.shardings(frozen, state["trainable"])
    self._frozen_shardings = frozen_sh
    self._state_shardings = _state_shardings(self.optimizer, trainable_sh, jax.eval_shape(lambda s: s, state),
                                             self.mesh)
    put = lambda tree, shardings: jax.tree.map(parallel.put, tree, shardings)  # noqa: E731
    return put(frozen, frozen_sh), put(state, self._state_shardings)

  def batch_shardings(self, batch: dict) -> dict:
    return {name: NamedSharding(self.mesh, parallel.logical_spec(("batch",) + (None,) * (a.ndim - 1), a.shape,
                                                                  self.mesh)) for name, a in batch.items()}

  def step(self, frozen: Tree, state: dict, batch: dict, reference: Tree | None = None
           ) -> tuple[dict, jax.Array, dict]:
    """One update: (new state, per-row loss [B], metrics). The state is donated (do not reuse it).

    `reference`: the reference policy's trainable tree (placed like the state's), needed when config.kl_coef > 0.
    """
    if (self.config.kl_coef > 0) != (reference is not None):
      raise ValueError(f"kl_coef={self.config.kl_coef} needs a reference policy's trainable weights exactly when it "
                       f"is > 0; the step was given {'none' if reference is None else 'one'}.")
    if self._step is None:
      self._step = self._compile(frozen, batch, reference)
    return self._step(frozen, state, batch, reference)

  def _compile(self, frozen: Tree, batch: dict, reference: Tree | None):
    config, model, optimizer, A = self.config, self.model, self.optimizer, self.config.accumulate
    rows = next(iter(batch.values())).shape[0]
    if rows % A:
      raise ValueError(f"a batch of {rows} rows does not split into accumulate={A} micro-batches.")
    if rows % parallel.batch_size_multiple(self.mesh):
      raise ValueError(f"a batch of {rows} rows does not split over the mesh's "
                       f"{parallel.batch_size_multiple(self.mesh)} batch shards.")

    def loss_fn(trainable, frozen, micro, reference):
      return loss_and_rows(model, frozen, trainable, micro, config=config, experience=self.experience,
                           rating_ids=self.rating_ids, reference=reference)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(frozen, state, batch, reference):
      if A == 1:
        (_, (per_row, metrics)), grads = grad_fn(state["trainable"], frozen, batch, reference)
      else:
        micro = jax.tree.map(lambda a: a.reshape((A, a.shape[0] // A) + a.shape[1:]), batch)

        def body(total, one):
          (_, (per_row, metrics)), grads = grad_fn(state["trainable"], frozen, one, reference)
          return jax.tree.map(jnp.add, total, grads), (per_row, metrics)
        zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
        grads, (per_row, metrics) = jax.lax.scan(body, zeros, micro)
        grads = jax.tree.map(lambda g: g / A, grads)
        per_row = per_row.reshape(-1)
        metrics = jax.tree.map(jnp.mean, metrics)
      updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
      trainable = optax.apply_updates(state["trainable"], updates)
      metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
      return ({"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state},
              jnp.abs(per_row), metrics)

    replicated = parallel.replicated(self.mesh)
    reference_sh = None if reference is None else self._state_shardings["trainable"]
    row_sharding = NamedSharding(self.mesh, parallel.logical_spec(("batch",), (rows,), self.mesh))
    return jax.jit(step, in_shardings=(self._frozen_shardings, self._state_shardings, self.batch_shardings(batch),
                                       reference_sh),
                   out_shardings=(self._state_shardings, row_sharding, replicated), donate_argnums=(1,))
