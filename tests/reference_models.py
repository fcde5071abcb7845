"""Tiny random transformers models (the numerical reference) saved as Hugging Face checkpoints."""

import numpy as np
import torch
import transformers


def randomize(model: torch.nn.Module, seed: int) -> None:
  """Random weights everywhere, norm scales included (around 0 for Gemma's 1 + scale, around 1 for Llama)."""
  generator = torch.Generator().manual_seed(seed)
  is_gemma = "gemma" in type(model).__name__.lower()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(0.3 * torch.randn(p.shape, generator=generator) + (0.0 if is_gemma else 1.0))
      else:
        p.copy_(0.15 * torch.randn(p.shape, generator=generator))


def llama_config(tied: bool = False) -> transformers.LlamaConfig:
  return transformers.LlamaConfig(
      vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
      num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=256,
      tie_word_embeddings=tied,
      rope_parameters={"rope_type": "llama3", "rope_theta": 50_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
      attn_implementation="eager")


def gemma2_config(tied: bool = True) -> transformers.Gemma2Config:
  return transformers.Gemma2Config(
      vocab_size=103, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
      final_logit_softcapping=3.0, tie_word_embeddings=tied, max_position_embeddings=256,
      attn_implementation="eager")


def build(family: str, directory, *, tied: bool | None = None, seed: int = 0):
  """A random eval-mode transformers model of `family` ("llama" or "gemma2"), saved to `directory`."""
  if family == "llama":
    model = transformers.LlamaForCausalLM(llama_config(bool(tied)))
  else:
    model = transformers.Gemma2ForCausalLM(gemma2_config(True if tied is None else tied))
  model.eval()
  randomize(model, seed)
  model.save_pretrained(directory)
  return model


def log_softmax(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def log_probs(model, tokens) -> np.ndarray:
  """[B, T, V] float64 log-probs of a transformers model over int tokens [B, T]."""
  with torch.no_grad():
    return log_softmax(model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy())
