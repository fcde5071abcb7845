"""What a config needs per device on a TPU slice, planned here without a TPU (o1jax/plan.py):

  python -m launch.plan --config=configs/gemma2_2b_gsm8k.py --topology=v5e-16
  python -m launch.plan --config=configs/llama3_1_8b_math.py --topology=v4-8 --load=sharded
  python -m launch.plan --config=configs/gemma2_2b_gsm8k.py:solve --topology=v5e-16   # the search alone
  python -m launch.plan --config=configs/gemma2_2b_gsm8k.py --table     # README's table: presets x topologies

Prints every group of arrays with its PartitionSpec and bytes per device, the totals per phase against the
chip's HBM, and as its last line one JSON object with the totals (`bytes_per_device`, `fits`, ...). A config
that does not fit ends with one `error: ...` line on stderr naming what to change, and exit status 2, as does
a bad flag, config value or topology.
"""

from __future__ import annotations

import json
import os

# The plan needs no accelerator (it traces shapes only): keep JAX from probing for one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

from launch import app  # noqa: E402

_CONFIG = app.define_config_file("config", "configs/gemma2_2b_gsm8k.py", "Experiment config file.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e-16", "TPU slice: v4-8, v5e-16 (or v5litepod-16), v5p-64, v6e-16, ...")
_PRESET = flags.DEFINE_string("preset", None, "models.presets name for the shapes (default: the config's model).")
_LOAD = flags.DEFINE_enum("load", "device", ["device", "sharded"],
                          "device: the checkpoint is read onto one device, as o1jax.pretrained.load does; sharded: "
                          "a loader that shards as it reads.")
_QUESTION_TOKENS = flags.DEFINE_integer("question_tokens", None, "Longest question in tokens (default: estimated "
                                        "from the problems the config searches).", lower_bound=1)
_TABLE = flags.DEFINE_bool("table", False, "Print a markdown table of --table_models x --table_topologies instead.")
_TABLE_MODELS = flags.DEFINE_list("table_models", ["gemma2_2b", "gemma2_9b", "gemma2_27b", "llama3_1_8b"],
                                  "Presets of the --table rows.")
_TABLE_TOPOLOGIES = flags.DEFINE_list("table_topologies", ["v4-8", "v5e-16", "v5p-64"], "Topologies of --table.")


def main(argv):
  del argv
  from o1jax import plan
  config = _CONFIG.value
  options = dict(question_tokens=_QUESTION_TOKENS.value)
  if _TABLE.value:
    with app.user_errors():
      print(plan.markdown_table(config, _TABLE_MODELS.value, _TABLE_TOPOLOGIES.value, **options))
    return
  with app.user_errors():
    topology = plan.topology(_TOPOLOGY.value)
    report = plan.plan(config, topology, preset=_PRESET.value, load=_LOAD.value, **options)
    sentence = None if report.fits else plan.advice(config, topology, preset=_PRESET.value, load=_LOAD.value,
                                                    **options)
  print(report.table())
  print(json.dumps(report.summary()))
  if sentence is not None:
    app.fail(sentence)


if __name__ == "__main__":
  app.run(main)
