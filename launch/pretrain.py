"""Format pretraining (LLaMA-O1 node format and rating tokens):

  python -m launch.pretrain --config=configs/smollm2_format_pretrain.py --workdir=runs/pretrain_smollm2

Resumable: run the same command again after a kill. Override any field, e.g. --config.train.steps=10.
A bad flag, config field, model, adapter or checkpoint gets one line on stderr and exit status 2 (launch/app.py).
"""

from __future__ import annotations

from o1jax import xla_flags

xla_flags.configure_cpu()

from absl import flags, logging  # noqa: E402

from launch import app  # noqa: E402
from o1jax.learn import pretrain  # noqa: E402

_CONFIG = app.define_config_file("config", "configs/smollm2_format_pretrain.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/pretrain_smollm2", "Checkpoints, metrics and TensorBoard events.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; the progress bar says enough
  with app.user_errors():
    prepared = pretrain.prepare(_CONFIG.value, _WORKDIR.value)
  metrics = pretrain.train(prepared)
  print(f"final train metrics: {metrics}")


if __name__ == "__main__":
  app.run(main)
