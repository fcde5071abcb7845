"""configure_cpu keeps the user's XLA_FLAGS, adds its own, and refuses to run once JAX has started; the decode
loop's own compiler options."""

import os
import subprocess
import sys

import jax
import pytest

from o1jax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_refuses_after_backend_start():
  jax.devices()
  with pytest.raises(RuntimeError, match="after JAX started"):
    xla_flags.configure_cpu()


def test_merges_with_user_flags_before_jax_starts():
  code = ("import os; os.environ['XLA_FLAGS'] = '--xla_cpu_use_onednn=false --xla_dump_to=/tmp/x'\n"
          "from o1jax import xla_flags; print(xla_flags.configure_cpu())\n"
          "import jax, jax.numpy as jnp; print(float(jnp.ones(3).sum()))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                       env={**os.environ, "XLA_FLAGS": ""}).stdout.splitlines()
  assert out[0].split() == ["--xla_cpu_use_onednn=false", "--xla_dump_to=/tmp/x",
                            "--xla_cpu_experimental_ynn_fusion_type=",
                            "--xla_cpu_enable_concurrency_optimized_scheduler=false"]
  assert out[1] == "3.0"


def test_this_test_process_runs_with_the_collective_flags():
  """tests/conftest.py spells COLLECTIVE_FLAGS out (it runs before o1jax may be imported); they must not drift."""
  assert set(xla_flags.COLLECTIVE_FLAGS) <= set(os.environ["XLA_FLAGS"].split())


def test_decode_options_only_on_cpu_from_64_rows_and_only_when_the_user_chose_none(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type=")
  assert xla_flags.decode_compiler_options("cpu", 64) == {
      "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
  assert xla_flags.decode_compiler_options("cpu", 16) is None
  assert xla_flags.decode_compiler_options("tpu", 64) is None
  assert xla_flags.decode_compiler_options("gpu", 64) is None
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  assert xla_flags.decode_compiler_options("cpu", 64) is None


def test_decode_options_name_valid_enums_of_this_jaxlib():
  """XLA validates option values at compile time: a renamed fusion type fails here, not in a user's first decode."""
  options = xla_flags.decode_compiler_options("cpu", 64)
  args = (jax.numpy.ones((4, 8)), jax.numpy.ones((8, 16)))
  jax.jit(lambda q, k: q @ k, compiler_options=options).lower(*args).compile()
  with pytest.raises(Exception, match="not a valid enum value"):
    jax.jit(lambda q, k: q @ k, compiler_options={xla_flags.YNN_FUSION_OPTION: "dot"}).lower(*args).compile()
