"""Run metrics: `RUN/metrics.jsonl` (one JSON object per optimizer step or evaluation), optional TensorBoard,
and a PNG of the loss and eval curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import DataError, is_number
from .fileio import atomic_write

METRICS_FILE = "metrics.jsonl"

# Peak dense bf16 matmul throughput (TFLOP/s, without sparsity) by device-name fragment, for MFU: the SXM
# parts. Cards sold under the same names with lower clocks (H100 PCIe ~756, H100/H200 NVL ~835) get none.
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}
SLOWER_VARIANTS = {"H100": ("PCIe", "NVL"), "H200": ("NVL",)}


def peak_tflops(device_name: str) -> float | None:
    """The device's published bf16 peak, or None for a device we have no figure for (no MFU is reported
    rather than a wrong one)."""
    for fragment, tflops in PEAK_BF16_TFLOPS.items():
        if fragment in device_name:
            return None if any(v in device_name for v in SLOWER_VARIANTS.get(fragment, ())) else tflops
    return None


def perplexity(loss: float) -> float:
    """exp(loss): inf past float's range (a loss above 709) rather than an OverflowError, or a capped figure
    that would understate a diverged model's perplexity; NaN for a NaN loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def flops_per_token(non_embedding_params: int, num_layers: int, hidden_size: int, seq_len: int) -> int:
    """Training FLOPs per token: 6N for the weights' forward and backward matmuls plus 12·L·d·T for the
    attention scores and values (N excludes the input embedding table; an LM head counts)."""
    return 6 * non_embedding_params + 12 * num_layers * hidden_size * seq_len


def step_throughput(tokens_per_rank: int, world_size: int, seconds: float, flops_per_token: int,
                    peak_tflops: float | None) -> tuple[float, float | None]:
    """One optimizer step's tokens/s over all ranks, each of which trained `tokens_per_rank` tokens in `seconds`,
    and its MFU, a per-GPU figure: the FLOP/s of all ranks over `world_size` peaks (None without a peak)."""
    tokens_per_s = tokens_per_rank * world_size / seconds
    mfu = flops_per_token * tokens_per_s / (peak_tflops * 1e12 * world_size) if peak_tflops else None
    return tokens_per_s, mfu


class MetricsLog:
    """Appends records to metrics.jsonl (and TensorBoard when asked and installed). On resume the file is
    first cut back to the resumed step (and TensorBoard's later events are purged), so it always describes one
    uninterrupted history."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0, tensorboard: bool = False):
        self.path = Path(run_dir) / METRICS_FILE
        # a fresh run (resume_step 0) replaces whatever an earlier run left, readable or not
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if resume_step and self.path.exists() \
            else []
        atomic_write(self.path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))
        self.file = open(self.path, "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("note: tensorboard is not installed (pip install tensorboard); logging to metrics.jsonl only")
            else:  # one history, as in metrics.jsonl: events logged before from this run's first step on are hidden
                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (a step's or an evaluation's), flushed: a crash loses at most the line being written."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; blank lines are skipped and a torn last line (a crash mid-write)
    is dropped. A file that is not text, or any other line that is not a JSON object, is a DataError naming
    the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a metrics file (not UTF-8 text; bad byte at offset {e.start})") from None
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise DataError(f"{path}:{number}: not a JSON line ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
        if not is_number(record.get("step")):
            raise DataError(f"{path}:{number}: a record without a numeric 'step'")
        records.append(record)
    return records


def run_records(run_dir: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """A run's metrics.jsonl and its records (`read_metrics`); a directory without one is a DataError."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise DataError(f"{path} does not exist: is {run_dir} a training run directory?")
    return path, read_metrics(path)


def pyplot(plot: str) -> Any:
    """matplotlib.pyplot drawing off-screen, or None (with a note naming the `plot` not written) when matplotlib,
    an optional dependency (`pip install ttl[plot]`), is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed (pip install matplotlib); no {plot} written")
        return None
    return plt


def save_png(plt: Any, fig: Any, out: Path) -> Path:
    """Write `fig` to `out` atomically (a reader never sees half a PNG) and free it."""
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out


def curve(path: Path, records: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) of every record holding `key`, non-finite values left out; a value or step that is not
    a number is a DataError (matplotlib would fail on it with a TypeError deep inside)."""
    points = []
    for r in records:
        if key in r:
            if not (is_number(r[key]) and is_number(r.get("step"))):
                raise DataError(f"{path}: a record has {key}={r[key]!r} at step {r.get('step')!r}; expected numbers")
            if math.isfinite(r[key]):
                points.append((r["step"], r[key]))
    return points


# a classifier fine-tuning run's loss is a mean over examples; its evaluations (after each epoch) tell its kind
CLASSIFIER_LOSSES = {"eval_accuracy": "cross-entropy (nats/example)", "eval_pearson": "squared error (per example)"}


def loss_kind(records: list[dict[str, Any]]) -> str:
    """What a run's loss measures: per example for a classifier fine-tuning run that has evaluated, else per token."""
    return next((kind for r in records for key, kind in CLASSIFIER_LOSSES.items() if key in r),
                "cross-entropy (nats/token)")


def is_average(key: str) -> bool:
    """Whether an eval figure is train.ema_decay's average of the weights' (eval_loss/ema, KIND/ema/NAME:
    `ttl_core.ema.averaged_names`) rather than the trained weights' (KIND/NAME; a task may be named ema)."""
    kind, _, name = key.partition("/")
    return name.startswith("ema/") or kind == "eval_loss" and name == "ema"


Curves = dict[str, list[tuple[float, float]]]  # (step, value) points by label


def _panels_below(path: Path, records: list[dict[str, Any]],
                  named: list[str]) -> list[tuple[Curves, dict[str, Any], bool]]:
    """The axes below the losses, each (its curves, its axes settings, whether the curves are parts or blocks in
    the model's order), those without a curve left out: train.eval_tasks' fractions of questions right,
    train.log_grad_norms' gradient norms by part and train.log_activation_stats' figures block by block. None of
    them is a loss, so each kind gets axes of its own."""
    accuracies = {key: curve(path, records, key) for key in named if key.startswith(("acc/", "acc_norm/"))}
    gradients = {key.removeprefix("grad_norm/"): curve(path, records, key)  # labelled PART
                 for key in named if key.startswith("grad_norm/")}
    # the residual stream's growth and the attention logits', block by block
    by_block = {kind: {key.removeprefix(kind): curve(path, records, key) for key in named if key.startswith(kind)}
                for kind in ("act_rms/", "attn_logit_max/")}
    if gradients:  # with the global norm they make up, on a log scale, where a part that spikes stands out
        gradients = {"grad_norm": curve(path, records, "grad_norm"), **gradients}
    kinds = ((accuracies, {"ylabel": "zero-shot accuracy", "ylim": (0, 1)}, False),
             (gradients, {"ylabel": "gradient norm", "yscale": "log"}, True),
             (by_block["act_rms/"], {"ylabel": "residual RMS", "yscale": "log"}, True),
             (by_block["attn_logit_max/"], {"ylabel": "largest attention logit"}, True))
    return [kind for kind in kinds if kind[0]]


def _draw_panel(plt: Any, axes: Any, curves: Curves, settings: dict[str, Any], in_depth_order: bool) -> None:
    """Draw one of `_panels_below` on `axes`, the average of the weights' figures dotted, the legend beside the axes
    (a deep model's blocks would hide the curves)."""
    if in_depth_order:  # from the input to the output in the colormap's order (a deep model's would repeat the
        # default cycle's 10 colours), the gradients' global norm in black
        whole = ["black"] if "grad_norm" in curves else []
        parts = len(curves) - len(whole)
        axes.set_prop_cycle(color=[*whole, *plt.colormaps["viridis"].resampled(parts)(range(parts))])
    for key, points in curves.items():
        if points:
            axes.plot(*zip(*points), ".:" if is_average(key) else ".-", label=key, linewidth=1)
    axes.set(**settings)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1), ncol=1 + len(curves) // 16)


def plot_metrics(run_dir: str | Path) -> Path | None:
    """Write RUN/loss.png: training loss and eval loss against the step (and each eval_loss/NAME, a data mixture's
    source or a data.eval set, labelled NAME), per token (a language model's) or, once a classifier run has
    evaluated, per example; below them, on axes of their own, train.eval_tasks' acc/NAME and acc_norm/NAME, and
    train.log_grad_norms' grad_norm/PART (labelled PART) with grad_norm, on a log scale, and train.log_activation_stats'
    act_rms/layers.N (on a log scale) and attn_logit_max/layers.N (labelled layers.N). train.ema_decay's figures of the
    average of the weights (`is_average`: labelled ema and ema/NAME on the loss axes, acc/ema/NAME...) are dotted.
    Returns None (with a note) when matplotlib, an optional dependency (`pip install ttl[plot]`), is missing."""
    path, records = run_records(run_dir)
    train, evals = curve(path, records, "loss"), curve(path, records, "eval_loss")
    named = list(dict.fromkeys(key for r in records for key in r))  # in the records' order
    sources = {key.removeprefix("eval_loss/"): curve(path, records, key)  # a mixture's or a data.eval set's
               for key in named if key.startswith("eval_loss/")}
    panels = _panels_below(path, records, named)
    if not train and not evals:
        logged = sum(("loss" in r) + ("eval_loss" in r) for r in records)
        raise DataError(f"{path}: all {logged} loss values are NaN or infinite; nothing to plot" if logged
                        else f"{path} holds no loss records yet")
    plt = pyplot("loss plot")
    if plt is None:
        return None
    fig, axes = plt.subplots(1 + len(panels), 1, figsize=(7, 4 + 2 * len(panels)), sharex=True, squeeze=False,
                             height_ratios=(2, *[1] * len(panels)))
    ax = axes[0, 0]
    for (curves, settings, in_depth_order), below in zip(panels, axes[1:, 0]):
        _draw_panel(plt, below, curves, settings, in_depth_order)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    for name, points in sources.items():
        if points:
            ax.plot(*zip(*points), ".:" if is_average(f"eval_loss/{name}") else ".--", label=name, linewidth=1)
    fig.axes[-1].set_xlabel("optimizer step")
    ax.set_ylabel(loss_kind(records))
    ax.set_title(Path(run_dir).resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_png(plt, fig, Path(run_dir) / "loss.png")
