"""Self-play on GSM8K train problems with SmolLM2-135M-Instruct, starting from the committed rating adapter:

  python -m launch.train --config=configs/smollm2_selfplay.py --workdir=runs/selfplay_smollm2

Each round: MCTS on the next 16 training problems (ground truths given: outcome checks, patience and
rectification; no ground-truth hint), experience into the replay, 8 learner steps of PPO + rating loss on the
LoRA adapter and the new token rows, a checkpoint. Resumable: run the same command again after a kill.
"""

import ml_collections

from configs import smollm2_gsm8k


def get_config() -> ml_collections.ConfigDict:
  search = smollm2_gsm8k.get_config()
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      path="smollm2-135m-instruct",
      adapter="configs/adapters/smollm2_135m_rating.safetensors",  # the LoRA to continue; "" for a fresh one
      dtype="float32",
      frozen_layers=0,
  ))
  config.lora = ml_collections.ConfigDict(dict(rank=8, alpha=16.0, targets=("q", "k", "v", "o", "gate", "up",
                                                                            "down")))  # without an adapter
  config.data = ml_collections.ConfigDict(dict(split="gsm8k_train", start=0, problems_per_round=16))
  config.rounds = 4
  config.seed = 0
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))   # data=-1: every device left
  config.sampling = search.sampling
  config.mcts = search.mcts
  config.mcts.num_simulations = 8
  learner_blocks(config)
  return config


def learner_blocks(config: ml_collections.ConfigDict) -> None:
  """Sets config.experience, learner, replay, optimizer and checkpoint to this config's; the accelerator configs
  (configs/gemma2_2b_gsm8k.py, configs/llama3_1_8b_math.py) take them from here and change only their sizes."""
  config.experience = ml_collections.ConfigDict(dict(seq_len=768, advantage="gae", gamma=0.99, lam=0.95,
                                                     sft_paths=2))
  config.learner = ml_collections.ConfigDict(dict(
      mode="ppo",             # | "sft": next-token loss on each tree's best correct traces
      clip=0.2,
      rating_loss="softmax",  # | "bce" (LLaMA-O1's) | "pairwise" (rStar-Math's)
      rating_coef=1.0,
      kl_coef=0.0,
      eps=1e-6,
      accumulate=4,           # micro-batches of 2 rows: 8 x 768 tokens at once took the step past 24 GiB on CPU
      batch_size=8,
      steps_per_round=8,
  ))
  config.replay = ml_collections.ConfigDict(dict(capacity=4096, alpha=0.6, beta_start=0.4, beta_steps=1000))
  config.optimizer = ml_collections.ConfigDict(dict(learning_rate=2e-5, warmup_steps=4, final_fraction=0.1,
                                                    weight_decay=0.0, clip_norm=1.0, b1=0.9, b2=0.98))
  config.checkpoint = ml_collections.ConfigDict(dict(keep=3))
