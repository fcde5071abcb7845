"""The main job: search a problem set with one strategy, grade the answers, write everything under a workdir.

  job = solve.prepare(config, workdir)    # every config value checked here, before any model is loaded
  job.run(step_model)                     # or job.run(solve.load_step_model(config, mesh)) with the real model

Strategies (`STRATEGIES`): mcts (LLaMA-O1's tree search, o1jax.search.mcts), beam and dvts (step-level beam
search and diverse verifier tree search), best_of_n, weighted_best_of_n and majority (n chains, then the best
chain, the answer with the largest summed score, or the most frequent answer), and chain (one greedy chain),
all over the same StepModel (o1jax.search.beam for all but MCTS).

The workdir holds:
  config.json                     the config of the run (a rerun with another search config is refused)
  results.jsonl                   one JSON object per problem: index, uid, question, gold, answer, correct, nodes,
                                  tokens (= tokens_generated), tokens_prompted, tokens_scored, strategy, rounds
  trees/<index>.txt, <index>.json each problem's tree in the LLaMA-O1 text format and with every node's fields
(index: the problem's line in its split). Problems are searched `batch_size` at a time and a batch's files are
written as it ends, so a killed run loses at most the batch it was in; a rerun skips every problem already in
results.jsonl.

In evaluation (`self_play` off) the search never sees the reference answers: problems reach it without them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import ml_collections
import tqdm

from o1jax import grading, parallel
from o1jax.data import problems as problems_lib
from o1jax.sampling.sampler import SamplingParams
from o1jax.search import beam, lm, mcts
from o1jax.search.result import Problem, Result
from o1jax.search.step_model import StepModel

STRATEGIES = ("mcts", "beam", "dvts", "best_of_n", "weighted_best_of_n", "majority", "chain")
_BEAM_ANSWER = {"best_of_n": "best", "weighted_best_of_n": "weighted", "majority": "majority"}
# Config entries that do not change what a problem's search gives (a rerun may change them); eval.* is
# launch.evaluate's sweep, not read here.
_RESUMABLE_CHANGES = ("num_problems", "batch_size", "sampling.max_rows", "sampling.compact_every",
                      "eval.strategies", "eval.budgets", "eval.probe")


def strategy_config(config: ml_collections.ConfigDict) -> mcts.MCTSConfig | beam.BeamConfig:
  """The strategy's own frozen config, checked (one sentence per bad value)."""
  if config.strategy not in STRATEGIES:
    raise ValueError(f"strategy={config.strategy!r} is unknown; expected one of {STRATEGIES}.")
  if config.strategy == "mcts":
    fields = dict(config.mcts)
    fields["random_factor"] = tuple(fields["random_factor"])
    return mcts.MCTSConfig(**fields, max_step_tokens=config.sampling.max_new_tokens, seed=config.seed)
  name = {"best_of_n": "best_of_n", "weighted_best_of_n": "best_of_n", "majority": "best_of_n"}.get(
      config.strategy, config.strategy)
  return beam.BeamConfig(strategy=name, n=config.beam.n, beam_width=config.beam.beam_width,
                         max_depth=config.beam.max_depth, aggregation=config.beam.aggregation,
                         answer=_BEAM_ANSWER.get(config.strategy, config.beam.answer),
                         max_step_tokens=config.sampling.max_new_tokens, seed=config.seed)


def sampling_params(config: ml_collections.ConfigDict) -> SamplingParams:
  """The policy's sampling: greedy for the chain, else the config's temperature / top-p."""
  if config.strategy == "chain":
    return SamplingParams(greedy=True)
  return SamplingParams(temperature=config.sampling.temperature, top_p=config.sampling.top_p)


def search(model: StepModel, problems: Sequence[Problem], strategy: str,
           config: mcts.MCTSConfig | beam.BeamConfig, *, mesh=None, progress: bool = True) -> list[Result]:
  """Runs one strategy on all problems at once; Result.strategy is `strategy`."""
  if strategy == "mcts":
    return mcts.search(model, problems, config, mesh=mesh, progress=progress)
  results = beam.search(model, problems, config, progress=progress)
  for r in results:
    r.strategy = strategy
  return results


def load_step_model(config: ml_collections.ConfigDict, mesh=None) -> lm.LMStepModel:
  """The packaged (or given) model with its adapter, behind the StepModel protocol."""
  from o1jax import pretrained
  from o1jax.sampling.sampler import Sampler
  loaded = pretrained.load(config.model.path, adapter=config.model.adapter or None, dtype=config.model.dtype)
  sampler = Sampler(loaded.model, vocab=loaded.tokenizer.vocab(), mesh=mesh,
                    buckets=lm.search_buckets(config.sampling.max_rows))
  return step_model_for(config, sampler, loaded.tokenizer)


def step_model_for(config: ml_collections.ConfigDict, sampler, tokenizer) -> lm.LMStepModel:
  """An LMStepModel over an existing Sampler with the config's sampling settings (the chain samples greedily)."""
  return lm.LMStepModel(sampler, tokenizer, max_new_tokens=config.sampling.max_new_tokens,
                        params=sampling_params(config), rating_context=config.sampling.rating_context,
                        max_rows=config.sampling.max_rows, compact_every=config.sampling.compact_every,
                        keep_paths=config.strategy == "mcts", seed=config.seed)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


@dataclasses.dataclass
class Job:
  """A checked config, the problems still to solve and where the results go."""

  config: ml_collections.ConfigDict
  workdir: str
  strategy: mcts.MCTSConfig | beam.BeamConfig
  problems: list[tuple[int, problems_lib.Problem]]  # (index in the split, problem) not yet in results.jsonl
  total: int

  @property
  def results_path(self) -> str:
    return os.path.join(self.workdir, "results.jsonl")

  def run(self, model: StepModel, *, mesh=None, progress: bool = True) -> dict[str, Any]:
    """Searches the remaining problems batch by batch; returns the summary over every problem of the workdir."""
    os.makedirs(os.path.join(self.workdir, "trees"), exist_ok=True)
    batch_size = self.config.batch_size
    batches = [self.problems[i:i + batch_size] for i in range(0, len(self.problems), batch_size)]
    for batch in tqdm.tqdm(batches, desc="problem batches", unit="batch", disable=not progress or len(batches) < 2):
      self._run_batch(model, batch, mesh=mesh, progress=progress)
    return self.summary()

  def _run_batch(self, model: StepModel, batch, *, mesh, progress: bool) -> None:
    truth = self.config.self_play
    problems = [Problem(id=p.uid, question=p.question, ground_truth=p.answer if truth else None) for _, p in batch]
    start = time.perf_counter()
    results = search(model, problems, self.config.strategy, self.strategy, mesh=mesh, progress=progress)
    seconds = time.perf_counter() - start
    rows = []
    for (index, problem), result in zip(batch, results):
      correct = result.answer is not None and grading.is_equivalent(result.answer, problem.answer)
      rows.append(dict(index=index, uid=problem.uid, question=problem.question, gold=problem.answer,
                       answer=result.answer, correct=bool(correct), nodes=result.num_nodes,
                       tokens=result.usage.generated, **result.usage.as_dict(), strategy=result.strategy,
                       rounds=result.rounds, batch_seconds=round(seconds, 3)))
      if parallel.is_writer():   # every process of a multi-host job holds the same results; one writes them
        with open(os.path.join(self.workdir, "trees", f"{index}.txt"), "w") as f:
          f.write(result.to_text() + "\n")
        with open(os.path.join(self.workdir, "trees", f"{index}.json"), "w") as f:
          json.dump(result.to_json(), f)
    if parallel.is_writer():
      with open(self.results_path, "a") as f:
        for row in rows:
          f.write(json.dumps(row) + "\n")
      print_table(rows)

  def summary(self) -> dict[str, Any]:
    rows = read_results(self.results_path)
    correct = sum(r["correct"] for r in rows)
    return dict(strategy=self.config.strategy, problems=len(rows), correct=correct,
                accuracy=correct / max(len(rows), 1),
                tokens_per_problem=sum(r["tokens"] for r in rows) / max(len(rows), 1))


def claim_workdir(config: ml_collections.ConfigDict, workdir: str, resumable: Callable[[str], bool],
                  what: str = "a run") -> None:
  """Makes `workdir` and writes the config to {workdir}/config.json, after refusing a workdir that holds one of
  another config (flattened keys for which `resumable` is true may differ: a rerun may change them)."""
  os.makedirs(workdir, exist_ok=True)
  saved_path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json())
  if os.path.exists(saved_path):
    with open(saved_path) as f:
      a, b = _flatten(json.load(f)), _flatten(current)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not resumable(k))
    if changed:
      raise ValueError(f"workdir {workdir!r} holds {what} with another config ({', '.join(changed[:4])} differ); "
                       "use another --workdir or the same config.")
  if parallel.is_writer():
    with open(saved_path, "w") as f:
      json.dump(current, f, indent=2)


def read_results(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        raise ValueError(f"{path} line {number} is not JSON (a run killed while writing?); delete that line to "
                         "resume.") from None
  return rows


def print_table(rows: Sequence[dict]) -> None:
  print(f"{'index':>6}  {'answer':>12}  {'gold':>10}  correct  {'nodes':>5}  {'tokens':>7}")
  for r in rows:
    answer = "-" if r["answer"] is None else str(r["answer"])[:12]
    print(f"{r['index']:>6}  {answer:>12}  {str(r['gold'])[:10]:>10}  {'yes' if r['correct'] else 'no':>7}  "
          f"{r['nodes']:>5}  {r['tokens']:>7}")


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Job:
  """Checks the whole config (no model is loaded) and finds the problems not yet solved in workdir.

  Raises:
    ValueError: a bad config value, or a workdir holding a run with another config.
  """
  strategy = strategy_config(config)
  sampling_params(config)
  if config.sampling.rating_context not in lm.RATING_CONTEXTS:
    raise ValueError(f"sampling.rating_context={config.sampling.rating_context!r}; expected one of "
                     f"{lm.RATING_CONTEXTS}.")
  if config.strategy == "mcts" and config.mcts.ground_truth_hint and config.sampling.rating_context != "value":
    raise ValueError("mcts.ground_truth_hint puts the answer in the policy prompt; rate with "
                     "sampling.rating_context='value' so that the values never see it.")
  if config.mcts.ground_truth_hint and not config.self_play:
    raise ValueError("mcts.ground_truth_hint needs self_play=True (the answers reach the search only in self-play).")
  for name in ("num_problems", "batch_size"):
    if config[name] < 1:
      raise ValueError(f"{name}={config[name]} must be >= 1.")
  if config.sampling.max_rows < 1 or config.sampling.max_new_tokens < 1:
    raise ValueError(f"sampling.max_rows={config.sampling.max_rows} and sampling.max_new_tokens="
                     f"{config.sampling.max_new_tokens} must be >= 1.")
  claim_workdir(config, workdir, lambda key: key in _RESUMABLE_CHANGES)
  done = {r["index"] for r in read_results(os.path.join(workdir, "results.jsonl"))}
  problems = problems_lib.load(config.data.split, config.data.start, config.num_problems)
  indexed = [(config.data.start + i, p) for i, p in enumerate(problems)]
  return Job(config=config, workdir=workdir, strategy=strategy,
             problems=[(i, p) for i, p in indexed if i not in done], total=len(indexed))
