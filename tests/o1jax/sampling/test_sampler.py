"""The sampler and the value scorer against transformers (tiny random Llama and Gemma-2) and against themselves
under re-batching, re-sharding and re-seeding."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

import reference_models as ref
from models import hf_io
from o1jax import parallel, xla_flags
from o1jax.sampling.buckets import Buckets
from o1jax.sampling.sampler import Sampler, SamplingParams

BUCKETS = Buckets(prompt=(8, 16, 32), new_tokens=(8, 16))
VOCAB = {"<end_of_thought>": 7, "<start_of_rating>": 9, "<positive_rating>": 11, "<negative_rating>": 12}


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def family(request):
  return request.param


@pytest.fixture(scope="module")
def models(family, tmp_path_factory):
  directory = tmp_path_factory.mktemp(family)
  reference = ref.build(family, directory)
  return reference, hf_io.load_pretrained(str(directory), dtype="float32")


@pytest.fixture(scope="module")
def sampler(models):
  return Sampler(models[1], vocab=VOCAB, buckets=BUCKETS)


def prompts(vocab_size, lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(13, vocab_size, n)) for n in lengths]


def test_batch_equals_rows_alone_greedy(sampler, models):
  batch_prompts = prompts(models[1].config.vocab_size, [5, 11, 3, 8])
  params = SamplingParams(greedy=True)
  together = sampler.sample(sampler.prefill(batch_prompts, reserve=16), k=1, stop=[], max_new_tokens=16,
                            params=params)
  for i, p in enumerate(batch_prompts):
    alone = sampler.sample(sampler.prefill([p], reserve=16), k=1, stop=[], max_new_tokens=16, params=params)
    np.testing.assert_array_equal(together.tokens[i], alone.tokens[0])
    np.testing.assert_allclose(together.model_log_probs[i], alone.model_log_probs[0], atol=1e-5)


def test_greedy_equals_transformers_generate(sampler, models):
  reference, model = models
  reference.generation_config.eos_token_id = None
  reference.generation_config.pad_token_id = 0
  for p in prompts(model.config.vocab_size, [6, 13]):
    ours = sampler.sample(sampler.prefill([p], reserve=16), k=1, stop=[], max_new_tokens=16,
                          params=SamplingParams(temperature=0.0))
    with torch.no_grad():
      theirs = reference.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, min_length=0)
    assert ours.tokens[0].tolist() == theirs[0, len(p):].tolist()
    assert ours.lengths[0] == 16 and not ours.stopped[0]


def test_recorded_statistics_equal_a_transformers_forward(sampler, models):
  reference, model = models
  batch_prompts = prompts(model.config.vocab_size, [4, 9])
  samples = sampler.sample(sampler.prefill(batch_prompts, reserve=16), k=3, stop=[], max_new_tokens=12,
                           params=SamplingParams(temperature=1.3, top_k=40), seed=5)
  assert samples.tokens.shape == (6, 16)
  for r in range(6):
    prompt = batch_prompts[r // 3]
    n = samples.lengths[r]
    sequence = np.array([prompt + samples.tokens[r, :n].tolist()])
    log_probs = ref.log_probs(reference, sequence)[0, len(prompt) - 1:len(prompt) - 1 + n]  # [n, V]
    model_lp = log_probs[np.arange(n), samples.tokens[r, :n]]
    np.testing.assert_allclose(samples.model_log_probs[r, :n], model_lp, atol=1e-4)
    p = np.exp(log_probs)
    entropy = -(p * log_probs).sum(-1)
    varentropy = (p * (log_probs + entropy[:, None]) ** 2).sum(-1)
    np.testing.assert_allclose(samples.entropy[r, :n], entropy, atol=1e-4)
    np.testing.assert_allclose(samples.varentropy[r, :n], varentropy, atol=1e-3)
    assert samples.step_log_prob[r] == pytest.approx(model_lp.mean(), abs=1e-4)
    assert samples.step_entropy[r] == pytest.approx(entropy.mean(), abs=1e-4)
    # The sampling distribution (temperature 1.3, top-40) differs from the model's.
    assert not np.allclose(samples.sampling_log_probs[r, :n], model_lp, atol=1e-3)


def test_64_rows_decode_equals_a_transformers_forward(sampler, models):
  """At 64 rows the CPU decode loop is compiled with other matmul fusions (`xla_flags.decode_compiler_options`)."""
  assert jax.default_backend() != "cpu" or xla_flags.decode_compiler_options("cpu", 64) is not None
  reference, model = models
  batch_prompts = prompts(model.config.vocab_size, [3, 5, 7, 9, 11, 13, 4, 6] * 2, seed=2)
  samples = sampler.sample(sampler.prefill(batch_prompts, reserve=16), k=4, stop=[], max_new_tokens=12,
                           params=SamplingParams(temperature=1.0), seed=3)
  assert samples.tokens.shape == (64, 16)
  for r in (0, 21, 42, 63):
    prompt = batch_prompts[r // 4]
    n = samples.lengths[r]
    sequence = np.array([prompt + samples.tokens[r, :n].tolist()])
    log_probs = ref.log_probs(reference, sequence)[0, len(prompt) - 1:len(prompt) - 1 + n]
    np.testing.assert_allclose(samples.model_log_probs[r, :n], log_probs[np.arange(n), samples.tokens[r, :n]],
                               atol=1e-4)


def test_sampling_log_probs_follow_temperature_and_top_k(sampler, models):
  reference, model = models
  (p,) = prompts(model.config.vocab_size, [7])
  samples = sampler.sample(sampler.prefill([p], reserve=8), k=2, stop=[], max_new_tokens=8,
                           params=SamplingParams(temperature=0.7, top_k=5), seed=1)
  for r in range(2):
    sequence = np.array([p + samples.tokens[r].tolist()])
    with torch.no_grad():
      logits = reference(torch.tensor(sequence)).logits.numpy()[0, len(p) - 1:len(p) + 7].astype(np.float64) / 0.7
    kth = np.sort(logits, -1)[:, -5][:, None]
    filtered = ref.log_softmax(np.where(logits >= kth, logits, -np.inf))
    expected = filtered[np.arange(8), samples.tokens[r]]
    np.testing.assert_allclose(samples.sampling_log_probs[r], expected, atol=1e-4)


def test_seeds(sampler, models):
  batch_prompts = prompts(models[1].config.vocab_size, [5, 6])
  prefix = sampler.prefill(batch_prompts, reserve=16)
  params = SamplingParams(temperature=1.0)
  a = sampler.sample(prefix, k=4, stop=[], max_new_tokens=16, params=params, seed=3)
  b = sampler.sample(prefix, k=4, stop=[], max_new_tokens=16, params=params, seed=3)
  c = sampler.sample(prefix, k=4, stop=[], max_new_tokens=16, params=params, seed=4)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  assert len({tuple(t) for t in a.tokens}) > 1  # k samples of one prompt differ
  greedy = sampler.sample(prefix, k=1, stop=[], max_new_tokens=16, params=SamplingParams(greedy=True))
  zero_temperature = sampler.sample(prefix, k=1, stop=[], max_new_tokens=16, params=SamplingParams(temperature=0))
  np.testing.assert_array_equal(greedy.tokens, zero_temperature.tokens)


def test_per_sample_keys_make_a_row_independent_of_its_batch(sampler, models):
  """With one key per sample, a prompt's samples are the same alone and between other prompts."""
  model = models[1]
  batch_prompts = prompts(model.config.vocab_size, [3, 9, 5], seed=4)
  keys = jax.random.split(jax.random.key(9), 6)   # 3 prompts x k=2
  params = SamplingParams(temperature=1.0)
  together = sampler.sample(sampler.prefill(batch_prompts, reserve=16), k=2, stop=[], max_new_tokens=16,
                            params=params, seed=keys)
  alone = sampler.sample(sampler.prefill(batch_prompts[1:2], reserve=16), k=2, stop=[], max_new_tokens=16,
                         params=params, seed=keys[2:4])
  np.testing.assert_array_equal(together.tokens[2:4], alone.tokens)
  assert not np.array_equal(together.tokens[2], together.tokens[3])   # the two keys draw different samples
  with pytest.raises(ValueError, match=r"per-sample keys have shape \(2,\); expected \(6,\)"):
    sampler.sample(sampler.prefill(batch_prompts, reserve=16), k=2, stop=[], max_new_tokens=16, params=params,
                   seed=keys[:2])


def test_compacting_decode_draws_the_same_samples(models):
  """Segments of 4 tokens with the running rows moved into smaller batches: the same tokens, statistics and
  caches (the values rated on top) as one 16-token decode. Stop tokens are a third of the vocabulary, so the
  rows stop at different steps and the batch shrinks."""
  model = models[1]
  sampler = Sampler(model, vocab=VOCAB, buckets=Buckets(prompt=(8, 16, 32), new_tokens=(4, 8, 16), batch=(2, 4, 8, 16)))
  batch_prompts = prompts(model.config.vocab_size, [3, 9, 5, 7, 4, 6], seed=8)
  keys = jax.random.split(jax.random.key(3), 12)
  stop = list(range(13, model.config.vocab_size // 3))
  params = SamplingParams(temperature=1.0)
  results = []
  for compact in (0, 4):
    prefix = sampler.prefill(batch_prompts, reserve=16 + 4)
    samples = sampler.sample(prefix, k=2, stop=stop, max_new_tokens=16, params=params, seed=keys,
                             compact_every=compact)
    results.append((samples, sampler.score(samples.prefix, [[9]] * 12, 11, 12)))
  (one, v1), (seg, v2) = results
  assert len(set(one.lengths.tolist())) >= 3 and one.lengths.min() < 8 < one.lengths.max()
  np.testing.assert_array_equal(one.tokens, seg.tokens)
  np.testing.assert_array_equal(one.lengths, seg.lengths)
  np.testing.assert_array_equal(one.stopped, seg.stopped)
  for name in ("model_log_probs", "entropy", "varentropy", "step_log_prob", "step_varentropy"):
    np.testing.assert_allclose(getattr(one, name), getattr(seg, name), atol=1e-5, err_msg=name)
  np.testing.assert_allclose(v1, v2, atol=1e-5)


def test_batch_buckets_pad_rows():
  buckets = Buckets(batch=(4, 8, 16), rows=8)
  assert [buckets.padded_rows(n) for n in (1, 4, 5, 9, 17)] == [8, 8, 8, 16, 24]
  assert [Buckets(batch=(2, 3, 6)).padded_rows(n) for n in (1, 3, 4, 7)] == [2, 3, 6, 7]
  with pytest.raises(ValueError, match="batch buckets"):
    Buckets(batch=(4, 2))


def test_stops_freeze_rows(sampler, models):
  """Row 0 stops on the token its greedy run emits at step 3; row 1's stop never comes."""
  batch_prompts = prompts(models[1].config.vocab_size, [5, 9])
  free = sampler.sample(sampler.prefill(batch_prompts, reserve=16), k=1, stop=[], max_new_tokens=16,
                        params=SamplingParams(greedy=True))
  stop_token = int(free.tokens[0, 3])
  first = int(np.flatnonzero(free.tokens[0] == stop_token)[0])
  never = next(t for t in range(13, 100) if t not in free.tokens[1])
  stopped = sampler.sample(sampler.prefill(batch_prompts, reserve=16), k=1, stop=[[stop_token], [never]],
                           max_new_tokens=16, params=SamplingParams(greedy=True))
  assert stopped.stopped.tolist() == [True, False]
  assert stopped.lengths.tolist() == [first + 1, 16]
  np.testing.assert_array_equal(stopped.tokens[0, :first + 1], free.tokens[0, :first + 1])
  assert not stopped.tokens[0, first + 1:].any() and not stopped.model_log_probs[0, first + 1:].any()
  np.testing.assert_array_equal(stopped.tokens[1], free.tokens[1])
  assert stopped.sequences()[0][-1] == stop_token


def test_value_of_a_continuation_equals_the_whole_text(sampler, models):
  reference, model = models
  parents = prompts(model.config.vocab_size, [6, 10])
  suffixes = [[20, 21, 7, 9], [33, 7, 9]]
  prefix = sampler.prefill(parents, reserve=8)
  on_cache = sampler.score(prefix, suffixes, positive_id=11, negative_id=12)
  whole = sampler.score_texts([p + s for p, s in zip(parents, suffixes)], positive_id=11, negative_id=12)
  np.testing.assert_allclose(on_cache, whole, atol=1e-5)
  for value, p, s in zip(on_cache, parents, suffixes):
    last = ref.log_probs(reference, [p + s])[0, -1]
    expected = ref.log_softmax(np.array([last[11], last[12]]))[0]
    assert value == pytest.approx(expected, abs=1e-4)
    assert value <= 0


def test_sampled_step_then_rating_on_the_same_cache(sampler, models):
  """The search's pattern: sample children on the parent's cache, then rate each child on top of its sample."""
  (parent,) = prompts(models[1].config.vocab_size, [6])
  samples = sampler.sample(sampler.prefill([parent], reserve=16 + 8), k=2, stop=["<end_of_thought>"],
                           max_new_tokens=16, params=SamplingParams(temperature=1.0), seed=2)
  suffix = [[VOCAB["<start_of_rating>"]]] * 2
  on_cache = sampler.score(samples.prefix, suffix, 11, 12)
  whole = sampler.score_texts([parent + s + [9] for s in samples.sequences()], 11, 12)
  np.testing.assert_allclose(on_cache, whole, atol=1e-5)


def test_truncate_drops_the_end_of_a_sample(sampler, models):
  """A sample cut after 3 of its tokens and extended by two tokens rates as the prompt + 3 tokens + those two."""
  (parent,) = prompts(models[1].config.vocab_size, [6], seed=5)
  samples = sampler.sample(sampler.prefill([parent], reserve=16 + 8), k=2, stop=[], max_new_tokens=8,
                           params=SamplingParams(temperature=1.0), seed=1)
  cut = sampler.truncate(samples.prefix, [len(parent) + 3, len(parent) + 5])
  suffix = [[7, 9]] * 2
  on_cache = sampler.score(cut, suffix, 11, 12)
  kept = [parent + s[:n] + [7, 9] for s, n in zip(samples.sequences(), (3, 5))]
  np.testing.assert_allclose(on_cache, sampler.score_texts(kept, 11, 12), atol=1e-5)
  with pytest.raises(ValueError, match="truncate got 1 lengths for 2 rows"):
    sampler.truncate(samples.prefix, [3])


def test_a_rated_row_repacked_continues_as_the_whole_text(sampler, models):
  """The search's chain pattern: sample, cut, rate on the cache (score_and_extend), then repack the rated rows
  into a cache of other slots (fewer and more) and continue them: every value equals its whole text's."""
  (parent,) = prompts(models[1].config.vocab_size, [6], seed=3)
  samples = sampler.sample(sampler.prefill([parent], reserve=16 + 8), k=3, stop=[], max_new_tokens=8,
                           params=SamplingParams(temperature=1.0), seed=4)
  kept = (2, 5, 8)
  cut = sampler.truncate(samples.prefix, [len(parent) + n for n in kept])
  values, rated = sampler.score_and_extend(cut, [[7, 9]] * 3, 11, 12)
  texts = [parent + s[:n] + [7, 9] for s, n in zip(samples.sequences(), kept)]
  np.testing.assert_allclose(values, sampler.score_texts(texts, 11, 12), atol=1e-5)
  assert rated.cache.num_slots == 8 + 16 + 8 and int(rated.cache.end) > max(len(t) for t in texts)
  for slots in (24, 40):
    packed = sampler.repack(rated, slots)
    assert packed.cache.num_slots == slots and int(packed.cache.end) == max(len(t) for t in texts)
    np.testing.assert_array_equal(np.asarray(packed.cache.positions[:3, :len(texts[0])]),
                                  np.arange(len(texts[0]))[None].repeat(3, 0))
    more = [[20, 21, 22, 7, 9], [23, 7, 9], [24, 25, 7, 9]]
    on_cache = sampler.score(packed, more, 11, 12)
    whole = sampler.score_texts([t + m for t, m in zip(texts, more)], 11, 12)
    np.testing.assert_allclose(on_cache, whole, atol=1e-5)
  with pytest.raises(ValueError, match=r"repack to 15 slots would drop tokens of a row that holds 16\."):
    sampler.repack(rated, 15)
  # One short row gathered into a padded batch packs by its own length: the padding rows copy it, not the
  # (longer) first row of its source.
  padded = Sampler(models[1], vocab=VOCAB, buckets=dataclasses.replace(BUCKETS, batch=(4,)))
  longest_first = padded.gather([rated], [(0, 2), (0, 0)])
  short = padded.repack(padded.gather([longest_first], [(0, 1)]), len(texts[0]))
  assert short.cache.batch_size == 4 and int(short.cache.end) == len(texts[0])


def test_fork_copies_rows(sampler, models):
  prefix = sampler.prefill(prompts(models[1].config.vocab_size, [4, 7, 5]), reserve=8)
  forked = sampler.fork(prefix, [2, 0, 2])
  for i, r in enumerate([2, 0, 2]):
    np.testing.assert_array_equal(np.asarray(forked.cache.k[0][i]), np.asarray(prefix.cache.k[0][r]))
    np.testing.assert_array_equal(np.asarray(forked.cache.positions[i]), np.asarray(prefix.cache.positions[r]))
    np.testing.assert_array_equal(np.asarray(forked.logits[i]), np.asarray(prefix.logits[r]))


def test_bad_input(sampler):
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    sampler.prefill([[1, 2], []])
  with pytest.raises(ValueError, match="prompt of 40 tokens exceeds the largest bucket"):
    sampler.prefill([[1] * 40])
  prefix = sampler.prefill([[14, 15]], reserve=16)
  with pytest.raises(ValueError, match="k=0 must be at least 1"):
    sampler.sample(prefix, k=0, stop=[], max_new_tokens=4)
  with pytest.raises(ValueError, match="stop string '<end_of_step>' is not a single token"):
    sampler.sample(prefix, k=1, stop=["<end_of_step>"], max_new_tokens=4)
  with pytest.raises(ValueError, match="free slots"):
    sampler.sample(sampler.prefill([[14, 15]]), k=1, stop=[], max_new_tokens=4)
  with pytest.raises(ValueError, match="temperature=-1"):
    SamplingParams(temperature=-1)


def count_compiles(fn):
  compiles = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    fn()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return len(compiles)


def test_second_call_with_the_same_buckets_compiles_nothing(sampler, models):
  vocab_size = models[1].config.vocab_size

  def run(seed, lengths, new_tokens, temperature):
    prefix = sampler.prefill(prompts(vocab_size, lengths, seed), reserve=16 + 8)
    samples = sampler.sample(prefix, k=2, stop=["<end_of_thought>"], max_new_tokens=new_tokens,
                             params=SamplingParams(temperature=temperature), seed=seed)
    sampler.score(samples.prefix, [[9]] * len(samples.lengths), 11, 12)

  assert count_compiles(lambda: run(0, [3, 7], 12, 0.8)) > 0
  # Other lengths inside the same buckets, another seed and temperature: nothing new to compile.
  assert count_compiles(lambda: run(1, [5, 2], 9, 0.6)) == 0


def test_eight_devices_equal_one(models):
  model = models[1]
  assert jax.device_count() == 8
  single = Sampler(model, vocab=VOCAB, buckets=BUCKETS, mesh=parallel.make_mesh(devices=jax.devices()[:1]))
  sharded = Sampler(model, vocab=VOCAB, buckets=BUCKETS, mesh=parallel.make_mesh())
  batch_prompts = prompts(model.config.vocab_size, [3, 9, 5])
  results = []
  for sampler in (single, sharded):
    prefix = sampler.prefill(batch_prompts, reserve=16 + 8)
    samples = sampler.sample(prefix, k=3, stop=["<end_of_thought>"], max_new_tokens=16,
                             params=SamplingParams(temperature=1.0, top_p=0.9), seed=7)
    values = sampler.score(samples.prefix, [[9]] * 9, 11, 12)
    results.append((samples, values))
  (a, va), (b, vb) = results
  cache_sharding = b.prefix.cache.k[0].sharding
  assert len(cache_sharding.device_set) == 8 and not cache_sharding.is_fully_replicated
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.model_log_probs, b.model_log_probs, atol=1e-5)
  np.testing.assert_allclose(va, vb, atol=1e-5)


def test_fsdp_and_tensor_meshes_shard_the_weights(models):
  """On a 2x2x2 mesh the sampler keeps the learner's sharding of the weights (no replicated copy) and samples what
  one device samples."""
  model = models[1]
  single = Sampler(model, vocab=VOCAB, buckets=BUCKETS, mesh=parallel.make_mesh(devices=jax.devices()[:1]))
  sharded = Sampler(model, vocab=VOCAB, buckets=BUCKETS, mesh=parallel.make_mesh(2, 2, 2))
  down = sharded.weights["layers"][0]["down"].sharding
  assert not down.is_fully_replicated and down.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  batch_prompts = prompts(model.config.vocab_size, [3, 9, 5, 4])
  out = []
  for sampler in (single, sharded):
    samples = sampler.sample(sampler.prefill(batch_prompts, reserve=16 + 8), k=2, stop=[], max_new_tokens=16,
                             params=SamplingParams(greedy=True))
    out.append((samples.tokens, sampler.score(samples.prefix, [[9]] * 8, 11, 12)))
  np.testing.assert_array_equal(out[0][0], out[1][0])
  np.testing.assert_allclose(out[0][1], out[1][1], atol=1e-5)


def test_first_tokens_follow_the_sampling_distribution(sampler, models):
  """4096 one-token samples of one prompt (temperature 1.3, top-8): each token's frequency matches its
  probability under transformers' logits, filtered in numpy, within 4.5 standard errors; filtered-out tokens
  never appear."""
  reference, model = models
  (p,) = prompts(model.config.vocab_size, [6], seed=3)
  n = 4096
  samples = sampler.sample(sampler.prefill([p], reserve=8), k=n, stop=[], max_new_tokens=1,
                           params=SamplingParams(temperature=1.3, top_k=8), seed=11)
  with torch.no_grad():
    logits = reference(torch.tensor([p])).logits.numpy()[0, -1].astype(np.float64) / 1.3
  kth = np.sort(logits)[-8]
  probs = np.exp(ref.log_softmax(np.where(logits >= kth, logits, -np.inf)))
  counts = np.bincount(samples.tokens[:, 0], minlength=len(probs))
  assert counts[probs == 0].sum() == 0
  standard_error = np.sqrt(probs * (1 - probs) / n)
  np.testing.assert_array_less(np.abs(counts / n - probs), 4.5 * standard_error + 1e-12)


def test_inverse_cdf_draw_never_picks_zero_mass():
  """Rows whose mass sits in a few scattered tokens (chunk and vocabulary edges included) draw only those, at
  their frequencies."""
  from o1jax.sampling.sampler import _inverse_cdf_draw
  V = 1000                                  # 4 chunks of 256, the last one padded
  probs = np.zeros((3, V), np.float32)
  probs[0, [0, 255, 256, 999]] = [0.1, 0.2, 0.3, 0.4]
  probs[1, 511] = 1.0
  probs[2, [300, 301]] = [0.5, 0.5]
  uniforms = jax.random.uniform(jax.random.key(0), (2000, 3))
  draws = np.asarray(jax.vmap(lambda u: _inverse_cdf_draw(jax.numpy.asarray(probs), u))(uniforms))  # [2000, 3]
  assert set(draws[:, 0]) == {0, 255, 256, 999} and set(draws[:, 1]) == {511} and set(draws[:, 2]) == {300, 301}
  np.testing.assert_allclose(np.bincount(draws[:, 0], minlength=V)[[0, 255, 256, 999]] / 2000,
                             [0.1, 0.2, 0.3, 0.4], atol=0.04)


def test_vocabulary_statistics_equal_numpy_with_masked_tokens():
  """log-softmax, entropy and varentropy (sums taken as matrix-vector products) against float64 numpy, on rows
  with top-k-style masked (-inf) entries and on leading batch axes."""
  from o1jax.sampling import statistics
  rng = np.random.default_rng(0)
  logits = (rng.standard_normal((2, 3, 1000)) * 4).astype(np.float32)
  logits[0, 1, rng.permutation(1000)[:900]] = -np.inf
  log_probs = np.asarray(statistics.log_softmax(jax.numpy.asarray(logits)))
  shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
  expected = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  assert np.array_equal(np.isinf(log_probs), np.isinf(logits))
  finite = np.isfinite(logits)
  np.testing.assert_allclose(log_probs[finite], expected[finite], atol=2e-5)
  entropy, varentropy = statistics.entropy_and_varentropy(jax.numpy.asarray(log_probs))
  p = np.exp(expected)
  safe = np.where(p > 0, expected, 0.0)
  h = -(p * safe).sum(-1)
  np.testing.assert_allclose(entropy, h, atol=2e-5)
  np.testing.assert_allclose(varentropy, (p * (safe + h[..., None]) ** 2).sum(-1), atol=1e-4)
