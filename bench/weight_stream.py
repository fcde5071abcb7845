"""The decode step's matmul floor: one pass of a few rows through SmolLM2-135M's fp32 weights, on every XLA:CPU
matmul back end, in torch and in numpy, against this machine's memory and compute floors.

  .venv/bin/python bench/weight_stream.py [--quick] [--rows 16,64]

A decode step multiplies `rows` activations (one new token per sample) by every weight matrix of the model: the
fused q/k/v, output, gate/up and down projections of each layer, then the vocabulary head. `bench/sampler.py`
takes the time of that pass, compiled the way o1jax compiles its programs, as the floor of a decode step. This
bench asks whether a different matmul kernel could lower that floor. The same pass (random weights of SmolLM2's
shapes; the values do not matter) runs:

  xla_onednn     o1jax's process-wide flags (xla_cpu_use_onednn=true, no YNNPACK fusions)
  xla_eigen      xla_cpu_use_onednn=false
  xla_ynnpack    YNNPACK dot fusions (what the sampler's decode loop uses from 64 rows)
  xla_ynnpack_nk YNNPACK dot fusions with every weight stored transposed, [out, in], contracted on its minor axis
  torch          the same matmuls in torch (MKL/oneDNN), torch.inference_mode
  numpy          the same matmuls in numpy (OpenBLAS)

and two floors no kernel can beat:

  memory_ms   the weights' bytes at this machine's streaming rate (the best 1-row pass above: a matrix-vector
              product reads each weight once and does almost nothing else)
  compute_ms  2 x rows x parameters FLOPs at this machine's best fp32 matmul rate (a 2048-row product)

Prints a table, then one JSON line: {"bench": "weight_stream", "ratio_vs_torch_b16": the best XLA back end's
speed over torch's at 16 rows (likewise "ratio_vs_numpy_b16"), "floor_fraction_b16": the max(memory, compute)
floor over the best XLA back end's time, ..., and the same keys for every row count}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from o1jax import xla_flags  # noqa: E402

xla_flags.configure_cpu()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.forward import interleaved_best  # noqa: E402
from models import presets  # noqa: E402

YNN_DOT = {xla_flags.YNN_FUSION_OPTION: "LIBRARY_FUSION_TYPE_DOT", "xla_cpu_use_onednn": False}
BACKENDS = {  # name: (compiler options of the jitted pass, weights stored transposed)
    "xla_onednn": (None, False),
    "xla_eigen": ({"xla_cpu_use_onednn": False}, False),
    "xla_ynnpack": (YNN_DOT, False),
    "xla_ynnpack_nk": (YNN_DOT, True),
}


def smollm2_weights(transposed: bool) -> dict:
  """Random fp32 matrices of SmolLM2-135M's decode-step shapes, [in, out] (or [out, in] when transposed)."""
  c = presets.smollm2_135m()
  rng = np.random.default_rng(0)
  shapes = dict(qkv=(c.d_model, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim),
                o=(c.num_heads * c.head_dim, c.d_model), gate_up=(c.d_model, 2 * c.ffw_dim),
                down=(c.ffw_dim, c.d_model))

  def matrix(shape):
    m = rng.standard_normal(shape, np.float32) * 0.02
    return np.ascontiguousarray(m.T) if transposed else m

  return dict(layers=[{name: matrix(s) for name, s in shapes.items()} for _ in range(c.num_layers)],
              head=matrix((c.d_model, c.vocab_size)))


def weight_pass(x, weights, mm):
  """x [rows, D] through every matrix, mm(activations, stored matrix) being the product: the activation flow of a
  decode step without attention or norms."""
  d = x.shape[-1]
  for layer in weights["layers"]:
    h = mm(x, layer["qkv"])
    x = x + mm(h[:, :d], layer["o"])
    g = mm(x, layer["gate_up"])
    f = g.shape[1] // 2
    x = x + mm(g[:, :f] * g[:, f:], layer["down"])
  return mm(x, weights["head"])


def xla_runner(options, transposed: bool, weights):
  # A transposed [out, in] matrix is contracted on its minor axis, with no transpose of the stored array.
  mm = (lambda a, w: jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())))) if transposed else jnp.matmul
  run = jax.jit(lambda x, w: weight_pass(x, w, mm), compiler_options=options)
  device_weights = jax.device_put(weights)
  return lambda x: run(x, device_weights).block_until_ready()


def torch_runner(weights):
  import torch
  torch_weights = dict(layers=[{k: torch.from_numpy(v) for k, v in layer.items()} for layer in weights["layers"]],
                       head=torch.from_numpy(weights["head"]))

  def run(x):
    with torch.inference_mode():
      return weight_pass(torch.from_numpy(np.asarray(x)), torch_weights, torch.matmul)
  return run


def best_matmul_flops(repeats: int) -> float:
  """Best fp32 rate of a 2048-row product over SmolLM2's layer shapes, on XLA's Eigen and oneDNN back ends."""
  c = presets.smollm2_135m()
  best = 0.0
  for k, n in [(c.d_model, c.ffw_dim), (c.ffw_dim, c.d_model), (c.d_model, 2 * c.ffw_dim)]:
    a = jnp.ones((2048, k), jnp.float32)
    b = jnp.ones((k, n), jnp.float32)
    for options in (None, {"xla_cpu_use_onednn": False}):
      f = jax.jit(lambda a, b: a @ b, compiler_options=options)
      t, = interleaved_best([lambda: f(a, b).block_until_ready()], repeats)
      best = max(best, 2 * 2048 * k * n / t)
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="3 interleaved rounds instead of 5")
  parser.add_argument("--rows", default="16,64", help="row counts to run besides 1 (always run: the memory floor)")
  args = parser.parse_args()
  rounds = 3 if args.quick else 5
  rows_list = sorted({1, *(int(r) for r in args.rows.split(","))})
  if rows_list[0] < 1:
    raise ValueError(f"--rows must be positive row counts; got {args.rows!r}.")

  weights = {t: smollm2_weights(t) for t in (False, True)}
  runners = {name: xla_runner(options, transposed, weights[transposed])
             for name, (options, transposed) in BACKENDS.items()}
  runners["torch"] = torch_runner(weights[False])
  runners["numpy"] = lambda x: weight_pass(np.asarray(x), weights[False], np.matmul)
  c = presets.smollm2_135m()
  plain = weights[False]
  matrix_params = sum(a.size for layer in plain["layers"] for a in layer.values()) + plain["head"].size
  peak = best_matmul_flops(rounds)

  times = {}  # (rows, backend) -> best ms over rounds that alternate the back ends (the same machine load)
  for rows in rows_list:
    # Small activations keep the gated products (quadratic in x) from growing to inf over the 30 layers.
    x = np.random.default_rng(rows).standard_normal((rows, c.d_model), np.float32) * 1e-3
    best = interleaved_best([functools.partial(run, x) for run in runners.values()], rounds)
    times.update({(rows, name): t * 1e3 for name, t in zip(runners, best)})
  memory_ms = min(times[1, name] for name in runners)

  names = list(runners)
  print(f"SmolLM2-135M decode-step weight pass, fp32, {matrix_params / 1e6:.1f}M matrix parameters "
        f"({matrix_params * 4 / 1e6:.0f} MB); best fp32 matmul rate {peak / 1e9:.0f} GFLOP/s")
  print(f"{'rows':>5s}" + "".join(f"{n:>16s}" for n in names) + f"{'memory ms':>11s}{'compute ms':>12s}"
        f"{'floor / best':>14s}")
  result = {"bench": "weight_stream", "model": "SmolLM2-135M fp32", "matmul_gflop_s": round(peak / 1e9, 1),
            "memory_floor_ms": round(memory_ms, 2)}
  for rows in rows_list:
    compute_ms = 2 * rows * matrix_params / peak * 1e3
    xla_best = min((n for n in names if n.startswith("xla_")), key=lambda n: times[rows, n])
    floor = max(memory_ms, compute_ms)
    print(f"{rows:5d}" + "".join(f"{times[rows, n]:16.1f}" for n in names) + f"{memory_ms:11.1f}"
          f"{compute_ms:12.1f}{floor / times[rows, xla_best]:14.2f}")
    result.update({f"{n}_ms_b{rows}": round(times[rows, n], 2) for n in names})
    result.update({f"best_xla_b{rows}": xla_best, f"compute_floor_ms_b{rows}": round(compute_ms, 2),
                   f"floor_fraction_b{rows}": round(floor / times[rows, xla_best], 3),
                   f"ratio_vs_torch_b{rows}": round(times[rows, "torch"] / times[rows, xla_best], 3),
                   f"ratio_vs_numpy_b{rows}": round(times[rows, "numpy"] / times[rows, xla_best], 3)})
  print(json.dumps(result))


if __name__ == "__main__":
  main()
