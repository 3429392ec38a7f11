"""Training run configuration: a TOML file with `[model]`, `[data]` and `[train]` sections.

`[model]` names a preset and/or sets `LlamaConfig` fields; `[data]` and `[train]` set the fields of the
dataclasses below. `--set train.lr=3e-4` style overrides are applied on top, and an unknown section or key
is an error that names it, so a typo never silently trains with a default."""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import LlamaConfig
from .ema import check_average_names
from .errors import ConfigError, is_integer, is_number
from .noise_scale import validate_noise_scale
from .spikes import validate_spikes
from .tokenizer import Tokenizer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 installs tomli (see setup.py)
    import tomli as tomllib

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
DISTRIBUTED_CHOICES = ("ddp", "fsdp")
SCHEDULE_CHOICES = ("cosine", "linear", "1-sqrt", "constant")
OPTIMIZER_CHOICES = ("adamw", "muon")
MUON_ADJUST_LR_CHOICES = ("match_rms_adamw", "original")


@dataclass
class DataConfig:
    """Where the tokens come from. An empty `path` means the bundled sample corpus, prepared into RUN/data."""

    path: str = ""
    document_masking: bool = False  # attend within documents only, rotary positions restart per document
    # a data mixture instead of `path`: {name = {path = DIR, weight = W}, ...}, each batch row drawn from a source
    # with probability W / sum of the weights (see ttl_core.mixture)
    mix: dict[str, Any] = field(default_factory=dict)
    # held-out sets evaluated beside the training data, never trained on: {name = DIR, ...}, each DIR's val.bin
    # logged as eval_loss/NAME at every evaluation (see ttl_core.mixture.resolve_eval_sets)
    eval: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Optimization and bookkeeping. Steps count optimizer updates and are numbered from 1."""

    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    # batch-size warmup: batch_ramp_start micro-batches accumulated at step 1, rising linearly to grad_accum_steps at
    # step batch_ramp_steps (see grad_accum_at); 0: the whole batch from step 1
    batch_ramp_steps: int = 0
    batch_ramp_start: int = 1
    seq_len: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    max_steps: int = 1000
    # the decay's shape after the warmup: "cosine", "linear", "1-sqrt" or "constant" (no decay), down to min_lr;
    # decay_steps 0 decays from the warmup to max_steps, N > 0 holds lr and decays over the last N steps only
    # (warmup-stable-decay: resume with another max_steps to branch a decay off any checkpoint of the stable phase)
    schedule: str = "cosine"
    decay_steps: int = 0
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # parameter-name fragments excluded from weight decay, matched against ttl's names (backbone.embed.weight,
    # backbone.layers.0.attn_norm.weight, lm_head.weight: HF's "embed_tokens" matches nothing, silently);
    # [] decays everything (TeenyTinyLlama's practice)
    no_decay: list[str] = field(default_factory=lambda: ["norm", "bias"])
    # "muon": Muon on the decoder blocks' projection matrices (each of q, k, v, gate, up orthogonalised alone),
    # AdamW as above on the rest; muon_adjust_lr "match_rms_adamw" (Moonshot's) lets Muon share lr and weight_decay,
    # "original" is Keller Jordan's scaling (which wants a larger lr)
    optimizer: str = "adamw"
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_adjust_lr: str = "match_rms_adamw"
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    # PaLM's z-loss: z_loss * logsumexp(logits)**2 per target token added to the objective (1e-4 in PaLM), which
    # keeps the softmax normalizer near 1; logged apart, as "z_loss", beside the cross-entropy "loss"
    z_loss: float = 0.0
    # label smoothing as torch's F.cross_entropy(label_smoothing=ε) applies it (targets (1 - ε) one-hot + ε / vocab);
    # "loss" logs the unsmoothed cross-entropy (comparable with runs without it), "smoothed_loss" the smoothed one
    label_smoothing: float = 0.0
    # a moving average of the weights, updated after each optimizer step at this decay (warmed up: see ttl_core.ema),
    # evaluated as eval_loss/ema (eval_loss/ema/NAME, acc/ema/NAME) and saved as checkpoints' ema/; 0: none
    ema_decay: float = 0.0
    seed: int = 0
    dtype: str = "float32"  # autocast dtype; parameters and optimizer state stay float32
    tf32: bool = False  # CUDA float32 matmuls on TF32 tensor cores (TeenyTinyLlama's recipe); no effect off CUDA
    compile: bool = False  # torch.compile each decoder block (on the CPU that needs a C++ compiler: $CXX, else g++)
    activation_checkpointing: bool = False
    distributed: str = "ddp"  # how torchrun processes share the model: "ddp" or "fsdp" (FSDP2)
    # evaluate on val.bin every eval_every steps and after the last; 0: never (the data then needs no val.bin)
    eval_every: int = 100
    eval_batches: int = 20
    # zero-shot multiple-choice task files (ttl_core.choices), scored at each evaluation as acc/NAME and
    # acc_norm/NAME (NAME: the file's stem) on the first eval_task_limit questions of each (0: all)
    eval_tasks: list[str] = field(default_factory=list)
    eval_task_limit: int = 100
    save_every: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = False
    # also log each part's gradient norm (before clipping) as grad_norm/embed, grad_norm/layers.N, grad_norm/norm and
    # grad_norm/lm_head (none when tied): their squares sum to grad_norm's
    log_grad_norms: bool = False
    # also log, at each evaluation, per-block activation statistics of the first val batch: act_rms/layers.N,
    # attn_out_rms/layers.N, mlp_out_rms/layers.N, attn_logit_max/layers.N (see ttl_core.activation_stats)
    log_activation_stats: bool = False
    # also log the gradient noise scale in target tokens (noise_scale, averaged at decay noise_scale_ema), with the
    # step's grad_sq_small and grad_sq_big (see ttl_core.noise_scale); needs grad_accum_steps >= 2 or 2+ processes
    # (under FSDP, 2+ processes: each one's small batch is its share of the step)
    log_noise_scale: bool = False
    noise_scale_ema: float = 0.95
    # skip the update of a step whose loss or grad norm spikes above the last steps' (see ttl_core.spikes); 0: never
    skip_spikes_sigma: float = 0.0
    skip_spikes_window: int = 128
    # [start, stop]: trace optimizer steps start..stop with torch.profiler into RUN/profile, each rank's trace and rank
    # 0's table of the operators that took the most time (see ttl_core.profiling); [] profiles nothing
    profile_steps: list[int] = field(default_factory=list)
    sample_prompt: str = "O Brasil é"
    sample_tokens: int = 40

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.seq_len

    def grad_accum_at(self, step: int) -> int:
        """The micro-batches accumulated at optimizer step `step` (from 1): during the batch ramp, the line from
        `batch_ramp_start` at step 1 to `grad_accum_steps` at step `batch_ramp_steps` rounded down (integers that never
        fall, the whole batch first reached at the ramp's last step), `grad_accum_steps` after it or without one."""
        if step >= self.batch_ramp_steps:
            return self.grad_accum_steps
        start = self.batch_ramp_start
        return start + (self.grad_accum_steps - start) * (step - 1) // (self.batch_ramp_steps - 1)

    def tokens_at(self, step: int) -> int:
        """The tokens each process trains on at optimizer step `step` (the whole batch's past the batch ramp)."""
        return self.micro_batch_size * self.grad_accum_at(step) * self.seq_len


@dataclass
class RunConfig:
    """A whole run's configuration: the `[model]` table as given, and the `[data]` and `[train]` settings."""

    model: dict[str, Any]
    data: DataConfig
    train: TrainConfig
    model_overrides: list[str] = field(default_factory=list)  # [model] keys set by --set rather than the file

    def model_config(self) -> LlamaConfig:
        """The `LlamaConfig` the `[model]` section describes (a preset plus field overrides)."""
        fields = dict(self.model)
        # named here rather than left to LlamaConfig(**fields), where a typo without a preset is a TypeError
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(LlamaConfig)} - {"preset"})
        if unknown:
            raise ConfigError(f"unknown key(s) in [model]: {', '.join(unknown)} (preset or a LlamaConfig field)"
                              f"{_other_sections(unknown, 'model')}")
        preset = fields.pop("preset", None)
        return LlamaConfig.from_preset(preset, **fields) if preset else LlamaConfig(**fields)

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train)}


_TYPE_WORDS = {bool: "true or false", float: "a number", int: "an integer", str: "a string", list: "a list",
               dict: "a table"}


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    """Check a value against the type of the field's default (ints are accepted for floats)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = is_number(value)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = is_integer(value)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        # Python's spellings (.5, True, 1e3 for a count) are no TOML, or not the type meant: say how to write it
        if isinstance(value, str):
            got = f"the string {value!r} (values are read as TOML: 0.5, 1_000, true, [\"norm\"])"
        elif isinstance(value, float) and value.is_integer() and isinstance(default, int):
            got = f"{value!r} (a float in TOML: write {int(value)})"
        else:
            got = repr(value)
        raise ConfigError(f"{section}.{key} must be {_TYPE_WORDS.get(type(default), type(default).__name__)}, "
                          f"got {got}")
    return value


def _other_sections(keys: list[str], section: str) -> str:
    """'; KEY is a [other] setting' for each of `keys` another section knows: a key in the wrong section."""
    fields = {"model": LlamaConfig, "data": DataConfig, "train": TrainConfig}
    return "".join(f"; {key} is a [{other}] setting" for key in keys for other, cls in fields.items()
                   if other != section and key in {f.name for f in dataclasses.fields(cls)})


def _build(cls, section: str, values: dict[str, Any]):
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in [{section}]: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
                          f"{_other_sections(unknown, section)}")
    return cls(**{k: _coerce(section, k, v, getattr(defaults, k)) for k, v in values.items()})


def _parse_override(item: str) -> tuple[str, str, Any]:
    """`section.key=value`, the value read as a TOML value (a bare word is taken as a string)."""
    name, sep, raw = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except ValueError:  # a TOMLDecodeError, or an integer of more digits than Python converts
        value = raw.strip()
    return section, key, value


def validate(run: RunConfig) -> None:
    """Range checks a bad value would otherwise turn into a confusing failure mid-run."""
    t = run.train
    for key in ("micro_batch_size", "grad_accum_steps", "seq_len", "max_steps", "save_every", "keep_checkpoints",
                "eval_batches"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every must be >= 0 (0: no evaluation), got {t.eval_every}")
    if t.log_activation_stats and not t.eval_every:
        raise ConfigError("train.log_activation_stats logs at each evaluation, and train.eval_every is 0 (none)")
    if t.dtype not in DTYPE_CHOICES:
        raise ConfigError(f"train.dtype must be one of {', '.join(DTYPE_CHOICES)}, got {t.dtype!r}")
    if t.schedule not in SCHEDULE_CHOICES:
        raise ConfigError(f"train.schedule must be one of {', '.join(SCHEDULE_CHOICES)}, got {t.schedule!r}")
    if not 0 <= t.decay_steps <= max(0, t.max_steps - t.warmup_steps):
        raise ConfigError(f"train.decay_steps must lie in [0, max_steps - warmup_steps = "
                          f"{max(0, t.max_steps - t.warmup_steps)}] (0: decay from the warmup on), got {t.decay_steps}")
    if t.decay_steps and t.schedule == "constant":
        raise ConfigError(f"train.decay_steps={t.decay_steps} needs a schedule that decays (cosine, linear, 1-sqrt), "
                          f"not constant")
    if t.distributed not in DISTRIBUTED_CHOICES:
        raise ConfigError(f"train.distributed must be one of {', '.join(DISTRIBUTED_CHOICES)}, got {t.distributed!r}")
    # comparisons written so that NaN fails them; lr is checked before it bounds min_lr, so a bad one is named
    for key in ("lr", "warmup_steps", "grad_clip", "weight_decay", "sample_tokens", "z_loss", "eval_task_limit"):
        if not getattr(t, key) >= 0:
            raise ConfigError(f"train.{key} must be >= 0, got {getattr(t, key)}")
    if not t.eps > 0:
        raise ConfigError(f"train.eps must be > 0, got {t.eps}")
    for key in ("lr", "eps", "weight_decay", "z_loss"):  # an infinite one turns the first update's weights into NaN
        if not math.isfinite(getattr(t, key)):
            raise ConfigError(f"train.{key} must be finite, got {getattr(t, key)}")
    if not 0 <= t.label_smoothing < 1:  # written so that NaN fails too; inf fails as any number >= 1
        raise ConfigError(f"train.label_smoothing must lie in [0, 1), got {t.label_smoothing}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must lie in [0, 1) (0: no average of the weights), got {t.ema_decay}")
    check_average_names([*run.data.mix, *run.data.eval], t.ema_decay)
    if not 0 <= t.min_lr <= t.lr:
        raise ConfigError(f"train.min_lr must lie in [0, lr={t.lr}], got {t.min_lr}")
    if len(t.betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {t.betas}")
    validate_optimizer(t)
    if not all(isinstance(path, str) and path for path in t.eval_tasks):
        raise ConfigError(f"train.eval_tasks must list task files (non-empty strings), got {t.eval_tasks}")
    if not all(isinstance(name, str) for name in t.no_decay):
        raise ConfigError(f"train.no_decay must list parameter-name fragments (strings), got {t.no_decay}")
    if not 0 <= t.seed < 2**32:
        raise ConfigError(f"train.seed must be in [0, 2**32), got {t.seed}")
    validate_batch_ramp(t)
    validate_noise_scale(t)
    validate_spikes(t)
    validate_profile_steps(t)
    validate_mix(run.data)
    validate_eval_sets(run.data)


def validate_batch_ramp(t: TrainConfig) -> None:
    """A batch ramp grows from batch_ramp_start, in [1, grad_accum_steps), over 2 to max_steps steps; a
    batch_ramp_start without a ramp, or a ramp with nothing to grow to, would be ignored without a word."""
    if not t.batch_ramp_steps:
        if t.batch_ramp_start != 1:
            raise ConfigError(f"train.batch_ramp_start={t.batch_ramp_start} needs a batch ramp: set "
                              f"train.batch_ramp_steps (0 is none)")
        return
    if not 2 <= t.batch_ramp_steps <= t.max_steps:
        raise ConfigError(f"train.batch_ramp_steps must be 0 (no ramp) or lie in [2, max_steps={t.max_steps}], "
                          f"got {t.batch_ramp_steps}")
    if t.grad_accum_steps == 1:
        raise ConfigError(f"train.batch_ramp_steps={t.batch_ramp_steps} ramps the micro-batches accumulated up to "
                          f"train.grad_accum_steps, which is 1: raise it to the whole batch's count")
    if not 1 <= t.batch_ramp_start < t.grad_accum_steps:
        raise ConfigError(f"train.batch_ramp_start (micro-batches at step 1) must lie in [1, grad_accum_steps - 1 = "
                          f"{t.grad_accum_steps - 1}], got {t.batch_ramp_start}")


def describe_batch(train: TrainConfig, processes: int) -> str:
    """The startup line's batch: tokens per optimizer step over all `processes` (micro_batch_size is per process: a
    recipe's tokens per step multiply with the processes), their factors, and where a batch ramp starts."""
    line = (f"{train.tokens_per_step * processes:,} tokens per optimizer step ({train.micro_batch_size} x "
            f"{train.grad_accum_steps} x {train.seq_len} x {processes} process{'es' if processes > 1 else ''})")
    if train.batch_ramp_steps:
        line += (f", ramped up over steps 1-{train.batch_ramp_steps} from {train.tokens_at(1) * processes:,} at step 1 "
                 f"({train.batch_ramp_start} of its {train.grad_accum_steps} micro-batches)")
    return line


def validate_profile_steps(t: TrainConfig) -> None:
    """train.profile_steps is [] or [start, stop], integers with 1 <= start <= stop <= max_steps: a window past the
    run's end would profile less than asked (or nothing) without a word."""
    window = t.profile_steps
    if window and not (len(window) == 2 and all(map(is_integer, window)) and 1 <= window[0] <= window[1]):
        raise ConfigError(f"train.profile_steps must be [start, stop], two integers with 1 <= start <= stop (the "
                          f"optimizer steps to profile, both included), got {window}")
    if window and window[1] > t.max_steps:
        raise ConfigError(f"train.profile_steps {window} ends past train.max_steps={t.max_steps}")


def validate_mix(data: DataConfig) -> None:
    """A data.mix names its sources, each a table of a `path` (a prepared directory) and a positive finite
    `weight`; it replaces data.path, so the two together are refused."""
    if data.mix and data.path:
        raise ConfigError(f"data.path ({data.path!r}) and data.mix are exclusive: give one data directory, or a "
                          f"mixture whose sources name theirs")
    for name, source in data.mix.items():
        if not name:  # it names the source's figures in the logs: eval_loss/NAME
            raise ConfigError("data.mix: a source needs a name, as in web = {path = \"data/web\", weight = 0.7}")
        where = f"data.mix source {name!r}"
        if not isinstance(source, dict) or set(source) != {"path", "weight"}:
            raise ConfigError(f"{where} must be a table of path and weight, e.g. {{path = \"data/web\", "
                              f"weight = 0.7}}; got {source!r}")
        if not (isinstance(source["path"], str) and source["path"]):
            raise ConfigError(f"{where}: path must name a prepared data directory, got {source['path']!r}")
        weight = source["weight"]  # written so that NaN fails too
        if not (is_number(weight) and 0 < weight < math.inf):
            raise ConfigError(f"{where}: weight must be a positive finite number, got {weight!r}")
    total = sum(source["weight"] for source in data.mix.values())  # what Mixture.weights divides by
    if total == math.inf:  # each weight then normalises to 0, and every row would come from the last source
        raise ConfigError(f"data.mix: the weights sum to {total}, past a float's range; scale them down (only their "
                          f"ratios count)")


def validate_eval_sets(data: DataConfig) -> None:
    """A data.eval names each set (its figures are eval_loss/NAME) and gives its directory as a non-empty string."""
    for name, path in data.eval.items():
        if not name:
            raise ConfigError('data.eval: a set needs a name, as in wiki = "data/wiki"')
        if not (isinstance(path, str) and path):
            raise ConfigError(f'data.eval set {name!r} must name a prepared data directory, as in wiki = "data/wiki"; '
                              f'got {path!r}')


def validate_optimizer(t: TrainConfig) -> None:
    """The optimizer and Muon's settings (checked with AdamW too, so a typo is named before a run switches)."""
    if t.optimizer not in OPTIMIZER_CHOICES:
        raise ConfigError(f"train.optimizer must be one of {', '.join(OPTIMIZER_CHOICES)}, got {t.optimizer!r}")
    if t.muon_adjust_lr not in MUON_ADJUST_LR_CHOICES:
        raise ConfigError(f"train.muon_adjust_lr must be one of {', '.join(MUON_ADJUST_LR_CHOICES)}, "
                          f"got {t.muon_adjust_lr!r}")
    if not 0 <= t.muon_momentum < 1:
        raise ConfigError(f"train.muon_momentum must be in [0, 1), got {t.muon_momentum}")
    if not 1 <= t.muon_ns_steps < 100:  # torch.optim.Muon's range
        raise ConfigError(f"train.muon_ns_steps must be in [1, 100), got {t.muon_ns_steps}")


def check_run_fits_model(config: LlamaConfig, train: TrainConfig, tokenizer: Tokenizer, data_path: Path,
                         warn_unused_rows: bool) -> None:
    """Refuse, before any weights load, a run the model cannot serve: a tokenizer (the data's, in `data_path`)
    with more tokens than the embedding table, a `train.seq_len` past the model's context, or a
    `train.sample_prompt` that fills the context, leaving the end-of-run sample no room. With `warn_unused_rows`,
    warn when the table is larger than the tokenizer's vocabulary padded to a multiple of 128, as a preset's 32000
    rows are for data prepared with a smaller --vocab-size: the rows past it serve no token."""
    context = config.max_position_embeddings
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"the tokenizer in {data_path} has {tokenizer.vocab_size} tokens but the model's "
                          f"vocab_size is {config.vocab_size}")
    if warn_unused_rows and config.vocab_size > math.ceil(tokenizer.vocab_size / 128) * 128:
        warnings.warn(f"the model's vocab_size is {config.vocab_size} but the tokenizer in {data_path} has "
                      f"{tokenizer.vocab_size} tokens: {config.vocab_size - tokenizer.vocab_size} rows of the "
                      f"embedding and LM head serve no token (set model.vocab_size={tokenizer.vocab_size})")
    if train.seq_len > context:
        raise ConfigError(f"train.seq_len {train.seq_len} exceeds the model's max_position_embeddings {context}")
    if train.sample_tokens and len(tokenizer.encode(train.sample_prompt, add_eos=False)) >= context:
        raise ConfigError(f"train.sample_prompt is longer than the model's context of {context} tokens, leaving no "
                          "room for the sample")


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML run config (or start from the defaults when `path` is None) and apply `--set` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except ValueError as e:  # TOMLDecodeError, UnicodeDecodeError, or an integer too long to convert
            raise ConfigError(f"{path}: invalid TOML ({e})") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config ({e.strerror})") from None
    unknown = sorted(set(raw) - {"model", "data", "train"})
    loose = [key for key in unknown if not isinstance(raw[key], dict)]  # written above every [section] header
    if loose:
        raise ConfigError(f"{path}: {', '.join(loose)} {'is' if len(loose) == 1 else 'are'} set outside any "
                          f"section; put {'it' if len(loose) == 1 else 'them'} under [model], [data] or [train]")
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)} in {path}; expected [model], [data], [train]")
    for name in ("model", "data", "train"):
        if not isinstance(raw.get(name, {}), dict):
            raise ConfigError(f"{path}: {name} must be a [{name}] table, got {raw[name]!r}")
    sections = {name: dict(raw.get(name, {})) for name in ("model", "data", "train")}
    model_overrides = []
    for item in overrides:
        section, key, value = _parse_override(item)
        if section not in sections:
            raise ConfigError(f"--set {item}: unknown section {section!r} (model, data or train)")
        sections[section][key] = value
        if section == "model":
            model_overrides.append(key)
    if sections["data"].get("mix") == {}:  # a [data.mix] table without sources would train on the bundled corpus
        raise ConfigError("data.mix names no source; give each as NAME = {path = DIR, weight = W}, or remove it")
    run = RunConfig(model=sections["model"], data=_build(DataConfig, "data", sections["data"]),
                    train=_build(TrainConfig, "train", sections["train"]), model_overrides=model_overrides)
    run.model_config()  # validates the [model] section now, naming any unknown field
    validate(run)
    return run
