"""``constant-kl``: the KL pull toward the reference at a fixed weight ``beta`` (the baseline adaptive must beat)."""

from staysafe.methods.base import Method, TrainingHooks, Variant


class ConstantHooks(TrainingHooks):
    @staticmethod
    def beta(policy, risk):
        import torch

        return torch.full_like(risk, policy.o.beta), float("nan")


METHOD = Method("constant-kl", "a fixed beta", ConstantHooks, options=("beta",))
VARIANTS = (Variant("constant-kl", "constant-kl", "#d4a72c", "constant-kl (fixed β)"),)
