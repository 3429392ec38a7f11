"""The distributed wrappers on a one-process gloo group, which needs no torchrun and no port: which wrapper each
`train.distributed` setting gives, and DDP's gradient sync switch."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import ROOT


def test_train_distributed_picks_the_wrapper(tmp_path):
    """ddp wraps the model in DistributedDataParallel, fsdp shards each decoder block and the model with FSDP2:
    test_train's two-process parity runs give the same figures with either wrapper, so they cannot tell which
    one ran. A one-process gloo group (a FileStore: no port) stands in for torchrun's, in a subprocess of its own."""
    code = f"""
import torch, torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from ttl_core import LlamaConfig, LlamaForCausalLM
from ttl_core.distributed import World, set_gradient_sync, wrap_model
dist.init_process_group("gloo", store=dist.FileStore({str(tmp_path / "store")!r}, 1), rank=0, world_size=1)
world = World(0, 2, torch.device("cpu"))  # wrapped as rank 0 of two; the group itself has one process
config = LlamaConfig.from_preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
ddp = wrap_model(LlamaForCausalLM(config), "ddp", world)
assert isinstance(ddp, DistributedDataParallel) and not isinstance(ddp.module, FSDPModule)
set_gradient_sync(ddp, False)
assert ddp.require_backward_grad_sync is False  # an accumulation window's early micro-batches skip the all-reduce
fsdp = wrap_model(LlamaForCausalLM(config), "fsdp", world)
assert not isinstance(fsdp, DistributedDataParallel)
assert isinstance(fsdp, FSDPModule) and all(isinstance(block, FSDPModule) for block in fsdp.backbone.layers)
dist.destroy_process_group()
print("wrapped")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    # torch 2.9 and 2.10's gloo prints lines of its own ("[Gloo] Rank 0 is connected to ..."); nothing else may
    ours = [line for line in done.stdout.splitlines() if not line.startswith("[Gloo] ")]
    assert done.returncode == 0 and ours == ["wrapped"], done.stderr[-3000:]
