"""The gradient noise scale under FSDP2 (train.log_noise_scale with train.distributed = "fsdp", ttl_core.noise_scale):
each process's small batch is its whole share of the step, whose gradient the reduce-scatters read. The ranks are
forked from the test process (gloo, one thread each): the figures against float64 autograd of each rank's share at two
and three processes, in float32 and under bfloat16 autocast, with shares without a target, and with a tied LM head and
activation checkpointing; whole runs of one and of two micro-batches per process, trained bit for bit as without the
noise scale and resumed exactly; the refusals."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import traceback
from functools import partial
from pathlib import Path
from typing import Callable

import pytest
import torch

from helpers import forked_exit_codes, free_port, load_script
from test_noise_scale import (ONE_EACH, RAMP, check_against, check_refused_in_one_process, figures, reference_squares,
                              reference_steps)
from train_helpers import losses, run_config, same_weights, set_arguments
from ttl_core.distributed import close_world, init_world, wrap_model
from ttl_core.errors import ConfigError
from ttl_core.loader import PackedLoader
from ttl_core.metrics import read_metrics
from ttl_core.model import LlamaForCausalLM
from ttl_core.noise_scale import (fsdp_reduce_scatter, noise_estimates, start_noise_scale,
                                  validate_noise_scale)
from ttl_core.optim import build_optimizer
from ttl_core.step import model_inputs, train_step
from ttl_core.tokenizer import Tokenizer
from ttl_core.train import train

CPU = torch.device("cpu")
NOISE_FIGURES = {"noise_scale", "grad_sq_small", "grad_sq_big"}
# one step of 2 micro-batches per process, its estimates unaveraged
STEP = ["train.distributed=fsdp", "train.log_noise_scale=true", "data.document_masking=true",
        "train.grad_accum_steps=2", "train.noise_scale_ema=0"]


def as_rank(rank: int, processes: int, port: int, errors: Path, work: Callable[[], None]) -> None:
    """`work()` as rank `rank` of `processes` in torchrun's environment (one thread), in a forked process: exits 0,
    or 1 with its traceback in `errors`/rank-N.txt."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        work()
        code = 0
    except BaseException:
        (errors / f"rank-{rank}.txt").write_text(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter shutdown: the test process's own state is not the child's to tear down


def on_ranks(processes: int, tmp_path: Path, work: Callable[[], None]) -> None:
    """`work()` on `processes` forked ranks of a gloo group; fails with their tracebacks if any fails."""
    errors, port = Path(tempfile.mkdtemp(dir=tmp_path)), free_port()
    codes = forked_exit_codes(as_rank, [(rank, processes, port, errors, work) for rank in range(processes)])
    assert codes == [0] * processes, [path.read_text()[-3000:] for path in sorted(errors.iterdir())]


def step_batches(data_dir, processes: int, case: str) -> list[dict]:
    """The step's micro-batches, 2 a process (process r's: r, r + processes, as one loader hands them out), with
    document masking and a few more -100 targets at random, so that each share holds its own count of targets; in
    case "one without", rank 1's are all -100, in case "none", every one's."""
    t = run_config(*STEP).train
    loader = PackedLoader(data_dir, "train", t.seq_len, t.micro_batch_size, seed=3)
    bos = Tokenizer.from_pretrained(data_dir).bos_id
    micro = [model_inputs(next(loader), CPU, True, bos) for _ in range(2 * processes)]
    gen = torch.Generator().manual_seed(processes)
    for i, inputs in enumerate(micro):
        targets = inputs["targets"].view(-1)
        targets[torch.randperm(targets.numel(), generator=gen)[:2 * i + 1]] = -100
        if case == "none" or case == "one without" and i % processes == 1:
            targets[:] = -100
    return micro


CASES = ("uneven", "one without", "none")


def step_figures(data_dir, processes: int, dtype: str, settings: tuple[str, ...], out: Path) -> None:
    """On each rank: one train_step of each case's batches on a fresh FSDP model (seed 0) of `settings`, wrapped as
    training wraps it, its noise scale's averages starting at (2, 300); rank 0 writes each case's figures and averages
    to `out` as JSON."""
    world = init_world("cpu")
    run, logged = run_config(*STEP, f"train.dtype={dtype}", *settings), {}
    for case in CASES:
        torch.manual_seed(0)
        model = LlamaForCausalLM(run.model_config()).train()
        if run.train.activation_checkpointing:
            model.activation_checkpointing_enable()
        model = wrap_model(model, "fsdp", world)
        noise = start_noise_scale(model, run.train, {"grad_sq": 2.0, "trace": 300.0}, 0)
        micro = step_batches(data_dir, processes, case)[world.rank::processes]
        _, _, step = train_step(model, build_optimizer(model, run.train, CPU, world), micro, run.train, world, 1e-3,
                                None, noise)
        logged[case] = {**step, **noise.state_dict()}
    if world.is_main:
        out.write_text(json.dumps(logged))
    close_world(world)


# the root's parameters hold the LM head once, tied to the embedding; each block recomputed in the backward
TIED_CHECKPOINTED = ("model.tie_word_embeddings=true", "train.activation_checkpointing=true")


@pytest.mark.parametrize("processes, dtype, tolerance, settings", [(2, "float32", 1e-5, ()), (3, "float32", 1e-5, ()),
                                                                   (2, "bfloat16", 1e-2, ()),
                                                                   (2, "float32", 1e-5, TIED_CHECKPOINTED)])
def test_the_small_batch_is_each_process_s_share_by_float64_autograd_and_one_without_targets_is_left_out(
        data_dir, tmp_path, processes, dtype, tolerance, settings):
    """grad_sq_small is the mean over ranks of the squared norm of each one's mean gradient over its 2 micro-batches,
    grad_sq_big the whole step's, both by float64 autograd (bfloat16 autocast: within 1e-2), and noise_scale the ratio
    of the estimates with b the harmonic mean of the shares' target counts. A rank whose share has no target is left
    out (of two, the other's share holds all of the step's targets); a step where none has one, or one holds all,
    logs none of the figures and leaves the averages as they were. So too with the LM head tied to the embedding
    (counted once) and activation checkpointing."""
    out = tmp_path / "figures.json"
    on_ranks(processes, tmp_path, partial(step_figures, data_dir, processes, dtype, settings, out))
    logged = json.loads(out.read_text())
    torch.manual_seed(0)
    model = LlamaForCausalLM(run_config(*STEP, *settings).model_config()).train()
    for case in CASES[:2]:
        micro = step_batches(data_dir, processes, case)
        smalls, big = reference_squares(model, micro, processes)
        counts = [sum(int((inputs["targets"] != -100).sum()) for inputs in micro[r::processes])
                  for r in range(processes)]
        kept = [r for r in range(processes) if counts[r]]
        assert len(set(counts)) == processes and len(kept) == processes - (case == "one without"), counts
        if len(kept) == 1:
            assert not NOISE_FIGURES & logged[case].keys()
            assert (logged[case]["grad_sq"], logged[case]["trace"]) == (2.0, 300.0)
            continue
        small_sq, small = sum(smalls[r] for r in kept) / len(kept), len(kept) / sum(1 / counts[r] for r in kept)
        assert logged[case]["grad_sq_small"] == pytest.approx(small_sq, rel=tolerance)
        assert logged[case]["grad_sq_big"] == pytest.approx(big, rel=tolerance)
        if dtype == "float32":  # noise_scale, a ratio of differences, 1e-4
            grad_sq, trace = noise_estimates(small_sq, big, small, sum(counts))
            assert logged[case]["noise_scale"] == pytest.approx(trace / grad_sq, rel=1e-4)
            assert (logged[case]["grad_sq"], logged[case]["trace"]) == pytest.approx((grad_sq, trace), rel=1e-4)
    assert not NOISE_FIGURES & logged["none"].keys()
    assert (logged["none"]["grad_sq"], logged["none"]["trace"]) == (2.0, 300.0)


FSDP_RUN = [*ONE_EACH, *RAMP, "train.distributed=fsdp"]  # 1, 1 and 2 micro-batches per process, a checkpoint a step


@pytest.fixture(scope="module")
def fsdp_runs(data_dir, tmp_path_factory) -> dict[str, Path]:
    """Two processes under FSDP, 3 steps of 1, 1 and 2 micro-batches each: with the noise scale, without it, and
    stopped after step 2 and resumed; {name: run directory}."""
    tmp = tmp_path_factory.mktemp("fsdp_runs")
    runs = {name: tmp / name for name in ("noisy", "plain", "resumed")}
    for name, overrides, options in (("noisy", [], {}), ("plain", ["train.log_noise_scale=false"], {}),
                                     ("resumed", [], {"stop_after": 2}), ("resumed", [], {"resume": True})):
        on_ranks(2, tmp, partial(train, run_config(*FSDP_RUN, *overrides), runs[name], data_dir=str(data_dir),
                                 **options))
    return runs


def test_under_fsdp_training_is_bit_identical_with_and_without_it_and_a_resume_continues_the_averages(fsdp_runs):
    """The reduce-scatters are FSDP's own: losses, gradient norms and weights as without the noise scale, to the bit;
    stopped after step 2 and resumed, the figures of the uninterrupted run, bit for bit."""
    noisy, plain = fsdp_runs["noisy"], fsdp_runs["plain"]
    assert losses(noisy) == losses(plain) and figures(noisy, "grad_norm") == figures(plain, "grad_norm")
    assert same_weights(noisy / "checkpoints" / "step-000003", plain / "checkpoints" / "step-000003")
    assert not any(NOISE_FIGURES & r.keys() for r in read_metrics(plain / "metrics.jsonl"))
    for key in ("noise_scale", "grad_sq_small", "grad_sq_big", "loss"):
        assert figures(fsdp_runs["resumed"], key) == figures(noisy, key)


def test_under_fsdp_each_step_s_small_batches_are_the_processes_shares_of_one_micro_batch_or_two(fsdp_runs,
                                                                                                  data_dir):
    """Steps 1 and 2 of one micro-batch per process, step 3 of two: each step's figures from float64 autograd of
    each rank's share, the averages taken over the steps."""
    references = reference_steps(data_dir, fsdp_runs["noisy"], [1, 1, 2], whole_shares=True)
    check_against([r for r in read_metrics(fsdp_runs["noisy"] / "metrics.jsonl") if "loss" in r], references, 0.5)


def test_one_process_under_fsdp_is_refused_in_one_line_before_anything_is_made(data_dir, tmp_path):
    """Its share is the whole step, whatever its micro-batches (2 processes have theirs)."""
    check_refused_in_one_process(
        ["train.distributed=fsdp", "train.grad_accum_steps=2"], r"^train.log_noise_scale under FSDP compares each "
        r"process's share of the step with the whole step, which one process's is: launch 2 or more with torchrun, or "
        r"use train.distributed=\"ddp\" \(its first micro-batch is then the small one\)$", data_dir, tmp_path)


def test_a_torch_that_keeps_fsdps_reduce_scatter_elsewhere_is_named_in_one_line_before_anything_is_made(
        monkeypatch, data_dir):
    """Named where the config is checked, as the run's other refusals are: a run of 2 processes is refused while it
    sets itself up, and its plan alike, rather than once its model is wrapped and its metrics file opened."""
    fsdp, ddp = run_config(*STEP).train, run_config(*STEP, "train.distributed=ddp").train
    # None in sys.modules makes the import fail, as it would where a torch moved the class
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp._fully_shard._fsdp_collectives", None)
    message = f"FSDP2's reduce-scatter, which torch {torch.__version__} keeps elsewhere than torch 2.13 does"
    with pytest.raises(ConfigError, match=re.escape(message)):
        fsdp_reduce_scatter()
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_noise_scale(fsdp, 2)
    validate_noise_scale(ddp, 2)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_script("pretrain").main(["--plan", "--plan-processes", "2", "--data", str(data_dir),
                                      *set_arguments(*STEP)])
