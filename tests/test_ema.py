"""train.ema_decay: the moving average of the weights against a float64 recurrence over the weights of every step,
a run trained bit for bit as without it, bit-exact resume, the saved ema/ in transformers, eval_loss/ema, fp16 steps
the grad scaler skips, two processes under DDP and FSDP, refusals."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from helpers import ROOT, run_torchrun
from train_helpers import losses, prepared_corpus, run_config, same_weights, set_arguments
from ttl_core import load_pretrained
from ttl_core.config import RUNTIME_FIELDS
from ttl_core.distributed import World
from ttl_core.ema import ema_decay_at
from ttl_core.errors import CheckpointError, ConfigError
from ttl_core.metrics import read_metrics
from ttl_core.tokenizer import Tokenizer
from ttl_core.train import build_or_load_model, evaluate, train

# 0.3 is below the warmed-up decay from step 3 on ((1 + 3) / (10 + 3) = 0.31): both branches of the min in 4 steps
EMA = ["train.ema_decay=0.3"]
COMMON = ["train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=10", "train.eval_every=2",
          "model.attention_dropout=0.1"]


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_pretrained(path, dtype=torch.float32).state_dict()


def max_error(ours: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> float:
    """The largest difference of a tensor from the truth, relative to the truth's largest entry."""
    return max(float((ours[k].double() - truth[k]).abs().max() / truth[k].abs().max()) for k in truth)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The data ("prepared"), a run without the average ("plain"), the same run with it ("ema"), and the latter
    stopped after step 2 and resumed ("sliced")."""
    tmp = tmp_path_factory.mktemp("runs")
    data = str(prepared_corpus(tmp))
    train(run_config(*COMMON), tmp / "plain", data_dir=data)
    train(run_config(*COMMON, *EMA), tmp / "ema", data_dir=data)
    train(run_config(*COMMON, *EMA), tmp / "sliced", data_dir=data, stop_after=2)
    torch.manual_seed(12345)  # as in a new process
    train(run_config(*COMMON, *EMA), tmp / "sliced", data_dir=data, resume=True)
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
    """Same losses, gradient norms, eval losses (dropout on: the RNG is untouched) and weights; eval_loss/ema is the
    one figure added, at each evaluation."""
    def records(run: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "eval_loss/ema")}
                for r in read_metrics(runs / run / "metrics.jsonl")]
    assert records("ema") == records("plain") and len(losses(runs / "plain")) == 4
    assert same_weights(checkpoint(runs / "ema", 4), checkpoint(runs / "plain", 4))
    evals = [r for r in read_metrics(runs / "ema" / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all("eval_loss/ema" in r for r in evals)
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


def test_the_saved_average_loads_in_transformers_and_gives_the_logged_eval_loss(runs):
    """step-N/ema is a model directory: transformers' logits equal ttl's from it (float32 rounding), its tokenizer
    is the run's, and train.evaluate of it is the eval_loss/ema logged at that step."""
    ema = checkpoint(runs / "ema", 4) / "ema"
    ours = load_pretrained(ema, dtype=torch.float32).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(ema, local_files_only=True, dtype=torch.float32).eval()
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    assert Tokenizer.from_pretrained(ema).encode("O rio corre") == \
        Tokenizer.from_pretrained(runs / "prepared").encode("O rio corre")
    assert not torch.equal(ours.state_dict()["backbone.embed.weight"], weights(ema.parent)["backbone.embed.weight"])
    run = run_config(*COMMON, *EMA)
    runtime = {key: getattr(run.model_config(), key) for key in RUNTIME_FIELDS}
    model = load_pretrained(ema, dtype=torch.float32, **runtime)
    loss = evaluate(model, runs / "prepared", run, World(0, 1, torch.device("cpu")),
                    Tokenizer.from_pretrained(runs / "prepared").bos_id)
    logged = [r["eval_loss/ema"] for r in read_metrics(runs / "ema" / "metrics.jsonl") if r.get("step") == 4
              and "eval_loss/ema" in r]
    assert logged == [loss]


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
        train(run_config(*COMMON, *EMA, "train.max_steps=5"), tmp_path / "run", data_dir=str(runs / "prepared"),
              resume=True)


def test_a_checkpoint_whose_average_was_deleted_names_it_without_saying_its_run_had_none(runs, tmp_path, recwarn):
    """Its digests record ema/: the average was lost, not never kept, and no warning says the run had none."""
    for step in (3, 4):
        shutil.copytree(checkpoint(runs / "ema", step), checkpoint(tmp_path / "run", step))
    shutil.rmtree(checkpoint(tmp_path / "run", 4) / "ema")
    with pytest.raises(CheckpointError, match=f"^{checkpoint(tmp_path / 'run', 4)} is not a training checkpoint: "
                                              "ema/config.json is missing; the older step-000003 looks complete"):
        train(run_config(*COMMON, *EMA, "train.max_steps=5"), tmp_path / "run", data_dir=str(runs / "prepared"),
              resume=True)
    assert not [w for w in recwarn if "holds no average" in str(w.message)]


def test_an_older_checkpoint_whose_average_is_cut_short_does_not_look_complete(runs, tmp_path):
    """The advice to resume from the older checkpoint is given only where its ema/ reads too."""
    for step in (3, 4):
        shutil.copytree(checkpoint(runs / "ema", step), checkpoint(tmp_path / "run", step))
    (checkpoint(tmp_path / "run", 4) / "model.safetensors").write_bytes(b"")
    cut = checkpoint(tmp_path / "run", 3) / "ema" / "model.safetensors"
    cut.write_bytes(cut.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"; no older checkpoint \(step-000003\) looks complete either$"):
        train(run_config(*COMMON, *EMA, "train.max_steps=5"), tmp_path / "run", data_dir=str(runs / "prepared"),
              resume=True)


def test_a_run_resumed_without_an_average_starts_it_from_the_resumed_weights(runs, tmp_path):
    shutil.copytree(checkpoint(runs / "plain", 2), checkpoint(tmp_path / "run", 2))
    with pytest.warns(UserWarning, match="holds no average of the weights .*starts from the resumed weights"):
        train(run_config(*COMMON, *EMA), tmp_path / "run", data_dir=str(runs / "prepared"), resume=True,
              stop_after=3)
    truth = recurrence(weights(checkpoint(runs / "plain", 2)), [weights(checkpoint(tmp_path / "run", 3))], 0.3,
                       [False], first_step=3)[0]
    assert max_error(weights(checkpoint(tmp_path / "run", 3) / "ema"), truth) <= 4 * 2.0**-24


@pytest.mark.parametrize("override, message", [
    ("train.ema_decay=1.0", r"^train.ema_decay must lie in \[0, 1\) \(0: no average of the weights\), got 1.0$"),
    ("train.ema_decay=-0.5", r"^train.ema_decay must lie in \[0, 1\) .*got -0.5$"),
    ("train.ema_decay=nan", r"^train.ema_decay must lie in \[0, 1\) .*got nan$"),
    ("data.eval={ema=\"data/x\"}", r"^a data.mix source or data.eval set named 'ema' would log eval_loss/ema"),
])
def test_bad_settings_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        run_config(*EMA, override)


# an evaluation at every step and a checkpoint every other one: under FSDP an evaluation of the average after one of
# the step before, with no checkpoint between them (saving shards the model again), sees the average's new root weights
TWO = [*COMMON, *EMA, "train.micro_batch_size=2", "model.attention_dropout=0.0", "train.eval_every=1",
       "train.save_every=2"]


def torchrun_pretrain(data: Path, out: Path, mode: str, resume: bool = False) -> None:
    done = run_torchrun(ROOT / "scripts" / "pretrain.py", "--data", data, "--out", out, *(["--resume"] * resume),
                        *set_arguments(*TWO, f"train.distributed=\"{mode}\""))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_average_their_weights_as_one_process_does(runs, tmp_path, mode):
    """Under DDP (a whole average on each rank) and FSDP (each rank its shards), the average is as far from one
    process's (the same global batch) as the weights are, not farther: the ranks' gradient sums are added in another
    order, which AdamW's first updates magnify (both measured 3.1e-5 of a tensor's largest entry, not the 1e-5 hoped
    for), and the average is a weighted mean of weights that far apart; eval_loss/ema at each step within 1e-5
    (measured: equal)."""
    one = tmp_path / "one"
    train(run_config(*TWO, "train.micro_batch_size=4"), one, data_dir=str(runs / "prepared"))
    torchrun_pretrain(runs / "prepared", tmp_path / mode, mode)

    def distance(step: int, name: str = "") -> float:
        ours, theirs = (weights(checkpoint(run, step) / name) for run in (tmp_path / mode, one))
        return max_error(ours, {k: v.double() for k, v in theirs.items()})
    for step in (2, 4):
        assert distance(step, "ema") <= max(distance(s) for s in range(2, step + 1, 2)) + 4 * 2.0**-24, step
    figures = [[r["eval_loss/ema"] for r in read_metrics(run / "metrics.jsonl") if "eval_loss/ema" in r]
               for run in (one, tmp_path / mode)]
    print(mode, [distance(s, "ema") for s in (2, 4)], [distance(s) for s in (2, 4)], figures)
    assert len(figures[0]) == 4 and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(*figures))


@pytest.mark.slow
def test_a_sharded_run_resumes_its_average_bit_for_bit(runs, tmp_path):
    """Under FSDP the saved average is loaded whole and sharded as the model: steps 3 and 4 as the uninterrupted run."""
    torchrun_pretrain(runs / "prepared", tmp_path / "straight", "fsdp")
    shutil.copytree(checkpoint(tmp_path / "straight", 2), checkpoint(tmp_path / "resumed", 2))
    torchrun_pretrain(runs / "prepared", tmp_path / "resumed", "fsdp", resume=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")[2:]
    assert (checkpoint(tmp_path / "resumed", 4) / "ema" / "model.safetensors").read_bytes() == \
        (checkpoint(tmp_path / "straight", 4) / "ema" / "model.safetensors").read_bytes()
    evals = [[r["eval_loss/ema"] for r in read_metrics(run / "metrics.jsonl") if r["step"] > 2 and "eval_loss/ema" in r]
             for run in (tmp_path / "resumed", tmp_path / "straight")]
    assert len(evals[0]) == 2 and evals[0] == evals[1]
