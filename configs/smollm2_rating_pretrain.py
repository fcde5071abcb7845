"""Rating continuation of the format adapter: SmolLM2-135M-Instruct learns to rate steps (issue 5's value goal).

  python -m launch.pretrain --config=configs/smollm2_rating_pretrain.py --workdir=runs/rating_smollm2

Starts from the format adapter (configs/smollm2_format_pretrain.py) and trains on rating records only: matched
correct and corrupted GSM8K-train steps (and right / wrong conclusions) after the same correct path, with LLaMA-O1's
value loss, the cross-entropy over the two rating logits at `<start_of_rating>`. The bottom layers stay frozen, so
a step costs their forward only; every record is a full rating prompt, as the search sends it. Resumable like the
format run; at the end it writes its own adapter, which configs/smollm2_gsm8k.py loads.

The committed adapter: 300 steps (about 95 minutes on the 2-core CPU VM), held-out rating loss 0.69 -> 0.48;
step-format rate 0.965 and step rating ROC AUC 0.72 on 200 GSM8K test problems (launch.evaluate_format).
"""

import ml_collections

from configs import smollm2_format_pretrain


def get_config() -> ml_collections.ConfigDict:
  config = smollm2_format_pretrain.get_config()
  config.data.kinds = ("rating",)
  config.data.shuffle = False
  config.data.batch_size = 16
  config.data.seq_len = 256
  config.train.loss = "rating"
  config.train.frozen_layers = 14
  config.train.init_adapter = "configs/adapters/smollm2_135m_format.safetensors"
  # 80 steps, then extended to 300 with a second warmup + cosine cycle from step 80 (the first 80 steps are the
  # earlier 80-step run; resuming its work directory with this config continues it exactly).
  config.train.steps = 300
  config.optimizer.restarts = (80,)
  config.train.log_every = 5
  config.optimizer.learning_rate = 5e-4
  config.optimizer.warmup_steps = 5
  config.eval.count = 64
  config.eval.every = 40
  config.eval.batches = 6
  config.output.adapter_path = "configs/adapters/smollm2_135m_rating.safetensors"
  return config
