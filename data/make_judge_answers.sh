#!/usr/bin/env bash
# The runs whose answers were labelled for judge_validation.jsonl's second, third and fifth rounds (issue 21): 24 real
# runs of the embedded aligned reference over every scenario, harmful percents, learning rates and step counts, and
# the defenses (the fourth round labelled the shipped frontiers' runs, benchmarks/results/frontier-headlines-*).
# All but the drift-* 6 are evaluated at their start and end on all 120 held-out harmful prompts (greedy + one
# sample at T = 0.7) and 16 benign ones, 40 new tokens; the drift-* 6 are the README's benign-drift runs (--quick:
# every 10 steps, 50 + 50 prompts, 48 tokens, three seeds). Resumable: rerun the script and each experiment continues.
# Usage: data/make_judge_answers.sh OUT   (OUT gets experiments/ and runs/)
set -u
out=${1:?usage: data/make_judge_answers.sh OUT}
common=(--preset frontier --set eval_every=0 --set eval_harmful=120 --set eval_benign=16 --set eval_samples=1
        --set max_new_tokens=40 --set eval_task=0 --set eval_judges=keyword,embedding-response
        --out-dir "$out/experiments" --runs-dir "$out/runs")
run() {  # run ID ARGS...: start the experiment, or resume it when its folder exists
  local id=$1; shift
  if [ -d "$out/experiments/$id" ]; then staysafe experiment --resume "$id" --out-dir "$out/experiments" --runs-dir "$out/runs"
  else staysafe experiment --id "$id" "${common[@]}" "$@"; fi || echo "experiment $id failed" >&2
}
run jv-mixed20 --scenario mixed --set harmful_percent=20 --steps 40 --set lr=3e-4 --seeds 1 --methods sft,adaptive-probe
run jv-mixed10-headlines --scenario mixed --set harmful_percent=10 --set task=headlines --steps 20 \
    --methods sft,constant-kl,adaptive-probe,adaptive-drift,lisa,token-wise,safelora
run jv-identity --scenario identity-shift --steps 20 --sweep lr=2e-4,5e-4 --methods sft
run jv-harmful --scenario harmful --set n_harmful=40 --steps 12 --methods sft,constant-kl
run jv-benign-headlines --scenario benign --set task=headlines --steps 30 --methods sft
run jv-benign-lr5e-4 --scenario benign --steps 40 --methods sft  # third round: more benign-drift successes for test
for scenario in benign mixed; do  # benign drift (README): plain sft, three seeds, the quick preset
  id=drift-$scenario
  if [ -d "$out/experiments/$id" ]; then staysafe experiment --resume "$id" --out-dir "$out/experiments" --runs-dir "$out/runs"
  else staysafe experiment --id "$id" --quick --scenario "$scenario" --seeds 3 --methods sft \
         --set eval_judges=keyword,embedding-response --out-dir "$out/experiments" --runs-dir "$out/runs"; fi
done
# fifth round: of the fine-tuned sources, the one the reader judge reads worst after benign, at a new learning rate
run jv-identity-lr3e-4 --scenario identity-shift --steps 20 --set lr=3e-4 --methods sft,constant-kl,adaptive-probe
