"""Format pretraining end to end on a tiny model: it learns, and a killed run resumes to the same result."""

import json
import os
import shutil

import numpy as np
import pytest
import safetensors.numpy

from configs import smollm2_format_pretrain
from o1jax import thoughts
from o1jax.learn import pretrain


def _config(checkpoint: str, adapter_path: str):
  config = smollm2_format_pretrain.get_config()
  config.model.path = checkpoint
  config.lora.rank = 2
  config.data.count = 6
  config.data.seq_len = 64
  config.data.batch_size = 8          # one row per fake device
  config.optimizer.learning_rate = 3e-2
  config.optimizer.warmup_steps = 1
  config.train.steps = 6
  config.train.log_every = 1
  config.eval.count = 2
  config.eval.every = 6
  config.eval.batches = 1
  config.checkpoint.every = 3
  config.checkpoint.keep = 5
  config.output.adapter_path = adapter_path
  config.output.adapter_dtype = "float32"
  return config


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_build_records_is_deterministic_and_mixes_three_kinds():
  first = pretrain.build_records("gsm8k_train", 3, seed=0)
  assert first == pretrain.build_records("gsm8k_train", 3, seed=0)
  assert first != pretrain.build_records("gsm8k_train", 3, seed=1)
  trees = [r for r in first if isinstance(r, str)]
  pairs = [r for r in first if isinstance(r, tuple)]
  assert len(trees) == 3 and all(thoughts.parse(t) for t in trees)
  ratings = [target for _, target in pairs if target.startswith(("<positive_rating>", "<negative_rating>"))]
  assert ratings and len(ratings) < len(pairs)          # both rating pairs and policy pairs
  assert {pretrain.rating_target(True), pretrain.rating_target(False)} == set(ratings)


def test_killed_run_resumes_to_the_same_adapter(tiny_smollm2_checkpoint, tmp_path):
  """Run 6 steps; then delete the step-6 checkpoint (a run killed after step 3's save) and run again: it resumes
  at step 3 with the same next batch and writes a bit-identical adapter."""
  workdir, adapter = str(tmp_path / "run"), str(tmp_path / "adapter.safetensors")
  pretrain.run(_config(tiny_smollm2_checkpoint, adapter), workdir)
  first = safetensors.numpy.load_file(adapter)
  losses = [m["loss"] for m in _metrics(workdir) if m["split"] == "train"]
  assert len(losses) == 6 and losses[-1] < losses[0], losses

  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  os.remove(adapter)
  pretrain.run(_config(tiny_smollm2_checkpoint, adapter), workdir)
  second = safetensors.numpy.load_file(adapter)
  assert sorted(first) == sorted(second)
  for name in first:
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)
  resumed = [m for m in _metrics(workdir) if m["split"] == "train"][6:]
  assert [m["step"] for m in resumed] == [4, 5, 6]
  np.testing.assert_allclose([m["loss"] for m in resumed], losses[3:], rtol=1e-6)


def test_write_adapter_needs_lora(tiny_smollm2_checkpoint, tmp_path):
  config = _config(tiny_smollm2_checkpoint, str(tmp_path / "a.safetensors"))
  config.lora.rank = 0
  with pytest.raises(ValueError, match="needs LoRA training \\(lora.rank > 0\\)"):
    pretrain.run(config, str(tmp_path / "run"))
