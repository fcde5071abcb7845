"""Answer extraction and equivalence: hand-written truths, real GSM8K / MATH-500 answers, threads and time limits."""

import json
import subprocess
import sys
import threading
import time

import math_verify
import pytest

from o1jax import grading
from o1jax.data import problems


@pytest.mark.parametrize("text,answer,source", [
    (r"so $\boxed{\frac{1}{\sqrt{2}}}$.", r"\frac{1}{\sqrt{2}}", "boxed"),
    (r"\boxed{1} first, then \boxed{\left\{ 2, \frac{3}{4} \right\}}", r"\left\{ 2, \frac{3}{4} \right\}", "boxed"),
    (r"\fbox{ 7 }", "7", "boxed"),
    ("#### 1,234", "1234", "gsm8k"),
    ("She pays 3 * 6 = $<<3*6=18>>18.\n#### $18", "18", "gsm8k"),
    ("#### 18 dollars.", "18", "gsm8k"),
    ("#### 2,520,000 square feet", "2520000", "gsm8k"),
    ("#### -3", "-3", "gsm8k"),
    ("#### 0.5.", "0.5", "gsm8k"),
    ("#### 3/4", "3/4", "gsm8k"),
    ("#### 5\n\n#### 6", "6", "gsm8k"),
    (r"\boxed{} but #### 12", "12", "gsm8k"),
    ("#### Step 2: add\nSo 5 + 7 = 12 in all.", "12", "last_number"),
    ("So she has 5 apples, then 12 apples, 1,500 in total.", "1500", "last_number"),
    ("the point is (2,3)", "3", "last_number"),
    ("no digits here", None, "none"),
    ("", None, "none"),
])
def test_extract_answer(text, answer, source):
  assert grading.extract_answer(text) == grading.Extraction(answer, source)


def test_gsm8k_solutions_give_their_answers():
  with open(problems.data_file("gsm8k_train")) as f:
    records = [json.loads(line) for _, line in zip(range(20), f)]
  loaded = problems.load("gsm8k_train", 0, 20)
  assert len(loaded) == len(records) == 20
  for record, problem in zip(records, loaded):
    assert grading.extract_answer(record["answer"]) == grading.Extraction(problem.answer, "gsm8k")


def test_last_number_without_thousands_groups():
  assert grading.last_number("between 2,3 and 4,5678") == "5678"
  assert grading.last_number("x = 12,345,678.9 m") == "12345678.9"


@pytest.mark.parametrize("predicted,reference,expected", [
    # fractions and decimals
    (r"\frac{1}{2}", "0.5", True),
    ("0.5", r"\frac{1}{2}", True),
    (r"\dfrac{3}{4}", "0.75", True),
    (r"\frac34", "3/4", True),
    ("3/4", r"\frac{3}{4}", True),
    ("0.25", r"\frac{1}{2}", False),
    # thousands separators, currency and units
    ("1,000", "1000", True),
    ("1,234.5", "1234.50", True),
    ("$18", "18", True),
    (r"\$18", "18", True),
    (r"18 \text{ dollars}", "18", True),
    ("18 dollars", "18", True),
    ("18 dollars", "19", False),
    (r"90^\circ", "90", True),
    # percentages
    (r"50\%", "0.5", True),
    ("12.5%", "0.125", True),
    # symbolic forms
    (r"\sqrt{117}", r"3\sqrt{13}", True),
    ("-q + p", "p - q", True),
    ("q - p", "p - q", False),
    ("5", "x=5", True),
    ("6 + 5i", "6 - 5i", False),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\left( 3, \frac{\pi}{3} \right)", r"\left( 3, \frac{\pi}{2} \right)", False),
    # wrong and empty answers
    ("7", "8", False),
    ("-5", "5", False),
    ("", "5", False),
    ("   ", "5", False),
])
def test_is_equivalent(predicted, reference, expected):
  assert grading.is_equivalent(predicted, reference) is expected


# Plain numbers are decided without math-verify; the verdict must be math-verify's own (called here in the main
# thread, where its signal timeouts work) as well as the hand-written truth.
@pytest.mark.parametrize("predicted,reference,expected", [
    ("1,000", "1000", True), ("007", "7", True), ("18.00", "18", True), ("-0", "0", True), ("0.50", "0.5", True),
    ("41", "42", False), ("123456789012345678", "123456789012345679", False), ("-10", "10", False),
    ("3.14159265", "3.14159264", True),  # verify() rounds floats to float_rounding=6 places
])
def test_plain_numbers_agree_with_math_verify(predicted, reference, expected):
  gold = math_verify.parse(f"\\boxed{{{reference}}}")
  target = math_verify.parse(f"\\boxed{{{predicted}}}")
  assert math_verify.verify(gold, target) is expected
  assert grading.is_equivalent(predicted, reference) is expected


class _NoWorkers:

  def verify(self, predicted, reference, timeout_s):
    raise AssertionError(f"math-verify worker used for {predicted!r} vs {reference!r}")


def test_gsm8k_grading_stays_in_process(monkeypatch):
  monkeypatch.setattr(grading, "_POOL", _NoWorkers())
  grades = grading.grade_batch([("#### 1,200", "1200"), ("#### 72", "72"), (r"\boxed{\$18}", "18"),
                                ("The total is 42 cookies.", "41")])
  assert [g.correct for g in grades] == [True, True, True, False]


@pytest.mark.parametrize("index", [0, 1, 2, 4, 7, 8, 15, 23])
def test_math500_references_equal_themselves(index):
  (problem,) = problems.load("math500", index, 1)
  assert grading.is_equivalent(problem.answer, problem.answer)
  (solution_grade,) = grading.grade_batch([(problem.solution, problem.answer)])  # its \boxed{} holds the answer
  assert solution_grade.correct and solution_grade.source == "boxed"


def test_grade_batch_grades_in_order():
  grades = grading.grade_batch([
      (r"The answer is $\boxed{\dfrac{1}{2}}$.", "0.5"),
      ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
      ("so maybe 17", "18"),
      ("I do not know.", "3"),
  ], max_workers=2)
  assert grades == [
      grading.Grade(True, r"\dfrac{1}{2}", "boxed", False),
      grading.Grade(True, "72", "gsm8k", False),
      grading.Grade(False, "17", "last_number", False),
      grading.Grade(False, None, "none", False),
  ]


def test_callable_from_a_thread():
  results = {}

  def work():
    results["grades"] = grading.grade_batch([(r"\boxed{\frac{3}{4}}", "0.75"), (r"\boxed{\frac{2}{3}}", "0.75")])
    results["equivalent"] = grading.is_equivalent(r"\sqrt{4}", "2")

  thread = threading.Thread(target=work)
  thread.start()
  thread.join(timeout=60)
  assert not thread.is_alive()
  assert [g.correct for g in results["grades"]] == [True, False]
  assert results["equivalent"] is True


def test_slow_verification_times_out(monkeypatch, caplog):
  # Every worker of a fresh pool has a math_verify.verify that sleeps a minute.
  slow = "import math_verify, time; math_verify.verify = lambda *args, **kwargs: time.sleep(60)\n"
  monkeypatch.setattr(grading, "_WORKER_SOURCE", slow + grading._WORKER_SOURCE)
  pool = grading._WorkerPool()
  monkeypatch.setattr(grading, "_POOL", pool)
  try:
    start = time.monotonic()
    grades = grading.grade_batch([(r"\boxed{\frac{1}{2}}", "0.5"), ("#### 7", "7")], timeout_s=0.5)
    elapsed = time.monotonic() - start
    assert grading.is_equivalent(r"\frac{1}{2}", "0.5", timeout_s=0.5) is False
  finally:
    pool.close()
  assert grades == [grading.Grade(False, r"\frac{1}{2}", "boxed", True), grading.Grade(True, "7", "gsm8k", False)]
  assert elapsed < 20  # a worker start (about a second) and the 0.5 s limit, not the minute of sleep
  assert "timed out" in caplog.text


def test_pathological_input_times_out_and_grading_goes_on():
  # sympy evaluates 9^(9^9) as one big-integer power that holds the GIL: only a separate process can be stopped.
  start = time.monotonic()
  (grade,) = grading.grade_batch([(r"\boxed{9^{9^{9}}}", "1")], timeout_s=1.0)
  assert time.monotonic() - start < 20
  assert grade == grading.Grade(False, "9^{9^{9}}", "boxed", True)
  assert grading.is_equivalent(r"\frac{2}{4}", "0.5")


@pytest.mark.parametrize("call,message", [
    (lambda: grading.is_equivalent("1", None), "reference answer must be a non-empty string; got None"),
    (lambda: grading.is_equivalent("1", "  "), "reference answer must be a non-empty string; got '  '"),
    (lambda: grading.is_equivalent(None, "1"), "predicted text must be a string; got NoneType"),
    (lambda: grading.is_equivalent("1", "1", timeout_s=0), "timeout_s must be a positive, finite number of seconds"),
    (lambda: grading.grade_batch([("1", "1")], timeout_s=-1.0), "timeout_s must be a positive, finite number"),
    (lambda: grading.is_equivalent("1", "2", timeout_s=float("inf")), "got inf"),
    (lambda: grading.grade_batch([("1", "1")], max_workers=0), "max_workers must be a positive integer; got 0"),
    (lambda: grading.grade_batch([("1", "1"), ("2", "")]), "reference answer of pair 1 must be a non-empty string"),
    (lambda: grading.grade_batch([("1", "1", "1")]), r"pair 0 must be \(predicted_text, reference_answer\)"),
    (lambda: grading.extract_answer(None), "text to extract an answer from must be a string; got NoneType"),
])
def test_bad_input(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_worker_that_cannot_start_is_an_error(monkeypatch):
  monkeypatch.setattr(grading, "_WORKER_SOURCE", "raise SystemExit(3)")
  pool = grading._WorkerPool()
  monkeypatch.setattr(grading, "_POOL", pool)
  with pytest.raises(RuntimeError, match=r"did not start .*\(exit code 3\); is math-verify installed"):
    grading.is_equivalent("x", "y")


def test_extraction_and_plain_numbers_need_no_math_verify():
  # math-verify is a `test` extra: loading problems and grading GSM8K must work where it is not installed.
  script = ("import sys; sys.modules['math_verify'] = None\n"
            "from o1jax.data import problems\n"
            "from o1jax import grading\n"
            "assert grading.grade_batch([('#### 1,200', '1200'), ('so 5', '6')]) == "
            "[grading.Grade(True, '1200', 'gsm8k', False), grading.Grade(False, '5', 'last_number', False)]\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=grading._REPO_ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
  assert result.returncode == 0, result.stderr
