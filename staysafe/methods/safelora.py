"""``safelora`` (Hsu et al. 2024): sft, then each LoRA update projected onto the alignment subspace (the difference
between the aligned and the unaligned model) and the run evaluated again (:mod:`staysafe.defenses.safelora`)."""

from staysafe.methods.base import Method, TrainingHooks, Variant


class SafeLoraHooks(TrainingHooks):
    @staticmethod
    def check_before_work(spec) -> None:
        from staysafe.defenses.safelora import unaligned_model
        from staysafe.errors import SpecError

        if not spec.lora_r:
            raise SpecError("method safelora projects a LoRA update: it needs lora_r > 0")
        unaligned_model(spec.model, spec.safelora_unaligned)

    def after_training(self, model, spec, tokenizer, writer, step: int) -> None:
        from staysafe.defenses.safelora import project_and_record

        project_and_record(model, spec, tokenizer, writer, step)


METHOD = Method("safelora", "sft, then each LoRA update projected onto the alignment subspace (Hsu et al. 2024)",
                SafeLoraHooks, reference=False, options=("safelora_threshold", "safelora_layers", "safelora_unaligned"))
VARIANTS = (Variant("safelora", "safelora", "#6b6b6b", "Safe LoRA (Hsu et al.)"),)
