"""Solve problems with a model and write the answers: `python -m launch.solve --config=configs/smollm2_gsm8k.py`.

For now this is batched greedy decoding with the jitted sampler; the tree search replaces it as the search lands.
Answers go to {output_dir}/answers.jsonl, one JSON object per problem; a rerun skips problems already there.
"""

from __future__ import annotations

import json
import os

from o1jax import xla_flags

xla_flags.configure_cpu()

from absl import app, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import tokenizers  # noqa: E402

from models import hf_io  # noqa: E402
from o1jax import grading, pretrained  # noqa: E402
from o1jax.data import problems as problems_lib  # noqa: E402
from o1jax.sampling.buckets import Buckets  # noqa: E402
from o1jax.sampling.sampler import Sampler, SamplingParams  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_gsm8k.py", "Experiment config file.")


def chat_prompt(system: str, question: str) -> str:
  return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
          "<|im_start|>assistant\n")


def main(argv):
  del argv
  config = _CONFIG.value
  os.makedirs(config.output_dir, exist_ok=True)
  out_path = os.path.join(config.output_dir, "answers.jsonl")
  finished = set()
  if os.path.exists(out_path):
    with open(out_path) as f:
      finished = {json.loads(line)["uid"] for line in f if line.strip()}
  todo = [p for p in problems_lib.load(config.data.split, config.data.start, config.data.count)
          if p.uid not in finished]
  if not todo:
    logging.info("all %d problems already answered in %s", config.data.count, out_path)
    return

  model = hf_io.load_pretrained(pretrained.resolve(config.model.path), dtype=config.model.dtype)
  if "tokenizer.json" not in model.tokenizer_files:
    raise app.UsageError(f"model {config.model.path!r} came without a tokenizer.json.")
  tokenizer = tokenizers.Tokenizer.from_str(model.tokenizer_files["tokenizer.json"])
  stop_ids = tuple(model.config.eos_token_ids) or (tokenizer.token_to_id("<|im_end|>"),)
  prompts = [tokenizer.encode(chat_prompt(config.generate.system_prompt, p.question)).ids for p in todo]
  sampler = Sampler(model, vocab=tokenizer.get_vocab(), buckets=Buckets())
  budget = sampler.buckets.new_token_bucket(config.generate.max_new_tokens)
  logging.info("decoding %d problems, up to %d new tokens each", len(todo), budget)
  samples = sampler.sample(sampler.prefill(prompts, reserve=budget), k=1, stop=stop_ids,
                           max_new_tokens=config.generate.max_new_tokens, params=SamplingParams(greedy=True))
  outputs = samples.sequences()

  correct = 0
  with open(out_path, "a") as f:
    for problem, ids in zip(todo, outputs):
      text = tokenizer.decode([t for t in ids if t not in stop_ids])
      predicted = grading.last_number(text)
      match = predicted is not None and predicted == problem.answer
      correct += match
      f.write(json.dumps({"uid": problem.uid, "question": problem.question, "output": text,
                          "predicted_last_number": predicted, "answer": problem.answer, "match": match}) + "\n")
      print(f"\n### {problem.uid}\n{problem.question}\n--- model ---\n{text}\n--- last number: {predicted} "
            f"(reference {problem.answer}) {'OK' if match else 'WRONG'}")
  print(f"\n{correct}/{len(todo)} answers whose last number equals the reference; written to {out_path}")


if __name__ == "__main__":
  app.run(main)
