"""The frozen safe reference the KL pulls toward: with LoRA the same model with its adapter disabled (no copy),
otherwise a frozen copy, placed for the training engine the way TRL places its reference models."""

from __future__ import annotations

import copy


def peft_model_of(model):
    """``model`` if it is a PEFT model (then its disabled adapter is the reference), else None."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return model if isinstance(model, PeftModel) else None


def frozen_copy(model):
    """A frozen, eval-mode copy of ``model`` (for full fine-tuning). Under DeepSpeed ZeRO-3 the parameters are
    already partitioned when the model is built, so pass a separately loaded ``ref_model`` there instead."""
    return copy.deepcopy(model).requires_grad_(False).eval()


def prepare_reference(ref_model, accelerator):
    """Place a frozen reference for the engine: a DeepSpeed inference engine (ZeRO-3 sharded like the policy,
    stage 0 otherwise), an FSDP-wrapped module, or (one process, DDP) the model on the accelerator's device, with
    no DDP wrapper since it is never trained. Follows TRL's ``prepare_deepspeed`` / ``prepare_fsdp``."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        zero = config.setdefault("zero_optimization", {})
        hidden = getattr(getattr(ref_model, "config", None), "hidden_size", None)
        if zero.get("stage") == 3 and hidden:
            zero.update({"reduce_bucket_size": hidden * hidden, "stage3_param_persistence_threshold": 10 * hidden,
                         "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden)})
        elif zero.get("stage") != 3:
            zero["stage"] = 0  # nothing to shard for a frozen model below ZeRO-3
        config.pop("optimizer", None), config.pop("scheduler", None)
        engine, *_ = deepspeed.initialize(model=ref_model, config=config)
        return engine.eval()
    if kind == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(ref_model, FSDP):
            return ref_model.eval()
        plugin = accelerator.state.fsdp_plugin
        plugin.set_auto_wrap_policy(ref_model)
        return FSDP(ref_model, sharding_strategy=plugin.sharding_strategy, cpu_offload=plugin.cpu_offload,
                    auto_wrap_policy=plugin.auto_wrap_policy, mixed_precision=plugin.mixed_precision_policy,
                    sync_module_states=plugin.sync_module_states, backward_prefetch=plugin.backward_prefetch,
                    forward_prefetch=plugin.forward_prefetch, use_orig_params=plugin.use_orig_params,
                    limit_all_gathers=plugin.limit_all_gathers, device_id=accelerator.device).eval()
    return accelerator.prepare_model(ref_model, evaluation_mode=True).eval()
