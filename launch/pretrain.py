"""Format pretraining (LLaMA-O1 node format and rating tokens):

  python -m launch.pretrain --config=configs/smollm2_format_pretrain.py --workdir=runs/pretrain_smollm2

Resumable: run the same command again after a kill. Override any field, e.g. --config.train.steps=10.
"""

from __future__ import annotations

from o1jax import xla_flags

xla_flags.configure_cpu()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from o1jax.learn import pretrain  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_format_pretrain.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/pretrain_smollm2", "Checkpoints, metrics and TensorBoard events.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; the progress bar says enough
  metrics = pretrain.run(_CONFIG.value, _WORKDIR.value)
  print(f"final train metrics: {metrics}")


if __name__ == "__main__":
  app.run(main)
