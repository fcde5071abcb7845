"""grain pipelines: problems for search and self-play, token batches for language-model training.

Both pipelines are `grain.MapDataset`s built the same way, so their order is a pure function of the arguments:

  records -> global shuffle (new order each epoch) -> shard (stride over processes) -> [batch] -> repeat(epochs)

The shuffle happens before the shard and with the same seed on every process, so in each epoch the processes take
disjoint strided slices of one global order and together cover it. Every process must therefore pass the same
`seed`. Shards default to this JAX process (`jax.process_index()` of `jax.process_count()`).

Resuming: a dataset built again from the same arguments, plus the dict from `get_state`, yields the same elements
from the same position:

  it = iterator(dataset)                           # or iterator(dataset, state=saved) after a restart
  batch = next(it)
  saved = get_state(it)                            # a JSON-serializable dict, stored next to the model state

Shape legend: B batch rows, T tokens per row (`seq_len`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import copy
import json
from typing import Any

from absl import logging
import grain
import numpy as np

from o1jax.data import problems as problems_lib

_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------------------------------------
# Shared plumbing: seeds, shards, epochs, iterators.


def _shuffle_seed(seed: int) -> int:
  """A 32-bit shuffle seed drawn from `seed`.

  grain reseeds each epoch with `seed + epoch`, so passing seeds 0 and 1 straight through would make epoch 1 of
  seed 0 the same order as epoch 0 of seed 1; hashing the user's seed first keeps distinct seeds apart.
  """
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed={seed!r} must be a non-negative integer.")
  return int(np.random.SeedSequence(int(seed)).generate_state(1)[0])


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  """(index, count) of this process's shard: the given pair, or this JAX process when both are None."""
  if shard_index is None and shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only the default needs it)
    return jax.process_index(), jax.process_count()
  if shard_index is None or shard_count is None:
    raise ValueError(f"shard_index={shard_index} and shard_count={shard_count}: give both or neither.")
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must lie in [0, shard_count) with shard_count={shard_count} >= 1.")
  return int(shard_index), int(shard_count)


def _check_epochs(num_epochs: int | None) -> None:
  if num_epochs is not None and (isinstance(num_epochs, bool) or num_epochs < 1):
    raise ValueError(f"num_epochs={num_epochs!r} must be a positive integer, or None to repeat forever.")


def _shuffled_shard(ds: grain.MapDataset, *, seed: int, shuffle: bool, shard_index: int, shard_count: int,
                    keep: int | None = None) -> grain.MapDataset:
  """One epoch of this shard: the first `keep` elements of the (shuffled) global order, every shard_count-th.

  Indices past one epoch fall through to later epochs of the shuffle (grain folds the epoch into the seed), so
  `repeat` on top of this reshuffles each epoch while every epoch stays split the same way across shards.
  """
  if shuffle:
    ds = ds.shuffle(seed=_shuffle_seed(seed))
  else:
    _shuffle_seed(seed)  # validate it all the same
  if keep is not None and keep < len(ds):
    ds = ds[:keep]
  return ds[shard_index::shard_count]


def steps_per_epoch(dataset: grain.MapDataset) -> int:
  """Elements (problems or batches) one epoch of a pipeline from this module yields on this process.

  `len(dataset)` is the whole run: num_epochs * steps_per_epoch, or sys.maxsize when it repeats forever.
  """
  # Every pipeline here ends in `.repeat(num_epochs)` over a single epoch.
  if type(dataset).__name__ != "RepeatMapDataset" or len(dataset.parents) != 1:
    raise ValueError(f"steps_per_epoch expects a dataset from problem_dataset or text_dataset, got {dataset}.")
  return len(dataset.parents[0])


def iterator(dataset: grain.MapDataset, state: dict[str, Any] | None = None, *, num_threads: int = 1,
             prefetch: int = 8) -> grain.DatasetIterator:
  """An iterator over `dataset`, resumed from `state` (from `get_state`) when given.

  Args:
    dataset: a pipeline from this module (any grain.MapDataset works).
    state: the dict `get_state` returned for an iterator over a dataset built with the same arguments.
    num_threads: threads reading elements ahead (0 reads in the calling thread). The per-element work here is
      padding a row or building a dict, so threads suffice: no worker processes, no absl flags needed.
    prefetch: elements read ahead.
  """
  read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  it = iter(dataset.to_iter_dataset(read_options))
  if state is not None:
    set_state(it, state)
  return it


def get_state(it: grain.DatasetIterator) -> dict[str, Any]:
  """The iterator's position as a JSON-serializable dict (a deep copy: later `next` calls do not change it)."""
  state = copy.deepcopy(it.get_state())
  try:
    json.dumps(state)
  except TypeError as e:
    raise TypeError(f"grain iterator state {state!r} is not JSON-serializable: {e}") from None
  return state


def set_state(it: grain.DatasetIterator, state: dict[str, Any]) -> None:
  """Moves `it` (a fresh iterator over a dataset built with the same arguments) to the position in `state`."""
  expected = it.get_state()
  if not isinstance(state, dict) or set(state) != set(expected):
    raise ValueError(f"iterator state {state!r} does not fit this pipeline, whose state has keys {sorted(expected)}.")
  it.set_state(copy.deepcopy(state))


# ---------------------------------------------------------------------------------------------------------------
# Problems.


def problem_dataset(split: str, *, seed: int, shuffle: bool = True, num_epochs: int | None = 1,
                    shard_index: int | None = None, shard_count: int | None = None, start: int = 0,
                    count: int | None = None) -> grain.MapDataset:
  """Problems of a split as dicts {"uid", "question", "answer", "solution"} (all str), one per element.

  Args:
    split: a split of `problems.FILES` (gsm8k_train, gsm8k_test, math_train, math500).
    seed: shuffle seed; the same on every process.
    shuffle: a new order each epoch when True, file order when False.
    num_epochs: passes over the data; None repeats forever.
    shard_index, shard_count: this process's shard; both None means this JAX process. The shards of one epoch are
      disjoint and cover the split (their sizes differ by at most one).
    start, count: take problems [start, start + count) of the split (see `problems.load`) before anything else.

  Returns:
    A grain.MapDataset; `len()` is the number of problems this shard yields over all epochs (sys.maxsize when
    infinite) and `steps_per_epoch()` the number per epoch.
  """
  _check_epochs(num_epochs)
  shard_index, shard_count = _shard(shard_index, shard_count)
  records = [{"uid": p.uid, "question": p.question, "answer": p.answer, "solution": p.solution}
             for p in problems_lib.load(split, start, count)]
  if len(records) < shard_count:
    raise ValueError(f"{split} has {len(records)} problem(s) for {shard_count} shards; every shard needs one.")
  ds = _shuffled_shard(grain.MapDataset.source(records), seed=seed, shuffle=shuffle, shard_index=shard_index,
                       shard_count=shard_count)
  return ds.repeat(num_epochs)


# ---------------------------------------------------------------------------------------------------------------
# Token rows for language-model training.


class TokenRows:
  """Rows of at most T tokens stored ragged; row r comes out right-padded to T as numpy arrays.

  `tokens` and `targets` are the rows concatenated; row r is [offsets[r], offsets[r + 1]). targets[i] says whether
  token i is trained on, i.e. predicted from the token before it.
  """

  def __init__(self, tokens: np.ndarray, targets: np.ndarray, offsets: np.ndarray, seq_len: int, pad_id: int):
    self._tokens, self._targets, self._offsets = tokens, targets, offsets
    self._seq_len, self._pad_id = seq_len, pad_id

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, r: int) -> dict[str, np.ndarray]:
    begin, end = int(self._offsets[r]), int(self._offsets[r + 1])
    n = end - begin
    tokens = np.full(self._seq_len, self._pad_id, np.int32)
    tokens[:n] = self._tokens[begin:end]
    valid = np.zeros(self._seq_len, bool)
    valid[:n] = True
    # Position t trains on predicting token t + 1, so the loss mask is the target flags shifted left by one.
    loss_mask = np.zeros(self._seq_len, bool)
    loss_mask[:n - 1] = self._targets[begin + 1:end]
    return {"tokens": tokens, "valid": valid, "loss_mask": loss_mask}


def _encode_checked(encode: Callable[[str], Sequence[int]], text: str, index: int) -> np.ndarray:
  ids = np.asarray(list(encode(text)))
  if ids.size == 0:
    return np.zeros(0, np.int32)
  if ids.ndim != 1 or ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() > _INT32_MAX:
    raise ValueError(f"encode() of record {index} gave {ids[:8]!r}...; expected a flat list of non-negative "
                     "int32 token ids.")
  return ids.astype(np.int32)


def _document(record: Any, index: int, encode: Callable[[str], Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [n] int32, targets [n] bool) of one record: a plain document or a (prompt, target) pair."""
  if isinstance(record, str):
    tokens = _encode_checked(encode, record, index)
    return tokens, np.ones(len(tokens), bool)  # every next token is a target (the first has no predecessor)
  if isinstance(record, (tuple, list)) and len(record) == 2 and all(isinstance(x, str) for x in record):
    # Prompt and target are encoded apart so the boundary is exact (BPE could merge across a joined string).
    prompt = _encode_checked(encode, record[0], index)
    target = _encode_checked(encode, record[1], index)
    targets = np.concatenate([np.zeros(len(prompt), bool), np.ones(len(target), bool)])
    return np.concatenate([prompt, target]), targets
  raise ValueError(f"record {index} is {type(record).__name__} {repr(record)[:60]}; expected a str or a "
                   "(prompt, target) pair of str.")


def tokenize_rows(texts_or_records: Sequence[str | tuple[str, str]], encode: Callable[[str], Sequence[int]], *,
                  seq_len: int, pad_id: int = 0) -> TokenRows:
  """Tokenizes every record and splits it into rows of at most `seq_len` tokens.

  A row is one document (or one piece of it), never two: the decoder derives its attention from positions alone,
  so a second document packed into the row would see the first. A document of n > T tokens becomes
  ceil((n - 1) / (T - 1)) rows starting every T - 1 tokens: consecutive rows share one token, so each of the
  document's n - 1 next-token targets is trained exactly once (non-overlapping rows of T would lose the target
  across each cut). Rows that train nothing (a document of one token, a piece of a long prompt) are skipped and
  counted in the log.
  """
  if seq_len < 2:
    raise ValueError(f"seq_len={seq_len} must be at least 2 (a row needs a token and the token it predicts).")
  if isinstance(texts_or_records, (str, bytes)):
    raise ValueError("texts_or_records is a single string; expected a sequence of documents or pairs.")
  stride = seq_len - 1
  row_tokens, row_targets, lengths = [], [], []
  num_records = split_documents = skipped_rows = 0
  for index, record in enumerate(texts_or_records):
    num_records += 1
    tokens, targets = _document(record, index, encode)
    starts = range(0, max(len(tokens) - 1, 1), stride)
    split_documents += len(starts) > 1
    for s in starts:
      piece_targets = targets[s:s + seq_len]
      if not piece_targets[1:].any():
        skipped_rows += 1
        continue
      row_tokens.append(tokens[s:s + seq_len])
      row_targets.append(piece_targets)
      lengths.append(len(piece_targets))
  offsets = np.zeros(len(lengths) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  logging.info("tokenize_rows: %d records -> %d rows of <= %d tokens (%d records split, %d rows without targets "
               "skipped)", num_records, len(lengths), seq_len, split_documents,
               skipped_rows)
  if skipped_rows:
    logging.warning("tokenize_rows: skipped %d row(s) with no token to train on.", skipped_rows)
  concat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)
  return TokenRows(concat(row_tokens, np.int32), concat(row_targets, bool), offsets, seq_len, pad_id)


def text_dataset(texts_or_records: Sequence[str | tuple[str, str]], encode: Callable[[str], Sequence[int]], *,
                 seq_len: int, batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = True, pad_id: int = 0, shard_index: int | None = None,
                 shard_count: int | None = None) -> grain.MapDataset:
  """Batches of tokenized documents for next-token training: {"tokens", "valid", "loss_mask"}, [B, T] each.

  Args:
    texts_or_records: documents (str; loss on every next token) and/or (prompt, target) pairs (loss only on the
      target's tokens). Tokenized once, up front (see `tokenize_rows` for how long ones are split).
    encode: str -> token ids, the caller's tokenizer (it decides about BOS / EOS).
    seq_len: T, tokens per row; rows are right-padded with `pad_id`.
    batch_size: B, rows per batch on this process.
    seed: shuffle seed (rows are shuffled, not documents); the same on every process.
    shuffle: a new order each epoch when True.
    num_epochs: passes over the rows; None (the default, for training) repeats forever.
    drop_remainder: every batch full. Each epoch then uses the largest multiple of B * shard_count rows of its
      (shuffled) order, so all processes run the same number of steps; the rows left out differ per epoch when
      shuffling. When False, shards may differ by a row and the last batch of an epoch may be short.
    pad_id: token id written at padding positions (invisible: `valid` is False there).
    shard_index, shard_count: this process's shard; both None means this JAX process.

  Returns:
    A grain.MapDataset of dicts: tokens int32 [B, T]; valid bool [B, T], True at real tokens; loss_mask bool
    [B, T], True at positions t whose next token t + 1 is a real token to train on. `len()` counts batches over
    all epochs (sys.maxsize when infinite), `steps_per_epoch()` per epoch.
  """
  _check_epochs(num_epochs)
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be at least 1.")
  shard_index, shard_count = _shard(shard_index, shard_count)
  rows = tokenize_rows(texts_or_records, encode, seq_len=seq_len, pad_id=pad_id)
  keep = None
  if drop_remainder:
    global_batch = batch_size * shard_count
    keep = len(rows) // global_batch * global_batch
    if keep == 0:
      raise ValueError(f"{len(rows)} rows make no full batch of {batch_size} rows on each of {shard_count} "
                       "shard(s); lower batch_size or pass drop_remainder=False.")
  elif len(rows) < shard_count:
    raise ValueError(f"{len(rows)} rows for {shard_count} shards; every shard needs one.")
  ds = _shuffled_shard(grain.MapDataset.source(rows), seed=seed, shuffle=shuffle, shard_index=shard_index,
                       shard_count=shard_count, keep=keep)
  return ds.batch(batch_size, drop_remainder=drop_remainder).repeat(num_epochs)
