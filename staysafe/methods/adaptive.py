"""``adaptive``: beta from the batch's estimated safety risk, ``beta_min + (beta_max - beta_min) * s``
(:meth:`staysafe.risk.RiskPolicy.adaptive`); the risk source is an option, so each source is a variant."""

from staysafe.methods.base import Method, TrainingHooks, Variant

RISK_OPTIONS = ("beta_min", "beta_max", "risk", "risk_ema", "batch_risk", "per_example_beta", "risk_fallback",
                "calibration", "risk_threshold", "risk_temperature")  # what every risk-driven method reads


class AdaptiveHooks(TrainingHooks):
    @staticmethod
    def beta(policy, risk):
        return policy.adaptive(risk)


METHOD = Method("adaptive", "beta from the risk", AdaptiveHooks, risk=True, options=RISK_OPTIONS)
VARIANTS = (Variant("adaptive-probe", "adaptive", "#2a7f7a", "adaptive · probe risk", {"risk": "probe"}),
            Variant("adaptive-judge", "adaptive", "#3f6fb5", "adaptive · judge risk", {"risk": "judge"}),
            Variant("adaptive-label", "adaptive", "#7a5ea8", "adaptive · label risk (oracle)", {"risk": "label"}))
