"""Learner step throughput: o1jax's PPO + rating step vs the same loss in PyTorch transformers, same weights, one process.

  .venv/bin/python bench/train_step.py [--quick]

SmolLM2-135M-Instruct (+ the LLaMA-O1 tokens) in float32 on the CPU, every weight trainable, AdamW with global-norm
clipping. A fixed batch of experience rows shaped like the search's: a prompt, a step of target tokens and
`<end_of_thought>`, then `<start_of_rating>`, right-padded to T. Both sides compute the same loss
(o1jax/learn/learner.py): the decoder over each row, the log-probs of the step's target tokens from the hidden
states at those positions only, PPO's clipped surrogate against fixed behaviour log-probs, the two-way softmax
rating loss at `<start_of_rating>`, weighted by importance weights; then one optimizer update.
  - o1jax: `learner.Learner.step` (jitted, state donated) on a 1-device mesh.
  - PyTorch: transformers' LlamaForCausalLM body, the same gather and head, `torch.optim.AdamW`.
Prints tokens/s for both, `ratio_vs_torch`, and the fraction of the machine's compute roof (6 x parameters FLOPs
per token at this machine's best fp32 matmul rate at the step's shapes). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from o1jax import xla_flags  # noqa: E402

xla_flags.configure_cpu()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.sampler import best_time, matmul_flops_per_s  # noqa: E402
from models import hf_io  # noqa: E402
from o1jax import parallel, pretrained  # noqa: E402
from o1jax.learn import experience, learner, lm  # noqa: E402

M = 48  # target slots: the step's tokens and its end


def make_batch(rows: int, T: int, vocab: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(100, 40000, (rows, T)).astype(np.int32)
  valid = np.zeros((rows, T), bool)
  loss_mask = np.zeros((rows, T), bool)
  rating_at = np.zeros(rows, np.int32)
  for r in range(rows):
    targets = 24 + (r * 7) % (M - 24)
    length = T - (r * 5) % 16
    prompt = length - targets - 1
    valid[r, :length] = True
    loss_mask[r, prompt - 1:prompt - 1 + targets] = True
    rating_at[r] = length - 1
  return {"tokens": tokens, "valid": valid, "loss_mask": loss_mask,
          "behaviour": (-rng.random((rows, T)) * 4 - 0.5).astype(np.float32) * loss_mask, "rating_at": rating_at,
          "advantage": rng.standard_normal(rows).astype(np.float32),
          "value_target": np.log(rng.uniform(0.05, 1.0, rows)).astype(np.float32),
          "sft": np.zeros(rows, bool), "weight": rng.uniform(0.3, 1.0, rows).astype(np.float32)}


def torch_step_fn(model, batch: dict, positive: int, negative: int, clip: float, lr: float):
  import torch
  b = {k: torch.as_tensor(v) for k, v in batch.items()}
  optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0, eps=1e-8)
  head = model.lm_head.weight   # [V, D] (tied to the embedding for SmolLM2)

  def step():
    hidden = model.model(input_ids=b["tokens"].long(), attention_mask=b["valid"].long()).last_hidden_state
    start = b["loss_mask"].int().argmax(1)
    T = b["tokens"].shape[1]
    index = torch.clamp(start[:, None] + torch.arange(M)[None, :], max=T - 2)
    target_mask = torch.gather(b["loss_mask"], 1, index) & (start[:, None] + torch.arange(M)[None, :] < T - 1)
    h = torch.gather(hidden, 1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    log_probs = torch.log_softmax(h @ head.T, dim=-1)
    nxt = torch.gather(b["tokens"].long(), 1, index + 1)
    picked = torch.gather(log_probs, 2, nxt[..., None])[..., 0]
    behaviour = torch.gather(b["behaviour"], 1, index)
    ratio = torch.exp(picked - behaviour)
    a = b["advantage"][:, None]
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip, 1 + clip) * a)
    m = target_mask.float()
    policy = -(surrogate * m).sum(1) / m.sum(1).clamp(min=1)
    hr = hidden[torch.arange(hidden.shape[0]), b["rating_at"].long()]
    pair = torch.log_softmax(torch.stack([hr @ head[positive], hr @ head[negative]], -1), -1)
    p = torch.exp(torch.clamp(b["value_target"], np.log(1e-6), 0))
    rating = -(p * pair[:, 0] + (1 - p) * pair[:, 1])
    loss = (b["weight"] * (policy + rating)).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss)
  return step


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="4 rows of 256 tokens, 2 timed steps per side")
  args = parser.parse_args()
  rows, T, repeats = (4, 256, 2) if args.quick else (8, 512, 3)

  import torch
  import transformers

  loaded = pretrained.load("smollm2-135m-instruct", adapter="configs/adapters/smollm2_135m_rating.safetensors",
                           dtype="float32")
  positive, negative = (loaded.tokenizer.token_to_id(t) for t in ("<positive_rating>", "<negative_rating>"))
  with tempfile.TemporaryDirectory() as export_dir:
    hf_io.save_pretrained(loaded.model, export_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
  reference.train()
  data = make_batch(rows, T, loaded.model.config.vocab_size)
  tokens = int(data["valid"].sum())

  model = lm.Model(config=loaded.model.config, base_vocab=loaded.base_vocab, lora=None)
  frozen, trainable = model.split(loaded.model.weights(), jax.random.key(0))
  optimizer = lm.OptimizerConfig(learning_rate=1e-5, warmup_steps=1, total_steps=100).make()
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  step = learner.Learner(model, optimizer, mesh, learner.LearnerConfig(max_targets=M),
                         experience.ExperienceConfig(seq_len=T), (positive, negative))
  frozen, state = step.place(frozen, lm.init_state(jax.tree.map(jnp.array, trainable), optimizer))
  batch = parallel.shard_batch(data, mesh)
  holder = {"state": state}

  def ours():
    holder["state"], _, metrics = step.step(frozen, holder["state"], batch)
    jax.block_until_ready(metrics["loss"])
    return float(metrics["loss"])

  theirs = torch_step_fn(reference, data, positive, negative, clip=0.2, lr=1e-5)
  first_ours, first_theirs = ours(), theirs()
  ours_s = best_time(ours, repeats)
  theirs_s = best_time(theirs, repeats)

  # The roof: 6 x non-embedding parameters FLOPs per token (forward 2, backward 4) at the best matmul rate.
  params = loaded.model.config.num_params() - loaded.model.config.vocab_size * loaded.model.config.d_model
  rate = matmul_flops_per_s(min(tokens, 2048))
  roof = rate / (6 * params)
  ours_tps, theirs_tps = tokens / ours_s, tokens / theirs_s
  print(f"batch {rows} x {T} ({tokens} real tokens); first-step losses o1jax {first_ours:.4f}, torch "
        f"{first_theirs:.4f}")
  print(f"o1jax  {ours_s * 1e3:8.0f} ms/step {ours_tps:8.1f} tok/s ({ours_tps / roof:.2f} of the roof)")
  print(f"torch  {theirs_s * 1e3:8.0f} ms/step {theirs_tps:8.1f} tok/s ({theirs_tps / roof:.2f} of the roof)")
  print(f"ratio {ours_tps / theirs_tps:.2f}x; roof {roof:.1f} tok/s (matmul {rate / 1e9:.0f} GFLOP/s)")
  print(json.dumps({"bench": "train_step", "model": "SmolLM2-135M fp32, full fine-tune", "rows": rows, "seq_len": T,
                    "tokens": tokens, "o1jax_step_s": round(ours_s, 3), "torch_step_s": round(theirs_s, 3),
                    "o1jax_tok_s": round(ours_tps, 1), "torch_tok_s": round(theirs_tps, 1),
                    "ratio_vs_torch": round(ours_tps / theirs_tps, 3), "roof_tok_s": round(roof, 1),
                    "o1jax_roof_fraction": round(ours_tps / roof, 3), "torch_roof_fraction": round(theirs_tps / roof, 3),
                    "first_loss_o1jax": round(first_ours, 5), "first_loss_torch": round(first_theirs, 5)}))


if __name__ == "__main__":
  main()
