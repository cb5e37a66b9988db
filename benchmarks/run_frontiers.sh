#!/usr/bin/env bash
# The four frontiers of the README's "Safety-utility frontier" (issue 22): the headlines task as the user's data,
# mixed with 10% and 5% harmful examples, and benign; every method of the frontier preset but vaccine (its
# reference is a separate 75-minute build: `staysafe align --defense vaccine`, then add it with --methods), plus
# adaptive-judge and adaptive-drift, constant-kl swept over five betas; three seeds; then the harmful attack (no task:
# benign NLL is the utility; constant-kl at three betas, issue 21). Resumable: rerun the script
# and each experiment continues (finished runs kept). Usage: benchmarks/run_frontiers.sh OUT
set -u
out=${1:?usage: benchmarks/run_frontiers.sh OUT}
methods=sft,constant-kl,adaptive-probe,adaptive-judge,adaptive-drift,token-wise,adaptive-token-wise,lisa,safelora
run() {  # run ID ARGS...: start the experiment, or resume it when its folder exists
  local id=$1; shift
  if [ -d "$out/experiments/$id" ]; then staysafe experiment --resume "$id" --out-dir "$out/experiments" --runs-dir "$out/runs"
  else staysafe experiment --id "$id" --preset frontier --set task=headlines --methods "$methods" \
         --sweep beta=0.05,0.1,0.3,0.5,0.9 --seeds 3 --out-dir "$out/experiments" --runs-dir "$out/runs" "$@"
  fi || echo "experiment $id failed" >&2
}
run frontier-headlines-mixed10 --scenario mixed --set harmful_percent=10
run frontier-headlines-benign --scenario benign
run frontier-headlines-mixed5 --scenario mixed --set harmful_percent=5
if [ -d "$out/experiments/frontier-harmful" ]; then
  staysafe experiment --resume frontier-harmful --out-dir "$out/experiments" --runs-dir "$out/runs"
else staysafe experiment --id frontier-harmful --preset frontier --scenario harmful --methods "$methods" \
       --sweep beta=0.1,0.5,0.9 --seeds 3 --out-dir "$out/experiments" --runs-dir "$out/runs"
fi || echo "experiment frontier-harmful failed" >&2
