"""OpenLongCoT-style format corpus: reasoning trees built from GSM8K / MATH reference solutions.

Each problem becomes one tree in the LLaMA-O1 format (o1jax/thoughts.py), like the OpenLongCoT-Pretrain
records the base model was trained on:

  0  <problem>{question}                      (no rating, as in the Felix example)
  1  step 1                                   <positive_rating>
  2  step 1 with a wrong equation (sibling)   <negative_rating>
  3    <critic> names the wrong equation and the right value    <unknown_rating>
  4      <refine> the correct step            <positive_rating>
  5  step 2 (child of 1)                      <positive_rating>
  ...
  k  <conclusion> ... \\boxed{answer}          <positive_rating>   (and maybe a wrong-answer sibling, negative)

Node ids follow writing order, parents always first. A wrong step changes one number or operator of an
equation so that it no longer holds, in the GSM8K `<<a*b=c>>` annotation and the visible text alike (see
o1jax/data/corruption.py).

From a tree come three kinds of examples: its text (`tree_text`), (policy prompt, thought + rating) pairs in
the exact prompt layout the search uses (`policy_examples`), and matched (rating prompt, is correct) pairs of a
real step and a corrupted one at the same position (`rating_examples`, for the rating ROC AUC).
`sample_policy_prompt` gives one evaluation prompt (root + a prefix of the reference steps, no hint).

Everything is a pure function of the problem and a `numpy.random.Generator`.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from o1jax import thoughts
from o1jax.data.corruption import Corruption, corrupt, equation_texts, perturbed_numbers
from o1jax.data.corruption import corrupt_step  # noqa: F401  (re-exported: callers use corpus.corrupt_step)
from o1jax.data.problems import Problem

# ------------------------------------------------------------------------------------------------ step split

_ABBREVIATIONS = ("e.g.", "i.e.", "vs.", "etc.", "Mr.", "Mrs.", "Dr.", "St.", "cf.")


def _is_gsm8k(problem: Problem) -> bool:
  return problem.uid.startswith("gsm8k") or bool(re.search(r"<<[^<>]*=[^<>]*>>|^####", problem.solution, re.M))


def _closing(text: str, start: int, token: str) -> int:
  """Position just after the first `token` at or after `start` (len(text) when there is none)."""
  at = text.find(token, start)
  return len(text) if at < 0 else at + len(token)


def _math_boundaries(text: str) -> list[int]:
  """Positions where a MATH solution may be cut: sentence ends, blank lines and ends of display math.

  Never inside $...$, \\(...\\), \\[...\\], $$...$$, an environment, an [asy] block or braces.
  """
  cuts, depth, i, n = [], 0, 0, len(text)
  while i < n:
    char = text[i]
    display_end = None
    if char == "\\" and text.startswith("\\$", i):
      i += 2
      continue
    if text.startswith("[asy]", i):
      display_end = _closing(text, i + 5, "[/asy]")
    elif text.startswith("$$", i):
      display_end = _closing(text, i + 2, "$$")
    elif text.startswith("\\[", i):
      display_end = _closing(text, i + 2, "\\]")
    elif text.startswith("\\begin{", i):
      name_end = text.find("}", i)
      name = text[i + 7:name_end] if name_end > 0 else ""
      display_end = _closing(text, i, f"\\end{{{name}}}")
    elif char == "$" or text.startswith("\\(", i):
      if char == "$":
        j = i + 1
        while j < n and not (text[j] == "$" and text[j - 1] != "\\"):
          j += 1
        end, content = min(j + 1, n), text[i + 1:j]
      else:
        end = _closing(text, i + 2, "\\)")
        content = text[i + 2:end - 2]
      if depth == 0 and content.rstrip().endswith((".", "?", "!")) and (end >= n or text[end].isspace()):
        cuts.append(end)
      i = end
      continue
    if display_end is not None:
      content = text[i:display_end]
      if depth == 0 and (display_end >= n or text[display_end] == "\n" or
                         re.search(r"[.?!]\s*(\\\]|\$\$|\\end\{[^}]*\})\Z", content)):
        cuts.append(display_end)
      i = display_end
      continue
    if char == "{":
      depth += 1
    elif char == "}":
      depth = max(depth - 1, 0)
    elif depth == 0 and char in ".?!" and (i + 1 >= n or text[i + 1].isspace()):
      if not text[:i + 1].endswith(_ABBREVIATIONS):
        cuts.append(i + 1)
    elif depth == 0 and text.startswith("\n\n", i):
      cuts.append(i)
    i += 1
  return cuts


def split_steps(problem: Problem, max_steps: int = 8, min_chars: int = 16) -> list[str]:
  """The reference solution as reasoning steps.

  GSM8K: one step per solution line, the `####` line dropped, `<<...>>` annotations kept. MATH: sentence-ish
  pieces (see `_math_boundaries`); pieces shorter than `min_chars` join the next one, then the shortest
  adjacent pair is merged until at most `max_steps` remain. Steps are stripped of surrounding whitespace.
  """
  if max_steps < 1:
    raise ValueError(f"max_steps={max_steps}; expected at least 1.")
  solution = problem.solution
  if _is_gsm8k(problem):
    lines = [line.strip() for line in solution.split("\n")]
    return [line for line in lines if line and not line.startswith("####")]
  edges = [0] + _math_boundaries(solution) + [len(solution)]
  spans = [(a, b) for a, b in zip(edges, edges[1:]) if solution[a:b].strip()]
  merged: list[tuple[int, int]] = []
  for span in spans:  # a too-short piece ("Therefore,") opens the next one
    if merged and len(solution[merged[-1][0]:merged[-1][1]].strip()) < min_chars:
      merged[-1] = (merged[-1][0], span[1])
    else:
      merged.append(span)
  while len(merged) > max_steps:
    sizes = [merged[k + 1][1] - merged[k][0] for k in range(len(merged) - 1)]
    k = int(np.argmin(sizes))
    merged[k:k + 2] = [(merged[k][0], merged[k + 1][1])]
  return [solution[a:b].strip() for a, b in merged]


# ---------------------------------------------------------------------------------------------------- trees

_CRITIQUES = (" The equation {wrong} in this step is incorrect: it should be {right}.",
              " Checking the calculation, {wrong} does not hold; the correct calculation is {right}. This step is "
              "wrong.")
_NUMBER_CRITIQUE = " The value {wrong} in this step is incorrect; it should be {right}."
_CONFIRMATION = " Checking the calculation {right}: this calculation is correct."
_CONCLUSIONS = (" So the final answer is \\boxed{{{answer}}}", " Therefore, the answer is \\boxed{{{answer}}}")


def _rng(rng: np.random.Generator | int) -> np.random.Generator:
  if isinstance(rng, np.random.Generator):
    return rng
  if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
    return np.random.default_rng(int(rng))
  raise TypeError(f"rng {rng!r}; expected a numpy.random.Generator or an integer seed.")


def _wrong_answer(answer: str, rng: np.random.Generator) -> str | None:
  """A different plain-number answer, or None when the answer is not a plain number."""
  plain = answer.replace(",", "")
  if not re.fullmatch(r"-?\d+(?:\.\d+)?", plain):
    return None
  if plain.startswith("-"):
    return "-" + perturbed_numbers(plain[1:], rng)[0]
  return perturbed_numbers(plain, rng)[0]


def build_tree(problem: Problem, rng: np.random.Generator | int, *, negatives: float = 0.5,
               critics: float = 0.6, refines: float = 0.6, confirmations: float = 0.2,
               wrong_conclusions: float = 0.5, max_steps: int = 8) -> list[thoughts.Node]:
  """One OpenLongCoT-style tree for a problem (see the module docstring for its shape).

  Args:
    problem: the problem; its reference solution gives the steps.
    rng: the only source of randomness (an integer is taken as a seed).
    negatives: probability that a step gets a corrupted sibling (`<negative_rating>`).
    critics: probability that a corrupted sibling gets a `<critic>` child (`<unknown_rating>`).
    refines: probability that a corrupted sibling's branch ends in a `<refine>` node with the correct step.
    confirmations: probability that a correct step with a checkable equation gets a confirming `<critic>`.
    wrong_conclusions: probability of a wrong-answer `<conclusion>` sibling (plain-number answers only).
    max_steps: most steps for a MATH solution.

  Returns:
    Nodes in writing order: ids 0, 1, 2, ... and every parent before its children.
  """
  for name, p in (("negatives", negatives), ("critics", critics), ("refines", refines),
                  ("confirmations", confirmations), ("wrong_conclusions", wrong_conclusions)):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"{name}={p}; expected a probability in [0, 1].")
  rng = _rng(rng)
  nodes = [thoughts.Node(parent=-1, index=0, meta="<problem>", text=problem.question, rating=None)]

  def add(parent: int, meta: str, text: str, rating: str) -> int:
    nodes.append(thoughts.Node(parent=parent, index=len(nodes), meta=meta, text=text, rating=rating))
    return len(nodes) - 1

  parent = 0
  for step in split_steps(problem, max_steps=max_steps):
    corruption = corrupt(step, rng) if rng.random() < negatives else None
    wrong_first = rng.random() < 0.5
    if corruption and wrong_first:
      _add_wrong_branch(add, parent, step, corruption, rng, critics, refines)
    real = add(parent, "", step, thoughts.POSITIVE_RATING)
    if corruption and not wrong_first:
      _add_wrong_branch(add, parent, step, corruption, rng, critics, refines)
    equations = equation_texts(step)
    if equations and rng.random() < confirmations:
      right = equations[rng.integers(len(equations))]
      add(real, "<critic>", _CONFIRMATION.format(right=right), thoughts.UNKNOWN_RATING)
    parent = real
  template = _CONCLUSIONS[rng.integers(len(_CONCLUSIONS))]
  wrong = _wrong_answer(problem.answer, rng) if rng.random() < wrong_conclusions else None
  if wrong is not None and rng.random() < 0.5:
    add(parent, "<conclusion>", template.format(answer=wrong), thoughts.NEGATIVE_RATING)
    wrong = None
  add(parent, "<conclusion>", template.format(answer=problem.answer), thoughts.POSITIVE_RATING)
  if wrong is not None:
    add(parent, "<conclusion>", template.format(answer=wrong), thoughts.NEGATIVE_RATING)
  return nodes


def _add_wrong_branch(add, parent: int, step: str, corruption: Corruption, rng: np.random.Generator,
                      critics: float, refines: float):
  """A corrupted sibling, maybe its critic, maybe a refine (child of the critic, else of the sibling)."""
  wrong = add(parent, "", corruption.text, thoughts.NEGATIVE_RATING)
  tip = wrong
  if rng.random() < critics:
    numbers_only = not re.search(r"[=]", corruption.wrong)
    template = _NUMBER_CRITIQUE if numbers_only else _CRITIQUES[rng.integers(len(_CRITIQUES))]
    tip = add(wrong, "<critic>", template.format(wrong=corruption.wrong, right=corruption.right),
              thoughts.UNKNOWN_RATING)
  if rng.random() < refines:
    add(tip, "<refine>", " " + step, thoughts.POSITIVE_RATING)


def tree_text(problem: Problem, rng: np.random.Generator | int, **tree_options) -> str:
  """The serialized tree (nodes joined by one space, as in OpenLongCoT-Pretrain)."""
  return thoughts.serialize(build_tree(problem, rng, **tree_options))


def policy_examples(problem: Problem, rng: np.random.Generator | int, *, ground_truth_hints: float = 0.0,
                    **tree_options) -> list[tuple[str, str]]:
  """(prompt, target) for every non-root node of a tree.

  prompt = `thoughts.policy_prompt` of the node's root path with the node's meta, id and hint (the ground-truth
  hint on plain expansions with probability `ground_truth_hints`); target = the node's text + `<end_of_thought>`
  + its rating block. prompt + target parses as a text of nodes.
  """
  rng = _rng(rng)
  nodes = build_tree(problem, rng, **tree_options)
  examples = []
  for node in nodes[1:]:
    ground_truth = problem.answer if not node.meta and rng.random() < ground_truth_hints else None
    prompt = thoughts.policy_prompt(thoughts.path_to(nodes, node.parent), node.meta, node.index,
                                    thoughts.hint(node.meta, ground_truth))
    examples.append((prompt, node.text + thoughts.END_THOUGHT + thoughts.rating_block(node.rating)))
  return examples


def sample_policy_prompt(problem: Problem, rng: np.random.Generator | int, max_steps: int = 8) -> str:
  """A plain-expansion policy prompt as the search builds it in evaluation (no hint): the root and the first k
  reference steps (rated positive), k uniform over the positions that still have a reference step next."""
  rng = _rng(rng)
  steps = split_steps(problem, max_steps=max_steps)
  path = _reference_path(problem, steps[:int(rng.integers(max(len(steps), 1)))])
  return thoughts.policy_prompt(path, "", len(path), hint_text="")


def _reference_path(problem: Problem, steps: list[str]) -> list[thoughts.Node]:
  """The root and `steps` as a chain with ids 0, 1, ..., every step rated positive."""
  path = [thoughts.Node(parent=-1, index=0, meta="<problem>", text=problem.question, rating=None)]
  for step in steps:
    path.append(thoughts.Node(parent=len(path) - 1, index=len(path), meta="", text=step,
                              rating=thoughts.POSITIVE_RATING))
  return path


def rating_examples(problem: Problem, rng: np.random.Generator | int,
                    max_steps: int = 8) -> list[tuple[str, bool]]:
  """Matched (rating prompt, is correct) pairs: at every step position with a possible corruption, the real
  step and its corrupted version after the same correct path and with the same id; and, for a plain-number
  answer, the right and a wrong conclusion. Correct first in each pair."""
  rng = _rng(rng)
  steps = split_steps(problem, max_steps=max_steps)
  examples = []
  for position, step in enumerate(steps):
    corruption = corrupt(step, rng)
    if corruption:
      path = _reference_path(problem, steps[:position])
      real = thoughts.Node(parent=position, index=position + 1, meta="", text=step, rating=None)
      examples.append((thoughts.rating_prompt(path, real), True))
      examples.append((thoughts.rating_prompt(path, dataclasses.replace(real, text=corruption.text)), False))
  path = _reference_path(problem, steps)
  wrong = _wrong_answer(problem.answer, rng)
  if wrong is not None:
    template = _CONCLUSIONS[rng.integers(len(_CONCLUSIONS))]
    right = thoughts.Node(parent=path[-1].index, index=len(path), meta="<conclusion>",
                          text=template.format(answer=problem.answer), rating=None)
    examples.append((thoughts.rating_prompt(path, right), True))
    examples.append((thoughts.rating_prompt(path, dataclasses.replace(right, text=template.format(answer=wrong))),
                     False))
  return examples
