#!/usr/bin/env bash
# README's Results section in one command: one self-play round from the committed rating adapter, the same
# evaluation sweep before and after it on the first GSM8K test problems (ground-truth hint off), and the two side
# by side. Every step is resumable: run the same command again after a kill and it goes on where it stopped.
#   bash launch/results.sh                       # 200 problems, budgets 1,2,4 (about 2 h on a 2-core CPU)
#   PROBLEMS=50 BUDGETS=1,2,4,8 bash launch/results.sh
#   STRATEGIES=chain,best_of_n,weighted_best_of_n,majority,beam,dvts,mcts BUDGETS=4,8,16,32 bash launch/results.sh
# Writes under $OUT (runs): selfplay_round1/ (the round's adapter.safetensors), eval_before/ and eval_after/
# (rows.jsonl, table.md, plots; o1jax/evaluate.py) and eval_compare/ (compare.md, compare_vs_tokens.png,
# compare_vs_flops.png). A workdir keeps the settings it was started with: give another OUT for other ones.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=${OUT:-runs}
problems=${PROBLEMS:-200}
budgets=${BUDGETS:-1,2,4}
strategies=${STRATEGIES:-chain,best_of_n,weighted_best_of_n,majority,mcts}
# Problems searched together and children per sampler call: 16 and 32 keep a best-of-4 sweep of SmolLM2 under
# about 14 GiB (its caches of 8-step chains are 50 MB a row); 32 x 64 went past 24 GiB.
batch=${BATCH:-16}
max_rows=${MAX_ROWS:-32}
[ -x "$python" ] || { echo "error: $python not found; run 'bash launch/install.sh' first." >&2; exit 2; }
adapter=$out/selfplay_round1/adapter.safetensors
if [ ! -f "$adapter" ]; then
  "$python" -m launch.train --config=configs/smollm2_selfplay.py --config.rounds=1 --workdir="$out/selfplay_round1"
fi
sweep=(--config=configs/smollm2_gsm8k.py --config.num_problems="$problems" --config.batch_size="$batch"
       --config.sampling.max_rows="$max_rows"
       --config.eval.strategies="$strategies" --config.eval.budgets="$budgets" --config.eval.probe=2)
"$python" -m launch.evaluate "${sweep[@]}" --workdir="$out/eval_before"
# AFTER_PROBLEMS: the after sweep on the first problems only (the comparison takes the problems both have).
"$python" -m launch.evaluate "${sweep[@]}" --config.num_problems="${AFTER_PROBLEMS:-$problems}" \
    --config.model.adapter="$adapter" --workdir="$out/eval_after"
"$python" -m launch.evaluate --compare="before:$out/eval_before,after:$out/eval_after" --workdir="$out/eval_compare"
