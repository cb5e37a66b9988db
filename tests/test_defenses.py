"""The published defenses beside adaptive regularisation, on the tiny model: each test fails if the defense's
defining mechanism is removed (the per-position weights, the alternation and proximal pull, the projection)."""

from __future__ import annotations

import pytest
import torch
from test_trainer import train

from conftest import make_records
from staysafe.data import IGNORE
from staysafe.losses import answer_token_positions, position_betas, tokenwise_loss


def test_answer_token_positions_count_from_each_answers_first_token():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, 7, IGNORE], [IGNORE, IGNORE, IGNORE, IGNORE, 8, 9]])
    assert answer_token_positions(labels).tolist() == [1, 2, 3, 1, 2]  # next-token targets: 5,6,7 and 8,9
    keep = torch.tensor([1, 2, 3, 4])  # only the positions whose next token is an answer token
    assert answer_token_positions(labels, keep).tolist() == [1, 2, 3, 1, 2]
    assert position_betas(torch.tensor([1, 2, 5, 6, 40]), [0.5, 2, 2, 2, 2, 0.1]).tolist() == pytest.approx(
        [0.5, 2, 2, 0.1, 0.1])


def test_tokenwise_loss_tends_to_the_nll_gradient_as_beta_vanishes_and_saturates_past_the_reference():
    logits = torch.randn(6, 11, requires_grad=True)
    targets = torch.randint(0, 11, (6,))
    ref_nll = torch.rand(6) + 1.0
    rows = torch.tensor([0, 0, 0, 1, 1, 1])
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    g_nll, = torch.autograd.grad(nll.mean(), logits, retain_graph=True)
    small, _, _ = tokenwise_loss(nll, ref_nll, rows, torch.full((6,), 1e-4), 2)
    g_small, = torch.autograd.grad(small, logits, retain_graph=True)
    assert torch.allclose(g_small, g_nll, atol=1e-4)  # beta -> 0: plain fine-tuning
    zero, _, _ = tokenwise_loss(nll, ref_nll, rows, torch.tensor([0.0, 1e-4, 0.0, 0.5, 0.0, 2.0]), 2)
    g_zero, = torch.autograd.grad(zero, logits, retain_graph=True)  # beta = 0 is that limit, finite
    assert torch.isfinite(zero) and torch.isfinite(g_zero).all()
    assert torch.allclose(g_zero[[0, 2, 4]], g_nll[[0, 2, 4]], atol=1e-6)
    same, _, _ = tokenwise_loss(nll, nll.detach(), rows, torch.full((6,), 2.0), 2)
    assert abs(float(same)) < 1e-6  # 0 where the model equals the reference
    # a large beta stops pushing once the model's log-probability passes the reference's
    past = nll.detach() + 3.0  # the model 3 nats more likely than the reference on every token
    big, _, per_token = tokenwise_loss(nll, past, rows, torch.full((6,), 10.0), 2)
    g_big, = torch.autograd.grad(big, logits, retain_graph=True)
    assert g_big.abs().max() < 1e-10 and per_token.shape == (6,)
    behind = nll.detach() - 3.0  # 3 nats less likely: the pull is twice the NLL's
    pull, _, _ = tokenwise_loss(nll, behind, rows, torch.full((6,), 10.0), 2)
    g_pull, = torch.autograd.grad(pull, logits)
    assert torch.allclose(g_pull, 2 * g_nll, atol=1e-5)


def test_token_wise_records_its_position_schedule(tokenizer, tmp_path):
    _, run = train(tokenizer, tmp_path, make_records(8), steps=2, method="token-wise", token_betas="20,20,20,0.01",
                   lora=True)
    assert set(run.positions.columns) >= {"step", "position", "beta", "loss", "log_ratio", "n"}
    last = run.positions[run.positions["step"] == 2].set_index("position")
    assert last.loc[1:3, "beta"].tolist() == pytest.approx([20, 20, 20])
    assert last.loc[4:, "beta"].tolist() == pytest.approx([0.01] * (len(last) - 3))
    assert last.loc[1, "n"] == 4 and (run.steps["beta"] == 1.0).all()  # every answer has a 1st token; level 1


def first_token_gradient(tokenizer, tmp_path, token_betas: str) -> float:
    """The gradient norm of the token-wise loss of only the first answer tokens, on a LoRA model that plain
    fine-tuning has already made more likely than its reference (the disabled adapter) on those tokens."""
    records = make_records(8)
    sft, _ = train(tokenizer, tmp_path / token_betas, records, steps=6, method="sft", lora=True, learning_rate=1e-2,
                   run=False)
    from staysafe.data import SafetyCollator, tokenize_dataset
    from staysafe.trainer import SafetyConfig, SafetyTrainer

    args = SafetyConfig(output_dir=str(tmp_path / "tw"), method="token-wise", token_betas=token_betas, use_cpu=True,
                        max_steps=1, per_device_train_batch_size=8, report_to="none")
    ds = tokenize_dataset(tokenizer, records, 64)
    tw = SafetyTrainer(
        model=sft.model, args=args, train_dataset=ds, data_collator=SafetyCollator(tokenizer.pad_token_id)
    )
    batch = SafetyCollator(tokenizer.pad_token_id)([dict(r) for r in ds])
    first = (batch["labels"] != IGNORE).long().cumsum(1) == 1
    batch["labels"] = batch["labels"].masked_fill(~first, IGNORE)  # only each answer's first token remains
    tw.model.zero_grad()
    tw.compute_loss(tw.model, batch).backward()
    ratio = tw._pending[-1]["by_position"][3]
    assert (ratio > 0.3).all()  # the fine-tuned model is ahead of the reference on every first token
    return sum(float(p.grad.norm() ** 2) for p in tw.model.parameters() if p.grad is not None) ** 0.5


def test_token_wise_stops_pushing_the_first_tokens_past_the_reference(tokenizer, tmp_path):
    """A large beta on the first position: once the model is more likely than the reference there, those tokens
    no longer pull the weights (with a small beta they pull like plain fine-tuning)."""
    shaped, flat = (
        first_token_gradient(tokenizer, tmp_path, "50,0.01"),
        first_token_gradient(tokenizer, tmp_path, "0.01"),
    )
    assert flat > 1e-3 and shaped < 1e-3 * flat, (shaped, flat)


def test_adaptive_token_wise_scales_the_position_schedule_by_the_risks_level(tokenizer, tmp_path):
    kw = dict(steps=2, method="adaptive-token-wise", risk="label", beta_min=0.1, beta_max=0.8, lora=True,
              token_betas="0.5,2,0.1")
    _, harmful = train(tokenizer, tmp_path / "h", make_records(8, harmful_every=1), **kw)
    _, benign = train(tokenizer, tmp_path / "b", [{**r, "label": "benign"} for r in make_records(8)], **kw)
    assert (harmful.steps["beta"] == 1.0).all()  # risk 1: beta_max / beta_max
    assert benign.steps["beta"].tolist() == pytest.approx([0.125, 0.125])  # risk 0: beta_min / beta_max
    h = harmful.positions.set_index(["step", "position"])["beta"]
    b = benign.positions.set_index(["step", "position"])["beta"]
    assert (
        h.loc[(1, 1)] == pytest.approx(0.5)
        and h.loc[(1, 2)] == pytest.approx(2)
        and h.loc[(1, 9)] == pytest.approx(0.1)
    )
    assert b.loc[(1, 2)] == pytest.approx(2 * 0.125)


def test_lisa_alternates_alignment_and_user_steps(tokenizer, tmp_path):
    trainer, run = train(tokenizer, tmp_path, make_records(16), steps=7, method="lisa", lisa_align_steps=2,
                         lisa_user_steps=3, lisa_rho=1.0, lora=True, max_length=72)
    assert run.steps["phase"].tolist() == ["align", "align", "user", "user", "user", "align", "align"]
    assert (
        max(len(f["input_ids"]) for f in trainer.hooks.schedule.features) == 72
    )  # the run's max_length, not a fixed one
    assert sorted(run.examples["step"].unique()) == [3, 4, 5]  # the run's own examples only in its user steps
    assert trainer.reference_calls == 0 and (run.steps["kl"] == 0).all()
    # the alignment batches come from the shipped refusal data
    batch = trainer.hooks.schedule.alignment_batch("cpu")
    text = tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    from staysafe.data import load_records, response_text
    from staysafe.models.aligned import TRAIN_SETS

    assert any(response_text(r)[:40] in text for name in TRAIN_SETS for r in load_records(name))  # its start


def test_lisa_proximal_term_holds_the_weights_near_the_last_switch(tokenizer, tmp_path):
    def moved(rho):
        trainer, _ = train(tokenizer, tmp_path / str(rho), make_records(16), steps=6, method="lisa", lisa_align_steps=1,
                           lisa_user_steps=10, lisa_rho=rho, lora=True, learning_rate=1e-2, run=False)
        # steps 2-6 are user steps: the anchor was taken at the switch, at the start of step 2
        return sum(float(((p.detach() - trainer.hooks.schedule.anchor[n]) ** 2).sum())
                   for n, p in trainer.model.named_parameters() if p.requires_grad) ** 0.5

    free, held = moved(0.0), moved(200.0)
    assert held < 0.5 * free, (held, free)


def rank_one_aligned(tokenizer, seed=0):
    """A tiny 'unaligned' model and an 'aligned' copy whose q_proj weights differ by a rank-one u v^T."""
    import copy

    from staysafe.models.loading import build_tiny

    unaligned = build_tiny(tokenizer, seed=seed)
    aligned = copy.deepcopy(unaligned)
    g = torch.Generator().manual_seed(3)
    us = {}
    with torch.no_grad():
        for name, m in aligned.named_modules():
            if name.endswith("q_proj"):
                u, v = torch.randn(m.weight.shape[0], 1, generator=g), torch.randn(1, m.weight.shape[1], generator=g)
                m.weight += 0.1 * u @ v
                us[name] = u / u.norm()
    return aligned, unaligned, us


def inside_and_outside(tokenizer):
    """A two-layer LoRA on the rank-one 'aligned' tiny model: one update inside the alignment subspace (its B along
    u), one orthogonal to it; with the projections C of both layers."""
    import copy

    from staysafe.defenses.safelora import alignment_projections, lora_modules
    from staysafe.models.loading import LoraSettings, add_lora

    aligned, unaligned, us = rank_one_aligned(tokenizer)
    model = add_lora(copy.deepcopy(aligned), LoraSettings(r=2, target_modules=("q_proj",)))
    layers = lora_modules(model)
    inside, outside = sorted(layers)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, layer in layers.items():
            B = layer.lora_B["default"].weight
            if name == inside:  # every column along u: the update lies in the alignment subspace
                B.copy_(us[name] @ torch.randn(1, B.shape[1], generator=g))
            else:  # orthogonal to u
                r = torch.randn(B.shape, generator=g)
                B.copy_(r - us[name] @ (us[name].T @ r))
            layer.lora_A["default"].weight.copy_(torch.randn(layer.lora_A["default"].weight.shape, generator=g))
    return model, layers, alignment_projections(aligned, unaligned, sorted(layers)), inside, outside


def test_safelora_projects_the_updates_that_leave_the_alignment_subspace(tokenizer):
    from staysafe.defenses.safelora import project_lora

    model, layers, projections, inside, outside = inside_and_outside(tokenizer)
    before = {n: layers[n].lora_B["default"].weight.detach().clone() for n in layers}
    rows = {r["layer"]: r for r in project_lora(model, projections, threshold=0.5)}
    assert rows[inside]["cosine"] == pytest.approx(1.0, abs=1e-4) and not rows[inside]["projected"]
    assert rows[outside]["cosine"] < 0.5 and rows[outside]["projected"]  # C dW ~ 0: its direction is noise
    assert rows[outside]["norm_after"] < 1e-4 * rows[outside]["norm_before"]
    assert torch.equal(layers[inside].lora_B["default"].weight, before[inside])  # left alone
    expected = projections[outside] @ before[outside]  # B <- C B: the update becomes C dW
    assert torch.allclose(layers[outside].lora_B["default"].weight, expected, atol=1e-6)
    assert layers[outside].lora_B["default"].weight.norm() < 1e-4  # C annihilates what is orthogonal to u


def test_safelora_number_mode_projects_the_lowest_cosines(tokenizer):
    from staysafe.defenses.safelora import project_lora

    model, layers, projections, inside, outside = inside_and_outside(tokenizer)
    rows = {r["layer"]: r for r in project_lora(model, projections, threshold=0.0, layers=1)}
    assert rows[outside]["projected"] and not rows[inside]["projected"]  # the threshold is ignored
    rows = {r["layer"]: r for r in project_lora(model, projections, threshold=0.0, layers=2)}
    assert rows[outside]["projected"] and rows[inside]["projected"]


def tiny_unaligned(tokenizer, path):
    """A tiny model of another seed, saved as a local directory: the 'unaligned' side of tiny's alignment delta."""
    from staysafe.models.loading import build_tiny

    build_tiny(tokenizer, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_safelora_method_and_the_post_hoc_command_project_and_evaluate_again(tokenizer, tmp_path):
    import json

    from conftest import TINY_RUN, run_cli
    from staysafe.runs.traces import load_run

    unaligned = tiny_unaligned(tokenizer, tmp_path / "unaligned")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(16)))
    common = [*TINY_RUN, "--data", str(data), "--steps", "3", "--eval-every", "0", "--lora-r", "4", "--save-model",
              "--runs-dir", str(tmp_path / "runs")]
    res = run_cli("train", *common, "--method", "safelora", "--safelora-unaligned", unaligned,
                  "--safelora-threshold", "1.0", "--run-id", "sl")
    assert res.returncode == 0, res.stderr[-3000:]
    run = load_run(tmp_path / "runs" / "sl")
    report = json.loads((run.path / "safelora.json").read_text())
    assert report["projected_layers"] == len(report["layers"]) > 0  # threshold 1: every layer projected
    assert run.evals.iloc[-1]["stage"] == "safelora" and report["before"]["step"] == report["after"]["step"] == 3
    assert (run.evals["step"] == 3).sum() == 1  # the projected evaluation replaces the last one
    assert len(run.generations[run.generations["step"] == 3]) == 8  # 4 harmful + 4 benign prompts, once
    assert (run.steps["kl"] == 0).all()  # trained like sft

    res = run_cli("train", *common, "--method", "sft", "--run-id", "plain")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("safelora", str(tmp_path / "runs" / "plain"), "--unaligned", unaligned, "--threshold", "0.0")
    assert res.returncode == 0, res.stderr[-3000:]
    projected = load_run(tmp_path / "runs" / "plain-safelora")
    assert projected.status["state"] == "finished" and projected.config["method"] == "safelora"
    assert projected.config["safelora_of"] == "plain" and (projected.path / "final_model").is_dir()
    assert json.loads((projected.path / "safelora.json").read_text())["projected_layers"] == 0  # threshold 0: none
    assert len(projected.steps) == 3 and projected.evals.iloc[-1]["stage"] == "safelora"
    assert "stage" not in load_run(tmp_path / "runs" / "plain").evals  # the source run is left as it was
    again = run_cli("safelora", str(tmp_path / "runs" / "plain"), "--unaligned", unaligned)
    assert again.returncode == 2 and "already exists" in again.stderr
    projected.path.rename(tmp_path / "runs" / "plain-safelora-threshold0")
    res = run_cli("safelora", str(tmp_path / "runs" / "plain"), "--unaligned", unaligned, "--layers", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "plain-safelora" / "safelora.json").read_text())
    assert report["projected_layers"] == 2 and report["layers_mode"] == 2  # Safe LoRA's top-N mode


def test_safelora_without_lora_or_unaligned_model_is_refused_before_work(tmp_path):
    from staysafe.options import RunSpec, SpecError
    from staysafe.runner import check_before_work

    with pytest.raises(SpecError, match="lora_r > 0"):
        check_before_work(RunSpec(method="safelora", lora_r=0, model="tiny").validate())
    with pytest.raises(SpecError, match="safelora-unaligned"):
        check_before_work(RunSpec(method="safelora", model="some/hub-model").validate())


@pytest.mark.slow
def test_every_defense_runs_in_one_experiment(tokenizer, tmp_path):
    """The defenses side by side through staysafe experiment, on the same data and seed, each recorded as itself."""
    import pandas as pd

    from staysafe.experiment import ExperimentSpec, run_experiment
    from staysafe.runs.traces import load_run

    overrides = dict(lora_r=4, batch_size=4, max_length=64, steps=3, eval_every=0, eval_harmful=2, eval_benign=2,
                     max_new_tokens=2, eval_judges=[], record_judge=False, save_model=False,
                     safelora_unaligned=tiny_unaligned(tokenizer, tmp_path / "unaligned"), lisa_align_steps=1,
                     lisa_user_steps=1)
    methods = ["token-wise", "adaptive-token-wise", "lisa", "safelora"]
    out = run_experiment(ExperimentSpec(scenario="mixed", methods=methods, model="tiny", out_dir=str(tmp_path / "e"),
                                        runs_dir=str(tmp_path / "runs"), experiment_id="d", overrides=overrides),
                         log=lambda *a: None)
    results = pd.read_parquet(out / "results.parquet").set_index("method")
    assert set(results.index) == set(methods)
    runs = {m: load_run(tmp_path / "runs" / results.loc[m, "run_id"]) for m in methods}
    assert all(r.status["state"] == "finished" and r.config["method"] == m for m, r in runs.items())
    assert len(runs["token-wise"].positions) and len(runs["adaptive-token-wise"].positions)
    assert runs["lisa"].steps["phase"].tolist() == ["align", "user", "align"]
    assert (runs["safelora"].path / "safelora.json").is_file()
    order = {m: r.data["example_id"].tolist() for m, r in runs.items()}
    assert len({tuple(v) for v in order.values()}) == 1  # the same training data for every method
    assert (out / "frontier.html").is_file()


def vaccine_train(tokenizer, tmp_path, rho, steps=2, dropout=0.05):
    from staysafe.data import SafetyCollator, tokenize_dataset
    from staysafe.defenses.vaccine import VaccineTrainer
    from staysafe.models.loading import LoraSettings, add_lora, build_tiny
    from staysafe.runs.traces import RunWriter, load_run
    from staysafe.trainer import SafetyConfig

    torch.manual_seed(0)
    model = add_lora(build_tiny(tokenizer, seed=0), LoraSettings(r=4, dropout=dropout))
    writer = RunWriter.create(tmp_path / f"runs{rho}", {"method": "sft"})
    args = SafetyConfig(output_dir=str(tmp_path / "out"), method="sft", max_steps=steps, per_device_train_batch_size=4,
                        learning_rate=1e-3, use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=0)
    trainer = VaccineTrainer(model=model, args=args, train_dataset=tokenize_dataset(tokenizer, make_records(8), 64),
                             data_collator=SafetyCollator(tokenizer.pad_token_id), run=writer, rho=rho)
    trainer.train()
    return trainer, load_run(writer.path)


def test_vaccine_trains_under_a_perturbation_of_size_rho_along_the_loss_gradient(tokenizer, tmp_path):
    plain, plain_run = vaccine_train(tokenizer, tmp_path, rho=0.0)
    vacc, vacc_run = vaccine_train(tokenizer, tmp_path, rho=5.0)
    assert plain.last_perturbation_norm == 0.0
    assert vacc.last_perturbation_norm == pytest.approx(5.0, rel=1e-3)  # one global norm over all layers
    assert len(vacc_run.steps) == 2  # the first pass leaves no trace row
    # step 1 starts from the same weights on the same batch: shifting the attention outputs along the gradient
    # raises the loss the optimizer sees
    assert vacc_run.steps["loss"].iloc[0] > plain_run.steps["loss"].iloc[0] + 1e-3
    moved = sum(float((a - b).detach().abs().sum()) for (n, a), (_, b) in zip(plain.model.named_parameters(),
                                                                    vacc.model.named_parameters()) if "lora_" in n)
    assert moved > 0  # and so another update


def test_vaccine_keeps_the_gradients_of_earlier_micro_batches(tokenizer, tmp_path):
    """Under gradient accumulation the first (perturbation-finding) pass must not wipe what earlier micro-batches
    accumulated: two steps in a row give the sum of each one's gradient."""
    trainer, _ = vaccine_train(tokenizer, tmp_path, rho=5.0, steps=1, dropout=0.0)
    model = trainer.model
    batches = [trainer.data_collator([dict(f) for f in trainer.train_dataset.select(range(i, i + 4))]) for i in (0, 4)]

    def grads(*micro_batches):
        model.zero_grad(set_to_none=True)
        for b in micro_batches:
            trainer.training_step(model, b)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    first, second, both = grads(batches[0]), grads(batches[1]), grads(*batches)
    assert first and set(both) == set(first)
    for n in both:
        torch.testing.assert_close(both[n], first[n] + second[n], rtol=1e-4, atol=1e-6)


def test_the_vaccine_reference_is_built_on_demand_and_named_until_then(tmp_path, monkeypatch):
    from staysafe.experiment import METHODS
    from staysafe.models.align import AlignSettings, build_aligned
    from staysafe.models.loading import ModelError, resolve

    monkeypatch.setenv("STAYSAFE_HOME", str(tmp_path / "home"))
    with pytest.raises(ModelError, match="staysafe align --defense vaccine"):
        resolve("smollm2-135m-aligned-vaccine")
    assert METHODS["vaccine"].options == {"method": "sft", "model": "smollm2-135m-aligned-vaccine"}
    with pytest.raises(ValueError, match="defense must be one of none, vaccine"):
        build_aligned(AlignSettings(defense="booster"))


def test_safelora_records_failed_and_cancelled_through_the_run_lifecycle(tokenizer, tmp_path):
    """The post-hoc projection is a run like any other: a failure inside it (an unaligned model without weights)
    leaves it 'failed' with the error, and SIGTERM during its evaluation leaves it 'cancelled'."""
    import json
    import signal

    from conftest import TINY_RUN, paused_cli
    from staysafe.cli import main
    from staysafe.runs.traces import run_state

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(8)))
    runs = tmp_path / "runs"
    assert main(["train", *TINY_RUN, "--data", str(data), "--steps", "2", "--eval-every", "0", "--lora-r", "4",
                 "--save-model", "--method", "sft", "--runs-dir", str(runs), "--run-id", "plain"]) == 0
    hollow = tmp_path / "hollow"  # a model directory with its config and tokenizer but no weights
    tokenizer.save_pretrained(hollow)
    (hollow / "config.json").write_text((runs / "plain" / "final_model" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="model_type"):  # a library error: it keeps its traceback
        main(["safelora", str(runs / "plain"), "--unaligned", str(hollow)])
    status = run_state(runs / "plain-safelora")
    assert status["state"] == "failed" and status["error"]
    (runs / "plain-safelora").rename(runs / "failed-projection")

    unaligned = tiny_unaligned(tokenizer, tmp_path / "unaligned")
    proc = paused_cli(["safelora", str(runs / "plain"), "--unaligned", unaligned], "eval@2", tmp_path / "log")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    status = run_state(runs / "plain-safelora")
    assert status["state"] == "cancelled" and "SIGTERM" in status["error"]
