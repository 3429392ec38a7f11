"""Sequence-classification fine-tuning: task files in, a transformers-loadable classifier out.

The default recipe is TeenyTinyLlama-160m-AgNews's: lr 4e-5, batch 16, 3 epochs, weight decay 0.01,
max_length 256, dynamic padding with the model's pad id, evaluation each epoch, best checkpoint kept. Where the
attention backend runs packed sequences natively (flash-attn, or our Triton kernel), a batch is instead one row of
its examples end to end, kept apart by `cu_seqlens` (as instruction tuning's batches are), with the padded batch's
logits and loss.
Task files (CSV, TSV, JSON lines or a JSON array) are read by `ttl_core.task_files`. One label
(`regression=True`) makes an STS-style regressor scored by Pearson correlation and MSE.
The optimizer, schedule and update step are the pretraining loop's (`ttl_core.optim`), and so is its autocast
(`ttl_core.step`).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .attention import document_layout, runs_packed_natively
from .config import LlamaConfig
from .errors import CheckpointError, ConfigError, is_integer, is_number
from .fileio import remove_path, write_dir_atomically, write_json
from .hf import checked_device, load_pretrained, read_model_config, save_pretrained
from .lora import apply_lora, merged_weights, valid_rank
from .lora_files import save_adapter
from .metrics import MetricsLog
from .model import LlamaForSequenceClassification
from .optim import build_optimizer, gradient_parts, lr_at, optimizer_update
from .run_config import DTYPE_CHOICES, TrainConfig
from .task_files import TaskSpec, encode_task, read_task_file, task_examples, task_labels
from .tokenizer import Tokenizer
from .tokenizer_call import pad_rows
from .step import AUTOCAST_DTYPES, autocast

AGNEWS_LABELS = ("MUNDO", "ESPORTES", "NEGÓCIOS", "TECNOLOGIA")
SAMPLE_DATA = Path(__file__).resolve().parent / "sample_data"
# what a fine-tuning run (or a benchmark of them) leaves in its output directory
RUN_OUTPUTS = ("best", "results.json", "metrics.jsonl")


@dataclass
class FinetuneConfig:
    """Hyperparameters of a fine-tune (classifier or instruction tuning); defaults are the AgNews recipe."""

    lr: float = 4e-5
    batch_size: int = 16
    grad_accum_steps: int = 1  # batches per optimizer step
    epochs: int = 3
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_length: int = 256
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"  # autocast dtype; parameters stay float32
    device: str = "cpu"
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])  # or "all-linear"
    lora_dora: bool = False  # DoRA adapters (PEFT's use_dora)
    merge_lora: bool = False  # save the merged model instead of the PEFT adapter
    # as pretraining's train.label_smoothing, over the classes or the vocabulary; "loss" logs the unsmoothed loss
    label_smoothing: float = 0.0
    log_grad_norms: bool = False  # log grad_norm/PART too (optim.gradient_parts), as train.log_grad_norms does

    def __post_init__(self) -> None:
        """Refuse values that would fail late (a ZeroDivisionError, NaN weights) or train without complaint on
        nonsense; each check is written so that NaN fails it. Messages name the field and its option."""
        real = lambda v: is_number(v) and math.isfinite(v)  # noqa: E731
        checks = {
            "lr": (real(self.lr) and self.lr > 0, "a finite number > 0"),
            "batch_size": (is_integer(self.batch_size) and self.batch_size >= 1, "an integer >= 1"),
            "grad_accum_steps": (is_integer(self.grad_accum_steps) and self.grad_accum_steps >= 1, "an integer >= 1"),
            "epochs": (is_integer(self.epochs) and self.epochs >= 1, "an integer >= 1"),
            "weight_decay": (real(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            "warmup_steps": (is_integer(self.warmup_steps) and self.warmup_steps >= 0, "an integer >= 0"),
            "max_length": (is_integer(self.max_length) and self.max_length >= 2, "an integer >= 2"),
            # the range pretraining's train.seed allows; torch.manual_seed overflows past 2**64
            "seed": (is_integer(self.seed) and 0 <= self.seed < 2**32, "an integer in [0, 2**32)"),
            "grad_clip": (real(self.grad_clip) and self.grad_clip >= 0, "a finite number >= 0 (0: no clipping)"),
            "dtype": (self.dtype in DTYPE_CHOICES, f"one of {', '.join(DTYPE_CHOICES)}"),
            # a flag of another type ("false", a string, is true) would switch the run to or from LoRA unasked
            "lora": (isinstance(self.lora, bool), "true or false"),
            "merge_lora": (isinstance(self.merge_lora, bool), "true or false"),
            "lora_r": (valid_rank(self.lora_r), "an integer in [1, 2**31)"),
            "lora_alpha": (real(self.lora_alpha) and self.lora_alpha > 0, "a finite number > 0"),
            "lora_dropout": (real(self.lora_dropout) and 0 <= self.lora_dropout < 1, "a number in [0, 1)"),
            "lora_targets": (self.lora_targets == "all-linear" or isinstance(self.lora_targets, (list, tuple))
                             and bool(self.lora_targets), "module names or all-linear"),
            "lora_dora": (isinstance(self.lora_dora, bool), "true or false"),
            "label_smoothing": (real(self.label_smoothing) and 0 <= self.label_smoothing < 1, "in [0, 1)"),
            "log_grad_norms": (isinstance(self.log_grad_norms, bool), "true or false"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be {expected}, "
                                  f"got {getattr(self, name)!r}")
        for flag, does in (("merge_lora", "merges LoRA adapters into the model"),
                           ("lora_dora", "trains DoRA adapters")):
            if getattr(self, flag) and not self.lora:  # else a full fine-tune would run and be saved, the flag ignored
                raise ConfigError(f"{flag} (--{flag.replace('_', '-')}) {does}; it needs --lora")

    def torch_device(self) -> torch.device:
        """`device` as a torch device; a malformed one, or CUDA on a machine without it, is a ConfigError."""
        try:
            return checked_device(self.device)
        except CheckpointError as e:
            raise ConfigError(f"--device {self.device!r}: {e}") from None

    def train_config(self, max_steps: int) -> TrainConfig:
        """The pretraining loop's config for `max_steps` updates: warmup, then cosine decay to zero."""
        return TrainConfig(micro_batch_size=self.batch_size, lr=self.lr, min_lr=0.0, warmup_steps=self.warmup_steps,
                           max_steps=max_steps, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                           seed=self.seed, dtype=self.dtype)


def classifier_labels(examples: list[tuple[list[int], Any]]) -> torch.Tensor:
    """The batch's labels: float targets stay float32 (regression), class ids are long."""
    labels = [label for _, label in examples]
    return torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)


def right_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """The rows as one long tensor (rows, longest row), each filled up with `value` after its end."""
    return torch.tensor(pad_rows(rows, max(map(len, rows)), value, "right"), dtype=torch.long)


def pad_sequences(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token id lists as rows right-padded to the longest (dynamic padding): input_ids, and the attention_mask
    that marks their real tokens."""
    return {"input_ids": right_pad(sequences, pad_id),
            "attention_mask": right_pad([[1] * len(ids) for ids in sequences], 0)}


def collate(examples: list[tuple[list[int], Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch right-padded to its longest example (`pad_sequences`), with its labels."""
    return {**pad_sequences([ids for ids, _ in examples], pad_id), "labels": classifier_labels(examples)}


def pack_sequences(sequences: list[list[int]]) -> dict[str, Any]:
    """Token id lists end to end in one row without padding, as transformers' DataCollatorWithFlattening
    packs them: input_ids (1, total tokens), position_ids restarting at each sequence, and `cu_seqlens` /
    `max_seqlen` (see `document_layout`) so that no sequence attends to another."""
    input_ids = torch.tensor([[token for ids in sequences for token in ids]])
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[0, torch.tensor([len(ids) for ids in sequences[:-1]], dtype=torch.long).cumsum(0)] = True
    position_ids, cu_seqlens, max_seqlen = document_layout(starts)
    return {"input_ids": input_ids, "position_ids": position_ids, "cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}


def pack(examples: list[tuple[list[int], Any]]) -> dict[str, Any]:
    """`collate`'s batch packed into one row (`pack_sequences`); the classifier pools each example at the token its
    padded row would, so the logits and the loss are the padded batch's."""
    return {**pack_sequences([ids for ids, _ in examples]), "labels": classifier_labels(examples)}


def packs_batches(model: torch.nn.Module, dtype: str) -> bool:
    """Whether fine-tuning `model`, computing in `dtype` (its autocast dtype, else the parameters'), packs its
    batches: where the attention backend resolves to a variable-length kernel (`runs_packed_natively`), so no
    compute goes to padding. SDPA or eager would run packed examples under a block-diagonal mask over the whole
    row, costlier than the padding saved, and keep padded batches."""
    param = next(model.parameters())
    compute_dtype = AUTOCAST_DTYPES.get(dtype, param.dtype)
    return runs_packed_natively(model.config.attention, model.config.head_dim, param.device, compute_dtype)


def classifier_collator(model: LlamaForSequenceClassification, dtype: str) -> Callable[[list], dict[str, Any]]:
    """How classifier fine-tuning and `predict` batch examples for `model` computing in `dtype` (as keyword
    arguments of `model`): `pack` where `packs_batches`, else `collate` with the model's pad id."""
    if packs_batches(model, dtype):
        return pack
    pad_id = model.config.pad_token_id
    return lambda examples: collate(examples, pad_id)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """`batch` with its tensors moved to `device`; other values (a packed batch's int `max_seqlen`) kept."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def shuffled_batches(examples: list, batch_size: int, seed: int, collate_fn: Callable) -> Iterator[dict]:
    """Batches in an order drawn from `seed` (one seed per epoch gives a reproducible run)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate_fn([examples[i] for i in order[start:start + batch_size]])


# --- metrics --------------------------------------------------------------------------------------------

def classification_metrics(predictions: list[int], labels: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-averaged F1 (classes absent from both predictions and labels are left out)."""
    accuracy = sum(p == t for p, t in zip(predictions, labels)) / len(labels)
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and t == c for p, t in zip(predictions, labels))
        predicted, actual = predictions.count(c), labels.count(c)
        if predicted or actual:
            f1s.append(2 * tp / (predicted + actual))
    return {"accuracy": accuracy, "f1": sum(f1s) / len(f1s)}


def regression_metrics(predictions: list[float], targets: list[float]) -> dict[str, float]:
    """Pearson correlation (0 when either side is constant, NaN when a prediction is not finite) and mean squared
    error."""
    n = len(targets)
    if not all(map(math.isfinite, predictions)):  # a diverged model, which a 0 would rank above anti-correlation
        return {"pearson": math.nan, "mse": math.nan}
    mp, mt = sum(predictions) / n, sum(targets) / n
    cov = sum((p - mp) * (t - mt) for p, t in zip(predictions, targets))
    sp = math.sqrt(sum((p - mp) ** 2 for p in predictions))
    st = math.sqrt(sum((t - mt) ** 2 for t in targets))
    pearson = cov / (sp * st) if sp > 0 and st > 0 else 0.0
    return {"pearson": pearson, "mse": sum((p - t) ** 2 for p, t in zip(predictions, targets)) / n}


def improves(score: float, best_score: float | None, higher_is_better: bool) -> bool:
    """Whether an evaluation beats the best so far (a tie does not; with none yet, it does). A NaN score, from a
    diverged evaluation, beats nothing, and anything beats a NaN best, so one bad epoch cannot block the rest."""
    if best_score is None or math.isnan(best_score):
        return True
    return score > best_score if higher_is_better else score < best_score


@torch.no_grad()
def predict(model: LlamaForSequenceClassification, examples: list, batch_size: int, device: torch.device,
            dtype: str = "float32") -> torch.Tensor:
    """Logits (n, num_labels) for `examples` in order, under autocast `dtype`, in the batches
    `classifier_collator` forms."""
    was_training = model.training
    model.eval()
    collate_fn = classifier_collator(model, dtype)
    out = []
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate_fn(examples[start:start + batch_size]), device)
        del batch["labels"]  # a loss would be wasted work, and would set an unset config.problem_type
        with autocast(device, dtype):
            logits = model(**batch).logits
        out.append(logits.float().cpu())
    model.train(was_training)
    return torch.cat(out)


def evaluate_classifier(model: LlamaForSequenceClassification, examples: list, batch_size: int,
                        device: torch.device, dtype: str = "float32") -> dict[str, float]:
    """Accuracy and macro F1, or Pearson and MSE for a one-label (regression) model."""
    logits = predict(model, examples, batch_size, device, dtype)
    targets = [label for _, label in examples]
    if model.config.num_labels == 1:
        return regression_metrics(logits[:, 0].tolist(), [float(t) for t in targets])
    return classification_metrics(logits.argmax(-1).tolist(), targets, model.config.num_labels)


# --- the fine-tuning loop -------------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    """What `finetune_classifier` returns: the kept epoch's metrics, every epoch's, and where the model went."""

    best: dict[str, float]  # eval metrics of the kept checkpoint, with its "epoch"
    history: list[dict[str, float]]  # eval metrics after each epoch
    checkpoint: Path


def refuse_smoothed_regression(cfg: FinetuneConfig, spec: TaskSpec, task: str = "") -> None:
    """Refuse label smoothing for a regressor, which has no classes to smooth its targets over; `task` names a
    benchmark's task, which the user did not mark --regression but can leave out of --tasks."""
    if cfg.label_smoothing and spec.regression:
        has_none = (f"task {task!r} is a regression task, with none (leave it out of --tasks)" if task else
                    "a regressor (--regression) has none")
        raise ConfigError(f"label_smoothing (--label-smoothing) smooths class labels; {has_none}")


def start_lora(model: torch.nn.Module, cfg: FinetuneConfig, modules_to_save: list[str] | None = None) -> None:
    """Freeze the model and add LoRA adapters as `cfg` says (the heads in `modules_to_save` stay trainable)."""
    apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
               targets=cfg.lora_targets, modules_to_save=modules_to_save, use_dora=cfg.lora_dora)


def check_tokenizer_fits(tokenizer: Tokenizer, config: LlamaConfig, model_dir: str | Path | None = None) -> None:
    """Refuse a tokenizer with more tokens than the embedding table of the model `config` describes: its high ids
    would index past the table (an IndexError mid-batch), or, when instruction tuning grows the table, train rows
    the base never learned. Smaller is fine (vocabularies are often padded)."""
    if tokenizer.vocab_size > config.vocab_size:
        where = f"{model_dir}: " if model_dir is not None else ""
        raise ConfigError(f"{where}the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                          f"{config.vocab_size}; use the tokenizer the model was trained with")


def read_base(model_dir: str | Path, cfg: FinetuneConfig) -> tuple[Tokenizer, LlamaConfig, str]:
    """The tokenizer, config and architecture of the checkpoint being fine-tuned, read without its weights and
    checked against each other and against `cfg.max_length`: what the data is encoded and checked with before a
    model load of seconds."""
    if not Path(model_dir).exists():
        raise CheckpointError(f"{model_dir}: no such model directory")
    config, architecture = read_model_config(model_dir)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    check_tokenizer_fits(tokenizer, config, model_dir)
    if cfg.max_length > config.max_position_embeddings:
        raise ConfigError(f"max_length (--max-length) {cfg.max_length} exceeds the {config.max_position_embeddings}"
                          f"-token context of {model_dir}")
    return tokenizer, config, architecture


def load_base(model_dir: str | Path, cfg: FinetuneConfig, **kwargs: Any) -> tuple[Tokenizer, torch.nn.Module]:
    """`read_base`'s tokenizer, and the model (float32, on `cfg`'s device; `kwargs` go to `load_pretrained`)."""
    tokenizer = read_base(model_dir, cfg)[0]
    return tokenizer, load_pretrained(model_dir, dtype=torch.float32, device=cfg.torch_device(), **kwargs)


def label_order(model_dir: str | Path, labels: list[str]) -> list[str]:
    """Discovered `labels` in the order of the classifier in `model_dir` when its id2label names the same set, so
    its trained head keeps the meaning of each row (transformers' run_classification does the same); else as
    they are."""
    if not Path(model_dir).is_dir():  # load_base says what is wrong
        return labels
    config, architecture = read_model_config(model_dir)
    names = [config.id2label[i] for i in sorted(config.id2label)]
    kept = architecture == "LlamaForSequenceClassification" and sorted(names) == sorted(labels)
    return names if kept else labels


def save_finetuned(model: torch.nn.Module, directory: Path, tokenizer: Tokenizer, cfg: FinetuneConfig,
                   base_dir: str | Path) -> None:
    """Write the model atomically as a directory: a PEFT adapter over `base_dir` (LoRA without merging) or,
    otherwise, a full transformers checkpoint (with LoRA, the adapters folded into the saved weights)."""
    def write(tmp: Path) -> None:
        if not cfg.lora or cfg.merge_lora:
            save_pretrained(model, tmp, tokenizer=tokenizer, state_dict=merged_weights(model) if cfg.lora else None)
        else:
            save_adapter(model, tmp, base_model_name_or_path=str(Path(base_dir).resolve()))
            tokenizer.save_pretrained(tmp, model.config.max_position_embeddings)

    write_dir_atomically(directory, write)


def start_run(out_dir: Path, model_dir: str | Path, cfg: FinetuneConfig) -> MetricsLog:
    """The metrics log of a run of `cfg` from `model_dir` into `out_dir`, which first loses an earlier run's results
    (--overwrite), lest a failed run seem to have made them: all but a best/ that is `model_dir`, kept till replaced."""
    from_best = Path(model_dir).resolve() == (out_dir / "best").resolve()
    if from_best and cfg.lora and not cfg.merge_lora:  # the adapter saved in best/ would have no base left
        raise ConfigError(f"{model_dir}: the model to fine-tune is the best/ this run replaces, and the LoRA adapter "
                          "saved there would have no base; choose another --out (or pass --merge-lora)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_OUTPUTS:
        if not (from_best and name == "best"):
            remove_path(out_dir / name)
    return MetricsLog(out_dir)


def train_epochs(model: torch.nn.Module, examples: list, cfg: FinetuneConfig, collate_fn: Callable,
                 weight_fn: Callable[[dict], int], log: MetricsLog, after_epoch: Callable[[int, int], None]) -> None:
    """`cfg.epochs` passes over `examples` with the pretraining loop's AdamW, warmup + cosine schedule
    and clipped update, one update per `cfg.grad_accum_steps` batches; `model(**batch, label_smoothing=)`'s `loss`
    is a batch's mean loss over the `weight_fn(batch)` items (examples, or target tokens) it averages, so an
    update's gradient is that of the mean over all items of its batches, as one large batch would give.
    `after_epoch(epoch, step)` evaluates and saves. Each step is logged to metrics.jsonl, as pretraining logs it:
    with `cfg.label_smoothing`, "loss" is the unsmoothed cross-entropy and "smoothed_loss" the one trained on; with
    `cfg.log_grad_norms`, grad_norm/PART for each part with a trainable parameter (`gradient_parts`)."""
    device = cfg.torch_device()
    batches_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    train_cfg = cfg.train_config(math.ceil(batches_per_epoch / cfg.grad_accum_steps) * cfg.epochs)
    optimizer = build_optimizer(model, train_cfg, device)
    # fp16 gradients of small losses underflow without loss scaling, as in pretraining
    scaler = torch.amp.GradScaler(device.type) if cfg.dtype == "float16" else None
    parts = gradient_parts(model) if cfg.log_grad_norms else None
    model.train()
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        batches = shuffled_batches(examples, cfg.batch_size, cfg.seed * 1000 + epoch, collate_fn)
        # islice stops past sys.maxsize; a window longer than the epoch is the epoch's batches alike
        while window := list(itertools.islice(batches, min(cfg.grad_accum_steps, batches_per_epoch))):
            step += 1
            weights = [weight_fn(batch) for batch in window]
            window_losses = torch.zeros(2, device=device)  # the loss trained on, and its unsmoothed cross-entropy
            for batch, weight in zip(window, weights):
                batch = to_device(batch, device)
                with autocast(device, cfg.dtype):
                    out = model(**batch, label_smoothing=cfg.label_smoothing)
                    loss = out.loss * (weight / sum(weights))
                (scaler.scale(loss) if scaler else loss).backward()
                nll = loss if out.nll is None else out.nll * (weight / sum(weights))
                window_losses += torch.stack([loss.detach().float(), nll.detach().float()])
            loss_value, nll_value = window_losses.tolist()  # one host sync per update
            if not math.isfinite(loss_value):
                raise ConfigError(f"epoch {epoch}, step {step}: the loss became {loss_value}; lower the lr")
            lr = lr_at(step, train_cfg)
            grad_norm, figures = optimizer_update(model, optimizer, train_cfg, lr, scaler, parts)
            smoothed = {"smoothed_loss": loss_value} if cfg.label_smoothing else {}
            log.log({"step": step, "epoch": epoch, "loss": nll_value, **smoothed, "lr": lr, "grad_norm": grad_norm,
                     **figures})
        after_epoch(epoch, step)


def _classifier_head(labels: list[str] | None) -> dict[str, Any]:
    """The config fields of a classifier head over `labels` (None: a regressor's single output), as
    `load_pretrained` takes them."""
    if labels is None:
        return {"num_labels": 1, "id2label": None, "label2id": None, "problem_type": "regression"}
    return {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)},
            "problem_type": "single_label_classification"}


def _check_pad_id(pad_id: int | None, model_dir: str | Path) -> None:
    """Batches are padded with the config's pad id and pooled at the last token that is not it: a negative id (old
    Llama configs say -1 for none) would index before the embedding table."""
    if pad_id is None or pad_id < 0:
        raise ConfigError(f"{model_dir}: the config's pad_token_id {pad_id} is not a token id; "
                          "batched classification pads with one (set it in config.json)")


def finetune_classifier(model_dir: str | Path, train_file: str | Path, eval_file: str | Path,
                        out_dir: str | Path, spec: TaskSpec | None = None,
                        cfg: FinetuneConfig | None = None, verbose: bool = True) -> FinetuneResult:
    """Fine-tune the causal LM (or classifier) in `model_dir` on a task file and keep the checkpoint that
    scores best on `eval_file` (accuracy, or Pearson for regression) in OUT/best, with the tokenizer and
    `id2label`/`label2id` in its config (an unmerged LoRA run saves a PEFT adapter there instead, which holds no
    config: its label names are those of OUT/results.json). Labels not given in `spec` are the train file's, in
    the order of a classifier base that names the same set (`label_order`), else sorted. OUT/metrics.jsonl logs
    every step and evaluation; OUT/results.json holds the label names and the per-epoch evaluations."""
    spec, cfg = spec or TaskSpec(), cfg or FinetuneConfig()
    train_file, eval_file, out_dir = Path(train_file), Path(eval_file), Path(out_dir)
    device = cfg.torch_device()
    # the data is read and checked first: a bad file fails at once, not after a model load of seconds
    refuse_smoothed_regression(cfg, spec)
    train_rows = read_task_file(train_file)
    labels = None if spec.regression else task_labels(train_rows, spec, train_file)
    if labels is not None and spec.labels is None:
        labels = label_order(model_dir, labels)
    train_texts = task_examples(train_file, spec, labels, train_rows)
    eval_texts = task_examples(eval_file, spec, labels)
    torch.manual_seed(cfg.seed)  # the new score head's initial values
    tokenizer, model = load_base(model_dir, cfg, architecture="LlamaForSequenceClassification",
                                 **_classifier_head(labels))
    train_examples = encode_task(tokenizer, train_texts, spec.pair, cfg.max_length)
    eval_examples = encode_task(tokenizer, eval_texts, spec.pair, cfg.max_length)
    _check_pad_id(model.config.pad_token_id, model_dir)
    if cfg.lora:
        start_lora(model, cfg, modules_to_save=["score"])
    log = start_run(out_dir, model_dir, cfg)
    primary = "pearson" if spec.regression else "accuracy"
    history: list[dict[str, float]] = []
    best: dict[str, float] = {}

    def after_epoch(epoch: int, step: int) -> None:
        metrics = evaluate_classifier(model, eval_examples, cfg.batch_size * 2, device, cfg.dtype)
        history.append({"epoch": epoch, **metrics})
        log.log({"step": step, "epoch": epoch, **{f"eval_{k}": v for k, v in metrics.items()}})
        improved = improves(metrics[primary], best.get(primary), higher_is_better=True)
        if improved:
            best.clear()
            best.update(history[-1])
            save_finetuned(model, out_dir / "best", tokenizer, cfg, model_dir)
        if verbose:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"epoch {epoch}: {shown}{' (best so far, saved)' if improved else ''}")

    collate_fn = classifier_collator(model, cfg.dtype)
    try:
        train_epochs(model, train_examples, cfg, collate_fn, lambda batch: len(batch["labels"]), log, after_epoch)
    finally:
        log.close()
    write_json(out_dir / "results.json", {"train": str(train_file), "eval": str(eval_file), "labels": labels,
                                          "packed": collate_fn is pack, "best": best, "history": history,
                                          "config": asdict(cfg)})
    return FinetuneResult(best=best, history=history, checkpoint=out_dir / "best")
