"""XLA flags o1jax's entry points set before JAX starts its CPU backend.

XLA:CPU has several matmul back ends. On the x86 CPUs measured here (2-core AVX-512 VMs) oneDNN's fp32 GEMM
runs SmolLM2's layer shapes 10-20% faster than the default YNNPACK fusions, which decides whether a CPU forward
keeps up with PyTorch/MKL (bench/forward.py). The flags only touch the CPU back end; TPU and GPU runs ignore them.

Call `configure_cpu()` at the top of a program, before anything imports jax: XLA reads XLA_FLAGS once, when the
first backend starts, and a later change would be silently ignored, so that case raises instead.

One program differs: the sampler's decode loop at 64 rows or more, whose matmuls have one token per sample and
whose reductions run over tiny [rows, heads, slots] score blocks. It is compiled with YNNPACK's dot and reduce
fusions (`decode_compiler_options`, passed to that one `jax.jit`), which took SmolLM2's decode step at 64 rows from
about 265 to 190-250 ms (back-to-back runs on the 2-core VM). The same fusions made the decode step at 16 rows
about 8% slower and the prefill (8k rows per matmul) 30% slower, which is why they are per program and not in
CPU_FLAGS.

Several CPU devices in one process (`--xla_force_host_platform_device_count`, the tests' 8 fake devices, a CPU
mesh) need COLLECTIVE_FLAGS: with XLA:CPU's concurrency-optimized scheduler, a sharded learner step (collectives in
the gradient-accumulation scan and in the layer scan nested in it) deadlocks on a 2-core machine in about one step
of three: the devices' threads block in different rendezvous and the 40 s termination timeout aborts the process.
With the scheduler off, 36 of 36 steps ran (test_learner's three mesh shapes, repeated).
"""

from __future__ import annotations

import os
import sys

COLLECTIVE_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)
CPU_FLAGS = ("--xla_cpu_use_onednn=true", "--xla_cpu_experimental_ynn_fusion_type=") + COLLECTIVE_FLAGS
YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
DECODE_YNN_FUSIONS = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
DECODE_YNN_MIN_ROWS = 64  # measured faster at 64 rows, slower at 16


def configure_cpu(flags: tuple[str, ...] = CPU_FLAGS) -> str:
  """Appends `flags` to XLA_FLAGS (keeping what the user set) and returns the new value.

  Raises:
    RuntimeError: when a JAX backend is already running, so the flags could no longer take effect.
  """
  if "jax" in sys.modules:
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
      raise RuntimeError("o1jax.xla_flags.configure_cpu() was called after JAX started its backends; call it "
                         "before the first JAX computation.")
  current = os.environ.get("XLA_FLAGS", "").split()
  names = {f.split("=")[0] for f in current}
  merged = current + [f for f in flags if f.split("=")[0] not in names]
  os.environ["XLA_FLAGS"] = " ".join(merged)
  return os.environ["XLA_FLAGS"]


def decode_compiler_options(backend: str, rows: int) -> dict[str, str] | None:
  """`jax.jit(compiler_options=...)` for a decode loop of `rows` rows on `backend` (None: compile it like the rest).

  Only the CPU back end gets options, only from DECODE_YNN_MIN_ROWS rows, and none when the user's XLA_FLAGS
  already choose the YNN fusions.
  """
  user_flags = os.environ.get("XLA_FLAGS", "").split()
  user_chose = any(f.split("=")[0] == "--" + YNN_FUSION_OPTION for f in user_flags if f not in CPU_FLAGS)
  if backend != "cpu" or rows < DECODE_YNN_MIN_ROWS or user_chose:
    return None
  return {YNN_FUSION_OPTION: DECODE_YNN_FUSIONS}
