"""Run under torchrun with 2 CPU processes (gloo): the tiny model's reference, sharded by
staysafe.reference.shard_reference with the plugin's transformer auto-wrap policy, gives the logits of the
unsharded model while each rank holds about half of its parameters. Writes rank<N>.json in the working
directory."""

import json
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

from staysafe.models.loading import load_model
from staysafe.reference import shard_reference

dist.init_process_group("gloo")
rank = dist.get_rank()
model, tok = load_model("tiny", seed=0)
model.eval()
ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    full = model(input_ids=ids).logits
total = sum(p.numel() for p in model.parameters())
plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
plugin.set_auto_wrap_policy(model)
policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
wrapped = [type(m).__name__ for m in model.modules() if m is not model and policy(m)]
ref = shard_reference(model, policy, reshard_after_forward=True)
local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in ref.parameters())
with torch.no_grad():
    sharded = ref(input_ids=ids).logits
report = {"rank": rank, "world": dist.get_world_size(), "max_diff": float((sharded - full).abs().max()),
          "local_share": local / total, "wrapped": sorted(set(wrapped)), "n_wrapped": len(wrapped),
          "requires_grad": any(p.requires_grad for p in ref.parameters()), "fsdp_module": type(ref).__name__}
Path(f"rank{rank}.json").write_text(json.dumps(report))  # one file per rank: two ranks' prints can interleave
dist.destroy_process_group()
