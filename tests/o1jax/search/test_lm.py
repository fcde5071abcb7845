"""LMStepModel: the values it reads on its caches equal scoring each node's whole prompt from scratch, its steps are
the sampled ids, and a tree's samples do not depend on the batch (tiny random Llama with SmolLM2's tokenizer)."""

import dataclasses

import numpy as np
import pytest

from models import decoder
from o1jax import pretrained, thoughts
from o1jax.sampling.sampler import Sampler, SamplingParams
from o1jax.search import beam, lm, mcts
from o1jax.search import tree as tree_lib
from o1jax.search.result import Problem

PROBLEMS = [Problem("a", "Tom has 3 apples and buys 4 more. How many?"),
            Problem("b", "A box holds 12 eggs. How many eggs are in 5 boxes?"),
            Problem("c", "What is 7 times 6?")]


@pytest.fixture(scope="module")
def loaded(tiny_smollm2_checkpoint):
  """The tiny model with its layer matrices scaled up: at the default init scale its hidden states hardly depend
  on the context, so every rating would be log 0.5 within 1e-5 and a wrong cache could not show."""
  loaded = pretrained.load(tiny_smollm2_checkpoint, dtype="float32")
  weights = loaded.model.weights()
  weights["layers"] = {name: (a if name.endswith("norm") else a * 3.0) for name, a in weights["layers"].items()}
  # The format tokens' rows start at the mean embedding: rating tokens with equal rows would rate log 0.5 always.
  rng = np.random.default_rng(0)
  embed = np.array(weights["embed"]) * 20.0
  for token in (thoughts.POSITIVE_RATING, thoughts.NEGATIVE_RATING):
    embed[loaded.tokenizer.token_to_id(token)] = rng.standard_normal(embed.shape[1])
  weights["embed"] = embed
  model = decoder.Decoder(loaded.model.config, weights=weights)
  model.tokenizer_files = loaded.model.tokenizer_files
  return dataclasses.replace(loaded, model=model)


def step_model(loaded, rating_context="policy", max_rows=16, **kwargs):
  sampler = Sampler(loaded.model, vocab=loaded.tokenizer.vocab(), buckets=lm.search_buckets(max_rows))
  return lm.LMStepModel(sampler, loaded.tokenizer, max_new_tokens=8, params=SamplingParams(temperature=1.0),
                        rating_context=rating_context, max_rows=max_rows, **kwargs)


# max_children=4: the root is expanded at simulations 1 and 2 (its path cache reused at 2), then each tree descends
# and widens one child at simulations 3 and 4 (reused at 4).
CONFIG = mcts.MCTSConfig(num_simulations=4, max_children=4, max_depth=4, max_step_tokens=8)


def whole_prompt(model, result, node, rating_context):
  """The ids of node's rating prompt, from the tree's arrays: path + (policy: its hint and header, its step,
  <end_of_thought><start_of_rating>; value: its line without the hint)."""
  t, p = result.tree, model.prompts
  path, n = [], int(t.parent[0, node])
  while n != tree_lib.ROOT:
    path.append(n)
    n = int(t.parent[0, n])
  lines = [p.line(int(t.parent[0, i]), i, int(t.meta[0, i]), t.tokens[0, i, :t.length[0, i]], float(t.rating[0, i]))
           for i in path[::-1]]
  ids = p.path(p.root(model.tokenizer.encode(result.problem.question)), lines)
  parent, meta, step = int(t.parent[0, node]), int(t.meta[0, node]), t.tokens[0, node, :t.length[0, node]]
  if rating_context == "policy":
    hint = thoughts.hint(thoughts.meta_prefix(meta))
    return ids + p.policy_suffix(parent, node, meta, hint) + list(step) + [p.end_of_thought, p.start_of_rating]
  return ids + p.rating_suffix(parent, node, meta, step)


@pytest.mark.parametrize("rating_context", ["policy", "value"])
def test_values_equal_scoring_each_whole_prompt(loaded, rating_context):
  model = step_model(loaded, rating_context, max_rows=4)   # 3 trees x 2 children: two chunks per simulation
  prefilled = []
  prefill = model.sampler.prefill
  model.sampler.prefill = lambda prompts, **kw: prefilled.append(len(prompts)) or prefill(prompts, **kw)
  results = mcts.search(model, PROBLEMS, CONFIG, progress=False)
  expansions = sum(r.num_nodes for r in results) // 2
  assert sum(prefilled) < expansions   # paths of nodes expanded again were not prefilled again
  prompts, ratings = [], []
  for r in results:
    for node in range(1, r.num_nodes + 1):
      prompts.append(whole_prompt(model, r, node, rating_context))
      ratings.append(float(r.tree.rating[0, node]))
      assert r.texts[node] == loaded.tokenizer.decode(r.tree.tokens[0, node, :r.tree.length[0, node]])
  expected = model.sampler.score_texts(prompts, model.prompts.positive, model.prompts.negative)
  np.testing.assert_allclose(ratings, np.minimum(expected, 0.0), atol=2e-5)
  assert np.std(ratings) > 0.05   # the ratings do depend on the prompts
  assert set(model.timings) == {"prefill", "prompt", "decode", "score"}
  usage = results[0].usage
  assert usage.generated >= results[0].num_nodes and usage.prompted > 0 and usage.scored > 0


@pytest.mark.parametrize("rating_context", ["policy", "value"])
def test_chains_continue_on_their_rated_caches(loaded, rating_context):
  """best_of_n and beam: after the root, every step continues the cache its parent was rated on (nothing is
  prefilled again), and the values and behaviour log-probs still equal scoring and running each whole prompt."""
  for config in (beam.BeamConfig(strategy="best_of_n", n=2, max_depth=3, max_step_tokens=9),
                 beam.BeamConfig(strategy="beam", n=4, beam_width=2, max_depth=3, max_step_tokens=9)):
    model = step_model(loaded, rating_context, max_rows=4, keep_paths=False)   # beam: 8 children, two chunks
    prefilled = []
    prefill = model.sampler.prefill
    model.sampler.prefill = lambda prompts, **kw: prefilled.append(len(prompts)) or prefill(prompts, **kw)
    # The random model seldom ends a step within 8 tokens, and an unfinished step is terminal: call every step
    # finished so that the chains go on (the caches hold each line's <end_of_thought> either way).
    expand = model.expand
    model.expand = lambda requests: [[dataclasses.replace(s, finished=True) for s in steps]
                                     for steps in expand(requests)]
    results = beam.search(model, PROBLEMS[:2], config, progress=False)
    assert sum(prefilled) == 2   # the two roots, once
    assert [len(rows) for _, rows in model._kept] == [4] * (config.width * 2 // 4)   # rated caches only
    prompts, ratings, deep = [], [], 0
    for r in results:
      for node in range(1, r.num_nodes + 1):
        prompts.append(whole_prompt(model, r, node, rating_context))
        ratings.append(float(r.tree.rating[0, node]))
        deep += int(r.tree.parent[0, node]) != tree_lib.ROOT
    assert deep >= 4   # steps below the root's children were sampled on reused caches
    expected = model.sampler.score_texts(prompts, model.prompts.positive, model.prompts.negative)
    np.testing.assert_allclose(ratings, np.minimum(expected, 0.0), atol=2e-5)
    t, p = results[0].tree, model.prompts
    for node in range(1, results[0].num_nodes + 1):
      prompt = whole_prompt(model, results[0], node, "policy")[:-2]
      step = list(t.tokens[0, node, :t.length[0, node]])   # (an <end_of_thought> sampled would be the model's)
      logits = np.asarray(loaded.model(np.asarray([prompt], np.int32)))[0].astype(np.float64)
      log_probs = logits - logits.max(-1, keepdims=True)
      log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
      start = len(prompt) - len(step) - 1
      np.testing.assert_allclose(t.log_probs[0, node, :len(step)],
                                 [log_probs[start + i, tok] for i, tok in enumerate(step)], atol=2e-4)


def test_behaviour_log_probs_are_the_models_own(loaded):
  """The tree's per-token log-probs of a step (its tokens, then <end_of_thought> when finished) equal a full
  forward of the policy prompt and the step (the learner's old policy)."""
  model = step_model(loaded)
  [r] = mcts.search(model, PROBLEMS[:1], dataclasses.replace(CONFIG, num_simulations=2), progress=False)
  t, p = r.tree, model.prompts
  checked = 0
  for node in range(1, r.num_nodes + 1):
    prompt = whole_prompt(model, r, node, "policy")[:-2]   # the policy prompt and the step, no <eot><sor>
    step = list(t.tokens[0, node, :t.length[0, node]])
    targets = step + ([p.end_of_thought] if t.finished[0, node] else [])
    ids = prompt + targets[len(step):]
    logits = np.asarray(loaded.model(np.asarray([ids], np.int32)))[0]
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    start = len(ids) - len(targets) - 1
    expected = [log_probs[start + i, tok] for i, tok in enumerate(targets)]
    np.testing.assert_allclose(t.log_probs[0, node, :len(targets)], expected, atol=2e-4)
    assert not t.log_probs[0, node, len(targets):].any()
    checked += 1
  assert checked == 4


def test_a_tree_samples_the_same_alone_and_in_a_batch(loaded):
  config = dataclasses.replace(CONFIG, seed=5)
  together = mcts.search(step_model(loaded), PROBLEMS, config, progress=False)
  alone = mcts.search(step_model(loaded), PROBLEMS[1:2], config, progress=False)[0]
  np.testing.assert_array_equal(alone.tree.tokens, together[1].tree.tokens)
  np.testing.assert_array_equal(alone.tree.parent, together[1].tree.parent)
  np.testing.assert_allclose(alone.tree.value, together[1].tree.value, atol=1e-5)


def test_bad_arguments(loaded):
  sampler = Sampler(loaded.model, vocab=loaded.tokenizer.vocab())
  with pytest.raises(ValueError, match="rating_context='prompt'; expected one of"):
    lm.LMStepModel(sampler, loaded.tokenizer, rating_context="prompt")
  model = lm.LMStepModel(sampler, loaded.tokenizer)
  with pytest.raises(ValueError, match="the last expand did not sample"):
    model.rate([mcts_request()], [[]])


def mcts_request():
  from o1jax.search.step_model import Request
  return Request(tree=0, problem="x", question="Q?", path=(), child_ids=(1,), metas=(0,), hints=("",))
