"""Prioritized experience replay over fixed-shape numpy rows, with a sum tree for O(log R) sampling and updates.

Legend: R capacity (rows), M leaf slots of the sum tree (R rounded up to a power of two), B sampled batch,
K rows in one `add` or `update_priorities` call.

The buffer holds one row per experience (for the learner: one non-root search node) as a dict of named fields,
each a numpy array [R, ...] whose per-row shape and dtype are fixed at construction:

  buffer = PrioritizedReplayBuffer({"tokens": ((64,), np.int32), "advantage": ((), np.float32)}, capacity=4096,
                                   beta_steps=10_000)
  buffer.add(rows, priorities=np.abs(rows["advantage"]))       # rows: {name: [K, ...]}
  batch = buffer.sample(32)                                     # batch.rows, batch.indices [B], batch.weights [B]
  ...
  buffer.update_priorities(batch.indices, np.abs(per_row_loss))

The semantics are those of the PER paper (Schaul et al. 2016) and of LLaMA-O1's `PrioritizedReplayBuffer`
(`online_train.py`, branch `deprecated`):

- A row of priority p_i has sampling mass (p_i + eps) ** alpha and probability P(i) = mass_i / sum_k mass_k. eps
  is added before the power so that a row of priority 0 is still drawn, rarely; alpha = 0 samples uniformly.
- A new row gets the priority the caller passes (|advantage|). When the caller passes none, it gets the largest
  priority the buffer has seen so far (1.0 before any), as the PER paper does, so that a fresh row is drawn soon.
- When the buffer is full a new row overwrites the oldest one (a ring over the R slots).
- The importance-sampling weights are w_i = (N * P(i)) ** -beta, N the number of rows stored, divided by the
  largest w_j of the same batch (LLaMA-O1 and the PER paper normalise by the batch maximum, not the buffer's: the
  buffer-wide maximum would need the smallest P over all rows, and only scales the loss anyway). N cancels in
  that division; it stays in the formula so that the weights read as the paper's.
- beta grows linearly from beta_start to 1.0 over `beta_steps` calls of `sample` (`beta_at`), a function of the
  buffer's sample step so that a restored buffer continues the schedule where it stopped.

Sampling is stratified: the total mass is cut into B equal segments and one uniform draw falls in each, so a batch
repeats a heavy row fewer times than B independent draws would; each draw still picks row i with probability P(i).
The uniforms come from a numpy Generator the caller passes, or else from one derived from the buffer's seed and its
sample step, so that the same state gives the same batches whether or not it was saved and restored in between.

Unlike LLaMA-O1's buffer this one never pickles: `state()` is a flat dict of numpy arrays (the rows, the
priorities, the sum tree, the ring position, the size, the sample step and the settings), which the orbax
checkpoint (o1jax.checkpoint) or `np.savez` writes as plain arrays; `from_state` and `load_state` check every shape
and dtype and rebuild the buffer bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

# {field name: (per-row shape, dtype)}, e.g. {"tokens": ((64,), np.int32), "advantage": ((), np.float32)}.
Spec = Mapping[str, tuple[tuple[int, ...], np.dtype | type | str]]

ROWS_PREFIX = "rows."  # state() key of a field: "rows.<name>" (flat keys, so np.savez takes the dict as is)

# The state's arrays besides the rows: name -> dtype. All are 0-d except priorities [R] and tree [2M].
_STATE_DTYPES = {
    "priorities": np.float64, "tree": np.float64, "position": np.int64, "size": np.int64, "step": np.int64,
    "max_priority": np.float64, "seed": np.int64, "alpha": np.float64, "eps": np.float64,
    "beta_start": np.float64, "beta_steps": np.int64,
}
_SETTINGS = ("alpha", "eps", "beta_start", "beta_steps", "seed")


def beta_at(step: int, *, beta_start: float, beta_steps: int) -> float:
  """The importance-sampling exponent for sample step `step`: beta_start at step 0, rising linearly to 1.0 at
  `beta_steps`, and 1.0 from then on (also for beta_steps = 0)."""
  if beta_steps <= 0 or step >= beta_steps:
    return 1.0
  return beta_start + (1.0 - beta_start) * step / beta_steps


def _describe(spec: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> str:
  """{name: (shape, dtype)} -> "{advantage: () float32, tokens: (64,) int32}" for error messages."""
  return "{" + ", ".join(f"{name}: {shape} {dtype}" for name, (shape, dtype) in sorted(spec.items())) + "}"


def _leaf_slots(capacity: int) -> int:
  """M: the capacity rounded up to a power of two (1 for capacity 1)."""
  return 1 << (capacity - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class ReplaySample:
  """One sampled batch.

  Attributes:
    rows: {name: [B, ...]}, copies of the sampled rows.
    indices: [B] int64, the rows' slots in the buffer (pass them back to `update_priorities`).
    weights: [B] float32, importance-sampling weights, the batch's largest equal to 1.
    probabilities: [B] float64, P(i) of each sampled row.
    beta: the exponent the weights were computed with.
  """

  rows: dict[str, np.ndarray]
  indices: np.ndarray
  weights: np.ndarray
  probabilities: np.ndarray
  beta: float


class PrioritizedReplayBuffer:
  """A ring of R rows with priorities, sampled in proportion to priority ** alpha through a sum tree.

  The sum tree is one float64 array [2M]: node 1 is the root, node n has children 2n and 2n + 1, and leaf
  M + i holds row i's mass (0 for slots not yet filled and for the M - R padding slots; node 0 is unused).
  Every internal node is recomputed as the float sum of its two children after each change, never adjusted by a
  difference, so rounding errors do not accumulate over millions of updates and the tree equals one rebuilt from
  its leaves, bit for bit.

  Args:
    spec: {name: (per-row shape, dtype)} of the fields every row has.
    capacity: R, the number of rows kept; the oldest is overwritten first.
    alpha: how strongly priorities skew sampling: mass = (priority + eps) ** alpha.
    beta_start: the importance-sampling exponent at sample step 0, in (0, 1].
    beta_steps: the number of `sample` calls over which beta rises linearly to 1.0.
    eps: added to every priority, so that a zero priority still has mass; positive.
    seed: with the sample step, seeds the Generator of a `sample` call that is given none.
  """

  def __init__(self, spec: Spec, capacity: int, *, alpha: float = 0.6, beta_start: float = 0.4,
               beta_steps: int = 10_000, eps: float = 1e-6, seed: int = 0):
    if not isinstance(capacity, (int, np.integer)) or capacity < 1:
      raise ValueError(f"replay capacity must be a positive number of rows; got {capacity!r}.")
    if not alpha >= 0:  # also refuses NaN
      raise ValueError(f"replay alpha must be >= 0 (0 samples uniformly); got {alpha!r}.")
    if not 0 < beta_start <= 1:
      raise ValueError(f"replay beta_start must be in (0, 1]; got {beta_start!r}.")
    if not isinstance(beta_steps, (int, np.integer)) or beta_steps < 0:
      raise ValueError(f"replay beta_steps must be a non-negative number of sample steps; got {beta_steps!r}.")
    if not (eps > 0 and np.isfinite(eps)):
      raise ValueError(f"replay eps must be a small positive number; got {eps!r}.")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"replay seed must be a non-negative integer; got {seed!r}.")
    if not spec:
      raise ValueError("replay spec must name at least one field; got none.")
    self.spec = {}
    for name, field in spec.items():
      if not isinstance(name, str) or not name:
        raise ValueError(f"replay field names must be non-empty strings; got {name!r}.")
      try:
        shape, dtype = field
        shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
      except (TypeError, ValueError):
        raise ValueError(f"replay field {name!r} must be given as (shape, dtype); got {field!r}.") from None
      if any(d < 0 for d in shape) or dtype.hasobject:
        raise ValueError(f"replay field {name!r} must have a non-negative shape and a numeric dtype; got "
                         f"{shape} {dtype}.")
      self.spec[name] = (shape, dtype)
    self.capacity = int(capacity)
    self.alpha = float(alpha)
    self.beta_start = float(beta_start)
    self.beta_steps = int(beta_steps)
    self.eps = float(eps)
    self.seed = int(seed)
    self._slots = _leaf_slots(self.capacity)
    self._rows = {name: np.zeros((self.capacity, *shape), dtype) for name, (shape, dtype) in self.spec.items()}
    self._priorities = np.zeros(self.capacity, np.float64)
    self._tree = np.zeros(2 * self._slots, np.float64)
    self._position = 0  # the slot the next row is written to
    self._size = 0
    self._step = 0  # sample calls so far
    self._max_priority = 1.0

  def __len__(self) -> int:
    return self._size

  @property
  def step(self) -> int:
    """The number of `sample` calls so far (the beta schedule's step)."""
    return self._step

  @property
  def beta(self) -> float:
    """The exponent the next `sample` call uses."""
    return beta_at(self._step, beta_start=self.beta_start, beta_steps=self.beta_steps)

  def add(self, rows: Mapping[str, np.ndarray], priorities: np.ndarray | None = None) -> np.ndarray:
    """Writes K rows into the next slots of the ring, overwriting the oldest rows once the buffer is full.

    Args:
      rows: {name: [K, *shape]} with exactly the spec's fields, shapes and dtypes (no casting: a float64
        advantage for a float32 field is refused, not rounded).
      priorities: [K] finite, non-negative (|advantage|); None gives every new row the largest priority seen so
        far (1.0 before any).

    Returns:
      [K] int64, the slots written, in order.
    """
    if set(rows) != set(self.spec):
      missing, extra = sorted(set(self.spec) - set(rows)), sorted(set(rows) - set(self.spec))
      raise ValueError(f"replay rows must have exactly the fields {sorted(self.spec)}; missing {missing}, "
                       f"extra {extra}.")
    num_rows = None
    for name, (shape, dtype) in self.spec.items():
      value = rows[name]
      if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape[1:] != shape or value.ndim < 1:
        got = f"{value.shape} {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
        raise ValueError(f"replay field {name!r} must be a numpy array [K, *{shape}] of {dtype}; got {got}.")
      if num_rows is None:
        num_rows = value.shape[0]
      elif value.shape[0] != num_rows:
        raise ValueError(f"replay field {name!r} has {value.shape[0]} rows; the other fields have {num_rows}.")
    if num_rows > self.capacity:
      raise ValueError(f"adding {num_rows} rows at once exceeds the replay capacity {self.capacity}; add at most "
                       "capacity rows per call.")
    if priorities is None:
      priorities = np.full(num_rows, self._max_priority)
    else:
      priorities = self._check_priorities(priorities, num_rows, "row added")
    slots = (self._position + np.arange(num_rows, dtype=np.int64)) % self.capacity
    for name, value in rows.items():
      self._rows[name][slots] = value
    self._set_priorities(slots, priorities)
    self._position = int((self._position + num_rows) % self.capacity)
    self._size = min(self._size + num_rows, self.capacity)
    return slots

  def sample(self, batch_size: int, rng: np.random.Generator | None = None) -> ReplaySample:
    """Draws B rows, row i with probability P(i), one draw per equal segment of the total mass.

    Advances the sample step (and with it beta) by one, whether or not `rng` is given.

    Args:
      batch_size: B >= 1; rows are drawn with replacement, so B may exceed the number of rows.
      rng: the Generator for the B uniforms; default one seeded by (seed, sample step), reproducible on resume.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(f"replay batch size must be a positive integer; got {batch_size!r}.")
    if self._size == 0:
      raise ValueError("cannot sample from an empty replay buffer; add rows first.")
    if rng is None:
      rng = np.random.default_rng((self.seed, self._step))
    beta = self.beta
    total = self._tree[1]
    masses = (np.arange(batch_size) + rng.random(batch_size)) * (total / batch_size)
    indices = self._find(masses)
    probabilities = self._tree[self._slots + indices] / total
    weights = (self._size * probabilities) ** -beta
    weights = (weights / weights.max()).astype(np.float32)
    self._step += 1
    return ReplaySample(rows={name: value[indices] for name, value in self._rows.items()}, indices=indices,
                        weights=weights, probabilities=probabilities, beta=beta)

  def update_priorities(self, indices: np.ndarray, priorities: np.ndarray) -> None:
    """Sets new priorities (|per-row loss|) for rows given by slot; a repeated slot takes its last priority.

    A slot whose row was overwritten since it was sampled gets the priority too: the caller decides whether
    batches may be that stale.

    Args:
      indices: [K] integer slots of stored rows (`ReplaySample.indices`).
      priorities: [K] finite, non-negative.
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
      raise ValueError(f"replay indices must be a 1-d integer array; got shape {indices.shape} of {indices.dtype}.")
    outside = np.flatnonzero((indices < 0) | (indices >= self._size))
    if outside.size:
      first = outside[0]
      raise ValueError(f"replay index {int(indices[first])} at position {first} is not a stored row; expected "
                       f"0 <= index < {self._size}.")
    priorities = self._check_priorities(priorities, indices.size, "index", indices)
    # numpy leaves the winner of a repeated index in a fancy assignment unspecified; keep the last on purpose.
    unique, last_from_end = np.unique(indices[::-1], return_index=True)
    self._set_priorities(unique.astype(np.int64), priorities[::-1][last_from_end])

  @staticmethod
  def _check_priorities(priorities: np.ndarray, count: int, what: str,
                        indices: np.ndarray | None = None) -> np.ndarray:
    """[K] priorities as float64, or a ValueError naming the first NaN, infinite or negative one."""
    priorities = np.asarray(priorities, np.float64)
    if priorities.shape != (count,):
      raise ValueError(f"replay priorities must have shape ({count},), one per {what}; got {priorities.shape}.")
    bad = np.flatnonzero(~(np.isfinite(priorities) & (priorities >= 0)))
    if bad.size:
      first = int(bad[0])
      row = "" if indices is None else f" (row {int(indices[first])})"
      raise ValueError(f"replay priority {priorities[first]} at index {first}{row} is not allowed; expected a "
                       "finite non-negative number such as |advantage| or |loss|.")
    return priorities

  def _set_priorities(self, slots: np.ndarray, priorities: np.ndarray) -> None:
    """Writes priorities of distinct slots and recomputes their ancestors, one tree level at a time."""
    self._priorities[slots] = priorities
    if priorities.size:
      self._max_priority = max(self._max_priority, float(priorities.max()))
    nodes = slots + self._slots
    self._tree[nodes] = (priorities + self.eps) ** self.alpha
    for _ in range(self._slots.bit_length() - 1):
      nodes = np.unique(nodes >> 1)
      self._tree[nodes] = self._tree[2 * nodes] + self._tree[2 * nodes + 1]

  def _find(self, masses: np.ndarray) -> np.ndarray:
    """[B] cumulative masses in [0, total) -> [B] slots: the leaf whose mass interval holds each.

    A descent goes right only when the right child has mass: a draw that rounding puts at or past the total still
    ends on a stored row, never on an empty or padding slot.
    """
    nodes = np.ones(masses.shape, np.int64)
    for _ in range(self._slots.bit_length() - 1):
      left = 2 * nodes
      left_mass = self._tree[left]
      right = (masses >= left_mass) & (self._tree[left + 1] > 0)
      masses = np.where(right, masses - left_mass, masses)
      nodes = np.where(right, left + 1, left)
    return nodes - self._slots

  def state(self) -> dict[str, np.ndarray]:
    """Everything the buffer holds as a flat dict of numpy arrays (copies): "rows.<name>" [R, ...], "priorities"
    [R] and "tree" [2M] float64, and 0-d arrays "position", "size", "step", "max_priority" and the settings
    "alpha", "eps", "beta_start", "beta_steps", "seed"."""
    state = {ROWS_PREFIX + name: value.copy() for name, value in self._rows.items()}
    scalars = {"position": self._position, "size": self._size, "step": self._step,
               "max_priority": self._max_priority, "alpha": self.alpha, "eps": self.eps,
               "beta_start": self.beta_start, "beta_steps": self.beta_steps, "seed": self.seed}
    state.update({"priorities": self._priorities.copy(), "tree": self._tree.copy()})
    state.update({name: np.asarray(value, _STATE_DTYPES[name]) for name, value in scalars.items()})
    return state

  @classmethod
  def from_state(cls, state: Mapping[str, np.ndarray]) -> PrioritizedReplayBuffer:
    """A buffer equal to the one whose `state()` this is (its spec and capacity read from the arrays' shapes)."""
    field_names = sorted(key[len(ROWS_PREFIX):] for key in state if key.startswith(ROWS_PREFIX))
    missing = sorted(set(_STATE_DTYPES) - set(state)) + ([] if field_names else [ROWS_PREFIX + "<name>"])
    extra = sorted(set(state) - set(_STATE_DTYPES) - {ROWS_PREFIX + name for name in field_names})
    if missing or extra:
      raise ValueError(f"replay state must hold {sorted(_STATE_DTYPES)} and at least one {ROWS_PREFIX}<name> "
                       f"array; missing {missing}, unexpected {extra}.")
    arrays = {key: np.asarray(value) for key, value in state.items()}
    capacity = arrays["priorities"].shape[0] if arrays["priorities"].ndim == 1 else 0
    shapes = {name: () for name in _STATE_DTYPES}
    shapes.update(priorities=(capacity,), tree=(2 * _leaf_slots(max(capacity, 1)),))
    for name, dtype in _STATE_DTYPES.items():
      if arrays[name].shape != shapes[name] or arrays[name].dtype != dtype:
        raise ValueError(f"replay state {name!r} must be {shapes[name]} {np.dtype(dtype)}; got "
                         f"{arrays[name].shape} {arrays[name].dtype}.")
    spec = {}
    for name in field_names:
      value = arrays[ROWS_PREFIX + name]
      if value.ndim < 1 or value.shape[0] != capacity:
        raise ValueError(f"replay state {ROWS_PREFIX + name!r} must have {capacity} rows, as the priorities do; "
                         f"got shape {value.shape}.")
      spec[name] = (value.shape[1:], value.dtype)
    buffer = cls(spec, capacity, **{name: arrays[name].item() for name in _SETTINGS})
    position, size, step = (int(arrays[name]) for name in ("position", "size", "step"))
    if not (0 <= size <= capacity and 0 <= position < capacity and step >= 0):
      raise ValueError(f"replay state has position {position}, size {size} and step {step}; expected 0 <= position "
                       f"< {capacity}, 0 <= size <= {capacity} and step >= 0.")
    buffer._rows = {name: arrays[ROWS_PREFIX + name].copy() for name in field_names}
    buffer._priorities = arrays["priorities"].copy()
    buffer._tree = arrays["tree"].copy()
    buffer._position, buffer._size, buffer._step = position, size, step
    buffer._max_priority = float(arrays["max_priority"])
    return buffer

  def load_state(self, state: Mapping[str, np.ndarray]) -> None:
    """Replaces this buffer's contents with `state`, which must have this buffer's fields, capacity and settings
    (restoring into a differently built buffer would silently change the sampling; use `from_state` for that)."""
    restored = self.from_state(state)
    if restored.spec != self.spec or restored.capacity != self.capacity:
      raise ValueError(f"replay state has fields {_describe(restored.spec)} and capacity {restored.capacity}; this "
                       f"buffer has {_describe(self.spec)} and capacity {self.capacity}.")
    for name in _SETTINGS:
      if getattr(restored, name) != getattr(self, name):
        raise ValueError(f"replay state has {name} {getattr(restored, name)!r}; this buffer was built with "
                         f"{getattr(self, name)!r}.")
    self.__dict__.update(restored.__dict__)
