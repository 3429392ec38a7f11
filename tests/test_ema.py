"""train.ema_decay: the moving average of the weights against a float64 recurrence over the weights of every step,
a run trained bit for bit as without it, bit-exact resume, the saved ema/ in transformers, the average's eval figures
(each data.mix source's, data.eval set's and task's) against the saved ema/ scored apart, their names and plots, fp16
steps the grad scaler skips, two processes under DDP and FSDP, refusals."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from helpers import ROOT, load_script, run_torchrun
from test_eval_sets import articles, eval_setting
from test_eval_tasks import QUESTIONS, task_setting
from test_mixture import mix_setting
from train_helpers import losses, prepared_corpus, run_config, same_weights, set_arguments
from ttl_core import load_pretrained
from ttl_core.choices import evaluate_questions, read_questions
from ttl_core.compare import comparison_curves, format_table, load_run, summarize
from ttl_core.data import prepare_data
from ttl_core.ema import averaged_names, ema_decay_at
from ttl_core.errors import CheckpointError, ConfigError
from ttl_core.evaluate import split_tokens, stream_loss
from ttl_core.metrics import is_average, plot_metrics, read_metrics
from ttl_core.tokenizer import Tokenizer
from ttl_core.train import build_or_load_model, train

# 0.3 is below the warmed-up decay from step 3 on ((1 + 3) / (10 + 3) = 0.31): both branches of the min in 4 steps
EMA = ["train.ema_decay=0.3"]
COMMON = ["train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=10", "train.eval_every=2",
          "model.attention_dropout=0.1"]
TASK_LIMIT = 8  # escolhas_pt's first questions
# every figure the average adds to an eval record of `held_out`'s runs
AVERAGED = ["eval_loss/ema", "eval_loss/ema/web", "eval_loss/ema/books", "eval_loss/ema/wiki", "acc/ema/escolhas_pt",
            "acc_norm/ema/escolhas_pt"]


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_pretrained(path, dtype=torch.float32).state_dict()


def max_error(ours: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> float:
    """The largest difference of a tensor from the truth, relative to the truth's largest entry."""
    return max(float((ours[k].double() - truth[k]).abs().max() / truth[k].abs().max()) for k in truth)


def held_out(tmp: Path) -> list[str]:
    """The data `runs` trains and evaluates on: a mixture of "web" (train_helpers' corpus) and "books", the data.eval
    set "wiki", and the task escolhas_pt."""
    return [mix_setting(tmp / "prepared", tmp / "books"), eval_setting(wiki=tmp / "wiki"), task_setting([QUESTIONS]),
            f"train.eval_task_limit={TASK_LIMIT}"]


def prepare_held_out(tmp: Path) -> list[str]:
    """`held_out`'s data prepared under `tmp` ("prepared", "books", "wiki"), and its settings."""
    prepared_corpus(tmp)
    for name, val_fraction in (("books", 0.2), ("wiki", 1)):
        (tmp / f"{name}.txt").write_text(articles(name, 40), encoding="utf-8")
        prepare_data([tmp / f"{name}.txt"], tmp / name, tokenizer=tmp / "prepared", val_fraction=val_fraction,
                     workers=1)
    return held_out(tmp)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The data ("prepared", "books", "wiki": `held_out`), a run without the average ("plain"), the same run with it
    ("ema"), and the latter stopped after step 2 and resumed ("sliced")."""
    tmp = tmp_path_factory.mktemp("runs")
    prepare_held_out(tmp)
    train(run_config(*COMMON, *held_out(tmp)), tmp / "plain")
    train(run_config(*COMMON, *EMA, *held_out(tmp)), tmp / "ema")
    train(run_config(*COMMON, *EMA, *held_out(tmp)), tmp / "sliced", stop_after=2)
    torch.manual_seed(12345)  # as in a new process
    train(run_config(*COMMON, *EMA, *held_out(tmp)), tmp / "sliced", resume=True)
    return tmp


def recurrence(start: dict[str, torch.Tensor], steps: list[dict[str, torch.Tensor]], decay: float,
               skipped: list[bool], first_step: int = 1) -> list[dict[str, torch.Tensor]]:
    """The average after each of `steps` (the weights after each optimizer step), in float64."""
    ema, out = {k: v.double() for k, v in start.items()}, []
    for step, (now, skip) in enumerate(zip(steps, skipped), start=first_step):
        if not skip:
            d = min(decay, (1 + step) / (10 + step))
            ema = {k: d * ema[k] + (1 - d) * now[k].double() for k in ema}
        out.append(ema)
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_average_is_the_float64_recurrence_over_each_step_s_weights(tmp_path, monkeypatch, dtype):
    """The checkpoint of each step holds the training weights and their average: the average is the recurrence
    ema = d * ema + (1 - d) * weights, in float64 from the run's first weights, to float32 rounding (measured 8e-8 of
    a tensor's largest entry; the bound is 4 float32 ulps). In float16, from a loss scale of 2**20, steps 1 and 3
    overflow: the grad scaler skips them, and the average stays as it was, to the bit."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**20))
    run = run_config(*COMMON, *EMA, f"train.dtype=\"{dtype}\"")
    train(run, tmp_path / "run", data_dir=str(prepared_corpus(tmp_path)))
    start = build_or_load_model(run.model_config(), run.train.seed, None, None, torch.device("cpu")).state_dict()
    steps = [weights(checkpoint(tmp_path / "run", s)) for s in range(1, 5)]
    averages = [weights(checkpoint(tmp_path / "run", s) / "ema") for s in range(1, 5)]
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    skipped = [bool(r.get("skipped")) for r in records]
    assert (skipped[0] and not all(skipped)) if dtype == "float16" else not any(skipped), skipped
    for step, (ours, truth) in enumerate(zip(averages, recurrence(start, steps, 0.3, skipped)), start=1):
        assert max_error(ours, truth) <= 4 * 2.0**-24, step
    before = [start, *averages]
    for step, skip in enumerate(skipped, start=1):  # a skipped step leaves the average as it was, bit for bit
        assert all(torch.equal(averages[step - 1][k], before[step - 1][k]) for k in start) == skip, step
    assert ema_decay_at(0.3, 2) == 0.25 and ema_decay_at(0.3, 3) == 0.3


def test_the_decay_reaches_its_setting_at_the_step_docs_training_md_gives():
    """d_t = min(d, (1 + t) / (10 + t)) reaches d at step (10d - 1) / (1 - d): 8,990 for 0.999."""
    assert ema_decay_at(0.999, 8989) < 0.999 == ema_decay_at(0.999, 8990)


def test_a_run_trains_bit_for_bit_as_without_the_average(runs):
    """Same losses, gradient norms, eval figures (dropout on: the RNG is untouched) and weights; the average's figures
    are the ones added, after the trained weights' in each eval record."""
    def records(run: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", *AVERAGED)}
                for r in read_metrics(runs / run / "metrics.jsonl")]
    assert records("ema") == records("plain") and len(losses(runs / "plain")) == 4
    assert same_weights(checkpoint(runs / "ema", 4), checkpoint(runs / "plain", 4))
    evals = [list(r) for r in read_metrics(runs / "ema" / "metrics.jsonl") if "eval_loss" in r]
    plain = [list(r) for r in read_metrics(runs / "plain" / "metrics.jsonl") if "eval_loss" in r]
    assert len(evals) == 2 and evals == [[*record, *AVERAGED] for record in plain]
    assert not (checkpoint(runs / "plain", 4) / "ema").exists()


def test_a_resumed_run_continues_the_average_bit_for_bit(runs):
    """The average's files, the weights and every figure but tokens/s are the uninterrupted run's."""
    def records(run: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(runs / run / "metrics.jsonl")]
    assert records("sliced") == records("ema")
    for step in (3, 4):
        for name in ("model.safetensors", "ema/model.safetensors"):
            assert (checkpoint(runs / "sliced", step) / name).read_bytes() == \
                (checkpoint(runs / "ema", step) / name).read_bytes(), (step, name)


def test_the_saved_average_loads_in_transformers(runs):
    """step-N/ema is a model directory: transformers' logits equal ttl's from it (float32 rounding), and its tokenizer
    is the run's."""
    ema = checkpoint(runs / "ema", 4) / "ema"
    ours = load_pretrained(ema, dtype=torch.float32).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(ema, local_files_only=True, dtype=torch.float32).eval()
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    assert Tokenizer.from_pretrained(ema).encode("O rio corre") == \
        Tokenizer.from_pretrained(runs / "prepared").encode("O rio corre")
    assert not torch.equal(ours.state_dict()["backbone.embed.weight"], weights(ema.parent)["backbone.embed.weight"])


def test_the_averaged_figures_are_those_of_the_saved_average_scored_apart(runs):
    """At each evaluation, eval_loss/ema/NAME is scripts/evaluate.py's loss (`stream_loss`) of that step's ema/ on
    the tokens the evaluation reads (eval_batches global batches of 4 x 32 tokens from the start of val.bin) to float
    rounding (bound 1e-6 relative), eval_loss/ema the sources' mean weighted 0.7 / 0.3, and acc/ema/NAME and
    acc_norm/ema/NAME are scripts/evaluate_choices.py's (`evaluate_questions`) exactly; none is the trained
    weights'."""
    directories = {"web": runs / "prepared", "books": runs / "books", "wiki": runs / "wiki"}
    questions = read_questions(QUESTIONS)[:TASK_LIMIT]
    tokenizer = Tokenizer.from_pretrained(runs / "prepared")
    worst = 0.0
    for record in [r for r in read_metrics(runs / "ema" / "metrics.jsonl") if "eval_loss" in r]:
        model = load_pretrained(checkpoint(runs / "ema", record["step"]) / "ema", dtype=torch.float32)
        truth = {}
        for name, directory in directories.items():
            tokens = split_tokens(directory, "val")[0]
            read = min(2, (len(tokens) - 1) // 32 // 4) * 4 * 32  # train.eval_batches = 2, whole global batches
            truth[name] = stream_loss(model, tokens[:read + 1], 32).loss
        truth["ema"] = 0.7 * truth["web"] + 0.3 * truth["books"]
        for name, loss in truth.items():
            key = "eval_loss/ema" if name == "ema" else f"eval_loss/ema/{name}"
            worst = max(worst, abs(record[key] - loss) / loss)
            assert record[key] == pytest.approx(loss, rel=1e-6) != record[key.replace("/ema", "")], key
        figures = evaluate_questions(model, tokenizer, questions)
        assert (record["acc/ema/escolhas_pt"], record["acc_norm/ema/escolhas_pt"]) == \
            (figures["acc"], figures["acc_norm"])
    print(f"largest relative difference of a loss: {worst:.2e}")


def test_the_averaged_figures_are_named_apart_drawn_dotted_and_compared(runs, tmp_path, monkeypatch):
    """averaged_names keeps no perplexity and cannot give a trained weights' name; loss.png draws the average's losses
    with the trained weights' and its accuracies with theirs, dotted; compare_runs draws them as logged (no
    smoothing), the losses on the cross-entropy axes, and lists each averaged accuracy in its table."""
    assert averaged_names({"eval_loss": 2.0, "eval_ppl": 7.4, "eval_loss/a/b": 3.0, "eval_ppl/a/b": 20.1,
                           "acc/ema": 0.5, "acc_norm/t": 0.25}) == \
        {"eval_loss/ema": 2.0, "eval_loss/ema/a/b": 3.0, "acc/ema/ema": 0.5, "acc_norm/ema/t": 0.25}
    assert [is_average(key) for key in ("eval_loss/ema", "eval_loss/ema/a", "acc/ema/t", "acc/ema", "eval_loss/emas",
                                        "eval_ppl/ema")] == [True, True, True, False, False, False]
    matplotlib = pytest.importorskip("matplotlib")
    drawn, draw = [], matplotlib.axes.Axes.plot

    def plot(self, xs, ys, *style, label, **kwargs):
        drawn.append((self, label, style[0] if style else "-", list(ys)))
        return draw(self, xs, ys, *style, label=label, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    shutil.copy(runs / "ema" / "metrics.jsonl", tmp_path / "metrics.jsonl")
    plot_metrics(tmp_path)
    by_axes = {}
    for axes, label, style, _ in drawn:
        by_axes.setdefault(axes.get_ylabel(), []).append((label, style))
    losses_drawn = ["web", "books", "wiki", "ema", "ema/web", "ema/books", "ema/wiki"]
    assert by_axes == {
        "cross-entropy (nats/token)": [("train loss", "-"), ("eval loss", "o-"),
                                       *((name, ".:" if name.startswith("ema") else ".--") for name in losses_drawn)],
        "zero-shot accuracy": [(f"{kind}/{ema}escolhas_pt", ".:" if ema else ".-") for ema in ("", "ema/")
                               for kind in ("acc", "acc_norm")]}
    records = read_metrics(runs / "ema" / "metrics.jsonl")
    metrics = ["loss", "eval_loss/ema/wiki", "acc/ema/escolhas_pt"]
    curves = comparison_curves([load_run(runs / "ema", "ema")], metrics, "step", 0.9)["ema"]
    for metric in metrics[1:]:
        assert curves[metric] == [(r["step"], r[metric]) for r in records if metric in r] and len(curves[metric]) == 2
    header = format_table([summarize(load_run(runs / "ema", "ema"), 0.9)]).splitlines()[0]
    assert header.endswith("acc/escolhas_pt  acc_norm/escolhas_pt  acc/ema/escolhas_pt  acc_norm/ema/escolhas_pt")


def test_the_digests_cover_the_average_and_a_damaged_one_names_its_file(runs, tmp_path):
    state = json.loads((checkpoint(runs / "ema", 4) / "trainer_state.json").read_text())
    assert {"ema/model.safetensors", "ema/config.json", "model.safetensors"} <= set(state["sha256"])
    for step in (3, 4):
        shutil.copytree(checkpoint(runs / "ema", step), checkpoint(tmp_path / "run", step))
    damaged = checkpoint(tmp_path / "run", 4) / "ema" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0x10  # a byte of the last tensor: the file stays readable
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"^{damaged}: damaged since it was saved .*the older step-000003 looks"):
        train(run_config(*COMMON, *EMA, *held_out(runs), "train.max_steps=5"), tmp_path / "run", resume=True)


def test_a_checkpoint_whose_average_was_deleted_names_it_without_saying_its_run_had_none(runs, tmp_path, recwarn):
    """Its digests record ema/: the average was lost, not never kept, and no warning says the run had none."""
    for step in (3, 4):
        shutil.copytree(checkpoint(runs / "ema", step), checkpoint(tmp_path / "run", step))
    shutil.rmtree(checkpoint(tmp_path / "run", 4) / "ema")
    with pytest.raises(CheckpointError, match=f"^{checkpoint(tmp_path / 'run', 4)} is not a training checkpoint: "
                                              "ema/config.json is missing; the older step-000003 looks complete"):
        train(run_config(*COMMON, *EMA, *held_out(runs), "train.max_steps=5"), tmp_path / "run", resume=True)
    assert not [w for w in recwarn if "holds no average" in str(w.message)]


def test_an_older_checkpoint_whose_average_is_cut_short_does_not_look_complete(runs, tmp_path):
    """The advice to resume from the older checkpoint is given only where its ema/ reads too."""
    for step in (3, 4):
        shutil.copytree(checkpoint(runs / "ema", step), checkpoint(tmp_path / "run", step))
    (checkpoint(tmp_path / "run", 4) / "model.safetensors").write_bytes(b"")
    cut = checkpoint(tmp_path / "run", 3) / "ema" / "model.safetensors"
    cut.write_bytes(cut.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"; no older checkpoint \(step-000003\) looks complete either$"):
        train(run_config(*COMMON, *EMA, *held_out(runs), "train.max_steps=5"), tmp_path / "run", resume=True)


def test_a_run_resumed_without_an_average_starts_it_from_the_resumed_weights(runs, tmp_path):
    shutil.copytree(checkpoint(runs / "plain", 2), checkpoint(tmp_path / "run", 2))
    with pytest.warns(UserWarning, match="holds no average of the weights .*starts from the resumed weights"):
        train(run_config(*COMMON, *EMA, *held_out(runs)), tmp_path / "run", resume=True, stop_after=3)
    truth = recurrence(weights(checkpoint(runs / "plain", 2)), [weights(checkpoint(tmp_path / "run", 3))], 0.3,
                       [False], first_step=3)[0]
    assert max_error(weights(checkpoint(tmp_path / "run", 3) / "ema"), truth) <= 4 * 2.0**-24


@pytest.mark.parametrize("override, message", [
    ("train.ema_decay=1.0", r"^train.ema_decay must lie in \[0, 1\) \(0: no average of the weights\), got 1.0$"),
    ("train.ema_decay=-0.5", r"^train.ema_decay must lie in \[0, 1\) .*got -0.5$"),
    ("train.ema_decay=nan", r"^train.ema_decay must lie in \[0, 1\) .*got nan$"),
    ("data.eval={ema=\"data/x\"}", r"^a data.mix source or data.eval set named 'ema' would log eval_loss/ema"),
    # the average's figure of a set named wiki
    ("data.eval={\"ema/wiki\"=\"data/x\"}", r"^a data.mix source or data.eval set named 'ema/wiki' would log "
                                          r"eval_loss/ema/wiki, a name train.ema_decay keeps for the average's "),
])
def test_bad_settings_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        run_config(*EMA, override)


def test_an_average_is_refused_for_a_resumed_mixture_with_a_source_named_ema(data_dir, tmp_path):
    """The mixture comes from the checkpoint, not the config, which validation saw: its source 'ema' would log
    eval_loss/ema beside the average's eval_loss/ema (the average's overwrote it, eval_ppl/ema left the source's)."""
    mix = f'data.mix={{ema={{path="{data_dir}",weight=1}}}}'
    train(run_config(*COMMON, mix), tmp_path / "run", stop_after=2)
    refusal = r"^a data.mix source or data.eval set named 'ema' would log eval_loss/ema"
    with pytest.raises(ConfigError, match=refusal):
        train(run_config(*COMMON, *EMA), tmp_path / "run", resume=True)
    with pytest.raises(ConfigError, match=refusal):  # and its plan
        load_script("pretrain").main(["--plan", "--out", str(tmp_path / "run"), "--resume", *set_arguments(*COMMON,
                                                                                                          *EMA)])
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r] == [1, 2]


# an evaluation at every step and a checkpoint every other one: under FSDP an evaluation of the average after one of
# the step before, with no checkpoint between them (saving shards the model again), sees the average's new root weights
TWO = [*COMMON, *EMA, "train.micro_batch_size=2", "model.attention_dropout=0.0", "train.eval_every=1",
       "train.save_every=2"]


def torchrun_pretrain(out: Path, mode: str, *settings: str, data: Path | None = None, resume: bool = False) -> None:
    done = run_torchrun(ROOT / "scripts" / "pretrain.py", "--out", out, *(["--data", data] if data else []),
                        *(["--resume"] * resume), *set_arguments(*TWO, *settings, f"train.distributed=\"{mode}\""))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_average_their_weights_as_one_process_does(runs, tmp_path, mode):
    """Under DDP (a whole average on each rank) and FSDP (each rank its shards), the average is as far from one
    process's (the same global batch) as the weights are, not farther: the ranks' gradient sums are added in another
    order, which AdamW's first updates magnify (both measured 3.1e-5 of a tensor's largest entry, not the 1e-5 hoped
    for), and the average is a weighted mean of weights that far apart; the average's figures (each source's, eval
    set's and task's) at each step within 1e-5 relative (measured: equal)."""
    one = tmp_path / "one"
    train(run_config(*TWO, *held_out(runs), "train.micro_batch_size=4"), one)
    torchrun_pretrain(tmp_path / mode, mode, *held_out(runs))

    def distance(step: int, name: str = "") -> float:
        ours, theirs = (weights(checkpoint(run, step) / name) for run in (tmp_path / mode, one))
        return max_error(ours, {k: v.double() for k, v in theirs.items()})
    for step in (2, 4):
        assert distance(step, "ema") <= max(distance(s) for s in range(2, step + 1, 2)) + 4 * 2.0**-24, step
    figures = [[r[key] for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r for key in AVERAGED]
               for run in (one, tmp_path / mode)]
    print(mode, [distance(s, "ema") for s in (2, 4)], [distance(s) for s in (2, 4)],
          max(abs(a - b) / abs(b) for a, b in zip(*figures) if b))
    assert len(figures[0]) == len(figures[1]) == 4 * len(AVERAGED)
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(*figures))


@pytest.mark.slow
def test_a_sharded_run_resumes_its_average_bit_for_bit(runs, tmp_path):
    """Under FSDP the saved average is loaded whole and sharded as the model: steps 3 and 4 as the uninterrupted run."""
    torchrun_pretrain(tmp_path / "straight", "fsdp", data=runs / "prepared")
    shutil.copytree(checkpoint(tmp_path / "straight", 2), checkpoint(tmp_path / "resumed", 2))
    torchrun_pretrain(tmp_path / "resumed", "fsdp", data=runs / "prepared", resume=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")[2:]
    assert (checkpoint(tmp_path / "resumed", 4) / "ema" / "model.safetensors").read_bytes() == \
        (checkpoint(tmp_path / "straight", 4) / "ema" / "model.safetensors").read_bytes()
    evals = [[r["eval_loss/ema"] for r in read_metrics(run / "metrics.jsonl") if r["step"] > 2 and "eval_loss/ema" in r]
             for run in (tmp_path / "resumed", tmp_path / "straight")]
    assert len(evals[0]) == 2 and evals[0] == evals[1]
