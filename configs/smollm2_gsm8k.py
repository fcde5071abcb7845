"""SmolLM2-135M-Instruct on GSM8K, on the CPU: the default experiment (README's main command).

  python -m launch.solve --config=configs/smollm2_gsm8k.py --config.data.count=8
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      path="smollm2-135m-instruct",  # a packaged model name, a Hugging Face directory or a .gguf file
      dtype="float32",
  ))
  config.data = ml_collections.ConfigDict(dict(
      split="gsm8k_test",
      start=0,
      count=4,
  ))
  config.generate = ml_collections.ConfigDict(dict(
      max_new_tokens=192,
      system_prompt="You are a careful math tutor. Solve the problem step by step, then finish with "
                    "'The answer is N.'",
  ))
  config.output_dir = "runs/solve_smollm2_gsm8k"
  return config
