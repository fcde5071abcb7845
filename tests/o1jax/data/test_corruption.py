"""Corrupted steps: the changed equation is false, both GSM8K copies change alike, other steps get one number."""

import ast
import operator
import re
from fractions import Fraction

import numpy as np
import pytest

from o1jax.data import corpus, corruption, problems

ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>=]+)>>")


@pytest.fixture(scope="module")
def gsm8k():
  return problems.load("gsm8k_train", 0, 5)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def arithmetic(expression: str) -> Fraction:
  """Exact value of + - * / arithmetic on decimal literals; anything else raises (no eval)."""

  def value(node):
    if isinstance(node, ast.Expression):
      return value(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
      return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
      return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
      return _OPS[type(node.op)](value(node.left), value(node.right))
    raise ValueError(f"not plain arithmetic: {ast.dump(node)}")

  return value(ast.parse(expression.strip(), mode="eval"))


def holds(lhs: str, rhs: str) -> bool:
  """lhs = rhs up to GSM8K's rounding of written results (0.1%, at least 0.01)."""
  left, right = arithmetic(lhs), arithmetic(rhs)
  return abs(left - right) <= max(Fraction(1, 100), abs(right) / 1000)


def visible_numbers(step: str) -> list[str]:
  return re.findall(r"\d+(?:\.\d+)?|\.\d+", ANNOTATION.sub(" ", step))


@pytest.mark.parametrize("seed", range(6))
def test_corrupted_gsm8k_steps_are_false_and_consistent(gsm8k, seed):
  rng = np.random.default_rng(seed)
  for problem in gsm8k:
    for step in corpus.split_steps(problem):
      before = ANNOTATION.findall(step)
      assert all(holds(lhs, rhs) for lhs, rhs in before)  # the data are right to begin with
      wrong = corruption.corrupt_step(step, rng)
      assert wrong is not None and wrong != step
      after = ANNOTATION.findall(wrong)
      changed = [(old, new) for old, new in zip(before, after) if old != new]
      assert len(after) == len(before) and len(changed) == 1, (step, wrong)
      (_, (lhs, rhs)), = changed
      assert not holds(lhs, rhs), (step, wrong)
      # The visible text changes exactly where the annotation's numbers changed, to the same values.
      old_numbers = re.findall(r"\d+(?:\.\d+)?|\.\d+", "=".join(changed[0][0]))
      new_numbers = re.findall(r"\d+(?:\.\d+)?|\.\d+", "=".join(changed[0][1]))
      pairs = {(a, b) for a, b in zip(old_numbers, new_numbers) if a != b}
      for a, b in zip(visible_numbers(step), visible_numbers(wrong)):
        assert a == b or (a, b) in pairs, (step, wrong)


@pytest.mark.parametrize("seed", range(12))
def test_corruption_keeps_the_visible_calculation_in_step(seed):
  rng = np.random.default_rng(seed)
  weng = corruption.corrupt_step("Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.", rng)
  match = re.fullmatch(r"Working 50 minutes, she earned (\S+) ([x/]) (\S+) = \$<<(\S+)([*/])(\S+)=(\S+)>>(\S+)\.",
                       weng)
  assert match, weng
  a, visible_op, b, a2, op, b2, result, visible_result = match.groups()
  assert (a, b, result) == (a2, b2, visible_result)
  assert {"x": "*", "/": "/"}[visible_op] == op
  assert not holds(f"{a}{op}{b}", result)
  natalia = corruption.corrupt_step("Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.", rng)
  match = re.fullmatch(r"Natalia sold (\S+?)([-+])(\S+) = <<\1\2\3=(\S+)>>\4 clips altogether in April and May\.",
                       natalia)
  assert match and not holds(match.group(1) + match.group(2) + match.group(3), match.group(4)), natalia


@pytest.mark.parametrize("seed", range(8))
def test_changes_that_keep_the_equation_true_are_not_taken(seed):
  # Changing the 3 of 0*3=0, or * to /, keeps it true; 12000 -> 12001 is within GSM8K's rounding. Whatever is
  # chosen instead, the written equation must be false.
  rng = np.random.default_rng(seed)
  for step in ("She scores 0*3 = <<0*3=0>>0 points.", "The total is 3*4000 = <<3*4000=12000>>12000 dollars."):
    ((lhs, rhs),) = ANNOTATION.findall(corruption.corrupt_step(step, rng))
    assert not holds(lhs, rhs), (step, lhs, rhs)


def test_corrupt_names_the_equation_as_corrupted_and_as_it_was():
  step = "Natalia sold 48/2 = <<48/2=24>>24 clips in May."
  for seed in range(6):
    result = corruption.corrupt(step, np.random.default_rng(seed))
    assert result.right == "48/2=24"
    assert f"<<{result.wrong}>>" in result.text and result.wrong != result.right
    lhs, rhs = result.wrong.split("=")
    assert not holds(lhs, rhs)


def test_corrupt_step_without_numbers_and_plain_equations():
  rng = np.random.default_rng(0)
  assert corruption.corrupt_step("Add the two amounts together.", rng) is None
  assert corruption.corrupt_step("He says <<2+2=5>>.", rng) is None  # annotations are never number-changed
  for _ in range(10):
    wrong = corruption.corrupt_step("so there are $3\\times 3=9$ ways.", rng)
    a, op, b, c = re.fullmatch(r"so there are \$(\d+)(\\times|\\div) (\d+)=(\d+)\$ ways\.", wrong).groups()
    symbol = {"\\times": "*", "\\div": "/"}[op]
    assert not holds(a + symbol + b, c)


def test_without_an_equation_one_number_changes_outside_asy():
  rng = np.random.default_rng(0)
  changed_numbers = set()
  for _ in range(12):
    result = corruption.corrupt("She has 12 apples and 3 pears.", rng)
    match = re.fullmatch(r"She has (\d+) apples and (\d+) pears\.", result.text)
    diffs = [(old, new) for old, new in zip(("12", "3"), match.groups()) if old != new]
    assert diffs == [(result.right, result.wrong)]
    changed_numbers.add(result.right)
    drawing = "[asy]draw((0,0)--(10,10));[/asy] The side is 4."
    result = corruption.corrupt(drawing, rng)
    assert result.right == "4" and result.text == drawing[:-2] + result.wrong + "."
  assert changed_numbers == {"12", "3"}


def test_equation_texts_are_the_true_equations_as_written():
  assert corruption.equation_texts("Natalia sold 48/2 = <<48/2=24>>24 clips in May.") == ["48/2=24"]
  assert corruption.equation_texts("He got 2+2=<<2+2=5>>5 and 3*4=<<3*4=12>>12.") == ["3*4=12"]
  assert corruption.equation_texts("So 1+1=2 and <<3+4=7>>7.") == ["3+4=7"]  # annotations win over plain text
  assert corruption.equation_texts("<<10/3=3.33>>3.33 each") == ["10/3=3.33"]  # rounded results count
  assert corruption.equation_texts("so there are $3\\times 3=9$ ways.") == ["3\\times 3=9"]
  assert corruption.equation_texts("Then 7 - 2 = 5 and 10 / 4 = 2.5, not 2 + 3 = 6.") == ["7 - 2 = 5", "10 / 4 = 2.5"]
  assert corruption.equation_texts("x^2=4 and 2.5=2.5, no calculation") == []


def test_perturbed_numbers():
  rng = np.random.default_rng(0)
  assert sorted(corruption.perturbed_numbers("5", rng), key=float) == ["3", "4", "6", "7", "10", "15"]
  assert sorted(corruption.perturbed_numbers("0", rng), key=float) == ["1", "2", "5", "10"]  # never negative
  assert sorted(corruption.perturbed_numbers("1.5", rng), key=float) == ["0.5", "2.5", "3.0", "3.5", "6.5", "11.5"]
  assert sorted(corruption.perturbed_numbers("1,200", rng), key=float) == [
      "1198", "1199", "1201", "1202", "1205", "1210", "2400"]
  assert sorted(corruption.perturbed_numbers("-3", rng), key=float) == ["-6", "-5", "-4", "-2", "-1", "2", "7"]
  orders = {tuple(corruption.perturbed_numbers("5", np.random.default_rng(seed))) for seed in range(10)}
  assert len(orders) > 1  # the order is random
