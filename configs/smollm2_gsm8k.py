"""SmolLM2-135M-Instruct searching GSM8K test problems on the CPU: the default experiment (README's main command).

  python -m launch.solve --config=configs/smollm2_gsm8k.py --workdir=runs/solve_smollm2_gsm8k
  python -m launch.solve --config=configs/smollm2_gsm8k.py --config.strategy=beam --config.num_problems=32 \\
      --workdir=runs/beam

The model is the packaged SmolLM2 checkpoint plus the adapter that launch.pretrain wrote: LoRA matrices and the
LLaMA-O1 special tokens' embedding rows, trained on the format (configs/smollm2_format_pretrain.py) and then on
the rating loss (configs/smollm2_rating_pretrain.py). The search constants under `mcts` are LLaMA-O1's
(`online_train.py`), except the number of simulations (LLaMA-O1: 32) and the depth limit it does not have.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      path="smollm2-135m-instruct",  # a packaged model name, a Hugging Face directory or a .gguf file
      adapter="configs/adapters/smollm2_135m_rating.safetensors",  # "" for the base model
      dtype="float32",
  ))
  config.data = ml_collections.ConfigDict(dict(split="gsm8k_test", start=0))
  config.num_problems = 16
  # mcts | beam | dvts | best_of_n | weighted_best_of_n | majority | chain
  config.strategy = "mcts"
  config.batch_size = 32     # problems searched together (one tree each)
  config.self_play = False   # True: the search sees the reference answers (outcome checks, patience, hints)
  config.seed = 0
  config.sampling = ml_collections.ConfigDict(dict(
      temperature=0.7,       # LLaMA-O1 samples at 1.5, more than a 135M model's steps survive
      top_p=1.0,
      max_new_tokens=64,     # LLaMA-O1's GENERATE_MAX_NEW_TOKENS
      max_rows=64,           # children per sampler call (bounds the KV cache memory)
      compact_every=16,      # decode in 16-token segments, moving the running steps into smaller batches
      rating_context="policy",  # "value": rate LLaMA-O1's value prompt exactly (no hint; re-encodes each step)
  ))
  config.mcts = ml_collections.ConfigDict(dict(
      num_simulations=8,
      children_per_expansion=2,
      max_children=5,
      exploration=1.414,
      varentropy_weight=0.1,
      random_factor=(0.8, 1.2),
      discount=0.9,
      eps=1e-6,
      patience=2,
      max_depth=8,
      node_budget=0,         # 0: 1 + num_simulations * children_per_expansion
      answer="max_reward",   # | majority | weighted
      ground_truth_hint=False,
      llama_o1_compat=False,
  ))
  config.beam = ml_collections.ConfigDict(dict(
      n=16,                  # samples (best_of_n, majority, weighted) or beams (beam, dvts)
      beam_width=4,          # M: beam keeps n / M beams; dvts grows n / M subtrees
      max_depth=8,
      aggregation="last",    # last | min | prod | mean of the steps' p(positive)
      answer="best",         # how beam and dvts choose among their final candidates: best | weighted | majority
  ))
  # launch.evaluate's sweep (o1jax/evaluate.py): comma-separated strategies, and budgets (samples, beams or
  # simulations; the chain ignores them). launch.solve does not read it.
  config.eval = ml_collections.ConfigDict(dict(
      strategies="chain,best_of_n,weighted_best_of_n,majority,beam,dvts,mcts",
      budgets="1,2,4,8,16",
      probe=4,               # compute_optimal.md: difficulty from the first 4 samples' agreement; 0: none
  ))
  return config
