"""Accuracy against compute: every (strategy, budget) of a sweep on one problem set, graded, costed and plotted.

  sweep = evaluate.prepare(config, workdir)   # every config value checked, no model loaded
  sweep.run(model_for, model_config)          # model_for(run_config) -> StepModel; model_config: DecoderConfig
  evaluate.report(workdir)                    # table.md, accuracy_vs_tokens.png, accuracy_vs_flops.png

The sweep is config.eval.strategies x config.eval.budgets over config.data.split from config.data.start
(config.num_problems problems), searched through o1jax.search.solve with self-play and the ground-truth hint
off (the search never sees the answers). A budget is samples (best_of_n, weighted_best_of_n, majority), beams
(beam, dvts) or simulations (mcts); the chain ignores it and is run once, reported at budget 1.

  - beam and dvts use beam width min(config.beam.beam_width, budget) (a budget below the width is one beam of
    budget children); that width must divide the budget, else `prepare` refuses the sweep.
  - best_of_n and its two votes are ONE best_of_n run of N = the largest budget. The value at n <= N is the vote
    over the FIRST n chains (root children 1..n, search-and-learn's `completions[:n]`), so a whole budget sweep
    of all three costs one run; at n = N it is exactly the run's own answer. Token counts of a subsample are the
    run's counts times the share of the first n chains in the run's step tokens (a step's tokens and its stopping
    token; the model records prompt and rating tokens per problem, not per node), and so are its seconds.

The workdir holds:
  config.json   the base config (a rerun whose search or model settings differ is refused)
  rows.jsonl    one JSON object per (strategy, budget, problem): strategy, budget, index, uid, gold, answer,
                correct, tokens_generated, tokens_prompted, tokens_scored, context, flops, seconds, beam_width,
                run (the search that gave it, e.g. "best_of_n@32")
  chains.jsonl  per problem of each best_of_n run: its chains' answers, scores, tokens generated and leaf ids
  table.md, accuracy_vs_tokens.png, accuracy_vs_flops.png   from `report`
  compute_optimal.md   from `report` with eval.probe > 0: uniform against difficulty-aware allocation of the
                same total samples (`compute_optimal`, read from chains.jsonl; it searches nothing)
A run appends its rows as each batch of problems ends; a rerun searches only the problems some of whose rows
are missing (a complete workdir calls no model).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np
import tqdm

from models.config import DecoderConfig
from o1jax import grading, parallel
from o1jax.data import problems as problems_lib
from o1jax.search import answers as answers_lib
from o1jax.search import beam, lm, solve
from o1jax.search import tree as tree_lib
from o1jax.search.result import Problem, Result
from o1jax.search.step_model import StepModel

# The votes read from one best_of_n run by subsampling its chains.
SUBSAMPLED = {"best_of_n": "best", "weighted_best_of_n": "weighted", "majority": "majority"}
# Config entries the sweep sets per run, or that do not change a problem's search: a rerun may change them.
_FREE = ("eval.", "strategy", "beam.n", "mcts.num_simulations", "num_problems", "batch_size", "sampling.max_rows",
         "sampling.compact_every", "self_play", "mcts.ground_truth_hint")
REPORT_ORDER = ("chain", "best_of_n", "weighted_best_of_n", "majority", "beam", "dvts", "mcts")
ROW_KEYS = ("strategy", "budget", "index", "uid", "gold", "answer", "correct", "tokens_generated", "tokens_prompted",
            "tokens_scored", "context", "flops", "seconds", "beam_width", "run")


def forward_flops(config: DecoderConfig, tokens: float, context: float) -> float:
  """Forward-pass FLOPs of `tokens` tokens that each attend over `context` keys on average.

  FLOPs = tokens * (2 * P + 4 * L * N * H * context), where
    P = non-embedding parameters (config.num_params() less the V x D embedding table, and less the separate
        V x D head when it is untied): each weight does one multiply and one add per token (Kaplan et al. 2020);
    4 * L * N * H * context: per layer, the scores q.k (N heads x H dims x context keys, a multiply and an add
        each) and the same again for the value sum, over every query head (grouped kv heads share keys, not work).
  The head's V x D matmul is not counted (Kaplan's convention; the brief's "non-embedding" parameters).
  """
  embedding = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
  non_embedding = config.num_params() - embedding
  attention = 4 * config.num_layers * config.num_heads * config.head_dim * context
  return float(tokens) * (2 * non_embedding + attention)


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """The Wilson score interval of a proportion correct / n (95% for z = 1.96); (0, 1) when n = 0."""
  if n == 0:
    return 0.0, 1.0
  p = correct / n
  center = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return max(0.0, center - half), min(1.0, center + half)


# --- one result's chains and costs ---------------------------------------------------------------------------


def _host(result: Result):
  """The result's tree fields as numpy, one tree (row 0)."""
  return {name: np.asarray(getattr(result.tree, name))[0] for name in ("parent", "rating", "length", "num_children")}


def _path(parent: np.ndarray, node: int) -> list[int]:
  """Node ids from the root's child to node."""
  path = []
  while node != tree_lib.ROOT:
    path.append(node)
    node = int(parent[node])
  return path[::-1]


@dataclasses.dataclass(frozen=True)
class Chain:
  """One best_of_n chain: the root child it starts with, its final node, that node's answer and score."""

  start: int
  leaf: int
  answer: str | None
  score: float
  nodes: tuple[int, ...]


def chains(result: Result, aggregation: str) -> list[Chain]:
  """A best_of_n result's chains in sampling order (root children 1..n), each scored as beam.search scores it."""
  t = _host(result)
  used = result.num_nodes + 1
  leaves = [i for i in range(1, used) if t["num_children"][i] == 0]
  out = []
  for leaf in leaves:
    path = _path(t["parent"], leaf)
    out.append(Chain(start=path[0], leaf=leaf, answer=result.answers[leaf], nodes=tuple(path),
                     score=beam.aggregate([float(t["rating"][i]) for i in path], aggregation)))
  return sorted(out, key=lambda c: c.start)


def subsample_answer(chains_: Sequence[Chain], n: int, rule: str) -> str | None:
  """The `rule` vote ("best", "weighted", "majority") over the first n chains; candidates in node-id order, as
  beam.search orders them (ties go to the answer seen first)."""
  candidates = sorted(chains_[:n], key=lambda c: c.leaf)
  chosen = answers_lib.vote([c.answer for c in candidates], [c.score for c in candidates], rule)
  return None if chosen is None else candidates[chosen].answer


def _step_tokens(t: dict, nodes: Sequence[int]) -> int:
  return sum(int(t["length"][i]) + 1 for i in nodes)   # each step and its stopping token


def mean_context(result: Result, nodes: Sequence[int] | None = None) -> float:
  """Mean keys a step token attends over: its position in its path's steps (ancestors' steps, then its own so far).

  Over the given nodes (default: all but the root), weighted by step length. The question and the format's
  headers are not counted (their token counts are not in the tree), so this is a lower bound.
  """
  t = _host(result)
  nodes = range(1, result.num_nodes + 1) if nodes is None else nodes
  positions = tokens = 0.0
  for node in nodes:
    length = int(t["length"][node]) + 1
    before = _step_tokens(t, _path(t["parent"], node)[:-1])
    positions += length * before + length * (length - 1) / 2
    tokens += length
  return positions / tokens if tokens else 0.0


# --- the sweep -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  """One search over the problem set and the (strategy, budget) cells it fills.

  Attributes:
    strategy: the search run (best_of_n for the three subsampled votes).
    budget: its n / beams / simulations (1 for the chain).
    cells: [(strategy, budget)] the rows it gives per problem.
    config: the run's full config (strategy, beam.n, beam.beam_width or mcts.num_simulations set).
  """

  strategy: str
  budget: int
  cells: tuple[tuple[str, int], ...]
  config: ml_collections.ConfigDict

  @property
  def name(self) -> str:
    return f"{self.strategy}@{self.budget}"


def _parse_list(config: ml_collections.ConfigDict, name: str) -> list[str]:
  value = config.eval[name]
  items = value.split(",") if isinstance(value, str) else list(value)
  items = [str(i).strip() for i in items if str(i).strip()]
  if not items:
    raise ValueError(f"eval.{name}={value!r} is empty; expected a comma-separated list.")
  return list(dict.fromkeys(items))


def strategies_and_budgets(config: ml_collections.ConfigDict) -> tuple[list[str], list[int]]:
  """config.eval.strategies and config.eval.budgets, checked (one sentence per bad value)."""
  strategies = _parse_list(config, "strategies")
  for s in strategies:
    if s not in solve.STRATEGIES:
      raise ValueError(f"eval.strategies has {s!r}; expected names from {solve.STRATEGIES}.")
  budgets = []
  for b in _parse_list(config, "budgets"):
    try:
      budget = int(b)
    except ValueError:
      raise ValueError(f"eval.budgets has {b!r}; expected positive integers.") from None
    if budget < 1:
      raise ValueError(f"eval.budgets has {budget}; every budget must be >= 1.")
    budgets.append(budget)
  return strategies, sorted(set(budgets))


def _run_config(config: ml_collections.ConfigDict, strategy: str, budget: int) -> ml_collections.ConfigDict:
  c = copy.deepcopy(config)
  c.strategy = strategy
  c.self_play = False
  c.mcts.ground_truth_hint = False
  if strategy == "mcts":
    c.mcts.num_simulations = budget
  else:
    c.beam.n = budget
    if strategy in ("beam", "dvts"):
      width = min(config.beam.beam_width, budget)
      if budget % width:
        raise ValueError(f"beam.beam_width={width} does not divide budget {budget} ({strategy} keeps budget / "
                         "beam_width beams); use budgets that are multiples of it.")
      c.beam.beam_width = width
  return c


def runs(config: ml_collections.ConfigDict) -> list[Run]:
  """The searches of the sweep, each config checked through solve.strategy_config."""
  strategies, budgets = strategies_and_budgets(config)
  out = []
  votes = [s for s in strategies if s in SUBSAMPLED]
  if votes:
    n = max(budgets)
    out.append(Run("best_of_n", n, tuple((s, b) for s in votes for b in budgets), _run_config(config, "best_of_n", n)))
  for s in strategies:
    if s == "chain":
      out.append(Run("chain", 1, (("chain", 1),), _run_config(config, "chain", 1)))
    elif s not in SUBSAMPLED:
      out.extend(Run(s, b, ((s, b),), _run_config(config, s, b)) for b in budgets)
  for run in out:
    solve.strategy_config(run.config)
    solve.sampling_params(run.config)
  return out


def read_rows(path: str) -> list[dict]:
  """rows.jsonl's rows ([] when there is none yet)."""
  return solve.read_results(path)


@dataclasses.dataclass
class Sweep:
  """A checked sweep: its searches, the problems and where the rows go."""

  config: ml_collections.ConfigDict
  workdir: str
  runs: list[Run]
  problems: list[tuple[int, problems_lib.Problem]]  # (index in the split, problem)

  @property
  def rows_path(self) -> str:
    return os.path.join(self.workdir, "rows.jsonl")

  @property
  def chains_path(self) -> str:
    return os.path.join(self.workdir, "chains.jsonl")

  def missing(self, run: Run) -> list[tuple[int, problems_lib.Problem]]:
    """The problems some of whose rows for `run`'s cells are not in rows.jsonl yet."""
    done = {(r["strategy"], r["budget"], r["index"]) for r in read_rows(self.rows_path)}
    return [(i, p) for i, p in self.problems if any((s, b, i) not in done for s, b in run.cells)]

  @property
  def pending(self) -> list[Run]:
    return [run for run in self.runs if self.missing(run)]

  def run(self, model_for: Callable[[ml_collections.ConfigDict], StepModel], model_config: DecoderConfig, *,
          mesh=None, progress: bool = True) -> None:
    """Searches every pending run batch by batch, appending rows as each batch ends."""
    cells = sum(len(r.cells) for r in self.runs)
    bar = tqdm.tqdm(total=cells, desc="(strategy, budget)", unit="cell", disable=not progress)
    for run in self.runs:
      todo = self.missing(run)
      if todo:
        bar.set_postfix(run=run.name)
        model = model_for(run.config)
        strategy = solve.strategy_config(run.config)
        size = run.config.batch_size
        for start in range(0, len(todo), size):
          self._run_batch(run, strategy, model, model_config, todo[start:start + size], mesh=mesh)
      bar.update(len(run.cells))
    bar.close()

  def _run_batch(self, run: Run, strategy, model: StepModel, model_config: DecoderConfig, batch, *, mesh) -> None:
    problems = [Problem(id=p.uid, question=p.question) for _, p in batch]
    start = time.perf_counter()
    results = solve.search(model, problems, run.strategy, strategy, mesh=mesh if run.strategy == "mcts" else None,
                           progress=False)
    seconds = (time.perf_counter() - start) / len(batch)
    done = {(r["strategy"], r["budget"], r["index"]) for r in read_rows(self.rows_path)}
    rows = []
    for (index, problem), result in zip(batch, results):
      for cell in run.cells:
        if (*cell, index) not in done:
          rows.append(_row(run, cell, index, problem, result, seconds, model_config))
    records = []
    if run.strategy == "best_of_n":
      have = {(r["run"], r["index"]) for r in read_rows(self.chains_path)}
      records = [_chains_record(run, index, problem, result) for (index, problem), result in zip(batch, results)
                 if (run.name, index) not in have]
    if parallel.is_writer():
      for path, lines in ((self.chains_path, records), (self.rows_path, rows)):
        with open(path, "a") as f:
          for line in lines:
            f.write(json.dumps(line) + "\n")


def _row(run: Run, cell: tuple[str, int], index: int, problem: problems_lib.Problem, result: Result,
         seconds: float, model_config: DecoderConfig) -> dict[str, Any]:
  strategy, budget = cell
  usage = result.usage.as_dict()
  if run.strategy == "best_of_n":
    all_chains = chains(result, run.config.beam.aggregation)
    answer = subsample_answer(all_chains, budget, SUBSAMPLED[strategy])
    t = _host(result)
    nodes = [i for c in all_chains[:budget] for i in c.nodes]
    share = _step_tokens(t, nodes) / max(_step_tokens(t, [i for c in all_chains for i in c.nodes]), 1)
    context = mean_context(result, nodes)
  else:
    answer, share, context = result.answer, 1.0, mean_context(result)
  usage = {k: round(v * share) for k, v in usage.items()}
  total = usage["tokens_generated"] + usage["tokens_prompted"] + usage["tokens_scored"]
  correct = answer is not None and grading.is_equivalent(answer, problem.answer)
  return dict(strategy=strategy, budget=budget, index=index, uid=problem.uid, gold=problem.answer, answer=answer,
              correct=bool(correct), **usage, context=round(context, 2),
              flops=forward_flops(model_config, total, context), seconds=round(seconds * share, 4),
              beam_width=run.config.beam.beam_width if run.strategy in ("beam", "dvts") else None, run=run.name)


def _chains_record(run: Run, index: int, problem: problems_lib.Problem, result: Result) -> dict[str, Any]:
  """A best_of_n problem's chains in sampling order: answer, score and tokens generated (the problem's count split
  by the chains' step tokens), for `compute_optimal`."""
  t = _host(result)
  all_chains = chains(result, run.config.beam.aggregation)
  weights = [_step_tokens(t, c.nodes) for c in all_chains]
  per_token = result.usage.generated / max(sum(weights), 1)
  return dict(run=run.name, index=index, uid=problem.uid, gold=problem.answer,
              chains=[dict(answer=c.answer, score=c.score, tokens=round(w * per_token, 2), leaf=c.leaf)
                      for c, w in zip(all_chains, weights)])


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Sweep:
  """Checks the whole sweep (no model is loaded), loads the problems and reads what workdir already holds.

  Raises:
    ValueError: a bad config value, or a workdir holding a sweep with other search or model settings.
  """
  sweep_runs = runs(config)
  for name in ("num_problems", "batch_size"):
    if config[name] < 1:
      raise ValueError(f"{name}={config[name]} must be >= 1.")
  if config.sampling.rating_context not in lm.RATING_CONTEXTS:
    raise ValueError(f"sampling.rating_context={config.sampling.rating_context!r}; expected one of "
                     f"{lm.RATING_CONTEXTS}.")
  if config.sampling.max_rows < 1 or config.sampling.max_new_tokens < 1:
    raise ValueError(f"sampling.max_rows={config.sampling.max_rows} and sampling.max_new_tokens="
                     f"{config.sampling.max_new_tokens} must be >= 1.")
  if config.eval.probe < 0:
    raise ValueError(f"eval.probe={config.eval.probe} must be >= 0 (0: no compute-optimal comparison).")
  solve.claim_workdir(config, workdir, lambda key: key.startswith(_FREE), what="a sweep")
  problems = problems_lib.load(config.data.split, config.data.start, config.num_problems)
  return Sweep(config=config, workdir=workdir, runs=sweep_runs,
               problems=[(config.data.start + i, p) for i, p in enumerate(problems)])


# --- the report ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
  """One (strategy, budget) over its problems."""

  strategy: str
  budget: int
  problems: int
  correct: int
  tokens: float   # tokens generated per problem
  flops: float    # forward FLOPs per problem

  @property
  def accuracy(self) -> float:
    return self.correct / self.problems

  @property
  def interval(self) -> tuple[float, float]:
    return wilson(self.correct, self.problems)


def _order(strategies) -> Callable[[tuple[str, int]], tuple[int, int]]:
  """A sort key of (strategy, budget): REPORT_ORDER (then any other strategy by name), then budget."""
  order = list(REPORT_ORDER) + sorted(set(strategies) - set(REPORT_ORDER))
  return lambda cell: (order.index(cell[0]), cell[1])


def cells(rows: Sequence[dict]) -> list[Cell]:
  """Rows grouped by (strategy, budget), in REPORT_ORDER (then any other strategy by name) and by budget."""
  groups: dict[tuple[str, int], list[dict]] = {}
  for r in rows:
    groups.setdefault((r["strategy"], r["budget"]), []).append(r)
  key = _order({r["strategy"] for r in rows})
  out = []
  for (strategy, budget), group in sorted(groups.items(), key=lambda kv: key(kv[0])):
    n = len(group)
    out.append(Cell(strategy, budget, n, sum(r["correct"] for r in group),
                    sum(r["tokens_generated"] for r in group) / n, sum(r["flops"] for r in group) / n))
  return out


def table(cells_: Sequence[Cell]) -> str:
  """A markdown table: accuracy with its 95% Wilson interval, tokens generated and FLOPs per problem."""
  lines = ["| strategy | budget | accuracy | 95% interval | tokens generated / problem | FLOPs / problem |",
           "|---|---|---|---|---|---|"]
  for c in cells_:
    low, high = c.interval
    lines.append(f"| {c.strategy} | {c.budget} | {c.correct}/{c.problems} = {c.accuracy:.3f} | "
                 f"[{low:.3f}, {high:.3f}] | {c.tokens:.0f} | {c.flops:.3g} |")
  return "\n".join(lines) + "\n"


def plot(cells_: Sequence[Cell], x: str, path: str) -> None:
  """Accuracy (with Wilson bars) against cells_' `x` ("tokens" or "flops") per problem, one line per strategy."""
  plot_groups({"": cells_}, x, path)


def plot_groups(groups: Mapping[str, Sequence[Cell]], x: str, path: str) -> None:
  """`plot` of several sweeps on one figure: a strategy keeps its colour and each group (a label such as
  "before" or "after") has its own line style; a single group with the label "" is `plot`."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  strategies = list(dict.fromkeys(c.strategy for cells_ in groups.values() for c in cells_))
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  styles = ("-", "--", ":", "-.")
  for g, (label, cells_) in enumerate(groups.items()):
    for strategy in dict.fromkeys(c.strategy for c in cells_):
      line = [c for c in cells_ if c.strategy == strategy]
      xs = [max(getattr(c, x), 1e-9) for c in line]
      ys = [c.accuracy for c in line]
      errors = [[c.accuracy - c.interval[0] for c in line], [c.interval[1] - c.accuracy for c in line]]
      ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, linestyle=styles[g % len(styles)],
                  color=colours[strategies.index(strategy) % len(colours)],
                  label=f"{strategy}, {label}" if label else strategy)
  ax.set_xscale("log")
  ax.set_xlabel({"tokens": "tokens generated per problem", "flops": "forward FLOPs per problem"}[x])
  ax.set_ylabel("accuracy (95% Wilson interval)")
  # Up to the highest interval (a small model's accuracies would lie flat at the bottom of a 0-1 axis).
  top = max(c.interval[1] for cells_ in groups.values() for c in cells_)
  ax.set_ylim(0, min(1.0, math.ceil((top + 0.02) * 20) / 20))
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize="small", ncol=2 if len(groups) > 1 else 1)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(workdir: str, probe: int = 0) -> list[Cell]:
  """Writes table.md and the two plots from workdir's rows.jsonl, and with probe > 0 compute_optimal.md from the
  chains of its largest best_of_n run (when it has one); returns the cells."""
  rows = read_rows(os.path.join(workdir, "rows.jsonl"))
  cells_ = cells(rows)
  if not cells_:
    raise ValueError(f"{workdir!r} has no rows.jsonl rows to report.")
  if not parallel.is_writer():
    return cells_
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(table(cells_))
  plot(cells_, "tokens", os.path.join(workdir, "accuracy_vs_tokens.png"))
  plot(cells_, "flops", os.path.join(workdir, "accuracy_vs_flops.png"))
  records = read_rows(os.path.join(workdir, "chains.jsonl"))
  if probe > 0 and records:
    largest = max({r["run"] for r in records}, key=lambda name: int(name.split("@")[1]))
    budgets = {r["budget"] for r in rows if r["strategy"] in SUBSAMPLED}
    comparisons = compute_optimal([r for r in records if r["run"] == largest], sorted(budgets), probe)
    with open(os.path.join(workdir, "compute_optimal.md"), "w") as f:
      f.write(compute_optimal_table(comparisons, probe))
  return cells_


def parse_compare(value: str) -> dict[str, str]:
  """`label:workdir,label:workdir` (e.g. "before:runs/eval_before,after:runs/eval_after") as {label: workdir}."""
  groups = {}
  for item in (i.strip() for i in value.split(",")):
    label, sep, workdir = item.partition(":")
    if not sep or not label.strip() or not workdir.strip():
      raise ValueError(f"--compare has {item!r}; expected label:workdir items separated by commas.")
    if label.strip() in groups:
      raise ValueError(f"--compare names the label {label.strip()!r} twice; expected one workdir per label.")
    groups[label.strip()] = workdir.strip()
  if len(groups) < 2:
    raise ValueError(f"--compare={value!r} names {len(groups)} sweep; expected at least two label:workdir items.")
  return groups


def compare(workdirs: Mapping[str, str], out: str) -> dict[str, list[Cell]]:
  """Sweeps side by side (before / after a self-play round): out/compare.md, a table with one accuracy column per
  label over the (strategy, budget) cells any of them has, and out/compare_vs_tokens.png and
  compare_vs_flops.png, every sweep's lines on one figure. A cell in several sweeps counts only the problems
  (indices) all of them have for it. Reads rows.jsonl only; searches nothing.

  Raises:
    ValueError: a workdir with no rows.
  """
  rows = {}
  for label, workdir in workdirs.items():
    rows[label] = read_rows(os.path.join(workdir, "rows.jsonl"))
    if not rows[label]:
      raise ValueError(f"{workdir!r} (label {label!r}) has no rows.jsonl rows to compare.")
  # A cell that several sweeps have is compared on the problems all of them have for it.
  problems: dict[tuple[str, int], list[set[int]]] = {}
  for group in rows.values():
    found: dict[tuple[str, int], set[int]] = {}
    for r in group:
      found.setdefault((r["strategy"], r["budget"]), set()).add(r["index"])
    for cell, indices in found.items():
      problems.setdefault(cell, []).append(indices)
  common = {cell: set.intersection(*sets) for cell, sets in problems.items()}
  groups = {label: cells([r for r in group if r["index"] in common[(r["strategy"], r["budget"])]])
            for label, group in rows.items()}
  if not parallel.is_writer():
    return groups
  os.makedirs(out, exist_ok=True)
  keys = sorted({(c.strategy, c.budget) for cells_ in groups.values() for c in cells_},
                key=_order({c.strategy for cells_ in groups.values() for c in cells_}))
  labels = list(groups)
  lines = ["| strategy | budget | " + " | ".join(f"{label}: accuracy [95%], tokens / problem" for label in labels)
           + " |", "|---|---|" + "---|" * len(labels)]
  for strategy, budget in keys:
    entries = []
    for label in labels:
      found = [c for c in groups[label] if (c.strategy, c.budget) == (strategy, budget)]
      if found:
        c = found[0]
        low, high = c.interval
        entries.append(f"{c.correct}/{c.problems} [{low:.3f}, {high:.3f}], {c.tokens:.0f}")
      else:
        entries.append("")
    lines.append(f"| {strategy} | {budget} | " + " | ".join(entries) + " |")
  with open(os.path.join(out, "compare.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  for x in ("tokens", "flops"):
    plot_groups(groups, x, os.path.join(out, f"compare_vs_{x}.png"))
  return groups


def load_models(config: ml_collections.ConfigDict, mesh=None):
  """The packaged (or given) model once, as (model_for(run_config) -> StepModel, its DecoderConfig)."""
  from o1jax import pretrained
  from o1jax.sampling.sampler import Sampler
  loaded = pretrained.load(config.model.path, adapter=config.model.adapter or None, dtype=config.model.dtype)
  sampler = Sampler(loaded.model, vocab=loaded.tokenizer.vocab(), mesh=mesh,
                    buckets=lm.search_buckets(config.sampling.max_rows))
  return (lambda run_config: solve.step_model_for(run_config, sampler, loaded.tokenizer)), loaded.model.config


# --- compute-optimal allocation (offline, from one best_of_n run's chains) -----------------------------------
#
# A difficulty-aware split of a fixed total of samples, read from the chains a best_of_n run already drew (so it
# costs no search): every problem first gets `probe` samples (its first chains); its difficulty is 1 - the
# agreement of those (the largest group of equivalent answers / probe; a chain without an answer agrees with
# none); the rest of the total goes to the problems in proportion to their difficulty (one sample at a time to
# the largest difficulty / (extra samples + 1), ties to the earlier problem: D'Hondt's rule), at most the run's
# N chains each; when no problem left below N has a difficulty above 0, the rest goes round the remaining
# problems evenly. Uniform gives every problem the same number of samples: the total / problems.


def agreement(answers: Sequence[str | None]) -> float:
  """The share of the answers in their largest group of equivalent answers (None agrees with nothing)."""
  stated = [a for a in answers if a is not None]
  if not stated:
    return 0.0
  groups = answers_lib.group(stated)
  return max(groups.count(g) for g in set(groups)) / len(answers)


def allocate(difficulties: Sequence[float], total: int, probe: int, cap: int) -> list[int]:
  """Samples per problem: probe each, then total - probe * problems by difficulty (see the section comment).

  Raises:
    ValueError: a total below probe samples per problem, or a probe above the cap.
  """
  count = len(difficulties)
  if probe > cap or total < probe * count:
    raise ValueError(f"total={total} samples cannot give {count} problems probe={probe} each (at most cap={cap}).")
  samples = [probe] * count
  for _ in range(total - probe * count):
    open_ = [i for i in range(count) if samples[i] < cap]
    if not open_:
      break
    weighted = [i for i in open_ if difficulties[i] > 0]
    if weighted:
      best = max(weighted, key=lambda i: (difficulties[i] / (samples[i] - probe + 1), -i))
    else:
      best = min(open_, key=lambda i: (samples[i], i))
    samples[best] += 1
  return samples


def _vote(record: dict, n: int, rule: str) -> tuple[bool, float]:
  """Whether the rule's vote over the record's first n chains is right, and those chains' tokens.

  The candidates are in leaf-id order, as `subsample_answer` and beam.search order them (ties go to the answer
  seen first), so that uniform at n is rows.jsonl's value at n; records written before chains had a "leaf"
  keep their sampling order and may break a tie the other way.
  """
  chains_ = sorted(record["chains"][:n], key=lambda c: c.get("leaf", 0))
  chosen = answers_lib.vote([c["answer"] for c in chains_], [c["score"] for c in chains_], rule)
  answer = None if chosen is None else chains_[chosen]["answer"]
  right = answer is not None and grading.is_equivalent(answer, record["gold"])
  return bool(right), sum(c["tokens"] for c in chains_)


def compute_optimal(records: Sequence[dict], budgets: Sequence[int], probe: int,
                    rules: Sequence[str] = ("majority", "weighted")) -> list[dict[str, Any]]:
  """Uniform against difficulty-aware allocation of budget x problems samples, for each budget > probe.

  Args:
    records: chains.jsonl records of one best_of_n run (N chains per problem).
    budgets: mean samples per problem to compare at (those above probe and at most N are used).
    probe: samples of the first round, whose agreement gives the difficulty.
    rules: the votes to compare ("majority", "weighted", "best").
  Returns:
    One dict per (rule, budget): rule, budget, problems, uniform / adaptive correct and tokens per problem, and
    samples (the adaptive samples of each problem).
  """
  cap = min(len(r["chains"]) for r in records)
  difficulties = [1.0 - agreement([c["answer"] for c in r["chains"][:probe]]) for r in records]
  out = []
  for rule in rules:
    for budget in sorted(b for b in budgets if probe < b <= cap):
      samples = allocate(difficulties, budget * len(records), probe, cap)
      uniform = [_vote(r, budget, rule) for r in records]
      adaptive = [_vote(r, n, rule) for r, n in zip(records, samples)]
      out.append(dict(rule=rule, budget=budget, problems=len(records),
                      uniform_correct=sum(c for c, _ in uniform), adaptive_correct=sum(c for c, _ in adaptive),
                      uniform_tokens=sum(t for _, t in uniform) / len(records),
                      adaptive_tokens=sum(t for _, t in adaptive) / len(records), samples=samples))
  return out


def compute_optimal_table(comparisons: Sequence[dict], probe: int) -> str:
  """A markdown table of `compute_optimal`'s comparisons, with 95% Wilson intervals."""
  lines = [f"Difficulty from the agreement of each problem's first {probe} samples; the same total samples.\n",
           "| vote | samples / problem | uniform accuracy | adaptive accuracy | uniform tokens / problem | "
           "adaptive tokens / problem |", "|---|---|---|---|---|---|"]
  for c in comparisons:
    cells_ = []
    for kind in ("uniform", "adaptive"):
      low, high = wilson(c[f"{kind}_correct"], c["problems"])
      cells_.append(f"{c[f'{kind}_correct']}/{c['problems']} [{low:.3f}, {high:.3f}]")
    lines.append(f"| {c['rule']} | {c['budget']} | {cells_[0]} | {cells_[1]} | {c['uniform_tokens']:.0f} | "
                 f"{c['adaptive_tokens']:.0f} |")
  return "\n".join(lines) + "\n"
