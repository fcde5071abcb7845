"""o1jax.export: transformers loads the export of a tiny Llama (SmolLM2's real tokenizer) and a tiny Gemma-2
(a sentencepiece tokenizer), each with a LoRA adapter whose b factors are not zero, as the model o1jax runs:
same log-probs, same greedy step, same value, same token ids; o1jax reads it back bit for bit; bfloat16 exports;
the model card's own example runs; bad output directories and workdirs get one sentence each."""

import io
import json
import os
import re

import numpy as np
import pytest
import safetensors
import sentencepiece
import torch
import transformers

from models import decoder, hf_io, presets
from o1jax import adapter, export, pretrained, thoughts
from o1jax.sampling.sampler import Sampler, SamplingParams

ROOT = thoughts.Node(parent=-1, index=0, meta="<problem>", text="Natalia sold clips to 48 of her friends in April, "
                     "and then she sold half as many clips in May. How many clips did she sell?", rating=None)
STEP_1 = thoughts.Node(parent=0, index=1, meta="", text="In May she sold 48/2 = 24 clips.", rating="<positive_rating>")
STEP_2 = thoughts.Node(parent=1, index=2, meta="<critic>", text=" The total is 48 + 24 = 72 clips.", rating=None)
# A policy prompt with a hint and a meta token, and a rating prompt: between them they hold every kind of token.
POLICY_PROMPT = thoughts.policy_prompt([ROOT, STEP_1], "<critic>", 2)
RATING_PROMPT = thoughts.rating_prompt([ROOT, STEP_1], STEP_2)
STEP_TOKENS = 16   # greedy tokens compared (a random model rarely writes <end_of_thought> on its own)

CORPUS = """\
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May? She sold 24 clips in May, so 72 in total.
Weng earns 12 dollars an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.
How much did she earn? She earns 0.2 dollars per minute, so she earned 10 dollars. The total is correct.
"""


def _sentencepiece_files() -> dict[str, bytes]:
  """A Gemma-like tokenizer: BPE with byte fallback, digits split, no dummy prefix, pad/eos/bos/unk = 0/1/2/3."""
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS.splitlines()), model_writer=model, vocab_size=320, hard_vocab_limit=False,
      model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=False,
      remove_extra_whitespaces=False, normalization_rule_name="identity", character_coverage=1.0, pad_id=0,
      eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
  return {"tokenizer.model": model.getvalue()}


def _random_weights(config, seed: int, scale: float = 0.2) -> dict:
  """Weights of a tiny decoder drawn with numpy (jax's eager random ops compile once per shape), larger than
  init_weights' 0.02 so that logits differ by more than the tolerances below."""
  rng = np.random.default_rng(seed)
  shapes = decoder.weight_shapes(config)
  norm_center = 0.0 if config.is_gemma else 1.0   # Gemma's norms scale by (1 + weight)

  def draw(name, shape):
    if name.endswith("norm"):
      return (norm_center + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (scale * rng.standard_normal(shape)).astype(np.float32)
  weights = {name: draw(name, shape) for name, shape in shapes.items() if name != "layers"}
  weights["layers"] = {name: draw(name, shape) for name, shape in shapes["layers"].items()}
  return weights


def _write_random_adapter(path: str, loaded: pretrained.Loaded, base: str, seed: int) -> None:
  """An adapter for `loaded` with every factor random (b too, so that the merge changes the weights) and random
  rows (and head columns) for the format's tokens."""
  rng = np.random.default_rng(seed)
  config = adapter.LoraConfig(rank=2, alpha=4.0)
  layers = loaded.model.weights()["layers"]
  factors = {"layers": {}}
  for target in config.targets:
    a_shape, b_shape = adapter.factor_shapes(tuple(layers[target].shape), target, config.rank)
    factors["layers"][target] = {"a": (0.2 * rng.standard_normal(a_shape)).astype(np.float32),
                                 "b": (0.2 * rng.standard_normal(b_shape)).astype(np.float32)}
  rows, dim = len(loaded.special_tokens), loaded.model.config.d_model
  new_head = (None if loaded.model.config.tie_embeddings
              else (0.5 * rng.standard_normal((dim, rows))).astype(np.float32))
  adapter.write(path, factors, config, new_rows=(0.5 * rng.standard_normal((rows, dim))).astype(np.float32),
                new_head=new_head, base=base, base_vocab=loaded.base_vocab, special_tokens=loaded.special_tokens)


@pytest.fixture(scope="module")
def llama_base(tiny_smollm2_checkpoint, tmp_path_factory) -> str:
  """The conftest's tiny tied Llama with SmolLM2's tokenizer, weights redrawn at a larger scale."""
  model = hf_io.load_pretrained(tiny_smollm2_checkpoint, dtype="float32")
  grown = decoder.Decoder(model.config, weights=_random_weights(model.config, seed=1))
  grown.tokenizer_files = model.tokenizer_files
  directory = str(tmp_path_factory.mktemp("llama_base"))
  hf_io.save_pretrained(grown, directory)
  return directory


@pytest.fixture(scope="module")
def gemma2_base(tmp_path_factory) -> str:
  """A tiny random untied Gemma-2 (sliding window 5) with a sentencepiece tokenizer, as a Hugging Face directory."""
  files = _sentencepiece_files()
  vocab_size = sentencepiece.SentencePieceProcessor(model_proto=files["tokenizer.model"]).get_piece_size()
  config = presets.get("tiny_gemma2", vocab_size=vocab_size, tie_embeddings=False)
  model = decoder.Decoder(config, weights=_random_weights(config, seed=2))
  model.tokenizer_files = files
  directory = str(tmp_path_factory.mktemp("gemma2_base"))
  hf_io.save_pretrained(model, directory)
  return directory


class Case:
  """A base model, an adapter for it, o1jax's adapted model, and the transformers model of its export."""

  def __init__(self, base: str, seed: int, directory):
    self.base = base
    self.adapter = str(directory / "adapter.safetensors")
    self.without_adapter = pretrained.load(base, dtype="float32")
    _write_random_adapter(self.adapter, self.without_adapter, base, seed)
    self.out = str(directory / "export")
    # What export returns is o1jax's adapted model: pretrained.load(base, adapter=..., dtype="float32").
    self.ours = export.export(export.Source(base=base, adapter=self.adapter), self.out)
    self.theirs = transformers.AutoModelForCausalLM.from_pretrained(self.out).eval()   # as the model card says
    self.hf_tokenizer = transformers.AutoTokenizer.from_pretrained(self.out)

  def ids(self, text: str) -> list[int]:
    ours = self.ours.tokenizer.encode(text)
    assert self.hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ours
    return ours

  def their_logits(self, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
      return self.theirs(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def case(request, tmp_path_factory) -> Case:
  base = request.getfixturevalue(f"{request.param}_base")
  return Case(base, seed={"llama": 12, "gemma2": 5}[request.param], directory=tmp_path_factory.mktemp(request.param))


def log_softmax(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_the_export_holds_the_files_transformers_needs(case):
  files = sorted(os.listdir(case.out))
  tokenizer = "tokenizer.json" if "tokenizer.json" in files else "tokenizer.model"
  assert files == sorted(["README.md", "config.json", "model.safetensors", tokenizer, "tokenizer_config.json"])
  config = json.load(open(os.path.join(case.out, "config.json")))
  assert config["torch_dtype"] == "float32" and config["vocab_size"] == case.ours.model.config.vocab_size
  assert case.theirs.dtype == torch.float32
  assert not [f for f in os.listdir(os.path.dirname(case.out)) if f.startswith(".")]   # no staging directory left


def test_every_format_token_is_one_id_of_the_autotokenizer(case):
  for token in thoughts.SPECIAL_TOKENS:
    want = case.ours.tokenizer.token_to_id(token)
    assert want is not None and want >= case.ours.base_vocab
    assert case.hf_tokenizer(token, add_special_tokens=False)["input_ids"] == [want]
    assert case.hf_tokenizer.convert_tokens_to_ids(token) == want
  assert len(case.hf_tokenizer) == case.ours.model.config.vocab_size
  ids = case.ids(RATING_PROMPT)
  assert case.hf_tokenizer.decode(ids, skip_special_tokens=True) == RATING_PROMPT   # format tokens are text


@pytest.mark.parametrize("prompt", [POLICY_PROMPT, RATING_PROMPT], ids=["policy", "rating"])
def test_log_probs_equal_the_adapted_model(case, prompt):
  """Every position's log-probs over the whole vocabulary; fp32 on both sides, so within 1e-4."""
  ids = case.ids(prompt)
  ours = log_softmax(case.ours.model(np.asarray([ids], np.int32))[0])
  theirs = log_softmax(case.their_logits(ids))
  np.testing.assert_array_less(np.abs(ours - theirs).max(), 1e-4)
  # The adapter is what is being compared: without it the log-probs are far off.
  base = case.without_adapter.model
  assert np.abs(log_softmax(base(np.asarray([ids], np.int32))[0]) - theirs).max() > 0.1


def _greedy_steps(case: Case, ids: list[int], stop: int) -> tuple[list[int], list[int]]:
  """(o1jax's sampler at temperature 0, transformers' greedy generate): STEP_TOKENS tokens or up to `stop`."""
  sampler = Sampler(case.ours.model, vocab=case.ours.tokenizer.vocab())
  samples = sampler.sample(sampler.prefill([ids], reserve=STEP_TOKENS), k=1, stop=[stop], max_new_tokens=STEP_TOKENS,
                           params=SamplingParams(temperature=0.0))
  with torch.no_grad():
    out = case.theirs.generate(torch.tensor([ids]), max_new_tokens=STEP_TOKENS, do_sample=False, eos_token_id=stop,
                               pad_token_id=stop)
  return samples.sequences()[0], out[0, len(ids):].tolist()


def test_greedy_generate_writes_the_samplers_step(case):
  ids = case.ids(POLICY_PROMPT)
  ours, theirs = _greedy_steps(case, ids, stop=case.ours.tokenizer.token_to_id(thoughts.END_THOUGHT))
  assert theirs == ours
  # The seeds are picked for a varied step (Gemma-2's ends with <end_of_thought> after 10 tokens, Llama's runs
  # the whole budget), not one token over and over.
  assert len(set(ours)) >= 6
  # Both stop at a stop token and keep it: stop at the last token the step writes for the first time.
  k = max(i for i, t in enumerate(ours[:-1]) if t not in ours[:i])
  stopped, theirs = _greedy_steps(case, ids, stop=ours[k])
  assert theirs == stopped == ours[:k + 1]


def test_the_value_read_from_transformers_logits_is_o1jax_value(case):
  ids = case.ids(RATING_PROMPT)
  positive, negative = (case.ours.tokenizer.token_to_id(t) for t in (thoughts.POSITIVE_RATING,
                                                                       thoughts.NEGATIVE_RATING))
  sampler = Sampler(case.ours.model, vocab=case.ours.tokenizer.vocab())
  ours = float(sampler.score_texts([ids], positive, negative)[0])
  logits = case.their_logits(ids)[-1]
  theirs = log_softmax(logits[[positive, negative]])[0]
  assert abs(ours - theirs) <= 1e-4
  assert -20 < ours < -0.01   # a value the adapter's rows decide, not log(1) or a saturated one


def test_o1jax_reads_back_the_same_model(case):
  reloaded = hf_io.load_pretrained(case.out, dtype="float32")
  assert reloaded.config == case.ours.model.config
  ours, theirs = case.ours.model.weights(), reloaded.weights()
  assert sorted(ours) == sorted(theirs) and sorted(ours["layers"]) == sorted(theirs["layers"])
  for name in ours:
    if name != "layers":
      np.testing.assert_array_equal(np.asarray(theirs[name]), np.asarray(ours[name]), err_msg=name)
  for name in ours["layers"]:
    np.testing.assert_array_equal(np.asarray(theirs["layers"][name]), np.asarray(ours["layers"][name]),
                                  err_msg=name)
  assert reloaded.tokenizer_files == case.ours.model.tokenizer_files
  again = pretrained.load(case.out, dtype="float32")   # the format's tokens are there: nothing is added
  assert again.base_vocab == case.ours.base_vocab and again.model.config == case.ours.model.config


def test_bfloat16_export(case, tmp_path):
  out = str(tmp_path / "bf16")
  export.write(case.ours, out, dtype="bfloat16", source=export.Source(base=case.base, adapter=case.adapter))
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
  # The weights are the float32 export's, rounded to nearest even, bit for bit.
  with safetensors.safe_open(os.path.join(out, "model.safetensors"), "pt") as bf16, \
       safetensors.safe_open(os.path.join(case.out, "model.safetensors"), "pt") as fp32:
    assert sorted(bf16.keys()) == sorted(fp32.keys())
    for name in fp32.keys():
      assert bf16.get_tensor(name).dtype == torch.bfloat16
      assert torch.equal(bf16.get_tensor(name), fp32.get_tensor(name).to(torch.bfloat16)), name
  theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert theirs.dtype == torch.bfloat16
  ids = case.ids(RATING_PROMPT)
  with torch.no_grad():
    bf16_logits = theirs(torch.tensor([ids])).logits[0].float().numpy()
  fp32_logits = case.their_logits(ids)
  # transformers runs a bfloat16 checkpoint in bfloat16 (activations too): 8 bits of mantissa in every matmul
  # output, amplified through these random layers. Measured: mean |logit difference| 1.7% (Llama) and 3.7%
  # (Gemma-2) of the logits' standard deviation; the model without its adapter is 100% away. 10% is loose and
  # still tells a wrong or misplaced weight from rounding.
  assert np.abs(bf16_logits - fp32_logits).mean() < 0.1 * fp32_logits.std()


def test_the_model_cards_example_runs(case):
  """README.md names the base and the adapter, and its transformers snippet gives o1jax's value and step."""
  card = open(os.path.join(case.out, "README.md")).read()
  assert case.base in card and case.adapter in card and "rank 2, alpha 4" in card
  assert re.search(r"sha256 `[0-9a-f]{64}`", card)
  for token in thoughts.SPECIAL_TOKENS:
    assert f"| {case.ours.tokenizer.token_to_id(token)} | `{token}` |" in card
  snippet = card.split("## Loading with transformers")[1].split("```python\n")[1].split("```")[0]
  snippet = snippet.replace('"path/to/export"', repr(case.out)).replace("max_new_tokens=64", "max_new_tokens=4")
  scope = {}
  exec(snippet, scope)
  ids = case.ours.tokenizer.encode(scope["rating_prompt"])
  positive, negative = (case.ours.tokenizer.token_to_id(t) for t in (thoughts.POSITIVE_RATING,
                                                                       thoughts.NEGATIVE_RATING))
  logits = case.ours.model(np.asarray([ids], np.int32))[0, -1]
  assert abs(float(scope["value"]) - log_softmax(np.asarray(logits)[[positive, negative]])[0]) <= 1e-4
  assert scope["step"] == case.ours.tokenizer.decode(scope["out"][0, len(case.ours.tokenizer.encode(
      scope["policy_prompt"])):].tolist())


# --- output directories and workdirs ----------------------------------------------------------------------------

def test_output_directory_checks(tmp_path):
  export.check_out_dir(str(tmp_path / "new"))            # new
  (tmp_path / "empty").mkdir()
  export.check_out_dir(str(tmp_path / "empty"))          # empty
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError, match="output path .*file' exists and is not a directory"):
    export.check_out_dir(str(tmp_path / "file"))
  earlier = tmp_path / "earlier"
  earlier.mkdir()
  for name in ("config.json", "model-00001-of-00002.safetensors", "README.md", "tokenizer.json"):
    (earlier / name).write_text("x")
  with pytest.raises(ValueError, match=r"'.*earlier' exists and is not empty \(it holds 'README.md', 'config.json', "
                     r"'model-00001-of-00002.safetensors' and 1 more\); choose a new directory, or pass --overwrite"):
    export.check_out_dir(str(earlier))
  export.check_out_dir(str(earlier), overwrite=True)     # an earlier export: replaced
  (earlier / "notes.txt").write_text("mine")
  (earlier / "runs").mkdir()
  with pytest.raises(ValueError, match=r"holds 'notes.txt', 'runs', which an export does not write; --overwrite "
                     "replaces only an earlier export"):
    export.check_out_dir(str(earlier), overwrite=True)
  with pytest.raises(ValueError, match=r"export dtype 'float16' is not one of \('float32', 'bfloat16'\)"):
    export.prepare(export.Source(base="nowhere"), str(tmp_path / "new"), dtype="float16")


def test_overwrite_replaces_an_earlier_export_and_nothing_is_left_over(case, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")   # would be read with the new weights
  (out / "tokenizer.model").write_bytes(b"stale")                         # would describe another vocabulary
  source = export.Source(base=case.base, adapter=case.adapter)
  with pytest.raises(ValueError, match="exists and is not empty"):
    export.write(case.ours, str(out), dtype="float32", source=source)
  export.write(case.ours, str(out), dtype="float32", source=source, overwrite=True)
  assert sorted(os.listdir(out)) == sorted(os.listdir(case.out))
  assert oct(os.stat(out / "model.safetensors").st_mode & 0o444) == oct(0o444)   # readable by everyone
  assert sorted(os.listdir(tmp_path)) == ["out"]


def _workdir(tmp_path, config=None, adapter_bytes=b"x"):
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  if config is not None:
    (workdir / "config.json").write_text(config)
  if adapter_bytes is not None:
    (workdir / "adapter.safetensors").write_bytes(adapter_bytes)
  return str(workdir)


def test_from_workdir(tmp_path):
  workdir = _workdir(tmp_path, json.dumps({"model": {"path": "smollm2-135m-instruct", "adapter": "a"}}))
  assert export.from_workdir(workdir) == export.Source(base="smollm2-135m-instruct",
                                                        adapter=os.path.join(workdir, "adapter.safetensors"),
                                                        workdir=workdir)
  assert export.from_workdir(workdir, base="other").base == "other"


@pytest.mark.parametrize("config, adapter_bytes, message", [
    (None, None, "has no adapter.safetensors; expected a workdir of a LoRA self-play run"),
    (None, b"x", "has no config.json naming its base model"),
    ("{not json", b"x", r"config.json' is not valid JSON \(.*\); expected the config.json launch.train writes"),
    ('{"model": {"adapter": ""}}', b"x", "config.json' has no model.path naming the base model"),
], ids=["no_adapter", "no_config", "bad_json", "no_model_path"])
def test_workdir_errors(tmp_path, config, adapter_bytes, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    export.from_workdir(_workdir(tmp_path, config, adapter_bytes))


def test_missing_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match="checkpoint directory .*nowhere' does not exist"):
    export.from_workdir(str(tmp_path / "nowhere"))



