"""``sft``: plain fine-tuning, beta = 0 and no reference forward at all (the baseline every defense is against)."""

from staysafe.methods.base import Method, TrainingHooks, Variant
from staysafe.models.names import ALIGNED_VACCINE

METHOD = Method("sft", "plain fine-tuning (beta = 0)", TrainingHooks, reference=False)
VARIANTS = (Variant("sft", "sft", "#c8553d", "sft (plain fine-tuning)"),
            Variant("vaccine", "sft", "#a0522d", "vaccine (sft on the Vaccine-aligned reference)",
                    {"model": ALIGNED_VACCINE}))  # built by staysafe align --defense vaccine
