"""o1jax.plan: bytes per device on an AbstractMesh, against hand computations and against arrays really placed on
the 8 fake CPU devices by the code that places them (Learner.place, Sampler, Sampler.prefill)."""

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from models import decoder
from o1jax import parallel, plan, selfplay
from o1jax.learn import learner as learner_lib
from o1jax.learn import lm
from o1jax.sampling.sampler import Sampler

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GiB = 1 << 30
FAKE = plan.Topology(name="fake-8", chips=8, hbm_bytes=64 * GiB)   # the 8 fake CPU devices


def load_config(path: str, *parameter: str):
  spec = importlib.util.spec_from_file_location("config_under_test", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*parameter)


def tiny_selfplay(preset: str = "tiny_llama", *, mesh=(2, 2, 2), dtype: str = "float32"):
  """configs/smollm2_selfplay.py on a tiny preset with a fresh rank-4 LoRA."""
  config = load_config("configs/smollm2_selfplay.py")
  config.model.preset = preset
  config.model.adapter = ""
  config.model.dtype = dtype
  config.lora.rank, config.lora.alpha = 4, 8.0
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  config.experience.seq_len = 64
  config.learner.accumulate = 1
  return config


def device_bytes_of(tree, device) -> int:
  """Bytes of the shards of every (non-scalar) array of a pytree that live on `device`."""
  return sum(s.data.nbytes for a in jax.tree.leaves(tree) if a.ndim
             for s in a.addressable_shards if s.device == device)


def test_bytes_of_a_sharded_weight_by_hand():
  L, D, F = 6, 64, 96
  abstract = plan.abstract_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  spec = parallel.logical_spec(("layers", "embed", "mlp"), (L, D, F), abstract)
  assert spec == P(None, "fsdp", None)
  assert plan.device_bytes((L, D, F), jnp.bfloat16, spec, abstract) == L * D * F * 2 // 4
  real = parallel.make_mesh(data=2, fsdp=4)
  placed = jax.jit(lambda: jnp.zeros((L, D, F), jnp.bfloat16), out_shardings=NamedSharding(real, spec))()
  assert {s.data.nbytes for s in placed.addressable_shards} == {L * D * F * 2 // 4}
  # tensor=2 splits the mlp axis as well; a kv-head axis of 3 does not divide and stays whole.
  abstract = plan.abstract_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  assert plan.device_bytes((L, D, F), np.float32, parallel.logical_spec(("layers", "embed", "mlp"), (L, D, F),
                                                                        abstract), abstract) == L * D * F * 4 // 8
  k_spec = parallel.logical_spec(("layers", "embed", "kv_heads", "head_dim"), (L, D, 3, 8), abstract)
  assert plan.device_bytes((L, D, 3, 8), np.float32, k_spec, abstract) == L * D * 3 * 8 * 4 // 4


@pytest.mark.parametrize("name, chips, hbm", [("v4-8", 4, 32), ("v5e-16", 16, 16), ("v5litepod-16", 16, 16),
                                              ("v5p-64", 32, 95), ("v6e-16", 16, 32), ("v4-32", 16, 32)])
def test_topologies(name, chips, hbm):
  top = plan.topology(name)
  assert (top.chips, top.hbm_bytes) == (chips, hbm * GiB)


@pytest.mark.parametrize("name, message", [
    ("v5e", "topology 'v5e' is not a TPU topology; expected <generation>-<size>"),
    ("v3-8", "topology 'v3-8' has the unknown TPU generation 'v3'"),
    ("v4-7", "topology 'v4-7': v4 sizes count 2 cores per chip, so the size must be a positive multiple of 2."),
])
def test_bad_topologies(name, message):
  with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
    plan.topology(name)


@pytest.mark.parametrize("preset, dtype", [("tiny_llama", "float32"), ("tiny_gemma2", "bfloat16")])
def test_plan_matches_arrays_placed_on_the_fake_devices(preset, dtype):
  """The planner's parameter, optimizer, sampler and cache bytes per device equal those of the real arrays,
  placed by Learner.place, Sampler.set_weights and Sampler.prefill on a (2, 2, 2) mesh of the 8 CPU devices."""
  config = tiny_selfplay(preset, dtype=dtype)
  report = plan.plan(config, FAKE, backend="cpu", question_tokens=20)
  sections = report.section_bytes()
  assert report.mesh == {"data": 2, "fsdp": 2, "tensor": 2}

  dconfig, base_vocab, _ = plan.decoder_config(config)
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  device = mesh.devices.flat[0]
  model = lm.Model(config=dconfig, base_vocab=base_vocab, lora=plan._lora_config(config))
  frozen, trainable = model.split(decoder.init_weights(dconfig, jax.random.key(0)), jax.random.key(1))
  optimizer = selfplay.optimizer_config(config).make()
  learner = learner_lib.Learner(model, optimizer, mesh, selfplay.learner_config(config),
                                selfplay.experience_config(config), (0, 1))
  frozen, state = learner.place(frozen, lm.init_state(trainable, optimizer))
  assert device_bytes_of(frozen, device) == sections["frozen"]
  assert device_bytes_of(state["trainable"], device) == sections["trainable"]
  assert device_bytes_of(state["opt_state"], device) == sections["optimizer"]
  # Sharding did something: fsdp and tensor split the base weights below a replicated copy.
  assert sections["frozen"] < sum(a.nbytes for a in jax.tree.leaves(frozen)) / 2

  sampler = Sampler(decoder.Decoder(dconfig, weights=model.merged(frozen, state["trainable"])), mesh=mesh)
  assert device_bytes_of(sampler.weights, device) == sections["sampler"]

  prefix = sampler.prefill([[1, 2, 3], [4] * 40, [5] * 7], reserve=24)
  cache = prefix.cache
  entry = plan.cache_entry("prefill", dconfig, cache.batch_size, cache.num_slots, plan.abstract_mesh(report.mesh),
                           ("search",))
  assert entry.bytes == device_bytes_of((cache.k, cache.v, cache.positions, prefix.logits), device)
  # By hand: 4 rows over data x fsdp = 4, the 2 kv heads over tensor = 2, keys and values of every layer.
  c = dconfig
  kv = 2 * c.num_layers * (cache.batch_size // 4) * (c.num_kv_heads // 2) * c.head_dim * cache.num_slots
  assert entry.bytes - device_bytes_of((cache.positions, prefix.logits), device) == kv * np.dtype(c.dtype).itemsize


def test_solve_config_plans_the_replicated_sampler():
  """launch/solve.py runs on an all-data mesh: the sampler's weights are whole on every device, and the
  checkpoint is freed after loading (load phase only)."""
  config = load_config("configs/smollm2_gsm8k.py")
  config.model.preset = "tiny_gemma2"
  config.model.adapter = ""
  report = plan.plan(config, FAKE, question_tokens=20)
  assert report.kind == "solve" and report.mesh == {"data": 8, "fsdp": 1, "tensor": 1}
  assert set(report.phases) == {"load", "search"}
  dconfig, _, _ = plan.decoder_config(config)
  whole = sum(math.prod(s) * 4 for s in jax.tree.leaves(decoder.weight_shapes(dconfig),
                                                       is_leaf=lambda x: isinstance(x, tuple)))
  assert report.section_bytes()["sampler"] == whole      # fused q/k/v and gate/up hold the same numbers
  assert report.section_bytes("search").get("checkpoint", 0) == 0


def test_a_tiny_config_fits_and_a_huge_one_names_the_loader():
  config = tiny_selfplay()
  report = plan.plan(config, FAKE, question_tokens=20)
  assert report.fits and plan.advice(config, FAKE, question_tokens=20) is None
  summary = report.summary()
  assert summary["fits"] is True and summary["bytes_per_device"] == report.peak == max(report.phases.values())
  json.dumps(summary)

  huge = copy.deepcopy(config)
  huge.model.preset = "gemma2_27b"
  huge.model.dtype = "bfloat16"
  huge.mesh.data, huge.mesh.fsdp, huge.mesh.tensor = -1, 8, 1
  small = plan.Topology(name="fake-8", chips=8, hbm_bytes=16 * GiB)
  sentence = plan.advice(huge, small, question_tokens=20)
  assert sentence.startswith("self-play with gemma2_27b does not fit fake-8 (8 chips x 16.00 GiB): its load phase "
                             "needs ")
  assert sentence.endswith("no mesh or batch setting changes that, because o1jax.pretrained.load reads the whole "
                           "checkpoint onto one device before sharding it: use a chip with more HBM or a smaller "
                           "model.")


def test_advice_names_more_fsdp_when_the_weights_decide():
  """A full fine-tune of SmolLM2 shapes on data-parallel devices: raising fsdp is the first change that fits."""
  config = tiny_selfplay("smollm2_135m", mesh=(8, 1, 1))
  config.lora.rank = 0
  data_parallel = plan.plan(config, FAKE, load="sharded", question_tokens=20)
  sharded = copy.deepcopy(config)
  sharded.mesh.data, sharded.mesh.fsdp = -1, 8
  fsdp8 = plan.plan(sharded, FAKE, load="sharded", question_tokens=20)
  assert fsdp8.peak < data_parallel.peak
  budget = (fsdp8.peak + data_parallel.peak) / 2 / plan.USABLE_FRACTION
  tight = plan.Topology(name="fake-8", chips=8, hbm_bytes=int(budget))
  sentence = plan.advice(config, tight, load="sharded", question_tokens=20)
  assert " the largest part; raise mesh.fsdp to " in sentence, sentence
  fsdp = int(sentence.split("raise mesh.fsdp to ")[1].split()[0])
  named = copy.deepcopy(config)
  named.mesh.data, named.mesh.fsdp = -1, fsdp
  assert plan.plan(named, tight, load="sharded", question_tokens=20).fits
  if fsdp > 2:
    named.mesh.fsdp = fsdp // 2
    assert not plan.plan(named, tight, load="sharded", question_tokens=20).fits


def test_kv_cache_follows_the_search_batch():
  config = tiny_selfplay()
  base = plan.plan(config, FAKE, question_tokens=20).section_bytes()["kv_cache"]
  config.sampling.max_rows //= 2
  config.data.problems_per_round //= 2
  assert plan.plan(config, FAKE, question_tokens=20).section_bytes()["kv_cache"] == pytest.approx(base / 2, rel=0.01)


def test_a_path_longer_than_the_largest_bucket_is_one_sentence():
  config = tiny_selfplay()
  config.mcts.max_depth = 40
  # 20 + (40 + 1) lines x 16 format tokens + 40 steps x 64 tokens = 3236.
  with pytest.raises(ValueError, match=r"^a search path of up to 3236 tokens \(a 20-token question and 40 steps of "
                                       r"up to sampling.max_new_tokens=64\) exceeds the sampler's largest prompt "
                                       r"bucket \(2048\); lower mcts.max_depth or sampling.max_new_tokens.$"):
    plan.plan(config, FAKE, question_tokens=20)


@pytest.mark.parametrize("path, topology", [("configs/gemma2_2b_gsm8k.py", "v5e-16"),
                                            ("configs/llama3_1_8b_math.py", "v4-8")])
def test_accelerator_configs_pass_the_launchers_checks(path, topology, tmp_path):
  from o1jax.search import solve
  train = load_config(path)
  top = plan.topology(topology)
  selfplay.check(train, plan.abstract_mesh(plan.mesh_axes(train.mesh, top.chips)))
  assert train.model.dtype == "bfloat16"
  job = solve.prepare(load_config(path, "solve"), str(tmp_path))
  assert job.total == load_config(path, "solve").num_problems


def launch_plan(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "launch.plan", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def test_launch_plan_fits_gemma_on_v5e_16():
  result = launch_plan("--config=configs/gemma2_2b_gsm8k.py", "--topology=v5e-16")
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout.splitlines()[-1])
  assert summary["fits"] is True and summary["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1}
  assert summary["bytes_per_device"] <= summary["usable_bytes"] < 16 * GiB


def test_launch_plan_refuses_llama_on_v4_8_with_one_sentence():
  result = launch_plan("--config=configs/llama3_1_8b_math.py", "--topology=v4-8")
  assert result.returncode == 2
  summary = json.loads(result.stdout.splitlines()[-1])
  assert summary["fits"] is False and summary["peak_phase"] == "load"
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "reads the whole checkpoint onto one device" in errors[0]
  assert "Traceback" not in result.stderr
