"""o1jax: o1-style reasoning by tree search and self-play in JAX (LLaMA-O1 semantics, array-first, TPU-ready)."""
