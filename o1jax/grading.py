"""Final answers: extraction from model and reference text, and equivalence with math-verify under a time limit.

Usage:

  from o1jax import grading

  grading.extract_answer(r"... so the answer is $\\boxed{\\frac{1}{2}}$.")  # Extraction('\\frac{1}{2}', 'boxed')
  grading.is_equivalent(r"\\frac{1}{2}", "0.5")                              # True
  grades = grading.grade_batch([(model_text, problem.answer) for ...], timeout_s=5.0)
  accuracy = sum(g.correct for g in grades) / len(grades)

Extraction takes the last `\\boxed{}` / `\\fbox{}`, else the last `#### answer` line (GSM8K), else the last number
(reported as source "last_number", so a caller can tell a guessed answer from a stated one).

Equivalence: two plain numbers ("1,234", "$18", "18 dollars", "0.50") are compared here exactly; everything else goes
to math-verify (`parse` both sides wrapped in `\\boxed{}`, then `verify(gold, predicted)`), which knows fractions,
`\\dfrac`, percentages, `\\text{}` units, sets and intervals. The fast path only answers where math-verify would give
the same answer (equal values, or two different integers) and hands every other case on.

Why math-verify runs in worker processes: math-verify's own timeouts use `signal.alarm`, which works only in the
main thread, so in threads it must be called with `parsing_timeout=None` / `timeout_seconds=None` and timed out from
outside. A thread cannot be timed out from outside: sympy evaluates `9^{9^{9}}` as one big-integer power that holds
the GIL, so even the waiting caller never wakes up. So each verification is a JSON request to a small pool of child
Python processes (started on first use, about a second each, reused); a worker that misses its deadline is killed
and replaced, and the answer counts as not equivalent with `timed_out=True` (and a logged warning). Every function
here may be called from any thread. Only the workers import math-verify: extraction and plain numbers work without it.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import decimal
import importlib
import json
import logging as std_logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterable

from absl import logging


def last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} (or \\fbox{...}) in text, braces balanced; None when there is none.

  The brace-less form `\\boxed 2` (a few MATH solutions) yields the token after the space.

  >>> last_boxed(r"so \\boxed{\\frac{1}{2}} and \\boxed{3}")
  '3'
  >>> last_boxed(r"answer is $\\boxed 2$.")
  '2'
  """
  start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
  if start < 0:
    return None
  rest = text[start + (6 if text.startswith("\\boxed", start) else 5):]
  if rest.startswith(" "):
    token = re.match(r"\s+([^\s$]+)", rest)
    return token.group(1) if token else None
  if not rest.startswith("{"):
    return None
  depth = 0
  for j, char in enumerate(rest):
    if char == "{":
      depth += 1
    elif char == "}":
      depth -= 1
      if depth == 0:
        return rest[1:j]
  return None


# A plain number: thousands separators only in groups of three ("1,234", not the "2,3" of a pair), optional decimals.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def last_number(text: str) -> str | None:
  """The last number in text, thousands separators removed; None when there is none."""
  numbers = _NUMBER.findall(text)
  return numbers[-1].replace(",", "") if numbers else None


# Words that may follow a number as its unit ("18 dollars", "3 cups of flour"); percent and math words are not units.
_UNIT_WORDS = re.compile(r"[A-Za-z]{2,}[A-Za-z\s'/-]*")
_NOT_UNITS = ("percent", "pct", "pi", "sqrt")


def _number_with_units(text: str) -> str | None:
  """The number of a text that is one plain number with optional `$` and trailing unit words, commas removed.

  '$1,234.50 dollars.' -> '1234.50'; '18' -> '18'; None for anything else ('3/4', '5 x', '12%', '(2,3)').
  """
  stripped = text.strip().rstrip(".").strip()
  for currency in ("\\$", "$"):
    stripped = stripped.removeprefix(currency).lstrip()
  number = _NUMBER.match(stripped)
  if number is None:
    return None
  rest = stripped[number.end():].strip()
  if rest and (not _UNIT_WORDS.fullmatch(rest) or rest.lower().startswith(_NOT_UNITS)):
    return None
  return number.group(0).replace(",", "")


@dataclasses.dataclass(frozen=True)
class Extraction:
  """A final answer found in a text.

  Attributes:
    answer: the answer text (a `\\boxed{}`'s content as written; a number without separators), or None.
    source: "boxed", "gsm8k" (a `#### answer` line), "last_number" (a fallback guess) or "none".
  """

  answer: str | None
  source: str


# GSM8K's final line. The answer must not start with a letter: "#### Step 2" is a markdown heading, not an answer.
_GSM8K_LINE = re.compile(r"####[ \t]*([^\sA-Za-z][^\n]*)")


def extract_answer(text: str) -> Extraction:
  """The final answer of a model output or a reference solution.

  Order: the last non-empty `\\boxed{}` / `\\fbox{}`; else the last `#### answer` (a markdown `#### Heading` is
  not one), where a number loses `$`, thousands separators, a trailing '.' and unit words ('#### $1,200 dollars.'
  -> '1200'); else the last number.
  """
  if not isinstance(text, str):
    raise ValueError(f"text to extract an answer from must be a string; got {type(text).__name__} {text!r:.80}.")
  boxed = last_boxed(text)
  if boxed is not None and boxed.strip():
    return Extraction(boxed.strip(), "boxed")
  gsm8k_lines = _GSM8K_LINE.findall(text)
  if gsm8k_lines:
    line = gsm8k_lines[-1].strip()
    number = _number_with_units(line)
    return Extraction(number if number is not None else line.rstrip(".").strip(), "gsm8k")
  number = last_number(text)
  if number is not None:
    return Extraction(number, "last_number")
  return Extraction(None, "none")


def _check_reference(reference: object, where: str = "") -> None:
  if not isinstance(reference, str) or not reference.strip():
    raise ValueError(f"reference answer{where} must be a non-empty string; got {reference!r:.80}.")


def _check_predicted(predicted: object, where: str = "") -> None:
  if not isinstance(predicted, str):
    raise ValueError(f"predicted text{where} must be a string; got {type(predicted).__name__} {predicted!r:.80}.")


def _check_timeout(timeout_s: float) -> None:
  if not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
    raise ValueError(f"timeout_s must be a positive, finite number of seconds; got {timeout_s!r}.")


def is_equivalent(predicted: str, reference: str, *, timeout_s: float = 5.0) -> bool:
  """Whether a predicted answer equals the reference answer (both answer strings, not whole solutions).

  Args:
    predicted: the extracted answer, e.g. '0.5', '\\dfrac{1}{2}', '$18', '18 \\text{ dollars}'; '' is never equal.
    reference: the reference answer, non-empty.
    timeout_s: seconds math-verify may spend on this pair; past it the pair counts as not equivalent (and is logged).

  Raises:
    ValueError: reference is not a non-empty string, predicted is not a string, or timeout_s is not positive.
  """
  _check_predicted(predicted)
  _check_reference(reference)
  _check_timeout(timeout_s)
  return _equivalent(predicted, reference, timeout_s)[0]


def _equivalent(predicted: str, reference: str, timeout_s: float) -> tuple[bool, bool]:
  """(equivalent, timed_out) for checked inputs: the plain-number fast path, else a math-verify worker."""
  if not predicted.strip():
    return False, False
  predicted_number, reference_number = _number_with_units(predicted), _number_with_units(reference)
  if predicted_number is not None and reference_number is not None:
    # math-verify compares two integers exactly, and two equal values are equal however written; other numeric
    # pairs (e.g. 3.14159265 vs 3.14159264) meet its rounding rules, so they go on to it.
    if decimal.Decimal(predicted_number) == decimal.Decimal(reference_number):
      return True, False
    if "." not in predicted_number and "." not in reference_number:
      return False, False
  return _POOL.verify(predicted_number or predicted.strip(), reference_number or reference.strip(), timeout_s)


def _as_boxed(answer: str) -> str:
  """An answer as math-verify reads it best: inside \\boxed{}, which also turns on its unit and text handling."""
  if len(answer) > 1 and answer.startswith("$") and answer.endswith("$"):
    answer = answer.strip("$")
  return answer if "\\boxed" in answer or "\\fbox" in answer else f"\\boxed{{{answer}}}"


def _math_verify_equivalent(predicted: str, reference: str) -> bool:
  """math-verify's verdict on two answer strings, with no time limit: run it only in a worker process."""
  import math_verify  # pylint: disable=import-outside-toplevel  # only workers need it (a `test` extra for now)

  gold = math_verify.parse(_as_boxed(reference), parsing_timeout=None)
  target = math_verify.parse(_as_boxed(predicted), parsing_timeout=None)
  return math_verify.verify(gold, target, timeout_seconds=None)


# ---------------------------------------------------------------------------------------------------------------
# Worker processes. Protocol: one JSON object per line. The worker first writes {"ready": true}; then for each
# request {"predicted": ..., "reference": ...} it writes {"equivalent": bool} or {"error": "..."}.

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Python source a worker runs (`python -c`); tests prepend statements to it (e.g. a slow math_verify.verify).
_WORKER_SOURCE = f"import sys; sys.path.insert(0, {_REPO_ROOT!r}); from o1jax import grading; grading.serve_worker()"
_WORKER_STARTUP_TIMEOUT_S = 120.0


def serve_worker() -> None:
  """Body of a worker process: answer verification requests from stdin on stdout until stdin closes."""
  importlib.import_module("math_verify")  # a missing package fails here, before "ready"
  replies = sys.stdout
  sys.stdout = sys.stderr  # a stray print must not corrupt the protocol
  std_logging.getLogger("math_verify").setLevel(std_logging.ERROR)  # its "timeout is disabled" notice is expected
  replies.write(json.dumps({"ready": True}) + "\n")
  replies.flush()
  for line in sys.stdin:
    request = json.loads(line)
    try:
      reply = {"equivalent": bool(_math_verify_equivalent(request["predicted"], request["reference"]))}
    except Exception as error:  # noqa: BLE001 - any failure is one pair's failure, reported to the caller
      reply = {"error": f"{type(error).__name__}: {error}"[:500]}
    replies.write(json.dumps(reply) + "\n")
    replies.flush()


class _WorkerGone(Exception):
  """The worker process exited or closed its pipes."""


class _Worker:
  """One child process running `serve_worker`, spoken to over its stdin/stdout pipes."""

  def __init__(self, source: str):
    self._process = subprocess.Popen([sys.executable, "-c", source], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
    self._pending = b""
    try:
      ready = self._read_reply(time.monotonic() + _WORKER_STARTUP_TIMEOUT_S)
    except _WorkerGone:
      ready = None
    if ready != {"ready": True}:
      self.kill()
      raise RuntimeError(f"the math-verify worker process did not start within {_WORKER_STARTUP_TIMEOUT_S:.0f} s "
                         f"(exit code {self._process.returncode}); is math-verify installed? See its error output.")

  def request(self, predicted: str, reference: str, timeout_s: float) -> dict | None:
    """The worker's reply, or None when it did not come within timeout_s. Raises _WorkerGone."""
    try:
      self._process.stdin.write((json.dumps({"predicted": predicted, "reference": reference}) + "\n").encode())
    except OSError as error:
      raise _WorkerGone(str(error)) from error
    return self._read_reply(time.monotonic() + timeout_s)

  def _read_reply(self, deadline: float) -> dict | None:
    # select + os.read on the raw pipe: a buffered readline could block past the deadline.
    fd = self._process.stdout.fileno()
    while b"\n" not in self._pending:
      remaining = deadline - time.monotonic()
      if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
        return None
      chunk = os.read(fd, 1 << 16)
      if not chunk:
        raise _WorkerGone(f"exit code {self._process.poll()}")
      self._pending += chunk
    line, _, self._pending = self._pending.partition(b"\n")
    return json.loads(line)

  def kill(self) -> None:
    self._process.kill()
    self._process.wait()

  def close(self) -> None:
    """Ends the worker: closing stdin ends its loop; one that does not end within a second is killed."""
    try:
      self._process.stdin.close()
      self._process.wait(timeout=1.0)
    except (OSError, subprocess.TimeoutExpired):
      self.kill()


class _WorkerPool:
  """Idle workers, shared by all calling threads; one worker serves one request at a time."""

  def __init__(self):
    self._idle: list[_Worker] = []
    self._lock = threading.Lock()

  def verify(self, predicted: str, reference: str, timeout_s: float) -> tuple[bool, bool]:
    """(equivalent, timed_out) from a worker; a worker that times out or fails is discarded."""
    with self._lock:
      worker = self._idle.pop() if self._idle else None
    if worker is None:
      worker = _Worker(_WORKER_SOURCE)
    try:
      reply = worker.request(predicted, reference, timeout_s)
    except _WorkerGone as error:
      worker.kill()
      logging.warning("math-verify worker died on predicted=%.200r reference=%.200r (%s); counted as not "
                      "equivalent", predicted, reference, error)
      return False, False
    if reply is None:
      worker.kill()
      logging.warning("math-verify timed out after %.3g s on predicted=%.200r reference=%.200r; counted as not "
                      "equivalent", timeout_s, predicted, reference)
      return False, True
    with self._lock:
      self._idle.append(worker)
    if "error" in reply:
      logging.warning("math-verify failed on predicted=%.200r reference=%.200r (%s); counted as not equivalent",
                      predicted, reference, reply["error"])
      return False, False
    return reply["equivalent"], False

  def close(self) -> None:
    with self._lock:
      idle, self._idle = self._idle, []
    for worker in idle:
      worker.close()


_POOL = _WorkerPool()
atexit.register(lambda: _POOL.close())


# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Grade:
  """The grade of one predicted text.

  Attributes:
    correct: the extracted answer is equivalent to the reference (False on a timeout).
    extracted: the extracted answer, None when the text has none.
    source: where the answer came from (see `Extraction.source`).
    timed_out: math-verify ran past the time limit on this pair.
  """

  correct: bool
  extracted: str | None
  source: str
  timed_out: bool


def grade(predicted_text: str, reference: str, *, timeout_s: float = 5.0) -> Grade:
  """Extracts the answer from a model's text and grades it against the reference answer."""
  _check_predicted(predicted_text)
  _check_reference(reference)
  _check_timeout(timeout_s)
  return _grade(predicted_text, reference, timeout_s)


def _grade(predicted_text: str, reference: str, timeout_s: float) -> Grade:
  extraction = extract_answer(predicted_text)
  if extraction.answer is None:
    return Grade(False, None, extraction.source, False)
  correct, timed_out = _equivalent(extraction.answer, reference, timeout_s)
  return Grade(correct, extraction.answer, extraction.source, timed_out)


def grade_batch(pairs: Iterable[tuple[str, str]], *, max_workers: int = 4, timeout_s: float = 5.0) -> list[Grade]:
  """Grades (predicted_text, reference_answer) pairs in parallel threads, in order.

  Each thread drives one math-verify worker process (see the module docstring), so up to max_workers answers are
  verified at once; plain numeric pairs (GSM8K) never leave the calling process.

  Raises:
    ValueError: a pair is not (str, non-empty str), max_workers < 1, or timeout_s is not positive.
  """
  pairs = list(pairs)
  _check_timeout(timeout_s)
  if not isinstance(max_workers, int) or max_workers < 1:
    raise ValueError(f"max_workers must be a positive integer; got {max_workers!r}.")
  for index, pair in enumerate(pairs):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise ValueError(f"pair {index} must be (predicted_text, reference_answer); got {pair!r:.80}.")
    _check_predicted(pair[0], f" of pair {index}")
    _check_reference(pair[1], f" of pair {index}")
  if not pairs:
    return []
  with concurrent.futures.ThreadPoolExecutor(min(max_workers, len(pairs)), "o1jax-grading") as executor:
    grades = list(executor.map(lambda pair: _grade(pair[0], pair[1], timeout_s), pairs))
  timed_out = sum(g.timed_out for g in grades)
  if timed_out:
    logging.warning("grading: %d of %d answers timed out after %.3g s and count as wrong", timed_out, len(grades),
                    timeout_s)
  return grades
