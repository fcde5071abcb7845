"""Step-format rate and rating ROC AUC of a model on held-out problems (before / after format pretraining):

  python -m launch.evaluate_format --model=smollm2-135m-instruct                       # base model
  python -m launch.evaluate_format --adapter=configs/adapters/smollm2_135m_format.safetensors

Prints one JSON line with the figures (and writes it to --output when given). A bad flag, model, adapter or
split gets one line on stderr and exit status 2 (launch/app.py).
"""

from __future__ import annotations

import json

from o1jax import xla_flags

xla_flags.configure_cpu()

from absl import flags  # noqa: E402

from launch import app  # noqa: E402
from o1jax import format_eval, pretrained  # noqa: E402
from o1jax.data import problems as problems_lib  # noqa: E402
from o1jax.sampling.buckets import Buckets  # noqa: E402
from o1jax.sampling.sampler import Sampler, SamplingParams  # noqa: E402

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Base model: a packaged name or a path.")
_ADAPTER = flags.DEFINE_string("adapter", None, "Adapter file from launch.pretrain (None: the base model with the "
                               "special tokens added at the mean embedding).")
_SPLIT = flags.DEFINE_string("split", "gsm8k_test", "Held-out problems.")
_START = flags.DEFINE_integer("start", 0, "First problem.", lower_bound=0)
_COUNT = flags.DEFINE_integer("count", 200, "Number of problems.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Sampling temperature of the policy steps.", lower_bound=0.0)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Token budget of one step.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Rows per sampler call.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the prompts, the corruptions and the sampling.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the JSON line to this file.")


def main(argv):
  del argv
  with app.user_errors():  # the problems first: they load in a moment, the model takes seconds
    problems = problems_lib.load(_SPLIT.value, _START.value, _COUNT.value)
    if not problems:
      raise ValueError(f"--split={_SPLIT.value} has no problems from --start={_START.value}; expected a start "
                       "inside the split.")
    loaded = pretrained.load(_MODEL.value, adapter=_ADAPTER.value, dtype="float32")
  sampler = Sampler(loaded.model, vocab=loaded.tokenizer.vocab(), buckets=Buckets())
  report = format_eval.evaluate(sampler, loaded.tokenizer, problems, batch_size=_BATCH.value,
                                max_new_tokens=_MAX_NEW.value, params=SamplingParams(temperature=_TEMPERATURE.value),
                                seed=_SEED.value)
  for text in report.examples:
    print(f"--- sampled step ---\n{text}")
  line = json.dumps({"model": _MODEL.value, "adapter": _ADAPTER.value, "split": _SPLIT.value,
                     "problems": len(problems), **report.as_dict()})
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(line + "\n")
  print(line)


if __name__ == "__main__":
  app.run(main)
