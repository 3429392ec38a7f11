"""A pretraining run's plan in numbers, before it starts (`scripts/pretrain.py --plan`): its parameters, tokens,
FLOPs, ideal time on the GPUs of MFU's peak table, the memory of its weights, gradients and optimizer state, the
epochs it makes over each data source and the cost of its evaluations. The training startup states the epochs
with `describe_epochs` and `repeat_warning`."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .choices import Task, forward_shapes
from .config import LlamaConfig
from .loader import PackedLoader
from .metrics import PEAK_BF16_TFLOPS, flops_per_token
from .mixture import MixtureLoader
from .model import LlamaForCausalLM
from .optim import projection_rows
from .run_config import TrainConfig, describe_batch

# compute-optimal training tokens per parameter, from Hoffmann et al. 2022, "Training Compute-Optimal Large Language
# Models" (Chinchilla): a reference point, not a target (small models are often trained on many more)
CHINCHILLA_TOKENS_PER_PARAMETER = 20
ASSUMED_MFU = 0.4
BYTES = ("TB", "GB", "MB", "KB")
FLOAT32_BYTES = 4  # parameters, gradients and optimizer state stay float32 whatever train.dtype (autocast)


@dataclass
class SourcePlan:
    """One training source: its train.bin, tokens, mixture weight (1 alone), and the epochs made over it by the
    steps planned and by the run's last step (a mixture's in expectation: its rows are drawn at random)."""

    name: str  # "" for a run on one data directory
    path: Path
    tokens: int
    weight: float
    epochs: float
    epochs_by_end: float


@dataclass
class RunPlan:
    """What the steps after `first_step` (a resumed checkpoint's step, else 0) up to `last_step` cost."""

    processes: int
    first_step: int
    last_step: int
    parameters: int
    non_embedding_parameters: int
    tokens: int  # over all processes
    flops_per_token: int  # as MFU counts them: 6N + 12·L·d·T
    memory: dict[str, int]  # bytes per process, by what they hold
    sources: list[SourcePlan]  # [] where the data is not prepared yet
    evaluations: int
    eval_sets: int  # the directories each evaluation scores
    eval_tokens: int  # at most, per evaluation, over every set and every process
    task_tokens: int | None  # per evaluation, that each process forwards to score every task; None: not encoded yet
    eval_flops: float  # per evaluation: its forwards (the tasks', the average's, train.log_activation_stats')

    @property
    def flops(self) -> float:
        return float(self.flops_per_token) * self.tokens

    def ideal_hours(self, peak_tflops: float, mfu: float) -> float:
        """Hours on `processes` GPUs of `peak_tflops` each, running at `mfu` of it."""
        return self.flops / (peak_tflops * 1e12 * mfu * self.processes) / 3600


def micro_batches(train: TrainConfig, first_step: int, last_step: int) -> int:
    """The micro-batches each process trains on over steps first_step + 1 to last_step (ramp-aware): one global
    batch of its loader each. Only the ramp's steps are summed one by one: a sum over every step would take minutes
    for a max_steps in the billions."""
    ramp_end = min(last_step, max(first_step, train.batch_ramp_steps - 1))  # the last step short of the whole batch
    ramped = sum(train.grad_accum_at(step) for step in range(first_step + 1, ramp_end + 1))
    return ramped + (last_step - ramp_end) * train.grad_accum_steps


def evaluations(train: TrainConfig, first_step: int, last_step: int) -> int:
    """The evaluations over steps first_step + 1 to last_step: at each multiple of eval_every, and after the run's
    last step (counted, not listed, for a max_steps in the billions)."""
    every = train.eval_every
    if not every:
        return 0
    final = first_step < train.max_steps <= last_step and train.max_steps % every != 0
    return last_step // every - first_step // every + final


def source_plans(loader: PackedLoader | MixtureLoader, train: TrainConfig, first_step: int,
                 last_step: int) -> list[SourcePlan]:
    """The epochs over each source the loader reads, from its epoch length (`batches_per_epoch`): a mixture's source
    serves its weight's share of each global batch, and cycles through its own epochs."""
    parts = (zip(loader.names, loader.sources, loader.mixture.weights.values()) if isinstance(loader, MixtureLoader)
             else [("", loader, 1.0)])
    planned, whole = micro_batches(train, first_step, last_step), micro_batches(train, 0, last_step)
    return [SourcePlan(name, source.path, len(source.tokens), weight, weight * planned / source.batches_per_epoch,
                       weight * whole / source.batches_per_epoch) for name, source, weight in parts]


def state_bytes(model: LlamaForCausalLM, train: TrainConfig, processes: int) -> dict[str, int]:
    """Bytes per process of the weights, gradients, optimizer state (AdamW: two moments; Muon: one momentum for each
    of its matrices) and the average of the weights (train.ema_decay); FSDP shards each over the processes, but
    holds the whole gradients while it accumulates micro-batches (it reduce-scatters them at a step's last one), and
    DDP all-reduces the gradients through buckets of their size (torch's default, gradient_as_bucket_view=False)."""
    parameters = model.num_parameters()
    muon = projection_rows(model) if train.optimizer == "muon" else {}
    in_muon = sum(p.numel() for p in model.parameters() if id(p) in muon)
    ddp = train.distributed == "ddp" and processes > 1
    counts = {"weights": parameters, "gradients": parameters, "DDP's gradient buckets": parameters if ddp else 0,
              "AdamW moments": 2 * (parameters - in_muon), "Muon momentum": in_muon,
              "the average (EMA)": parameters if train.ema_decay else 0}
    shards = processes if train.distributed == "fsdp" else 1
    sizes = {name: math.ceil(count * FLOAT32_BYTES / shards) for name, count in counts.items() if count}
    if shards > 1 and train.grad_accum_steps > 1:
        sizes["FSDP's whole gradients while accumulating"] = parameters * FLOAT32_BYTES
    return sizes


def make_plan(config: LlamaConfig, train: TrainConfig, processes: int, first_step: int, last_step: int,
              loader: PackedLoader | MixtureLoader | None, eval_sets: int, tasks: dict[str, Task] | None) -> RunPlan:
    """The plan of steps first_step + 1 to last_step on `processes` processes; `loader`: the training data's (None
    when it is not prepared yet), `eval_sets`: the directories each evaluation scores, `tasks`: train.eval_tasks'
    questions and their encoded choices (None when the data's tokenizer, which encodes them, is not prepared yet)."""
    with torch.device("meta"):  # the model's shapes, without its memory
        model = LlamaForCausalLM(config)
    non_embedding = model.num_parameters(exclude_embedding=True)
    per_token = flops_per_token(non_embedding, config.num_hidden_layers, config.hidden_size, train.seq_len)
    batch = train.micro_batch_size * train.seq_len * processes  # the tokens of a micro-batch on every process
    eval_tokens = eval_sets * train.eval_batches * batch
    # every process scores every question, in forwards padded to each batch's longest: a token of a forward of length
    # T costs what MFU counts for a token in a sequence of T, but for the LM head, which runs on the scored positions
    # alone (the continuations')
    shapes = [shape for _, pairs in (tasks or {}).values()
              for shape in forward_shapes(pairs, config.max_position_embeddings)]
    head = model.lm_head.weight.numel()
    task_flops = processes * sum(rows * length * flops_per_token(
        non_embedding - head, config.num_hidden_layers, config.hidden_size, length) + 6 * head * scored
        for rows, length, scored in shapes)
    # the average scores the same tokens and questions; train.log_activation_stats runs one more global batch. A
    # forward is a third of a training token's 6N + 12·L·d·T
    forward_flops = ((eval_tokens * per_token + task_flops) * (2 if train.ema_decay else 1)
                     + (batch * per_token if train.log_activation_stats else 0)) / 3
    return RunPlan(
        processes, first_step, last_step, model.num_parameters(), non_embedding,
        micro_batches(train, first_step, last_step) * batch, per_token, state_bytes(model, train, processes),
        source_plans(loader, train, first_step, last_step) if loader is not None else [],
        evaluations(train, first_step, last_step), eval_sets, eval_tokens,
        sum(rows * length for rows, length, _ in shapes) if tasks is not None else None, forward_flops)


def count(n: float, suffixes: tuple[str, ...] = ("T", "B", "M", "K")) -> str:
    """A large count in short: 3.5M, 1.2B (bytes with the suffixes ("TB", "GB", "MB", "KB"): 2.6GB)."""
    for size, suffix in zip((1e12, 1e9, 1e6, 1e3), suffixes):
        if float(f"{n / size:.3g}") >= 1:  # as shown: 999,600 is 1M, not 1e+03K
            return f"{n / size:.3g}{suffix}"
    return f"{n:.3g}"


def duration(hours: float) -> str:
    """Hours in the unit that reads best: 40 s, 12 min, 2.8 h, 3.5 days."""
    if hours * 3600 < 1:
        return "< 1 s"
    for unit, per_hour, up_to in (("s", 3600, 60), ("min", 60, 60), ("h", 1, 48)):
        if hours * per_hour < up_to:
            return f"{hours * per_hour:.2g} {unit}" if hours * per_hour < 10 else f"{hours * per_hour:.0f} {unit}"
    return f"{hours / 24:.3g} days"


def describe_epochs(sources: list[SourcePlan]) -> str:
    """The startup's line of the epochs the run makes over its data."""
    return "the run makes " + ", ".join(
        f"{s.epochs_by_end:.3g} epochs of {s.name or s.path} ({count(s.tokens)} tokens"
        f"{f', weight {s.weight:.3g}' if s.name else ''})" for s in sources)


def repeat_warning(sources: list[SourcePlan]) -> str | None:
    """A warning for the sources the run repeats (more than one epoch), None where it sees no token twice."""
    repeated = [s for s in sources if s.epochs_by_end > 1]
    if not repeated:
        return None
    epochs = ", ".join(f"{s.name or s.path} ({s.epochs_by_end:.3g} epochs)" for s in repeated)
    return f"the run repeats its data: it sees tokens of {epochs} more than once"


def announce_epochs(sources: list[SourcePlan]) -> None:
    """The training startup's line of the epochs, and a warning when the run repeats its data."""
    print(describe_epochs(sources))
    if warning := repeat_warning(sources):
        warnings.warn(warning)


def plural(n: int, word: str) -> str:
    """`n` and `word`, pluralized unless `n` is 1: "1 process", "2 processes", "3 GPUs"."""
    return f"{n:,} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def describe_source(source: SourcePlan, plan: RunPlan) -> str:
    """--plan's line of a training source: its tokens and the epochs over it (with those of the whole run's when
    resumed)."""
    name, weight = (f"{source.name}: ", f", weight {source.weight:.3g}") if source.name else ("", "")
    by_end = f", {source.epochs_by_end:.3g} by step {plan.last_step:,}" if plan.first_step else ""
    return (f"data: {name}{source.path}, {source.tokens:,} tokens{weight}: {source.epochs:.3g} epochs over these "
            f"steps{by_end}")


def describe_plan(plan: RunPlan, train: TrainConfig, mfu: float | None, missing_data: str = "",
                  missing_eval: str = "") -> list[str]:
    """The plan's lines, as --plan prints them; `missing_data`, `missing_eval`: why the training data or the
    evaluations are not planned, where they are not."""
    steps, resumed = plan.last_step - plan.first_step, f", resumed from step {plan.first_step:,}"
    hours = {gpu: plan.ideal_hours(peak, mfu or ASSUMED_MFU) for gpu, peak in PEAK_BF16_TFLOPS.items()}
    memory = " + ".join(f"{name} {count(size, BYTES)}" for name, size in plan.memory.items())
    sharded = ", sharded by FSDP" if train.distributed == "fsdp" else ""
    questions = (f"up to {train.eval_task_limit} questions of{' each of' if len(train.eval_tasks) > 1 else ''}"
                 if train.eval_task_limit else "all questions of")
    extra = "; ".join(words for on, words in ((train.ema_decay, "twice: the average too"), (
        train.log_activation_stats, "with train.log_activation_stats' forward of a batch")) if on)
    cost = (f"{plan.task_tokens:,} tokens on each process, in the FLOPs" if plan.task_tokens is not None else
            "not in the FLOPs: the data's tokenizer, not prepared yet, encodes them")
    tasks = f", and {questions} {plural(len(train.eval_tasks), 'task')} ({cost})" if train.eval_tasks else ""
    lines = [
        f"steps {plan.first_step + 1:,}-{plan.last_step:,} ({plural(steps, 'optimizer step')}) on "
        f"{plural(plan.processes, 'process')}{resumed if plan.first_step else ''}",
        f"parameters: {plan.parameters:,} ({plan.non_embedding_parameters:,} without the input embedding, as MFU "
        f"counts them)",
        f"batch: {describe_batch(train, plan.processes)}",
        f"training tokens: {plan.tokens:,} ({count(plan.tokens)}), {plan.tokens / plan.parameters:.3g} per parameter "
        f"(compute-optimal is about {CHINCHILLA_TOKENS_PER_PARAMETER}: Hoffmann et al. 2022, Chinchilla)",
        f"model FLOPs: {plan.flops_per_token:.3g} per token (6N + 12·L·d·T, as MFU), {plan.flops:.3g} in all",
        f"ideal time at {mfu or ASSUMED_MFU:.0%} MFU ({'given' if mfu else 'an assumption; --plan-mfu sets it'}) on "
        f"{plural(plan.processes, 'GPU')}: {', '.join(f'{gpu} {duration(h)}' for gpu, h in hours.items())}"
        f"{' (bf16 peaks; train.dtype is float32)' if train.dtype == 'float32' else ''}",
        f"memory per process: {memory} = {count(sum(plan.memory.values()), BYTES)} (float32{sharded}; activations "
        f"not counted)",
        *([f"data: not planned: {missing_data}"] if missing_data else []),
        *(describe_source(source, plan) for source in plan.sources),
        f"eval: not planned: {missing_eval}" if missing_eval else
        f"eval: {plural(plan.evaluations, 'evaluation')}{', each' if plan.evaluations > 1 else ''} of at most "
        f"{plan.eval_tokens:,} tokens "
        f"({train.eval_batches} batches of {plural(plan.eval_sets, 'set')}), {plan.eval_flops:.3g} FLOPs"
        f"{f' ({extra})' if extra else ''}{tasks}" if plan.evaluations else "eval: none",
    ]
    warning = repeat_warning(plan.sources)
    return lines + ([f"warning: {warning}"] if warning else [])
