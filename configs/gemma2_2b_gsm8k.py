"""Gemma-2-2B-it on GSM8K, sized for a TPU v5e-16 slice (16 chips x 16 GiB): self-play, or the search alone.

  # self-play rounds on the training split (the default):
  python -m launch.train --config=configs/gemma2_2b_gsm8k.py --workdir=gs://BUCKET/gemma2_2b_gsm8k
  # the search alone on the test split, with the adapter self-play wrote:
  python -m launch.solve --config=configs/gemma2_2b_gsm8k.py:solve \\
      --config.model.adapter=runs/gemma2_2b_gsm8k/adapter.safetensors --workdir=runs/solve_gemma2_2b
  # on a pod (launch/pod.sh copies the repository to every worker and runs the same command on each):
  bash launch/pod.sh --name=o1jax-v5e16 --zone=us-west4-a --accelerator=v5litepod-16 \\
      --version=v2-alpha-tpuv5-lite -- train --config=configs/gemma2_2b_gsm8k.py --workdir=gs://BUCKET/run
  # what it needs per device (no TPU needed):
  python -m launch.plan --config=configs/gemma2_2b_gsm8k.py --topology=v5e-16

The model: model.path is a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json) that
o1jax.pretrained.resolve takes as it is, on every worker. Gemma is gated: accept its license on Hugging Face,
then `huggingface-cli download google/gemma-2-2b-it --local-dir checkpoints/gemma-2-2b-it` in the repository
(on a pod once per worker, or copy it from a bucket with launch/pod.sh --setup=...; the deploy keeps
checkpoints/). model.preset gives launch.plan the shapes when the directory is not on the machine that plans.

Numerics: weights and activations in bfloat16 (model.dtype sets both); attention scores, softcaps, softmax and
norm statistics run in float32 inside the decoder, the rating read is a float32 log-softmax over the two rating
logits (o1jax.value), and the LoRA factors and AdamW moments of the adapter are float32.

Sizes (launch.plan on v5e-16): the weights are sharded over all 16 chips (fsdp=16; data=-1 takes what is left,
here 1); 64 problems are searched together per round, at most 64 children per sampler call; the learner takes
batches of 64 rows (4 per chip) in micro-batches of one row per chip, and trains the LoRA of the top 13 of 26
layers: its backward keeps every trained layer's activations (no rematerialisation), about 0.45 GiB per layer for
one row of 1024 tokens, the largest part of the learner's memory. The search constants are
LLaMA-O1's (its 32 simulations, 2 children per expansion up to 5, c = 1.414, gamma = 0.9) plus a depth limit.
"""

import ml_collections

from configs import smollm2_gsm8k, smollm2_selfplay


def get_config(job: str = "train") -> ml_collections.ConfigDict:
  """job: "train" (self-play, launch/train.py) or "solve" (evaluation on the test split, launch/solve.py)."""
  if job not in ("train", "solve"):
    raise ValueError(f"config parameter {job!r}: expected 'train' or 'solve' "
                     "(--config=configs/gemma2_2b_gsm8k.py:solve).")
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      path="checkpoints/gemma-2-2b-it",   # a Hugging Face directory (see the module docstring)
      preset="gemma2_2b",                 # launch.plan's shapes when model.path is not on the planning machine
      adapter="",                         # a LoRA to continue (self-play) or apply (solve); "" for none
      dtype="bfloat16",
  ))
  config.seed = 0
  config.sampling = ml_collections.ConfigDict(dict(
      temperature=0.8,
      top_p=1.0,
      max_new_tokens=64,     # LLaMA-O1's GENERATE_MAX_NEW_TOKENS
      max_rows=64,           # children per sampler call (bounds the KV cache memory)
      compact_every=16,
      rating_context="policy",
  ))
  config.mcts = smollm2_gsm8k.get_config().mcts   # LLaMA-O1's constants (configs/smollm2_gsm8k.py)
  config.mcts.num_simulations = 32                # LLaMA-O1's own number of simulations
  if job == "solve":
    config.data = ml_collections.ConfigDict(dict(split="gsm8k_test", start=0))
    config.num_problems = 1319   # the whole GSM8K test split
    config.strategy = "mcts"     # | beam | dvts | best_of_n | weighted_best_of_n | majority | chain
    config.batch_size = 64       # problems searched together (launch/solve.py runs them data-parallel)
    config.self_play = False
    config.beam = ml_collections.ConfigDict(dict(n=16, beam_width=4, max_depth=8, aggregation="last",
                                                 answer="best"))
    return config
  config.model.frozen_layers = 13   # the bottom half gets no gradient (and keeps no activations)
  config.lora = ml_collections.ConfigDict(dict(rank=16, alpha=32.0, targets=("q", "k", "v", "o", "gate", "up",
                                                                             "down")))
  config.data = ml_collections.ConfigDict(dict(split="gsm8k_train", start=0, problems_per_round=64))
  config.rounds = 100
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=16, tensor=1))
  # The learner, replay and optimizer of configs/smollm2_selfplay.py (PPO + softmax rating loss, GAE, AdamW),
  # sized for the pod:
  smollm2_selfplay.learner_blocks(config)
  config.experience.seq_len = 1024
  # 64 rows = 4 per chip, in micro-batches of one row (the backward keeps every layer):
  config.learner.update(dict(accumulate=4, batch_size=64, steps_per_round=16))
  config.replay.update(dict(capacity=16384, beta_steps=1600))
  config.optimizer.update(dict(learning_rate=5e-5, warmup_steps=16))
  return config
