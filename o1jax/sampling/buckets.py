"""Static length buckets: every shape the sampler compiles for comes from a short fixed list.

A prompt of length n goes into the smallest prompt bucket >= n (right-padded, padding invisible through the
positions); a request for m new tokens runs the smallest new-token bucket >= m. So a run compiles at most
|prompt buckets| x |new-token buckets| decode programs however the lengths vary.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Sorted bucket sizes. `rows` pads the batch to a multiple of itself (the number of data-parallel shards).

  `batch` are row counts a batch is padded up to (then to the multiple of `rows`); () pads to the multiple only.
  A caller whose batch size varies from call to call (the search: trees finish, selections land on terminals)
  sets them so that it compiles one program per batch bucket instead of one per batch size.
  """

  prompt: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)
  new_tokens: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
  rows: int = 1
  batch: tuple[int, ...] = ()

  def __post_init__(self):
    for name in ("prompt", "new_tokens", "batch"):
      sizes = getattr(self, name)
      if (not sizes and name != "batch") or list(sizes) != sorted(set(sizes)) or (sizes and sizes[0] < 1):
        raise ValueError(f"{name} buckets {sizes} must be distinct positive sizes in increasing order.")

  def prompt_bucket(self, length: int) -> int:
    return _smallest_at_least(self.prompt, length, "prompt of")

  def new_token_bucket(self, count: int) -> int:
    return _smallest_at_least(self.new_tokens, count, "max_new_tokens")

  def padded_rows(self, count: int) -> int:
    """The batch bucket for `count` rows (beyond the largest batch bucket: `count` itself), as a multiple of rows."""
    count = next((b for b in self.batch if b >= count), count)
    return -(-count // self.rows) * self.rows


def _smallest_at_least(sizes: tuple[int, ...], n: int, what: str) -> int:
  for size in sizes:
    if size >= n:
      return size
  raise ValueError(f"{what} {n} tokens exceeds the largest bucket ({sizes[-1]}); add a larger bucket.")


def pad_rows(sequences: list[list[int]], length: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists into [rows, length] int32 tokens and a bool validity mask (padding rows all False)."""
  tokens = np.zeros((rows, length), np.int32)
  valid = np.zeros((rows, length), bool)
  for i, seq in enumerate(sequences):
    tokens[i, :len(seq)] = seq
    valid[i, :len(seq)] = True
  return tokens, valid
