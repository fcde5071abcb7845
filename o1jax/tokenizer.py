"""One tokenizer protocol over Hugging Face `tokenizers` and sentencepiece, with the LLaMA-O1 tokens as single ids.

  tok = tokenizer.for_model(model)                        # from model.tokenizer_files (tokenizer.json or .model)
  model, tok = tokenizer.add_special_tokens(model, tok)   # thoughts.SPECIAL_TOKENS appended as new ids
  ids = tok.encode("<start_of_father_id>-1<end_of_father_id>...")
  sampler = Sampler(model, vocab=tok.vocab())
  hf_io.save_pretrained(model, out_dir)                   # carries tok.files(); transformers.AutoTokenizer loads them

Two implementations stand behind `Tokenizer`:
- `HFTokenizer`, over a `tokenizers.Tokenizer` (tokenizer.json): SmolLM2's byte-level BPE, Llama-3, and Gemma
  checkpoints that ship a tokenizer.json. New tokens are "added tokens": the tokenizer splits the text at them
  before the model runs, so they are single ids anywhere in the text.
- `SentencePieceTokenizer`, over a sentencepiece model (tokenizer.model, Gemma's kind: BPE with byte fallback).
  New tokens are pieces of type USER_DEFINED appended to the model proto; sentencepiece matches those before
  segmenting, so they too are single ids anywhere in the text.

Neither adds BOS/EOS unless asked (`encode(text, add_bos=True)`): prompts in the LLaMA-O1 format are built by
concatenating pieces of text, and a BOS belongs only at the very start of the model's input.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from absl import logging

from o1jax.thoughts import SPECIAL_TOKENS

if TYPE_CHECKING:
  from models.decoder import Decoder

TokenizerFiles = Mapping[str, "str | bytes"]

# Files that describe the vocabulary itself; the other tokenizer files (tokenizer_config.json, generation_config.json,
# special_tokens_map.json) travel along unchanged apart from the entries this module updates.
_HF_FILE = "tokenizer.json"
_SP_FILE = "tokenizer.model"
_CONFIG_FILE = "tokenizer_config.json"


@runtime_checkable
class Tokenizer(Protocol):
  """What o1jax needs from a tokenizer. Ids are ints in [0, vocab_size)."""

  @property
  def vocab_size(self) -> int:
    """One more than the largest id (added tokens included)."""

  @property
  def bos_id(self) -> int | None:
    """The beginning-of-sequence id, or None when the tokenizer has none."""

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """The end-of-sequence ids (possibly none)."""

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """The ids of `text`; no BOS/EOS unless add_bos."""

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`; decode(encode(x)) == x for text in the LLaMA-O1 format."""

  def token_to_id(self, token: str) -> int | None:
    """The id of a single token (a vocabulary entry, not text to encode), or None."""

  def id_to_token(self, id: int) -> str | None:
    """The vocabulary entry of `id`, or None when out of range."""

  def vocab(self) -> dict[str, int]:
    """{token: id} for every id (what `Sampler(vocab=...)` takes)."""

  def with_special_tokens(self, tokens: Iterable[str]) -> Tokenizer:
    """A new tokenizer where each token is one id: existing ids unchanged, tokens already present keep their id,
    the others get new ids vocab_size, vocab_size + 1, ... in order."""

  def files(self) -> dict[str, str | bytes]:
    """The tokenizer files of a Hugging Face export ({name: text, or bytes for tokenizer.model})."""


def _check_tokens(tokens: Iterable[str]) -> list[str]:
  tokens = list(tokens)
  for t in tokens:
    if not isinstance(t, str) or not t or any(c.isspace() for c in t):
      raise ValueError(f"special token {t!r} must be a non-empty string without whitespace.")
  return tokens


def _token_text(value) -> str | None:
  """A token as tokenizer_config.json writes it: a string or {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def _as_text(name: str, value: str | bytes) -> str:
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      raise ValueError(f"tokenizer file {name} is not UTF-8 text.") from None
  return value


def _read_config(files: TokenizerFiles) -> dict:
  if _CONFIG_FILE not in files:
    return {}
  text = _as_text(_CONFIG_FILE, files[_CONFIG_FILE])
  try:
    config = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{_CONFIG_FILE} is not valid JSON ({e}).") from None
  if not isinstance(config, dict):
    raise ValueError(f"{_CONFIG_FILE} must hold a JSON object; got {type(config).__name__}.")
  return config


def _with_added_tokens_decoder(config: dict, new: Sequence[tuple[int, str]]) -> dict:
  """transformers keeps a copy of the added tokens in tokenizer_config.json; extend it when the file has one."""
  config = dict(config)
  if "added_tokens_decoder" in config and new:
    decoder = dict(config["added_tokens_decoder"])
    for id, token in new:
      decoder[str(id)] = {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": False}
    config["added_tokens_decoder"] = decoder
  return config


# --- Hugging Face tokenizers ------------------------------------------------------------------------------------

class HFTokenizer:
  """A `tokenizers.Tokenizer` (tokenizer.json) with the tokenizer_config.json that travels with it.

  BOS and EOS come from tokenizer_config.json ("bos_token", "eos_token"); without that file there are none.
  """

  def __init__(self, files: TokenizerFiles):
    from tokenizers import Tokenizer as RustTokenizer

    if _HF_FILE not in files:
      raise ValueError(f"HFTokenizer needs {_HF_FILE}; got files {sorted(files)}.")
    try:
      self._tokenizer = RustTokenizer.from_str(_as_text(_HF_FILE, files[_HF_FILE]))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
      raise ValueError(f"{_HF_FILE} is not a valid tokenizers file ({e}).") from None
    # A tokenizer.json may carry truncation or padding settings; encode() returns every id of the text.
    self._tokenizer.no_truncation()
    self._tokenizer.no_padding()
    self._config = _read_config(files)
    self._files = dict(files)
    self._vocab = self._tokenizer.get_vocab(with_added_tokens=True)
    self._vocab_size = max(self._vocab.values(), default=-1) + 1

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def bos_id(self) -> int | None:
    token = _token_text(self._config.get("bos_token"))
    return None if token is None else self.token_to_id(token)

  @property
  def eos_ids(self) -> tuple[int, ...]:
    token = _token_text(self._config.get("eos_token"))
    id = None if token is None else self.token_to_id(token)
    return () if id is None else (id,)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = self._tokenizer.encode(text, add_special_tokens=False).ids
    return _prepend_bos(ids, self.bos_id) if add_bos else ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_to_id(self, token: str) -> int | None:
    return self._vocab.get(token)

  def id_to_token(self, id: int) -> str | None:
    return self._tokenizer.id_to_token(int(id)) if 0 <= int(id) < self._vocab_size else None

  def vocab(self) -> dict[str, int]:
    return dict(self._vocab)

  def with_special_tokens(self, tokens: Iterable[str]) -> HFTokenizer:
    """See `Tokenizer.with_special_tokens`.

    The tokens become "added tokens" (never normalized, no stripping of neighbouring spaces), matched before the
    pre-tokenizer runs; a token the vocabulary already has keeps its id and is matched whole from now on. They are
    not flagged special: they are text of the format, and transformers' `decode(skip_special_tokens=True)` must
    keep them (as sentencepiece keeps USER_DEFINED pieces). The result's files drop tokenizer.model, which would
    describe the old vocabulary.
    """
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RustTokenizer

    tokens = _check_tokens(tokens)
    tokenizer = RustTokenizer.from_str(_as_text(_HF_FILE, self._files[_HF_FILE]))
    expected, new, next_id = {}, [], self._vocab_size
    for t in tokens:
      if t in expected:
        continue
      if t in self._vocab:
        expected[t] = self._vocab[t]
      else:
        expected[t] = next_id
        new.append((next_id, t))
        next_id += 1
    already_added = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False,
                                     single_word=False) for t in expected if t not in already_added])
    got = {t: tokenizer.token_to_id(t) for t in expected}
    if got != expected:  # tokenizers numbers added tokens after its largest id; a file with gaps breaks that
      raise ValueError(f"tokenizers gave the new tokens ids {got}; expected {expected} (ids appended after "
                       f"{self._vocab_size - 1}).")
    files = {name: value for name, value in self._files.items() if name != _SP_FILE}
    files[_HF_FILE] = tokenizer.to_str()
    config = _with_added_tokens_decoder(self._config, new)
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    files[_CONFIG_FILE] = json.dumps(config, indent=2, ensure_ascii=False)
    return HFTokenizer(files)

  def files(self) -> dict[str, str | bytes]:
    files = dict(self._files)
    if _CONFIG_FILE not in files:  # AutoTokenizer needs a class; without one it guesses from config.json
      files[_CONFIG_FILE] = json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2)
    return files


# --- sentencepiece ----------------------------------------------------------------------------------------------

class SentencePieceTokenizer:
  """A sentencepiece model (tokenizer.model bytes) and the tokenizer_config.json that travels with it.

  BOS/EOS are the model's own <s>/</s> ids (sentencepiece's bos_id / eos_id; -1 there means none). Control
  pieces (BOS, EOS, padding) decode to "" as sentencepiece does; text pieces, byte pieces and the added tokens
  decode to their text.
  """

  def __init__(self, files: TokenizerFiles):
    import sentencepiece

    if _SP_FILE not in files:
      raise ValueError(f"SentencePieceTokenizer needs {_SP_FILE}; got files {sorted(files)}.")
    blob = files[_SP_FILE]
    if not isinstance(blob, bytes):
      raise ValueError(f"{_SP_FILE} must be bytes (read it in binary mode); got {type(blob).__name__}.")
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_proto=blob)
    except Exception as e:  # sentencepiece raises RuntimeError with its internal status text
      raise ValueError(f"{_SP_FILE} is not a sentencepiece model ({e}).") from None
    self._blob = blob
    self._config = _read_config(files)
    self._files = dict(files)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def bos_id(self) -> int | None:
    id = self._sp.bos_id()
    return None if id < 0 else id

  @property
  def eos_ids(self) -> tuple[int, ...]:
    id = self._sp.eos_id()
    return () if id < 0 else (id,)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = list(self._sp.encode(text, out_type=int))
    return _prepend_bos(ids, self.bos_id) if add_bos else ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def token_to_id(self, token: str) -> int | None:
    id = self._sp.piece_to_id(token)
    # piece_to_id answers the unknown id for any string that is not a piece.
    return None if id == self._sp.unk_id() and token != self._sp.id_to_piece(id) else id

  def id_to_token(self, id: int) -> str | None:
    return self._sp.id_to_piece(int(id)) if 0 <= int(id) < self.vocab_size else None

  def vocab(self) -> dict[str, int]:
    return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

  def with_special_tokens(self, tokens: Iterable[str]) -> SentencePieceTokenizer:
    """See `Tokenizer.with_special_tokens`: new tokens are USER_DEFINED pieces appended to the model proto.

    A token that is already an ordinary (or unused) piece keeps its id and becomes USER_DEFINED, so it is matched
    whole; a control, unknown or byte piece cannot stand for text and is an error.

    The dummy prefix: a model with add_dummy_prefix (Llama-2 style) turns "<hint>x" into "▁<hint>x", which
    encodes as two ids ("▁", "<hint>") at the start of every string. The returned model has add_dummy_prefix off.
    Text in the LLaMA-O1 format always starts with a special token, so only strings that start with a word
    change ("Hello" no longer gets the "▁Hello" piece). Gemma's tokenizer has no dummy prefix and is unchanged.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    piece_type = sp_pb2.ModelProto.SentencePiece
    tokens = _check_tokens(tokens)
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(self._blob)
    index = {p.piece: i for i, p in enumerate(proto.pieces)}
    new = []
    for t in tokens:
      if t in index:
        piece = proto.pieces[index[t]]
        if piece.type in (piece_type.NORMAL, piece_type.UNUSED):
          piece.type = piece_type.USER_DEFINED
        elif piece.type != piece_type.USER_DEFINED:
          raise ValueError(f"token {t!r} is the {piece_type.Type.Name(piece.type)} piece {index[t]} of this "
                           "sentencepiece model; expected a new token or a text piece.")
        continue
      piece = proto.pieces.add()
      piece.piece, piece.score, piece.type = t, 0.0, piece_type.USER_DEFINED
      index[t] = len(proto.pieces) - 1
      new.append((index[t], t))
    config = _with_added_tokens_decoder(self._config, new)
    if proto.normalizer_spec.add_dummy_prefix:
      proto.normalizer_spec.add_dummy_prefix = False
      # transformers' GemmaTokenizer reproduces a byte-fallback BPE model without a dummy prefix.
      config["tokenizer_class"] = "GemmaTokenizer"
      logging.info("sentencepiece: add_dummy_prefix turned off so that special tokens at the start of a string "
                   "are single ids.")
    proto.trainer_spec.vocab_size = len(proto.pieces)
    files = dict(self._files)
    files[_SP_FILE] = proto.SerializeToString()
    files[_CONFIG_FILE] = json.dumps(config, indent=2, ensure_ascii=False)
    return SentencePieceTokenizer(files)

  def _default_config(self, config: dict) -> dict:
    """tokenizer_config.json for transformers: the class (GemmaTokenizer unless given) and the control tokens."""
    config = dict(config)
    config.setdefault("tokenizer_class", "GemmaTokenizer")
    for key, id in (("bos_token", self._sp.bos_id()), ("eos_token", self._sp.eos_id()),
                    ("unk_token", self._sp.unk_id()), ("pad_token", self._sp.pad_id())):
      if id >= 0:
        config.setdefault(key, self._sp.id_to_piece(id))
    if config["tokenizer_class"] == "GemmaTokenizer" and self.token_to_id("<mask>") is None:
      config.setdefault("mask_token", None)  # GemmaTokenizer would otherwise add a "<mask>" id of its own
    return config

  def files(self) -> dict[str, str | bytes]:
    files = dict(self._files)
    files[_CONFIG_FILE] = json.dumps(self._default_config(self._config), indent=2, ensure_ascii=False)
    return files


def _prepend_bos(ids: list[int], bos_id: int | None) -> list[int]:
  if bos_id is None:
    raise ValueError("add_bos=True but this tokenizer has no BOS token.")
  return [bos_id] + ids


# --- construction -----------------------------------------------------------------------------------------------

def from_files(files: TokenizerFiles) -> Tokenizer:
  """The tokenizer described by Hugging Face tokenizer files: tokenizer.json (preferred) or tokenizer.model.

  Args:
    files: {file name: text, or bytes for tokenizer.model}, e.g. `Decoder.tokenizer_files`.
  """
  if _HF_FILE in files:
    return HFTokenizer(files)
  if _SP_FILE in files:
    return SentencePieceTokenizer(files)
  raise ValueError(f"tokenizer files {sorted(files)} hold neither {_HF_FILE} nor {_SP_FILE}.")


def for_model(model: Decoder) -> Tokenizer:
  """The tokenizer that came with `model` (its `tokenizer_files`, filled by hf_io.load_pretrained)."""
  files = getattr(model, "tokenizer_files", None) or {}
  if not files:
    raise ValueError("the model has no tokenizer files (model.tokenizer_files is empty); load it with "
                     "hf_io.load_pretrained from a checkpoint that has tokenizer.json or tokenizer.model.")
  return from_files(files)


# --- growing a model's vocabulary -------------------------------------------------------------------------------

def add_special_tokens(model: Decoder, tokenizer: Tokenizer, tokens: Iterable[str] = SPECIAL_TOKENS
                       ) -> tuple[Decoder, Tokenizer]:
  """Adds `tokens` to the tokenizer as single ids and grows the model's vocabulary to cover them.

  New ids t = tokenizer.vocab_size, ... get embedding rows equal to the mean of the rows of the tokenizer's ids
  [0, tokenizer.vocab_size) (and, for an untied head [D, V], columns equal to the mean of those columns); every
  other row and column is copied bit for bit.

  A padded vocabulary (the model has more rows than the tokenizer has ids: V > tokenizer.vocab_size) does not
  change where the new ids go: they still follow the tokenizer's last id, so they land on padding rows first.
  Those rows are overwritten with the mean (logged as a warning; padding rows no new id reaches stay as they
  were), and the table grows only by the new ids that lie beyond V. The mean excludes the padding rows.

  Args:
    model: the Decoder; its weights are read, never changed.
    tokenizer: the model's tokenizer.
    tokens: the tokens to add, in order (default: the LLaMA-O1 format's `thoughts.SPECIAL_TOKENS`).

  Returns:
    (a new Decoder with config.vocab_size = max(V, new tokenizer's vocab_size) and tokenizer_files = the new
    tokenizer's files, the new tokenizer).
  """
  import numpy as np

  from models.decoder import Decoder

  old_size, rows = tokenizer.vocab_size, model.config.vocab_size
  if old_size > rows:
    raise ValueError(f"the tokenizer has {old_size} ids but the model's embedding has only {rows} rows; "
                     "expected a tokenizer that fits the model.")
  new_tokenizer = tokenizer.with_special_tokens(tokens)
  new_size = new_tokenizer.vocab_size
  grown = max(rows, new_size)
  if new_size > old_size and old_size < rows:
    logging.warning("the model's vocabulary is padded (%d rows for %d tokenizer ids): new ids %d..%d overwrite "
                    "padding rows %d..%d with the mean embedding.", rows, old_size, old_size, new_size - 1,
                    old_size, min(rows, new_size) - 1)

  # A one-off edit of two tables, done on the host: exact copies of the old rows, no compilation per shape.
  weights = dict(model.weights())
  embed = np.asarray(weights["embed"])
  grown_embed = np.concatenate([embed, np.zeros((grown - rows, embed.shape[1]), embed.dtype)], axis=0)
  grown_embed[old_size:new_size] = embed[:old_size].astype(np.float32).mean(axis=0).astype(embed.dtype)
  weights["embed"] = grown_embed
  if "head" in weights:
    head = np.asarray(weights["head"])
    grown_head = np.concatenate([head, np.zeros((head.shape[0], grown - rows), head.dtype)], axis=1)
    grown_head[:, old_size:new_size] = head[:, :old_size].astype(np.float32).mean(axis=1, keepdims=True
                                                                                 ).astype(head.dtype)
    weights["head"] = grown_head

  grown_model = Decoder(dataclasses.replace(model.config, vocab_size=grown), weights=weights)
  grown_model.tokenizer_files = new_tokenizer.files()
  return grown_model, new_tokenizer


__all__ = ["Tokenizer", "HFTokenizer", "SentencePieceTokenizer", "from_files", "for_model", "add_special_tokens"]
