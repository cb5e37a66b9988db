"""Vaccine (Huang et al. 2024): a perturbation-aware *alignment stage*. Each step first finds the gradient g_l of
the loss with respect to every decoder layer's attention output, then trains on the same batch with each of those
outputs shifted by ``rho * g_l / ||g||`` (``||g||`` over all layers jointly), so the aligned model learns to keep
its refusals under the hidden-state drift that later fine-tuning causes. Follows git-disl/Vaccine (attention
outputs, one global norm, no parameter update from the first pass). ``staysafe align --defense vaccine``
builds the alternative reference ``smollm2-135m-aligned-vaccine`` with it; fine-tuning on top is plain sft.
"""

from __future__ import annotations

import torch

from staysafe.trainer import SafetyTrainer


def attention_modules(model) -> list[torch.nn.Module]:
    """Every decoder layer's self-attention block (the modules Vaccine perturbs)."""
    found = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    if not found:
        raise ValueError("vaccine: the model has no '*.self_attn' modules to perturb")
    return found


class VaccineTrainer(SafetyTrainer):
    """``SafetyTrainer`` whose every step trains under Vaccine's worst-case hidden-state perturbation."""

    def __init__(self, *args, rho: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.rho = rho
        self.last_perturbation_norm = 0.0

    def training_step(self, model, inputs, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)  # pass 1 needs no gradient synchronisation
        modules = attention_modules(unwrapped)
        outputs: dict[int, torch.Tensor] = {}

        def keep_output(i):
            def hook(module, args, output):
                out = output[0] if isinstance(output, tuple) else output
                if out.requires_grad:
                    outputs[i] = out
            return hook

        handles = [m.register_forward_hook(keep_output(i)) for i, m in enumerate(modules)]
        try:  # pass 1: where the loss is most sensitive to each attention output; not a trace row
            model.train()
            with self.unrecorded():
                loss = self.compute_loss(unwrapped, self._prepare_inputs(inputs))
        finally:
            for h in handles:
                h.remove()
        # gradients of the attention outputs only: the parameters' .grad (earlier micro-batches' under gradient
        # accumulation) stay as they are
        found = sorted(outputs)
        found_grads = torch.autograd.grad(loss, [outputs[i] for i in found], allow_unused=True) if found else []
        grads = {i: g.detach() for i, g in zip(found, found_grads) if g is not None}
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads.values())) if grads else torch.tensor(0.0)
        shift = {i: (self.rho * g / (norm + 1e-7)).to(g.dtype) for i, g in grads.items()}
        self.last_perturbation_norm = float(sum((s.float() ** 2).sum() for s in shift.values()) ** 0.5)

        def perturb(i):
            def hook(module, args, output):
                if i not in shift:
                    return output
                if isinstance(output, tuple):
                    return (output[0] + shift[i],) + tuple(output[1:])
                return output + shift[i]
            return hook

        handles = [m.register_forward_hook(perturb(i)) for i, m in enumerate(modules)]
        try:  # pass 2: the step the optimizer takes, under the perturbation
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            for h in handles:
                h.remove()
