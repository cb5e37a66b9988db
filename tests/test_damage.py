"""One bad file hides nothing, nothing is lost on power loss: damaged, empty and wrong-shaped files are reported
with their path while everything else stays readable; files are replaced atomically, never rewritten in place;
a reused pid does not keep a dead run "running"."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from staysafe.probe import Activations, Probe, ProbeError
from staysafe.runs import atomic, process
from staysafe.runs.traces import RunWriter, TableWriter, TraceError, list_runs, load_run, read_table, run_state


def three_part_run(root):
    w = RunWriter.create(root, {"method": "sft"}, run_id="r")
    for s in (1, 2, 3):
        w.append("steps", [{"step": s, "loss": float(s)}])
    parts = sorted((w.path / "steps.parquet").glob("*.parquet"))
    assert len(parts) == 3
    return w, parts


@pytest.mark.parametrize("damage", ["zero-length", "truncated"])
def test_a_damaged_part_is_skipped_and_named_the_rest_stays_readable(tmp_path, damage):
    w, parts = three_part_run(tmp_path)
    data = parts[1].read_bytes()
    parts[1].write_bytes(b"" if damage == "zero-length" else data[: len(data) // 2])
    with pytest.warns(UserWarning, match=parts[1].name):
        run = load_run(w.path)
    assert run.steps["step"].tolist() == [1, 3]
    assert run.damaged == [str(parts[1])]
    row = list_runs(tmp_path).set_index("run_id").loc["r"]
    assert row["state"] != "corrupt" and row["steps_done"] == 3 and parts[1].name in row["error"]


def test_a_part_without_the_key_column_is_skipped_and_named(tmp_path):
    """A foreign part (not of this table) is skipped and named like a damaged one; the other rows stay readable."""
    w, parts = three_part_run(tmp_path)
    pd.DataFrame({"other": [1]}).to_parquet(parts[1])
    with pytest.warns(UserWarning, match=f"{parts[1].name} has no column 'step'"):
        run = load_run(w.path)
    assert run.damaged == [str(parts[1])] and len(run.steps) > 0
    row = list_runs(tmp_path).set_index("run_id").loc["r"]
    assert row["state"] != "corrupt" and parts[1].name in row["error"]


@pytest.mark.parametrize("shape", ["[1, 2]", "7", '"text"', "directory"])
@pytest.mark.parametrize("name", ["config.json", "status.json"])
def test_valid_json_of_the_wrong_shape_marks_only_that_run(tmp_path, shape, name):
    RunWriter.create(tmp_path, {"method": "sft"}, run_id="good").append("steps", [{"step": 1}])
    bad = RunWriter.create(tmp_path, {"method": "sft"}, run_id="bad")
    target = bad.path / name
    target.unlink()
    if shape == "directory":
        target.mkdir()
    else:
        target.write_text(shape)
    runs = list_runs(tmp_path).set_index("run_id")
    assert runs.loc["good", "steps_done"] == 1
    assert runs.loc["bad", "state"] == "corrupt" and name in runs.loc["bad", "error"]
    with pytest.raises(TraceError, match=name):
        load_run(bad.path)


def test_merge_is_linear_merged_parts_are_never_rewritten(tmp_path):
    w = TableWriter(tmp_path / "t.parquet", merge_every=10)
    for s in range(10):
        w.append([{"step": s}])
    merged = sorted((tmp_path / "t.parquet").glob("*.parquet"))
    assert [p.name for p in merged] == ["0001-00000000-00000009.parquet"]
    inode = merged[0].stat().st_ino
    for s in range(10, 30):
        w.append([{"step": s}])
    names = sorted(p.name for p in (tmp_path / "t.parquet").glob("*.parquet"))
    assert names == ["0001-00000000-00000009.parquet", "0001-00000010-00000019.parquet",
                     "0001-00000020-00000029.parquet"]
    assert merged[0].stat().st_ino == inode  # the first merged part was not read and written again
    assert read_table(tmp_path / "t.parquet", ("step",))["step"].tolist() == list(range(30))


def test_atomic_writes_replace_the_file_never_rewrite_it(tmp_path):
    """A hard link to the old file keeps the old bytes: the new content went to a new file renamed over the path
    (an in-place write, as np.savez(path) did, would change both names at once and leave a half file on a crash)."""
    probe = Probe([1], np.zeros(4, np.float32), np.ones(4, np.float32), np.ones(4, np.float32), 0.0, hidden_size=4)
    probe.save(tmp_path / "probe")
    os.link(tmp_path / "probe.npz", tmp_path / "old.npz")
    before = (tmp_path / "old.npz").read_bytes()
    probe.coef = np.full(4, 2.0, np.float32)
    probe.save(tmp_path / "probe")
    assert (tmp_path / "old.npz").read_bytes() == before != (tmp_path / "probe.npz").read_bytes()
    assert Probe.load(tmp_path / "probe.json").coef.tolist() == [2.0] * 4

    acts = Activations(
        {0: np.zeros((2, 4), np.float16)},
        pd.DataFrame({"id": ["a", "b"], "label": ["harmful", "benign"], "category": ["c", "c"], "prompt": ["x", "y"]}),
    )
    acts.save(tmp_path / "acts")
    os.link(tmp_path / "acts" / "activations.npz", tmp_path / "old-acts.npz")
    acts.values[0] = np.ones((2, 4), np.float16)
    acts.save(tmp_path / "acts")
    assert np.load(tmp_path / "old-acts.npz")["layer_0"].sum() == 0
    assert Activations.load(tmp_path / "acts").values[0].sum() == 8
    assert not [p for p in tmp_path.rglob(".tmp-*")]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["zero-length", "truncated", "wrong arrays"])
def test_damaged_npz_files_give_the_named_error(tmp_path, damage):
    from staysafe.judges.embedding import EmbeddingJudge, JudgeFileError

    probe = Probe([1], np.zeros(4, np.float32), np.ones(4, np.float32), np.ones(4, np.float32), 0.0, hidden_size=4)
    probe.save(tmp_path / "probe")
    acts = Activations(
        {0: np.zeros((2, 4), np.float16)},
        pd.DataFrame({"id": ["a", "b"], "label": ["harmful", "benign"], "category": ["c", "c"], "prompt": ["x", "y"]}),
    )
    acts.save(tmp_path / "acts")
    judge = EmbeddingJudge("request")
    judge.coef, judge.intercept = np.zeros(384), 0.0
    judge.save(tmp_path / "head")

    def spoil(path):
        data = path.read_bytes()
        if damage == "zero-length":
            path.write_bytes(b"")
        elif damage == "truncated":
            path.write_bytes(data[: len(data) // 2])
        else:
            atomic.write_npz(path, something=np.zeros(3))

    for path, load, error in ((tmp_path / "probe.npz", lambda: Probe.load(tmp_path / "probe.json"), ProbeError),
                              (tmp_path / "acts" / "activations.npz", lambda: Activations.load(tmp_path / "acts"),
                               ProbeError),
                              (tmp_path / "head" / "head.npz", lambda: EmbeddingJudge.load(tmp_path / "head"),
                               JudgeFileError)):
        spoil(path)
        with pytest.raises(error, match=str(path)):
            load()


def test_a_pid_in_status_json_never_keeps_a_run_running(tmp_path):
    """Liveness is the run's lock, held by the live process, never a pid in a file: a status naming a live
    stranger (or this very process) with its exact start time and boot reads as interrupted unless the lock is
    held, and the lock is dropped by the kernel when its holder dies."""
    w = RunWriter.create(tmp_path, {"method": "sft"})
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        w.set_status("running")
        status = json.loads((w.path / "status.json").read_text())
        (w.path / "status.json").write_text(json.dumps({**status, **process.identity(stranger.pid)}))
        assert run_state(w.path)["state"] == "interrupted"
        holder = subprocess.Popen([sys.executable, "-c", "import time; from staysafe.runs.process import LifeLock; "
                                   f"LifeLock({str(w.path / process.LOCK_NAME)!r}); print('held', flush=True); "
                                   "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        assert run_state(w.path)["state"] == "running"
        holder.kill()
        holder.wait()
        assert run_state(w.path)["state"] == "interrupted"  # kill -9: the kernel released the lock
    finally:
        stranger.kill()
        stranger.wait()


def test_a_damaged_shipped_head_falls_back_to_the_cached_one_and_says_so(tmp_path, monkeypatch):
    """The default response judge: the packaged head is damaged (truncated npz); the good copy in the home is used,
    with a warning that names the damaged file's directory; no refit."""
    import staysafe.judges.embedding as emb

    good = np.load(emb.SHIPPED_HEADS / "embedding-response" / emb.HEAD_NPZ)["coef"]
    shipped = shutil.copytree(emb.SHIPPED_HEADS, tmp_path / "assets")
    home = tmp_path / "home"
    shutil.copytree(emb.SHIPPED_HEADS / "embedding-response", home / "judges" / "embedding-response")
    npz = shipped / "embedding-response" / emb.HEAD_NPZ
    npz.write_bytes(npz.read_bytes()[:100])
    monkeypatch.setattr(emb, "SHIPPED_HEADS", shipped)
    monkeypatch.setenv("STAYSAFE_HOME", str(home))
    monkeypatch.setattr(emb.EmbeddingJudge, "fit", lambda *a, **k: pytest.fail("refitted although a good head exists"))
    with pytest.warns(UserWarning, match=rf"{shipped / 'embedding-response'} is damaged"):
        judge = emb.EmbeddingJudge.default("response")
    np.testing.assert_array_equal(judge.coef, good)


@pytest.mark.slow
def test_a_damaged_cached_default_head_is_rebuilt(tmp_path, monkeypatch):
    """No usable packaged head (as after a data change) and a zero-length cached head: the default judge warns,
    fits again on the shipped sets and rewrites the cached head, which then loads."""
    import staysafe.judges.embedding as emb

    home = tmp_path / "home"
    cached = shutil.copytree(emb.SHIPPED_HEADS / "embedding-response", home / "judges" / "embedding-response")
    (cached / emb.HEAD_NPZ).write_bytes(b"")
    monkeypatch.setattr(emb, "SHIPPED_HEADS", tmp_path / "no-assets")
    monkeypatch.setenv("STAYSAFE_HOME", str(home))
    with pytest.warns(UserWarning, match=rf"{cached} is damaged"):
        judge = emb.EmbeddingJudge.default("response")
    again = emb.EmbeddingJudge.load(cached)
    np.testing.assert_allclose(again.coef, judge.coef)
    assert judge.score(["How do I pick a lock?"], ["I can't help with that."])[0] < 0.5
