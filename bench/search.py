"""MCTS throughput: o1jax (all trees at once) vs a transformers reference that runs LLaMA-O1's way, in one process.

  .venv/bin/python bench/search.py [--quick]

Both sides run the same search (configs/smollm2_gsm8k.py's MCTS constants: 2 children per expansion, up to 5,
c = 1.414, ...) with SmolLM2-135M-Instruct + the committed rating adapter in float32 on the CPU, on the first
GSM8K test problems, and count nodes created per second of search:
  - o1jax: `mcts.search` over `LMStepModel`: every simulation expands the selected node of all 32 trees in one
    sampler call (each path prefilled once, its k children forked from it) and rates every new node on its own
    sampling cache in one scoring call. The same search with other random draws runs first, untimed, to compile
    the programs (a one-time cost of a process).
  - reference: tests/reference_mcts.py's recursive, one-tree-at-a-time MCTS driving transformers as LLaMA-O1's
    `online_train.py` does: one `generate` call per expansion (its k children, each with its own meta action,
    hint and local id, batched in that call, stopping at the format tokens), then one forward over the whole
    value prompt per new node. Prompts are the same token ids on both sides (o1jax.prompt_tokens).
  Both sample at the config's temperature from their own random streams, so the trees differ; each side's
  nodes/s is over its own trees.

--quick: 32 trees x 2 simulations, the reference on 2 of those problems; default: 32 x 8, the reference on 4.
Prints both nodes/s, `ratio_nodes_per_s`, and o1jax's time split (prefill, prompt extension, decode, scoring,
host: everything else, selection and backup included). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from o1jax import xla_flags  # noqa: E402

xla_flags.configure_cpu()

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402

from configs import smollm2_gsm8k  # noqa: E402
from models import hf_io  # noqa: E402
from o1jax import pretrained  # noqa: E402
from o1jax.data import problems as problems_lib  # noqa: E402
from o1jax.prompt_tokens import PromptTokens  # noqa: E402
from o1jax.sampling.sampler import Sampler  # noqa: E402
from o1jax.search import lm, mcts, solve  # noqa: E402
from o1jax.search.result import Problem  # noqa: E402
from o1jax.search.step_model import Step  # noqa: E402

import reference_mcts  # noqa: E402  (tests/reference_mcts.py)


class TransformersStepModel:
  """The StepModel protocol over transformers, one request (one tree's expansion) at a time, as LLaMA-O1 runs."""

  def __init__(self, model, prompts: PromptTokens, *, max_new_tokens: int, temperature: float, question_ids):
    self.model, self.prompts = model, prompts
    self.max_new_tokens, self.temperature = max_new_tokens, temperature
    self.question_ids = question_ids
    self.values: dict[tuple[str, int], float] = {}
    self.stop = sorted(prompts.special_ids)

  def path(self, request):
    p = self.prompts
    lines = [p.line(n.parent, n.index, n.meta, n.tokens, n.rating) for n in request.path]
    return p.path(p.root(self.question_ids(request.question)), lines)

  def expand(self, requests):
    import torch
    out = []
    for request in requests:
      path = self.path(request)
      prompts = [path + self.prompts.policy_suffix(request.node, c, m, h)
                 for c, m, h in zip(request.child_ids, request.metas, request.hints)]
      width = max(map(len, prompts))
      ids = torch.tensor([[0] * (width - len(x)) + x for x in prompts])   # left padding, as generate wants
      mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts])
      with torch.inference_mode():
        generated = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                        temperature=self.temperature, top_k=0, top_p=1.0,
                                        max_new_tokens=self.max_new_tokens, eos_token_id=self.stop, pad_token_id=0,
                                        output_logits=True, return_dict_in_generate=True)
      logits = torch.stack(generated.logits, dim=1).float()          # [k, T, V] the model's own logits
      log_probs = torch.log_softmax(logits, dim=-1)
      probs = log_probs.exp()
      entropy = -(probs * log_probs).sum(-1)
      varentropy = (probs * (log_probs + entropy[..., None]) ** 2).sum(-1)
      steps, prompt_len = [], ids.shape[1]
      for j, c in enumerate(request.child_ids):
        sampled = generated.sequences[j, prompt_len:].tolist()
        stop_at = next((t for t, x in enumerate(sampled) if x in self.prompts.special_ids), None)
        n = len(sampled) if stop_at is None else stop_at
        finished = stop_at is not None and sampled[stop_at] == self.prompts.end_of_thought
        tokens, text = self.prompts.clean_step(sampled[:n])
        counted = len(tokens) + int(finished and len(tokens) == n)
        token_lp = log_probs[j, torch.arange(counted), torch.tensor(sampled[:counted], dtype=torch.long)]
        mean = lambda a: float(a[:counted].mean()) if counted else 0.0  # noqa: E731
        steps.append(Step(tokens=tokens, text=text, finished=finished and len(tokens) == n,
                          log_prob=mean(token_lp), entropy=mean(entropy[j]), varentropy=mean(varentropy[j]),
                          generated=n + int(stop_at is not None), prompt_tokens=len(prompts[j]),
                          rating_tokens=len(prompts[j]) + len(tokens) + 2))
        # One forward over the whole value prompt per new node (LLaMA-O1's compute_value_head).
        value_ids = torch.tensor([prompts[j] + list(tokens) + [self.prompts.end_of_thought,
                                                               self.prompts.start_of_rating]])
        with torch.inference_mode():
          last = self.model(input_ids=value_ids).logits[0, -1].float()
        pair = torch.stack([last[self.prompts.positive], last[self.prompts.negative]])
        self.values[(request.problem, c)] = min(float(torch.log_softmax(pair, 0)[0]), 0.0)
      out.append(steps)
    return out

  def rate(self, requests, steps):
    return [[self.values[(r.problem, c)] for c in r.child_ids] for r in requests]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="32 trees x 2 simulations; the reference on 2")
  parser.add_argument("--trees", type=int, default=32)
  args = parser.parse_args()
  simulations, reference_trees = (2, 2) if args.quick else (8, 4)

  import torch
  import transformers

  config = smollm2_gsm8k.get_config()
  config.mcts.num_simulations = simulations
  search_config = solve.strategy_config(config)
  loaded = pretrained.load(config.model.path, adapter=config.model.adapter, dtype="float32")
  with tempfile.TemporaryDirectory() as export_dir:
    hf_io.save_pretrained(loaded.model, export_dir)
    reference_model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
  problems = [Problem(p.uid, p.question) for p in problems_lib.load("gsm8k_test", 0, args.trees)]

  def run_o1jax(seed, num_simulations):
    sampler = Sampler(loaded.model, vocab=loaded.tokenizer.vocab(), buckets=lm.search_buckets(config.sampling.max_rows))
    step_model = lm.LMStepModel(sampler, loaded.tokenizer, max_new_tokens=config.sampling.max_new_tokens,
                                params=solve.sampling_params(config), max_rows=config.sampling.max_rows)
    start = time.perf_counter()
    results = mcts.search(step_model, problems, dataclasses.replace(search_config, seed=seed,
                                                                    num_simulations=num_simulations),
                          progress=False)
    seconds = time.perf_counter() - start
    return results, seconds, dict(step_model.timings)

  # Warm-up: the same search with other random draws compiles the programs of its shapes (and is not timed).
  _, warmup_s, _ = run_o1jax(seed=1, num_simulations=simulations)
  results, ours_s, timings = run_o1jax(seed=0, num_simulations=simulations)
  ours_nodes = sum(r.num_nodes for r in results)

  prompts = PromptTokens(loaded.tokenizer)
  cache: dict[str, list[int]] = {}
  step_model = TransformersStepModel(
      reference_model, prompts, max_new_tokens=config.sampling.max_new_tokens,
      temperature=config.sampling.temperature,
      question_ids=lambda q: cache.setdefault(q, loaded.tokenizer.encode(q)))
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  reference_nodes = 0
  c = search_config
  for problem in problems[:reference_trees]:
    tree = reference_mcts.ReferenceMCTS(
        step_model, problem.id, problem.question, ground_truth=None, num_simulations=c.num_simulations,
        children_per_expansion=c.children_per_expansion, max_children=c.max_children, exploration=c.exploration,
        varentropy_weight=c.varentropy_weight, discount=c.discount, eps=c.eps, patience=c.patience,
        max_depth=c.max_depth, factors=lambda s, d: rng.uniform(*c.random_factor, 64),
        uniforms=lambda s: rng.random(c.children_per_expansion))
    reference_nodes += len(tree.search()) - 1
  theirs_s = time.perf_counter() - start

  ours_rate, theirs_rate = ours_nodes / ours_s, reference_nodes / theirs_s
  split = {phase: timings.get(phase, 0.0) for phase in ("prefill", "prompt", "decode", "score")}
  split["host"] = ours_s - sum(split.values())
  print(f"o1jax:     {args.trees} trees x {simulations} simulations: {ours_nodes} nodes in {ours_s:.1f} s = "
        f"{ours_rate:.2f} nodes/s (after a {warmup_s:.1f} s warm-up search that compiled the programs)")
  print(f"reference: {reference_trees} trees x {simulations} simulations: {reference_nodes} nodes in {theirs_s:.1f} s "
        f"= {theirs_rate:.2f} nodes/s")
  print(f"ratio {ours_rate / theirs_rate:.2f}x; o1jax time split: "
        + ", ".join(f"{k} {v:.1f} s ({100 * v / ours_s:.0f}%)" for k, v in split.items()))
  print(json.dumps({
      "bench": "search", "model": "SmolLM2-135M fp32 + rating adapter", "trees": args.trees,
      "simulations": simulations, "reference_trees": reference_trees, "o1jax_nodes": ours_nodes,
      "o1jax_seconds": round(ours_s, 2), "o1jax_warmup_seconds": round(warmup_s, 2),
      "o1jax_nodes_per_s": round(ours_rate, 3),
      "reference_nodes": reference_nodes, "reference_seconds": round(theirs_s, 2),
      "reference_nodes_per_s": round(theirs_rate, 3), "ratio_nodes_per_s": round(ours_rate / theirs_rate, 3),
      **{f"o1jax_{k}_s": round(v, 2) for k, v in split.items()}}))


if __name__ == "__main__":
  main()
