"""scripts/compare_runs.py and ttl_core.compare: the curves drawn (tokens seen counted from each run's own batch, a
resumed run's steps once, TensorBoard's smoothing), the table's figures, and bad input refused in one line."""

from __future__ import annotations

import json
import math
import random
import shutil
import sys

import pytest
from helpers import load_script
from train_helpers import prepared_corpus, run_config

from ttl_core.checkpoint import checkpoint_root
from ttl_core.cli import run_cli
from ttl_core.compare import comparison_curves, format_table, load_run, plot_comparison, smooth, summarize
from ttl_core.metrics import MetricsLog, read_metrics
from ttl_core.train import train


def write_run(run_dir, *records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def steps(first, last, batch_tokens=None, eval_every=None, loss=lambda step: 5.0 - 0.1 * step):
    """Training records of steps first..last (with batch_tokens when given) and an eval record every eval_every."""
    for step in range(first, last + 1):
        yield {"step": step, "loss": loss(step), "tokens_per_s": 1000.0,
               **({"batch_tokens": batch_tokens} if batch_tokens else {})}
        if eval_every and step % eval_every == 0:
            yield {"step": step, "eval_loss": 4.0 - 0.1 * step, "eval_ppl": math.exp(4.0 - 0.1 * step)}


def fake_checkpoint(run_dir, step, global_batch, grad_accum_steps, seq_len):
    """A checkpoint's trainer_state.json as a run writes it (the loader's position and the run's config; no digest,
    as before digests were recorded), and an optimizer.pt beside it."""
    checkpoint = checkpoint_root(run_dir) / f"step-{step:06d}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({
        "step": step, "data": {"epoch": 0, "batch": step, "global_batch": global_batch, "seq_len": seq_len},
        "config": {"train": {"grad_accum_steps": grad_accum_steps, "seq_len": seq_len}}}))
    (checkpoint / "optimizer.pt").write_bytes(b"")


def curves_of(*run_dirs, metrics=("loss", "eval_loss"), x="tokens", weight=0.0):
    return comparison_curves([load_run(d, d.name) for d in run_dirs], list(metrics), x, weight)


def independent_smoothing(values, weight):
    """TensorBoard's smoothing written as the weighted mean it is: the k-th finite value shown as
    sum_i (1 - w) w^(k-i) v_i / sum_i (1 - w) w^(k-i)."""
    finite = [v for v in values if math.isfinite(v)]
    shown = []
    for k in range(1, len(finite) + 1):
        weights = [(1 - weight) * weight ** (k - i) for i in range(1, k + 1)]
        shown.append(sum(w * v for w, v in zip(weights, finite[:k])) / sum(weights))
    return shown


@pytest.mark.parametrize("weight", [0.0, 0.6, 0.9, 0.99])
def test_smoothing_equals_the_weighted_mean_it_stands_for_and_skips_nan_and_inf(weight):
    rng = random.Random(weight)
    values = [rng.uniform(1, 6) for _ in range(300)]
    for i in rng.sample(range(300), 20):
        values[i] = rng.choice([math.nan, math.inf, -math.inf])
    points = list(enumerate(values))
    smoothed = smooth(points, weight)
    assert [x for x, _ in smoothed] == [x for x, v in points if math.isfinite(v)]
    truth = independent_smoothing(values, weight)
    assert max(abs(a - b) for (_, a), b in zip(smoothed, truth)) <= 1e-12 * max(truth)
    assert smoothed[0][1] == pytest.approx(next(v for v in values if math.isfinite(v)), rel=1e-15)  # debiased
    if weight == 0:
        assert [v for _, v in smoothed] == [v for v in values if math.isfinite(v)]


def test_the_tokens_axis_counts_each_runs_own_batch(tmp_path):
    """Runs whose optimizer steps hold other numbers of tokens (micro_batch_size x grad_accum_steps x seq_len x
    processes: 4x1x32x1 and 2x4x32x2) line up by tokens seen, eval points at their step's tokens; a run resumed with
    another grad_accum_steps counts each step at its own batch."""
    small = write_run(tmp_path / "small", *steps(1, 6, batch_tokens=4 * 1 * 32 * 1, eval_every=3))
    big = write_run(tmp_path / "big", *steps(1, 3, batch_tokens=2 * 4 * 32 * 2, eval_every=3))
    regrown = write_run(tmp_path / "regrown", *steps(1, 2, batch_tokens=128), *steps(3, 4, batch_tokens=256))
    curves = curves_of(small, big, regrown)
    assert [x for x, _ in curves["small"]["loss"]] == [128 * s for s in range(1, 7)]
    assert [x for x, _ in curves["small"]["eval_loss"]] == [384, 768]
    assert curves["big"]["loss"] == [(512 * s, 5.0 - 0.1 * s) for s in range(1, 4)]
    assert curves["big"]["eval_loss"] == [(1536, pytest.approx(3.7))]
    assert [x for x, _ in curves["regrown"]["loss"]] == [128, 256, 512, 768]
    assert "eval_loss" not in curves["regrown"]  # a run without evaluations is drawn without them
    assert [x for x, _ in curves_of(small, x="step")["small"]["eval_loss"]] == [3, 6]


def test_activation_statistics_are_evaluation_figures_drawn_as_logged(tmp_path):
    """train.log_activation_stats' figures come with the eval records: a spike at one evaluation is drawn as it was,
    not averaged into the evaluations before it as a training curve is."""
    stats = {3: {"act_rms/layers.0": 1.5, "attn_logit_max/layers.1": 4.0},
             6: {"act_rms/layers.0": 9.0, "attn_logit_max/layers.1": 40.0}}
    run = write_run(tmp_path / "run", *[{**r, **stats.get(r["step"], {})} if "eval_loss" in r else r
                                        for r in steps(1, 6, batch_tokens=128, eval_every=3)])
    curves = curves_of(run, metrics=["act_rms/layers.0", "attn_logit_max/layers.1"], x="step", weight=0.9)["run"]
    assert curves == {"act_rms/layers.0": [(3, 1.5), (6, 9.0)], "attn_logit_max/layers.1": [(3, 4.0), (6, 40.0)]}


def test_a_run_logged_before_batch_tokens_takes_its_batch_from_its_newest_checkpoint(tmp_path, capsys):
    """global_batch (micro_batch_size x processes) x grad_accum_steps x seq_len of the newest checkpoint, for every
    step; without a checkpoint the tokens are unknown: the table says '-', and --x tokens is refused for --x step."""
    old = write_run(tmp_path / "old", *steps(1, 6, eval_every=3))
    fake_checkpoint(old, 2, global_batch=2, grad_accum_steps=1, seq_len=16)
    fake_checkpoint(old, 4, global_batch=8, grad_accum_steps=3, seq_len=32)
    assert [x for x, _ in curves_of(old)["old"]["loss"]] == [768 * s for s in range(1, 7)]
    assert summarize(load_run(old, "old"), 0.0)["tokens"] == 6 * 768
    shutil.rmtree(checkpoint_root(old))
    assert summarize(load_run(old, "old"), 0.0)["tokens"] is None
    with pytest.raises(SystemExit):
        run_cli(load_script("compare_runs").main, [str(old), "--out", str(tmp_path / "c.png")])
    assert capsys.readouterr().err == (f"error: {old}: its metrics.jsonl logs no batch_tokens (fine-tuning runs do "
                                       "not, nor did pretraining before 2026-12) and it has no checkpoint recording "
                                       "its batch; compare with --x step\n")


def test_a_resumed_runs_rewound_steps_are_drawn_once_with_the_values_logged_last(tmp_path):
    """A run resumed from step 3 after logging 6 steps: MetricsLog cut the file back to step 3, so steps 4-6 are the
    resumed run's, each once. A file whose steps go back (concatenated by hand) is refused, not drawn over itself."""
    (tmp_path / "run").mkdir()
    first = MetricsLog(tmp_path / "run")
    for record in steps(1, 6, batch_tokens=64, eval_every=3):
        first.log(record)
    first.close()
    resumed = MetricsLog(tmp_path / "run", resume_step=3)
    for record in steps(4, 5, batch_tokens=64, eval_every=3, loss=lambda step: 9.0 + step):
        resumed.log(record)
    resumed.close()
    curves = curves_of(tmp_path / "run")["run"]
    assert curves["loss"] == [(64, 4.9), (128, 4.8), (192, 4.7), (256, 13.0), (320, 14.0)]
    assert [x for x, _ in curves["eval_loss"]] == [192]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    write_run(tmp_path / "concatenated", *records, *records[-2:])
    with pytest.raises(ValueError, match=r"^\S+metrics.jsonl: training step 4 follows step 5; ttl writes each step "
                                         r"once, cutting the file back to the step a run resumes from$"):
        load_run(tmp_path / "concatenated", "c")


def test_the_table_holds_each_runs_figures(tmp_path, capsys):
    """Steps logged, tokens, last and lowest eval loss with their steps, the last smoothed training loss (NaN
    skipped), the median tokens/s (inf skipped) and each accuracy's last finite value; '-' where a run has none."""
    a = write_run(tmp_path / "a",
                  {"step": 1, "loss": 4.0, "tokens_per_s": 100.0, "batch_tokens": 64},
                  {"step": 2, "loss": math.nan, "tokens_per_s": 900.0, "batch_tokens": 64},  # a mean would be 400
                  {"step": 2, "eval_loss": 3.5, "acc/arc": 0.25, "acc_norm/arc": 0.5},
                  {"step": 3, "loss": 3.0, "tokens_per_s": math.inf, "batch_tokens": 64},
                  {"step": 4, "loss": 2.0, "tokens_per_s": 200.0, "batch_tokens": 64},
                  {"step": 4, "eval_loss": 3.625, "acc/arc": 0.5, "acc_norm/arc": math.nan})
    b = write_run(tmp_path / "b", *steps(1, 2, batch_tokens=32))
    script = load_script("compare_runs")
    script.main([str(a), str(b), "--out", str(tmp_path / "c.png"), "--smooth", "0.5", "--labels", "A", "B",
                 "--json", str(tmp_path / "table.json")])
    # smoothed with weight 0.5 over 4, 3, 2: (2, 2.5, 2.25) / (0.5, 0.75, 0.875), the last 18/7
    row_a = {"label": "A", "run": str(a), "steps": 4, "tokens": 256, "last_eval_loss": 3.625, "last_eval_step": 4,
             "best_eval_loss": 3.5, "best_eval_step": 2, "train_loss_smoothed": 18 / 7, "tokens_per_s_median": 200.0,
             "acc/arc": 0.5, "acc_norm/arc": 0.5}
    row_b = {"label": "B", "run": str(b), "steps": 2, "tokens": 64, "last_eval_loss": None, "last_eval_step": None,
             "best_eval_loss": None, "best_eval_step": None, "train_loss_smoothed": pytest.approx(4.8 + 0.1 / 3),
             "tokens_per_s_median": 1000.0}
    assert json.loads((tmp_path / "table.json").read_text()) == [row_a, row_b]
    assert capsys.readouterr().out.splitlines()[:3] == [
        "run  steps  tokens  eval_loss (last)  eval_loss (best)  train loss (smoothed)  tokens/s (median)  acc/arc"
        "  acc_norm/arc",
        "A    4      256     3.6250 @ 4        3.5000 @ 2        2.5714                 200                0.5000"
        "   0.5000",
        "B    2      64      -                 -                 4.8333                 1,000              -"
        "        -"]


@pytest.mark.parametrize("argv, message", [
    (["{empty}"], "{empty}/metrics.jsonl does not exist: is {empty} a training run directory?"),
    (["{a}", "--metric", "acc/nope"], "--metric acc/nope: no run logs it; they log loss, tokens_per_s, batch_tokens, "
                                      "eval_loss, eval_ppl, grad_norm"),
    (["{a}", "{b}", "--labels", "x"], "--labels gives 1 labels for 2 runs"),
    (["{a}", "{b}", "--labels", "x", "x"], "'x' names two runs; give each run its own label (--labels)"),
    (["{a}", "{a}", "--labels", "x", "y"], "{a} is given twice; give each run once"),
    (["{a}", "{a}/"], "{a}/ is given twice; give each run once"),
    (["{a}", "{b}", "--metric", "grad_norm"], "{b}/metrics.jsonl: all 2 grad_norm values are NaN or infinite; "
                                              "nothing to compare"),
    (["{a}", "{b}", "--metric", "eval_loss"], "{b}/metrics.jsonl logs no eval_loss; nothing to compare"),
    (["{a}", "--out", "{tmp}/missing/c.png"], "--out {tmp}/missing/c.png: the directory {tmp}/missing does not exist"),
    (["{a}", "--json", "{tmp}/missing/t.json"], "--json {tmp}/missing/t.json: the directory {tmp}/missing does "
                                                "not exist"),
    (["{repeated}"], "{repeated}/metrics.jsonl: training step 2 follows step 2; ttl writes each step once, cutting "
                     "the file back to the step a run resumes from"),
    (["{gap}"], "{gap}/metrics.jsonl: eval_loss at step 4, which has no training record to count its tokens by; "
                "compare with --x step"),
])
def test_bad_input_is_refused_in_one_line(tmp_path, capsys, argv, message):
    places = {"tmp": tmp_path, **{name: tmp_path / name for name in ("empty", "a", "b", "repeated", "gap")}}
    (tmp_path / "empty").mkdir()
    write_run(tmp_path / "a", *steps(1, 3, batch_tokens=64, eval_every=3), {"step": 3, "grad_norm": 1.0})
    write_run(tmp_path / "b", *({**r, "grad_norm": math.nan} for r in steps(1, 2, batch_tokens=64)))
    write_run(tmp_path / "repeated", *steps(1, 2, batch_tokens=64), *steps(2, 3, batch_tokens=64))
    write_run(tmp_path / "gap", *steps(1, 3, batch_tokens=64), {"step": 4, "eval_loss": 3.0})
    argv = [arg.format(**places) for arg in argv]
    with pytest.raises(SystemExit) as exit:
        run_cli(load_script("compare_runs").main,
                [*argv, *(["--out", str(tmp_path / "c.png")] * ("--out" not in argv))])
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"error: {message.format(**places)}\n"
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("metric, shown", [("skipped", "true or false (False at step 1)"),
                                            ("spike", "a list of names (['loss'] at step 2)")])
def test_a_flag_or_a_list_of_names_is_refused_as_no_curve_in_one_line(tmp_path, capsys, metric, shown):
    """An fp16 run logs `skipped` at every step, a spike-skipping run `skipped` and `spike` at the steps it skips: a
    flag and a list of names, which ttl wrote so, are named as such, not blamed on the file as a damaged record is."""
    records = list(steps(1, 3, batch_tokens=64))
    records[0]["skipped"] = False
    records[1].update(skipped=True, spike=["loss"])
    write_run(tmp_path / "a", *records)
    with pytest.raises(SystemExit):
        run_cli(load_script("compare_runs").main, [str(tmp_path / "a"), "--metric", metric, "--out",
                                                   str(tmp_path / "c.png")])
    assert capsys.readouterr().err == (f"error: --metric {metric}: {tmp_path / 'a' / 'metrics.jsonl'} logs it as "
                                       f"{shown}, not a number: there is no curve to draw\n")
    assert not (tmp_path / "c.png").exists()


def test_the_figure_draws_every_runs_curves_and_is_written(tmp_path, monkeypatch):
    """Each run's smoothed loss and eval loss on the top axes, another metric on axes of its own, in one PNG."""
    matplotlib = pytest.importorskip("matplotlib")
    drawn, draw = [], matplotlib.axes.Axes.plot

    def plot(self, xs, ys, *style, label, **kwargs):
        drawn.append((self, label, list(xs), list(ys)))
        return draw(self, xs, ys, *style, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    a = write_run(tmp_path / "a", *steps(1, 4, batch_tokens=64, eval_every=2))
    b = write_run(tmp_path / "b", *({**r, "grad_norm": 1.5} for r in steps(1, 2, batch_tokens=128)))
    curves = curves_of(a, b, metrics=("loss", "eval_loss", "grad_norm"), weight=0.5)
    out = plot_comparison(curves, "tokens", 0.5, tmp_path / "c.png")
    assert out == tmp_path / "c.png" and out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert [(label, xs, ys) for _, label, xs, ys in drawn] == [
        ("a loss", [64, 128, 192, 256], [y for _, y in smooth([(s, 5.0 - 0.1 * s) for s in range(1, 5)], 0.5)]),
        ("a eval_loss", [128, 256], [3.8, 3.6]),
        ("b loss", [128, 256], [y for _, y in smooth([(1, 4.9), (2, 4.8)], 0.5)]),
        ("b grad_norm", [128, 256], [1.5, 1.5])]
    axes = [ax for ax, *_ in drawn]
    assert axes[0] is axes[1] is axes[2] is not axes[3]
    assert format_table([summarize(load_run(a, "a"), 0.5)]).splitlines()[1].startswith("a    4      256 ")


def test_without_matplotlib_the_table_still_prints(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # its import then raises ImportError
    a = write_run(tmp_path / "a", *steps(1, 2, batch_tokens=64))
    assert load_script("compare_runs").main([str(a), "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith(f"{a}  2      128 ")
    assert out.endswith("note: matplotlib is not installed (pip install matplotlib); no comparison plot written\n")
    assert not (tmp_path / "c.png").exists()


def test_a_real_resumed_run_logs_its_batch_and_compares_by_it_logged_or_not(tmp_path):
    """A tiny run stopped at step 3, resumed from its step-2 checkpoint (the newer one lost) to step 5: steps 1-5
    once each, at 4 x 32 tokens a step, by the logged batch_tokens and by the checkpoint's record alike."""
    data = prepared_corpus(tmp_path)
    run = run_config("train.max_steps=5", "train.save_every=2", "train.eval_every=3")
    train(run, tmp_path / "run", data_dir=str(data), stop_after=3)
    shutil.rmtree(checkpoint_root(tmp_path / "run") / "step-000003")
    train(run, tmp_path / "run", data_dir=str(data), resume=True)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["batch_tokens"] for r in records if "loss" in r] == [4 * 32] * 5
    logged = curves_of(tmp_path / "run")["run"]
    assert [x for x, _ in logged["loss"]] == [128 * s for s in range(1, 6)]
    assert [x for x, _ in logged["eval_loss"]] == [384, 640]
    write_run(tmp_path / "run", *({k: v for k, v in r.items() if k != "batch_tokens"} for r in records))
    assert curves_of(tmp_path / "run")["run"] == logged


def classifier_run(run_dir, loss=lambda step: 0.7 - 0.05 * step):
    """metrics.jsonl as scripts/finetune_classifier.py writes it: a loss per example at each step, no batch_tokens,
    and an evaluation of accuracy and F1 after each epoch of 2 steps."""
    records = []
    for step in range(1, 5):
        records.append({"step": step, "epoch": (step + 1) // 2, "loss": loss(step), "lr": 1e-4, "grad_norm": 1.0})
        if step % 2 == 0:
            records.append({"step": step, "epoch": step // 2, "eval_accuracy": 0.5 + 0.1 * step, "eval_f1": 0.5})
    return write_run(run_dir, *records)


def test_losses_per_example_and_per_token_do_not_share_axes(tmp_path, capsys):
    """A classifier fine-tuning run's loss (per example) drawn on the language model's axes of nats per token would
    read as comparable: refused in one line; classifier runs compare among themselves, and beside a language model
    on metrics that are no loss."""
    classifier = classifier_run(tmp_path / "classifier")
    pretraining = write_run(tmp_path / "pretraining", *({**r, "grad_norm": 2.0} if "loss" in r else r
                                                                 for r in steps(1, 4, 64, 2)))
    with pytest.raises(SystemExit) as exit:
        run_cli(load_script("compare_runs").main, [str(classifier), str(pretraining), "--x", "step", "--out",
                                                   str(tmp_path / "c.png")])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {classifier}'s loss is a cross-entropy (nats/example), {pretraining}'s a cross-entropy (nats/token): "
        "losses in other units do not share axes; compare runs of one kind, or --metric without losses\n")
    assert not (tmp_path / "c.png").exists()
    other = classifier_run(tmp_path / "other", loss=lambda step: 0.9 - 0.1 * step)
    assert curves_of(classifier, other, x="step")["other"]["loss"] == [(s, 0.9 - 0.1 * s) for s in range(1, 5)]
    both = curves_of(classifier, pretraining, metrics=("grad_norm",), x="step")
    assert both == {"classifier": {"grad_norm": [(s, 1.0) for s in range(1, 5)]},
                    "pretraining": {"grad_norm": [(s, 2.0) for s in range(1, 5)]}}
