"""Self-play training: rounds of search -> experience -> replay -> learner steps -> checkpoint (o1jax/selfplay.py).

  python -m launch.train --config=configs/smollm2_selfplay.py --workdir=runs/selfplay_smollm2
  # a multi-host job (every process runs the same command; on TPU pods JAX finds the coordinator itself):
  python -m launch.train --config=... --workdir=gs://... --coordinator=host0:1234 --num_processes=2 --process_id=0

Resumable: after a kill, the same command continues from the last round's checkpoint. A bad flag or config
value, a missing or corrupt model / adapter / checkpoint file, or a batch that does not split over the mesh ends
the run with one line on stderr and exit status 2.
"""

from __future__ import annotations

from o1jax import xla_flags

xla_flags.configure_cpu()

from absl import flags, logging  # noqa: E402

from launch import app  # noqa: E402

_CONFIG = app.define_config_file("config", "configs/smollm2_selfplay.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/selfplay_smollm2", "Checkpoints, metrics, trees.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host jobs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of a multi-host job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's rank in a multi-host job.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; the progress bars say enough
  from o1jax import parallel
  with app.user_errors():
    parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from o1jax import selfplay
  with app.user_errors():
    job = selfplay.prepare(_CONFIG.value, _WORKDIR.value)
  if job.round >= job.config.rounds:
    print(f"all {job.config.rounds} rounds are done in {_WORKDIR.value}")
    job.checkpointer.close()
    return
  print(f"self-play rounds {job.round}..{job.config.rounds - 1} in {_WORKDIR.value}")
  try:
    metrics = job.run()
  except FloatingPointError as e:
    app.fail(str(e))
  print(f"last round: {metrics}")
  parallel.shutdown()


if __name__ == "__main__":
  app.run(main)
