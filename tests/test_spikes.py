"""Skipping loss and gradient-norm spikes (train.skip_spikes_sigma, ttl_core.spikes): the detector as a pure object
(threshold, full window first, a level shift, state), and tiny runs whose step 14 trains on a block of random tokens:
skipped with weights, optimizer state and average left as they were, resumed exactly, alike on two processes; and
a run with every option that combines with it, resumed exactly and trained alike without its logging."""

from __future__ import annotations

import functools
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_torchrun
from test_ema import prepare_held_out
from test_z_loss import z_formula
from train_helpers import losses, prepared_corpus, random_model, run_config, same_weights
from ttl_core.checkpoint import load_optimizer_file, read_trainer_state
from ttl_core.distributed import World
from ttl_core.errors import ConfigError
from ttl_core.fileio import file_sha256, write_json
from ttl_core.loader import PackedLoader, read_meta
from ttl_core.metrics import read_metrics
from ttl_core.optim import lr_at
from ttl_core.run_config import load_run_config
from ttl_core.spikes import SpikeDetector
from ttl_core.step import train_step
from ttl_core.train import train

SPIKE_STEP = 14  # the window of 8 is full from step 9 on
SPIKY = ["train.max_steps=16", "train.eval_every=0", "train.skip_spikes_sigma=3", "train.skip_spikes_window=8"]
# every step checkpointed, to compare the state before and after the spike
EVERY = ["train.save_every=1", "train.keep_checkpoints=20"]


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


def records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def same_tensors(a, b) -> bool:
    """Whether two nested states (dicts, lists, tensors, numbers) are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same_tensors, a, b))
    return a == b


def spiked_corpus(tmp: Path, global_batch: int = 4) -> Path:
    """`prepared_corpus` with the blocks that step SPIKE_STEP (seq_len 32, seed 0, `global_batch` blocks a step)
    trains on overwritten by uniformly random token ids: a batch of garbage, whose loss is far above the text's
    (its digest recorded in meta.json anew, or the loader would refuse the file as corrupted)."""
    data = prepared_corpus(tmp)
    loader = PackedLoader(data, "train", 32, global_batch, seed=0)
    blocks = loader.permutation(0)[(SPIKE_STEP - 1) * global_batch:SPIKE_STEP * global_batch]
    meta = read_meta(data / "meta.json")
    tokens = np.memmap(data / "train.bin", dtype=meta["dtype"], mode="r+")
    rng = np.random.default_rng(1)
    for block in blocks:
        tokens[block * 32:block * 32 + 33] = rng.integers(0, meta["vocab_size"], 33)
    tokens.flush()
    write_json(data / "meta.json", {**meta, "train_sha256": file_sha256(data / "train.bin")})
    return data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return spiked_corpus(tmp_path_factory.mktemp("spiked"))


@pytest.fixture(scope="module")
def spiky(data_dir, tmp_path_factory) -> Path:
    """The reference run: skips on, an average of the weights, every step checkpointed."""
    out = tmp_path_factory.mktemp("spiky") / "run"
    train(run_config(*SPIKY, *EVERY, "train.ema_decay=0.3"), out, data_dir=str(data_dir))
    return out


# the detector alone

def fill(detector: SpikeDetector, losses, grad_norms) -> list[dict]:
    return [detector.update(loss, norm) for loss, norm in zip(losses, grad_norms)]


def test_a_figure_spikes_above_mean_plus_sigma_population_std_of_a_full_window_only():
    rng = np.random.default_rng(0)
    losses, norms = rng.normal(3.0, 0.1, 6), rng.normal(1.0, 0.2, 6)
    detector = SpikeDetector(2.5, 6)
    assert fill(detector, [*losses[:5], 1e9], [*norms[:5], 1e9]) == [{}] * 6  # no window full before step 7
    # the windows now hold losses[:5] + 1e9: start again from a full window of the values drawn
    detector = SpikeDetector(2.5, 6, {"loss": list(losses), "grad_norm": list(norms)})
    # the lines of the population std (numpy's ddof 0), and halfway up to those of the sample std (ddof 1)
    loss_line, norm_line = (x.mean() + 2.5 * x.std() for x in (losses, norms))
    loss_up, norm_up = ((line + x.mean() + 2.5 * x.std(ddof=1)) / 2 for line, x in ((loss_line, losses),
                                                                                 (norm_line, norms)))
    below = 1 - 1e-12
    state = detector.state_dict()
    for loss, norm, spike in [(loss_line * below, norm_line * below, {}),
                              (loss_up, norm_line * below, {"spike": ["loss"]}),
                              (loss_line * below, norm_up, {"spike": ["grad_norm"]}),
                              (loss_up, norm_up, {"spike": ["loss", "grad_norm"]})]:
        detector = SpikeDetector(2.5, 6, state)
        assert detector.update(float(loss), float(norm)) == spike
        assert detector.state_dict() == {"loss": [*losses[1:], loss], "grad_norm": [*norms[1:], norm]}


@pytest.mark.parametrize("sigma, window, skipped", [(6.0, 128, 4), (3.0, 24, 3), (1.0, 11, 6)])
def test_a_lasting_step_up_is_skipped_until_a_fraction_1_over_1_plus_sigma_squared_of_the_window_holds_it(
        sigma, window, skipped):
    """A skipped step's figures enter the window: a level that moves up for good is admitted after
    window / (1 + sigma²) steps, rounded up, as ttl_core.spikes says (4 for OLMo's 6 and a window of 128), and never
    skipped again; a window that kept them out would skip every step after the rise."""
    detector = SpikeDetector(sigma, window)
    assert not any(fill(detector, [2.0] * window, [1.0] * window))
    after = fill(detector, [3.0] * 3 * window, [1.0] * 3 * window)
    assert after[:skipped] == [{"spike": ["loss"]}] * skipped and not any(after[skipped:])


def test_non_finite_figures_are_left_out_and_the_state_round_trips_through_json():
    rng = np.random.default_rng(2)
    losses, norms = list(rng.normal(3.0, 0.1, 40)), list(rng.normal(1.0, 0.2, 40))
    losses[20:23] = [5.0, 6.0, 4.5]  # spikes among them
    whole = SpikeDetector(2.0, 8)
    decisions = fill(whole, losses, norms)
    assert decisions[20] == {"spike": ["loss"]}
    part = SpikeDetector(2.0, 8)
    fill(part, losses[:21], norms[:21])
    state = part.state_dict()
    assert part.update(float("nan"), 1.0) == part.update(3.0, float("inf")) == {} and part.state_dict() == state
    resumed = SpikeDetector(2.0, 8, json.loads(json.dumps(state)))
    assert fill(resumed, losses[21:], norms[21:]) == decisions[21:] and resumed.state_dict() == whole.state_dict()
    narrower = SpikeDetector(2.0, 3, state)  # a resume with a smaller window keeps the newest values
    assert narrower.state_dict() == {"loss": losses[18:21], "grad_norm": norms[18:21]}


def reference_decisions(sigma: float, window: int, steps) -> list[dict]:
    """The documented rule written out in exact rational arithmetic: a finite figure spikes when the window of the
    last `window` finite steps (skipped ones included) is full and the figure lies more than sigma population standard
    deviations above its mean; a step with a NaN or infinite figure is left out altogether."""
    history: dict[str, list[Fraction]] = {"loss": [], "grad_norm": []}
    decisions = []
    for step in steps:
        figures = dict(zip(history, step))
        if not all(map(math.isfinite, figures.values())):
            decisions.append({})
            continue
        spikes = []
        for name, value in figures.items():
            past = history[name]
            mean = sum(past) / len(past) if past else 0
            rise = Fraction(value) - mean
            variance = sum((x - mean) ** 2 for x in past) / window
            if len(past) == window and rise > 0 and rise ** 2 > Fraction(sigma) ** 2 * variance:
                spikes.append(name)
            history[name] = [*past, Fraction(value)][-window:]
        decisions.append({"spike": spikes} if spikes else {})
    return decisions


def random_steps(rng: np.random.Generator, window: int) -> list[tuple[float, float]]:
    """Noisy figures with spikes, a lasting step up, NaN and infinite figures, or a constant window whose next values
    are equal to it or an ulp above it."""
    n, kind, level = int(rng.integers(window, 4 * window)), rng.integers(4), float(rng.lognormal(0, 3))
    if kind == 3:
        up = np.nextafter(level, np.inf)
        return [(float(rng.choice([level, up], p=[0.9, 0.1])), level) for _ in range(n)]
    losses, norms = rng.normal(level, level * 0.05, n), np.abs(rng.normal(1.0, 0.2, n))
    if kind == 0:
        losses[rng.random(n) < 0.1] *= rng.uniform(1, 5)
    elif kind == 1:
        losses[n // 2:] *= 3
    else:
        losses[rng.random(n) < 0.1], norms[rng.random(n) < 0.1] = np.nan, np.inf
    return [(float(loss), float(norm)) for loss, norm in zip(losses, norms)]


def test_the_detector_decides_as_an_exact_reference_of_the_documented_rule_and_resumes_from_json():
    """Random sequences, windows and sigmas (below 1 too): every decision is the exact rule's, constant windows
    included, whose float mean may round an ulp off their value (a value equal to all of them is no spike, one an ulp
    above is); the state, through JSON at a random step, resumes to the same decisions."""
    rng = np.random.default_rng(3)
    for _ in range(300):
        sigma, window = float(rng.uniform(0.05, 7)), int(rng.choice([2, 3, 5, 7, 10, 13, 24]))
        steps = random_steps(rng, window)
        expected = reference_decisions(sigma, window, steps)
        cut = int(rng.integers(len(steps)))
        detector = SpikeDetector(sigma, window)
        first = [detector.update(*step) for step in steps[:cut]]
        resumed = SpikeDetector(sigma, window, json.loads(json.dumps(detector.state_dict())))
        assert first + [resumed.update(*step) for step in steps[cut:]] == expected, (sigma, window, steps)


def test_a_value_equal_to_a_constant_window_is_not_skipped_and_one_an_ulp_above_is():
    rng = np.random.default_rng(4)
    for _ in range(2000):
        value, window, sigma = float(rng.lognormal(0, 3)), int(rng.integers(2, 200)), float(rng.uniform(0.01, 1))
        state = {"loss": [value] * window, "grad_norm": [1.0] * window}
        assert SpikeDetector(sigma, window, state).update(value, 1.0) == {}, (value, window, sigma)
        above = float(np.nextafter(value, np.inf))
        assert SpikeDetector(sigma, window, state).update(above, 1.0) == {"spike": ["loss"]}, (value, window, sigma)


def test_the_loss_judged_is_the_objective_the_update_follows_label_smoothed_with_its_z_loss():
    """The detector is given the loss the step's gradient is of: the label-smoothed cross-entropy plus the z-loss
    term (as the module docstring says), not the plain cross-entropy the step logs as its loss."""
    run = run_config("train.z_loss=0.01", "train.label_smoothing=0.1", "train.skip_spikes_sigma=3.0")
    model = random_model(run)
    gen = torch.Generator().manual_seed(11)
    micro = [{"input_ids": torch.randint(0, 400, (2, 16), generator=gen),
              "targets": torch.randint(0, 400, (2, 16), generator=gen)} for _ in range(2)]
    with torch.no_grad():
        logits = torch.cat([model(mb["input_ids"]).logits.flatten(0, 1) for mb in micro]).double()
    targets = torch.cat([mb["targets"].flatten() for mb in micro])
    objective = (torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.1)
                 + z_formula(logits, targets, 0.01).mean()).item()
    detector = SpikeDetector(run.train.skip_spikes_sigma, run.train.skip_spikes_window)
    loss, _, _ = train_step(model, torch.optim.SGD(model.parameters(), lr=1e-3), micro, run.train,
                            World(0, 1, torch.device("cpu")), 1e-3, None, spikes=detector)
    assert abs(loss - objective) > 1e-2  # the figure logged is another: the test tells the two apart
    assert abs(detector.history["loss"][-1] - objective) <= 1e-5


# tiny runs

def test_the_spike_step_is_skipped_leaving_weights_moments_and_average_as_they_were(spiky):
    """Step 14's random tokens: its loss, over 5 nats where the steps before it are near 4, is skipped; it logs the
    loss and grad_norm, the lr schedule goes on, and the checkpoints of steps 13 and 14 hold the same weights, AdamW
    state (moments and step count) and average, bit for bit; step 15 trains again."""
    logged = records(spiky)
    assert [(r["step"], r.get("skipped"), r.get("spike")) for r in logged if "skipped" in r] == \
        [(SPIKE_STEP, True, ["loss"])]
    spike = logged[SPIKE_STEP - 1]
    assert spike["loss"] > 5 > 4.5 > max(r["loss"] for r in logged[SPIKE_STEP - 4:SPIKE_STEP - 1])
    assert spike["grad_norm"] > 0 and spike["lr"] == lr_at(SPIKE_STEP, run_config(*SPIKY).train)
    before, at, after = (checkpoint(spiky, s) for s in (SPIKE_STEP - 1, SPIKE_STEP, SPIKE_STEP + 1))
    assert same_weights(before, at) and not same_weights(at, after)
    assert same_weights(before / "ema", at / "ema") and not same_weights(at / "ema", after / "ema")
    optimizer = [load_optimizer_file(c)["optimizer"]["state"] for c in (before, at, after)]
    assert same_tensors(optimizer[0], optimizer[1]) and not same_tensors(optimizer[1], optimizer[2])
    # the windows, as saved: the last 8 steps' figures, the skipped step's included
    windows = read_trainer_state(at)["spikes"]
    assert windows == {"loss": [r["loss"] for r in logged[SPIKE_STEP - 8:SPIKE_STEP]],
                       "grad_norm": [r["grad_norm"] for r in logged[SPIKE_STEP - 8:SPIKE_STEP]]}


def test_with_it_off_or_never_spiking_training_is_bit_identical_and_the_spike_is_trained_on(spiky, data_dir,
                                                                                          tmp_path):
    off, never = tmp_path / "off", tmp_path / "never"
    train(run_config(*SPIKY, *EVERY, "train.skip_spikes_sigma=0"), off, data_dir=str(data_dir))
    train(run_config(*SPIKY, "train.skip_spikes_sigma=1e6"), never, data_dir=str(data_dir))
    plain = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records(off)]
    assert plain == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records(never)]
    assert not any("skipped" in r for r in plain) and "spikes" not in read_trainer_state(checkpoint(off, 16))
    assert same_weights(checkpoint(off, 16), checkpoint(never, 16))
    assert not same_weights(checkpoint(off, SPIKE_STEP - 1), checkpoint(off, SPIKE_STEP))
    # the same steps up to the spike as the run that skips it, after it not
    assert [r["loss"] for r in plain[:SPIKE_STEP]] == [r["loss"] for r in records(spiky)[:SPIKE_STEP]]
    assert plain[SPIKE_STEP]["loss"] != records(spiky)[SPIKE_STEP]["loss"]


def test_a_resume_between_the_full_window_and_the_spike_skips_it_as_the_uninterrupted_run(spiky, data_dir,
                                                                                          tmp_path):
    """Stopped after step 10 and resumed: losses, grad norms and final weights bit for bit the uninterrupted run's.
    Resumed from a checkpoint saved without the windows, they start empty and are not full again by step 14, which is
    then trained on."""
    sliced, plain = tmp_path / "sliced", tmp_path / "plain"
    train(run_config(*SPIKY), sliced, data_dir=str(data_dir), stop_after=10)
    assert len(read_trainer_state(checkpoint(sliced, 10))["spikes"]["loss"]) == 8
    train(run_config(*SPIKY), sliced, data_dir=str(data_dir), resume=True)
    assert [(r["loss"], r["grad_norm"], r.get("spike")) for r in records(sliced)] == \
        [(r["loss"], r["grad_norm"], r.get("spike")) for r in records(spiky)]
    assert same_weights(checkpoint(sliced, 16), checkpoint(spiky, 16))
    train(run_config(*SPIKY, "train.skip_spikes_sigma=0"), plain, data_dir=str(data_dir), stop_after=10)
    train(run_config(*SPIKY), plain, data_dir=str(data_dir), resume=True)
    assert not any("skipped" in r for r in records(plain))
    assert len(read_trainer_state(checkpoint(plain, 16))["spikes"]["loss"]) == 6


@pytest.mark.parametrize("setting", ["muon", "float16"])
def test_muon_and_the_fp16_grad_scaler_s_own_skips_compose_with_it(data_dir, tmp_path, monkeypatch, setting):
    """Muon's momenta stay as they were over the skipped step, as AdamW's do. In float16 from a loss scale of 2**20
    the first steps overflow: the grad scaler skips those (grad_norm infinite, no spike, left out of the windows) and
    halves its scale; the spike step is skipped without a halving (its gradients are finite), and the next
    step's unscale works (the scaler's step was closed)."""
    if setting == "float16":
        monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**20))
    option = "train.optimizer=\"muon\"" if setting == "muon" else "train.dtype=\"float16\""
    out = tmp_path / "run"
    train(run_config(*SPIKY, *EVERY, option), out, data_dir=str(data_dir))
    logged = records(out)
    assert [r["step"] for r in logged if r.get("spike")] == [SPIKE_STEP]
    assert logged[SPIKE_STEP - 1]["skipped"] is True  # with a grad scaler too, whose own step it did not skip
    before, at = checkpoint(out, SPIKE_STEP - 1), checkpoint(out, SPIKE_STEP)
    assert same_weights(before, at) and len(logged) == 16
    assert same_tensors(*(load_optimizer_file(c)["optimizer"]["state"] for c in (before, at)))
    if setting == "float16":
        overflowed = [r["step"] for r in logged if r["skipped"] and not r.get("spike")]
        assert overflowed and all(r["grad_norm"] == float("inf") for r in logged if r["step"] in overflowed)
        assert len(read_trainer_state(at)["spikes"]["loss"]) == min(8, SPIKE_STEP - len(overflowed))
        scales = [r["loss_scale"] for r in logged]
        assert scales[SPIKE_STEP] == scales[SPIKE_STEP - 1]


def test_a_skipped_step_leaves_the_noise_scale_s_averages_as_they_were(data_dir, tmp_path):
    """The batch a spike is skipped for is not trained on, and its gradient is no sample of the data trained on
    either: the noise scale logs none of it and keeps its averages (they jumped at the spike and stayed there).
    micro-batches of 2 sequences, 2 a step: the same 4 blocks a step as the other runs here, garbage at the spike."""
    out = tmp_path / "run"
    train(run_config(*SPIKY, *EVERY, "train.micro_batch_size=2", "train.grad_accum_steps=2",
                     "train.log_noise_scale=true"), out, data_dir=str(data_dir))
    logged = {r["step"]: r for r in records(out)}
    assert logged[SPIKE_STEP].get("spike") and "noise_scale" not in logged[SPIKE_STEP]
    assert all("noise_scale" in logged[s] for s in (SPIKE_STEP - 1, SPIKE_STEP + 1))
    states = [read_trainer_state(checkpoint(out, s))["noise_scale"] for s in (SPIKE_STEP - 1, SPIKE_STEP)]
    assert states[0] == states[1]


WORKER = """
import json, os, sys
import ttl_core.train as t
from train_helpers import run_config

seen, step = [], t.train_step
def recording(*args, **kwargs):
    loss, grad_norm, figures = step(*args, **kwargs)
    seen.append([loss, grad_norm, figures.get("spike")])
    return loss, grad_norm, figures
t.train_step = recording
t.train(run_config(*sys.argv[3:]), sys.argv[1], data_dir=sys.argv[2])
open(f"{sys.argv[1]}.rank{os.environ['RANK']}.json", "w").write(json.dumps(seen))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_read_the_same_figures_and_skip_the_same_step(tmp_path, mode):
    """Each process reads the all-reduced loss and the global gradient norm (DDP: each process's norm of the
    all-reduced gradients; FSDP: its shards' norms all-reduced): the same numbers, bit for bit, so the same decisions
    (micro-batches of 2 on each of 2 processes: the global batch of 4 the spiked corpus has garbage for)."""
    data = spiked_corpus(tmp_path)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "run"
    done = run_torchrun(worker, out, data, *SPIKY, "train.micro_batch_size=2", f"train.distributed=\"{mode}\"",
                        env={"PYTHONPATH": f"{Path(__file__).parent.parent}:{Path(__file__).parent}"})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) == 16
    assert [step for step, (_, _, spike) in enumerate(ranks[0], start=1) if spike] == [SPIKE_STEP]
    assert [r.get("spike") for r in records(out)][SPIKE_STEP - 1] == ["loss"]


# spike skipping beside every option that changes training and can be combined in one process (sigma 0.5 over a
# window of 2 skips often), and those that only log (an average's evaluations, noise scale: steps of 3 micro-batches)
KITCHEN_SINK = ["train.max_steps=10", "train.eval_every=3", *EVERY, "train.micro_batch_size=2",
                "train.grad_accum_steps=3", "train.batch_ramp_steps=4", "train.z_loss=1e-4",
                "train.label_smoothing=0.1", "model.attention_dropout=0.1", "data.document_masking=true",
                "train.activation_checkpointing=true", "train.skip_spikes_sigma=0.5", "train.skip_spikes_window=2"]
LOGGING = ["train.ema_decay=0.5", "train.log_grad_norms=true", "train.log_activation_stats=true",
           "train.log_noise_scale=true"]


def test_with_every_option_a_run_resumes_bit_for_bit_and_trains_as_without_its_logging(tmp_path):
    """A data.mix, a data.eval set and a task beside it: stopped inside the batch ramp (step 2), at a skipped step that
    evaluates (6) and right after it (7), the run logs what the uninterrupted one logs and ends with its weights and
    average; without the logging-only options it trains to the same weights."""
    settings = [*prepare_held_out(tmp_path), *KITCHEN_SINK]
    train(run_config(*settings, *LOGGING), tmp_path / "whole")
    for stop in (2, 6, 7, None):
        torch.manual_seed(stop or 0)  # as in a new process
        train(run_config(*settings, *LOGGING), tmp_path / "sliced", stop_after=stop, resume=stop != 2)
    train(run_config(*settings), tmp_path / "quiet")
    whole, sliced = ([{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")}
                      for r in read_metrics(tmp_path / run / "metrics.jsonl")] for run in ("whole", "sliced"))
    assert whole == sliced
    skipped = [bool(r.get("skipped")) for r in records(tmp_path / "whole")]
    assert skipped[5] and not all(skipped) and run_config(*KITCHEN_SINK).train.grad_accum_at(2) < 3, skipped
    assert {"noise_scale", "grad_norm/embed", "spike"} <= {k for r in whole for k in r}
    assert {"eval_loss/ema/wiki", "acc/ema/escolhas_pt", "act_rms/layers.1"} <= {k for r in whole for k in r}
    assert losses(tmp_path / "quiet") == losses(tmp_path / "whole")
    final, resumed = checkpoint(tmp_path / "whole", 10), checkpoint(tmp_path / "sliced", 10)
    assert same_weights(final, resumed) and same_weights(final, checkpoint(tmp_path / "quiet", 10))
    assert same_weights(final / "ema", resumed / "ema")


@pytest.mark.parametrize("overrides, message", [
    (["train.skip_spikes_sigma=-1"], r"^train.skip_spikes_sigma must be a finite number >= 0 \(0: never skip\), "
                                     r"got -1.0$"),
    (["train.skip_spikes_sigma=nan"], r"^train.skip_spikes_sigma must be a finite number >= 0 .*got nan$"),
    (["train.skip_spikes_sigma=inf"], r"got inf$"),
    (["train.skip_spikes_window=1"], r"^train.skip_spikes_window must be >= 2 \(steps whose spread is measured\), "
                                     r"got 1$"),
    (["train.skip_spikes_window=8.0"], r"^train.skip_spikes_window must be an integer, got 8.0 \(a float in TOML"),
    (["train.skip_spikes_sigma=six"], r"^train.skip_spikes_sigma must be a number, got the string 'six'"),
    (["train.skip_spikes_sigma=true"], r"^train.skip_spikes_sigma must be a number, got True$"),
])
def test_bad_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_run_config(None, overrides)
    assert "\n" not in str(e.value)
