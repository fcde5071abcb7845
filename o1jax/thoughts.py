"""The LLaMA-O1 (OpenLongCoT) text format: nodes, hints, meta actions and rating tokens.

A reasoning tree is written as a sequence of nodes, each one header, one thought and (optionally) one rating:

  <start_of_father_id>{parent}<end_of_father_id><start_of_local_id>{index}<end_of_local_id>
  <start_of_thought>{meta}{text}<end_of_thought><start_of_rating>{rating}<end_of_rating>

(one line in the text; broken here for width). The OpenLongCoT-Pretrain record for GSM8K "Felix drives twice as
fast" starts like this (nodes joined by one space; the root has no rating block):

  <start_of_father_id>-1<end_of_father_id><start_of_local_id>0<end_of_local_id><start_of_thought><problem>The
  average speed ... will he cover? <end_of_thought> <start_of_father_id>0<end_of_father_id><start_of_local_id>1
  <end_of_local_id><start_of_thought>Since Felix ... 2*66=<<2*66=132>>132 miles per hour. <end_of_thought>
  <start_of_rating><positive_rating><end_of_rating> ...

`parse` turns such a text into `Node`s and `serialize` writes them back byte for byte: a node keeps the exact
text of its thought (leading and trailing spaces included), whether it had a rating block, and the separator
written before it (whitespace, possibly holding one `<hint>...</hint>` block).

Prompts (LLaMA-O1's `policy_head_template` / `value_head_template`, rating tokens instead of its value rounding):

  policy_prompt:  {root}\\n{node 1}\\n...\\n{selected node}{hint}\\n<start_of_father_id>{selected index}
                  <end_of_father_id><start_of_local_id>{new index}<end_of_local_id><start_of_thought>{meta}
    The model continues with the thought and stops at `<end_of_thought>` (`parse_step` checks what it wrote).
  rating_prompt:  {root}\\n...\\n{parent}\\n<start_of_father_id>{parent index}<end_of_father_id>
                  <start_of_local_id>{index}<end_of_local_id><start_of_thought>{meta}{text}<end_of_thought>
                  <start_of_rating>
    The value is read from the next-token logits there: log-softmax over `<positive_rating>` and
    `<negative_rating>` only; value = log p(positive) <= 0.

The path nodes are written as they are (the root carries no rating unless given one); the hint sits right after
the last path node, as in LLaMA-O1, and the new node follows on its own line. A prompt plus a generated thought,
`<end_of_thought>` and an optional rating block is again a text that `parse` accepts.

Legend: parent/father id = the local id of the parent node (-1 for the root); local id / index = the node's id,
unique in a tree; meta = the meta action written as a prefix of the thought ("" = plain expansion); rating = one
of the three rating tokens; value = log p(positive rating).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

# Every token of the format, each a single id in every tokenizer the project uses (see o1jax/tokenizer.py).
# The order is the order in which they are appended to a vocabulary: do not reorder.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<start_of_father_id>", "<end_of_father_id>",
    "<start_of_local_id>", "<end_of_local_id>",
    "<start_of_thought>", "<end_of_thought>",
    "<start_of_rating>", "<end_of_rating>",
    "<positive_rating>", "<negative_rating>", "<unknown_rating>",
    "<problem>", "<critic>", "<refine>", "<conclusion>",
    "<hint>", "</hint>",
)

START_FATHER, END_FATHER, START_LOCAL, END_LOCAL = SPECIAL_TOKENS[0:4]
START_THOUGHT, END_THOUGHT, START_RATING, END_RATING = SPECIAL_TOKENS[4:8]
POSITIVE_RATING, NEGATIVE_RATING, UNKNOWN_RATING = SPECIAL_TOKENS[8:11]
RATING_TOKENS: tuple[str, ...] = (POSITIVE_RATING, NEGATIVE_RATING, UNKNOWN_RATING)
RATING_LABELS: dict[str, str] = {"positive": POSITIVE_RATING, "negative": NEGATIVE_RATING, "unknown": UNKNOWN_RATING}
HINT_OPEN, HINT_CLOSE = "<hint>", "</hint>"

# Meta actions; index 0 (plain expansion) is written as no prefix at all.
META_ACTIONS: tuple[str, ...] = ("<expansion>", "<problem>", "<critic>", "<refine>", "<conclusion>")
META_PREFIXES: tuple[str, ...] = ("",) + META_ACTIONS[1:]

# Separators: the pretraining text joins nodes with a space; prompts put one node per line.
NODE_SEPARATOR = " "
PROMPT_SEPARATOR = "\n"

# LLaMA-O1's hints, verbatim (`\\box{answer}` and "can got" included: the base model was trained on these).
GROUND_TRUTH_HINT = "<hint> Try generate a reasonable rationale solution that can got final answer {GT}</hint>"
CRITIC_HINT = "<hint> Point out the potential flaws in the current solution. </hint>"
REFINE_HINT = "<hint> Try to refine the current solution for higher quality. </hint>"
CONCLUSION_HINT = ("<hint> Try to summarize the current solution and draw a conclusion. Final answer should "
                   "bracket in \\box{answer} </hint>")
DIVIDE_AND_CONQUER_HINT = ("<hint> Try divide the problem into smaller easier sub-problems and solve them "
                           "divide-and-conquer. </hint>")

_SPECIAL = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_INTEGER = re.compile(r"-?[0-9]+\Z")
_TAG = re.compile(r"<[^<>\s]{1,40}>")
_SEPARATOR = re.compile(r"\s*(?:<hint>(?P<hint_body>(?:(?!<hint>|</hint>).)*)</hint>\s*)?\Z", re.DOTALL)


def holds_format_token(text: str) -> bool:
  """Whether text holds any of SPECIAL_TOKENS (a node's thought may not)."""
  return _SPECIAL.search(text) is not None


class ThoughtFormatError(ValueError):
  """Text that does not follow the LLaMA-O1 node format (the message names the character position)."""


@dataclasses.dataclass(frozen=True)
class Node:
  """One node of a reasoning tree as written in text.

  Attributes:
    parent: local id of the parent node; -1 for the root.
    index: this node's local id (>= 0, unique in the tree).
    meta: the meta-action prefix of the thought: "" (plain expansion), "<problem>", "<critic>", "<refine>" or
      "<conclusion>".
    text: the thought after the prefix, whitespace kept exactly.
    rating: one of RATING_TOKENS, or None when the node has no rating block (the root of a pretraining record).
    separator: what is written between the previous node and this one: whitespace, possibly holding one
      `<hint>...</hint>` block. Not written for the first node of a list.
  """

  parent: int
  index: int
  meta: str
  text: str
  rating: str | None
  separator: str = NODE_SEPARATOR

  def __post_init__(self):
    if self.parent < -1 or self.index < 0:
      raise ValueError(f"node ids parent={self.parent}, index={self.index}: expected parent >= -1 and index >= 0.")
    if self.meta not in META_PREFIXES:
      raise ValueError(f"node {self.index}: meta {self.meta!r} is not one of {META_PREFIXES}.")
    if self.rating is not None and self.rating not in RATING_TOKENS:
      raise ValueError(f"node {self.index}: rating {self.rating!r} is not one of {RATING_TOKENS} or None.")
    found = _SPECIAL.search(self.text)
    if found:
      raise ValueError(f"node {self.index}: its text holds the format token {found.group()!r} at character "
                       f"{found.start()}; a thought holds no format tokens.")
    if not self.meta and self.text.startswith("<expansion>"):
      raise ValueError(f"node {self.index}: text starts with '<expansion>'; plain expansion is written with no "
                       "prefix.")
    separator = _SEPARATOR.match(self.separator)
    if not separator or (separator.group("hint_body") and _SPECIAL.search(separator.group("hint_body"))):
      raise ValueError(f"node {self.index}: separator {self.separator!r} must be whitespace with at most one "
                       "'<hint>...</hint>' block (no format tokens inside it).")

  @property
  def hint(self) -> str:
    """The `<hint>...</hint>` block in the separator before this node, or ""."""
    start = self.separator.find(HINT_OPEN)
    return self.separator[start:self.separator.index(HINT_CLOSE) + len(HINT_CLOSE)] if start >= 0 else ""

  @property
  def thought(self) -> str:
    """The thought as written between `<start_of_thought>` and `<end_of_thought>`: meta prefix + text."""
    return self.meta + self.text


# ---------------------------------------------------------------------------------------------- serialization


def header(parent: int, index: int) -> str:
  """The ids part of a node, up to and including `<start_of_thought>`."""
  return f"{START_FATHER}{parent}{END_FATHER}{START_LOCAL}{index}{END_LOCAL}{START_THOUGHT}"


def rating_block(rating: str) -> str:
  return f"{START_RATING}{rating}{END_RATING}"


def node_string(node: Node) -> str:
  """One node without its separator."""
  out = header(node.parent, node.index) + node.thought + END_THOUGHT
  return out + rating_block(node.rating) if node.rating is not None else out


def serialize(nodes: Sequence[Node]) -> str:
  """Writes nodes as text (the inverse of `parse`); the first node's separator is not written.

  Raises:
    ValueError: the nodes do not form one tree in writing order (the first node a root, every other parent an
      earlier local id, local ids unique), so the text would not parse back.
  """
  seen: set[int] = set()
  parts = []
  for position, node in enumerate(nodes):
    if position == 0 and node.parent != -1:
      raise ValueError(f"the first node (id {node.index}) has parent {node.parent}; expected -1 (the root).")
    if position > 0 and node.parent not in seen:
      raise ValueError(f"node {node.index} (position {position}) has parent {node.parent}, which is not the id "
                       f"of an earlier node; parents must come first.")
    if node.index in seen:
      raise ValueError(f"local id {node.index} appears twice (again at position {position}).")
    seen.add(node.index)
    if position > 0:
      parts.append(node.separator)
    parts.append(node_string(node))
  return "".join(parts)


# ---------------------------------------------------------------------------------------------------- parsing


def _found(text: str, pos: int) -> str:
  """What stands at `pos`, for error messages."""
  if pos >= len(text):
    return "end of text"
  tag = _TAG.match(text, pos)
  if tag:
    return repr(tag.group())
  snippet = text[pos:pos + 20]
  return repr(snippet + ("..." if pos + 20 < len(text) else ""))


def _expect(text: str, pos: int, token: str, where: str) -> int:
  if not text.startswith(token, pos):
    raise ThoughtFormatError(f"at character {pos}: expected {token!r} {where}, found {_found(text, pos)}.")
  return pos + len(token)


def _read_id(text: str, pos: int, what: str, end_token: str) -> tuple[int, int]:
  """Reads an integer id at pos that ends at `end_token`; returns (id, position after end_token)."""
  stop = text.find("<", pos)
  if stop < 0:
    raise ThoughtFormatError(f"at character {pos}: expected the {what} and {end_token!r}, found end of text.")
  digits = text[pos:stop]
  if not _INTEGER.match(digits):
    raise ThoughtFormatError(f"at character {pos}: expected an integer {what}, found {digits!r}.")
  return int(digits), _expect(text, stop, end_token, f"after the {what}")


def parse(text: str) -> list[Node]:
  """Parses a text of nodes (a pretraining record, a tree export, or a prompt plus its continuation).

  Returns:
    The nodes in text order; `serialize(parse(text)) == text`.

  Raises:
    ThoughtFormatError: naming the character position and what was expected there.
  """
  nodes: list[Node] = []
  seen: set[int] = set()
  pos = 0
  while True:
    separator_start = pos
    if nodes:  # whitespace, at most one hint, whitespace
      while pos < len(text) and text[pos].isspace():
        pos += 1
      if text.startswith(HINT_OPEN, pos):
        body_start = pos + len(HINT_OPEN)
        inner = _SPECIAL.search(text, body_start)
        if not inner or inner.group() != HINT_CLOSE:
          found = repr(inner.group()) if inner else "end of text"
          at = inner.start() if inner else len(text)
          raise ThoughtFormatError(f"at character {at}: expected '</hint>' to close the hint opened at character "
                                   f"{pos}, found {found}.")
        pos = inner.end()
        while pos < len(text) and text[pos].isspace():
          pos += 1
    if not nodes and not text:
      raise ThoughtFormatError(f"at character 0: expected {START_FATHER!r} to open the root node, found end of text.")
    node_start = pos
    pos = _expect(text, pos, START_FATHER, "to open a node" if nodes else "to open the root node")
    parent, pos = _read_id(text, pos, "father id", END_FATHER)
    if not nodes and parent != -1:
      raise ThoughtFormatError(f"at character {len(START_FATHER)}: expected father id -1 for the root node, found "
                               f"{parent}.")
    if nodes and parent not in seen:
      raise ThoughtFormatError(f"at character {node_start + len(START_FATHER)}: father id {parent} is not the "
                               f"local id of an earlier node.")
    pos = _expect(text, pos, START_LOCAL, "after the father id")
    index_at = pos
    index, pos = _read_id(text, pos, "local id", END_LOCAL)
    if index < 0:
      raise ThoughtFormatError(f"at character {index_at}: expected a non-negative local id, found {index}.")
    if index in seen:
      raise ThoughtFormatError(f"at character {index_at}: local id {index} was already used by an earlier node.")
    pos = _expect(text, pos, START_THOUGHT, "after the local id")
    thought_start = pos
    meta = next((m for m in META_PREFIXES[1:] if text.startswith(m, pos)), "")
    if text.startswith("<expansion>", pos):
      raise ThoughtFormatError(f"at character {pos}: expected a meta action among {META_PREFIXES[1:]} or none, "
                               "found '<expansion>' (plain expansion is written with no prefix).")
    pos += len(meta)
    close = _SPECIAL.search(text, pos)
    if not close or close.group() != END_THOUGHT:
      at = close.start() if close else len(text)
      raise ThoughtFormatError(f"at character {at}: expected '<end_of_thought>' to close the thought opened at "
                               f"character {thought_start}, found {repr(close.group()) if close else 'end of text'}.")
    body = text[pos:close.start()]
    pos = close.end()
    rating = None
    if text.startswith(START_RATING, pos):
      pos += len(START_RATING)
      rating = next((r for r in RATING_TOKENS if text.startswith(r, pos)), None)
      if rating is None:
        raise ThoughtFormatError(f"at character {pos}: expected one of {RATING_TOKENS} after '<start_of_rating>', "
                                 f"found {_found(text, pos)}.")
      pos = _expect(text, pos + len(rating), END_RATING, "after the rating")
    separator = text[separator_start:node_start] if nodes else NODE_SEPARATOR
    nodes.append(Node(parent=parent, index=index, meta=meta, text=body, rating=rating, separator=separator))
    seen.add(index)
    if pos == len(text):
      return nodes


def parse_step(generated: str) -> str:
  """Checks a sampled continuation of a policy prompt; returns the thought text without `<end_of_thought>`.

  Raises:
    ThoughtFormatError: the continuation does not end with `<end_of_thought>`, or holds another format token.
  """
  found = _SPECIAL.search(generated)
  if found and found.group() != END_THOUGHT:
    raise ThoughtFormatError(f"at character {found.start()}: expected the step text and '<end_of_thought>', found "
                             f"{found.group()!r} (a step holds no format tokens).")
  if not found:
    raise ThoughtFormatError(f"at character {len(generated)}: expected '<end_of_thought>' to end the step, found "
                             "end of text.")
  if found.end() != len(generated):
    raise ThoughtFormatError(f"at character {found.end()}: expected end of text after '<end_of_thought>', found "
                             f"{_found(generated, found.end())}.")
  return generated[:found.start()]


# ------------------------------------------------------------------------------------------------------ paths


def path_to(nodes: Sequence[Node], index: int) -> list[Node]:
  """The root-to-node path (root first) of the node with local id `index` in a tree's node list."""
  by_id = {node.index: node for node in nodes}
  if index not in by_id:
    raise ValueError(f"no node with local id {index}; the tree has ids {sorted(by_id)}.")
  path = [by_id[index]]
  while path[-1].parent != -1:
    if path[-1].parent not in by_id or len(path) > len(by_id):
      raise ValueError(f"node {path[-1].index} has parent {path[-1].parent}, which does not lead back to a root.")
    path.append(by_id[path[-1].parent])
  return path[::-1]


def _prompt_path(path: Sequence[Node]) -> list[Node]:
  if not path:
    raise ValueError("the path is empty; expected the root-to-node path, root first.")
  if path[0].parent != -1:
    raise ValueError(f"the path starts at node {path[0].index} with parent {path[0].parent}; expected the root "
                     "(parent -1).")
  for previous, node in zip(path, path[1:]):
    if node.parent != previous.index:
      raise ValueError(f"node {node.index} has parent {node.parent} but follows node {previous.index} in the "
                       "path; expected a root-to-node chain.")
  return [dataclasses.replace(node, separator=PROMPT_SEPARATOR) for node in path]


def _check_new_index(path: Sequence[Node], new_index: int):
  used = {node.index for node in path}
  if new_index < 0 or new_index in used:
    raise ValueError(f"new node id {new_index} must be >= 0 and not already in the path (ids {sorted(used)}).")


def policy_prompt(path: Sequence[Node], meta: str, new_index: int, hint_text: str | None = None) -> str:
  """The text the policy continues to write a new child of `path[-1]`.

  Args:
    path: root-to-node nodes, root first; the new node's parent is path[-1].
    meta: the new node's meta action ("" or "<expansion>" for plain expansion, or a META_ACTIONS prefix).
    new_index: the new node's local id (not in the path; LLaMA-O1 uses the tree's largest id + 1).
    hint_text: the `<hint>...</hint>` block; None uses `hint(meta)` (no ground truth), "" writes no hint.

  Returns:
    path (one node per line) + hint + "\\n" + the new header + `<start_of_thought>` + meta.
  """
  meta = meta_prefix(meta_index(meta))
  nodes = _prompt_path(path)
  _check_new_index(path, new_index)
  hint_text = hint(meta) if hint_text is None else hint_text
  if not _SEPARATOR.match(hint_text + PROMPT_SEPARATOR) or (hint_text and not hint_text.startswith(HINT_OPEN)):
    raise ValueError(f"hint_text {hint_text!r} must be '' or one '<hint>...</hint>' block without format tokens.")
  new = Node(parent=path[-1].index, index=new_index, meta=meta, text="", rating=None,
             separator=hint_text + PROMPT_SEPARATOR)  # validates the hint body
  return serialize(nodes) + new.separator + header(new.parent, new.index) + meta


def rating_prompt(path: Sequence[Node], node: Node) -> str:
  """The text after which the value of `node` (a child of path[-1]) is read: ends in `<start_of_rating>`."""
  nodes = _prompt_path(path)
  if node.parent != path[-1].index:
    raise ValueError(f"node {node.index} has parent {node.parent}; expected the last path node {path[-1].index}.")
  _check_new_index(path, node.index)
  rated = dataclasses.replace(node, rating=None, separator=PROMPT_SEPARATOR)
  return serialize(nodes + [rated]) + START_RATING


# ------------------------------------------------------------------------------------------ ratings and metas


def rating_token(value_or_label: float | bool | str | None) -> str:
  """The rating token for a value (log p(positive) <= 0), a bool (correct?), a label, or None (unknown).

  Values follow LLaMA-O1: p(positive) >= 0.5 is positive, below is negative.
  """
  if value_or_label is None:
    return UNKNOWN_RATING
  if isinstance(value_or_label, bool):
    return POSITIVE_RATING if value_or_label else NEGATIVE_RATING
  if isinstance(value_or_label, str):
    if value_or_label in RATING_LABELS:
      return RATING_LABELS[value_or_label]
    if value_or_label in RATING_TOKENS:
      return value_or_label
    raise ValueError(f"rating label {value_or_label!r}; expected one of {sorted(RATING_LABELS)} or a rating token.")
  value = float(value_or_label)
  if math.isnan(value) or value > 1e-6:
    raise ValueError(f"rating value {value_or_label!r}; expected log p(positive), a number <= 0.")
  return POSITIVE_RATING if value >= math.log(0.5) else NEGATIVE_RATING


def rating_label(token: str) -> str:
  """"positive", "negative" or "unknown" for a rating token."""
  for label, known in RATING_LABELS.items():
    if token == known:
      return label
  raise ValueError(f"rating token {token!r}; expected one of {RATING_TOKENS}.")


def meta_index(meta: str) -> int:
  """Index of a meta action in META_ACTIONS; "" and "<expansion>" are both plain expansion (0)."""
  if meta == "":
    return 0
  if meta not in META_ACTIONS:
    raise ValueError(f"meta action {meta!r}; expected '' or one of {META_ACTIONS}.")
  return META_ACTIONS.index(meta)


def meta_prefix(index: int) -> str:
  """The prefix written in a thought for META_ACTIONS[index] ("" for plain expansion)."""
  if not 0 <= index < len(META_ACTIONS):
    raise ValueError(f"meta action index {index}; expected 0..{len(META_ACTIONS) - 1}.")
  return META_PREFIXES[index]


# ------------------------------------------------------------------------------------------------------ hints


def hint(meta: str, ground_truth: str | None = None, *, llama_o1_compat: bool = False) -> str:
  """The hint block placed before a new node with meta action `meta` ("" when there is none).

  o1jax: `<problem>` gets the divide-and-conquer hint, `<critic>` the critic hint, `<refine>` the refine hint,
  `<conclusion>` the conclusion hint, and a plain expansion the ground-truth hint only when `ground_truth` is
  given (self-play), else no hint. With `llama_o1_compat`, as LLaMA-O1's `compute_policy_head`: `<conclusion>`
  gets the critic hint and a plain expansion always the ground-truth hint.
  """
  index = meta_index(meta)
  if index == 0:
    if ground_truth is None:
      if llama_o1_compat:
        raise ValueError("llama_o1_compat gives a plain expansion the ground-truth hint; ground_truth is None.")
      return ""
    ground_truth = str(ground_truth)
    found = _SPECIAL.search(ground_truth)
    if found:
      raise ValueError(f"ground truth {ground_truth!r} holds the format token {found.group()!r}.")
    return GROUND_TRUTH_HINT.format(GT=ground_truth)
  if META_ACTIONS[index] == "<conclusion>" and llama_o1_compat:
    return CRITIC_HINT
  return {"<problem>": DIVIDE_AND_CONQUER_HINT, "<critic>": CRITIC_HINT, "<refine>": REFINE_HINT,
          "<conclusion>": CONCLUSION_HINT}[META_ACTIONS[index]]
