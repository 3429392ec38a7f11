"""What a pretraining run settles and checks before it reads any weights: the checkpoint it resumes and the step it
stops at, the model's config, its data, evaluations and tokenizer. `set_up_run` is the one place for all of it, called
by training (`ttl_core.train`) and by its plan (`scripts/pretrain.py --plan`), so that a plan refuses what the run
would refuse: a check added here is both's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .checkpoint import latest_checkpoint, point_to_older_checkpoint, read_trainer_state, remove_partial_checkpoints
from .choices import Task, read_task_questions, read_tasks
from .config import RUNTIME_FIELDS, LlamaConfig
from .data import SAMPLE_CORPUS, prepare_data
from .distributed import World, on_rank_0
from .ema import check_average_names
from .errors import ConfigError, DataNotReady, TokenizerError
from .hf import read_loaded_config
from .loader import PackedLoader
from .mixture import (Mixture, MixtureLoader, check_eval_splits, evaluated_dirs, resolve_eval_sets, resolve_mixture,
                      train_loader)
from .noise_scale import validate_noise_scale
from .recorded_config import check_resumable, recorded_data_path
from .run_config import RunConfig, TrainConfig, check_run_fits_model
from .tokenizer import Tokenizer, check_same_tokenizer

# [model] fields that change how a model trains, not what it is: an --init-from run may set them (see
# planned_model_config)
DROPOUT_FIELDS = ("attention_dropout",)


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend builds its kernels with, looked up as inductor does ($CXX,
    else g++), or None when it is not installed."""
    return shutil.which(os.environ.get("CXX", "g++"))


def check_compiler(device: torch.device, train: TrainConfig) -> None:
    """Refuse `train.compile` on the CPU without a C++ compiler, which would fail at the first step in a long
    traceback (a CUDA run compiles Triton kernels instead; inductor can also fetch g++ itself when asked to)."""
    if (train.compile and device.type == "cpu" and cpp_compiler() is None
            and not os.environ.get("TORCH_INDUCTOR_INSTALL_GXX")):
        raise ConfigError(f"train.compile on the CPU needs a C++ compiler, and {os.environ.get('CXX', 'g++')} "
                          f"(named by $CXX, else g++) is not installed: install one, point $CXX at it, or set "
                          f"train.compile=false")


def resolve_data(run: RunConfig, data_dir: str | None, out_dir: Path | None, world: World, vocab_size: int,
                 recorded: tuple[Path, str] | None, announce: bool, planning: bool) -> Path:
    """The prepared data directory: given, named in the config, the one the run resumed trained on (`recorded`:
    its checkpoint and that directory; `announce` says it is taken), or the bundled sample corpus prepared into
    RUN/data on first use (not by a plan, which prepares nothing: to it that is data not prepared yet)."""
    chosen = data_dir or run.data.path
    if not chosen and recorded is not None:
        checkpoint, chosen = recorded
        if not Path(chosen).exists():
            raise ConfigError(f"{checkpoint} was trained on {chosen}, which no longer exists; give the run's data "
                              "with --data")
        if announce:
            print(f"resuming on the data the run was trained on, {chosen} (give --data for other data)")
    if chosen:
        path = Path(chosen)
        if not (path / "meta.json").exists():
            raise DataNotReady(f"{path} is not a prepared data directory (no meta.json); run scripts/prepare_data.py")
        return path
    path = (out_dir or Path("RUN")) / "data"  # a plan may have no --out
    if planning:
        if out_dir is None or not (path / "meta.json").exists():
            raise DataNotReady(f"the bundled sample corpus is prepared into {path} when the run starts")
        return path

    def prepare() -> None:
        if not (path / "meta.json").exists():
            print(f"preparing the bundled sample corpus into {path}")
            try:
                prepare_data(SAMPLE_CORPUS, path, vocab_size=vocab_size, val_fraction=0.15)  # small: hold out more
            except TokenizerError as e:  # the default config's 32,000 tokens, say: the corpus is about 80 KB
                raise ConfigError(f"{e}; that is the bundled sample corpus, used without --data: set a "
                                  "model.vocab_size it allows (configs/tiny.toml has 1024) or give --data") from None
    on_rank_0(world, prepare)
    return path


def planned_model_config(run: RunConfig, resume_from: Path | None, init_from: str | None) -> LlamaConfig:
    """The config of the model the run will train, read without the weights (a tied head's two tensors aside:
    `read_loaded_config`): the checkpoint's (resumed or `--init-from`; with the run's runtime fields, and an
    `--init-from` run's `--set` dropout), else the run's [model]. A checkpoint fixes the architecture: a `--set` that
    contradicts it is refused, not ignored."""
    config = run.model_config()
    source = resume_from or init_from
    if source is None:
        return config
    stored, architecture = read_loaded_config(source)
    if architecture != "LlamaForCausalLM":
        raise ConfigError(f"{source} holds a {architecture}; pretraining needs a LlamaForCausalLM")
    runtime = {key: getattr(config, key) for key in RUNTIME_FIELDS}
    for key in run.model_overrides:
        if key == "preset" or key in runtime or getattr(stored, key) == getattr(config, key):
            continue
        if key not in DROPOUT_FIELDS:
            raise ConfigError(f"--set model.{key}={run.model[key]!r} contradicts {source}, whose {key} is "
                              f"{getattr(stored, key)!r}; the architecture comes from the checkpoint")
        if resume_from:  # dropout changes what the resumed steps compute
            raise ConfigError(f"--set model.{key}={run.model[key]!r}: {source} was trained with {key} "
                              f"{getattr(stored, key)!r}, and a resumed run continues as it was; to train on "
                              f"with another {key}, start a new run with --init-from {source}")
    # --set dropout applies to an --init-from model (its checkpoints record it in config.json); a resumed run keeps
    # the dropout it was trained with, so that it stays exact
    dropout = {} if resume_from else {key: getattr(config, key) for key in run.model_overrides if key in DROPOUT_FIELDS}
    return stored.replace(**runtime, **dropout)


def checkpoint_to_resume(out_dir: Path, resume: bool) -> Path | None:
    """With `resume`, the newest complete checkpoint in `out_dir` (None: none yet, the run starts at step 0); without
    it, a directory that holds checkpoints is refused rather than trained into afresh."""
    newest = latest_checkpoint(out_dir)
    if newest is not None and not resume:
        raise ConfigError(f"{out_dir} already holds checkpoints; pass --resume to continue or choose another --out")
    return newest


def planned_last_step(train: TrainConfig, step: int, stop_after: int | None, resume_from: Path | None) -> int | None:
    """The last step a run at `step` (`resume_from`'s, else 0) trains: train.max_steps, or `stop_after` before it;
    None for a run already at max_steps (a finished run requeued, whatever slice --stop-after asks: done, not
    refused). A --stop-after below 1 or at most `step` is refused."""
    if stop_after is not None and stop_after < 1:
        raise ConfigError(f"--stop-after must be a step >= 1, got {stop_after}")
    last_step = min(train.max_steps, stop_after) if stop_after is not None else train.max_steps
    if step == train.max_steps:
        return None
    if step >= last_step:
        which = "train.max_steps" if last_step == train.max_steps else "--stop-after"
        raise ConfigError(f"{resume_from} is at step {step}, and {which} is {last_step}: nothing to train; "
                          f"raise {'--max-steps' if which == 'train.max_steps' else which} to continue")
    return last_step


@dataclass
class RunSetup:
    """What `set_up_run` settled. A run at train.max_steps already (`last_step` None) has nothing past its steps set
    up; nor has a plan past data not prepared yet, which `missing` names ("data": the training data, "eval": the
    evaluations'): its `data_path`, `tokenizer`, `loader` or `tasks` may be None where a run's never are."""

    resume_from: Path | None
    trainer_state: dict[str, Any] | None
    saved_run: dict[str, Any] | None  # the config the resumed run recorded
    config: LlamaConfig
    first_step: int  # the resumed checkpoint's step, else 0
    last_step: int | None
    mixture: Mixture | None = None  # None: one data directory
    data_path: Path | None = None  # a mixture's first source
    eval_sets: dict[str, Path] = field(default_factory=dict)
    evaluated: dict[str, Path] = field(default_factory=dict)
    tokenizer: Tokenizer | None = None
    loader: PackedLoader | MixtureLoader | None = None
    tasks: dict[str, Task] | None = None
    missing: dict[str, str] = field(default_factory=dict)

    @property
    def complete_message(self) -> str:
        """What a run at train.max_steps already says (its last_step is None): nothing is left to train."""
        return f"{self.resume_from} is at train.max_steps (step {self.first_step}): the run is complete"


@contextlib.contextmanager
def named_when_planning(planning: bool, missing: dict[str, str], part: str) -> Iterator[None]:
    """Data not prepared yet (DataNotReady) stops a run; a plan names it as `missing[part]` and goes on."""
    try:
        yield
    except DataNotReady as e:
        if not planning:
            raise
        missing[part] = str(e)


def set_up_run(run: RunConfig, out_dir: Path | None, data_dir: str | None, resume: bool, stop_after: int | None,
               init_from: str | None, world: World, planning: bool = False) -> RunSetup:
    """Settle and check what the run needs before any weights are read, in the order the run refuses it: the
    checkpoint to resume (its JSON files: a refused resume reads no weights) and the model config, the steps, the
    data (mixture, directory, eval sets), the tokenizer, the training loader (at the resumed position) and the
    `train.eval_tasks` questions, encoded. Training and `scripts/pretrain.py --plan` both call it, so that a plan
    refuses exactly what the run would. `planning` writes and prints nothing (no partial checkpoint removed, no
    sample corpus prepared, nothing announced), takes `world` as the processes planned (no process group) and
    `out_dir` as optional, and names data not prepared yet in `RunSetup.missing` rather than refusing it: the rest
    is set up without it (task files are then read, not encoded: the data's tokenizer encodes them)."""
    train = run.train
    check_compiler(world.device, train)
    validate_noise_scale(train, world.size)  # one process with one micro-batch per step has no small batch
    announce = world.is_main and not planning
    # out_dir is rank 0's to make (lock_run_dir): a slower rank making it too could bring back a refused run's dir
    if world.is_main and not planning:
        remove_partial_checkpoints(out_dir)
    resume_from = checkpoint_to_resume(out_dir, resume) if out_dir is not None else None
    if resume and resume_from is None and announce:
        print(f"no complete checkpoint in {out_dir}; starting from step 0")

    # what the checkpoint's JSON files tell is checked first: a refused resume reads no weights
    with point_to_older_checkpoint(out_dir, resume_from):
        trainer_state = read_trainer_state(resume_from) if resume_from is not None else None
        config = planned_model_config(run, resume_from, init_from)
    saved_run = trainer_state.get("config") if trainer_state is not None else None
    if trainer_state is not None:
        check_resumable(run, saved_run, resume_from)
    step = trainer_state["step"] if trainer_state is not None else 0
    setup = RunSetup(resume_from, trainer_state, saved_run, config, step,
                     planned_last_step(train, step, stop_after, resume_from))
    if setup.last_step is None:
        return setup

    with named_when_planning(planning, setup.missing, "data"):
        setup.mixture = resolve_mixture(run, data_dir, saved_run, resume_from, announce)
        recorded = recorded_data_path(saved_run)
        setup.data_path = next(iter(setup.mixture.paths.values())) if setup.mixture else resolve_data(
            run, data_dir, out_dir, world, config.vocab_size, recorded and (resume_from, recorded), announce, planning)
    mixture, data_path = setup.mixture, setup.data_path
    if data_path is None:  # a plan's, of data not prepared yet: the task files are read all the same
        read_task_questions(train.eval_tasks, train.eval_task_limit)
        return setup
    with named_when_planning(planning, setup.missing, "eval"):
        setup.eval_sets = resolve_eval_sets(run, data_path, mixture)
        setup.evaluated = evaluated_dirs(data_path, mixture, setup.eval_sets)
        check_average_names(setup.evaluated, train.ema_decay)  # a resumed mixture's names too, not the config's
    tokenizer = setup.tokenizer = Tokenizer.from_pretrained(data_path)
    if resume_from or init_from:
        check_same_tokenizer(Path(resume_from or init_from), tokenizer, data_path, resuming=resume_from is not None)
    check_run_fits_model(config, train, tokenizer, data_path,  # a new model's table is the run's to choose: warn once
                         warn_unused_rows=announce and not (resume_from or init_from))
    with named_when_planning(planning, setup.missing, "data"):  # a split too small for the global batch
        setup.loader = train_loader(mixture or data_path, train, world)
    loader = setup.loader
    if loader is not None and trainer_state is not None:  # another global batch, seq_len or data is refused here
        loader.load_state_dict(trainer_state["data"])
    if loader is not None and loader.vocab_size > config.vocab_size:  # ids the loaders pass could index past the table
        raise ConfigError(f"{data_path / 'meta.json'} records a vocab_size of {loader.vocab_size}, but the model's "
                          f"vocab_size is {config.vocab_size}; its token ids may not fit the embedding table")
    with named_when_planning(planning, setup.missing, "eval"):
        check_eval_splits(setup.evaluated, setup.eval_sets, run, world)
    setup.tasks = read_tasks(train.eval_tasks, train.eval_task_limit, tokenizer, config.max_position_embeddings)
    return setup
