"""Token-level prompts equal the tokenizer's encoding of the text prompts (real SmolLM2 tokenizer)."""

import numpy as np
import pytest

from o1jax import pretrained, thoughts
from o1jax.prompt_tokens import PromptTokens

QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many?"
STEPS = [(0, "In May she sold 48/2=<<48/2=24>>24 clips.", -0.2),
         (2, " She points out: the total needs April too.", -1.4),
         (4, " So in total 48+24=<<48+24=72>>72. The answer is \\boxed{72}", -0.05)]


@pytest.fixture(scope="module")
def tokenizer(tiny_smollm2_checkpoint):
  return pretrained.load(tiny_smollm2_checkpoint, dtype="float32").tokenizer


def text_path():
  nodes = [thoughts.Node(parent=-1, index=0, meta="<problem>", text=QUESTION, rating=None)]
  for i, (meta, text, value) in enumerate(STEPS, start=1):
    nodes.append(thoughts.Node(parent=i - 1, index=i, meta=thoughts.meta_prefix(meta), text=text,
                               rating=thoughts.rating_token(value)))
  return nodes


def token_path(prompts, tokenizer):
  lines = [prompts.line(i - 1, i, meta, tokenizer.encode(text), value)
           for i, (meta, text, value) in enumerate(STEPS, start=1)]
  return prompts.path(prompts.root(tokenizer.encode(QUESTION)), lines)


@pytest.mark.parametrize("meta", range(len(thoughts.META_ACTIONS)))
def test_policy_prompt_ids_equal_the_encoded_text(tokenizer, meta):
  prompts = PromptTokens(tokenizer)
  hint = thoughts.hint(thoughts.meta_prefix(meta), ground_truth="72" if meta == 0 else None)
  text = thoughts.policy_prompt(text_path(), thoughts.meta_prefix(meta), new_index=7, hint_text=hint)
  ids = token_path(prompts, tokenizer) + prompts.policy_suffix(3, 7, meta, hint)
  assert ids == tokenizer.encode(text)


def test_rating_prompt_ids_equal_the_encoded_text(tokenizer):
  prompts = PromptTokens(tokenizer)
  step = " Half of 48 is 24, and 48+24=<<48+24=72>>72."
  node = thoughts.Node(parent=3, index=9, meta="<refine>", text=step, rating=None)
  text = thoughts.rating_prompt(text_path(), node)
  ids = token_path(prompts, tokenizer) + prompts.rating_suffix(3, 9, 3, tokenizer.encode(step))
  assert ids == tokenizer.encode(text)
  # The policy row of a hint-free child plus its step and <end_of_thought><start_of_rating> is the same prompt.
  policy = token_path(prompts, tokenizer) + prompts.policy_suffix(3, 9, 3, "") + tokenizer.encode(step)
  assert policy + [prompts.end_of_thought, prompts.start_of_rating] == ids


def test_clean_step_cuts_format_tokens(tokenizer):
  prompts = PromptTokens(tokenizer)
  ids = tokenizer.encode("It is 5.") + [prompts.ids["<critic>"]] + tokenizer.encode(" more")
  tokens, text = prompts.clean_step(ids)
  assert text == "It is 5." and list(tokens) == tokenizer.encode("It is 5.")
  # A format token spelled out of ordinary pieces: the step keeps the longest prefix without it.
  spelled = [t for piece in ("Then ", "<", "crit", "ic", ">", " no") for t in tokenizer.encode(piece)]
  tokens, text = prompts.clean_step(spelled)
  assert not thoughts.holds_format_token(text) and text.startswith("Then <crit") and ">" not in text
  assert isinstance(tokens, np.ndarray) and tokens.dtype == np.int32


def test_a_tokenizer_without_the_format_tokens_is_refused(tiny_smollm2_checkpoint):
  from models import hf_io
  from o1jax import tokenizer as tokenizer_lib
  plain = tokenizer_lib.for_model(hf_io.load_pretrained(tiny_smollm2_checkpoint))
  with pytest.raises(ValueError, match="no single ids for the format tokens"):
    PromptTokens(plain)
