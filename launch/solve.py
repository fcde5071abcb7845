"""Search problems with a model and write the answers and trees (README's main command):

  python -m launch.solve --config=configs/smollm2_gsm8k.py --config.strategy=mcts --config.num_problems=32 \\
      --workdir=runs/x

Strategies: mcts, beam, dvts, best_of_n, weighted_best_of_n, majority, chain (o1jax/search/solve.py). Writes
{workdir}/results.jsonl and {workdir}/trees/<index>.{txt,json}; a rerun with the same workdir skips the problems
already solved. A bad flag or config value, or a missing or corrupt model / adapter file, ends the run with one
line on stderr and exit status 2, before any model is loaded where it can.
"""

from __future__ import annotations

from o1jax import xla_flags

xla_flags.configure_cpu()

from absl import flags  # noqa: E402

from launch import app  # noqa: E402
from o1jax import parallel  # noqa: E402
from o1jax.search import solve  # noqa: E402

_CONFIG = app.define_config_file("config", "configs/smollm2_gsm8k.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/solve_smollm2_gsm8k", "Where results.jsonl and trees/ go.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host jobs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of a multi-host job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's rank in a multi-host job.")


def main(argv):
  del argv
  config = _CONFIG.value
  with app.user_errors():
    parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    job = solve.prepare(config, _WORKDIR.value)
    if not job.problems:
      print(f"all {job.total} problems are already solved in {_WORKDIR.value}; summary: {job.summary()}")
      return
    mesh = parallel.make_mesh()
    model = solve.load_step_model(config, mesh)
  print(f"{config.strategy}: {len(job.problems)} of {job.total} problems to solve ({job.total - len(job.problems)} "
        f"already in {job.results_path})")
  summary = job.run(model, mesh=mesh if config.strategy == "mcts" else None)
  if parallel.is_writer():
    print(f"\naccuracy {summary['correct']}/{summary['problems']} = {summary['accuracy']:.3f}, "
          f"{summary['tokens_per_problem']:.0f} tokens generated per problem; results in {job.results_path}")
  parallel.shutdown()


if __name__ == "__main__":
  app.run(main)
