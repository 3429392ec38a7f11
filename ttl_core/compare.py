"""Comparing training runs (`scripts/compare_runs.py`): each run's curves of the chosen metrics in one figure,
against the tokens seen (so that runs with other batch sizes line up) or the step, and a table of each run's
figures. Runs are read as `ttl_core.metrics` reads one: a resumed run's metrics.jsonl was cut back to the step it
resumed from (`MetricsLog`), so each step is there once."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .activation_stats import KINDS
from .checkpoint import latest_checkpoint, read_trainer_state
from .errors import ConfigError, DataError, is_integer
from .metrics import curve, loss_kind, pyplot, run_records, save_png

DEFAULT_METRICS = ("loss", "eval_loss")
# logged at evaluations (train.log_activation_stats' KINDS too), drawn as logged; every other metric is a training
# record's, one point per step, smoothed
EVAL_PREFIXES = ("eval_", "acc/", "acc_norm/", *(f"{kind}/" for kind in KINDS))
ACCURACY_PREFIXES = ("acc/", "acc_norm/")
EVAL_STYLES = ("o--", "s:", "^-.", "D--")


def is_cross_entropy(metric: str) -> bool:
    """Whether `metric` is a loss in nats per token: those share the first axes; every other metric has its own."""
    return metric in ("loss", "smoothed_loss") or metric.startswith("eval_loss")


def smooth(points: list[tuple[float, float]], weight: float) -> list[tuple[float, float]]:
    """TensorBoard's debiased exponential smoothing of (x, value) points. Over the k-th finite value v_k:

        m_0 = 0,  m_k = weight * m_(k-1) + (1 - weight) * v_k,  shown as m_k / (1 - weight**k)

    (the division undoes the pull toward m_0 = 0, so the first point is v_1 itself). NaN and infinite values are
    skipped: neither shown nor averaged in. weight 0 leaves the values as they are."""
    smoothed, average, k = [], 0.0, 0
    for x, value in points:
        if math.isfinite(value):
            k += 1
            average = weight * average + (1 - weight) * value
            smoothed.append((x, average / (1 - weight ** k)))
    return smoothed


@dataclass
class Run:
    """A run directory's label, metrics.jsonl and records."""

    label: str
    dir: Path
    path: Path
    records: list[dict[str, Any]]

    @property
    def training(self) -> list[dict[str, Any]]:
        """The training records (one per optimizer step, each with its loss), in order."""
        return [r for r in self.records if "loss" in r]


def load_run(run_dir: str | Path, label: str) -> Run:
    """`run_dir`'s records. Training steps must rise through the file, as MetricsLog writes them: one that does not
    (a file edited or concatenated by hand) is a DataError rather than a curve drawn back over itself."""
    path, records = run_records(run_dir)
    run = Run(label, Path(run_dir), path, records)
    steps = [r["step"] for r in run.training]
    for before, after in zip(steps, steps[1:]):
        if after <= before:
            raise DataError(f"{path}: training step {after} follows step {before}; ttl writes each step once, "
                            "cutting the file back to the step a run resumes from")
    return run


def checkpoint_batch_tokens(run: Run) -> int | None:
    """Tokens per optimizer step by the run's newest checkpoint (its loader's global batch of sequences, each
    seq_len tokens, times train.grad_accum_steps), or None when the run has no checkpoint or it records no config."""
    checkpoint = latest_checkpoint(run.dir)
    if checkpoint is None:
        return None
    state = read_trainer_state(checkpoint)
    config = state.get("config")
    train = config.get("train") if isinstance(config, dict) else None
    if not isinstance(train, dict):
        return None
    factors = (state["data"].get("global_batch"), train.get("grad_accum_steps"), state["data"].get("seq_len"))
    if not all(is_integer(f) and f >= 1 for f in factors):
        raise DataError(f"{checkpoint}: trainer_state.json records global_batch, grad_accum_steps and seq_len "
                        f"{factors}; expected integers >= 1")
    return math.prod(factors)


def tokens_seen(run: Run) -> dict[float, int] | None:
    """Tokens trained on through each training step: the sum of the steps' batch_tokens. A run logged before
    batch_tokens was (2026-12) counts every step at its newest checkpoint's batch (`checkpoint_batch_tokens`;
    train.grad_accum_steps may change on a resume, so steps before one may be miscounted); None when it has none."""
    seen, total, fallback = {}, 0, None
    for record in run.training:
        batch = record.get("batch_tokens")
        if batch is None:
            fallback = fallback or checkpoint_batch_tokens(run)
            if fallback is None:
                return None
            batch = fallback
        elif not (is_integer(batch) and batch >= 1):
            raise DataError(f"{run.path}: step {record['step']} has batch_tokens={batch!r}; expected an integer >= 1")
        total += batch
        seen[record["step"]] = total
    return seen


def metric_curve(run: Run, metric: str, tokens: dict[float, int] | None, weight: float) -> list[tuple[float, float]]:
    """`metric`'s finite points, against the tokens seen when `tokens` maps the steps, else the step; a training
    metric smoothed (`smooth`). A run without a finite point for it is a DataError."""
    points = curve(run.path, run.records, metric)
    if not points:
        logged = sum(metric in r for r in run.records)
        raise DataError(f"{run.path}: all {logged} {metric} values are NaN or infinite; nothing to compare" if logged
                        else f"{run.path} logs no {metric}; nothing to compare")
    if tokens is not None:
        if missing := [step for step, _ in points if step not in tokens]:
            raise DataError(f"{run.path}: {metric} at step {missing[0]}, which has no training record to count its "
                            "tokens by; compare with --x step")
        points = [(tokens[step], value) for step, value in points]
    return points if metric.startswith(EVAL_PREFIXES) else smooth(points, weight)


def check_metrics(runs: list[Run], metrics: list[str]) -> None:
    """Refuse a metric asked for that no run logs, naming those they do (the default eval_loss is drawn where
    logged: a run with train.eval_every = 0, or not at its first evaluation yet, has none), and one logged as a flag
    or a list of names."""
    logged = list(dict.fromkeys(key for run in runs for r in run.records for key in r if key != "step"))
    for metric in metrics:
        if metric not in logged:
            raise ConfigError(f"--metric {metric}: no run logs it; they log {', '.join(logged) or 'nothing yet'}")
        # the fp16 scaler's and spike skipping's `skipped` and `spike`, as ttl logs them: no damaged record
        flagged = next(((run, r) for run in runs for r in run.records if isinstance(r.get(metric), (bool, list))),
                       None)
        if flagged:
            (run, r), kind = flagged, "true or false" if isinstance(flagged[1][metric], bool) else "a list of names"
            raise ConfigError(f"--metric {metric}: {run.path} logs it as {kind} ({r[metric]!r} at step "
                              f"{r.get('step')}), not a number: there is no curve to draw")


def last_and_best(points: list[tuple[float, float]]) -> dict[str, float | None]:
    """The last and the lowest of (step, eval loss) `points`, with their steps; all None without points."""
    if not points:
        return dict.fromkeys(("last_eval_loss", "last_eval_step", "best_eval_loss", "best_eval_step"))
    (last_step, last), (best_step, best) = points[-1], min(points, key=lambda p: p[1])
    return {"last_eval_loss": last, "last_eval_step": last_step, "best_eval_loss": best, "best_eval_step": best_step}


def summarize(run: Run, weight: float) -> dict[str, Any]:
    """The run's row of the table: training steps logged, tokens seen (None when unknown), the last and the lowest
    eval loss with their steps, the last smoothed training loss, the median tokens/s and each accuracy's last value
    (None where the run logged no finite one)."""
    tokens = tokens_seen(run)
    train_loss = smooth(curve(run.path, run.records, "loss"), weight)
    speeds = [v for _, v in curve(run.path, run.records, "tokens_per_s")]
    accuracies = list(dict.fromkeys(key for r in run.records for key in r if key.startswith(ACCURACY_PREFIXES)))
    return {"label": run.label, "run": str(run.dir), "steps": len(run.training),
            "tokens": list(tokens.values())[-1] if tokens else None,
            **last_and_best(curve(run.path, run.records, "eval_loss")),
            "train_loss_smoothed": train_loss[-1][1] if train_loss else None,
            "tokens_per_s_median": statistics.median(speeds) if speeds else None,
            **{key: points[-1][1] if (points := curve(run.path, run.records, key)) else None for key in accuracies}}


def format_table(rows: list[dict[str, Any]]) -> str:
    """`summarize`'s rows as aligned text, one line per run; an accuracy column for each one any run logged."""
    accuracies = list(dict.fromkeys(key for row in rows for key in row if key.startswith(ACCURACY_PREFIXES)))

    def shown(value: Any, form: str) -> str:
        return "-" if value is None else format(value, form)

    def eval_loss(row: dict[str, Any], which: str) -> str:
        value = row[f"{which}_eval_loss"]
        return "-" if value is None else f"{value:.4f} @ {row[f'{which}_eval_step']}"

    header = ["run", "steps", "tokens", "eval_loss (last)", "eval_loss (best)", "train loss (smoothed)",
              "tokens/s (median)", *accuracies]
    lines = [header] + [[row["label"], str(row["steps"]), shown(row["tokens"], ","),
                         eval_loss(row, "last"), eval_loss(row, "best"),
                         shown(row["train_loss_smoothed"], ".4f"), shown(row["tokens_per_s_median"], ",.0f"),
                         *(shown(row.get(key), ".4f") for key in accuracies)] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def comparison_curves(runs: list[Run], metrics: list[str], x: str,
                      weight: float) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """run label -> metric -> points, for every run and chosen metric it logs (`metric_curve`). A run that logs
    none of them, or one of them without a finite value, is a DataError, and so are a run whose tokens are unknown
    when `x` is tokens and losses measured otherwise (a classifier's per example beside a language model's)."""
    kinds = {loss_kind(run.records): run for run in runs}
    if len(kinds) > 1 and any(map(is_cross_entropy, metrics)):  # a classifier's loss is per example: not comparable
        (kind, run), (other_kind, other) = list(kinds.items())[:2]
        raise DataError(f"{run.dir}'s loss is a {kind}, {other.dir}'s a {other_kind}: losses in other units do not "
                        "share axes; compare runs of one kind, or --metric without losses")
    curves = {}
    for run in runs:
        tokens = tokens_seen(run) if x == "tokens" else None
        if x == "tokens" and tokens is None:
            # fine-tuning logs no batch_tokens either: "an old file" alone would send its user the wrong way
            raise DataError(f"{run.dir}: its metrics.jsonl logs no batch_tokens (fine-tuning runs do not, nor did "
                            "pretraining before 2026-12) and it has no checkpoint recording its batch; compare with "
                            "--x step")
        logged = [metric for metric in metrics if any(metric in r for r in run.records)]
        curves[run.label] = {metric: metric_curve(run, metric, tokens, weight) for metric in logged or metrics[:1]}
    return curves


def plot_comparison(curves: dict[str, dict[str, list[tuple[float, float]]]], x: str, weight: float,
                    out: Path) -> Path | None:
    """Write `comparison_curves`' curves to `out`: one color per run, one line style per metric; the losses in nats
    per token share the top axes, every other metric has axes of its own below. None (with a note) without
    matplotlib."""
    metrics = list(dict.fromkeys(metric for by_metric in curves.values() for metric in by_metric))
    panels = [[m for m in metrics if is_cross_entropy(m)]] + [[m] for m in metrics if not is_cross_entropy(m)]
    panels = [panel for panel in panels if panel]
    plt = pyplot("comparison plot")
    if plt is None:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2 + 3 * len(panels)), sharex=True, squeeze=False)
    for panel, ax in zip(panels, axes[:, 0]):
        # a training curve as a line, each evaluation metric with markers at its evaluations
        evaluated = [m for m in panel if m.startswith(EVAL_PREFIXES)]
        styles = {m: "-" if m not in evaluated else EVAL_STYLES[evaluated.index(m) % len(EVAL_STYLES)] for m in panel}
        for color, (label, by_metric) in enumerate(curves.items()):
            for metric in panel:
                if by_metric.get(metric):
                    ax.plot(*zip(*by_metric[metric]), styles[metric], color=f"C{color % 10}",
                            label=f"{label} {metric}", linewidth=1, markersize=3)
        smoothed = weight and len(evaluated) < len(panel)
        ax.set_ylabel(" / ".join(panel) + (f"\n(training smoothed {weight})" if smoothed else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    axes[-1, 0].set_xlabel("tokens seen" if x == "tokens" else "optimizer step")
    fig.tight_layout()
    return save_png(plt, fig, out)
