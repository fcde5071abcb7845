"""Corrupted reasoning steps: a correct step made wrong by one small change, a false equation where possible.

The format corpus (o1jax/data/corpus.py) writes a corrupted copy of a reference step beside the real one and
rates it `<negative_rating>`. Without such siblings every plain step of the corpus would be rated
`<positive_rating>` and the rating logits (read after `thoughts.rating_prompt`) would have nothing to learn;
with them, a right and a wrong step at the same position differ only in the mistake.

A corruption changes one thing in one true equation of the step:

  result     48/2=24 -> 48/2=25
  operand    48/2=24 -> 50/2=24
  operator   48/2=24 -> 48*2=24   (+ <-> -, * <-> /, in the style written: x -> /, \\times -> \\div)

and the equation it changes is then false. The guarantee comes from exact arithmetic, not from the change
itself: the step's calculations are tokenized and evaluated with Fractions (a small recursive-descent parser, no
eval); only equations that hold, up to GSM8K's rounding of written results (`_close`), are candidates, and a
change is kept only when the changed equation misses by more than that tolerance (3 -> 4 in 0*3=0, or 12000 ->
12001 in 3*4000=12000, is rejected and the next candidate tried). A GSM8K step writes each calculation
twice, as text and as its `<<lhs=result>>` annotation ("48/2 = <<48/2=24>>24"); both copies change alike so the
step still reads as one consistent, wrong calculation. When the text does not match the annotation token for
token, only the result changes.

A step with no checkable equation (most MATH prose) gets one number changed instead, outside annotations and
[asy] drawings: most likely wrong, but not provably so. A step with no number has no corruption (None).

Replacement numbers are small perturbations (+-1, +-2, +5, +10, x2) written with the same decimals, a
non-negative number staying non-negative. Everything is a pure function of the step and a
`numpy.random.Generator`, so the same seed gives the same corpus.
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

import numpy as np

# ------------------------------------------------------------------------------------------------ arithmetic

# A token of a written calculation; `op` covers GSM8K's visible "x" and LaTeX's \times / \cdot / \div.
_TOKEN = re.compile(r"(?P<space>\s+)|(?P<number>\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)|"
                    r"(?P<op>\\times|\\cdot|\\div|[-+*/x×÷])|(?P<paren>[()])|(?P<dollar>\$)")
_OP_NAMES = {"+": "+", "-": "-", "*": "*", "/": "/", "x": "*", "×": "*", "\\times": "*", "\\cdot": "*",
             "÷": "/", "\\div": "/"}
# The operator written when one is swapped: + <-> -, * <-> /, each in the style it was written in.
_SWAPPED = {"+": "-", "-": "+", "*": "/", "x": "/", "×": "÷", "\\times": "\\div", "\\cdot": "\\div", "/": "*",
            "÷": "×", "\\div": "\\times"}


@dataclasses.dataclass(frozen=True)
class _Token:
  kind: str  # "number", "op" (binary), "neg" / "pos" (unary minus / plus), "paren"
  text: str
  start: int  # absolute position in the step
  end: int

  @property
  def value(self) -> Fraction:
    return Fraction(self.text.replace(",", ""))


def _tokenize(text: str, start: int, end: int, allow_x: bool) -> list[_Token] | None:
  """The tokens of text[start:end] as a calculation, or None when it is not one."""
  tokens: list[_Token] = []
  pos = start
  while pos < end:
    match = _TOKEN.match(text, pos, end)
    if not match or (match.lastgroup == "op" and match.group() in ("x", "×") and not allow_x):
      return None
    kind = match.lastgroup
    if kind == "op":
      binary = bool(tokens) and (tokens[-1].kind == "number" or tokens[-1].text == ")")
      if not binary:
        if match.group() not in ("-", "+"):
          return None
        kind = "neg" if match.group() == "-" else "pos"
    if kind in ("number", "op", "neg", "pos", "paren"):
      tokens.append(_Token(kind, match.group(), match.start(), match.end()))
    pos = match.end()
  return tokens


def _evaluate(tokens: list[_Token], values: dict[int, Fraction] | None = None,
              ops: dict[int, str] | None = None) -> Fraction | None:
  """Exact value of a token list (numbers/ops optionally overridden by token position); None if invalid."""
  values, ops = values or {}, ops or {}
  pos = 0

  def peek() -> _Token | None:
    return tokens[pos] if pos < len(tokens) else None

  def op_at(k: int) -> str:
    return _OP_NAMES[ops.get(k, tokens[k].text)]

  def expression() -> Fraction:
    nonlocal pos
    value = term()
    while peek() and peek().kind == "op" and op_at(pos) in "+-":
      pos += 1
      value = value + term() if op_at(pos - 1) == "+" else value - term()
    return value

  def term() -> Fraction:
    nonlocal pos
    value = factor()
    while peek() and peek().kind == "op" and op_at(pos) in "*/":
      pos += 1
      if op_at(pos - 1) == "*":
        value *= factor()
      else:
        value /= factor()  # ZeroDivisionError -> None below
    return value

  def factor() -> Fraction:
    nonlocal pos
    token = peek()
    if token is None:
      raise ValueError("incomplete")
    pos += 1
    if token.kind in ("neg", "pos"):
      return -factor() if token.kind == "neg" else factor()
    if token.kind == "number":
      return values.get(pos - 1, token.value)
    if token.text == "(":
      value = expression()
      if not peek() or peek().text != ")":
        raise ValueError("unbalanced")
      pos += 1
      return value
    raise ValueError("unexpected token")

  try:
    value = expression()
  except (ValueError, ZeroDivisionError):
    return None
  return value if pos == len(tokens) else None


def _close(a: Fraction, b: Fraction) -> bool:
  """Equal up to GSM8K's rounding of written results (two decimals, or 0.1% of the size)."""
  return abs(a - b) <= max(Fraction(1, 20), abs(a) / 1000, abs(b) / 1000)


def _decimals(number: str) -> int:
  return len(number.split(".")[1]) if "." in number else 0


def _format(value: Fraction, decimals: int) -> str:
  text = f"{float(value):.{decimals}f}"
  return "0" if text in ("-0", "-0.0") else text


def perturbed_numbers(number: str, rng: np.random.Generator) -> list[str]:
  """Other values for a written number ("1,200", "0.5") in random order: +-1, +-2, +5, +10, x2.

  Written with the number's decimals and no commas, duplicates and the number itself left out; a non-negative
  number's values are never negative. The first one is what a corruption or a wrong answer uses.
  """
  value = Fraction(number.replace(",", ""))
  candidates = [value + 1, value - 1, value + 2, value - 2, value + 5, value + 10, value * 2]
  texts = []
  for candidate in candidates:
    if candidate != value and (candidate >= 0 or value < 0):
      text = _format(candidate, _decimals(number))
      if text not in texts:
        texts.append(text)
  return [texts[k] for k in rng.permutation(len(texts))]


# ------------------------------------------------------------------------------------------------ corruption


@dataclasses.dataclass(frozen=True)
class _Equation:
  """A checkable calculation in a step: `lhs` tokens = `result`; `visible_*` are GSM8K's visible copies."""

  lhs: list[_Token]
  result: _Token
  span: tuple[int, int]  # the equation text (annotation content or the matched LaTeX/plain equation)
  visible_lhs: list[_Token] | None = None  # token for token the same calculation as lhs
  visible_result: _Token | None = None
  # False when a visible calculation is written but does not match lhs token for token: then only the result
  # may change (an operand or operator changed in one copy only would read inconsistent).
  copies_aligned: bool = True


@dataclasses.dataclass(frozen=True)
class Corruption:
  """A corrupted step and what changed in it, as a `<critic>` would name it."""

  text: str  # the corrupted step
  wrong: str  # the equation (or number) as corrupted
  right: str  # as it was


_ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>=]+)>>")
_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?|\.\d+")
_PLAIN_EQUATION = re.compile(
    r"(?<![\w.^_{}\\])(\d+(?:\.\d+)?(?:\s*(?:\\times|\\cdot|\\div|[-+*/×÷x])\s*\d+(?:\.\d+)?)+)\s*=\s*"
    r"(\d+(?:\.\d+)?)(?![\w^_{}]|\.\d)")
_ASY = re.compile(r"\[asy\].*?(?:\[/asy\]|\Z)", re.DOTALL)
_LOOSE_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w]|\.\d)")


def _visible_lhs(step: str, segment_start: int, annotation_start: int,
                 lhs: list[_Token]) -> tuple[list[_Token] | None, bool]:
  """The visible calculation written before `= <<` (e.g. "48/2 = ") and whether it matches the annotation's.

  Returns (tokens, True) when it matches, (None, True) when the text before the annotation (since the previous
  one) holds no number at all, (None, False) otherwise.
  """
  segment = step[segment_start:annotation_start]
  prefix = re.search(r"=\s*\$?\s*\Z", segment)
  if not prefix:
    return None, not re.search(r"\d", segment)
  end = segment_start + prefix.start()
  start = end
  while start > segment_start and (step[start - 1] in "0123456789.,+-*/x×÷()$ "):
    start -= 1
  while start < end and step[start] not in "0123456789($.":
    start += 1
  if start == end:
    return None, not re.search(r"\d", segment)
  visible = _tokenize(step, start, end, allow_x=True)
  if not visible or [t.kind for t in visible] != [t.kind for t in lhs]:
    return None, False
  for mine, theirs in zip(visible, lhs):
    if mine.kind == "number" and mine.value != theirs.value:
      return None, False
    if mine.kind == "op" and _OP_NAMES[mine.text] != _OP_NAMES[theirs.text]:
      return None, False
  return visible, True


def _equations(step: str) -> list[_Equation]:
  """The true, evaluable equations of a step: GSM8K annotations if any, else plain/LaTeX equations."""
  found = []
  segment_start = 0
  for match in _ANNOTATION.finditer(step):
    lhs = _tokenize(step, match.start(1), match.end(1), allow_x=False)
    result = _tokenize(step, match.start(2), match.end(2), allow_x=False)
    value = _evaluate(lhs) if lhs else None
    if value is not None and result and len(result) == 1 and result[0].kind == "number" and \
        _close(value, result[0].value):
      visible_result = _NUMBER.match(step, match.end())
      visible_token = None
      if visible_result and Fraction(visible_result.group().replace(",", "")) == result[0].value:
        visible_token = _Token("number", visible_result.group(), visible_result.start(), visible_result.end())
      visible_lhs, aligned = _visible_lhs(step, segment_start, match.start(), lhs)
      found.append(_Equation(lhs, result[0], (match.start(1), match.end(2)), visible_lhs, visible_token, aligned))
    segment_start = match.end()
  if segment_start:  # the step has annotations: its other numbers are visible copies, not equations
    return found
  for match in _PLAIN_EQUATION.finditer(step):
    lhs = _tokenize(step, match.start(1), match.end(1), allow_x=True)
    value = _evaluate(lhs) if lhs else None
    result = _Token("number", match.group(2), match.start(2), match.end(2))
    if value is not None and _close(value, result.value):
      found.append(_Equation(lhs, result, (match.start(1), match.end(2))))
  return found


def equation_texts(step: str) -> list[str]:
  """The step's true, checkable equations as written (for "48/2 = <<48/2=24>>24": ["48/2=24"]); GSM8K
  annotations when the step has any, else plain or LaTeX ones such as "3\\times 3=9"."""
  return [step[slice(*equation.span)] for equation in _equations(step)]


def _apply(text: str, edits: list[tuple[int, int, str]], start: int = 0, end: int | None = None) -> str:
  """text[start:end] with (absolute start, end, replacement) edits applied."""
  end = len(text) if end is None else end
  out, pos = [], start
  for a, b, replacement in sorted(edits):
    if start <= a and b <= end:
      out += [text[pos:a], replacement]
      pos = b
  return "".join(out) + text[pos:end]


def _corrupt_equation(step: str, equation: _Equation, rng: np.random.Generator) -> Corruption | None:
  numbers = [k for k, t in enumerate(equation.lhs) if t.kind == "number"]
  operators = [k for k, t in enumerate(equation.lhs) if t.kind == "op"]
  modes = ["result", "result"] + (["operand", "operator"] if equation.copies_aligned else [])
  for mode in [modes[k] for k in rng.permutation(len(modes))]:
    attempts: list[list[tuple[int, int, str]]] = []
    if mode == "result":
      for text in perturbed_numbers(equation.result.text, rng):
        if not _close(_evaluate(equation.lhs), Fraction(text)):
          edits = [(equation.result.start, equation.result.end, text)]
          if equation.visible_result:
            edits.append((equation.visible_result.start, equation.visible_result.end, text))
          attempts.append(edits)
    elif mode == "operand" and numbers:
      k = numbers[rng.integers(len(numbers))]
      for text in perturbed_numbers(equation.lhs[k].text, rng):
        value = _evaluate(equation.lhs, values={k: Fraction(text.replace(",", ""))})
        if value is not None and not _close(value, equation.result.value):
          edits = [(equation.lhs[k].start, equation.lhs[k].end, text)]
          if equation.visible_lhs:
            edits.append((equation.visible_lhs[k].start, equation.visible_lhs[k].end, text))
          attempts.append(edits)
    elif mode == "operator" and operators:
      k = operators[rng.integers(len(operators))]
      swapped = _SWAPPED[equation.lhs[k].text]
      value = _evaluate(equation.lhs, ops={k: swapped})
      if value is not None and not _close(value, equation.result.value):
        edits = [(equation.lhs[k].start, equation.lhs[k].end, swapped)]
        if equation.visible_lhs:
          visible = equation.visible_lhs[k]
          edits.append((visible.start, visible.end, _SWAPPED[visible.text]))
        attempts.append(edits)
    if attempts:
      edits = attempts[0]
      return Corruption(_apply(step, edits), wrong=_apply(step, edits, *equation.span),
                        right=step[equation.span[0]:equation.span[1]])
  return None


def corrupt(step: str, rng: np.random.Generator) -> Corruption | None:
  """`corrupt_step` with what changed: the equation as corrupted and as it was (or the number, when no equation
  could be made false)."""
  equations = _equations(step)
  for k in rng.permutation(len(equations)):
    corruption = _corrupt_equation(step, equations[k], rng)
    if corruption:
      return corruption
  # No checkable equation: change one number outside annotations and [asy] drawings.
  skipped = [m.span() for m in _ANNOTATION.finditer(step)] + [m.span() for m in _ASY.finditer(step)]
  numbers = [m for m in _LOOSE_NUMBER.finditer(step) if not any(a <= m.start() < b for a, b in skipped)]
  if not numbers:
    return None
  number = numbers[rng.integers(len(numbers))]
  text = perturbed_numbers(number.group(), rng)[0]
  return Corruption(_apply(step, [(number.start(), number.end(), text)]), wrong=text, right=number.group())


def corrupt_step(step: str, rng: np.random.Generator) -> str | None:
  """A wrong version of a step: one equation made false (result, an operand, or + <-> - / * <-> / changed,
  in a GSM8K `<<...>>` annotation and its visible copy alike), else one number changed; None when the step has
  no number (outside annotations and [asy] drawings)."""
  corruption = corrupt(step, rng)
  return corruption.text if corruption else None
