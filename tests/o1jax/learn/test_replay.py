"""Prioritized replay: sampling frequencies, importance weights, beta, the sum tree, the ring, round trips, errors."""

import numpy as np
import pytest

from o1jax import checkpoint
from o1jax.learn import replay

SPEC = {"tokens": ((3,), np.int32), "advantage": ((), np.float32)}


def _rows(ids):
  """Rows whose tokens are [id, id, id] and advantage -id / 10, so every row says which one it is."""
  ids = np.asarray(ids, np.int32)
  return {"tokens": np.repeat(ids[:, None], 3, axis=1), "advantage": (-ids / 10).astype(np.float32)}


def _buffer(capacity=8, **kwargs):
  return replay.PrioritizedReplayBuffer(SPEC, capacity, **{"beta_steps": 100, **kwargs})


def _probabilities(priorities, alpha, eps):
  masses = (np.asarray(priorities, np.float64) + eps) ** alpha
  return masses / masses.sum()


def _frequencies(buffer, draws, batch_size=1000):
  counts = np.zeros(buffer.capacity, np.int64)
  for _ in range(draws // batch_size):
    counts += np.bincount(buffer.sample(batch_size).indices, minlength=buffer.capacity)
  return counts / draws


def _assert_within_5_sigma(frequencies, probabilities, draws):
  # Binomial standard error of a frequency from `draws` independent draws. Stratified draws vary less than
  # independent ones (never more), so 5 sigma is a safe bound: a false alarm about once in 2 million per row.
  sigma = np.sqrt(probabilities * (1 - probabilities) / draws)
  assert np.all(np.abs(frequencies - probabilities) < 5 * sigma), (frequencies, probabilities, sigma)


def test_sampling_frequencies_follow_priority_to_the_alpha():
  # Row 0 has priority 0 and only eps mass: (0 + 0.05) ** 0.6 = 0.166 of a total 11.9, p = 0.014.
  priorities = np.array([0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 0.25, 8.0])
  buffer = _buffer(alpha=0.6, eps=0.05)
  buffer.add(_rows(range(8)), priorities)
  draws = 200_000
  frequencies = _frequencies(buffer, draws)
  expected = _probabilities(priorities, 0.6, 0.05)
  _assert_within_5_sigma(frequencies, expected, draws)
  assert frequencies[0] > 0
  # Uniform would be 1/8 each; priority-proportional (alpha 1) would give row 7 0.42: neither passes the bound.
  assert abs(expected[7] - 0.42) > 0.1 and abs(expected[7] - 1 / 8) > 0.1


def test_sampled_rows_and_probabilities_match_the_indices():
  buffer = _buffer(alpha=0.6, eps=0.05)
  priorities = np.array([0.0, 0.5, 1.0, 2.0, 3.0])
  buffer.add(_rows([10, 11, 12, 13, 14]), priorities)
  batch = buffer.sample(16)
  assert batch.indices.dtype == np.int64 and batch.indices.shape == (16,)
  assert np.all(batch.indices < 5)
  np.testing.assert_array_equal(batch.rows["tokens"][:, 0], batch.indices + 10)
  np.testing.assert_array_equal(batch.rows["advantage"], (-(batch.indices + 10) / 10).astype(np.float32))
  np.testing.assert_allclose(batch.probabilities, _probabilities(priorities, 0.6, 0.05)[batch.indices], rtol=1e-12)
  # Stratified: one draw per sixteenth of the mass, so the draws come in slot order.
  assert np.all(np.diff(batch.indices) >= 0)


def test_importance_weights_by_hand():
  # alpha 1, priorities 1 and 3: P = 1/4, 3/4; N = 2 and beta 1 give w = 1 / (2 P) = 2, 2/3, over the max 2: 1, 1/3.
  buffer = _buffer(capacity=2, alpha=1.0, beta_start=1.0, eps=1e-9)
  buffer.add(_rows([0, 1]), np.array([1.0, 3.0]))
  batch = buffer.sample(4)
  np.testing.assert_array_equal(batch.indices, [0, 1, 1, 1])
  np.testing.assert_allclose(batch.weights, [1.0, 1 / 3, 1 / 3, 1 / 3], rtol=1e-6)
  assert batch.weights.dtype == np.float32


def test_importance_weights_against_numpy():
  priorities = np.array([0.2, 1.5, 0.0, 4.0, 0.7])
  buffer = _buffer(capacity=8, alpha=0.6, beta_start=0.4, beta_steps=10, eps=0.01)
  buffer.add(_rows(range(5)), priorities)
  for _ in range(5):
    buffer.sample(3)
  batch = buffer.sample(6)
  assert batch.beta == pytest.approx(0.7)
  p = _probabilities(priorities, 0.6, 0.01)[batch.indices]
  w = (5 * p) ** -0.7  # N = 5 stored rows (N cancels in the division by the batch maximum)
  np.testing.assert_allclose(batch.weights, w / w.max(), rtol=1e-6)
  assert batch.weights.max() == 1.0


def test_beta_anneals_linearly_to_one():
  assert replay.beta_at(0, beta_start=0.4, beta_steps=100) == 0.4
  assert replay.beta_at(50, beta_start=0.4, beta_steps=100) == pytest.approx(0.7)
  assert replay.beta_at(100, beta_start=0.4, beta_steps=100) == 1.0
  assert replay.beta_at(250, beta_start=0.4, beta_steps=100) == 1.0
  assert replay.beta_at(0, beta_start=0.4, beta_steps=0) == 1.0
  buffer = _buffer(beta_start=0.4, beta_steps=4)
  buffer.add(_rows([0, 1]))
  betas = [buffer.sample(2).beta for _ in range(6)]
  np.testing.assert_allclose(betas, [0.4, 0.55, 0.7, 0.85, 1.0, 1.0])
  assert buffer.step == 6


def _check_tree(buffer):
  """The sum tree against a plain recomputation from the stored priorities."""
  state = buffer.state()
  tree, size, capacity = state["tree"], int(state["size"]), buffer.capacity
  slots = len(tree) // 2
  assert slots >= capacity and slots & (slots - 1) == 0 and slots < 2 * capacity
  leaves = np.zeros(slots)
  leaves[:size] = (state["priorities"][:size] + buffer.eps) ** buffer.alpha
  np.testing.assert_array_equal(tree[slots:], leaves)
  nodes = np.arange(1, slots)
  np.testing.assert_array_equal(tree[nodes], tree[2 * nodes] + tree[2 * nodes + 1])  # exact: recomputed, not patched
  np.testing.assert_allclose(tree[1], leaves.sum(), rtol=1e-12)
  assert tree[0] == 0


@pytest.mark.parametrize("capacity", [1, 5, 8])
def test_sum_tree_invariants_after_random_adds_updates_and_overwrites(capacity):
  rng = np.random.default_rng(capacity)
  buffer = _buffer(capacity=capacity, alpha=0.7, eps=1e-3)
  next_id = 0
  for _ in range(40):
    if len(buffer) and rng.random() < 0.5:
      count = int(rng.integers(1, 2 * capacity + 1))  # with repeats
      indices = rng.integers(0, len(buffer), count)
      priorities = rng.exponential(size=count) * (rng.random(count) < 0.8)  # some zeros
      buffer.update_priorities(indices, priorities)
    else:
      count = int(rng.integers(0, capacity + 1))
      given = rng.random() < 0.7
      buffer.add(_rows(range(next_id, next_id + count)), rng.exponential(size=count) if given else None)
      next_id += count
    _check_tree(buffer)
  assert next_id > capacity  # the ring did wrap


def test_ring_overwrites_the_oldest_rows_in_order():
  buffer = _buffer(capacity=3)
  np.testing.assert_array_equal(buffer.add(_rows([0, 1]), np.array([1.0, 2.0])), [0, 1])
  np.testing.assert_array_equal(buffer.add(_rows([2, 3]), np.array([3.0, 4.0])), [2, 0])
  np.testing.assert_array_equal(buffer.add(_rows([4]), np.array([5.0])), [1])
  state = buffer.state()
  np.testing.assert_array_equal(state["rows.tokens"][:, 0], [3, 4, 2])
  np.testing.assert_array_equal(state["priorities"], [4.0, 5.0, 3.0])
  assert (int(state["position"]), int(state["size"]), len(buffer)) == (2, 3, 3)
  np.testing.assert_array_equal(buffer.add(_rows([5, 6, 7]), np.array([6.0, 7.0, 8.0])), [2, 0, 1])
  np.testing.assert_array_equal(buffer.state()["rows.tokens"][:, 0], [6, 7, 5])


def test_new_rows_without_priorities_get_the_largest_seen():
  buffer = _buffer(capacity=6)
  buffer.add(_rows([0]))
  buffer.add(_rows([1]), np.array([0.5]))
  buffer.update_priorities(np.array([1]), np.array([7.0]))
  buffer.update_priorities(np.array([1]), np.array([2.0]))  # the maximum seen stays 7
  buffer.add(_rows([2, 3]))
  np.testing.assert_array_equal(buffer.state()["priorities"][:4], [1.0, 2.0, 7.0, 7.0])


def test_update_priorities_changes_the_sampling_distribution():
  buffer = _buffer(capacity=4, alpha=1.0, eps=1e-6)
  buffer.add(_rows(range(4)), np.ones(4))
  # A repeated index takes its last priority: row 2 ends at 9, not 0.
  buffer.update_priorities(np.array([2, 0, 2]), np.array([0.0, 0.0, 9.0]))
  np.testing.assert_array_equal(buffer.state()["priorities"], [0.0, 1.0, 9.0, 1.0])
  draws = 40_000
  frequencies = _frequencies(buffer, draws)
  expected = _probabilities([0.0, 1.0, 9.0, 1.0], 1.0, 1e-6)
  _assert_within_5_sigma(frequencies, expected, draws)
  assert frequencies[2] > 0.8 and frequencies[0] < 1e-3


def _used_buffer():
  buffer = _buffer(capacity=5, alpha=0.6, beta_steps=7, eps=0.01, seed=3)
  buffer.add(_rows(range(4)), np.array([0.3, 0.0, 2.0, 1.0]))
  buffer.add(_rows(range(4, 7)))  # wraps
  batch = buffer.sample(4)
  buffer.update_priorities(batch.indices, np.arange(4) + 0.5)
  buffer.sample(3)
  return buffer


def _assert_same_future(a, b):
  for batch_size in (1, 4, 9):
    batch_a, batch_b = a.sample(batch_size), b.sample(batch_size)
    np.testing.assert_array_equal(batch_a.indices, batch_b.indices)
    np.testing.assert_array_equal(batch_a.weights, batch_b.weights)
    assert batch_a.beta == batch_b.beta
    for name in SPEC:
      np.testing.assert_array_equal(batch_a.rows[name], batch_b.rows[name])
  rows = _rows([20, 21])
  np.testing.assert_array_equal(a.add(rows), b.add(rows))
  _assert_same_state(a.state(), b.state())


def _assert_same_state(state_a, state_b):
  assert sorted(state_a) == sorted(state_b)
  for key in state_a:
    assert state_a[key].dtype == state_b[key].dtype, key
    np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=key)


def test_state_round_trip_gives_identical_arrays_and_samples():
  buffer = _used_buffer()
  state = buffer.state()
  assert all(isinstance(value, np.ndarray) for value in state.values())
  assert sorted(state) == ["alpha", "beta_start", "beta_steps", "eps", "max_priority", "position", "priorities",
                           "rows.advantage", "rows.tokens", "seed", "size", "step", "tree"]
  restored = replay.PrioritizedReplayBuffer.from_state(state)
  _assert_same_state(restored.state(), state)
  assert restored.spec == buffer.spec and restored.beta == buffer.beta and len(restored) == len(buffer)
  loaded = _buffer(capacity=5, alpha=0.6, beta_steps=7, eps=0.01, seed=3)
  loaded.load_state(state)
  _assert_same_state(loaded.state(), state)
  _assert_same_future(buffer, restored)
  _assert_same_future(loaded, replay.PrioritizedReplayBuffer.from_state(state))  # restored has moved on


def test_state_is_a_copy():
  buffer = _used_buffer()
  state = buffer.state()
  before = {key: value.copy() for key, value in state.items()}
  buffer.add(_rows([30]), np.array([5.0]))
  buffer.sample(2)
  _assert_same_state(state, before)
  restored = replay.PrioritizedReplayBuffer.from_state(state)
  state["tree"][:] = 0
  assert restored.state()["tree"][1] > 0


def test_round_trip_through_npz_without_pickle(tmp_path):
  buffer = _used_buffer()
  path = tmp_path / "replay.npz"
  np.savez(path, **buffer.state())
  with np.load(path, allow_pickle=False) as saved:
    restored = replay.PrioritizedReplayBuffer.from_state(dict(saved))
  _assert_same_state(restored.state(), buffer.state())
  _assert_same_future(buffer, restored)


def test_round_trip_through_the_orbax_checkpoint(tmp_path):
  buffer = _used_buffer()
  with checkpoint.Checkpointer(tmp_path / "checkpoints") as checkpointer:
    checkpointer.save(1, buffer.state())
    checkpointer.wait()
    fresh = _buffer(capacity=5, alpha=0.6, beta_steps=7, eps=0.01, seed=3)
    state, _, _ = checkpointer.restore(target=fresh.state())
  fresh.load_state(state)
  _assert_same_state(fresh.state(), buffer.state())
  _assert_same_future(buffer, fresh)


def test_a_passed_generator_is_used_and_still_advances_the_step():
  buffer = _used_buffer()
  other = replay.PrioritizedReplayBuffer.from_state(buffer.state())
  batch = buffer.sample(5, np.random.default_rng(11))
  np.testing.assert_array_equal(batch.indices, other.sample(5, np.random.default_rng(11)).indices)
  assert buffer.step == other.step == 3
  seeded = replay.PrioritizedReplayBuffer.from_state({**buffer.state(), "seed": np.asarray(4, np.int64)})
  # Single draws (a large stratified batch hardly depends on its uniforms): 20 of them differ between seeds, and
  # from step to step (a Generator seeded without the step would draw the same row every time).
  draws = [[int(b.sample(1).indices[0]) for _ in range(20)] for b in (buffer, seeded)]
  assert draws[0] != draws[1]
  assert len(set(draws[0])) > 1


class _TopOfRange:
  """A stand-in Generator whose uniforms are all 1.0: the draw that float rounding can produce at the total mass."""

  def random(self, size):
    return np.ones(size)


@pytest.mark.parametrize("capacity, size", [(5, 5), (8, 3), (6, 6)])
def test_a_draw_at_the_total_mass_lands_on_a_stored_row(capacity, size):
  # The padding slots (M - R) and the unfilled slots have no mass, and a draw must never reach them.
  buffer = _buffer(capacity=capacity)
  buffer.add(_rows(range(size)), np.linspace(0.1, 1.0, size))
  batch = buffer.sample(4, _TopOfRange())
  assert np.all(batch.indices < size), batch.indices
  assert batch.indices[-1] == size - 1


@pytest.mark.parametrize("kwargs, message", [
    ({"capacity": 0}, "replay capacity must be a positive number of rows; got 0."),
    ({"alpha": -0.1}, r"replay alpha must be >= 0 \(0 samples uniformly\); got -0.1."),
    ({"beta_start": 0.0}, r"replay beta_start must be in \(0, 1\]; got 0.0."),
    ({"beta_start": 1.5}, r"replay beta_start must be in \(0, 1\]; got 1.5."),
    ({"beta_steps": -1}, "replay beta_steps must be a non-negative number of sample steps; got -1."),
    ({"eps": 0.0}, "replay eps must be a small positive number; got 0.0."),
])
def test_bad_settings(kwargs, message):
  with pytest.raises(ValueError, match=f"^{message}$"):
    _buffer(**kwargs)


def test_bad_spec():
  with pytest.raises(ValueError, match="replay spec must name at least one field"):
    replay.PrioritizedReplayBuffer({}, 4)
  with pytest.raises(ValueError, match=r"replay field 'tokens' must be given as \(shape, dtype\)"):
    replay.PrioritizedReplayBuffer({"tokens": np.int32}, 4)


def test_bad_rows():
  buffer = _buffer(capacity=4)
  rows = _rows([0, 1])
  with pytest.raises(ValueError, match=r"^replay rows must have exactly the fields \['advantage', 'tokens'\]; "
                                       r"missing \['advantage'\], extra \[\]\.$"):
    buffer.add({"tokens": rows["tokens"]})
  with pytest.raises(ValueError, match=r"missing \[\], extra \['value'\]\.$"):
    buffer.add({**rows, "value": rows["advantage"]})
  with pytest.raises(ValueError, match=r"^replay field 'tokens' must be a numpy array \[K, \*\(3,\)\] of int32; "
                                       r"got \(2, 4\) int32\.$"):
    buffer.add({**rows, "tokens": np.zeros((2, 4), np.int32)})
  with pytest.raises(ValueError, match=r"^replay field 'advantage' must be a numpy array \[K, \*\(\)\] of float32; "
                                       r"got \(2,\) float64\.$"):
    buffer.add({**rows, "advantage": rows["advantage"].astype(np.float64)})
  with pytest.raises(ValueError, match=r"got list\.$"):
    buffer.add({**rows, "advantage": [0.0, 1.0]})
  with pytest.raises(ValueError, match="^replay field 'advantage' has 2 rows; the other fields have 1.$"):
    buffer.add({**rows, "tokens": rows["tokens"][:1]})
  with pytest.raises(ValueError, match="^adding 5 rows at once exceeds the replay capacity 4"):
    buffer.add(_rows(range(5)))
  with pytest.raises(ValueError, match=r"^replay priorities must have shape \(2,\), one per row added; got \(3,\)\.$"):
    buffer.add(rows, np.ones(3))
  with pytest.raises(ValueError, match="^replay priority -0.5 at index 1 is not allowed; expected a finite "
                                       "non-negative number"):
    buffer.add(rows, np.array([0.0, -0.5]))
  assert len(buffer) == 0  # nothing was written by a refused call


def test_bad_sample():
  buffer = _buffer()
  with pytest.raises(ValueError, match="^cannot sample from an empty replay buffer; add rows first.$"):
    buffer.sample(2)
  buffer.add(_rows([0, 1]))
  for batch_size in (0, -3):
    with pytest.raises(ValueError, match=f"^replay batch size must be a positive integer; got {batch_size}.$"):
      buffer.sample(batch_size)
  assert buffer.step == 0


def test_bad_priority_updates():
  buffer = _buffer(capacity=8)
  buffer.add(_rows(range(4)))
  before = buffer.state()
  with pytest.raises(ValueError, match=r"^replay priority nan at index 2 \(row 3\) is not allowed"):
    buffer.update_priorities(np.array([0, 1, 3, 2]), np.array([1.0, 2.0, np.nan, -1.0]))
  with pytest.raises(ValueError, match=r"^replay priority -1.0 at index 1 \(row 0\) is not allowed"):
    buffer.update_priorities(np.array([2, 0]), np.array([1.0, -1.0]))
  with pytest.raises(ValueError, match=r"^replay priority inf at index 0 \(row 1\)"):
    buffer.update_priorities(np.array([1]), np.array([np.inf]))
  with pytest.raises(ValueError, match="^replay index 4 at position 1 is not a stored row; expected 0 <= index < 4.$"):
    buffer.update_priorities(np.array([0, 4]), np.array([1.0, 1.0]))
  with pytest.raises(ValueError, match=r"^replay priorities must have shape \(2,\), one per index; got \(1,\)\.$"):
    buffer.update_priorities(np.array([0, 1]), np.array([1.0]))
  with pytest.raises(ValueError, match="^replay indices must be a 1-d integer array"):
    buffer.update_priorities(np.array([0.0, 1.0]), np.array([1.0, 1.0]))
  _assert_same_state(buffer.state(), before)


def test_bad_states():
  buffer = _used_buffer()
  state = buffer.state()
  without_tree = {key: value for key, value in state.items() if key != "tree"}
  with pytest.raises(ValueError, match=r"missing \['tree'\], unexpected \[\]\.$"):
    replay.PrioritizedReplayBuffer.from_state(without_tree)
  with pytest.raises(ValueError, match=r"missing \[\], unexpected \['extra'\]\.$"):
    replay.PrioritizedReplayBuffer.from_state({**state, "extra": np.zeros(1)})
  only_settings = {key: value for key, value in state.items() if not key.startswith("rows.")}
  with pytest.raises(ValueError, match=r"missing \['rows.<name>'\]"):
    replay.PrioritizedReplayBuffer.from_state(only_settings)
  with pytest.raises(ValueError, match=r"^replay state 'tree' must be \(16,\) float64; got \(16,\) float32\.$"):
    replay.PrioritizedReplayBuffer.from_state({**state, "tree": state["tree"].astype(np.float32)})
  with pytest.raises(ValueError, match=r"^replay state 'step' must be \(\) int64; got \(1,\) int64\.$"):
    replay.PrioritizedReplayBuffer.from_state({**state, "step": np.array([2])})
  with pytest.raises(ValueError, match=r"^replay state 'rows.tokens' must have 5 rows, as the priorities do; "
                                       r"got shape \(4, 3\)\.$"):
    replay.PrioritizedReplayBuffer.from_state({**state, "rows.tokens": state["rows.tokens"][:4]})
  with pytest.raises(ValueError, match="^replay state has position 5, size 5 and step 2; expected 0 <= position < 5"):
    replay.PrioritizedReplayBuffer.from_state({**state, "position": np.asarray(5, np.int64)})
  with pytest.raises(ValueError, match="^replay alpha must be >= 0"):
    replay.PrioritizedReplayBuffer.from_state({**state, "alpha": np.asarray(-1.0)})
  other_capacity = _buffer(capacity=6, alpha=0.6, beta_steps=7, eps=0.01, seed=3)
  with pytest.raises(ValueError, match=r"^replay state has fields \{advantage: \(\) float32, tokens: \(3,\) int32\} "
                                       r"and capacity 5; this buffer has .* and capacity 6\.$"):
    other_capacity.load_state(state)
  other_alpha = _buffer(capacity=5, alpha=0.5, beta_steps=7, eps=0.01, seed=3)
  with pytest.raises(ValueError, match="^replay state has alpha 0.6; this buffer was built with 0.5.$"):
    other_alpha.load_state(state)
  assert len(other_alpha) == 0
