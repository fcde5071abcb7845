"""Sampling throughput: o1jax vs transformers `generate` on the same SmolLM2-135M weights, in one process.

  .venv/bin/python bench/sampler.py [--quick]

128-token prompts, 64 sampled tokens per row (no stop tokens; temperature 1, no top-k / top-p), float32, CPU, at
batch 1, 16 and 64. Times include the prefill on both sides. The compute roof is this machine's jitted fp32
matmul rate at SmolLM2's layer shapes divided by 2 x parameters (FLOPs per token); each figure is also printed
as a fraction of it. Last line: {"bench": "sampler", "ratio_vs_hf_b16": ..., "roof_fraction_b64": ...}.

It also measures two floors that no fp32 implementation on this machine can beat, and from them the best
throughput any sampler could reach here:
  - weight_stream_ms: one pass of `rows` activations through every weight matrix of the model (the fused q/k/v,
    output, gate/up and down projections of every layer, then the vocabulary head) with nothing else: no
    attention, no norms, no sampling. A decode step must do at least this; at small batches it is bound by how
    fast this machine streams the fp32 weights from memory.
  - prefill_s: o1jax's own prefill of the batch (the same call the timed run makes).
  bound_tok_s = batch x new tokens / (prefill_s + new tokens x weight_stream_ms), and bound_ratio_vs_hf is that
  bound over transformers' measured figure: the ratio a sampler with zero overhead beyond the weight stream would
  reach, given our prefill. roof_bound_ratio_vs_hf replaces our prefill by its matmul floor (prompt tokens x 2 x
  non-embedding parameters at this machine's best matmul rate for that many rows): no fp32 sampler built on
  XLA:CPU's dots could beat it here.
  - kv_stream_ms: one read of the keys and values a decode step attends to (the roof counts weights only, but at
    batch 64 the fp32 cache of ~160 positions is as many bytes as the weights). kv_bound_* add it to each decode
    step of the roof bound.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from o1jax import xla_flags  # noqa: E402

xla_flags.configure_cpu()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models import hf_io  # noqa: E402
from o1jax import pretrained  # noqa: E402
from o1jax.sampling.buckets import Buckets  # noqa: E402
from o1jax.sampling.sampler import Sampler, SamplingParams  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 128, 64


def matmul_flops_per_s(rows: int, repeats: int = 10) -> float:
  """Best jitted fp32 matmul rate over SmolLM2's three layer shapes at `rows` rows."""
  best = 0.0
  for k, n in [(576, 1536), (1536, 576), (576, 960)]:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((rows, k)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
      f(a, b).block_until_ready()
    best = max(best, 2 * rows * k * n * repeats / (time.perf_counter() - start))
  return best


def weight_stream_seconds(weights, rows: int, repeats: int = 5) -> float:
  """Best time of x @ W over every projection of every layer, then the head, for x of [rows, D] (see module doc)."""
  def one_pass(x, weights):
    d = x.shape[-1]
    for layer in weights["layers"]:
      qkv = layer["qkv"].reshape(d, -1)
      h = x @ qkv
      o = layer["o"].reshape(-1, d)
      x = x + h[:, :o.shape[0]] @ o
      g = x @ layer["gate_up"]
      f = layer["down"].shape[0]
      x = x + (g[:, :f] * g[:, f:]) @ layer["down"]
    head = weights["head"] if "head" in weights else weights["embed"].T
    return x @ head

  run = jax.jit(one_pass)
  x = jnp.ones((rows, weights["embed"].shape[1]), jnp.float32) * 1e-3
  return best_time(lambda: run(x, weights).block_until_ready(), repeats)


def kv_stream_seconds(config, rows: int, repeats: int = 5) -> float:
  """Best time to read, once, the keys and values a decode step must attend to, averaged over the steps.

  Step j of a sample attends to PROMPT_LEN + j cached positions in every layer; any exact fp32 attention reads
  each of them (K and V, every kv head) at least once. Each layer's K and V of the mean length PROMPT_LEN +
  (NEW_TOKENS - 1) / 2 are summed by a matrix-vector product (XLA:CPU's fastest streaming read) over distinct
  buffers, so nothing stays in cache between layers.
  """
  slots = PROMPT_LEN + (NEW_TOKENS - 1) // 2
  shape = (rows * config.num_kv_heads * slots, config.head_dim)
  buffers = [jnp.full(shape, 1e-3, jnp.float32) + i for i in range(2 * config.num_layers)]
  ones = jnp.ones((config.head_dim,), jnp.float32)
  run = jax.jit(lambda buffers: sum(jnp.sum(b @ ones) for b in buffers))
  return best_time(lambda: run(buffers).block_until_ready(), repeats)


def best_time(fn, repeats: int) -> float:
  fn()  # warm-up (compiles)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="one timed run per side and batch size")
  parser.add_argument("--batches", default="1,16,64")
  args = parser.parse_args()
  repeats = 1 if args.quick else 3
  batches = [int(b) for b in args.batches.split(",")]

  import torch
  import transformers

  model = hf_io.load_pretrained(pretrained.resolve("smollm2-135m-instruct"), dtype="float32")
  with tempfile.TemporaryDirectory() as export_dir:
    hf_io.save_pretrained(model, export_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
  reference.generation_config.eos_token_id = None
  reference.generation_config.pad_token_id = 0

  sampler = Sampler(model, buckets=Buckets(prompt=(PROMPT_LEN,), new_tokens=(NEW_TOKENS,)))
  params = SamplingParams(temperature=1.0)
  params_count = model.config.num_params()
  rows = []
  for batch in batches:
    prompts = np.random.default_rng(batch).integers(100, model.config.vocab_size, (batch, PROMPT_LEN))

    def ours():
      samples = sampler.sample(sampler.prefill(prompts.tolist(), reserve=NEW_TOKENS), k=1, stop=[],
                               max_new_tokens=NEW_TOKENS, params=params, seed=0)
      assert samples.lengths.min() == NEW_TOKENS

    def theirs():
      with torch.inference_mode():
        out = reference.generate(torch.as_tensor(prompts), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
      assert out.shape[1] == PROMPT_LEN + NEW_TOKENS

    ours_s, theirs_s = best_time(ours, repeats), best_time(theirs, repeats)
    roof = matmul_flops_per_s(batch) / (2 * params_count)
    prefill_s = best_time(lambda: jax.block_until_ready(sampler.prefill(prompts.tolist(), reserve=NEW_TOKENS).logits),
                          repeats + 1)
    stream_s = weight_stream_seconds(sampler.weights, batch)
    bound = batch * NEW_TOKENS / (prefill_s + NEW_TOKENS * stream_s)
    body_params = params_count - model.config.vocab_size * model.config.d_model
    prefill_floor_s = batch * PROMPT_LEN * 2 * body_params / matmul_flops_per_s(min(batch * PROMPT_LEN, 2048))
    roof_bound = batch * NEW_TOKENS / (prefill_floor_s + NEW_TOKENS * stream_s)
    kv_s = kv_stream_seconds(model.config, batch)
    kv_bound = batch * NEW_TOKENS / (prefill_floor_s + NEW_TOKENS * (stream_s + kv_s))
    rows.append(dict(batch=batch, o1jax=batch * NEW_TOKENS / ours_s, hf=batch * NEW_TOKENS / theirs_s, roof=roof,
                     prefill_s=prefill_s, stream_ms=stream_s * 1e3, bound=bound, roof_bound=roof_bound,
                     prefill_floor_s=prefill_floor_s, kv_ms=kv_s * 1e3, kv_bound=kv_bound,
                     step_ms=(ours_s - prefill_s) / NEW_TOKENS * 1e3))

  print(f"{'batch':>6s}{'o1jax tok/s':>14s}{'hf tok/s':>12s}{'ratio':>8s}{'roof tok/s':>12s}{'o1jax/roof':>12s}"
        f"{'hf/roof':>10s}")
  result = {"bench": "sampler", "model": "SmolLM2-135M fp32", "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS}
  for r in rows:
    print(f"{r['batch']:6d}{r['o1jax']:14.1f}{r['hf']:12.1f}{r['o1jax'] / r['hf']:8.2f}{r['roof']:12.1f}"
          f"{r['o1jax'] / r['roof']:12.2f}{r['hf'] / r['roof']:10.2f}")
    b = r["batch"]
    result.update({f"o1jax_tok_s_b{b}": round(r["o1jax"], 1), f"hf_tok_s_b{b}": round(r["hf"], 1),
                   f"ratio_vs_hf_b{b}": round(r["o1jax"] / r["hf"], 3), f"roof_tok_s_b{b}": round(r["roof"], 1),
                   f"roof_fraction_b{b}": round(r["o1jax"] / r["roof"], 3)})
  print(f"\n{'batch':>6s}{'prefill s':>11s}{'decode step ms':>16s}{'weight stream ms':>18s}{'bound tok/s':>13s}"
        f"{'bound / hf':>12s}{'bound / roof':>14s}{'prefill floor s':>17s}{'roof bound / hf':>17s}"
        f"{'kv stream ms':>14s}{'+kv bound / roof':>18s}")
  for r in rows:
    print(f"{r['batch']:6d}{r['prefill_s']:11.2f}{r['step_ms']:16.1f}{r['stream_ms']:18.1f}{r['bound']:13.1f}"
          f"{r['bound'] / r['hf']:12.2f}{r['bound'] / r['roof']:14.2f}{r['prefill_floor_s']:17.2f}"
          f"{r['roof_bound'] / r['hf']:17.2f}{r['kv_ms']:14.1f}{r['kv_bound'] / r['roof']:18.2f}")
    b = r["batch"]
    result.update({f"prefill_s_b{b}": round(r["prefill_s"], 2), f"decode_step_ms_b{b}": round(r["step_ms"], 1),
                   f"weight_stream_ms_b{b}": round(r["stream_ms"], 1), f"bound_tok_s_b{b}": round(r["bound"], 1),
                   f"bound_ratio_vs_hf_b{b}": round(r["bound"] / r["hf"], 3),
                   f"bound_roof_fraction_b{b}": round(r["bound"] / r["roof"], 3),
                   f"prefill_floor_s_b{b}": round(r["prefill_floor_s"], 2),
                   f"roof_bound_ratio_vs_hf_b{b}": round(r["roof_bound"] / r["hf"], 3),
                   f"roof_bound_roof_fraction_b{b}": round(r["roof_bound"] / r["roof"], 3),
                   f"kv_stream_ms_b{b}": round(r["kv_ms"], 1),
                   f"kv_bound_ratio_vs_hf_b{b}": round(r["kv_bound"] / r["hf"], 3),
                   f"kv_bound_roof_fraction_b{b}": round(r["kv_bound"] / r["roof"], 3)})
  print(json.dumps(result))


if __name__ == "__main__":
  main()
