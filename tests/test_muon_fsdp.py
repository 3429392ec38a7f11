"""train.optimizer = "muon" under FSDP2, where each process holds a block of each matrix's rows, and DDP, the
processes sharing the Newton-Schulz work: one sharded or replicated step against one process's with the same
gradients, whole two-process runs against DDP's, one process's and an unshared DDP run's, and checkpoints that resume
under FSDP and across FSDP, DDP and one process. The GQA model's row counts split unevenly over two processes (45
rows: 23 and 22) and across its pieces (q, k, v: 30, 10, 10 rows, blocks of 25); a smaller one over four leaves ranks
without rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import ROOT, run_torchrun
from train_helpers import losses, prepared_corpus, run_config, set_arguments
from ttl_core import load_pretrained
from ttl_core.checkpoint import load_optimizer_file
from ttl_core.train import train

ODD_ROWS = dict(hidden_size=45, intermediate_size=59, num_attention_heads=3, num_key_value_heads=1, head_dim=10)
# over four processes, torch.chunk cuts 3 rows (out, down) into three blocks of 1 and 2 (gate_up) into two: the last
# ranks hold no rows; qkv's 10 rows (q, k, v: 6, 2, 2) come in blocks of 3, so rank 2 holds k whole and a row of v
FEW_ROWS = dict(hidden_size=3, intermediate_size=1, num_attention_heads=3, num_key_value_heads=1, head_dim=2)

SHARDED_STEPS = """
import collections, copy, json, pytest, sys, torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
import ttl_core.muon as muon
from ttl_core import LlamaConfig, LlamaForCausalLM
from ttl_core.distributed import all_reduce_sum, close_world, init_world, wrap_model
from ttl_core.muon import owned_rows
from ttl_core.optim import apply_update, build_optimizer, clip_gradients
from ttl_core.run_config import TrainConfig
world = init_world("cpu")
shape, down_rows = json.loads(sys.argv[1]), json.loads(sys.argv[2])  # down's rows held by each rank
if sys.argv[3:] == ["without-all_gather_single"]:  # as torch before 2.13
    vars(dist).pop("all_gather_single", None)
config = LlamaConfig.from_preset("tiny", vocab_size=64, num_hidden_layers=2, **shape)
t = TrainConfig(optimizer="muon", lr=0.02, weight_decay=0.1)
torch.manual_seed(0)
alone = LlamaForCausalLM(config)
sharded, ddp = (wrap_model(copy.deepcopy(alone), mode, world) for mode in ("fsdp", "ddp"))
models = {"alone": alone, "fsdp": sharded, "ddp": ddp.module}
optimizers = {name: build_optimizer(model, t, world.device, None if name == "alone" else world)
              for name, model in zip(models, (alone, sharded, ddp))}
params, shards = dict(alone.named_parameters()), dict(sharded.named_parameters())
assert shards["backbone.layers.0.mlp.down.weight"].to_local().shape[0] == down_rows[world.rank]
calls, orthogonalized = {name: 0 for name in models}, muon.orthogonalized
# the collectives of each optimizer's steps (under None, the rest): their names and the elements each received
received, stepping = collections.defaultdict(list), None
def counted(collective, original):
    return lambda output, *args, **kwargs: received[stepping].append((collective, output.numel())) or original(
        output, *args, **kwargs)
gathers = [name for name in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, name)][:1]
for collective in ("all_to_all_single", *gathers):
    setattr(dist, collective, counted(collective, getattr(dist, collective)))
DTensor.full_tensor = counted("full_tensor", DTensor.full_tensor)
muon.orthogonalized = lambda *args: calls.__setitem__(stepping, calls[stepping] + 1) or orthogonalized(*args)
gen = torch.Generator().manual_seed(1)  # every rank draws the same gradients and keeps its block of them
for _ in range(3):
    for name, param in params.items():
        param.grad, shard = torch.randn(param.shape, generator=gen), shards[name]
        shard.grad = distribute_tensor(param.grad, shard.device_mesh, shard.placements, src_data_rank=None)
        ddp.module.get_parameter(name).grad = param.grad.clone()
    for stepping, optimizer in optimizers.items():
        optimizer.step()
muon.orthogonalized, stepping = orthogonalized, None
pieces = 3 * 2 * 7  # 3 steps of q, k, v, o, gate, up and down in 2 layers
shared = all_reduce_sum(torch.tensor([calls["fsdp"], calls["ddp"]]), world).tolist()
assert calls["alone"] == pieces and shared == [pieces, pieces], (calls, shared)  # each piece by one process
# under FSDP each row of each piece's update goes to the piece's owner and its row of the result comes back, once
projections = sum(param.numel() for group in optimizers["alone"].param_groups if "rows" in group
                  for param in group["params"])
assert [name for name, _ in received["fsdp"]] == ["all_to_all_single"] * 2 * 3, received["fsdp"]
assert all_reduce_sum(torch.tensor([n for _, n in received["fsdp"]]), world).tolist() == [projections] * 2 * 3
assert received["ddp"] == [(gathers[0], received["ddp"][0][1])] * 3 and received["alone"] == [], received
for mode, model in models.items():
    for name, param in model.named_parameters():
        momentum = optimizers["alone"].state[params[name]].get("momentum_buffer")
        theirs = optimizers[mode].state[param].get("momentum_buffer")
        gathered = lambda tensor: tensor.full_tensor() if mode == "fsdp" else tensor
        assert torch.equal(gathered(param), params[name]), (mode, name)
        assert momentum is None or torch.equal(gathered(theirs), momentum), (mode, name)
scaler, weights = torch.amp.GradScaler("cpu"), {name: shard.full_tensor() for name, shard in shards.items()}
scaler.scale(torch.ones(()))
for name, shard in shards.items():  # an inf in the last rank's rows alone: every rank skips (or Muon's gathers hang)
    grad = torch.randn(shard.shape, generator=gen)
    grad[-1] = float("inf") if name == "backbone.layers.1.attn.qkv.weight" else grad[-1]
    shard.grad = distribute_tensor(grad, shard.device_mesh, shard.placements, src_data_rank=None)
norm = float(clip_gradients(sharded, optimizers["fsdp"], t, scaler))
assert apply_update(optimizers["fsdp"], t.lr, norm, scaler)["skipped"]
assert all(torch.equal(shard.full_tensor(), weights[name]) for name, shard in shards.items())
# a block of columns has no rows of its own (no scatter: src_data_rank=None, see the barrier below)
columns = distribute_tensor(torch.randn(4, 6), shard.device_mesh, [Shard(1)], src_data_rank=None)
with pytest.raises(ValueError,
                   match=r"^Muon needs parameters sharded on dim 0 alone, got placements \(Shard\(dim=1\),\)$"):
    owned_rows(columns)
# DTensor's caches keep FSDP's group alive past close_world, so its worker threads outlive the script: one still
# letting go of a finished collective's tensors while the interpreter shuts down aborts the process. A barrier's
# round trip gives them time (ttl's training loop ends so too)
dist.barrier()
close_world(world)
"""


@pytest.mark.parametrize("shape, down_rows", [(ODD_ROWS, [23, 22]), (ODD_ROWS, [15, 15, 15]),
                                              (FEW_ROWS, [1, 1, 1, 0])],
                         ids=["two-processes", "three-processes", "four-processes"])
def test_a_shared_muon_step_is_the_one_process_step_to_the_bit(tmp_path, shape, down_rows):
    """Three steps from the same weights with the same fresh random gradients, under FSDP (each rank holding its
    block of them) and under DDP: every weight and momentum buffer, gathered, is the one process's to the bit, and
    each of the 14 pieces (q, k, v, o, gate, up, down in 2 layers) is orthogonalised once a step over all the ranks
    (each piece by one rank; a rank holding none of its rows still joins each collective). Under DDP the bfloat16
    results go to every rank in one all_gather a step; under FSDP two all_to_alls a step move each rank's rows of
    each piece's update to its owner and the rows of the result back, each row once each way, and nothing is
    gathered whole. An fp16 step with an inf in one rank's rows is skipped by every rank. Parameters sharded
    otherwise are refused."""
    script = tmp_path / "sharded_steps.py"
    script.write_text(SHARDED_STEPS)
    done = run_torchrun(script, json.dumps(shape), json.dumps(down_rows), processes=len(down_rows))
    assert done.returncode == 0, done.stderr[-3000:]


def test_shared_muon_steps_without_all_gather_single_are_the_one_process_steps(tmp_path):
    """torch before 2.13 has no `dist.all_gather_single`: DDP's results travel by all_gather_into_tensor instead,
    and the steps are still the one process's to the bit (the test above, the function taken away)."""
    script = tmp_path / "sharded_steps.py"
    script.write_text(SHARDED_STEPS)
    done = run_torchrun(script, json.dumps(ODD_ROWS), json.dumps([23, 22]), "without-all_gather_single")
    assert done.returncode == 0, done.stderr[-3000:]


# no clipping: the clip factor comes from the gradient norm, which FSDP sums over its shards in another order than
# DDP over whole gradients, and Newton-Schulz in bfloat16 turns that float32 rounding into a bfloat16 one
COMMON = ["train.optimizer=\"muon\"", "train.max_steps=4", "train.grad_accum_steps=2", "train.save_every=2",
          "train.eval_every=0", "train.grad_clip=0.0", *(f"model.{key}={value}" for key, value in ODD_ROWS.items())]
ONE, TWO = [*COMMON, "train.micro_batch_size=4"], [*COMMON, "train.micro_batch_size=2"]


# scripts/pretrain.py with an optimizer that is not told the world: each rank orthogonalises every piece it steps
UNSHARED = """
import runpy, sys
import ttl_core.optim, ttl_core.train
def build_optimizer(model, train, device, world):
    return ttl_core.optim.build_optimizer(model, train, device)
ttl_core.train.build_optimizer = build_optimizer
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def torchrun_pretrain(data: Path, out: Path, mode: str, resume: bool = False, unshared: bool = False) -> None:
    launched = [ROOT / "scripts" / "pretrain.py"]
    if unshared:
        (out.parent / "unshared.py").write_text(UNSHARED)
        launched.insert(0, out.parent / "unshared.py")
    done = run_torchrun(*launched, "--data", data, "--out", out, *(["--resume"] * resume),
                        *set_arguments(*TWO, f"train.distributed=\"{mode}\""))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The data (in "prepared") and the runs of one process and of two under FSDP and under DDP, with the same global
    batch, and a DDP run whose ranks do not share Newton-Schulz (each orthogonalises every piece, as before)."""
    tmp = tmp_path_factory.mktemp("runs")
    data = prepared_corpus(tmp)
    train(run_config(*ONE), tmp / "one", data_dir=str(data))
    for mode in ("fsdp", "ddp"):
        torchrun_pretrain(data, tmp / mode, mode)
    torchrun_pretrain(data, tmp / "unshared", "ddp", unshared=True)
    return tmp


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


def same_weights(a: Path, b: Path) -> bool:
    a, b = (load_pretrained(path).state_dict() for path in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def relative_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.slow
def test_fsdp_muon_runs_as_ddp_to_the_bit_and_as_one_process_to_float_rounding(runs):
    """The two-process gradients are the same sums either way, so FSDP's run is DDP's to the bit: losses, weights
    and the checkpointed optimizer state (its momentum buffers gathered whole). One process sums its gradients in
    another order, which Newton-Schulz in bfloat16 turns into bfloat16 roundings of the updates: losses within 1e-5
    (measured 7e-7), weights not to float32 rounding (3.5e-3 of the largest weight, for DDP alike)."""
    assert losses(runs / "fsdp") == losses(runs / "ddp") and len(losses(runs / "fsdp")) == 4
    assert same_weights(checkpoint(runs / "fsdp", 4), checkpoint(runs / "ddp", 4))
    states = [load_optimizer_file(checkpoint(runs / mode, 2))["optimizer"]["state"] for mode in ("fsdp", "ddp")]
    assert sum("momentum_buffer" in state for state in states[0].values()) == 4 * 2  # qkv, out, gate_up, down: 2 layers
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(value, states[1][name][key]) for name, state in states[0].items()
               for key, value in state.items())
    assert relative_difference(losses(runs / "fsdp"), losses(runs / "one")) <= 1e-5


@pytest.mark.slow
def test_muon_runs_that_share_newton_schulz_are_the_unshared_run_to_the_bit(runs):
    """Each piece orthogonalised by one rank and its bfloat16 result sent to the others: the DDP and FSDP runs'
    losses and weights are those of a DDP run whose ranks each orthogonalise every piece."""
    assert losses(runs / "ddp") == losses(runs / "unshared") == losses(runs / "fsdp")
    assert same_weights(checkpoint(runs / "ddp", 4), checkpoint(runs / "unshared", 4))
    assert same_weights(checkpoint(runs / "fsdp", 4), checkpoint(runs / "unshared", 4))


def resumed_from(source: Path, run: Path) -> None:
    """`run` holds `source`'s step-2 checkpoint alone, to resume from."""
    shutil.copytree(checkpoint(source, 2), checkpoint(run, 2))


@pytest.mark.slow
def test_a_sharded_muon_run_resumes_bit_for_bit(runs, tmp_path):
    resumed_from(runs / "fsdp", tmp_path / "resumed")
    torchrun_pretrain(runs / "prepared", tmp_path / "resumed", "fsdp", resume=True)
    assert losses(tmp_path / "resumed") == losses(runs / "fsdp")[2:]
    assert same_weights(checkpoint(tmp_path / "resumed", 4), checkpoint(runs / "fsdp", 4))


@pytest.mark.slow
def test_muon_checkpoints_resume_across_fsdp_and_one_process(runs, tmp_path):
    """FSDP's step-2 checkpoint in one process and one process's under FSDP: steps 3 and 4 as the run it continues
    to float rounding (the ranks' sums added in another order), momentum buffers included (lost, the fourth loss
    is 1.9e-4 away). DDP's checkpoint is FSDP's to the bit (the test above)."""
    data = runs / "prepared"
    resumed_from(runs / "fsdp", tmp_path / "one")
    train(run_config(*ONE), tmp_path / "one", data_dir=str(data), resume=True)
    resumed_from(runs / "one", tmp_path / "fsdp")
    torchrun_pretrain(data, tmp_path / "fsdp", "fsdp", resume=True)
    for mode, continued in (("one", "fsdp"), ("fsdp", "one")):
        assert relative_difference(losses(tmp_path / mode), losses(runs / continued)[2:]) <= 1e-5, mode
