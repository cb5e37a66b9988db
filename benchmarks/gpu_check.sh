#!/usr/bin/env bash
# GPU check (run on a CUDA machine with no hub access): the trainer, traces and benchmark on a randomly initialised
# model of SmolLM2-135M's shape (timings do not depend on the weights' values). Expects, in the repo root:
#   .whl/       wheels to install over the machine's packages (optional)
#   .devcarry/  home/models/smollm2-135m-instruct-tokenizer/ and smol-config.json
# Writes its results under ${OUT:-/tmp/gpu_out}.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export STAYSAFE_HOME=$PWD/.devcarry/home HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 - <<'PY' | tee -a "$OUT/gpu.txt"
import torch, transformers, peft, datasets, pyarrow
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__,
      "peft", peft.__version__, "datasets", datasets.__version__, "pyarrow", pyarrow.__version__)
PY
python3 - <<'PY'
import json, shutil, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
cfg = AutoConfig.for_model(**{k: v for k, v in json.loads(Path(".devcarry/smol-config.json").read_text()).items()
                              if k not in ("architectures", "transformers_version", "_name_or_path")})
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg).save_pretrained("/tmp/smol-random")
for f in Path(".devcarry/home/models/smollm2-135m-instruct-tokenizer").iterdir():
    shutil.copy(f, "/tmp/smol-random")
print("random SmolLM2-shaped model ready")
PY
# 1) a real run end to end on the GPU: traces, evaluation, probe risk
python3 -m staysafe.cli train --model /tmp/smol-random --scenario mixed --method adaptive --risk probe --steps 30 \
  --batch-size 16 --eval-every 10 --eval-harmful 20 --eval-benign 20 --eval-judges "" --no-record-judge \
  --runs-dir "$OUT/runs" --run-id gpu-adaptive 2>&1 | tail -3
python3 - <<'PY' | tee "$OUT/run_summary.txt"
import os
from staysafe import load_run
r = load_run(os.environ.get("OUT", "/tmp/gpu_out") + "/runs/gpu-adaptive")
print(r.status["state"], len(r.steps), "steps; evals at", r.evals["step"].tolist())
print(r.steps[["step", "nll", "kl", "beta", "risk_probe", "wall_time"]].tail(5).to_string())
PY
rm -rf "$OUT/runs/gpu-adaptive/final_model" "$OUT/runs/gpu-adaptive/checkpoints"
tar -C "$OUT" -czf "$OUT/run.tgz" runs && rm -rf "$OUT/runs"
# 2) the benchmark: step-time ratios and peak GPU memory, LoRA and full fine-tuning
python3 benchmarks/bench_training.py --model /tmp/smol-random --batch-size 16 --max-length 128 --steps 9 --warmup 3 \
  --skip judges,topk --out "$OUT/bench_gpu.json" 2>&1 | grep -v Warning | tail -60
