"""``adaptive-drift``: closed-loop beta. A risk read from the *data* cannot see the drift that benign fine-tuning
causes; the model's own state can. Every ``drift_every`` steps the policy reads a fixed canary set (harmful requests
of the alignment stage with the reference's refusals; never evaluation or fine-tuning prompts) with one no-grad
forward, no generation:

    drift_t = mean over the canaries' first ``drift_tokens`` answer tokens of  log p_ref(y) - log p_policy(y)
    s_t     = max(data risk, clamp(drift_gain * drift_t, 0, 1))
    beta_t  = beta_min + (beta_max - beta_min) * s_t

The reference's side is read once (it is frozen); the last reading holds until the next. The drift is part of the
risk policy's state, so a checkpoint keeps it, and it is recorded per step (``drift``, ``drift_risk`` in
``steps.parquet``).
"""

from staysafe.methods.adaptive import RISK_OPTIONS
from staysafe.methods.base import Method, TrainingHooks, Variant

CANARY_SET = "refusals"  # staysafe.records: the alignment stage's harmful requests with refusals


class DriftHooks(TrainingHooks):
    def __init__(self, trainer):
        super().__init__(trainer)
        from staysafe.errors import SpecError

        if trainer.processing_class is None:
            raise SpecError("method adaptive-drift tokenises its canary prompts: pass processing_class=<the tokenizer>")
        self.canaries = canary_batch(trainer.processing_class, trainer.args.drift_canaries,
                                     trainer.args.drift_tokens)
        self.reference_nll = None  # per canary answer token, read once: the reference is frozen
        self.read_at = None  # the step of the last reading

    @staticmethod
    def beta(policy, risk):
        import torch

        return policy.adaptive(torch.clamp(risk, min=drift_risk(policy)))

    def prepare(self, model, step: int) -> None:
        if step % self.trainer.args.drift_every or self.read_at == step:
            return
        self.read_at = step
        self.trainer.risk_policy.drift = self.read_drift(model)

    def read_drift(self, model) -> float:
        """Mean log p_ref - log p_policy over the canaries' answer tokens (eval mode, no gradient)."""
        import torch

        from staysafe.losses import answer_positions, answer_token_losses

        tr = self.trainer
        device = tr.accelerator.device
        batch = {k: v.to(device) for k, v in self.canaries.items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        keep = answer_positions(batch["labels"]) if tr._head_positions_ok else None  # the LM head at 8 tokens only
        if keep is not None:
            inputs["logits_to_keep"] = keep
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if self.reference_nll is None:
                    with tr._reference(model) as ref:
                        self.reference_nll = answer_token_losses(ref(**inputs).logits, batch["labels"],
                                                                 positions=keep)[0].float()
                nll = answer_token_losses(model(**inputs).logits, batch["labels"], positions=keep)[0].float()
        finally:
            model.train(was_training)
        return float((nll - self.reference_nll).mean())

    def step_record(self) -> dict:
        policy = self.trainer.risk_policy
        return {"drift": policy.drift, "drift_risk": drift_risk(policy)}


def drift_risk(policy) -> float:
    """The risk the policy's last canary reading stands for: ``clamp(drift_gain * drift, 0, 1)``."""
    return min(1.0, max(0.0, policy.o.drift_gain * policy.drift))


def canary_batch(tokenizer, n: int, answer_tokens: int) -> dict:
    """``n`` canaries spread over the canary set (every k-th by id), their labels kept on the first
    ``answer_tokens`` answer tokens: the refusal's opening, where refusing or complying is decided."""
    from staysafe.data import IGNORE, SafetyCollator, load_records, tokenize_record

    pool = sorted(load_records(CANARY_SET), key=lambda r: r["id"])
    picked = pool[:: max(1, len(pool) // n)][:n]
    features = []
    for i, record in enumerate(picked):
        tok = tokenize_record(tokenizer, record, 256)
        start = tok["prompt_end"] + 1
        end = start + answer_tokens
        labels = [IGNORE] * start + tok["labels"][start:end]
        features.append({"input_ids": tok["input_ids"][:end], "labels": labels, "prompt_end": tok["prompt_end"],
                         "example_index": i})
    batch = SafetyCollator(tokenizer.pad_token_id)(features)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


DRIFT_OPTIONS = ("drift_every", "drift_gain", "drift_canaries", "drift_tokens")
METHOD = Method("adaptive-drift", "beta from the data risk or the policy's drift from the reference's refusals on "
                "canary prompts, whichever is higher", DriftHooks, risk=True, options=RISK_OPTIONS + DRIFT_OPTIONS)
VARIANTS = (Variant("adaptive-drift", "adaptive-drift", "#f07f13", "adaptive · probe risk or canary drift",
                    {"risk": "probe"}),)
