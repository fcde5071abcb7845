"""Batched rollout and value scoring: the two calls the search and the learner stand on.

  sampler = Sampler(model, tokenizer_vocab, mesh=parallel.make_mesh())
  prefix = sampler.prefill(prompts)                    # encode each prompt once into a KV cache
  samples = sampler.sample(prefix, k=4, stop=["<end_of_thought>"], max_new_tokens=64, params=..., seed=0)
  values = sampler.score(samples.prefix, rating_suffixes, positive_id, negative_id)
"""
