"""Final answers of search nodes, and the votes that choose one answer per problem.

A node states a final answer when its text has a `\\boxed{}` (what the conclusion hint asks for) or a GSM8K
`#### answer` line; a `<conclusion>` step's answer may also be its last number (a conclusion that forgot the box
still concludes). Such nodes are terminal, and in self-play their answer is checked against the ground truth.

Votes over a problem's candidate answers (search-and-learn's rules, over any strategy's candidates):
  - best:      the candidate with the highest score;
  - majority:  the answer given most often;
  - weighted:  the answer whose candidates' scores sum highest.
Candidates are grouped by equivalence (`grading.is_equivalent`: "0.5" and "\\frac{1}{2}" are one answer);
ties go to the answer seen first.
"""

from __future__ import annotations

from typing import Sequence

from o1jax import grading

STATED_SOURCES = ("boxed", "gsm8k")
VOTES = ("best", "majority", "weighted")


def stated_answer(text: str) -> str | None:
  """The final answer a step states (a \\boxed{} or a #### line), or None."""
  extraction = grading.extract_answer(text)
  return extraction.answer if extraction.source in STATED_SOURCES else None


def node_answer(text: str, is_conclusion: bool) -> str | None:
  """A node's final answer: stated, or for a <conclusion> step also its last number."""
  extraction = grading.extract_answer(text)
  if extraction.source in STATED_SOURCES or (is_conclusion and extraction.answer is not None):
    return extraction.answer
  return None


def group(answers: Sequence[str]) -> list[int]:
  """Group id of each answer: the index of the first earlier answer it is equivalent to (itself if none)."""
  representatives: list[int] = []
  out = []
  for i, answer in enumerate(answers):
    for r in representatives:
      if answer == answers[r] or grading.is_equivalent(answer, answers[r]):
        out.append(r)
        break
    else:
      representatives.append(i)
      out.append(i)
  return out


def vote(answers: Sequence[str | None], scores: Sequence[float], rule: str) -> int | None:
  """The index of the chosen candidate (None when no candidate has an answer).

  Args:
    answers: each candidate's answer (None: it has none and takes no part).
    scores: each candidate's score (a probability-like number; higher is better).
    rule: "best", "majority" or "weighted" (see the module docstring). For the two votes the chosen index is
      the best-scored candidate of the winning answer.
  """
  if rule not in VOTES:
    raise ValueError(f"vote rule {rule!r}; expected one of {VOTES}.")
  if len(answers) != len(scores):
    raise ValueError(f"{len(answers)} answers and {len(scores)} scores; expected one score per answer.")
  candidates = [i for i, a in enumerate(answers) if a is not None]
  if not candidates:
    return None
  if rule == "best":
    return max(candidates, key=lambda i: (scores[i], -i))
  groups = group([answers[i] for i in candidates])
  totals: dict[int, float] = {}
  for position, g in enumerate(groups):
    totals[g] = totals.get(g, 0.0) + (1.0 if rule == "majority" else float(scores[candidates[position]]))
  winner = max(totals, key=lambda g: (totals[g], -g))
  members = [candidates[p] for p, g in enumerate(groups) if g == winner]
  return max(members, key=lambda i: (scores[i], -i))
