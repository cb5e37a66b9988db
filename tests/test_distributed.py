"""The trainer is a plain transformers Trainer: the same command runs under torchrun with several processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import make_records
from staysafe.runs.traces import list_runs, load_run


@pytest.mark.slow
@pytest.mark.parametrize("lora_r", ["4", "0"])  # 0: full fine-tuning, the frozen reference copy prepared per rank
def test_two_processes_under_torchrun_write_one_run(tmp_path, lora_r):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(48)))
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "staysafe.cli", "train",
           "--model", "tiny", "--lora-r", lora_r, "--batch-size", "4", "--max-length", "64", "--steps", "4",
           "--data", str(data), "--method", "adaptive", "--risk", "probe", "--no-record-judge",
           "--eval-every", "2", "--eval-harmful", "2", "--eval-benign", "2", "--max-new-tokens", "2",
           "--eval-judges", "", "--runs-dir", str(tmp_path / "runs")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "STAYSAFE_HOME": os.environ.get(
                             "STAYSAFE_HOME", os.path.expanduser("~/.cache/staysafe"))})
    assert res.returncode == 0, res.stderr[-4000:]
    runs = list_runs(tmp_path / "runs")
    assert len(runs) == 1 and runs["state"].iloc[0] == "finished"  # one directory, written by the main process
    run = load_run(runs["path"].iloc[0])
    assert run.config["processes"] == 2
    assert run.steps["step"].tolist() == [1, 2, 3, 4]
    # each optimizer step saw both processes' batches: 2 x 4 examples, all recorded
    assert run.examples.groupby("step").size().tolist() == [8, 8, 8, 8]
    assert run.steps["n_examples"].tolist() == [8, 8, 8, 8]
    assert run.evals["step"].tolist() == [0, 2, 4]
    assert run.examples["risk_probe"].notna().all()
    assert run.steps["kl"].iloc[0] < 1e-5  # step 1: the model still equals its reference on every rank


@pytest.mark.slow
def test_fsdp2_sharded_reference_matches_the_unsharded_one_on_cpu(tmp_path):
    """staysafe.reference.shard_reference (the FSDP2 path of prepare_reference) under torchrun with two CPU
    processes: same logits as the unsharded model, half of the parameters per rank, nothing trainable."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    script = os.path.join(os.path.dirname(__file__), "scripts", "fsdp2_reference.py")
    res = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29519", script], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["world"] == 2 and r["fsdp_module"].startswith("FSDP")
        assert r["wrapped"] == ["LlamaDecoderLayer"] and r["n_wrapped"] == 2  # each decoder layer its own unit
        assert r["max_diff"] < 1e-6
        assert 0.4 < r["local_share"] < 0.6  # sharded: each rank holds about half
        assert not r["requires_grad"]


def test_fsdp_without_gpu_processes_is_refused_before_work(tmp_path, capsys):
    """accelerate shards with FSDP only on GPU-class devices: elsewhere it would silently train unsharded, so
    --fsdp there is an error that says so, before any model load and with no run directory."""
    from staysafe.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(8)))
    rc = main(["train", "--model", "tiny", "--data", str(data), "--fsdp", "full_shard auto_wrap", "--lora-r", "0",
               "--runs-dir", str(tmp_path / "runs")])
    assert rc == 2
    assert "needs several GPU processes" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
