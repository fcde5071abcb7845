"""The decoders against Hugging Face transformers: tiny random models, eager attention, float32.

Each case builds a transformers model with random weights (norm scales included, so the 1 + scale of Gemma and
the plain scale of Llama both matter), saves it with `save_pretrained`, loads it with `hf_io.load_pretrained`,
and compares log-probabilities at every position. Sequences are longer than Gemma's sliding window, the Llama
configs carry llama3 rope scaling with a short original context so that the scaling changes the frequencies,
and the Gemma configs use small softcaps so that tanh is far from linear.
"""

import numpy as np
import pytest

import reference_models as ref
from models import hf_io

TOLERANCE = 1e-4
SEQ_LEN = 24
log_softmax = ref.log_softmax
reference_log_probs = ref.log_probs

CASES = {
    "llama_untied": ("llama", False),
    "llama_tied": ("llama", True),
    "gemma2_tied": ("gemma2", True),
    "gemma2_untied": ("gemma2", False),
}


def build_reference(case: str, directory, seed: int = 0):
  family, tied = CASES[case]
  return ref.build(family, directory, tied=tied, seed=seed)


@pytest.mark.parametrize("case", sorted(CASES))
def test_full_forward_matches_transformers(case, tmp_path):
  reference = build_reference(case, tmp_path)
  model = hf_io.load_pretrained(str(tmp_path), dtype="float32")
  assert model.config.tie_embeddings == CASES[case][1]
  tokens = np.random.default_rng(1).integers(0, reference.config.vocab_size, (2, SEQ_LEN)).astype(np.int32)
  ours = log_softmax(model(tokens))
  theirs = reference_log_probs(reference, tokens)
  assert ours.shape == theirs.shape
  np.testing.assert_array_less(np.abs(ours - theirs).max(), TOLERANCE)


def test_sliding_window_and_rope_scaling_matter(tmp_path):
  """Guards the parity tests: the window and llama3 scaling change the outputs at these lengths."""
  gemma = build_reference("gemma2_tied", tmp_path / "g")
  tokens = np.random.default_rng(2).integers(0, 100, (1, SEQ_LEN)).astype(np.int32)
  model = hf_io.load_pretrained(str(tmp_path / "g"), dtype="float32")
  no_window = model.config.replace(sliding_window=None)
  from models import decoder
  unwindowed = log_softmax(decoder.full_logits(model.weights(), tokens, config=no_window))
  assert np.abs(unwindowed - reference_log_probs(gemma, tokens)).max() > 1e-3

  llama = build_reference("llama_untied", tmp_path / "l")
  model = hf_io.load_pretrained(str(tmp_path / "l"), dtype="float32")
  unscaled = log_softmax(decoder.full_logits(model.weights(), tokens, config=model.config.replace(rope_scaling=None)))
  assert np.abs(unscaled - reference_log_probs(llama, tokens)).max() > 1e-3


@pytest.mark.parametrize("case", ["gemma2_tied", "llama_untied"])
def test_bfloat16_weights_and_activations_stay_close(case, tmp_path):
  """bf16 weights + activations (the TPU setting) with float32 scores, softcaps, softmax and norm statistics:
  log-probs within bf16 rounding of the float32 reference, logits returned in float32."""
  reference = build_reference(case, tmp_path)
  model = hf_io.load_pretrained(str(tmp_path), dtype="bfloat16")
  assert model.weights()["embed"].dtype == np.dtype("bfloat16")
  tokens = np.random.default_rng(1).integers(0, reference.config.vocab_size, (2, SEQ_LEN)).astype(np.int32)
  logits = model(tokens)
  assert logits.dtype == np.float32
  difference = np.abs(log_softmax(logits) - reference_log_probs(reference, tokens))
  assert 1e-4 < difference.max() < 0.15  # really ran in bf16, and only bf16's rounding apart
