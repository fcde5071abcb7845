"""grain pipelines: shuffling, epochs, shards, token batches (hand-computed), and resuming from iterator state."""

import collections
import json

import numpy as np
import pytest

from o1jax.data import pipeline
from o1jax.data import problems


def byte_encode(text: str) -> list[int]:
  """Toy tokenizer: one token per UTF-8 byte, so expected ids are readable (a=97, h=104, ...)."""
  return list(text.encode())


def uids(dataset) -> list[str]:
  return [record["uid"] for record in dataset]


GSM8K_40 = [f"gsm8k_test/{i}" for i in range(40)]  # the first 40 test problems' uids, by their file index


# ---------------------------------------------------------------------------------------------------------------
# Problems.


def test_problem_records_carry_the_problem():
  (record,) = list(pipeline.problem_dataset("gsm8k_test", seed=0, shuffle=False, count=1))
  (problem,) = problems.load("gsm8k_test", 0, 1)
  assert record == {"uid": problem.uid, "question": problem.question, "answer": problem.answer,
                    "solution": problem.solution}


def test_problem_shuffle_is_deterministic_per_seed():
  order = uids(pipeline.problem_dataset("gsm8k_test", seed=3, count=40))
  assert sorted(order) == sorted(GSM8K_40)  # a permutation: nothing lost, nothing repeated
  assert order != GSM8K_40
  assert uids(pipeline.problem_dataset("gsm8k_test", seed=3, count=40)) == order
  assert uids(pipeline.problem_dataset("gsm8k_test", seed=4, count=40)) != order
  assert uids(pipeline.problem_dataset("gsm8k_test", seed=3, count=40, shuffle=False)) == GSM8K_40


def test_epochs_reshuffle():
  ds = pipeline.problem_dataset("gsm8k_test", seed=0, count=40, num_epochs=3)
  assert len(ds) == 120 and pipeline.steps_per_epoch(ds) == 40
  order = uids(ds)
  epochs = [order[0:40], order[40:80], order[80:120]]
  assert all(sorted(epoch) == sorted(GSM8K_40) for epoch in epochs)
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
  # Seed 1's first epoch is not seed 0's second (grain alone would reuse seed + epoch).
  assert uids(pipeline.problem_dataset("gsm8k_test", seed=1, count=40)) != epochs[1]


def test_infinite_problems():
  ds = pipeline.problem_dataset("gsm8k_test", seed=0, count=5, num_epochs=None)
  assert pipeline.steps_per_epoch(ds) == 5 and len(ds) > 10**9
  it = pipeline.iterator(ds)
  taken = [next(it)["uid"] for _ in range(15)]
  assert all(sorted(taken[i:i + 5]) == GSM8K_40[:5] for i in (0, 5, 10))


@pytest.mark.parametrize("num_epochs", [1, 2])
def test_problem_shards_are_disjoint_and_cover(num_epochs):
  shards = [uids(pipeline.problem_dataset("gsm8k_test", seed=7, count=41, num_epochs=num_epochs, shard_index=i,
                                          shard_count=2)) for i in (0, 1)]
  first, second = shards
  assert (len(first), len(second)) == (21 * num_epochs, 20 * num_epochs)
  for epoch in range(num_epochs):
    a, b = first[21 * epoch:21 * (epoch + 1)], second[20 * epoch:20 * (epoch + 1)]
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(f"gsm8k_test/{i}" for i in range(41))


def test_default_shard_is_this_jax_process():
  # One process here, so the default shard is all of it, in the same order as an explicit (0, 1).
  assert uids(pipeline.problem_dataset("gsm8k_test", seed=2, count=9)) == uids(
      pipeline.problem_dataset("gsm8k_test", seed=2, count=9, shard_index=0, shard_count=1))


@pytest.mark.parametrize("kwargs,message", [
    ({"shard_index": 1}, "give both or neither"),
    ({"shard_index": 2, "shard_count": 2}, r"shard_index=2 must lie in \[0, shard_count\)"),
    ({"num_epochs": 0}, "num_epochs=0 must be a positive integer"),
    ({"seed": -1}, "seed=-1 must be a non-negative integer"),
])
def test_problem_dataset_rejects(kwargs, message):
  with pytest.raises(ValueError, match=message):
    pipeline.problem_dataset("gsm8k_test", **{"seed": 0, "count": 4, **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# Token batches.


def test_text_batches_by_hand():
  # seq_len 4. Bytes: a b c = 97 98 99; h e l l o = 104 101 108 108 111; h i = 104 105; y o = 121 111.
  #   "abc"        -> one row: abc + pad; targets b, c.
  #   "hello"      -> 5 tokens, rows start every 3: [h e l l] (targets e l l), [l o] (target o). Each of the 4
  #                   next-token targets appears once: the rows share the second l.
  #   ("hi", "yo") -> [h i y o]; only the target's tokens y, o are trained: positions 1 (i -> y) and 2 (y -> o).
  #   "x"          -> one token, nothing to predict: no row.
  records = ["abc", "hello", ("hi", "yo"), "x"]
  ds = pipeline.text_dataset(records, byte_encode, seq_len=4, batch_size=2, seed=0, shuffle=False, num_epochs=1,
                             drop_remainder=False, pad_id=0)
  assert len(ds) == 2
  first, second = list(ds)
  assert set(first) == {"tokens", "valid", "loss_mask"}
  assert first["tokens"].dtype == np.int32 and first["valid"].dtype == bool and first["loss_mask"].dtype == bool
  np.testing.assert_array_equal(first["tokens"], [[97, 98, 99, 0], [104, 101, 108, 108]])
  np.testing.assert_array_equal(first["valid"], [[1, 1, 1, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(first["loss_mask"], [[1, 1, 0, 0], [1, 1, 1, 0]])
  np.testing.assert_array_equal(second["tokens"], [[108, 111, 0, 0], [104, 105, 121, 111]])
  np.testing.assert_array_equal(second["valid"], [[1, 1, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(second["loss_mask"], [[1, 0, 0, 0], [0, 1, 1, 0]])


def test_long_pair_is_split_and_keeps_its_target_mask():
  # "abcdef" + "XYZ" = 97..102, 88 89 90 with seq_len 4: pieces start at 0, 3, 6. [a b c d] predicts only
  # prompt tokens (no row); [d e f X] trains f -> X; [X Y Z] trains X -> Y, Y -> Z. Pad id 7 shows in padding.
  ds = pipeline.text_dataset([("abcdef", "XYZ")], byte_encode, seq_len=4, batch_size=2, seed=0, shuffle=False,
                             num_epochs=1, pad_id=7)
  (batch,) = list(ds)
  np.testing.assert_array_equal(batch["tokens"], [[100, 101, 102, 88], [88, 89, 90, 7]])
  np.testing.assert_array_equal(batch["valid"], [[1, 1, 1, 1], [1, 1, 1, 0]])
  np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 0], [1, 1, 0, 0]])


def test_long_documents_are_split_never_dropped():
  questions = [p.question for p in problems.load("gsm8k_test", 0, 12)]
  seq_len = 32
  ds = pipeline.text_dataset(questions, byte_encode, seq_len=seq_len, batch_size=5, seed=1, num_epochs=1,
                             drop_remainder=False)
  rows = [{k: v[i] for k, v in batch.items()} for batch in ds for i in range(len(batch["tokens"]))]
  # Every question is longer than a row; a question of n bytes needs ceil((n - 1) / 31) rows.
  lengths = [len(q.encode()) for q in questions]
  assert min(lengths) > seq_len
  assert len(rows) == sum(-(-(n - 1) // (seq_len - 1)) for n in lengths)
  # The trained (token, next token) pairs are exactly the bigrams of the questions' bytes, each once.
  trained = collections.Counter()
  for row in rows:
    tokens = row["tokens"].tolist()
    trained.update((tokens[t], tokens[t + 1]) for t in np.flatnonzero(row["loss_mask"]))
    assert not (row["loss_mask"] & ~row["valid"]).any()
  expected = collections.Counter()
  for q in questions:
    data = q.encode()
    expected.update(zip(data[:-1], data[1:]))
  assert trained == expected


def test_drop_remainder_and_shards():
  # 10 one-row documents (2 bytes each: "a0".."a9"); batch 2 on each of 2 shards -> global batch 4 -> 8 rows used
  # per epoch, 2 steps per shard, the shards disjoint.
  docs = [f"a{i}" for i in range(10)]
  shards = [pipeline.text_dataset(docs, byte_encode, seq_len=4, batch_size=2, seed=5, num_epochs=1, shard_index=i,
                                  shard_count=2) for i in (0, 1)]
  assert [pipeline.steps_per_epoch(ds) for ds in shards] == [2, 2]
  seen = [[bytes(row[:2].tolist()).decode() for batch in ds for row in batch["tokens"]] for ds in shards]
  assert all(len(s) == 4 for s in seen) and not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) <= set(docs)
  # Without drop_remainder the shards cover all 10 rows and the last batch of each is short.
  kept = [pipeline.text_dataset(docs, byte_encode, seq_len=4, batch_size=2, seed=5, num_epochs=1, shard_index=i,
                                shard_count=2, drop_remainder=False) for i in (0, 1)]
  assert [[len(b["tokens"]) for b in ds] for ds in kept] == [[2, 2, 1], [2, 2, 1]]
  covered = [bytes(row[:2].tolist()).decode() for ds in kept for batch in ds for row in batch["tokens"]]
  assert sorted(covered) == docs


@pytest.mark.parametrize("records,kwargs,message", [
    (["abc"], {"seq_len": 1}, "seq_len=1 must be at least 2"),
    (["abc", 5], {}, "record 1 is int 5"),
    ([("a", "b", "c")], {}, "record 0 is tuple"),
    (["abc"], {"batch_size": 2}, "1 rows make no full batch of 2 rows on each of 1 shard"),
    ("abc", {}, "a single string"),
])
def test_text_dataset_rejects(records, kwargs, message):
  with pytest.raises(ValueError, match=message):
    pipeline.text_dataset(records, byte_encode, **{"seq_len": 4, "batch_size": 1, "seed": 0, "shard_index": 0,
                                                   "shard_count": 1, **kwargs})


def test_encode_must_give_token_ids():
  with pytest.raises(ValueError, match="encode\\(\\) of record 0 gave"):
    pipeline.text_dataset(["ab"], lambda s: [-1, 2], seq_len=4, batch_size=1, seed=0, shard_index=0, shard_count=1)


# ---------------------------------------------------------------------------------------------------------------
# Resuming.


def _text_pipeline():
  questions = [p.question for p in problems.load("gsm8k_test", 0, 6)]
  # 6 questions of 90-300 bytes in rows of 64 -> about 20 rows: 5 batches of 4 cross an epoch boundary.
  return pipeline.text_dataset(questions, byte_encode, seq_len=64, batch_size=4, seed=11, num_epochs=None,
                               shard_index=0, shard_count=1)


def test_iterator_state_resumes_text_batches():
  it = pipeline.iterator(_text_pipeline())
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(pipeline.get_state(it)))
  expected = [next(it) for _ in range(2)]
  resumed = pipeline.iterator(_text_pipeline(), state=state)
  got = [next(resumed) for _ in range(2)]
  for want, have in zip(expected, got):
    for key in ("tokens", "valid", "loss_mask"):
      np.testing.assert_array_equal(have[key], want[key])
  # And the restored position is not simply the start.
  fresh = next(pipeline.iterator(_text_pipeline()))
  assert not np.array_equal(fresh["tokens"], expected[0]["tokens"])


def test_iterator_state_resumes_across_epochs():
  build = lambda: pipeline.problem_dataset("gsm8k_test", seed=4, count=4, num_epochs=None)
  it = pipeline.iterator(build(), num_threads=0)
  before = [next(it)["uid"] for _ in range(3)]
  state = json.loads(json.dumps(pipeline.get_state(it)))
  after = [next(it)["uid"] for _ in range(4)]  # the last element of epoch 0 and three of epoch 1
  assert sorted(before + after[:1]) == GSM8K_40[:4]
  resumed = pipeline.iterator(build(), state=state, num_threads=0)
  assert [next(resumed)["uid"] for _ in range(4)] == after


def test_state_from_another_pipeline_is_rejected():
  it = pipeline.iterator(pipeline.problem_dataset("gsm8k_test", seed=0, count=4))
  with pytest.raises(ValueError, match="does not fit this pipeline"):
    pipeline.set_state(it, {"position": 3})
