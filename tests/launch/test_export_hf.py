"""launch.export_hf as a user runs it: the real SmolLM2-135M with the committed rating adapter exported and run by
transformers as o1jax runs it (same step, same value), a self-play workdir exported, and every bad input one line
`error: ...` on stderr with exit status 2 (the numerical checks on tiny models: tests/o1jax/test_export.py)."""

import functools
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import safetensors
import torch
import transformers

from configs import smollm2_selfplay
from o1jax import adapter, pretrained, thoughts, value as value_lib
from o1jax.sampling.sampler import Sampler, SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")   # absl's and XLA's log lines, not the error
RATING_ADAPTER = "configs/adapters/smollm2_135m_rating.safetensors"
NATALIA = thoughts.Node(parent=-1, index=0, meta="<problem>", text="Natalia sold clips to 48 of her friends in April, "
                        "and then she sold half as many clips in May. How many clips did Natalia sell altogether in "
                        "April and May?", rating=None)   # GSM8K train problem 0


def _command(*args: str) -> list[str]:
  return [sys.executable, "-m", "launch.export_hf", *args]


def _env() -> dict[str, str]:
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def _launch(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(_command(*args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _error_line(result: subprocess.CompletedProcess) -> str:
  lines = [line for line in result.stderr.splitlines() if line.strip() and not _LOG_LINE.match(line)]
  assert "Traceback" not in result.stderr and result.returncode == 2, (result.returncode, result.stderr)
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  return lines[0].removeprefix("error: ")


def _write_adapter(path, loaded: pretrained.Loaded, *, base: str, base_vocab: int | None = None, seed: int = 0):
  """A random adapter for `loaded` (b factors not zero) in the format launch.pretrain and self-play write."""
  rng = np.random.default_rng(seed)
  config = adapter.LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "down"))
  layers = loaded.model.weights()["layers"]
  factors = {"layers": {}}
  for target in config.targets:
    shapes = adapter.factor_shapes(tuple(layers[target].shape), target, config.rank)
    factors["layers"][target] = {name: (0.2 * rng.standard_normal(shape)).astype(np.float32)
                                 for name, shape in zip(("a", "b"), shapes)}
  rows = (0.5 * rng.standard_normal((len(loaded.special_tokens), loaded.model.config.d_model))).astype(np.float32)
  adapter.write(str(path), factors, config, new_rows=rows, base=base,
                base_vocab=loaded.base_vocab if base_vocab is None else base_vocab,
                special_tokens=loaded.special_tokens)


@pytest.fixture(scope="module")
def tiny(tiny_smollm2_checkpoint):
  return pretrained.load(tiny_smollm2_checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def workdir(tiny, tiny_smollm2_checkpoint, tmp_path_factory) -> str:
  """A self-play workdir as o1jax/selfplay.py leaves it after a round: the run's config.json (model.path the
  base) and adapter.safetensors (written with base=config.model.path), beside checkpoints it does not read."""
  directory = tmp_path_factory.mktemp("selfplay")
  config = smollm2_selfplay.get_config()
  config.model.path = tiny_smollm2_checkpoint
  (directory / "config.json").write_text(config.to_json_best_effort(indent=2))
  (directory / "checkpoints").mkdir()
  _write_adapter(directory / "adapter.safetensors", tiny, base=tiny_smollm2_checkpoint, seed=1)
  return str(directory)


def test_a_self_play_workdir_exports_and_transformers_runs_it(tiny, tiny_smollm2_checkpoint, workdir, tmp_path):
  out = str(tmp_path / "export")
  result = _launch(f"--checkpoint={workdir}", f"--out={out}")
  assert result.returncode == 0, result.stderr
  assert f"exported {tiny_smollm2_checkpoint} + {workdir}/adapter.safetensors (float32) to {out}" in result.stdout
  card = open(os.path.join(out, "README.md")).read()
  assert f"self-play workdir: `{workdir}`" in card
  ours = pretrained.load(tiny_smollm2_checkpoint, adapter=os.path.join(workdir, "adapter.safetensors"),
                         dtype="float32")
  ids = ours.tokenizer.encode(thoughts.policy_prompt([thoughts.Node(-1, 0, "<problem>", "1+1?", None)], "", 1))
  theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    logits = theirs(torch.tensor([ids])).logits[0].numpy()
  np.testing.assert_allclose(logits, np.asarray(ours.model(np.asarray([ids], np.int32))[0]), atol=1e-4)

  # Again into the same directory: refused, then replaced with --overwrite (here in bfloat16).
  assert "exists and is not empty" in _error_line(_launch(f"--checkpoint={workdir}", f"--out={out}"))
  result = _launch(f"--checkpoint={workdir}", f"--out={out}", "--overwrite", "--dtype=bfloat16")
  assert result.returncode == 0, result.stderr
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
  with safetensors.safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
    assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}


@pytest.fixture(scope="module")
def bad_inputs(tiny, tiny_smollm2_checkpoint, tmp_path_factory):
  """Files for the error cases: adapters for another model, a corrupt one, broken workdirs, a full directory."""
  d = tmp_path_factory.mktemp("bad")
  _write_adapter(d / "other_base.safetensors", tiny, base="HuggingFaceTB/SmolLM2-360M-Instruct")
  _write_adapter(d / "other_vocab.safetensors", tiny, base=tiny_smollm2_checkpoint, base_vocab=49_000)
  (d / "corrupt.safetensors").write_bytes(bytes(range(256)) * 8)   # a header length of 2^58 bytes
  (d / "full").mkdir()
  (d / "full" / "notes.txt").write_text("mine")
  (d / "no_adapter").mkdir()
  (d / "no_adapter" / "config.json").write_text("{}")
  (d / "bad_config").mkdir()
  (d / "bad_config" / "config.json").write_text("{'model': ")
  (d / "bad_config" / "adapter.safetensors").write_bytes(b"")
  (d / "corrupt_adapter").mkdir()
  (d / "corrupt_adapter" / "config.json").write_text(json.dumps({"model": {"path": tiny_smollm2_checkpoint}}))
  (d / "corrupt_adapter" / "adapter.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"not json")
  return d


# (arguments, the error sentence) with {d} the bad_inputs directory and {base} the tiny checkpoint. A sentence
# ending in "(" is the start of the line, whose rest quotes another library (a JSON or safetensors error, a list).
BAD_INPUTS = {
    "output_not_empty": (["--model=/nowhere", "--out={d}/full"],
                         "output directory '{d}/full' exists and is not empty (it holds 'notes.txt'); choose a new "
                         "directory, or pass --overwrite to replace an earlier export there."),
    "another_base": (["--model={base}", "--adapter={d}/other_base.safetensors"],
                     "adapter '{d}/other_base.safetensors' was trained on 'HuggingFaceTB/SmolLM2-360M-Instruct', "
                     "not on '{base}'."),
    "another_vocabulary": (["--model={base}", "--adapter={d}/other_vocab.safetensors"],
                           "adapter '{d}/other_vocab.safetensors' was trained for special tokens from id 49000 ("),
    "missing_adapter": (["--model={base}", "--adapter={d}/missing.safetensors"],
                        "adapter '{d}/missing.safetensors' does not exist; run launch.pretrain to make one."),
    "corrupt_adapter": (["--model={base}", "--adapter={d}/corrupt.safetensors"],
                        "LoRA adapter file '{d}/corrupt.safetensors' is not a valid safetensors file (header too "
                        "large); expected a LoRA adapter written by launch.pretrain (o1jax.adapter.write)."),
    "missing_model": (["--model={d}/nowhere"], "model '{d}/nowhere' is neither a packaged model ("),
    "missing_checkpoint": (["--checkpoint={d}/nowhere"],
                           "checkpoint directory '{d}/nowhere' does not exist; expected a self-play workdir written "
                           "by launch.train."),
    "checkpoint_without_adapter": (["--checkpoint={d}/no_adapter"],
                                   "checkpoint directory '{d}/no_adapter' has no adapter.safetensors; expected a "
                                   "workdir of a LoRA self-play run (launch.train) with at least one finished round."),
    "checkpoint_with_bad_config": (["--checkpoint={d}/bad_config"],
                                   "run config '{d}/bad_config/config.json' is not valid JSON ("),
    "checkpoint_with_corrupt_adapter": (["--checkpoint={d}/corrupt_adapter"],
                                        "LoRA adapter file '{d}/corrupt_adapter/adapter.safetensors' is not a valid "
                                        "safetensors file ("),
    "no_model": ([], "pass --model (a base model, with --adapter to merge) or --checkpoint (a self-play workdir)."),
    "adapter_and_checkpoint": (["--checkpoint={d}/no_adapter", "--adapter={d}/other_base.safetensors"],
                               "--adapter and --checkpoint both name the adapter to merge; pass one of them."),
    "bad_dtype": (["--model={base}", "--dtype=float16"], "flag --dtype=float16: value should be one of "
                  "<float32|bfloat16>."),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_sentence_and_exit_status_2(case, bad_inputs, tiny_smollm2_checkpoint, tmp_path):
  args, sentence = BAD_INPUTS[case]
  fill = lambda s: s.format(d=bad_inputs, base=tiny_smollm2_checkpoint)
  args = [fill(a) for a in args]
  if not any(a.startswith("--out=") for a in args):
    args.append(f"--out={tmp_path / 'export'}")
  line = _error_line(_launch(*args))
  assert line.startswith(fill(sentence)) if sentence.endswith("(") else line == fill(sentence), line
  assert not os.path.exists(tmp_path / "export")
  assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]   # no half-written export


def test_real_smollm2_with_the_rating_adapter(tmp_path):
  """The packaged SmolLM2-135M-Instruct + the committed rating adapter, end to end through the launcher: the
  exported model's greedy step on a GSM8K policy prompt and its value of that step are o1jax's."""
  out = str(tmp_path / "export")
  launcher = subprocess.Popen(_command("--model=smollm2-135m-instruct", f"--adapter={RATING_ADAPTER}", f"--out={out}"),
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    # o1jax's side while the launcher exports (both spend seconds dequantizing the GGUF file).
    ours = pretrained.load("smollm2-135m-instruct", adapter=RATING_ADAPTER, dtype="float32")
    ids = ours.tokenizer.encode(thoughts.policy_prompt([NATALIA], "", 1))
    end, start_rating, positive, negative = (ours.tokenizer.token_to_id(t) for t in (
        thoughts.END_THOUGHT, thoughts.START_RATING, thoughts.POSITIVE_RATING, thoughts.NEGATIVE_RATING))
    sampler = Sampler(ours.model, vocab=ours.tokenizer.vocab())
    # Both prompts in one prompt bucket and cache size, so that the prefill compiles once (seconds on this CPU).
    prefill = functools.partial(sampler.prefill, reserve=32, bucket=128)
    samples = sampler.sample(prefill([ids]), k=1, stop=[end], max_new_tokens=32, params=SamplingParams(temperature=0))
    step = samples.sequences()[0]
    assert samples.stopped[0] and len(step) > 5   # a whole step ending in <end_of_thought>, as trained
    rating_ids = ids + step + [start_rating]
    value = float(value_lib.value(prefill([rating_ids]).logits, positive, negative)[0])   # what score_texts reads
    stdout, stderr = launcher.communicate(timeout=300)
  finally:
    if launcher.poll() is None:   # a failure above: do not leave the export running
      launcher.kill()
      launcher.communicate()
  assert launcher.returncode == 0, stderr
  assert stdout.strip() == f"exported smollm2-135m-instruct + {RATING_ADAPTER} (float32) to {out}"

  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  for token in thoughts.SPECIAL_TOKENS:
    assert tokenizer(token, add_special_tokens=False)["input_ids"] == [ours.tokenizer.token_to_id(token)]
  assert tokenizer(thoughts.policy_prompt([NATALIA], "", 1), add_special_tokens=False)["input_ids"] == ids
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    generated = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=end,
                               pad_token_id=end)[0, len(ids):].tolist()
    logits = model(torch.tensor([rating_ids])).logits[0, -1].numpy().astype(np.float64)
  assert generated == step, (tokenizer.decode(generated), ours.tokenizer.decode(step))
  pair = logits[[positive, negative]]
  their_value = pair[0] - np.logaddexp(pair[0], pair[1])
  assert abs(their_value - value) <= 1e-4 and value < 0

  card = open(os.path.join(out, "README.md")).read()
  assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "dequantized to float32" in card
  assert hashlib.sha256(open(RATING_ADAPTER, "rb").read()).hexdigest() in card
