"""SmolLM2-135M-Instruct on GSM8K, on the CPU: the default experiment (README's main command).

  python -m launch.solve --config=configs/smollm2_gsm8k.py --config.data.count=8

The model is the packaged SmolLM2 checkpoint plus the adapter that launch.pretrain wrote: LoRA matrices and the
LLaMA-O1 special tokens' embedding rows, trained on the format (configs/smollm2_format_pretrain.py) and then on
the rating loss (configs/smollm2_rating_pretrain.py).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      path="smollm2-135m-instruct",  # a packaged model name, a Hugging Face directory or a .gguf file
      adapter="configs/adapters/smollm2_135m_rating.safetensors",  # "" for the base model
      dtype="float32",
  ))
  config.data = ml_collections.ConfigDict(dict(
      split="gsm8k_test",
      start=0,
      count=4,
  ))
  config.search = ml_collections.ConfigDict(dict(
      max_steps=8,
      max_new_tokens=96,
      temperature=0.0,   # 0: greedy steps
      seed=0,
  ))
  config.output_dir = "runs/solve_smollm2_gsm8k"
  return config
