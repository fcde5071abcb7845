"""LLaMA-O1 prompts as token ids, assembled from pieces: a node's step is never re-tokenized from its text.

The search keeps every node's step as the token ids the sampler drew. A policy prompt is the root-to-node path
(one node per line), the new node's hint and its header; a rating prompt is the path and the rated node's line up
to `<start_of_rating>` (see o1jax/thoughts.py for the text layout). Both are built here by concatenating the ids of
their pieces:

  prompts = PromptTokens(tokenizer)
  path = prompts.path(question_ids, [prompts.line(parent, index, meta, step_ids, value), ...])
  policy = path + prompts.policy_suffix(parent=3, index=7, meta=2, hint=thoughts.CRITIC_HINT)
  rating = path + prompts.rating_suffix(parent=3, index=7, meta=2, step=step_ids)

Why concatenation equals tokenizing the whole text: every format token is a single id that both tokenizers match
before anything else runs (o1jax/tokenizer.py), so the text is cut at them first and each stretch between two
format tokens is encoded on its own. Every piece here starts or ends at a format token (numbers between the id
tokens, "\\n" between `<end_of_rating>` and `<start_of_father_id>`, a hint between `<hint>` and `</hint>`), so
the ids of the pieces are the ids of the text: `tests/o1jax/test_prompt_tokens.py` checks it against
`tokenizer.encode(thoughts.policy_prompt(...))` with the real SmolLM2 tokenizer. The one difference is on
purpose: a step's ids are the ones the model sampled, which need not be the tokenizer's own (canonical)
segmentation of the step's text.

Ratings on the path are written from each node's rated value (`thoughts.rating_token`); the root carries none, as
in the pretraining records.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from o1jax import thoughts
from o1jax.tokenizer import Tokenizer


class PromptTokens:
  """Token-level prompt pieces for one tokenizer (every format token a single id)."""

  def __init__(self, tokenizer: Tokenizer):
    ids = {token: tokenizer.token_to_id(token) for token in thoughts.SPECIAL_TOKENS}
    missing = [token for token, i in ids.items() if i is None]
    if missing:
      raise ValueError(f"the tokenizer has no single ids for the format tokens {missing}; load the model through "
                       "o1jax.pretrained.load (it adds them).")
    self.tokenizer = tokenizer
    self.ids = ids
    self.special_ids = frozenset(ids.values())
    self.end_of_thought = ids[thoughts.END_THOUGHT]
    self.start_of_rating = ids[thoughts.START_RATING]
    self.positive = ids[thoughts.POSITIVE_RATING]
    self.negative = ids[thoughts.NEGATIVE_RATING]
    self.newline = tuple(tokenizer.encode(thoughts.PROMPT_SEPARATOR))

  @functools.lru_cache(maxsize=4096)
  def _text(self, text: str) -> tuple[int, ...]:
    return tuple(self.tokenizer.encode(text)) if text else ()

  def header(self, parent: int, index: int) -> list[int]:
    """`<start_of_father_id>{parent}<end_of_father_id><start_of_local_id>{index}<end_of_local_id><start_of_thought>`."""
    i = self.ids
    return ([i[thoughts.START_FATHER], *self._text(str(parent)), i[thoughts.END_FATHER], i[thoughts.START_LOCAL],
             *self._text(str(index)), i[thoughts.END_LOCAL], i[thoughts.START_THOUGHT]])

  def meta(self, meta: int) -> list[int]:
    """The meta-action prefix of a thought (none for a plain expansion)."""
    prefix = thoughts.meta_prefix(meta)
    return [self.ids[prefix]] if prefix else []

  def root(self, question: Sequence[int]) -> list[int]:
    """The root line: header(-1, 0) `<problem>` question `<end_of_thought>` (no rating)."""
    return self.header(-1, 0) + [self.ids["<problem>"], *map(int, question), self.end_of_thought]

  def line(self, parent: int, index: int, meta: int, step: Sequence[int], value: float | None) -> list[int]:
    """A path node's line: header, meta, step, `<end_of_thought>`, and its rating block when value is not None."""
    out = self.header(parent, index) + self.meta(meta) + [*map(int, step), self.end_of_thought]
    if value is not None:
      out += [self.start_of_rating, self.ids[thoughts.rating_token(float(min(value, 0.0)))],
              self.ids[thoughts.END_RATING]]
    return out

  def path(self, root: Sequence[int], lines: Sequence[Sequence[int]]) -> list[int]:
    """The root line's ids and the other lines, joined by "\\n" (`root` from `root()`)."""
    out = list(root)
    for line in lines:
      out += [*self.newline, *line]
    return out

  def policy_suffix(self, parent: int, index: int, meta: int, hint: str) -> list[int]:
    """What follows the path in a policy prompt: the hint block (may be ""), "\\n", the header and the meta."""
    return [*self._text(hint), *self.newline] + self.header(parent, index) + self.meta(meta)

  def rating_suffix(self, parent: int, index: int, meta: int, step: Sequence[int]) -> list[int]:
    """What follows the path in a rating prompt (no hint): "\\n", the node's line, `<start_of_rating>`."""
    return [*self.newline] + self.line(parent, index, meta, step, None) + [self.start_of_rating]

  def clean_step(self, tokens: Sequence[int]) -> tuple[np.ndarray, str]:
    """A sampled step's ids cut before the first format token, and their text.

    The sampler stops at any format token, so one can only be the last id; but a step may also spell a format
    token out of ordinary pieces ("<" "critic" ">"), which would turn into the format token when the text is read
    back. Such a step is cut where that spelling begins (the longest prefix whose text holds no format token).
    """
    ids = [int(t) for t in tokens]
    cut = next((j for j, t in enumerate(ids) if t in self.special_ids), len(ids))
    ids = ids[:cut]
    text = self.tokenizer.decode(ids)
    if thoughts.holds_format_token(text):
      while ids and thoughts.holds_format_token(text):
        ids.pop()
        text = self.tokenizer.decode(ids)
    return np.asarray(ids, np.int32), text
