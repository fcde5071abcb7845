"""Final-answer extraction from model and reference text."""

from __future__ import annotations

import re


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


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
  """The last number in text, thousands separators removed; None when there is none."""
  numbers = _NUMBER.findall(text)
  return numbers[-1].replace(",", "").rstrip(".") if numbers else None
