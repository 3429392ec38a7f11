"""The gradient noise scale's DDP communication hook (ttl_core.noise_scale.reduce_as_ddp) at three processes: the
gradients DDP's own reduction gives, to the bit, and each process's own gradient norm read on the way."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_torchrun


THREE_RANKS = """
import copy, json, torch, torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from ttl_core.noise_scale import ProcessGradient, reduce_as_ddp

dist.init_process_group("gloo")
torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 300))


def steps(hook=None):
    '''Each step's reduced gradients, and this rank's gradient norm by the noise scale's hook (None without it) and
    by a copy of the model outside DDP, for 3 steps (DDP's first buckets, then rebuilt ones) on this rank's data.'''
    model = DistributedDataParallel(copy.deepcopy(base), bucket_cap_mb=0.05)
    state = ProcessGradient(list(model.parameters()), model.process_group) if hook is reduce_as_ddp else None
    if hook:
        model.register_comm_hook(state, hook)
    optimizer, figures = torch.optim.SGD(model.parameters(), lr=0.1), []
    data = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(3):
        inputs, alone = torch.randn(8, 64, generator=data), copy.deepcopy(model.module)
        model(inputs).square().mean().backward()
        alone(inputs).square().mean().backward()
        local = torch.nn.utils.get_total_norm([p.grad for p in alone.parameters()])
        figures.append(([p.grad.clone() for p in model.parameters()], state and float(state.norm()), float(local)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return figures


def identical(first, second):
    return [all(torch.equal(a, b) for a, b in zip(x[0], y[0])) for x, y in zip(first, second)]


builtin, ours, torchs = steps(), steps(reduce_as_ddp), steps(allreduce_hook)
mine = {"ours": identical(builtin, ours), "allreduce_hook": identical(builtin, torchs),
        "norm": max(abs(hooked / alone - 1) for _, hooked, alone in ours)}
every = [None] * 3 if dist.get_rank() == 0 else None
dist.gather_object(mine, every)
if every:
    print(json.dumps(every))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_the_hook_reduces_as_ddp_does_to_the_bit_at_three_processes_and_reads_each_one_s_own_gradient(tmp_path):
    """At 3 processes (1/3 rounds; at 2, halving is exact either way), with buckets of 50 KB (several, as built and
    as rebuilt after the first step): the gradients DDP's own reduction gives, to the bit, where torch's
    allreduce_hook, which divides, differs; the hook's norm is that of each rank's gradient outside DDP within 1e-6."""
    script = tmp_path / "three_ranks.py"
    script.write_text(THREE_RANKS)
    done = run_torchrun(script, processes=3)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("[{")))
    assert [rank["ours"] for rank in ranks] == [[True] * 3] * 3
    assert [rank["allreduce_hook"] for rank in ranks] == [[False] * 3] * 3
    assert max(rank["norm"] for rank in ranks) < 1e-6
