"""ttl_core.metrics on its own: what MetricsLog hands a reader (metrics.jsonl while the run goes on, TensorBoard)
and which points the loss plot draws."""

import json
import math
import sys
import types

import pytest

from ttl_core.metrics import MetricsLog, plot_metrics, read_metrics


def test_a_logged_record_is_in_the_file_before_the_run_ends(tmp_path):
    """plot_metrics.py reads metrics.jsonl while the run is still going, and a crash loses no logged step."""
    log = MetricsLog(tmp_path)
    log.log({"step": 1, "loss": 2.5})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.5}]
    log.close()
    assert log.file.closed


def test_tensorboard_gets_each_numeric_value_at_its_step(tmp_path, monkeypatch):
    """A stand-in SummaryWriter (tensorboard is an optional dependency) records the scalars: every number but the
    step itself, each at the record's step."""
    scalars = []

    class Writer:
        def __init__(self, log_dir, **kwargs):
            pass

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    log = MetricsLog(tmp_path, tensorboard=True)
    log.log({"step": 7, "loss": 1.5, "lr": 3e-4, "skipped": 0, "note": "text"})
    log.close()
    assert scalars == [("loss", 1.5, 7), ("lr", 3e-4, 7), ("skipped", 0, 7)]


@pytest.fixture
def plotted(monkeypatch):
    """The (label, steps, values) of each curve plot_metrics draws."""
    import matplotlib.axes
    curves, draw = [], matplotlib.axes.Axes.plot

    def plot(self, steps, values, *style, label, **kwargs):
        curves.append((label, list(steps), list(values)))
        return draw(self, steps, values, *style, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    return curves


def write_records(run_dir, *records):
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_plot_draws_the_finite_train_and_eval_losses(tmp_path, plotted):
    write_records(tmp_path, {"step": 1, "loss": 3.0}, {"step": 2, "loss": math.nan}, {"step": 2, "eval_loss": 2.8},
                  {"step": 3, "loss": 2.5, "lr": 1e-4}, {"step": 4, "eval_loss": 2.4})
    assert plot_metrics(tmp_path) == tmp_path / "loss.png"
    assert plotted == [("train loss", [1, 3], [3.0, 2.5]), ("eval loss", [2, 4], [2.8, 2.4])]


def test_a_mixtures_plot_draws_each_sources_eval_loss_labelled_by_its_name(tmp_path, plotted):
    """eval_loss/NAME, in the order the records give them (not eval_ppl/NAME), a source's NaN left out."""
    write_records(tmp_path, {"step": 1, "loss": 3.0},
                  {"step": 2, "eval_loss": 2.9, "eval_loss/web": 2.7, "eval_ppl/web": 14.9, "eval_loss/a/b ñ": 3.1},
                  {"step": 4, "eval_loss": 2.5, "eval_loss/web": math.nan, "eval_loss/a/b ñ": 2.2})
    assert plot_metrics(tmp_path) == tmp_path / "loss.png"
    assert plotted == [("train loss", [1], [3.0]), ("eval loss", [2, 4], [2.9, 2.5]), ("web", [2], [2.7]),
                       ("a/b ñ", [2, 4], [3.1, 2.2])]


def test_a_run_whose_train_losses_are_all_nan_still_plots_its_evaluations(tmp_path, plotted):
    write_records(tmp_path, {"step": 1, "loss": math.nan}, {"step": 1, "eval_loss": 2.8})
    assert plot_metrics(tmp_path) == tmp_path / "loss.png"
    assert plotted == [("eval loss", [1], [2.8])]


def test_tensorboard_asked_for_but_missing_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    """The run goes on with metrics.jsonl alone, and the note says what to install, as the plot's does."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import then raises ImportError
    log = MetricsLog(tmp_path, tensorboard=True)
    log.log({"step": 1, "loss": 2.5})
    log.close()
    assert log.writer is None and read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.5}]
    assert "tensorboard is not installed (pip install tensorboard)" in capsys.readouterr().out


@pytest.fixture
def drawn_by_axes(monkeypatch):
    """The (label, values) of each curve drawn since the last call, by the y label of the axes it is on, and the y
    scale of each of those axes."""
    import matplotlib.axes
    drawn, draw = [], matplotlib.axes.Axes.plot

    def plot(self, steps, values, *style, label, **kwargs):
        drawn.append((self, label, list(values)))
        return draw(self, steps, values, *style, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)

    def by_axes():
        curves, scales = {}, {}
        for axes, label, values in drawn:
            curves.setdefault(axes.get_ylabel(), []).append((label, values))
            scales[axes.get_ylabel()] = axes.get_yscale()
        drawn.clear()
        return curves, scales
    return by_axes


def test_task_accuracies_are_drawn_on_axes_of_their_own_not_as_losses(tmp_path, drawn_by_axes):
    """acc/NAME and acc_norm/NAME (train.eval_tasks) are fractions of questions, not losses: below the loss axes."""
    write_records(tmp_path, {"step": 1, "loss": 3.0},
                  {"step": 2, "eval_loss": 2.9, "eval_loss/wiki": 3.2, "acc/arc": 0.25, "acc_norm/arc": 0.5},
                  {"step": 4, "eval_loss": 2.5, "eval_loss/wiki": 3.0, "acc/arc": 0.375, "acc_norm/arc": 0.625})
    assert plot_metrics(tmp_path) == tmp_path / "loss.png"
    assert drawn_by_axes()[0] == {"cross-entropy (nats/token)": [("train loss", [3.0]), ("eval loss", [2.9, 2.5]),
                                                                 ("wiki", [3.2, 3.0])],
                                  "zero-shot accuracy": [("acc/arc", [0.25, 0.375]), ("acc_norm/arc", [0.5, 0.625])]}


def test_gradient_norms_by_part_are_drawn_with_grad_norm_on_log_axes_of_their_own(tmp_path, drawn_by_axes):
    """train.log_grad_norms' grad_norm/PART, labelled PART, with the grad_norm they make up, below the losses and the
    accuracies (a NaN left out); grad_norm alone, as every run logs it, is drawn nowhere."""
    write_records(tmp_path, {"step": 1, "loss": 3.0, "grad_norm": 2.0, "grad_norm/embed": 1.2,
                             "grad_norm/layers.0": 1.6},
                  {"step": 2, "eval_loss": 2.9, "acc/arc": 0.25},
                  {"step": 2, "loss": 2.5, "grad_norm": 5.0, "grad_norm/embed": 3.0, "grad_norm/layers.0": math.nan})
    assert plot_metrics(tmp_path) == tmp_path / "loss.png"
    curves, scales = drawn_by_axes()
    assert curves == {"cross-entropy (nats/token)": [("train loss", [3.0, 2.5]), ("eval loss", [2.9])],
                      "zero-shot accuracy": [("acc/arc", [0.25])],
                      "gradient norm": [("grad_norm", [2.0, 5.0]), ("embed", [1.2, 3.0]), ("layers.0", [1.6])]}
    assert scales["gradient norm"] == "log" and scales["cross-entropy (nats/token)"] == "linear"
    write_records(tmp_path, {"step": 1, "loss": 3.0, "grad_norm": 2.0})
    plot_metrics(tmp_path)
    assert drawn_by_axes()[0] == {"cross-entropy (nats/token)": [("train loss", [3.0])]}


def test_activation_statistics_are_drawn_by_block_on_axes_of_their_own(tmp_path, drawn_by_axes):
    """train.log_activation_stats' act_rms/layers.N (log scale) and attn_logit_max/layers.N, labelled layers.N, each
    kind on its axes; the sublayers' RMS stay in metrics.jsonl only (a small plot)."""
    stats = [{"act_rms/layers.0": 1.0 + i, "act_rms/layers.1": 2.0 + i, "attn_out_rms/layers.0": 0.5,
              "attn_logit_max/layers.0": 4.0 * i - 1, "attn_logit_max/layers.1": 6.0 * i} for i in (1, 2)]
    write_records(tmp_path, {"step": 1, "loss": 3.0}, {"step": 2, "eval_loss": 2.9, **stats[0]},
                  {"step": 4, "eval_loss": 2.5, **stats[1]})
    plot_metrics(tmp_path)
    curves, scales = drawn_by_axes()
    assert curves == {"cross-entropy (nats/token)": [("train loss", [3.0]), ("eval loss", [2.9, 2.5])],
                      "residual RMS": [("layers.0", [2.0, 3.0]), ("layers.1", [3.0, 4.0])],
                      "largest attention logit": [("layers.0", [3.0, 7.0]), ("layers.1", [6.0, 12.0])]}
    assert scales["residual RMS"] == "log" and scales["largest attention logit"] == "linear"


def test_a_deep_model_s_blocks_each_have_a_colour_of_their_own(tmp_path, monkeypatch):
    """12 blocks (the 160m model's), past the 10 colours of matplotlib's default cycle: layers.10 is not drawn in
    layers.0's colour; a block has the same colour on both axes."""
    import matplotlib.axes
    drawn, draw = [], matplotlib.axes.Axes.plot

    def plot(self, *args, label, **kwargs):
        lines = draw(self, *args, label=label, **kwargs)
        drawn.append((self, label, lines[0].get_color()))
        return lines

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    stats = {f"{kind}/layers.{i}": 1.0 + i for kind in ("act_rms", "attn_logit_max") for i in range(12)}
    write_records(tmp_path, {"step": 1, "loss": 3.0}, {"step": 2, "eval_loss": 2.9, **stats})
    plot_metrics(tmp_path)
    colours = {}
    for axes, label, colour in drawn:
        colours.setdefault(axes.get_ylabel(), {})[label] = str(colour)
    rms, logits = colours["residual RMS"], colours["largest attention logit"]
    assert list(rms) == [f"layers.{i}" for i in range(12)] and len(set(rms.values())) == 12
    assert logits == rms
