"""Llama-3.1-8B-Instruct on MATH, sized for a TPU v4-8 slice (4 chips x 32 GiB): self-play, or the search alone.

  # self-play rounds on the MATH training split (the default):
  python -m launch.train --config=configs/llama3_1_8b_math.py --workdir=gs://BUCKET/llama3_1_8b_math
  # the search alone on MATH-500, with the adapter self-play wrote:
  python -m launch.solve --config=configs/llama3_1_8b_math.py:solve \\
      --config.model.adapter=runs/llama3_1_8b_math/adapter.safetensors --workdir=runs/solve_llama3_1_8b
  # on a pod:
  bash launch/pod.sh --name=o1jax-v4-8 --zone=us-central2-b --accelerator=v4-8 --version=tpu-ubuntu2204-base \\
      -- train --config=configs/llama3_1_8b_math.py --workdir=gs://BUCKET/run
  # what it needs per device:
  python -m launch.plan --config=configs/llama3_1_8b_math.py --topology=v4-8

The model: model.path is a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json) that
o1jax.pretrained.resolve takes as it is, on every worker. Llama 3.1 is gated: accept its license on Hugging Face,
then `huggingface-cli download meta-llama/Llama-3.1-8B-Instruct --local-dir checkpoints/llama-3.1-8b-instruct
--exclude 'original/*'` in the repository (on a pod once per worker, or copy it from a bucket with
launch/pod.sh --setup=...; the deploy keeps checkpoints/). model.preset gives launch.plan the shapes when the
directory is not on the machine that plans.

Numerics: weights and activations in bfloat16 (model.dtype sets both); attention scores, softmax and norm
statistics run in float32 inside the decoder, the rating read is a float32 log-softmax over the two rating
logits (o1jax.value), and the LoRA factors and AdamW moments are float32.

Sizes (launch.plan on v4-8): weights sharded over all 4 chips (fsdp=4); 32 problems searched together per round,
at most 32 children per sampler call; learner batches of 32 rows in micro-batches of one row per chip, the
LoRA on the top 16 of 32 layers (the backward keeps every trained layer's activations: about 0.5 GiB per layer
for one row of 1024 tokens). MATH questions run to ~1400 tokens: max_depth 6 x max_new_tokens 80 keeps the
longest search path inside the sampler's largest prompt bucket (2048). With today's o1jax.pretrained.load,
which reads the whole checkpoint onto one chip (16 GB) and unstacks a second copy there while the sampler is
built, launch.plan finds that the load itself does not fit a v4 chip: run `python -m launch.plan
--config=configs/llama3_1_8b_math.py --topology=v4-8 --load=sharded` for the steady state, and a v5p slice
(95 GiB per chip) until the loader shards.
"""

import ml_collections

from configs import smollm2_gsm8k, smollm2_selfplay


def get_config(job: str = "train") -> ml_collections.ConfigDict:
  """job: "train" (self-play, launch/train.py) or "solve" (MATH-500, launch/solve.py)."""
  if job not in ("train", "solve"):
    raise ValueError(f"config parameter {job!r}: expected 'train' or 'solve' "
                     "(--config=configs/llama3_1_8b_math.py:solve).")
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      path="checkpoints/llama-3.1-8b-instruct",   # a Hugging Face directory (see the module docstring)
      preset="llama3_1_8b",                        # launch.plan's shapes when model.path is not here
      adapter="",
      dtype="bfloat16",
  ))
  config.seed = 0
  config.sampling = ml_collections.ConfigDict(dict(
      temperature=0.8,
      top_p=1.0,
      max_new_tokens=80,
      max_rows=32,           # children per sampler call (bounds the KV cache memory)
      compact_every=16,
      rating_context="policy",
  ))
  config.mcts = smollm2_gsm8k.get_config().mcts   # LLaMA-O1's constants (configs/smollm2_gsm8k.py)
  config.mcts.num_simulations = 32                # LLaMA-O1's own number of simulations
  config.mcts.max_depth = 6                       # a MATH path stays inside the 2048-token prompt bucket
  if job == "solve":
    config.data = ml_collections.ConfigDict(dict(split="math500", start=0))
    config.num_problems = 500
    config.strategy = "mcts"     # | beam | dvts | best_of_n | weighted_best_of_n | majority | chain
    config.batch_size = 32
    config.self_play = False
    config.beam = ml_collections.ConfigDict(dict(n=16, beam_width=4, max_depth=6, aggregation="last",
                                                 answer="best"))
    return config
  config.model.frozen_layers = 16   # LoRA on the top 16 layers; the bottom ones get no gradient
  config.lora = ml_collections.ConfigDict(dict(rank=16, alpha=32.0, targets=("q", "k", "v", "o", "gate", "up",
                                                                             "down")))
  config.data = ml_collections.ConfigDict(dict(split="math_train", start=0, problems_per_round=32))
  config.rounds = 100
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=4, tensor=1))
  # The learner, replay and optimizer of configs/smollm2_selfplay.py (PPO + softmax rating loss, GAE, AdamW),
  # sized for the slice:
  smollm2_selfplay.learner_blocks(config)
  config.experience.seq_len = 1024
  # 32 rows = 8 per chip, in micro-batches of one row:
  config.learner.update(dict(accumulate=8, batch_size=32, steps_per_round=16))
  config.replay.update(dict(capacity=16384, beta_steps=1600))
  config.optimizer.update(dict(warmup_steps=16))
  return config
