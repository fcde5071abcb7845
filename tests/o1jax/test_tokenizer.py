"""The tokenizer protocol on SmolLM2's real byte-level BPE and on a tiny Gemma-like sentencepiece model: the LLaMA-O1
tokens are single ids anywhere in the text, ordinary text encodes as before, the grown model keeps its old rows,
and transformers loads the export (model and tokenizer) with the same ids."""

import io
import json
import os
import re

import gguf
import jax
import numpy as np
import pytest
import sentencepiece
import transformers
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from models import decoder, gguf_io, hf_io, presets
from o1jax import tokenizer as tokenizer_lib
from o1jax.thoughts import SPECIAL_TOKENS

# The OpenLongCoT-Pretrain example (GSM8K "Felix"), as in shared/seeds/000: nodes separated by a space.
FELIX = (
    "<start_of_father_id>-1<end_of_father_id><start_of_local_id>0<end_of_local_id><start_of_thought><problem>The "
    "average speed for an hour drive is 66 miles per hour. If Felix wanted to drive twice as fast for 4 hours, how "
    "many miles will he cover? <end_of_thought> <start_of_father_id>0<end_of_father_id><start_of_local_id>1"
    "<end_of_local_id><start_of_thought>Since Felix wants to drive twice as fast, he will drive at 2*66=<<2*66=132>>"
    "132 miles per hour. <end_of_thought><start_of_rating><positive_rating><end_of_rating> <start_of_father_id>1"
    "<end_of_father_id><start_of_local_id>2<end_of_local_id><start_of_thought> If he drives for 4 hours, he will "
    "have driven for 4*132=<<4*132=528>>528 miles. <end_of_thought><start_of_rating><positive_rating>"
    "<end_of_rating> <start_of_father_id>1<end_of_father_id><start_of_local_id>3<end_of_local_id>"
    "<start_of_thought><critic> Felix wants to drive twice as fast as his original speed of 66 miles per hour. "
    "Multiplying 66 by 2 gives 132 miles per hour. This calculation is correct.<end_of_thought><start_of_rating>"
    "<unknown_rating><end_of_rating>")
NODE_LINE = ("<start_of_father_id>1<end_of_father_id><start_of_local_id>4<end_of_local_id><start_of_thought>"
             "<critic> If Felix drives at 132 miles per hour for 4 hours, the total distance he covers can be "
             "calculated by multiplying his speed by the time. 132 miles per hour * 4 hours = 528 miles. This "
             "calculation is correct.<end_of_thought><start_of_rating><unknown_rating><end_of_rating>")
# The other tokens (meta actions, hint brackets, negative rating) with non-ASCII text for the byte fallback.
OTHER_LINE = ("<hint>Check the last step.</hint><start_of_father_id>2<end_of_father_id><start_of_local_id>5"
              "<end_of_local_id><start_of_thought><refine>Félix fährt 2×66=132 km/h.<end_of_thought>"
              "<start_of_rating><negative_rating><end_of_rating>\n<start_of_thought><conclusion>  528 <end_of_thought>")

# Training text for the tiny sentencepiece model: a few hundred words of grade-school word problems.
CORPUS = """\
The average speed for an hour drive is 66 miles per hour. If Felix wanted to drive twice as fast for 4 hours,
how many miles will he cover? Since Felix wants to drive twice as fast, he will drive at 132 miles per hour.
If he drives for 4 hours, he will have driven for 528 miles. This calculation is correct.
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May? She sold 24 clips in May, so 72 in total.
Weng earns 12 dollars an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.
How much did she earn? She earns 0.2 dollars per minute, so she earned 10 dollars.
Betty is saving money for a new wallet which costs 100 dollars. Betty has only half of the money she needs.
Her parents decided to give her 15 dollars for that purpose, and her grandparents twice as much as her parents.
How much more money does Betty need to buy the wallet? In the beginning, Betty has only 50 dollars.
Her grandparents gave her 30 dollars. This means Betty needs 5 more dollars.
James writes a 3 page letter to 2 different friends twice a week. How many pages does he write a year?
He writes each friend 6 pages a week, so he writes 12 pages every week. That means he writes 624 pages a year.
Mark has a garden with flowers. He planted plants of three different colors in it. Ten of them are yellow,
and there are 80 percent more of those in purple. There are only 25 percent as many green flowers as there
are yellow and purple flowers. How many flowers does Mark have in his garden? The answer is 35.
Albert is wondering how much pizza he can eat in one day. He buys 2 large pizzas and 2 small pizzas.
A large pizza has 16 slices and a small pizza has 8 slices. If he eats it all, how many pieces does he eat?
Let us check each step again and refine the reasoning before we write the conclusion of the problem.
The critic reads the thought, rates it as positive or negative, and the search keeps the better child.
"""


def _train_sentencepiece(add_dummy_prefix: bool) -> bytes:
  """A Gemma-like model: BPE with byte fallback, digits split, identity normalization, pad/eos/bos/unk = 0/1/2/3."""
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS.splitlines()), model_writer=model, vocab_size=400, model_type="bpe",
      byte_fallback=True, split_digits=True, add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=False,
      normalization_rule_name="identity", character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      minloglevel=2)
  return model.getvalue()


@pytest.fixture(scope="module")
def smollm2_files(smollm2_gguf_path):
  """SmolLM2's tokenizer files, rebuilt from the GGUF metadata once for the module (the reader takes seconds)."""
  return gguf_io.tokenizer_files_from_gguf(gguf.GGUFReader(smollm2_gguf_path), smollm2_gguf_path)


@pytest.fixture(scope="module")
def sentencepiece_files():
  return {"tokenizer.model": _train_sentencepiece(add_dummy_prefix=False)}


# (files fixture, vocabulary size, BOS id, EOS ids) written down from SmolLM2's model card and the trainer call.
BACKENDS = {
    "smollm2": ("smollm2_files", 49_152, 1, (2,)),
    "sentencepiece": ("sentencepiece_files", 400, 2, (1,)),
}


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request):
  files_fixture, size, bos, eos = BACKENDS[request.param]
  base = tokenizer_lib.from_files(request.getfixturevalue(files_fixture))
  return request.param, base, size, bos, eos


def split_at_specials(text: str) -> list[str]:
  """text cut before and after every special token (the tokens are their own items)."""
  pattern = "(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")"
  return [part for part in re.split(pattern, text) if part]


def reference_ids(base, text: str) -> list[int]:
  """What the grown tokenizer must produce: each special its new id (hand-numbered in SPECIAL_TOKENS order after
  the base vocabulary), the text between them as the base tokenizer encodes it."""
  ids = []
  for part in split_at_specials(text):
    if part in SPECIAL_TOKENS:
      ids.append(base.vocab_size + SPECIAL_TOKENS.index(part))
    else:
      ids.extend(base.encode(part))
  return ids


# --- the protocol -----------------------------------------------------------------------------------------------

def test_base_tokenizer(backend):
  name, base, size, bos, eos = backend
  assert isinstance(base, tokenizer_lib.Tokenizer)
  assert isinstance(base, tokenizer_lib.HFTokenizer if name == "smollm2" else tokenizer_lib.SentencePieceTokenizer)
  assert (base.vocab_size, base.bos_id, base.eos_ids) == (size, bos, eos)
  assert len(base.vocab()) == size
  assert all(base.token_to_id(t) is None for t in SPECIAL_TOKENS)
  ids = base.encode("Felix drives 66 miles.")
  assert 0 < len(ids) and bos not in ids
  assert base.encode("Felix drives 66 miles.", add_bos=True) == [bos] + ids
  assert base.id_to_token(size) is None and base.id_to_token(bos) is not None
  assert base.token_to_id(base.id_to_token(bos)) == bos


def test_every_special_token_is_one_id(backend):
  _, base, size, _, _ = backend
  tok = base.with_special_tokens(SPECIAL_TOKENS)
  assert tok.vocab_size == size + len(SPECIAL_TOKENS) == size + 17
  for i, t in enumerate(SPECIAL_TOKENS):
    id = size + i
    assert tok.token_to_id(t) == id and tok.id_to_token(id) == t
    assert tok.encode(t) == [id], t
    assert tok.encode(t + "132 miles") == [id] + base.encode("132 miles"), t
    assert tok.encode("miles." + t) == base.encode("miles.") + [id], t
    assert tok.encode("=<<2*66=132>>" + t + t) == base.encode("=<<2*66=132>>") + [id, id], t
  for line in (NODE_LINE, FELIX, OTHER_LINE):
    assert tok.encode(line) == reference_ids(base, line)


def test_round_trip(backend):
  _, base, _, _, _ = backend
  tok = base.with_special_tokens(SPECIAL_TOKENS)
  for text in (FELIX, NODE_LINE, OTHER_LINE, FELIX + "\n" + OTHER_LINE):
    assert tok.decode(tok.encode(text)) == text


def test_existing_ids_and_tokens_are_kept(backend):
  _, base, size, _, _ = backend
  tok = base.with_special_tokens(SPECIAL_TOKENS)
  assert base.token_to_id("<hint>") is None and base.vocab_size == size  # the base is not changed
  vocab = tok.vocab()
  assert {t: vocab[t] for t in base.vocab()} == base.vocab()
  again = tok.with_special_tokens(["<hint>", "<extra_action>", "<hint>", "<start_of_thought>"])
  assert again.vocab_size == size + 18
  assert again.token_to_id("<hint>") == size + 15 and again.token_to_id("<extra_action>") == size + 17
  assert again.encode("x<extra_action>") == base.encode("x") + [size + 17]
  assert tok.with_special_tokens(SPECIAL_TOKENS).vocab() == vocab


def test_a_token_the_tokenizer_already_has_keeps_its_id(smollm2_files):
  base = tokenizer_lib.from_files(smollm2_files)
  tok = base.with_special_tokens(["<|im_start|>", "<hint>"])  # SmolLM2's BOS, id 1
  assert tok.vocab_size == 49_153 and tok.token_to_id("<|im_start|>") == 1 and tok.bos_id == 1
  assert tok.encode("x<|im_start|><hint>") == base.encode("x") + [1, 49_152]


def test_the_dummy_prefix_is_turned_off(tmp_path):
  base = tokenizer_lib.from_files({"tokenizer.model": _train_sentencepiece(add_dummy_prefix=True)})
  space = base.token_to_id("▁")
  assert base.encode("miles")[0] == base.token_to_id("▁m")  # the model prefixes "▁" to every string
  tok = base.with_special_tokens(SPECIAL_TOKENS)
  proto = sp_pb2.ModelProto()
  proto.ParseFromString(tok.files()["tokenizer.model"])
  assert not proto.normalizer_spec.add_dummy_prefix
  for i, t in enumerate(SPECIAL_TOKENS):
    assert tok.encode(t) == [400 + i] and space not in tok.encode(t + "x")
  assert json.loads(tok.files()["tokenizer_config.json"])["tokenizer_class"] == "GemmaTokenizer"
  for name, content in tok.files().items():
    (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert hf_tokenizer(FELIX, add_special_tokens=False)["input_ids"] == tok.encode(FELIX)


# --- growing the model ------------------------------------------------------------------------------------------

def tiny_model(vocab_size: int, tied: bool, param_dtype: str = "float32") -> decoder.Decoder:
  """A random tiny Llama; the weights are drawn with numpy (jax's eager random ops compile once per shape)."""
  config = presets.get("tiny_llama", vocab_size=vocab_size, tie_embeddings=tied, param_dtype=param_dtype,
                       dtype="float32")
  rng = np.random.default_rng(vocab_size)
  weights = jax.tree.map(lambda shape: (0.2 * rng.standard_normal(shape)).astype(param_dtype),
                         decoder.weight_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
  return decoder.Decoder(config, weights=weights)


def as_f64(a) -> np.ndarray:
  return np.asarray(np.asarray(a, np.float32), np.float64)


@pytest.mark.parametrize("tied", [False, True])
def test_grown_model_keeps_old_rows_and_adds_the_mean(backend, tied):
  _, base, size, _, _ = backend
  model = tiny_model(size, tied)
  grown, tok = tokenizer_lib.add_special_tokens(model, base)
  assert grown.config.vocab_size == tok.vocab_size == size + 17
  assert grown.tokenizer_files == tok.files()
  old, new = model.weights(), grown.weights()
  assert new["embed"].shape == (size + 17, 32)
  np.testing.assert_array_equal(np.asarray(new["embed"][:size]), np.asarray(old["embed"]))
  mean_row = as_f64(old["embed"]).mean(axis=0)
  np.testing.assert_allclose(as_f64(new["embed"][size:]), np.tile(mean_row, (17, 1)), rtol=0, atol=1e-6)
  assert ("head" in new) == (not tied)
  if not tied:
    np.testing.assert_array_equal(np.asarray(new["head"][:, :size]), np.asarray(old["head"]))
    mean_column = as_f64(old["head"]).mean(axis=1)
    np.testing.assert_allclose(as_f64(new["head"][:, size:]), np.tile(mean_column[:, None], (1, 17)), atol=1e-6)
  for a, b in zip(jax.tree.leaves(old["layers"]), jax.tree.leaves(new["layers"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("rows", [405, 500])
def test_padded_vocabulary(sentencepiece_files, rows):
  """The sentencepiece model has 400 ids; the model 405 or 500 rows: new ids 400..416 still follow id 399."""
  base = tokenizer_lib.from_files(sentencepiece_files)
  model = tiny_model(rows, tied=False, param_dtype="bfloat16")
  grown, tok = tokenizer_lib.add_special_tokens(model, base)
  assert tok.token_to_id("<start_of_father_id>") == 400 and tok.token_to_id("</hint>") == 416
  assert grown.config.vocab_size == max(rows, 417)
  old, new = np.asarray(model.weights()["embed"]), np.asarray(grown.weights()["embed"])
  old_head, new_head = np.asarray(model.weights()["head"]), np.asarray(grown.weights()["head"])
  assert new.dtype == old.dtype == np.dtype("bfloat16")
  np.testing.assert_array_equal(new[:400], old[:400])
  np.testing.assert_array_equal(new[417:], old[417:])  # padding rows that no new id reached (none for 405)
  np.testing.assert_array_equal(new_head[:, :400], old_head[:, :400])
  mean_row = as_f64(old[:400]).mean(axis=0)  # over the tokenizer's rows, not the padding
  # The mean is rounded to bfloat16 once: within half a bfloat16 ulp (2^-8 relative) of the exact mean.
  np.testing.assert_allclose(as_f64(new[400:417]), np.tile(mean_row, (17, 1)), rtol=2.0**-8, atol=1e-7)


# --- export -----------------------------------------------------------------------------------------------------

def test_export_loads_in_transformers(backend, tmp_path):
  name, base, size, _, _ = backend
  grown, tok = tokenizer_lib.add_special_tokens(tiny_model(size, tied=False), base)
  hf_io.save_pretrained(grown, str(tmp_path))
  expected_files = {"smollm2": ["tokenizer.json", "tokenizer_config.json"],
                    "sentencepiece": ["tokenizer.model", "tokenizer_config.json"]}[name]
  assert sorted(os.listdir(tmp_path)) == sorted(["config.json", "model.safetensors"] + expected_files)

  reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
  assert reference.config.vocab_size == size + 17
  weights = grown.weights()
  np.testing.assert_array_equal(reference.get_input_embeddings().weight.detach().numpy(), weights["embed"])
  np.testing.assert_array_equal(reference.get_output_embeddings().weight.detach().numpy(), weights["head"].T)

  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert len(hf_tokenizer) == size + 17
  for text in (FELIX, NODE_LINE, OTHER_LINE):
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf_tokenizer.decode(tok.encode(text)) == text

  loaded = hf_io.load_pretrained(str(tmp_path))
  assert loaded.tokenizer_files == grown.tokenizer_files  # tokenizer.model comes back as the same bytes
  assert tokenizer_lib.for_model(loaded).encode(FELIX) == tok.encode(FELIX)


# --- bad input --------------------------------------------------------------------------------------------------

def test_bad_input(sentencepiece_files):
  base = tokenizer_lib.from_files(sentencepiece_files)
  with pytest.raises(ValueError, match="no tokenizer files"):
    tokenizer_lib.for_model(tiny_model(400, tied=True))
  with pytest.raises(ValueError, match=r"\['vocab.txt'\] hold neither tokenizer.json nor tokenizer.model"):
    tokenizer_lib.from_files({"vocab.txt": "a\nb\n"})
  with pytest.raises(ValueError, match="tokenizer.model must be bytes"):
    tokenizer_lib.from_files({"tokenizer.model": "text"})
  with pytest.raises(ValueError, match="not a sentencepiece model"):
    tokenizer_lib.from_files({"tokenizer.model": b"\x00garbage"})
  with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizers file"):
    tokenizer_lib.from_files({"tokenizer.json": "{}"})
  with pytest.raises(ValueError, match="'<a b>' must be a non-empty string without whitespace"):
    base.with_special_tokens(["<a b>"])
  with pytest.raises(ValueError, match="'</s>' is the CONTROL piece 1"):
    base.with_special_tokens(["</s>"])
  with pytest.raises(ValueError, match="the tokenizer has 400 ids but the model's embedding has only 128 rows"):
    tokenizer_lib.add_special_tokens(tiny_model(128, tied=True), base)
