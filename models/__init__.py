"""Decoders only: Gemma-2 and Llama in Flax NNX, their configs, and Hugging Face / GGUF checkpoint I/O.

Nothing here knows about search, training or tokenizers; `o1jax/` builds on these modules, never the reverse.
"""
