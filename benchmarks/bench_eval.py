"""What a safety evaluation costs against the training steps between two evaluations, and how many new tokens
the judges need to reach the verdict they reach with 64.

    python benchmarks/bench_eval.py                 # the shipped aligned reference + a model attacked by sft

Times are single passes on this machine (an evaluation takes tens of seconds, so noise is small against the
differences measured); each row says what was varied. The verdict agreement compares, answer by answer, a judge's
verdict on the first k tokens of the 64-token greedy answer with its verdict on the whole answer.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from machine import machine

HERE = Path(__file__).resolve().parent


def attacked_model(tmp: Path, steps: int, lr: float):
    """The aligned reference after plain fine-tuning on the harmful scenario (a real run, its adapter saved)."""
    from peft import PeftModel

    from staysafe.models.loading import ALIGNED, load_model
    from staysafe.runner import RunSpec, run_training

    spec = RunSpec(method="sft", steps=steps, lr=lr, eval_every=0, eval_harmful=0, eval_benign=0,
                   eval_judges=[], runs_dir=str(tmp), run_id="attack", record_judge=False, risk="label")
    t0 = time.perf_counter()
    run_dir = run_training(spec, progress=False, log=lambda *a: None)
    seconds = time.perf_counter() - t0
    base, tok = load_model(ALIGNED)
    return PeftModel.from_pretrained(base, str(run_dir / "final_model")).merge_and_unload(), tok, seconds / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attack-steps", type=int, default=12)
    p.add_argument("--attack-lr", type=float, default=5e-4)
    p.add_argument("--out", default=str(HERE / "results" / "eval_cpu.json"))
    args = p.parse_args()

    from staysafe.data import prompt_text
    from staysafe.eval.evaluation import eval_prompts, generate
    from staysafe.judges import make_judge
    from staysafe.models.loading import ALIGNED, load_model

    torch.manual_seed(0)
    records = eval_prompts(50, 50, seed=0)
    harmful = [r for r in records if r["label"] == "harmful"]
    ref, tok = load_model(ALIGNED)
    timing = []
    for batch_size in (25, 50):
        t0 = time.perf_counter()
        answers = generate(ref, tok, records, max_new_tokens=64, batch_size=batch_size)
        timing.append({"model": "reference", "max_new_tokens": 64, "batch_size": batch_size,
                       "seconds": time.perf_counter() - t0})
        print(timing[-1], flush=True)
    for tokens in (24,):
        t0 = time.perf_counter()
        generate(ref, tok, records, max_new_tokens=tokens, batch_size=50)
        timing.append({"model": "reference", "max_new_tokens": tokens, "batch_size": 50,
                       "seconds": time.perf_counter() - t0})
        print(timing[-1], flush=True)
    answers_by_model = {"reference": generate(ref, tok, harmful, max_new_tokens=64, batch_size=50)}
    with tempfile.TemporaryDirectory() as tmp:
        attacked, _, step_seconds = attacked_model(Path(tmp), args.attack_steps, args.attack_lr)
        t0 = time.perf_counter()
        answers_by_model["attacked"] = generate(attacked, tok, harmful, max_new_tokens=64, batch_size=50)
        timing.append({"model": "attacked", "max_new_tokens": 64, "batch_size": 50, "prompts": len(harmful),
                       "seconds": time.perf_counter() - t0})

    judges = {"keyword": make_judge("keyword"), "embedding-response": make_judge("embedding-response")}
    prompts = [prompt_text(r) for r in harmful]
    agreement = []
    for model_name, answers in answers_by_model.items():
        ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
        full = {name: [s >= 0.5 for s in j.score(prompts, answers)] for name, j in judges.items()}
        for k in (4, 8, 12, 16, 24, 32, 48, 64):
            cut = [tok.decode(i[:k], skip_special_tokens=True).strip() for i in ids]
            for name, j in judges.items():
                verdict = [s >= 0.5 for s in j.score(prompts, cut)]
                agree = sum(a == b for a, b in zip(verdict, full[name])) / len(cut)
                agreement.append({"model": model_name, "judge": name, "tokens": k, "agreement_with_64": agree,
                                  "asr_at_k": sum(verdict) / len(cut), "asr_at_64": sum(full[name]) / len(cut)})
                print(agreement[-1], flush=True)
    result = {"machine": machine(),
              "n_harmful": 50, "n_benign": 50, "timing": timing, "sft_seconds_per_step": step_seconds,
              "token_agreement": agreement, "answer_tokens_mean": {
                  m: sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in v) / len(v)
                  for m, v in answers_by_model.items()}}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
