"""The gradient noise scale (train.log_noise_scale, ttl_core.noise_scale): the estimator against its formula, the
small and big batches' squared gradient norms against float64 autograd, training unchanged by it, resume, two
processes (with several micro-batches each, and with one: DDP's communication hook), refusals."""

from __future__ import annotations

import copy
import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ROOT, run_script, run_snippet, run_torchrun
from train_helpers import losses, run_config, same_weights, set_arguments
from ttl_core import load_pretrained
from ttl_core.checkpoint import read_trainer_state
from ttl_core.distributed import World
from ttl_core.errors import ConfigError
from ttl_core.loader import PackedLoader
from ttl_core.metrics import read_metrics
from ttl_core.model import LlamaForCausalLM
from ttl_core.noise_scale import NoiseScale, noise_estimates, validate_noise_scale
from ttl_core.optim import build_optimizer
from ttl_core.run_config import load_run_config
from ttl_core.tokenizer import Tokenizer
from ttl_core.step import model_inputs, train_step
from ttl_core.train import train

CPU = torch.device("cpu")
NOISY = ["train.max_steps=4", "train.grad_accum_steps=2", "train.eval_every=0", "train.log_noise_scale=true",
         "train.noise_scale_ema=0.5"]


def test_the_estimates_are_the_formula_and_recover_the_true_gradient_and_trace():
    rng = random.Random(0)
    for _ in range(20):
        small_sq, big_sq, small = rng.uniform(0.1, 10), rng.uniform(0.1, 10), rng.randint(1, 500)
        big = small + rng.randint(1, 5000)
        grad_sq, trace = noise_estimates(small_sq, big_sq, small, big)
        assert grad_sq == pytest.approx((big * big_sq - small * small_sq) / (big - small), rel=1e-14)
        assert trace == pytest.approx((small_sq - big_sq) / (1 / small - 1 / big), rel=1e-14)
        # squared norms as E|G_b|² = |G|² + tr(Σ)/b gives them: both come back
        true_sq, true_trace = rng.uniform(0.1, 10), rng.uniform(1, 1000)
        assert noise_estimates(true_sq + true_trace / small, true_sq + true_trace / big, small, big) == \
            pytest.approx((true_sq, true_trace), rel=1e-10)


def test_the_averages_are_exponential_from_zero_and_their_ratio_needs_no_bias_correction():
    """Two processes whose small batches hold 100 and 300 targets: b is their harmonic mean, 150."""
    noise, decay = NoiseScale(0.9), 0.9
    grad_sq_avg = trace_avg = 0.0
    rng = random.Random(1)
    for _ in range(6):
        small_sq, big_sq = rng.uniform(2, 3), rng.uniform(1, 2)
        figures = noise.update(big_sq, 2 * small_sq, 1 / 100 + 1 / 300, 2, 800.0)
        grad_sq, trace = noise_estimates(small_sq, big_sq, 150, 800)
        grad_sq_avg, trace_avg = decay * grad_sq_avg + (1 - decay) * grad_sq, decay * trace_avg + (1 - decay) * trace
        assert figures == pytest.approx({"noise_scale": trace_avg / grad_sq_avg, "grad_sq_small": small_sq,
                                         "grad_sq_big": big_sq}, rel=1e-12)
    assert noise.state_dict() == pytest.approx({"grad_sq": grad_sq_avg, "trace": trace_avg}, rel=1e-12)
    constant = NoiseScale(0.99)  # the same estimates each step: their ratio from the first step on
    for _ in range(3):
        assert constant.update(1.0 + 300 / 800, 2 * (1.0 + 300 / 150), 1 / 100 + 1 / 300, 2, 800.0)["noise_scale"] \
            == pytest.approx(300, rel=1e-12)
    assert NoiseScale(0.9).update(1.0, 2.0, 1 / 800, 1, 800.0) == {}  # the small batch is the whole step
    # of two processes, one without a target in its first micro-batch: the other's alone, b = 100
    assert NoiseScale(0.0).update(1.5, 2.5, 1 / 100, 1, 800.0)["noise_scale"] == pytest.approx(
        noise_estimates(2.5, 1.5, 100, 800)[1] / noise_estimates(2.5, 1.5, 100, 800)[0], rel=1e-12)
    assert NoiseScale(0.9).update(1.0, 0.0, 0.0, 0, 800.0) == {}  # no process has one


def reference_squares(model: torch.nn.Module, micro: list[dict],
                      processes: int | None = None) -> tuple[list[float], float]:
    """(|G_b|² of each micro-batch, or given `processes`, of each one's share of them (process r's: micro-batches r,
    r + processes, ..., as one loader hands them out), |G_B|² of them all): the squared norms of the mean gradients per
    target token of `model`'s summed cross-entropy, by plain autograd on a float64 copy, one micro-batch at a time (a
    share without a target: NaN)."""
    model = copy.deepcopy(model).double()
    grads, tokens = [], []
    for inputs in micro:
        model.zero_grad()
        logits = model(**{k: v for k, v in inputs.items() if k != "targets"}).logits
        F.cross_entropy(logits.flatten(0, 1), inputs["targets"].flatten(), reduction="sum").backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        tokens.append(int((inputs["targets"] != -100).sum()))
    every = range(len(micro))
    shares = [range(i, i + 1) for i in every] if processes is None else [every[r::processes] for r in range(processes)]
    squares = [float((sum(grads[i] for i in s) / sum(tokens[i] for i in s)).square().sum()) for s in [*shares, every]]
    return squares[:-1], squares[-1]


@pytest.mark.parametrize("accum", [2, 4])
def test_the_small_and_big_squared_norms_are_float64_autograd_s_with_uneven_targets(data_dir, accum):
    """Document masking (no target at a document's BOS) and a few more -100 targets, at random, give each
    micro-batch its own count of targets; the figures are within 1e-5 of float64 autograd's."""
    run = run_config(f"train.grad_accum_steps={accum}", "data.document_masking=true", "train.log_noise_scale=true")
    t = run.train
    torch.manual_seed(0)
    model = LlamaForCausalLM(run.model_config()).train()
    loader = PackedLoader(data_dir, "train", t.seq_len, t.micro_batch_size, seed=3)
    micro = [model_inputs(next(loader), CPU, True, Tokenizer.from_pretrained(data_dir).bos_id) for _ in range(accum)]
    for i, inputs in enumerate(micro):
        inputs["targets"].view(-1)[torch.randperm(inputs["targets"].numel())[:3 * i + 1]] = -100
    counts = [int((inputs["targets"] != -100).sum()) for inputs in micro]
    assert len(set(counts)) == accum, counts
    smalls, big = reference_squares(model, micro)
    noise = NoiseScale(0.0)
    _, grad_norm, figures = train_step(model, build_optimizer(model, t, CPU), micro, t, World(0, 1, CPU), 1e-3,
                                       None, noise)
    assert figures["grad_sq_small"] == pytest.approx(smalls[0], rel=1e-5)
    assert figures["grad_sq_big"] == pytest.approx(big, rel=1e-5) == grad_norm**2
    expected = noise_estimates(smalls[0], big, counts[0], sum(counts))
    assert figures["noise_scale"] == pytest.approx(expected[1] / expected[0], rel=1e-4)  # a ratio of differences


def micro_batches(data_dir, count: int, seed: int) -> list[dict]:
    """`count` micro-batches of run_config's size, drawn by a loader seeded with `seed`."""
    t = run_config().train
    loader = PackedLoader(data_dir, "train", t.seq_len, t.micro_batch_size, seed=seed)
    return [model_inputs(next(loader), CPU, False, None) for _ in range(count)]


def assert_no_small_batch(micro: list[dict], seed: int) -> None:
    """One train_step of `micro` (a model drawn after `seed`) logs none of the noise scale's figures and leaves its
    averages as they were."""
    run = run_config(f"train.grad_accum_steps={len(micro)}", "train.log_noise_scale=true")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(run.model_config()).train()
    noise = NoiseScale(0.5, {"grad_sq": 2.0, "trace": 300.0})
    _, _, figures = train_step(model, build_optimizer(model, run.train, CPU), micro, run.train, World(0, 1, CPU),
                               1e-3, None, noise)
    assert not {"noise_scale", "grad_sq_small", "grad_sq_big"} & figures.keys()
    assert noise.state_dict() == {"grad_sq": 2.0, "trace": 300.0}


def test_a_first_micro_batch_without_targets_is_no_small_batch(data_dir):
    """A first micro-batch whose targets are all -100 has no per-token gradient: the step logs none of the figures
    and leaves the averages as they were (counted as one target with a zero gradient, it logged -1)."""
    micro = micro_batches(data_dir, 3, seed=3)
    micro[0]["targets"][:] = -100
    assert_no_small_batch(micro, seed=0)


@pytest.mark.parametrize("kept", [3, 5, 7])
def test_a_first_micro_batch_holding_every_target_of_the_step_is_no_small_batch(data_dir, kept):
    """The first micro-batch keeps `kept` targets and the second none: the small batch is all of the step (b = B),
    which logs none of the figures, though b comes back from a float32 1/b (as 2.9999999 for 3: b < B, and the
    estimates' differences, of rounding errors alone, went into the averages)."""
    micro = micro_batches(data_dir, 2, seed=kept)
    torch.manual_seed(kept)
    micro[0]["targets"].view(-1)[torch.randperm(micro[0]["targets"].numel())[kept:]] = -100
    micro[1]["targets"][:] = -100
    assert_no_small_batch(micro, seed=kept)


@pytest.fixture(scope="module")
def noisy(data_dir, tmp_path_factory):
    """A 4-step run logging the noise scale, 2 micro-batches a step."""
    out = tmp_path_factory.mktemp("noisy") / "run"
    train(run_config(*NOISY), out, data_dir=str(data_dir))
    return out


def figures(run_dir, key: str) -> list[float]:
    return [r.get(key) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_training_is_bit_identical_with_and_without_it_and_every_step_logs_it(noisy, data_dir, tmp_path):
    train(run_config(*NOISY, "train.log_noise_scale=false"), tmp_path / "plain", data_dir=str(data_dir))
    assert losses(noisy) == losses(tmp_path / "plain")
    assert figures(noisy, "grad_norm") == figures(tmp_path / "plain", "grad_norm")
    assert same_weights(noisy / "checkpoints" / "step-000004", tmp_path / "plain" / "checkpoints" / "step-000004")
    assert all(r["grad_sq_big"] == r["grad_norm"]**2 and r["grad_sq_small"] > 0 and "noise_scale" in r
               for r in read_metrics(noisy / "metrics.jsonl"))
    assert not any("noise_scale" in r for r in read_metrics(tmp_path / "plain" / "metrics.jsonl"))
    state = read_trainer_state(noisy / "checkpoints" / "step-000004")["noise_scale"]
    assert figures(noisy, "noise_scale")[-1] == state["trace"] / state["grad_sq"]


def test_resume_continues_the_averages_exactly_and_a_checkpoint_without_them_starts_afresh(noisy, data_dir,
                                                                                            tmp_path):
    """Stopped after step 2 and resumed: the uninterrupted run's figures, bit for bit. Resumed from a checkpoint
    of a run that did not log them, the averages start at step 3 as a fresh run's start: step 3 logs the ratio of
    its own estimates, which an unaveraged run (noise_scale_ema 0) logs too."""
    sliced, plain = tmp_path / "sliced", tmp_path / "plain"
    train(run_config(*NOISY), sliced, data_dir=str(data_dir), stop_after=2)
    train(run_config(*NOISY), sliced, data_dir=str(data_dir), resume=True)
    for key in ("noise_scale", "grad_sq_small", "grad_sq_big"):
        assert figures(sliced, key) == figures(noisy, key)
    train(run_config(*NOISY, "train.log_noise_scale=false"), plain, data_dir=str(data_dir), stop_after=2)
    assert "noise_scale" not in read_trainer_state(plain / "checkpoints" / "step-000002")
    train(run_config(*NOISY), plain, data_dir=str(data_dir), resume=True)
    train(run_config(*NOISY, "train.noise_scale_ema=0"), tmp_path / "raw", data_dir=str(data_dir))
    logged = [r.get("noise_scale") for r in read_metrics(plain / "metrics.jsonl")]
    assert logged[:2] == [None, None] and logged[2] == figures(tmp_path / "raw", "noise_scale")[2]
    assert logged[2] != figures(noisy, "noise_scale")[2]


def test_a_batch_ramp_s_steps_of_one_micro_batch_log_none_and_the_part_norms_still_come(data_dir, tmp_path):
    """Ramping 1, 1, 2, 3 micro-batches: steps 3 and 4 log the figures, step 3 the ratio of its own estimates (as
    an unaveraged run does); train.log_grad_norms' part norms are logged beside them, as without them."""
    ramp = ["train.grad_accum_steps=3", "train.batch_ramp_steps=4", "train.log_grad_norms=true"]
    train(run_config(*NOISY, *ramp), tmp_path / "ramp", data_dir=str(data_dir))
    train(run_config(*NOISY, *ramp, "train.noise_scale_ema=0"), tmp_path / "raw", data_dir=str(data_dir))
    train(run_config(*NOISY, *ramp, "train.log_noise_scale=false"), tmp_path / "plain", data_dir=str(data_dir))
    records = [r for r in read_metrics(tmp_path / "ramp" / "metrics.jsonl") if "loss" in r]
    assert [r["batch_tokens"] // 128 for r in records] == [1, 1, 2, 3]
    assert ["noise_scale" in r for r in records] == [False, False, True, True]
    assert records[2]["noise_scale"] == figures(tmp_path / "raw", "noise_scale")[2]
    assert [{k: v for k, v in r.items() if k not in ("tokens_per_s", "noise_scale", "grad_sq_small", "grad_sq_big")}
            for r in records] == [{k: v for k, v in r.items() if k != "tokens_per_s"}
                                  for r in read_metrics(tmp_path / "plain" / "metrics.jsonl")]
    assert "grad_norm/layers.0" in records[3]


@pytest.mark.slow
def test_two_processes_give_the_mean_of_their_first_micro_batches_with_the_same_global_batch(data_dir, tmp_path):
    """Step 1 of 1 process accumulating 4 micro-batches and of 2 accumulating 2 each (the same global batch, the
    same weights): grad_sq_big alike, and the float64 reference's; grad_sq_small the first micro-batch's for one
    process, the mean of micro-batches 0 and 1 (each rank's first) for two; noise_scale from b their harmonic
    mean. Document masking gives the micro-batches uneven counts of targets (seed 2: 127 and 125)."""
    common = ["train.max_steps=2", "train.seed=2", "data.document_masking=true", "train.log_noise_scale=true",
              "train.eval_every=0", "train.noise_scale_ema=0.5"]
    one = run_script("pretrain", "--data", data_dir, "--out", tmp_path / "one",
                     *set_arguments(*common, "train.grad_accum_steps=4"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_torchrun(ROOT / "scripts" / "pretrain.py", "--data", data_dir, "--out", tmp_path / "two",
                       *set_arguments(*common, "train.grad_accum_steps=2"))
    assert two.returncode == 0, two.stderr[-3000:]
    first = [[r for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r][0] for run in ("one", "two")]

    run = run_config(*common, "train.grad_accum_steps=4")
    t = run.train
    torch.manual_seed(t.seed)  # the run's fresh weights
    model = LlamaForCausalLM(run.model_config()).train()
    loader = PackedLoader(data_dir, "train", t.seq_len, t.micro_batch_size, seed=t.seed)
    micro = [model_inputs(next(loader), CPU, True, Tokenizer.from_pretrained(data_dir).bos_id) for _ in range(4)]
    counts = [int((inputs["targets"] != -100).sum()) for inputs in micro]
    assert counts[0] != counts[1], counts
    smalls, big = reference_squares(model, micro)
    assert first[0]["grad_sq_big"] == pytest.approx(big, rel=1e-5)
    assert first[1]["grad_sq_big"] == pytest.approx(big, rel=1e-5)
    assert first[0]["grad_sq_small"] == pytest.approx(smalls[0], rel=1e-5)
    assert first[1]["grad_sq_small"] == pytest.approx((smalls[0] + smalls[1]) / 2, rel=1e-5)
    for record, small_sq, small in ((first[0], smalls[0], counts[0]),
                                    (first[1], (smalls[0] + smalls[1]) / 2, 2 / (1 / counts[0] + 1 / counts[1]))):
        grad_sq, trace = noise_estimates(small_sq, big, small, sum(counts))
        assert record["noise_scale"] == pytest.approx(trace / grad_sq, rel=1e-4)


@pytest.mark.parametrize("overrides, message", [
    (["train.dtype=float16", "train.distributed=fsdp"], r"^train.log_noise_scale reads each process's own gradient, "
                                                        r"which float16 loss-scales: use train.dtype=\"bfloat16\" "
                                                        r"or \"float32\"$"),
    (["train.noise_scale_ema=1.0"], r"^train.noise_scale_ema must lie in \[0, 1\) \(0: no averaging\), got 1.0$"),
    (["train.noise_scale_ema=nan", "train.log_noise_scale=false"], r"^train.noise_scale_ema must lie in \[0, 1\)"),
    (["train.noise_scale_ema=-0.1"], r"got -0.1$"),
    (["train.log_noise_scale=1"], r"^train.log_noise_scale must be"),
])
def test_bad_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_run_config(None, ["train.grad_accum_steps=2", "train.log_noise_scale=true", *overrides])
    assert "\n" not in str(e.value)


def check_refused_in_one_process(overrides: list[str], message: str, data_dir, tmp_path) -> None:
    """A config that loads and suits 2 processes is refused in one line for one, by `validate_noise_scale` and by a
    run before it makes anything: a config cannot tell how many processes will run it, a run can."""
    run = run_config(*overrides, "train.log_noise_scale=true")  # loads
    validate_noise_scale(run.train, 2)
    with pytest.raises(ConfigError, match=message):
        validate_noise_scale(run.train, 1)
    with pytest.raises(ConfigError, match=message):
        train(run, tmp_path / "new" / "run", data_dir=str(data_dir))
    assert not (tmp_path / "new").exists()


def test_one_process_with_one_micro_batch_per_step_is_refused_in_one_line_before_anything_is_made(data_dir, tmp_path):
    """It has no small batch (under torchrun, 2 processes have theirs)."""
    check_refused_in_one_process(
        ["train.grad_accum_steps=1"], r"^train.log_noise_scale compares a small batch with the whole step: one process "
        r"needs train.grad_accum_steps >= 2 \(its first micro-batch is the small one\), got 1; or launch 2 or more "
        r"with torchrun \(each one's own micro-batch\)$", data_dir, tmp_path)


def test_the_hook_is_registered_only_where_a_step_of_one_micro_batch_per_process_lies_ahead(tmp_path):
    """A batch ramp of 1, 1 and 2 micro-batches per process: a run from the start (or resumed after step 1) gets the
    communication hook; one resumed after the ramp's steps of one micro-batch does not (the hook would measure nothing,
    and DDP, given a hook, copies each gradient into its bucket and scales it there: a second pass at every step).
    A one-process gloo group (a FileStore: no port) stands in for torchrun's, in a subprocess of its own."""
    code = f"""
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from ttl_core.noise_scale import start_noise_scale
from ttl_core.run_config import load_run_config
dist.init_process_group("gloo", store=dist.FileStore({str(tmp_path / "store")!r}, 1), rank=0, world_size=1)
t = load_run_config(None, {RAMP + ["train.log_noise_scale=true"]!r}).train
hooked = [start_noise_scale(DistributedDataParallel(torch.nn.Linear(4, 4)), t, None, resumed_at).process_gradient
          is not None for resumed_at in (0, 1, 2)]
dist.destroy_process_group()
print(hooked)
"""
    done, printed = run_snippet(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert printed == ["[True, True, False]"]


SMALL_BUCKETS = """
import atexit, runpy, sys
from torch.nn import parallel


class SmallBuckets(parallel.DistributedDataParallel):
    '''Buckets of 100 KB: several for the micro model, as DDP rebuilds them after its first backward (ttl's
    `settle_buckets`, before the first step); prints how many the noise scale's communication hook saw.'''

    def __init__(self, *args, **kwargs):
        super().__init__(*args, bucket_cap_mb=0.1, **kwargs)

    def register_comm_hook(self, state, hook):
        seen = set()

        def counted(state, bucket):
            seen.add(bucket.index())
            return hook(state, bucket)

        atexit.register(lambda: print(f"the hook saw {len(seen)} buckets"))
        super().register_comm_hook(state, counted)


parallel.DistributedDataParallel = SmallBuckets
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""
ONE_EACH = ["train.max_steps=3", "train.seed=2", "data.document_masking=true", "train.eval_every=0",
            "train.noise_scale_ema=0.5", "train.save_every=1", "train.keep_checkpoints=3", "train.grad_accum_steps=1",
            "train.log_noise_scale=true"]
RAMP = ["train.grad_accum_steps=2", "train.batch_ramp_steps=3"]  # 1, 1 and 2 micro-batches per process


def two_process_run(data_dir, launcher, out, *overrides, extra: tuple = ()) -> str:
    done = run_torchrun(launcher, ROOT / "scripts" / "pretrain.py", "--data", data_dir, "--out", out, *extra,
                        *set_arguments(*ONE_EACH, *overrides))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def one_each(data_dir, tmp_path_factory):
    """Two processes, one micro-batch each per step, DDP's buckets small (3 steps, a checkpoint after each), with the
    noise scale, without it, resumed from its step-2 checkpoint, and with a batch ramp (uninterrupted, and resumed
    after its steps of one micro-batch): {name: run directory}, and what the first printed. A resumed run is a copy
    of the uninterrupted one as a stop after step 2 leaves it (no step-3 checkpoint nor record), without training
    steps 1 and 2 again."""
    tmp = tmp_path_factory.mktemp("one_each")
    launcher = tmp / "small_buckets.py"
    launcher.write_text(SMALL_BUCKETS)
    runs = {name: tmp / name for name in ("noisy", "plain", "resumed", "ramp", "ramp_resumed")}
    printed = two_process_run(data_dir, launcher, runs["noisy"])
    two_process_run(data_dir, launcher, runs["plain"], "train.log_noise_scale=false")
    two_process_run(data_dir, launcher, runs["ramp"], *RAMP)
    for uninterrupted, resumed, overrides in (("noisy", "resumed", ()), ("ramp", "ramp_resumed", RAMP)):
        shutil.copytree(runs[uninterrupted], runs[resumed])
        shutil.rmtree(runs[resumed] / "checkpoints" / "step-000003")
        kept = [r for r in read_metrics(runs[resumed] / "metrics.jsonl") if r["step"] <= 2]
        (runs[resumed] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        two_process_run(data_dir, launcher, runs[resumed], *overrides, extra=("--resume",))
    return runs, printed


def reference_steps(data_dir, run_dir, micro_batches: list[int],
                    whole_shares: bool = False) -> list[tuple[float, float, float, int]]:
    """(|G_b|², |G_B|², b, B) of each step of a two-process run of `micro_batches[step - 1]` per process, by float64
    autograd from its weights (fresh from the seed, then its checkpoints') over the batches its two loaders gave: one
    loader hands out the same micro-batches in turn, rank 0's first, then rank 1's, then each one's next. The small
    batches are the ranks' first micro-batches, or with `whole_shares` (FSDP) all of each rank's: b is the harmonic
    mean of their target counts, B the count over all."""
    run = run_config(*ONE_EACH)
    torch.manual_seed(run.train.seed)  # the run's fresh weights
    model = LlamaForCausalLM(run.model_config()).train()
    loader = PackedLoader(data_dir, "train", run.train.seq_len, run.train.micro_batch_size, seed=run.train.seed)
    bos = Tokenizer.from_pretrained(data_dir).bos_id
    figures = []
    for step, count in enumerate(micro_batches, start=1):
        if step > 1:
            model = load_pretrained(run_dir / "checkpoints" / f"step-{step - 1:06d}").train()
        micro = [model_inputs(next(loader), CPU, True, bos) for _ in range(2 * count)]
        targets = [int((inputs["targets"] != -100).sum()) for inputs in micro]
        smalls, big = reference_squares(model, micro, 2 if whole_shares else None)
        small_targets = [sum(targets[rank::2]) if whole_shares else targets[rank] for rank in range(2)]
        figures.append(((smalls[0] + smalls[1]) / 2, big, 2 / (1 / small_targets[0] + 1 / small_targets[1]),
                        sum(targets)))
    return figures


def check_against(records: list[dict], references: list[tuple[float, float, float, int]], decay: float) -> None:
    """Each record's figures within 1e-5 of the float64 reference (noise_scale, a ratio of differences, 1e-4), the
    averages taken over the steps in turn."""
    grad_sq_avg = trace_avg = 0.0
    for record, (small_sq, big_sq, small, big) in zip(records, references, strict=True):
        grad_sq, trace = noise_estimates(small_sq, big_sq, small, big)
        grad_sq_avg, trace_avg = decay * grad_sq_avg + (1 - decay) * grad_sq, decay * trace_avg + (1 - decay) * trace
        assert record["grad_sq_small"] == pytest.approx(small_sq, rel=1e-5)
        assert record["grad_sq_big"] == pytest.approx(big_sq, rel=1e-5)
        assert record["noise_scale"] == pytest.approx(trace_avg / grad_sq_avg, rel=1e-4)


@pytest.mark.slow
def test_one_micro_batch_per_process_takes_each_process_s_gradient_before_ddp_s_all_reduce(one_each, data_dir):
    """Steps 1 to 3 of 2 processes of one micro-batch: grad_sq_small the mean of the ranks' own squared norms, by
    float64 autograd per rank's micro-batch, and noise_scale the averaged ratio."""
    runs, printed = one_each
    assert int(printed.split("the hook saw ")[1].split()[0]) >= 3, printed[-500:]
    references = reference_steps(data_dir, runs["noisy"], [1, 1, 1])
    assert references[0][2] != references[0][3] / 2  # the ranks' micro-batches hold different counts of targets
    check_against([r for r in read_metrics(runs["noisy"] / "metrics.jsonl") if "loss" in r], references, 0.5)


@pytest.mark.slow
def test_with_one_micro_batch_per_process_training_is_bit_identical_and_a_resume_continues_the_averages(one_each):
    """The hook's reduction is DDP's own: losses, gradient norms and weights as without the noise scale, to the bit.
    Resumed after step 2, step 3's figures come out the same, bit for bit (the hook sums its norms in the parameters'
    order, not the buckets'; `test_noise_scale_hook.py` holds that order against two bucket layouts)."""
    runs, _ = one_each
    noisy, plain = runs["noisy"], runs["plain"]
    assert losses(noisy) == losses(plain) and figures(noisy, "grad_norm") == figures(plain, "grad_norm")
    assert same_weights(noisy / "checkpoints" / "step-000003", plain / "checkpoints" / "step-000003")
    assert not any("noise_scale" in r for r in read_metrics(plain / "metrics.jsonl"))
    for key in ("noise_scale", "grad_sq_small", "grad_sq_big", "loss"):
        assert figures(runs["resumed"], key) == figures(noisy, key)


@pytest.mark.slow
def test_a_batch_ramp_s_steps_of_one_micro_batch_per_process_take_the_hook_s_figures_then_the_first_micro_batch_s(
        one_each, data_dir):
    """Ramping 1, 1, 2 micro-batches per process: steps 1 and 2 log what the run of one micro-batch each logs, step
    3 the figures of the ranks' first micro-batches, the averages going on from steps 1 and 2; resumed after step 2
    (without the hook), the same, bit for bit."""
    runs, _ = one_each
    records = [r for r in read_metrics(runs["ramp"] / "metrics.jsonl") if "loss" in r]
    assert [r["batch_tokens"] // 256 for r in records] == [1, 1, 2]
    keys = ("loss", "grad_norm", "noise_scale", "grad_sq_small", "grad_sq_big")
    assert [{k: r[k] for k in keys} for r in records[:2]] == [{k: r[k] for k in keys} for r in
                                                            read_metrics(runs["noisy"] / "metrics.jsonl")[:2]]
    check_against(records, reference_steps(data_dir, runs["ramp"], [1, 1, 2]), 0.5)
    resumed = [r for r in read_metrics(runs["ramp_resumed"] / "metrics.jsonl") if "loss" in r]
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in records]
