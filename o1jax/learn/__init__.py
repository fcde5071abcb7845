"""The learner: LoRA adapters, replay, advantages, losses and the sharded train step."""
