"""What the safety regulariser costs, measured against plain fine-tuning in the same process.

Every variant trains on the same batches with the same seed; timed steps are interleaved across variants (round
robin) so machine noise hits all of them alike, and each variant's time is the median of its timed steps after
warm-up. Results are ratios against a baseline measured in the same run (absolute seconds are not comparable across
runs on a shared machine). Peak memory is measured per variant in a fresh subprocess (peak RSS is process-wide).

    python benchmarks/bench_training.py                       # embedded model, LoRA and full fine-tuning
    python benchmarks/bench_training.py --model tiny --steps 3 --warmup 1   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VARIANTS = ("trainer-sft", "sft", "sft-notrace", "constant-kl", "adaptive-probe", "adaptive-judge")
# Variant suffixes: "-allpos" = the old path (LM head over every position); "-cache" = the reference cache (top-64 KL).
HEAD_VARIANTS = ("sft", "sft-allpos", "constant-kl", "constant-kl-allpos", "adaptive-probe-cache")


def batches(tokenizer, n: int, batch_size: int, max_length: int) -> list[dict]:
    """n fixed batches of the harmful scenario (plus benign), tokenised and collated once (200 examples, cycled)."""
    from staysafe.data import SafetyCollator, build_scenario, load_records, tokenize_dataset

    records = build_scenario("harmful", n_harmful=100, seed=0) + load_records("benign")[:100]
    ds = tokenize_dataset(tokenizer, records, max_length, extra_risk={"risk_judge": [0.5] * len(records)})
    collate = SafetyCollator(tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(ds), generator=g).tolist()
    return [collate([ds[order[(k * batch_size + j) % len(order)]] for j in range(batch_size)]) for k in range(n)]


def build(variant: str, model_spec: str, lora_r: int, tmp: Path, probe=None):
    """A trainer for one variant, with its own model copy and optimizer, ready for timed steps."""
    from transformers import Trainer, TrainingArguments

    from staysafe.models.loading import LoraSettings, load_model
    from staysafe.probe import ProbeRisk
    from staysafe.risk import ColumnRisk
    from staysafe.runs.traces import RunWriter
    from staysafe.trainer import SafetyConfig, SafetyTrainer

    torch.manual_seed(0)
    model, tok = load_model(model_spec, lora=LoraSettings(r=lora_r) if lora_r else None)
    common = dict(output_dir=str(tmp / variant), max_steps=10_000, learning_rate=1e-5, report_to="none",
                  per_device_train_batch_size=8, use_cpu=not torch.cuda.is_available(), seed=0,
                  disable_tqdm=True, logging_strategy="no", save_strategy="no")
    if variant == "trainer-sft":
        trainer = Trainer(model=model, args=TrainingArguments(**common))
    else:
        head_all = variant.endswith("-allpos")
        cache = variant.endswith("-cache")
        variant = variant.removesuffix("-allpos").removesuffix("-cache")
        method = {"sft": "sft", "sft-notrace": "sft", "constant-kl": "constant-kl",
                  "adaptive-drift": "adaptive-drift"}.get(variant, "adaptive")
        risk = {"adaptive-probe": "probe", "adaptive-judge": "judge", "adaptive-drift": "probe"}.get(variant, "label")
        sources = {"judge": ColumnRisk("judge")}
        if probe is not None:
            sources["probe"] = ProbeRisk(probe)
        if variant == "adaptive-judge":  # the judge run reads only its cached column, as in a real judge run
            sources.pop("probe", None)
        run = None if variant == "sft-notrace" else RunWriter.create(tmp / "runs", {"method": method},
                                                                     variant + ("-allpos" if head_all else "") +
                                                                     ("-cache" if cache else ""))
        cfg = SafetyConfig(**common, method=method, risk=risk, beta=0.5, lm_head_all_positions=head_all,
                           reference_cache=cache, kl_top_k=64 if cache else 0)
        trainer = SafetyTrainer(model=model, args=cfg, risk_sources=sources, run=run,
                                processing_class=tok)  # adaptive-drift tokenises its canaries
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.current_gradient_accumulation_steps = 1  # normally set by the training loop
    trainer.model.train()
    return trainer, tok


def timed_step(trainer, batch: dict, variant: str) -> float:
    """One optimizer step as the Trainer loop does it: forward/backward, grad norm, optimizer, step callbacks."""
    from staysafe.trainer import SafetyTrainer

    if not isinstance(trainer, SafetyTrainer):
        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    batch = {k: v.to(trainer.args.device) for k, v in batch.items()}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    trainer.callback_handler.on_step_begin(trainer.args, trainer.state, trainer.control)
    trainer.training_step(trainer.model, batch)
    trainer._get_grad_norm(trainer.model)
    trainer.optimizer.step()
    trainer.model.zero_grad()
    trainer.state.global_step += 1
    trainer.callback_handler.on_step_end(trainer.args, trainer.state, trainer.control)
    sync()
    return time.perf_counter() - t0


def step_times(model_spec: str, lora_r: int, steps: int, warmup: int, batch_size: int, max_length: int,
               variants=VARIANTS, distinct: int | None = None) -> dict:
    from staysafe.models.loading import load_model
    from staysafe.probe import default_probe

    base, tok = load_model(model_spec)
    probe = default_probe(base, tok, model_spec, progress=False)
    del base
    data = batches(tok, warmup + steps, batch_size, max_length)
    if distinct:  # warm-up batches of their own, then the timed steps cycle over ``distinct`` batches (epochs)
        pool = batches(tok, warmup + distinct, batch_size, max_length)
        data = pool[:warmup] + [pool[warmup + k % distinct] for k in range(steps)]
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {v: build(v, model_spec, lora_r, Path(tmp), probe)[0] for v in variants}
        times = {v: [] for v in variants}
        for k, batch in enumerate(data):
            order = list(variants) if k % 2 == 0 else list(reversed(variants))  # alternate who goes first
            for v in order:
                t = timed_step(trainers[v], batch, v)
                if k >= warmup:
                    times[v].append(t)
        readings = []
        if "adaptive-drift" in trainers:  # the closed loop's own work, timed alone: one canary reading
            tr = trainers["adaptive-drift"]
            for _ in range(10):
                t0 = time.perf_counter()
                tr.hooks.read_drift(tr.model)
                readings.append(time.perf_counter() - t0)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    mean = {v: statistics.fmean(ts) for v, ts in times.items()}
    out = {"median_s": med, "mean_s": mean, "all_s": times, "tokens_per_batch": int(data[0]["attention_mask"].sum())}
    if readings:
        out["reading_s"], out["drift_every"] = statistics.median(readings), tr.args.drift_every
    return out


def peak_memory(model_spec: str, lora_r: int, variant: str, steps: int, batch_size: int, max_length: int) -> float:
    """Peak memory (MiB) that a few steps of one variant add, in a fresh process: on CPU the RSS high-water mark
    above the RSS after loading the model and building the trainer; on a GPU the peak allocation."""
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_training as b; "
            f"print(b._memory_child({model_spec!r}, {lora_r}, {variant!r}, {steps}, {batch_size}, {max_length}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _memory_child(model_spec, lora_r, variant, steps, batch_size, max_length) -> float:
    from staysafe.models.loading import load_model
    from staysafe.probe import default_probe

    probe = None
    if variant == "adaptive-probe":
        base, tok = load_model(model_spec)
        probe = default_probe(base, tok, model_spec, progress=False)  # cached: reads two small files
        del base
    with tempfile.TemporaryDirectory() as tmp:
        trainer, tok = build(variant, model_spec, lora_r, Path(tmp), probe)
        data = batches(tok, steps, batch_size, max_length)
        if not torch.cuda.is_available():  # the steps' own peak: reset the high-water mark after loading
            Path("/proc/self/clear_refs").write_text("5")
            before = _status_kib("VmRSS")
        for batch in data:
            timed_step(trainer, batch, variant)
        if not torch.cuda.is_available():
            return (_status_kib("VmHWM") - before) / 1024
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe_throughput(model_spec: str, n: int = 1000) -> dict:
    from staysafe.data import load_records
    from staysafe.models.loading import load_model
    from staysafe.probe import collect_activations, default_probe

    model, tok = load_model(model_spec)
    probe = default_probe(model, tok, model_spec, progress=False)
    pool = load_records("eval-harmful", need_response=False) + load_records("eval-benign", need_response=False)
    prompts = [dict(pool[i % len(pool)], id=f"p{i}") for i in range(n)]
    t0 = time.perf_counter()
    acts = collect_activations(model, tok, prompts, layers=probe.layers, batch_size=32, progress=False)
    probe.predict_proba(probe.features(acts))
    probe_s = time.perf_counter() - t0
    sub = prompts[:200]
    t0 = time.perf_counter()
    collect_activations(model, tok, sub, batch_size=32, progress=False)  # every layer
    all_s = time.perf_counter() - t0
    return {"probe_prompts": n, "probe_seconds": probe_s, "probe_prompts_per_s": n / probe_s,
            "activations_all_layers_prompts_per_s": len(sub) / all_s}


def judge_costs(n: int = 200) -> dict:
    from staysafe.data import build_scenario, prompt_text, response_text
    from staysafe.judges import KeywordJudge, LocalLMJudge, make_judge, score_cached

    records = build_scenario("mixed", seed=0)[:n]
    nonce = f" (bench {time.time_ns()})"  # fresh texts: a guaranteed cache miss without touching the user's cache
    prompts, responses = [prompt_text(r) + nonce for r in records], [response_text(r) for r in records]
    out = {}
    for name, judge in (("embedding", make_judge("embedding")), ("keyword", KeywordJudge()),
                        ("local-lm", LocalLMJudge("smollm2-135m-instruct"))):
        k = n if name != "local-lm" else 40
        t0 = time.perf_counter()
        score_cached(judge, prompts[:k], responses[:k])
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, stats = score_cached(judge, prompts[:k], responses[:k])
        hit = time.perf_counter() - t0
        out[name] = {"examples": k, "first_examples_per_s": k / first, "cache_hit_examples_per_s": k / hit,
                     "cache_hits": stats["hits"]}
    return out


def topk_kl(model_spec: str, ks=(16, 64, 256)) -> dict:
    """Speed and error of the top-k KL against the exact KL, on real logits of two different models."""
    from staysafe.losses import answer_token_losses
    from staysafe.models.loading import ALIGNED, EMBEDDED, load_model

    policy, tok = load_model(model_spec)
    ref_spec = EMBEDDED if model_spec != EMBEDDED else ALIGNED  # two different models, or the KL is 0
    ref, _ = load_model(ref_spec) if model_spec != "tiny" else load_model("tiny", seed=1)
    batch = batches(tok, 1, 8, 128)[0]
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref_logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def timed(k):
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            _, kl, _ = answer_token_losses(logits, batch["labels"], ref_logits, top_k=k)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts), kl

    exact_s, exact = timed(0)
    out = {"exact_kl_mean": float(exact.mean()), "exact_seconds": exact_s}
    for k in ks:
        s, kl = timed(k)
        out[f"top{k}"] = {"speed_ratio_vs_exact": s / exact_s,
                          "relative_error": float(((exact - kl).abs().sum() / exact.abs().sum())),
                          "kl_mean": float(kl.mean())}
    return out


PHASES = ("reference forward", "policy forward", "losses", "backward", "optimizer and the rest")


def phase_profile(model_spec: str, steps: int, warmup: int, batch_size: int, max_length: int) -> dict:
    """Where a step's time goes, ``sft`` beside ``constant-kl`` (LoRA r = 16, exact KL, interleaved steps on the
    same batches): the reference forward, the policy forward, the NLL/KL computation, backward and the rest
    (optimizer, grad norm, tracing), timed by wrapping those calls of the trainers under test."""
    import staysafe.trainer as trainer_module
    from staysafe.models.loading import load_model

    _, tok = load_model(model_spec)
    data = batches(tok, warmup + steps, batch_size, max_length)
    spent: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    def hooks(model):  # every forward of the model; with LoRA the reference is this model with its adapter off
        start = {}
        model.register_forward_pre_hook(lambda m, a: start.__setitem__("t", time.perf_counter()))
        model.register_forward_hook(lambda m, a, o: spent.__setitem__(
            "forward", spent.get("forward", 0.0) + time.perf_counter() - start["t"]))

    original = trainer_module.answer_token_losses
    trainer_module.answer_token_losses = timed("losses", original)
    variants = ("sft", "constant-kl")
    rows = {v: [] for v in variants}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainers = {v: build(v, model_spec, 16, Path(tmp))[0] for v in variants}
            for t in trainers.values():
                t.reference_forward = timed("reference forward", t.reference_forward)
                t.accelerator.backward = timed("backward", t.accelerator.backward)
                hooks(t.model)
            for k, batch in enumerate(data):
                for v in (variants if k % 2 == 0 else variants[::-1]):
                    spent.clear()
                    total = timed_step(trainers[v], batch, v)
                    if k < warmup:
                        continue
                    ref = spent.get("reference forward", 0.0)
                    row = {"reference forward": ref, "policy forward": spent.get("forward", 0.0) - ref,
                           "losses": spent.get("losses", 0.0), "backward": spent.get("backward", 0.0)}
                    row["optimizer and the rest"] = total - sum(row.values())
                    rows[v].append({**row, "step": total})
    finally:
        trainer_module.answer_token_losses = original
    med = {v: {p: statistics.median(r[p] for r in rs) for p in (*PHASES, "step")} for v, rs in rows.items()}
    base = med["sft"]["step"]
    return {"median_s": med, "share_of_sft_step": {v: {p: m[p] / base for p in (*PHASES, "step")}
                                                   for v, m in med.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--out", default=str(HERE / "out" / "training.json"))
    p.add_argument("--distinct", type=int, default=6, help="head part: distinct batches the timed steps cycle over")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: "
                   "head,lora,full,memory,drift,probe,judges,topk,profile")
    a = p.parse_args()
    skip = set(a.skip.split(","))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {"model": a.model, "device": "cuda" if torch.cuda.is_available() else "cpu",
               "threads": torch.get_num_threads(), "batch": [a.batch_size, a.max_length]}
    if "head" not in skip:  # the answer-positions LM head and the reference cache against the old path
        res = step_times(a.model, 16, a.steps, a.warmup, a.batch_size, a.max_length, HEAD_VARIANTS, a.distinct)
        med, mean = res["median_s"], res["mean_s"]
        res["ratios"] = {
            "old path: constant-kl-allpos / sft-allpos": med["constant-kl-allpos"] / med["sft-allpos"],
            "constant-kl / sft (exact KL)": med["constant-kl"] / med["sft"],
            "sft / sft-allpos": med["sft"] / med["sft-allpos"],
            "constant-kl / constant-kl-allpos": med["constant-kl"] / med["constant-kl-allpos"],
            f"adaptive-probe-cache / sft (mean over {a.steps} steps cycling {a.distinct} batches)":
                mean["adaptive-probe-cache"] / mean["sft"],
            "adaptive-probe-cache / sft (median: cached steps)": med["adaptive-probe-cache"] / med["sft"],
        }
        if "memory" not in skip:
            mem = {v: peak_memory(a.model, 16, v, 3, a.batch_size, a.max_length)
                   for v in ("sft-allpos", "sft", "constant-kl-allpos", "constant-kl")}
            res["peak_memory_mib"] = mem
        results["head"] = res
        print(json.dumps({"head": {"median_s": med, "ratios": res["ratios"]}}, indent=2), flush=True)
    for label, lora_r in (("lora", 16), ("full", 0)):
        if label in skip:
            continue
        res = step_times(a.model, lora_r, a.steps, a.warmup, a.batch_size, a.max_length)
        med = res["median_s"]
        res["ratios"] = {
            "sft / trainer-sft": med["sft"] / med["trainer-sft"],
            "sft / sft-notrace (tracing overhead)": med["sft"] / med["sft-notrace"],
            "constant-kl / sft": med["constant-kl"] / med["sft"],
            "adaptive-probe / constant-kl": med["adaptive-probe"] / med["constant-kl"],
            "adaptive-judge / constant-kl": med["adaptive-judge"] / med["constant-kl"],
        }
        if "memory" not in skip:
            mem = {v: peak_memory(a.model, lora_r, v, 3, a.batch_size, a.max_length)
                   for v in ("trainer-sft", "sft", "constant-kl", "adaptive-probe")}
            res["peak_memory_mib"] = mem
            res["ratios"]["peak memory adaptive-probe / sft"] = mem["adaptive-probe"] / mem["sft"]
        results[label] = res
        print(json.dumps({label: {"median_s": med, "ratios": res["ratios"]}}, indent=2), flush=True)
    if "drift" not in skip:  # the closed loop's canary readings (every drift_every steps) against the probe alone
        res = step_times(a.model, 16, a.steps, a.warmup, a.batch_size, a.max_length,
                         ("adaptive-probe", "adaptive-drift"))
        med, mean = res["median_s"], res["mean_s"]
        res["ratios"] = {f"adaptive-drift / adaptive-probe (mean over {a.steps} steps: the readings included)":
                         mean["adaptive-drift"] / mean["adaptive-probe"],
                         "adaptive-drift / adaptive-probe (median step)": med["adaptive-drift"] / med["adaptive-probe"],
                         # the same code path but for the readings: their cost, one every drift_every steps
                         f"1 + reading / ({res['drift_every']} x adaptive-probe's median step)":
                         1 + res["reading_s"] / (res["drift_every"] * med["adaptive-probe"])}
        results["drift"] = res
        print(json.dumps({"drift": {"mean_s": mean, "ratios": res["ratios"]}}, indent=2), flush=True)
    if "profile" not in skip:  # where the time of an sft and a constant-kl step goes
        results["profile"] = phase_profile(a.model, a.steps, a.warmup, a.batch_size, a.max_length)
        print(json.dumps({"profile": results["profile"]}, indent=2), flush=True)
    if "probe" not in skip:
        results["probe"] = probe_throughput(a.model)
        print(json.dumps({"probe": results["probe"]}, indent=2), flush=True)
    if "judges" not in skip:
        results["judges"] = judge_costs()
        print(json.dumps({"judges": results["judges"]}, indent=2), flush=True)
    if "topk" not in skip:
        results["topk_kl"] = topk_kl(a.model)
        print(json.dumps({"topk_kl": results["topk_kl"]}, indent=2), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
