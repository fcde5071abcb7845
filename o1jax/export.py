"""A model in the LLaMA-O1 format as a Hugging Face checkpoint: the adapter merged, the grown vocabulary, a card.

  source = export.Source(base="smollm2-135m-instruct", adapter="configs/adapters/smollm2_135m_rating.safetensors")
  source = export.from_workdir("runs/selfplay_smollm2")   # or: the adapter a self-play run wrote, on its base
  export.export(source, "runs/export", dtype="bfloat16")  # prepare (check, load, merge) + write

  model = transformers.AutoModelForCausalLM.from_pretrained("runs/export")
  tokenizer = transformers.AutoTokenizer.from_pretrained("runs/export")   # every format token one id

The export directory holds what `models.hf_io.save_pretrained` writes (model.safetensors in float32 or bfloat16,
config.json with the matching torch_dtype, the tokenizer files with the format's tokens as added tokens) and a
README.md model card (`model_card`). The weights are those of `o1jax.pretrained.load(base, adapter=...)`: the
LoRA merged into the projections in float32, the new tokens' rows from the adapter, then cast once (round to
nearest even for bfloat16). transformers, `models.hf_io.load_pretrained` and `o1jax.pretrained.load` read the
directory back as that same model.

The files are written into a temporary directory beside `out`, which is then renamed, so that a failed export
leaves no half-written directory behind. An existing directory is replaced only when asked (`overwrite=True`) and
only when it holds nothing but the files an export writes, so that a mistyped path never deletes anything else.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import shutil
import uuid
from typing import Sequence

import jax
import jax.numpy as jnp

from models import decoder, hf_io
from o1jax import adapter as adapter_lib, pretrained, thoughts, tokenizer as tokenizer_lib

DTYPES = ("float32", "bfloat16")
CARD_FILE = "README.md"
WORKDIR_ADAPTER = "adapter.safetensors"   # what o1jax.selfplay.Job.write_adapter writes after every round
WORKDIR_CONFIG = "config.json"            # the run's config (o1jax.selfplay.prepare), model.path its base
# What an export (or an earlier Hugging Face checkpoint) may hold: the only files `overwrite` deletes. Every
# *.safetensors goes, not only model.safetensors: hf_io.load_pretrained reads all of them.
_EXPORT_FILES = ("config.json", "model.safetensors.index.json", CARD_FILE, *hf_io.TOKENIZER_FILES)
_EXPORT_PATTERNS = ("*.safetensors",)
# Hub ids of the packaged models (o1jax.pretrained.PACKAGED), for the card's `base_model`.
_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# One node of the format (o1jax/thoughts.py), as the card shows it.
_NODE_LAYOUT = ("<start_of_father_id>{parent}<end_of_father_id><start_of_local_id>{index}<end_of_local_id>"
                "<start_of_thought>{meta}{text}<end_of_thought><start_of_rating>{rating}<end_of_rating>")


@dataclasses.dataclass(frozen=True)
class Source:
  """Where an export's weights come from.

  Attributes:
    base: the base model, a packaged name or a path (what `o1jax.pretrained.load` takes).
    adapter: the adapter file merged into it, or None (the base with the format's tokens at the mean row).
    workdir: the self-play workdir the adapter was taken from, or None.
  """

  base: str
  adapter: str | None = None
  workdir: str | None = None


def from_workdir(workdir: str, base: str | None = None) -> Source:
  """The adapter a self-play run (`launch.train`) wrote into its workdir, on the base model the run recorded.

  Args:
    workdir: the run's directory: {workdir}/adapter.safetensors (the LoRA and new token rows after the last
      finished round) and {workdir}/config.json (the run's config; model.path names its base model).
    base: the base model to use instead of the recorded one (the adapter's own record is checked on load).
  """
  if not os.path.exists(workdir):
    raise FileNotFoundError(f"checkpoint directory {workdir!r} does not exist; expected a self-play workdir "
                            "written by launch.train.")
  if not os.path.isdir(workdir):
    raise NotADirectoryError(f"checkpoint {workdir!r} is a file; expected a self-play workdir (a directory) "
                             "written by launch.train.")
  adapter = os.path.join(workdir, WORKDIR_ADAPTER)
  if not os.path.isfile(adapter):
    raise FileNotFoundError(f"checkpoint directory {workdir!r} has no {WORKDIR_ADAPTER}; expected a workdir of a "
                            "LoRA self-play run (launch.train) with at least one finished round.")
  return Source(base=base if base is not None else _recorded_base(workdir), adapter=adapter, workdir=workdir)


def _recorded_base(workdir: str) -> str:
  """model.path of the run config that o1jax.selfplay.prepare writes into the workdir."""
  path = os.path.join(workdir, WORKDIR_CONFIG)
  expected = "expected the config.json launch.train writes into its workdir, or a base model given with --model"
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint directory {workdir!r} has no {WORKDIR_CONFIG} naming its base model; "
                            f"{expected}.")
  with open(path, "rb") as f:
    try:
      config = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"run config {path!r} is not valid JSON ({e}); {expected}.") from None
  model = config.get("model") if isinstance(config, dict) else None
  base = model.get("path") if isinstance(model, dict) else None
  if not isinstance(base, str) or not base:
    raise ValueError(f"run config {path!r} has no model.path naming the base model; {expected}.")
  return base


def check_out_dir(out: str, overwrite: bool = False) -> None:
  """Raises unless `out` is new, an empty directory, or (with overwrite) a directory of export files only."""
  if not out:
    raise ValueError("the output directory is empty; expected a path to write the export to.")
  if not os.path.lexists(out):
    return
  if not os.path.isdir(out) or os.path.islink(out):
    raise NotADirectoryError(f"output path {out!r} exists and is not a directory; expected a new or empty "
                             "directory for the export.")
  entries = sorted(os.listdir(out))
  if not entries:
    return
  if not overwrite:
    raise ValueError(f"output directory {out!r} exists and is not empty (it holds {_listing(entries)}); "
                     "choose a new directory, or pass --overwrite to replace an earlier export there.")
  foreign = [e for e in entries if not _is_export_file(out, e)]
  if foreign:
    raise ValueError(f"output directory {out!r} holds {_listing(foreign)}, which an export does not write; "
                     "--overwrite replaces only an earlier export, so remove them or choose another directory.")


def _is_export_file(directory: str, name: str) -> bool:
  path = os.path.join(directory, name)
  return (os.path.isfile(path) and not os.path.islink(path)
          and (name in _EXPORT_FILES or any(fnmatch.fnmatch(name, p) for p in _EXPORT_PATTERNS)))


def _listing(names: Sequence[str], limit: int = 3) -> str:
  shown = ", ".join(repr(n) for n in names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def export(source: Source, out: str, *, dtype: str = "float32", overwrite: bool = False) -> pretrained.Loaded:
  """`prepare` then `write`: loads `source` and writes it to `out` as a Hugging Face checkpoint.

  Returns:
    The loaded float32 model (what the export holds, before the cast to `dtype`).
  """
  loaded = prepare(source, out, dtype=dtype, overwrite=overwrite)
  write(loaded, out, dtype=dtype, source=source, overwrite=overwrite)
  return loaded


def prepare(source: Source, out: str, *, dtype: str = "float32", overwrite: bool = False) -> pretrained.Loaded:
  """Checks the dtype and the output directory, then loads `source` (base + adapter, merged in float32).

  The output directory is checked before any model or adapter is read. Bad inputs raise ValueError or a file
  error with one sentence each: an adapter made for another base model or another vocabulary
  (`o1jax.adapter.AdapterFile.check`), a missing or corrupt adapter or checkpoint, an output directory in the way.
  """
  check_dtype(dtype)
  check_out_dir(out, overwrite)
  loaded = pretrained.load(source.base, adapter=source.adapter, dtype="float32")
  _check_vocabulary(loaded)
  return loaded


def check_dtype(dtype: str) -> None:
  if dtype not in DTYPES:
    raise ValueError(f"export dtype {dtype!r} is not one of {DTYPES}.")


def write(loaded: pretrained.Loaded, out: str, *, dtype: str, source: Source, overwrite: bool = False) -> None:
  """Writes a loaded model (`o1jax.pretrained.load`) to `out`: weights cast to `dtype`, tokenizer files, card."""
  check_dtype(dtype)
  check_out_dir(out, overwrite)
  _check_vocabulary(loaded)
  model = cast(loaded.model, dtype)
  card = model_card(loaded, source, dtype)
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  # Beside `out`, so that the rename stays on one file system; os.mkdir gives it the umask's permissions.
  staging = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.export-{uuid.uuid4().hex[:12]}")
  os.mkdir(staging)
  try:
    hf_io.save_pretrained(model, staging)
    with open(os.path.join(staging, CARD_FILE), "w") as f:
      f.write(card)
    _check_written_tokenizer(staging, loaded)
    _share(staging)
    if os.path.isdir(out):
      check_out_dir(out, overwrite)   # again: something may have appeared there while the weights were written
      for name in os.listdir(out):
        os.remove(os.path.join(out, name))
      os.rmdir(out)                   # empty now; rmdir never removes anything else
    os.replace(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _share(directory: str) -> None:
  """Gives every file the permissions the umask allows: safetensors writes its files readable by the owner only
  (0600), and an export is meant to be read by others (a Hub upload, a serving job under another user)."""
  umask = os.umask(0)
  os.umask(umask)
  for name in os.listdir(directory):
    os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def cast(model: decoder.Decoder, dtype: str) -> decoder.Decoder:
  """The model with its weights in `dtype` (XLA's round to nearest even) and config.param_dtype = dtype."""
  weights = jax.tree.map(lambda a: jnp.asarray(a, dtype), model.weights())
  out = decoder.Decoder(model.config.replace(param_dtype=dtype), weights=weights)
  out.tokenizer_files = dict(model.tokenizer_files)
  return out


def _check_vocabulary(loaded: pretrained.Loaded) -> None:
  """Every format token is one id of the tokenizer and a row of the model; the tokenizer fits the model."""
  vocab_size = loaded.model.config.vocab_size
  if loaded.tokenizer.vocab_size > vocab_size:
    raise ValueError(f"the tokenizer has {loaded.tokenizer.vocab_size} ids but the model has {vocab_size} "
                     "embedding rows; expected a tokenizer that fits the model.")
  ids = {t: loaded.tokenizer.token_to_id(t) for t in thoughts.SPECIAL_TOKENS}
  missing = [t for t, i in ids.items() if i is None]
  if missing:
    raise ValueError(f"the tokenizer has no ids for the format tokens {missing}; load the model with "
                     "o1jax.pretrained.load, which adds them.")


def _check_written_tokenizer(directory: str, loaded: pretrained.Loaded) -> None:
  """The tokenizer files as written give every format token the id it has in the model's tokenizer (a bug here
  would otherwise surface only in whoever loads the export)."""
  files = {}
  for name in hf_io.TOKENIZER_FILES:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      with open(path, "rb" if name in hf_io.BINARY_TOKENIZER_FILES else "r") as f:
        files[name] = f.read()
  written = tokenizer_lib.from_files(files)
  for token in thoughts.SPECIAL_TOKENS:
    if written.encode(token) != [loaded.tokenizer.token_to_id(token)]:
      raise RuntimeError(f"the exported tokenizer encodes {token!r} as {written.encode(token)}; the model has it "
                         f"as id {loaded.tokenizer.token_to_id(token)}.")


# --- the model card ---------------------------------------------------------------------------------------------

def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _count(n: int) -> str:
  for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= size:
      return f"{n / size:.1f}{unit}"
  return str(n)


def _example_prompts() -> tuple[str, str]:
  """A policy prompt (the model writes node 1) and the rating prompt of a written node 1."""
  root = thoughts.Node(parent=-1, index=0, meta="<problem>", text="What is 12 + 30?", rating=None)
  step = thoughts.Node(parent=0, index=1, meta="", text="12 + 30 = 42.", rating=None)
  return thoughts.policy_prompt([root], "", 1), thoughts.rating_prompt([root], step)


def _python_string(text: str, indent: str) -> str:
  """`text` as adjacent Python string literals, one per node header and one per thought (repr keeps the \\n)."""
  pieces = [p for p in re.split(r"(?<=<end_of_local_id>)|(?<=\n)", text) if p]
  return f"\n{indent}".join(repr(p) for p in pieces)


def model_card(loaded: pretrained.Loaded, source: Source, dtype: str) -> str:
  """README.md of an export: what the model is, the format, how to load it, and where it came from."""
  config = loaded.model.config
  family = {"llama": "Llama", "gemma2": "Gemma-2"}[config.family]
  tokens = [(loaded.tokenizer.token_to_id(t), t) for t in thoughts.SPECIAL_TOKENS]
  first, last = min(i for i, _ in tokens), max(i for i, _ in tokens)
  hub_id = _HUB_IDS.get(source.base)
  front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
           "tags: [o1jax, llama-o1, tree-search, mcts, process-reward-model]"]
  if hub_id:
    front.append(f"base_model: {hub_id}")
  front.append("---")

  base_file = pretrained.resolve(source.base)
  base_line = f"`{source.base}`" + (f" (Hugging Face Hub: `{hub_id}`)" if hub_id else "")
  if base_file != source.base:
    base_line += f", read from `{base_file}`"
  if base_file.endswith(".gguf"):
    base_line += " (a llama.cpp GGUF file: the base weights are its quantized values, dequantized to float32)"
  if source.adapter is None:
    adapter_lines = ["- adapter: none. The format's tokens have embedding rows at the mean of the base model's "
                     "rows; the model has not been trained on the format."]
  else:
    adapter_file = adapter_lib.read(source.adapter)
    lora = adapter_file.config
    adapter_lines = [
        f"- adapter: `{source.adapter}` (sha256 `{_sha256(source.adapter)}`), trained on "
        f"`{adapter_file.base}`: LoRA rank {lora.rank}, alpha {lora.alpha:g}, on {', '.join(lora.targets)}, merged "
        "into the weights in float32 as W + (alpha / rank) a b, and the trained embedding rows"
        + (" and head columns" if adapter_file.new_head is not None else "") + " of the format's tokens.",
    ]
    extra = {k: v for k, v in adapter_file.metadata.items() if k not in ("base", "base_vocab", "special_tokens")}
    if extra:
      adapter_lines.append(f"- adapter metadata: `{json.dumps(extra, sort_keys=True)}`")
  if source.workdir is not None:
    adapter_lines.append(f"- self-play workdir: `{source.workdir}` (launch.train); the adapter is its "
                         f"`{WORKDIR_ADAPTER}`, written after the last finished round.")

  policy, rating = _example_prompts()
  eager = ', attn_implementation="eager"' if config.is_gemma else ""
  eager_note = ("\n(Eager attention is transformers' default for Gemma-2 and the one that applies its attention "
                "logit softcap; keep it.)\n" if config.is_gemma else "")
  token_table = "\n".join(f"| {i} | `{t}` |" for i, t in tokens)
  card = f"""{chr(10).join(front)}

# {family} in the LLaMA-O1 format (o1jax export)

A {family} decoder that writes and rates reasoning steps in the LLaMA-O1 (OpenLongCoT) format: the policy and
the value model of o1jax's tree search. Continued after a node header it writes one step and ends it with
`<end_of_thought>`; after a step and `<start_of_rating>` its logits give the step's value. Exported by
`python -m launch.export_hf`.

- size: {_count(config.num_params())} parameters, {config.num_layers} layers, model width {config.d_model}, \
{config.num_heads} query and {config.num_kv_heads} key/value heads of {config.head_dim}
- vocabulary: {config.vocab_size} ids; the base tokenizer's ids 0..{first - 1} are unchanged, the format's \
{len(tokens)} tokens are ids {first}..{last}
- weights: {dtype}

## The format

A reasoning tree is a text of nodes, one per line in prompts, each a header, a thought and a rating:

```
{_NODE_LAYOUT}
```

The root (father id -1, local id 0) holds the problem after `<problem>` and has no rating. `{{meta}}` is empty for
a plain step or one of `<problem>`, `<critic>`, `<refine>`, `<conclusion>`; a `<hint>...</hint>` block may stand
right before a new node's line. `{{rating}}` is `<positive_rating>`, `<negative_rating>` or `<unknown_rating>`.

- **Policy prompt**: the root-to-parent path, then the new node's header up to `<start_of_thought>` (and its meta
  token). The model writes the step; stop at `<end_of_thought>`.
- **Rating prompt**: the path, then the rated node's line up to `<end_of_thought>` followed by
  `<start_of_rating>`. The value is log p(`<positive_rating>`) of a softmax over the logits of
  `<positive_rating>` and `<negative_rating>` only, so it lies in (-inf, 0].

Every format token is a single id (an added token, not flagged special: `decode(skip_special_tokens=True)` keeps
it). Encode prompts with `add_special_tokens=False`: the format needs no BOS.

| id | token |
|---:|---|
{token_table}

## Loading with transformers

```python
import torch
import transformers

model = transformers.AutoModelForCausalLM.from_pretrained("path/to/export"{eager})
tokenizer = transformers.AutoTokenizer.from_pretrained("path/to/export")
end_of_thought = tokenizer.convert_tokens_to_ids("<end_of_thought>")

policy_prompt = ({_python_string(policy, "                 ")})
ids = tokenizer(policy_prompt, add_special_tokens=False, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=end_of_thought,
                     pad_token_id=end_of_thought)
step = tokenizer.decode(out[0, ids.shape[1]:])          # the step's text, then <end_of_thought>

rating_prompt = ({_python_string(rating, "                 ")})
ids = tokenizer(rating_prompt, add_special_tokens=False, return_tensors="pt").input_ids
with torch.no_grad():
  logits = model(ids).logits[0, -1].float()
positive, negative = tokenizer.convert_tokens_to_ids(["<positive_rating>", "<negative_rating>"])
value = torch.log_softmax(logits[[positive, negative]], -1)[0]   # log p(positive) <= 0
```
{eager_note}
## Loading with o1jax

```python
from o1jax import pretrained
loaded = pretrained.load("path/to/export")   # loaded.model (a Decoder), loaded.tokenizer; the adapter is merged
```

or search with it: `python -m launch.solve --config.model.path=path/to/export --config.model.adapter=""`.
`models.hf_io.load_pretrained("path/to/export")` reads the same weights and config.

## Where it came from

- base model: {base_line}
{chr(10).join(adapter_lines)}
- weights: {dtype}{" (cast once from the float32 merge, round to nearest even)" if dtype != "float32" else ""}
"""
  return card


__all__ = ["DTYPES", "Source", "from_workdir", "check_out_dir", "check_dtype", "export", "prepare", "write", "cast",
           "model_card"]
