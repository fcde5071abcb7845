"""Format pretraining of SmolLM2-135M-Instruct on GSM8K trees, on the CPU (issue 5's bounded run).

  python -m launch.pretrain --config=configs/smollm2_format_pretrain.py --workdir=runs/pretrain_smollm2

Kill it and run the same command again: it resumes from the last checkpoint at the same data position. At the
end it writes the adapter (LoRA + the special tokens' embedding rows) that configs/smollm2_gsm8k.py loads.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(path="smollm2-135m-instruct", dtype="float32"))
  config.lora = ml_collections.ConfigDict(dict(
      rank=8,
      alpha=16.0,
      targets=("q", "k", "v", "o", "gate", "up", "down"),
  ))
  config.data = ml_collections.ConfigDict(dict(
      split="gsm8k_train",
      count=config_dict.placeholder(int),   # None: every problem of the split
      seed=0,
      seq_len=256,
      batch_size=8,
      kinds=("trees", "policy", "rating"),
      # False: rows in record order, so a batch holds whole matched pairs (a correct and a corrupted step after
      # the same path) and the rating gradient compares them; problems come in the split's own order.
      shuffle=True,
  ))
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-3,
      warmup_steps=20,
      final_fraction=0.1,
      weight_decay=0.0,
      clip_norm=1.0,
      restarts=(),            # steps where a new warmup + cosine cycle starts (a run extended past its schedule)
  ))
  config.train = ml_collections.ConfigDict(dict(
      steps=150,
      log_every=5,
      seed=0,
      loss="next_token",      # or "rating": cross-entropy over the two rating logits (data.kinds=("rating",))
      frozen_layers=0,        # bottom layers without gradient
      init_adapter="",        # continue from this adapter instead of a fresh one
  ))
  config.eval = ml_collections.ConfigDict(dict(split="gsm8k_test", count=64, every=50, batches=4))
  config.checkpoint = ml_collections.ConfigDict(dict(every=20, keep=2))
  config.output = ml_collections.ConfigDict(dict(
      adapter_path="configs/adapters/smollm2_135m_format.safetensors",
      adapter_dtype="bfloat16",
  ))
  return config
