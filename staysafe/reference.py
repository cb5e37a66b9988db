"""The frozen safe reference the KL pulls toward: with LoRA the same model with its adapter disabled (no copy),
otherwise a frozen copy, placed for the training engine the way TRL places its reference models."""

from __future__ import annotations

import copy
import hashlib

import torch


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
        if plugin.fsdp_version == 2:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
            from torch.distributed.fsdp import MixedPrecisionPolicy

            mesh = getattr(accelerator, "torch_device_mesh", None)
            if mesh is not None and accelerator.parallelism_config is not None:
                mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
            plugin.set_auto_wrap_policy(ref_model)
            return shard_reference(ref_model, fsdp2_prepare_auto_wrap_policy(plugin, ref_model), mesh=mesh,
                                   reshard_after_forward=plugin.reshard_after_forward,
                                   offload_policy=plugin.cpu_offload,
                                   mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy())
        plugin.set_auto_wrap_policy(ref_model)
        return FSDP(ref_model, sharding_strategy=plugin.sharding_strategy, cpu_offload=plugin.cpu_offload,
                    auto_wrap_policy=plugin.auto_wrap_policy, mixed_precision=plugin.mixed_precision_policy,
                    sync_module_states=plugin.sync_module_states, backward_prefetch=plugin.backward_prefetch,
                    forward_prefetch=plugin.forward_prefetch, use_orig_params=plugin.use_orig_params,
                    limit_all_gathers=plugin.limit_all_gathers, device_id=accelerator.device).eval()
    return accelerator.prepare_model(ref_model, evaluation_mode=True).eval()


def shard_reference(ref_model, wrap_policy=None, **fully_shard_options):
    """FSDP2 for a frozen reference: ``fully_shard`` each module the policy picks (the decoder layers), then the
    root, as accelerate does for the trained model, so each rank holds only its shard of the reference. The
    options (mesh, reshard_after_forward, offload_policy, mp_policy) are the training model's, from its plugin."""
    from torch.distributed.fsdp import fully_shard

    options = {k: v for k, v in fully_shard_options.items() if v is not None}
    if wrap_policy is not None:
        for module in reversed(list(ref_model.modules())):  # innermost first, like FSDP's own auto-wrap
            if module is not ref_model and wrap_policy(module):
                fully_shard(module, **options)
    fully_shard(ref_model, **options)
    return ref_model.requires_grad_(False).eval()


def lm_head_positions_supported(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` as a tensor of positions (transformers' causal LMs
    do), so the LM head runs at answer positions only."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


class ReferenceCache:
    """The frozen reference's outputs per training example, kept from the epoch that first saw it for the later
    ones (the reference never changes, so they are the same): its top-k log-probabilities and token ids at each
    answer token, and each hidden-state risk source's score of the prompt. In memory, per process: about
    k x 8 bytes per answer token (k = 64: 0.5 KB)."""

    def __init__(self):
        self.entries: dict[int, tuple] = {}
        self.hits = self.misses = 0

    def lookup(self, example_index: torch.Tensor, device):
        """``((ref_top, idx), signals)`` for a batch whose every example is cached (in batch order), else None."""
        keys = example_index.tolist()
        if not all(k in self.entries for k in keys):
            self.misses += 1
            return None
        self.hits += 1
        got = [self.entries[k] for k in keys]
        topk = torch.cat([g[0] for g in got]).to(device), torch.cat([g[1] for g in got]).to(device)
        return topk, {n: torch.tensor([g[2][n] for g in got]) for n in got[0][2]}

    def add(self, example_index: torch.Tensor, rows: torch.Tensor, ref_topk, signals: dict) -> None:
        ref_top, idx = ref_topk
        for slot, key in enumerate(example_index.tolist()):
            sel = rows == slot
            self.entries[key] = (ref_top[sel].detach().cpu(), idx[sel].detach().to(torch.int32).cpu(),
                                 {n: float(v[slot]) for n, v in signals.items()})


class SharedReference:
    """The frozen reference's outputs per training batch, shared by the runs of an experiment in one process: every
    method of a seed trains on the same batches from the same reference, so the first run's reference forward
    serves the later ones (the same tensors: the same results to the last digit). Keyed by the reference's weights
    digest and the batch's bytes; holds the logits at the answer positions and the hidden states a risk source
    reads, in memory, up to ``max_bytes`` (then it stops adding)."""

    def __init__(self, max_bytes: int = 4 << 30):
        self.max_bytes = max_bytes
        self.entries: dict[str, tuple] = {}
        self.bytes = 0

    @staticmethod
    def key(weights: str, model_inputs: dict, layers: tuple[int, ...] | None) -> str:
        h = hashlib.sha256(f"{weights}|{layers}".encode())
        for name in sorted(model_inputs):
            _hash_tensor(h, name, torch.as_tensor(model_inputs[name]))
        return h.hexdigest()

    def get(self, key: str, device):
        """``(logits, hidden_states)`` of a batch seen before (hidden states: a tuple with None at the layers not
        kept), else None."""
        got = self.entries.get(key)
        if got is None:
            return None
        logits, hidden = got
        return logits.to(device, copy=True), None if hidden is None else tuple(
            None if h is None else h.to(device, copy=True) for h in hidden)

    def put(self, key: str, logits: torch.Tensor, hidden_states, layers: tuple[int, ...] | None) -> None:
        hidden = None if hidden_states is None or layers is None else tuple(
            hidden_states[i].detach().cpu().clone() if i in layers else None for i in range(len(hidden_states)))
        size = logits.numel() * logits.element_size() + sum(
            h.numel() * h.element_size() for h in (hidden or ()) if h is not None)
        if self.bytes + size <= self.max_bytes:
            self.entries[key] = (logits.detach().cpu().clone(), hidden)
            self.bytes += size

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


def weights_digest(model) -> str:
    """A digest of a model's weights (the reference's identity for :class:`SharedReference`): names, dtypes and
    bytes of every parameter and buffer, the LoRA adapter's excluded (the reference runs with it disabled)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" not in name:
            _hash_tensor(h, name, tensor)
    return h.hexdigest()


def _hash_tensor(h, name: str, tensor: torch.Tensor) -> None:
    """Add a named tensor to a digest: its name, dtype, shape and bytes."""
    h.update(f"|{name}:{tensor.dtype}:{tuple(tensor.shape)}|".encode())
    h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
