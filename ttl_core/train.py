"""From-scratch pretraining (and continued pretraining) of a causal Llama on a prepared token directory.

The loop is a handful of small functions with explicit inputs: what the run settles and checks before it reads any
weights in `ttl_core.run_setup` (shared with its plan), `train_step` and `evaluate` in `ttl_core.step`, the optimizer
pieces in `ttl_core.optim`, checkpointing in `ttl_core.checkpoint`, process groups in `ttl_core.distributed`. `train()`
wires them together. Resuming restores weights, optimizer, RNG and data position, so a resumed run reproduces an
uninterrupted one bit for bit on the CPU.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .activation_stats import eval_activation_stats
from .checkpoint import (check_optimizer_file, latest_checkpoint, load_optimizer_file, lock_run_dir,
                         point_to_older_checkpoint, save_checkpoint, set_rank_rng_state, verify_digests)
from .choices import task_figures
from .config import RUNTIME_FIELDS, LlamaConfig
from .distributed import (World, all_reduce_sum, barrier, close_world, full_model_state, full_optimizer_state,
                          full_parameters, full_rng_states, init_world, load_optimizer_state, on_rank_0, unwrap,
                          wrap_model)
from .ema import WeightEMA, start_ema
from .errors import ConfigError, TrainingError, TTLError
from .generate import generate
from .hf import load_pretrained
from .metrics import MetricsLog, flops_per_token, peak_tflops, plot_metrics, step_throughput
from .mixture import eval_figures
from .model import LlamaForCausalLM
from .noise_scale import start_noise_scale
from .optim import build_optimizer, lr_at
from .plan import announce_epochs, source_plans
from .preemption import StopOnSignal, TimeLimit
from .profiling import StepProfiler
from .recorded_config import resumed_model_settings
from .run_config import RunConfig, TrainConfig, describe_batch
from .run_setup import DROPOUT_FIELDS, RunSetup, set_up_run
from .spikes import spike_detector
from .step import autocast, evaluate, model_inputs, train_step
from .tokenizer import Tokenizer


def set_tf32(device: torch.device, enabled: bool) -> None:
    """`train.tf32` on a CUDA device: float32 matmuls (and convolutions) round their inputs to TF32's 10-bit
    mantissa on tensor cores, or stay full float32. Process-wide, as torch's flags are; other devices have no TF32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def build_or_load_model(config: LlamaConfig, seed: int, resume_from: Path | None, init_from: str | None,
                        device: torch.device) -> LlamaForCausalLM:
    """Weights from the checkpoint being resumed, else from `--init-from`, else freshly initialized from `seed`,
    for the config `planned_model_config` gave. Parameters are float32 (autocast does the low-precision math)."""
    source = resume_from or init_from
    torch.manual_seed(seed)  # fresh weights, and dropout after --init-from (resume restores its RNG)
    if source is None:
        return LlamaForCausalLM(config).to(device).train()
    # the stored architecture, with the planned runtime and dropout fields on top
    overrides = {key: getattr(config, key) for key in (*RUNTIME_FIELDS, *DROPOUT_FIELDS)}
    return load_pretrained(source, dtype=torch.float32, device=device, **overrides).train()


def sample_text(checkpoint: Path, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, seed: int) -> str:
    """A continuation of `prompt` by the saved model, with TeenyTinyLlama's suggested sampling settings (and its
    generation_config.json's stop_strings, if any)."""
    model = load_pretrained(checkpoint, dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode(prompt, add_eos=False)])
    max_new_tokens = min(max_new_tokens, model.config.max_position_embeddings - ids.shape[1])
    # an all-ones mask: a padding id in the one-row prompt (a "<pad>" in its text) is a token, not padding
    out = generate(model, ids, torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=True, temperature=0.2,
                   top_k=20, top_p=0.2, repetition_penalty=1.2, eos_token_id=tokenizer.eos_id,
                   pad_token_id=tokenizer.pad_id if tokenizer.pad_id >= 0 else None, seed=seed, tokenizer=tokenizer,
                   return_dict_in_generate=False)  # a tensor, whatever an --init-from generation_config.json says
    return tokenizer.decode(out[0].tolist())


def recorded_run_config(run: RunConfig, setup: RunSetup, out_dir: Path) -> dict[str, Any]:
    """What checkpoints record of the run: its config with the data it trains on (given by --data too, but not
    RUN/data by path: that moves with the run, and a resume without --data finds it there) and, when resumed, the
    model settings the resumed run recorded."""
    recorded = run.to_dict()
    mixture, data_path = setup.mixture, setup.data_path
    recorded["data"]["path"] = "" if mixture or data_path == out_dir / "data" else str(data_path.resolve())
    recorded["data"]["mix"] = mixture.sources if mixture else {}
    recorded["data"]["eval"] = {name: str(path) for name, path in setup.eval_sets.items()}
    if setup.trainer_state is not None:
        recorded["model"] = resumed_model_settings(run, setup.saved_run)
    return recorded


def mfu_peak(device: torch.device, dtype: str) -> float | None:
    """The device's peak TFLOP/s that MFU is measured against, or None (no MFU logged). The peaks are half-precision
    tensor-core rates: a float32 run gets no MFU rather than a flattering one."""
    if device.type != "cuda" or dtype not in ("bfloat16", "float16"):
        return None
    return peak_tflops(torch.cuda.get_device_name(device))


def run_evaluation(model: torch.nn.Module, ema: WeightEMA | None, run: RunConfig, setup: RunSetup,
                   world: World) -> dict[str, float]:
    """The figures of one evaluation (every rank calls it): the eval losses of `setup.evaluated` and the scores of
    train.eval_tasks, with train.log_activation_stats' statistics of one more val batch, and with an `ema` the same
    figures of the averaged weights, on the same batches and questions (`ttl_core.ema`)."""
    train, tokenizer = run.train, setup.tokenizer

    def record(weights: torch.nn.Module) -> dict[str, float]:
        # the losses first: FSDP sets a model up in its root's first forward, which scoring through its submodules
        # skips (the average's first evaluation). Every rank scores every question (in eval mode: no dropout, no RNG
        # drawn), so that FSDP's gathers run alike on all
        losses = {name: evaluate(weights, path, run, world, tokenizer.bos_id) for name, path in setup.evaluated.items()}
        with autocast(world.device, train.dtype), full_parameters(weights) as whole:
            return {**eval_figures(losses, setup.mixture), **task_figures(whole, setup.tasks)}

    figures = record(model)
    if train.log_activation_stats:  # one more forward, hooked, of the first val batch
        figures |= eval_activation_stats(model, setup.data_path, run, world, tokenizer.bos_id)
    if ema:
        figures |= ema.evaluate(record)
    return figures


def leaves_room(time_limit: TimeLimit | None, steps: int, what: str, remedy: str) -> bool:
    """Whether the time limit (if any) still holds `steps` steps and a save; if not, says that `what` is skipped."""
    if time_limit is None or time_limit.leaves(time_limit.margin(steps)):
        return True
    print(f"{what}: the time limit leaves no room for it ({remedy})")
    return False


def finish_run(out_dir: Path, world: World, train: TrainConfig, step: int, saved_at: Path | None,
               tokenizer: Tokenizer, time_limit: TimeLimit | None) -> str | None:
    """After the last step: draw loss.png, and when the run reached max_steps and saved, sample the final model
    (both on rank 0); returns the sample, if any. What follows the last step is in no margin and its time is unknown
    before it runs: loss.png is drawn where the time limit still holds a step and a save, the sample where it holds
    a step per token (a forward each, no slower than a step) and a save (loading the checkpoint reads what a save
    wrote and read back)."""
    sample = None
    try:
        if world.is_main and leaves_room(time_limit, 1, "loss.png not drawn", "scripts/plot_metrics.py RUN draws it"):
            plot_metrics(out_dir)
        if (world.is_main and step == train.max_steps and saved_at is not None and train.sample_tokens > 0
                and leaves_room(time_limit, train.sample_tokens, "no sample generation",
                                "scripts/generate.py samples the checkpoint")):
            sample = sample_text(saved_at, tokenizer, train.sample_prompt, train.sample_tokens, train.seed)
    finally:
        # the other ranks wait for rank 0 (even when it fails) before anyone tears the group down: a rank
        # that destroyed its gloo group meanwhile was seen to abort ("terminate called without an active
        # exception")
        barrier(world)
    return sample


@dataclass
class RunResult:
    """What `train` returns: the last step trained, its loss, the newest checkpoint it saved (rank 0 only), the
    end-of-run sample (when the run reached `max_steps`, `sample_tokens` > 0 and the time limit left it room) and
    the signal that stopped the run early, or `ttl_core.preemption.TIME_LIMIT`, if one did."""

    last_step: int
    last_loss: float | None
    checkpoint: Path | None
    sample: str | None
    stopped_by: signal.Signals | str | None = None


def train(run: RunConfig, out_dir: str | Path, data_dir: str | None = None, device: str = "cpu",
          resume: bool = False, stop_after: int | None = None, init_from: str | None = None,
          time_limit: float | None = None) -> RunResult:
    """Train `run` into `out_dir`: metrics.jsonl, checkpoints/step-N (HF format + tokenizer + trainer
    state), loss.png, and a sample generation from the final model. Evaluation on val.bin runs every
    `train.eval_every` steps and after the last (never with 0). `resume` continues from the newest complete
    checkpoint (a damaged one is a CheckpointError naming the older one to resume from; there is no silent
    fallback); `stop_after` ends cleanly (with a checkpoint) after that step, and so does SIGTERM, SIGUSR1 or
    SIGINT after the step in progress (`RunResult.stopped_by`; see ttl_core.preemption), and so does `time_limit`
    (seconds of wall clock from this call) before the next step and a checkpoint would pass it; resuming a run at
    `max_steps` trains nothing and returns that step, without a loss or checkpoint. A second run on `out_dir`
    while this one runs is refused; a run refused before its first step leaves no directory it made."""
    limit = TimeLimit(time_limit) if time_limit is not None else None  # the clock starts here: setup counts
    out_dir = Path(out_dir)
    made = next((p for p in reversed([out_dir, *out_dir.parents]) if not p.exists()), None)  # the top one new
    world = init_world(device)
    try:
        # rank 0 makes the run dir and takes its lock; every rank stops if it cannot, or if the lock is taken
        with contextlib.ExitStack() as lock:
            held = on_rank_0(world, lambda: lock.enter_context(lock_run_dir(out_dir)))
            if all_reduce_sum(torch.tensor([float(held is False)], device=world.reduce_device), world).item():
                raise ConfigError(f"{out_dir} is in use by another training run; wait for it to end or choose "
                                  "another --out")
            try:
                return _train(run, out_dir, data_dir, world, resume, stop_after, init_from, limit)
            except TTLError:
                # a run refused before its first step was logged (metrics.jsonl absent or empty: a refusal may
                # come from step 1's forward) leaves no trace: the directories made for it go again, the sample
                # corpus prepared into RUN/data with them
                metrics = out_dir / "metrics.jsonl"
                if made is not None and world.is_main and not (metrics.exists() and metrics.stat().st_size):
                    shutil.rmtree(made, ignore_errors=True)
                raise
    finally:
        close_world(world)


def _train(run: RunConfig, out_dir: Path, data_dir: str | None, world: World, resume: bool,
           stop_after: int | None, init_from: str | None, time_limit: TimeLimit | None) -> RunResult:
    train = run.train
    setup = set_up_run(run, out_dir, data_dir, resume, stop_after, init_from, world)  # every refusal before weights
    resume_from, trainer_state, step = setup.resume_from, setup.trainer_state, setup.first_step
    if setup.last_step is None:
        if world.is_main:
            print(setup.complete_message)
        return RunResult(step, None, None, None)
    config, last_step, tokenizer, loader = setup.config, setup.last_step, setup.tokenizer, setup.loader
    set_tf32(world.device, train.tf32)
    recorded_config = recorded_run_config(run, setup, out_dir)

    # every file of the checkpoint resumed is read here, where a damaged one is named with the older one to take
    with point_to_older_checkpoint(out_dir, resume_from):
        resumed_state = load_optimizer_file(resume_from) if resume_from is not None else None  # optimizer, RNG
        model = build_or_load_model(config, train.seed, resume_from, init_from, world.device)
        if resume_from is not None:  # every file read in structure; now every byte, against the digests saved
            verify_digests(resume_from, trainer_state)
            check_optimizer_file(resume_from, resumed_state, model)
        ema = start_ema(model, train.ema_decay, resume_from, world)  # None without it; a lost ema/ is named above

    flops = flops_per_token(model.num_parameters(exclude_embedding=True), config.num_hidden_layers,
                            config.hidden_size, train.seq_len)
    peak = mfu_peak(world.device, train.dtype)
    if train.activation_checkpointing:
        model.activation_checkpointing_enable()
    model = wrap_model(model, train.distributed, world, autocast(world.device, train.dtype))
    if ema:
        ema.attach(model, train.distributed, world)
    if train.compile:
        for block in unwrap(model).backbone.layers:
            block.compile()
    optimizer = build_optimizer(model, train, world.device, world)
    scaler = torch.amp.GradScaler(world.device.type) if train.dtype == "float16" else None

    if resumed_state is not None:
        load_optimizer_state(model, optimizer, resumed_state["optimizer"])
        if scaler is not None and "scaler" in resumed_state:
            scaler.load_state_dict(resumed_state["scaler"])
        if world.is_main:
            print(f"resumed from {resume_from} at step {step}")
    set_rank_rng_state(resumed_state["rng"] if resumed_state else None, train.seed, world)  # each rank its own dropout

    log = MetricsLog(out_dir, resume_step=step, tensorboard=train.tensorboard) if world.is_main else None
    if world.is_main:
        print(f"{unwrap(model).num_parameters():,} parameters; {describe_batch(train, world.size)}")
        announce_epochs(source_plans(loader, train, 0, train.max_steps))  # the whole run's, resumed or not
    profiler = StepProfiler(train.profile_steps, out_dir, world, resumed_at=step)  # its warning before the bar
    progress = tqdm(total=train.max_steps, initial=step, disable=not world.is_main, dynamic_ncols=True)
    saved_at: Path | None = None
    # the noise scale's averages go on from the checkpoint's (afresh from one saved without them)
    noise = start_noise_scale(model, train, (trainer_state or {}).get("noise_scale"), step)
    spikes = spike_detector(train, trainer_state)  # its windows go on from the checkpoint's (afresh without them)
    loss = stopped_by = None

    def save(at_step: int) -> Path | None:
        with stop.saving():  # timed: the time limit's margin
            model_state, optimizer_state = full_model_state(model), full_optimizer_state(model, optimizer)
            rng_states, ema_state = full_rng_states(world), ema.full_state() if ema else None
            noise_state = {"noise_scale": noise.state_dict()} if noise else {}
            spike_state = {"spikes": spikes.state_dict()} if spikes else {}
            return on_rank_0(world, lambda: save_checkpoint(
                out_dir, at_step, unwrap(model), model_state, optimizer_state,
                {"data": loader.state_dict(), "config": recorded_config, **noise_state, **spike_state}, tokenizer,
                keep=train.keep_checkpoints, scaler_state=scaler.state_dict() if scaler else None,
                rng_states=rng_states, ema_state=ema_state))

    # SIGTERM, SIGUSR1, Ctrl-C or the time limit: checkpoint the step in progress and return
    stop = StopOnSignal(world, time_limit, unwrap(model).num_parameters())
    try:
        while step < last_step:
            step += 1
            start = time.perf_counter()
            with profiler.step(step):  # a step of train.profile_steps' window: traced
                micro_batches = [model_inputs(next(loader), world.device, run.data.document_masking, tokenizer.bos_id)
                                 for _ in range(train.grad_accum_at(step))]
                try:
                    loss, grad_norm, figures = train_step(model, optimizer, micro_batches, train, world,
                                                          lr_at(step, train), scaler, noise, spikes)
                except TrainingError as e:
                    good = latest_checkpoint(out_dir)
                    raise TrainingError(f"step {step}: {e}; stopping. Last good checkpoint: "
                                        f"{good or 'none (no checkpoint was saved yet)'}") from None
                if ema and not figures.get("skipped"):  # a step skipped (fp16 overflow, a spike) changed no weight
                    ema.update(step)
            elapsed = time.perf_counter() - start
            tokens_per_s, mfu = step_throughput(train.tokens_at(step), world.size, elapsed, flops, peak)
            if log:
                log.log({"step": step, "loss": loss, "lr": lr_at(step, train), "grad_norm": grad_norm,
                         "tokens_per_s": tokens_per_s, "mfu": mfu, "batch_tokens": train.tokens_at(step) * world.size,
                         **figures})
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            if train.eval_every and (step % train.eval_every == 0 or step == train.max_steps):
                evals = run_evaluation(model, ema, run, setup, world)  # every rank evaluates; rank 0 logs
                if log:
                    log.log({"step": step, **evals})
                    progress.write(f"step {step}: eval loss {evals['eval_loss']:.4f}, "
                                   f"perplexity {evals['eval_ppl']:.1f}")
            # a step due for a checkpoint saves before the stop is agreed, so that the time limit, asked there,
            # has only the next step and its checkpoint left to fit
            if due := step % train.save_every == 0 or step == last_step:
                saved_at = save(step)
            stopped_by = stop.agreed() if step < last_step else None  # at the last step the run ends anyway
            if stopped_by and not due:
                saved_at = save(step)
            if stopped_by:
                break
    finally:
        stop.restore()
        progress.close()
        if log:
            log.close()
        profiler.close()  # a run stopped inside the window writes the steps of it that it trained

    if stopped_by and world.is_main:
        cause = getattr(stopped_by, "name", stopped_by)  # a signal's name, or TIME_LIMIT's words
        print(f"stopped on {cause} at step {step}, saved in {saved_at}; continue with --resume")
    sample = finish_run(out_dir, world, train, step, saved_at, tokenizer, time_limit)
    return RunResult(step, loss, saved_at, sample, stopped_by)
