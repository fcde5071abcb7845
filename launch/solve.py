"""Solve problems with a model and write the answers: `python -m launch.solve --config=configs/smollm2_gsm8k.py`.

The model writes LLaMA-O1 steps (the base checkpoint plus the format adapter from launch.pretrain), one chain of
steps per problem, all problems batched, each step rated by the model's rating logits (`o1jax.search.chain`; the
tree search replaces the chain as it lands). Answers are graded with math-verify. Each problem's tree text,
values and grade go to {output_dir}/answers.jsonl; a rerun skips problems already there.
"""

from __future__ import annotations

import json
import os

from o1jax import xla_flags

xla_flags.configure_cpu()

from absl import app, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from o1jax import grading, pretrained, thoughts  # noqa: E402
from o1jax.data import problems as problems_lib  # noqa: E402
from o1jax.sampling.sampler import Sampler, SamplingParams  # noqa: E402
from o1jax.search import chain  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_gsm8k.py", "Experiment config file.")


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

  loaded = pretrained.load(config.model.path, adapter=config.model.adapter or None, dtype=config.model.dtype)
  sampler = Sampler(loaded.model, vocab=loaded.tokenizer.vocab())
  params = SamplingParams(temperature=config.search.temperature, greedy=config.search.temperature == 0)
  logging.info("solving %d problems, up to %d steps each", len(todo), config.search.max_steps)
  chains = chain.solve(sampler, loaded.tokenizer, [p.question for p in todo], max_steps=config.search.max_steps,
                       max_new_tokens=config.search.max_new_tokens, params=params, seed=config.search.seed)
  grades = grading.grade_batch([(c.final_text, p.answer) for c, p in zip(chains, todo)])

  with open(out_path, "a") as f:
    for problem, solved, grade in zip(todo, chains, grades):
      f.write(json.dumps({"uid": problem.uid, "question": problem.question, "tree": thoughts.serialize(solved.nodes),
                          "values": solved.values, "finished": solved.finished, "error": solved.error,
                          "predicted": grade.extracted, "source": grade.source, "answer": problem.answer,
                          "correct": grade.correct}) + "\n")
      print(f"\n### {problem.uid}\n{problem.question}")
      for node, value in zip(solved.nodes[1:], solved.values):
        print(f"  [{value:6.3f}] {node.meta}{node.text.strip()}")
      if solved.error:
        print(f"  (stopped: {solved.error})")
      print(f"--- answer {grade.extracted!r} ({grade.source}); reference {problem.answer}: "
            f"{'CORRECT' if grade.correct else 'WRONG'}")
  correct = sum(g.correct for g in grades)
  print(f"\n{correct}/{len(todo)} correct; trees written to {out_path}")


if __name__ == "__main__":
  app.run(main)
