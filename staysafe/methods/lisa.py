"""``lisa`` (Huang et al. 2024, "Lazy Safety Alignment"): alternating alignment and user steps with a proximal pull
toward the weights at the last switch; the schedule, batches and anchor are
:class:`staysafe.defenses.lisa.LisaSchedule`."""

import os

from staysafe.methods.base import Method, TrainingHooks, Variant


class LisaHooks(TrainingHooks):
    def __init__(self, trainer):
        super().__init__(trainer)
        from staysafe.defenses.lisa import LisaSchedule
        from staysafe.errors import SpecError

        args = trainer.args
        if trainer.processing_class is None:
            raise SpecError("method lisa tokenises its alignment data: pass processing_class=<the tokenizer>")
        self.schedule = LisaSchedule(trainer.processing_class, args.lisa_align_steps, args.lisa_user_steps,
                                     args.lisa_rho, args.per_device_train_batch_size, args.max_length,
                                     seed=args.seed + args.process_index,
                                     risk_columns=tuple(c for c in trainer.train_dataset.column_names
                                                        if c.startswith("risk_")))

    def phase(self, step: int) -> str:
        return self.schedule.phase(step)

    def batch(self, inputs: dict, phase: str) -> dict:
        return self.schedule.alignment_batch(inputs["labels"].device) if phase == "align" else inputs

    def extra_loss(self, model, phase: str):  # unwrapped: a checkpointed anchor's names carry no DDP prefix
        return self.schedule.proximal(self.trainer.accelerator.unwrap_model(model), phase)

    def _file(self, folder: str) -> str:
        return os.path.join(folder, f"lisa-{self.trainer.args.process_index}.safetensors")

    def save(self, folder: str) -> None:  # each process its own: the anchor shards and the alignment data's order
        os.makedirs(folder, exist_ok=True)
        self.schedule.save(self._file(folder))
        self.trainer.accelerator.wait_for_everyone()  # every process's file exists before the state file

    def load(self, folder: str) -> None:
        if os.path.isfile(self._file(folder)):
            self.schedule.load(self._file(folder))


METHOD = Method("lisa", "alternating alignment and user steps with a proximal pull (Huang et al. 2024)", LisaHooks,
                reference=False, options=("lisa_align_steps", "lisa_user_steps", "lisa_rho"))
VARIANTS = (Variant("lisa", "lisa", "#b0487a", "lisa (Huang et al.)"),)
