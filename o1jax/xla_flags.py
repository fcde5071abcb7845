"""XLA flags o1jax's entry points set before JAX starts its CPU backend.

XLA:CPU has several matmul back ends. On the x86 CPUs measured here (2-core AVX-512 VMs) oneDNN's fp32 GEMM
runs SmolLM2's layer shapes 10-20% faster than the default YNNPACK fusions, which decides whether a CPU forward
keeps up with PyTorch/MKL (bench/forward.py). The flags only touch the CPU back end; TPU and GPU runs ignore them.

Call `configure_cpu()` at the top of a program, before anything imports jax: XLA reads XLA_FLAGS once, when the
first backend starts, and a later change would be silently ignored, so that case raises instead.
"""

from __future__ import annotations

import os
import sys

CPU_FLAGS = ("--xla_cpu_use_onednn=true", "--xla_cpu_experimental_ynn_fusion_type=")


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
