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


def _rating_config(checkpoint: str, init_adapter: str, adapter_path: str):
  config = _config(checkpoint, adapter_path)
  config.data.kinds = ("rating",)
  config.train.loss = "rating"
  config.train.frozen_layers = 1
  config.train.init_adapter = init_adapter
  config.train.steps = 3
  config.eval.every = 3
  config.checkpoint.every = 3
  return config


def test_rating_continuation_starts_from_the_adapter_and_keeps_frozen_layers(tiny_smollm2_checkpoint, tmp_path):
  """A rating-loss run initialised from an earlier adapter: the frozen bottom layer's LoRA factors come out as
  they went in (so they were loaded, not freshly drawn), the layers above change, and the rating metrics
  (two-way loss and accuracy over rated rows only) are logged."""
  first = str(tmp_path / "format.safetensors")
  config = _config(tiny_smollm2_checkpoint, first)
  config.train.steps = 2
  pretrain.run(config, str(tmp_path / "format"))
  second = str(tmp_path / "rating.safetensors")
  pretrain.run(_rating_config(tiny_smollm2_checkpoint, first, second), str(tmp_path / "rating"))
  before, after = safetensors.numpy.load_file(first), safetensors.numpy.load_file(second)
  lora_keys = [k for k in before if k.startswith("layers.")]
  assert lora_keys
  for key in lora_keys:
    np.testing.assert_array_equal(before[key][0], after[key][0], err_msg=key)
  assert any(not np.array_equal(before[k][1:], after[k][1:]) for k in lora_keys if k.endswith(".b"))
  metrics = _metrics(str(tmp_path / "rating"))
  train = [m for m in metrics if m["split"] == "train"]
  evals = [m for m in metrics if m["split"] == "eval"]
  assert len(train) == 3 and len(evals) == 1
  assert all(0.0 <= m["accuracy"] <= 1.0 and m["loss"] > 0 for m in train + evals)


@pytest.mark.parametrize("change, message", [
    (dict(loss="value"), "train.loss='value'; expected 'next_token' or 'rating'"),
    (dict(kinds=("rating", "trees")), "trains on rating records only"),
    (dict(kinds=("ratings",)), "data.kinds=\\('ratings',\\); expected a non-empty subset"),
    (dict(rank=4), "holds a LoRA of"),
])
def test_rating_run_rejects_bad_settings(tiny_smollm2_checkpoint, tmp_path, change, message):
  adapter = str(tmp_path / "format.safetensors")
  config = _config(tiny_smollm2_checkpoint, adapter)
  config.train.steps = 1
  pretrain.run(config, str(tmp_path / "format"))
  config = _rating_config(tiny_smollm2_checkpoint, adapter, str(tmp_path / "out.safetensors"))
  config.train.loss = change.get("loss", config.train.loss)
  config.data.kinds = change.get("kinds", config.data.kinds)
  config.lora.rank = change.get("rank", config.lora.rank)
  with pytest.raises(ValueError, match=message):
    pretrain.run(config, str(tmp_path / "rating"))


@pytest.mark.parametrize("change, message", [
    (dict(kinds=("ratings",)), "data.kinds=\\('ratings',\\); expected a non-empty subset"),
    (dict(loss="value"), "train.loss='value'; expected 'next_token' or 'rating'"),
    (dict(targets=("qkv",)), "unknown LoRA target 'qkv'"),
    (dict(batch_size=3), "data.batch_size=3 does not split over the mesh's 8 batch shards"),
])
def test_prepare_checks_the_config_before_reading_any_file(tmp_path, change, message):
  """A bad setting fails at once: before the model (a path that does not exist here) is read, and before the
  work directory is made."""
  config = _config(str(tmp_path / "no_model"), str(tmp_path / "adapter.safetensors"))
  config.data.kinds = change.get("kinds", config.data.kinds)
  config.train.loss = change.get("loss", config.train.loss)
  config.lora.targets = change.get("targets", config.lora.targets)
  config.data.batch_size = change.get("batch_size", config.data.batch_size)
  with pytest.raises(ValueError, match=message):
    pretrain.prepare(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
