"""The learner: what trains and how.

- `lm`: the trainable trees over the decoder (full, or LoRA factors plus the new token rows), the next-token and
  rating losses, the optimizer schedule and one jitted, sharded train step.
- `loop`: the training loop every learner shares (resume, checkpoints, metrics, a stop at a non-finite loss).
- `pretrain`: format pretraining (and its rating continuation) on GSM8K trees, run by launch/pretrain.py.
- `experience`: search trees -> fixed-shape rows (policy prompt + step, behaviour log-probs, advantages, value
  targets).
- `replay`: a prioritized replay buffer of those rows.
- `ppo`: the self-play losses (PPO's clipped surrogate, rating, KL) as plain functions of log-probs and logits.
- `learner`: the self-play learner's sharded step over rows of experience.

The LoRA math and the adapter file live below the learner, in `o1jax.adapter`, since inference reads them too;
`lm.rating_loss` reads the rating logits through `o1jax.value`, as the scorer does.
"""
