"""Accuracy of every search strategy at one budget: SmolLM2-135M (+ the rating adapter) on GSM8K test problems.

  .venv/bin/python bench/strategies.py [--quick] [--problems 100] [--budget 16] [--workdir runs/strategies]

Budget: samples (best_of_n and its votes), beams (beam and dvts, beam width 4) or simulations (mcts); the
chain is one greedy chain. Every other constant is configs/smollm2_gsm8k.py's; the ground-truth hint is off,
and the search never sees the answers. Each strategy runs through the main job (`o1jax.search.solve`) in
{workdir}/{strategy}, so an interrupted run resumes where it stopped. weighted_best_of_n and majority are
the other two votes over the same best_of_n trees (the three differ only in the final vote), re-counted from
its tree files instead of sampled again.

Prints a markdown table (accuracy with its Wilson 95% interval, tokens generated / prompted / scored per
problem, seconds per problem); --quick: 2 problems at budget 4 (beam width 2), at most 3 steps deep, every
strategy in one process. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from o1jax import xla_flags  # noqa: E402

xla_flags.configure_cpu()

from configs import smollm2_gsm8k  # noqa: E402
from o1jax import grading, pretrained  # noqa: E402
from o1jax.evaluate import wilson  # noqa: E402
from o1jax.sampling.sampler import Sampler  # noqa: E402
from o1jax.search import answers, beam, lm, solve  # noqa: E402

RUN = ("chain", "best_of_n", "beam", "dvts", "mcts")
REVOTED = {"weighted_best_of_n": "weighted", "majority": "majority"}


def config_for(strategy: str, problems: int, budget: int, width: int, max_depth: int | None = None):
  c = smollm2_gsm8k.get_config()
  c.strategy, c.num_problems = strategy, problems
  c.batch_size = problems
  c.mcts.num_simulations = budget
  c.beam.n = budget
  c.beam.beam_width = width
  if max_depth is not None:
    c.beam.max_depth = c.mcts.max_depth = max_depth
  return c


def revote(workdir: str, rule: str, rows: list[dict]) -> list[dict]:
  """best_of_n's rows with the answer chosen by another vote over the same chains (their final nodes)."""
  out = []
  for row in rows:
    record = json.load(open(os.path.join(workdir, "trees", f"{row['index']}.json")))
    leaves = [n for n in record["nodes"][1:] if n["num_children"] == 0]
    scores = []
    for leaf in leaves:   # "last" aggregation: the final step's p(positive)
      scores.append(beam.aggregate([leaf["rating"]], "last"))
    chosen = answers.vote([n["answer"] for n in leaves], scores, rule)
    answer = None if chosen is None else leaves[chosen]["answer"]
    out.append(dict(row, answer=answer, correct=answer is not None and grading.is_equivalent(answer, row["gold"])))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="2 problems at budget 4")
  parser.add_argument("--problems", type=int, default=100)
  parser.add_argument("--budget", type=int, default=16)
  parser.add_argument("--workdir", default="runs/strategies")
  parser.add_argument("--strategies", default=",".join(RUN))
  args = parser.parse_args()
  problems, budget = (2, 4) if args.quick else (args.problems, args.budget)
  width = 2 if args.quick else 4
  workdir = os.path.join(args.workdir, f"{problems}x{budget}")
  strategies = args.strategies.split(",")

  # --quick: every strategy in this process, sharing one model and its compiled programs (a few shapes at 2
  # problems), and chains of at most 3 steps; a full run starts one process per strategy (below).
  max_depth = 3 if args.quick else None
  sampler = tokenizer = None
  table = {}
  for strategy in strategies:
    config = config_for(strategy, problems, budget, width, max_depth)
    job = solve.prepare(config, os.path.join(workdir, strategy))
    if job.problems and len(strategies) > 1 and not args.quick:
      # One process per strategy: each compiles programs for its own shapes (hundreds over a long run), and a
      # process that ran them all would hold every one of them.
      command = [sys.executable, __file__, f"--problems={problems}", f"--budget={budget}",
                 f"--workdir={args.workdir}", f"--strategies={strategy}"] + (["--quick"] if args.quick else [])
      subprocess.run(command, check=True)
    elif job.problems:
      print(f"--- {strategy}: {len(job.problems)} problems", flush=True)
      if sampler is None:
        base = smollm2_gsm8k.get_config()
        loaded = pretrained.load(base.model.path, adapter=base.model.adapter, dtype=base.model.dtype)
        sampler = Sampler(loaded.model, vocab=loaded.tokenizer.vocab(),
                          buckets=lm.search_buckets(base.sampling.max_rows))
        tokenizer = loaded.tokenizer
      job.run(solve.step_model_for(config, sampler, tokenizer))
    table[strategy] = solve.read_results(job.results_path)
  if "best_of_n" in table:
    for name, rule in REVOTED.items():
      table[name] = revote(os.path.join(workdir, "best_of_n"), rule, table["best_of_n"])

  print(f"\nSmolLM2-135M-Instruct + rating adapter, GSM8K test problems 0-{problems - 1}, budget {budget} "
        "(samples, beams or simulations), ground-truth hint off")
  print("| strategy | accuracy | 95% interval | tokens generated / problem | tokens prompted / problem | "
        "tokens scored / problem | seconds / problem |")
  print("|---|---|---|---|---|---|---|")
  summary = {"bench": "strategies", "problems": problems, "budget": budget}
  for name, rows in table.items():
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    low, high = wilson(correct, n)
    per = lambda key: sum(r[key] for r in rows) / max(n, 1)  # noqa: E731
    seconds = sum({r["batch_seconds"] for r in rows}) / max(n, 1)
    print(f"| {name} | {correct}/{n} = {correct / max(n, 1):.3f} | [{low:.3f}, {high:.3f}] | "
          f"{per('tokens_generated'):.0f} | {per('tokens_prompted'):.0f} | {per('tokens_scored'):.0f} | "
          f"{seconds:.1f} |")
    summary[f"accuracy_{name}"] = round(correct / max(n, 1), 4)
    summary[f"tokens_{name}"] = round(per("tokens_generated"), 1)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
