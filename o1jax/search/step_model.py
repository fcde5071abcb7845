"""The one protocol between every search strategy and the model: expand (tree, path) requests, rate new nodes.

A search never calls the sampler itself. Each round it hands a `StepModel` a batch of `Request`s, one per
selected node of any tree, each asking for k new children with given ids, meta actions and hints; the model
returns k `Step`s per request (token ids, text, step statistics) and then, from `rate`, each new node's value
log p(<positive_rating>). `LMStepModel` (o1jax/search/lm.py) puts the language model behind it; tests and
outside checks use scripted fakes that answer from the node ids alone, so a tree can be scripted exactly:

  from o1jax.search import mcts, step_model

  def script(problem, path, child, meta):          # path: node ids root..parent; child: the new node's id
    if meta == 4 or len(path) == 3:                 # a <conclusion>, or depth 3: write the answer
      return step_model.ScriptedStep("So the answer is \\\\boxed{4}.", value=-0.1)
    return step_model.ScriptedStep(f"step {child} of {problem}", value=-0.5 - 0.1 * child, log_prob=-1.0 / child)

  model = step_model.ScriptedStepModel(script)
  config = mcts.MCTSConfig(num_simulations=6)
  [result] = mcts.search(model, [mcts.Problem(id="p0", question="What is 2 + 2?")], config)
  print(result.answer, result.to_text())           # the chosen answer, the whole tree in the LLaMA-O1 format

Legend: k children per request.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PathNode:
  """A node on a request's path below the root.

  Attributes:
    index, parent: local ids.
    meta: index into thoughts.META_ACTIONS.
    tokens: [n] int32 the node's step (as sampled; no <end_of_thought>).
    rating: its value when it was rated (written as its rating token in prompts).
  """

  index: int
  parent: int
  meta: int
  tokens: np.ndarray
  rating: float


@dataclasses.dataclass(frozen=True)
class Request:
  """Expand one node of one tree into k children.

  Attributes:
    tree: the tree's row in the search batch.
    problem: the problem's id (its randomness and its scripted behaviour key on it, never on `tree`).
    question: the problem text (the root's thought after <problem>).
    path: the nodes from the root's first child to the node being expanded (empty when it is the root).
    child_ids: [k] the new nodes' local ids (each child's prompt carries its own id in its header).
    metas: [k] each child's meta action (index into thoughts.META_ACTIONS).
    hints: [k] each child's hint block ("" for none).
    keys: [k, 2] uint32 PRNG key data (`jax.random.key_data`), one key per child: the sampler draws child j's
      tokens from keys[j] only.
  """

  tree: int
  problem: str
  question: str
  path: tuple[PathNode, ...]
  child_ids: tuple[int, ...]
  metas: tuple[int, ...]
  hints: tuple[str, ...]
  keys: np.ndarray | None = None

  @property
  def node(self) -> int:
    """The id of the node being expanded."""
    return self.path[-1].index if self.path else 0

  @property
  def path_ids(self) -> tuple[int, ...]:
    """Node ids from the root to the node being expanded."""
    return (0,) + tuple(p.index for p in self.path)


@dataclasses.dataclass(frozen=True)
class Step:
  """One sampled child.

  Attributes:
    tokens: [n] int32 the step's ids, without the token that stopped it.
    text: the step's text (no format tokens).
    finished: it ended with <end_of_thought> (False: out of tokens, or cut at another format token).
    log_prob: mean log-prob of its tokens under the model (LLaMA-O1's length-normalised log-prob; the prior).
    entropy, varentropy: means over its tokens.
    token_log_probs: [n + finished] float32 behaviour log-probs, under the model, of its tokens and (when
      finished) of its <end_of_thought>: the learner's old policy. None when the model records none.
    generated: tokens the model drew for it (the stopping token included).
    prompt_tokens: tokens the model encoded to prompt it (its share of the path and its own header and hint).
    rating_tokens: tokens the model encoded to rate it.
  """

  tokens: np.ndarray
  text: str
  finished: bool = True
  log_prob: float = 0.0
  entropy: float = 0.0
  varentropy: float = 0.0
  token_log_probs: np.ndarray | None = None
  generated: int = 0
  prompt_tokens: int = 0
  rating_tokens: int = 0


class StepModel(Protocol):
  """What a search needs from a model."""

  def expand(self, requests: Sequence[Request]) -> list[list[Step]]:
    """len(request.child_ids) steps for each request, in order."""

  def rate(self, requests: Sequence[Request], steps: Sequence[Sequence[Step]]) -> list[list[float]]:
    """The value log p(<positive_rating>) <= 0 of each step of the last `expand` (same requests, same order)."""


@dataclasses.dataclass(frozen=True)
class ScriptedStep:
  """What a script returns for one child: its text, its value and (optionally) its statistics."""

  text: str
  value: float = -0.5
  log_prob: float = -1.0
  entropy: float = 1.0
  varentropy: float = 1.0
  finished: bool = True


Script = Callable[[str, tuple[int, ...], int, int], ScriptedStep]


class ScriptedStepModel:
  """A `StepModel` whose every step comes from `script(problem, path_ids, child_id, meta)`.

  A step's tokens are `encode(text)` (default: its UTF-8 bytes), cut to `max_tokens` - 1, leaving the slot of its
  end. Calls are recorded in `calls` (one list
  of requests per expand) for tests that check what the search asked for.
  """

  def __init__(self, script: Script, max_tokens: int = 64, encode: Callable[[str], Sequence[int]] | None = None):
    self.script = script
    self.max_tokens = max_tokens
    self.encode = encode
    self.calls: list[list[Request]] = []
    self._values: dict[tuple[str, int], float] = {}

  def expand(self, requests: Sequence[Request]) -> list[list[Step]]:
    self.calls.append(list(requests))
    out = []
    for request in requests:
      steps = []
      for child, meta in zip(request.child_ids, request.metas):
        scripted = self.script(request.problem, request.path_ids, child, meta)
        ids = (np.frombuffer(scripted.text.encode(), np.uint8) if self.encode is None
               else self.encode(scripted.text))
        tokens = np.asarray(ids, np.int32)[:self.max_tokens - 1]
        steps.append(Step(tokens=tokens, text=scripted.text, finished=scripted.finished, log_prob=scripted.log_prob,
                          entropy=scripted.entropy, varentropy=scripted.varentropy,
                          token_log_probs=np.full(len(tokens) + int(scripted.finished), scripted.log_prob,
                                                  np.float32),
                          generated=len(tokens) + 1, prompt_tokens=0, rating_tokens=1))
        self._values[(request.problem, child)] = float(scripted.value)
      out.append(steps)
    return out

  def rate(self, requests: Sequence[Request], steps: Sequence[Sequence[Step]]) -> list[list[float]]:
    return [[self._values[(r.problem, child)] for child in r.child_ids] for r in requests]
