"""Accuracy against compute: every strategy at every budget on one problem set, with a table and two plots.

  python -m launch.evaluate --config=configs/smollm2_gsm8k.py \\
      --config.eval.strategies=chain,best_of_n,weighted_best_of_n,majority,beam,dvts,mcts \\
      --config.eval.budgets=1,2,4,8,16,32 --workdir=runs/eval_x

Budgets are samples (best_of_n and its votes, all three read from one best_of_n run at the largest budget),
beams (beam, dvts) or simulations (mcts); the chain runs once (o1jax/evaluate.py). Writes {workdir}/rows.jsonl,
table.md, accuracy_vs_tokens.png, accuracy_vs_flops.png and (eval.probe > 0) compute_optimal.md, uniform
against difficulty-aware allocation of the same samples; a rerun with the same workdir searches only what
rows.jsonl lacks.

  python -m launch.evaluate --compare=before:runs/eval_before,after:runs/eval_after --workdir=runs/eval_compare

draws finished sweeps side by side instead (compare.md, compare_vs_tokens.png, compare_vs_flops.png in
--workdir; no search, no model). A bad flag or config value (an unknown strategy, a budget below 1, a beam width that does not
divide a budget) ends the run with one `error:` line and exit status 2 before any model is loaded.
"""

from __future__ import annotations

import os

from o1jax import xla_flags

xla_flags.configure_cpu()

from absl import flags  # noqa: E402

from launch import app  # noqa: E402
from o1jax import evaluate, parallel  # noqa: E402

_CONFIG = app.define_config_file("config", "configs/smollm2_gsm8k.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/eval_smollm2_gsm8k", "Where rows.jsonl, table.md and plots go.")
_COMPARE = flags.DEFINE_string("compare", "", "label:workdir,label:workdir: put finished sweeps side by side in "
                               "--workdir instead of running one.")


def main(argv):
  del argv
  config = _CONFIG.value
  if _COMPARE.value:
    with app.user_errors():
      evaluate.compare(evaluate.parse_compare(_COMPARE.value), _WORKDIR.value)
    if parallel.is_writer():
      with open(os.path.join(_WORKDIR.value, "compare.md")) as f:
        print(f.read(), end="")
      print(f"table and plots in {_WORKDIR.value}")
    return
  with app.user_errors():
    sweep = evaluate.prepare(config, _WORKDIR.value)
    pending = sweep.pending
    if pending:
      mesh = parallel.make_mesh()
      model_for, model_config = evaluate.load_models(config, mesh)
  if pending:
    print(f"{len(pending)} of {len(sweep.runs)} searches to run on {len(sweep.problems)} problems: "
          f"{', '.join(run.name for run in pending)}")
    sweep.run(model_for, model_config, mesh=mesh)
  cells = evaluate.report(_WORKDIR.value, probe=config.eval.probe)
  if parallel.is_writer():
    print(evaluate.table(cells))
    print(f"table and plots in {_WORKDIR.value}")


if __name__ == "__main__":
  app.run(main)
