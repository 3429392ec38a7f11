"""The distributed wrappers on a one-process gloo group, which needs no torchrun and no port: which wrapper each
`train.distributed` setting gives, and DDP's gradient sync switch. Then two ranks launched apart: what rank 0 alone
does and fails at stops the other in one line, a run refused on both leaves no directory behind, the throughput
figures a two-process run logs, and a three-process DDP run that resumes bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, free_port, run_snippet, run_torchrun
from train_helpers import losses, prepared_corpus, run_config, same_weights, set_arguments
from ttl_core.metrics import read_metrics
from ttl_core.model import LlamaForCausalLM


def test_train_distributed_picks_the_wrapper(tmp_path):
    """ddp wraps the model in DistributedDataParallel, fsdp shards each decoder block and the model with FSDP2:
    test_train's two-process parity runs give the same figures with either wrapper, so they cannot tell which
    one ran. DDP's `settle_buckets` runs in the run's autocast and leaves the model as it found it: training, with no
    gradients and its dropout's random stream not drawn from. A one-process gloo group (a FileStore: no port) stands
    in for torchrun's, in a subprocess of its own."""
    code = f"""
import contextlib, torch, torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from ttl_core import LlamaConfig, LlamaForCausalLM
from ttl_core.distributed import World, set_gradient_sync, wrap_model
dist.init_process_group("gloo", store=dist.FileStore({str(tmp_path / "store")!r}, 1), rank=0, world_size=1)
world = World(0, 2, torch.device("cpu"))  # wrapped as rank 0 of two; the group itself has one process
config = LlamaConfig.from_preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 attention_dropout=0.5)
entered = []
@contextlib.contextmanager
def run_autocast():
    entered.append(torch.is_grad_enabled())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yield
model = LlamaForCausalLM(config)
rng = torch.get_rng_state()
ddp = wrap_model(model, "ddp", world, run_autocast())
assert isinstance(ddp, DistributedDataParallel) and not isinstance(ddp.module, FSDPModule)
assert entered == [True] and ddp.training and all(p.grad is None for p in ddp.parameters())
assert torch.equal(torch.get_rng_state(), rng)
set_gradient_sync(ddp, False)
assert ddp.require_backward_grad_sync is False  # an accumulation window's early micro-batches skip the all-reduce
fsdp = wrap_model(LlamaForCausalLM(config), "fsdp", world)
assert not isinstance(fsdp, DistributedDataParallel)
assert isinstance(fsdp, FSDPModule) and all(isinstance(block, FSDPModule) for block in fsdp.backbone.layers)
dist.destroy_process_group()
print("wrapped")
"""
    done, ours = run_snippet(code)
    assert done.returncode == 0 and ours == ["wrapped"], done.stderr[-3000:]


RANK_1_LAST = """
import os, runpy, sys, time
from pathlib import Path
import ttl_core.run_setup as run_setup
out, check_compiler = Path(sys.argv.pop(1)), run_setup.check_compiler

def after_rank_0(*args):  # rank 1 starts its run once rank 0 has refused it and removed what it made
    deadline = time.monotonic() + 120
    while os.environ["RANK"] == "1" and out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    check_compiler(*args)

run_setup.check_compiler = after_rank_0
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


def two_ranks(launcher: Path, *args) -> list[tuple[int, str]]:
    """(exit status, stderr) of each of two gloo ranks of `python LAUNCHER ARGS`, launched apart (torchrun would
    end one rank when the other fails)."""
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, str(launcher), *map(str, args)], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
                                   "RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in (0, 1)]
    try:
        errors = [rank.communicate(timeout=300)[1] for rank in ranks]
    finally:
        for rank in ranks:  # a rank left waiting at a collective must not outlive the test
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    return [(rank.returncode, error) for rank, error in zip(ranks, errors)]


@pytest.mark.slow
def test_a_run_refused_on_two_ranks_leaves_no_run_directory_behind(tmp_path):
    """Rank 0 removes the directories it made for a refused run; a slower rank must not make them again (the
    ranks need not meet between the start and a refusal: no collective runs on the way to this one)."""
    launcher = tmp_path / "rank_1_last.py"
    launcher.write_text(RANK_1_LAST)
    out = tmp_path / "new" / "run"
    ranks = two_ranks(launcher, out, ROOT / "scripts" / "pretrain.py", "--data", prepared_corpus(tmp_path),
                      "--out", out, *set_arguments("train.seq_len=100"))
    assert [status for status, _ in ranks] == [2, 2], ranks
    assert all("exceeds the model's max_position_embeddings" in error for _, error in ranks)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
@pytest.mark.parametrize("refused, message", [
    ("out", "run: a file, not a directory"),
    ("corpus", "that is the bundled sample corpus, used without --data"),
])
def test_what_rank_0_alone_refuses_stops_the_other_ranks_in_one_line(tmp_path, refused, message):
    """Rank 0 alone makes the run directory and prepares the bundled corpus: when it cannot, the other ranks, which
    wait for it, stop with one line pointing to its error, not a traceback of a collective whose peer left."""
    (tmp_path / "run").write_text("a file where the run directory goes")
    args = ["--out", tmp_path / "run" / "sub"] if refused == "out" else ["--out", tmp_path / "new"]
    ranks = two_ranks(ROOT / "scripts" / "pretrain.py", *args, *set_arguments("model.vocab_size=70000"))
    assert [status for status, _ in ranks] == [2, 2], ranks
    assert message in ranks[0][1] and ranks[0][1].count("\n") == 1, ranks[0][1]
    assert ranks[1][1] == "error: rank 0 stopped the run; its error says why\n"
    assert not (tmp_path / "new").exists()


FULL_DISK_ON_RANK_0 = """
import errno, os, runpy, sys
import ttl_core.train as train

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", sys.argv[sys.argv.index("--out") + 1])

if os.environ["RANK"] == "0":
    train.save_checkpoint = no_space
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


@pytest.mark.slow
def test_a_checkpoint_rank_0_cannot_write_stops_the_other_ranks_in_one_line(tmp_path):
    launcher = tmp_path / "full_disk.py"
    launcher.write_text(FULL_DISK_ON_RANK_0)
    ranks = two_ranks(launcher, ROOT / "scripts" / "pretrain.py", "--data", prepared_corpus(tmp_path),
                      "--out", tmp_path / "run", *set_arguments("train.max_steps=1"))
    assert ranks[0][0] == 2 and ranks[0][1].endswith(f"\nerror: {tmp_path / 'run'}: No space left on device\n")
    assert ranks[1] == (2, "error: rank 0 stopped the run; its error says why\n"), ranks


TWO_SECOND_STEPS_ON_AN_A100 = """
import runpy, sys
from types import SimpleNamespace
import ttl_core.train as train
clock = iter(range(0, 1000, 2))  # every step takes 2 s
train.time = SimpleNamespace(perf_counter=lambda: next(clock))
step_throughput = train.step_throughput
# a CPU run has no half-precision peak to figure an MFU against: lend it an A100's (312 TFLOP/s)
train.step_throughput = lambda tokens, ranks, seconds, flops, _: step_throughput(tokens, ranks, seconds, flops, 312.0)
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


@pytest.mark.slow
def test_a_two_process_run_logs_the_tokens_of_both_ranks_and_a_per_gpu_mfu_of_6n_plus_12ldt(tmp_path):
    """tokens_per_s and batch_tokens count both ranks' tokens, and the MFU is figured from 6N + 12·L·d·T FLOPs per
    token, N the parameters without the input embedding table, over one GPU's peak: test_train checks
    `step_throughput` alone, this what the loop hands it (a one-process run on the CPU logs no MFU, and one rank's
    tokens are all its)."""
    overrides = ("train.max_steps=1", "train.grad_accum_steps=2", "train.eval_every=0")
    launcher = tmp_path / "a100.py"
    launcher.write_text(TWO_SECOND_STEPS_ON_AN_A100)
    ranks = two_ranks(launcher, ROOT / "scripts" / "pretrain.py", "--data", prepared_corpus(tmp_path),
                      "--out", tmp_path / "run", *set_arguments(*overrides))
    assert [status for status, _ in ranks] == [0, 0], ranks
    [step] = read_metrics(tmp_path / "run" / "metrics.jsonl")
    run = run_config(*overrides)
    config, t = run.model_config(), run.train
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert not config.tie_word_embeddings  # the LM head is a table of its own, which counts in N
    attention = 12 * config.num_hidden_layers * config.hidden_size * t.seq_len
    flops = 6 * (params - config.vocab_size * config.hidden_size) + attention
    tokens_per_s = t.micro_batch_size * t.grad_accum_steps * t.seq_len * 2 / 2.0
    assert step["tokens_per_s"] == tokens_per_s
    assert step["batch_tokens"] == t.micro_batch_size * t.grad_accum_steps * t.seq_len * 2  # compare_runs' x axis
    assert step["mfu"] == pytest.approx(flops * tokens_per_s / (312e12 * 2), rel=1e-12)


@pytest.mark.slow
def test_a_three_process_ddp_run_resumes_bit_for_bit(tmp_path):
    """With 3 processes gloo's ring all-reduce adds each gradient element's shares in an order set by its place in
    DDP's bucket, and DDP lays its buckets out anew after its first backward: a resumed run's first step came out a
    float32 rounding off the uninterrupted run's (each weight 4e-9 to 7e-9 apart after 6 steps) until
    `distributed.settle_buckets` laid them out before the first step of every run."""
    data = prepared_corpus(tmp_path)
    overrides = set_arguments("train.max_steps=4", "train.micro_batch_size=1", "train.eval_every=0",
                              "train.save_every=2", 'train.distributed="ddp"')
    for run, flags in (("straight", []), ("resumed", ["--stop-after", "2"]), ("resumed", ["--resume"])):
        done = run_torchrun(ROOT / "scripts" / "pretrain.py", "--data", data, "--out", tmp_path / run, *flags,
                            *overrides, processes=3)
        assert done.returncode == 0, done.stderr[-3000:]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert same_weights(*(tmp_path / run / "checkpoints" / "step-000004" for run in ("straight", "resumed")))
