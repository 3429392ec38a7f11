"""Data mixtures ([data.mix]): rows drawn with the weights, each source in its own seeded order, the rank split,
exact resumption, a one-source mixture that is the plain run, per-source evaluation, refusals in one line, and two
processes that train as one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import ROOT, run_script, run_torchrun
from train_helpers import corpus_halves, losses, run_config, set_arguments
from ttl_core.data import prepare_data
from ttl_core.distributed import World
from ttl_core.errors import ConfigError, DataError, TTLError
from ttl_core.hf import load_pretrained
from ttl_core.loader import PackedLoader
from ttl_core.metrics import read_metrics
from ttl_core.mixture import Mixture, MixtureLoader
from ttl_core.run_config import load_run_config
from ttl_core.step import evaluate
from ttl_core.train import train

EOS = 2


def token_dir(path, first_id: int, n_tokens: int, seed: int):
    """A data dir (meta.json + train.bin) of random documents whose ids lie in [first_id, first_id + 1000): a row's
    ids tell its source."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(first_id, first_id + 1000, size=n_tokens).astype(np.uint16)
    tokens[rng.random(n_tokens) < 0.05] = EOS
    path.mkdir()
    tokens.tofile(path / "train.bin")
    (path / "meta.json").write_text(json.dumps({"dtype": "uint16", "eos_id": EOS, "vocab_size": 60000}))
    return path


@pytest.fixture
def sources(tmp_path):
    """Three token dirs of 300, 40 and 120 blocks of 8 tokens (ids from 1000, 11000, 21000)."""
    return {name: token_dir(tmp_path / name, first, 8 * blocks + 1, seed)
            for seed, (name, first, blocks) in enumerate([("web", 1000, 300), ("code", 11000, 40),
                                                          ("books", 21000, 120)])}


def mixture(paths: dict, weights: dict) -> Mixture:
    return Mixture({name: {"path": str(paths[name]), "weight": weights[name]} for name in weights})


def source_of(rows: torch.Tensor) -> np.ndarray:
    """The source index (0 web, 1 code, 2 books) of each row, from its first id that is not </s>."""
    first = [int(row[row != EOS][0]) for row in rows]
    return np.array([(i - 1000) // 10000 for i in first])


def test_the_rows_of_each_source_follow_the_weights_and_each_source_its_own_permutation(sources):
    """4000 global batches of 8 rows: each source's share of the 32,000 rows lies within 5 binomial standard
    deviations of its normalised weight (a false alarm about once in 3 million runs; the shares measured here are
    0.0005 or less from the weights, whose 5 sigma are 0.014, 0.013 and 0.011), and the blocks one source served
    are its PackedLoader's permutation of epoch 0, then of epoch 1, ... (the 40-block source of weight 3/10 cycles
    through about 240 epochs, the others fewer)."""
    weights = {"web": 5.0, "code": 3.0, "books": 2.0}  # normalised to 0.5, 0.3, 0.2
    loader = MixtureLoader(mixture(sources, weights), "train", 8, 8, seed=3)
    rows = torch.cat([next(loader)["input_ids"] for _ in range(4000)])
    drawn = source_of(rows)
    for index, (name, weight) in enumerate(weights.items()):
        p, n = weight / 10, len(drawn)
        share = float(np.mean(drawn == index))
        assert abs(share - p) <= 5 * math.sqrt(p * (1 - p) / n), (name, share, p)
        single, count = PackedLoader(sources[name], "train", 8, 8, seed=3), int(np.sum(drawn == index))
        epoch_length = single.batches_per_epoch * 8  # a PackedLoader's: the last incomplete global batch dropped
        served = np.concatenate([single.permutation(e)[:epoch_length] for e in range(-(-count // epoch_length))])
        expected = np.stack([single.tokens[b * 8:b * 8 + 8] for b in served[:count]]).astype(np.int64)
        assert torch.equal(rows[torch.from_numpy(drawn == index)], torch.from_numpy(expected)), name


def test_the_ranks_batches_make_one_process_batch_and_the_position_resumes_on_any_number_of_ranks(sources):
    """W ranks of B rows concatenated are the batch of one process of B*W, over epochs of the small source; a state
    saved by one process (through JSON) resumes on 2 or 4 ranks, and a state saved on 4 ranks in one process."""
    mix = mixture(sources, {"web": 1.0, "code": 2.0, "books": 1.0})
    one = MixtureLoader(mix, "train", 8, 12, seed=7)
    ranks = {w: [MixtureLoader(mix, "train", 8, 12 // w, seed=7, rank=r, world_size=w) for r in range(w)]
             for w in (2, 4)}
    for step in range(40):
        whole = next(one)
        for w, loaders in ranks.items():
            parts = [next(loader) for loader in loaders]
            for key in whole:
                assert torch.equal(torch.cat([p[key] for p in parts]), whole[key]), (step, w, key)
    state = json.loads(json.dumps(one.state_dict()))
    on_four = ranks[4][3].state_dict()  # the same position, but for the number of processes it was saved with
    assert {**state, "world_size": 4} == on_four and state["sources"]["code"]["served"] > 3 * 36  # epochs of 36
    following = [next(one) for _ in range(5)]
    for w in (2, 4):
        resumed = [MixtureLoader(mix, "train", 8, 12 // w, seed=7, rank=r, world_size=w) for r in range(w)]
        for loader in resumed:
            loader.load_state_dict(state)
        for whole in following:
            assert torch.equal(torch.cat([next(loader)["input_ids"] for loader in resumed]), whole["input_ids"])
    alone = MixtureLoader(mix, "train", 8, 12, seed=7)
    alone.load_state_dict(json.loads(json.dumps(ranks[4][0].state_dict())))
    assert torch.equal(next(alone)["labels"], following[0]["labels"])


def test_a_mixture_of_one_source_serves_the_plain_loader_batches_bit_for_bit(sources):
    plain = PackedLoader(sources["code"], "train", 8, 6, seed=5, rank=1, world_size=2)
    mixed = MixtureLoader(mixture(sources, {"code": 0.25}), "train", 8, 6, seed=5, rank=1, world_size=2)
    for _ in range(3 * plain.batches_per_epoch + 1):  # across epoch boundaries
        a, b = next(plain), next(mixed)
        assert all(torch.equal(a[key], b[key]) for key in a) and a.keys() == b.keys()


def test_a_loader_state_of_other_weights_sources_or_a_single_directory_is_refused_in_one_line(sources):
    mix = mixture(sources, {"web": 1.0, "code": 1.0})
    state = MixtureLoader(mix, "train", 8, 4).state_dict()
    others = [mixture(sources, {"web": 1.0, "code": 2.0}), mixture(sources, {"web": 1.0, "books": 1.0}),
              mixture({"web": sources["books"], "code": sources["code"]}, {"web": 1.0, "code": 1.0})]
    for other in others:
        with pytest.raises(DataError, match="trained on the data mixture web .*resume with the run's own data.mix"):
            MixtureLoader(other, "train", 8, 4).load_state_dict(state)
    with pytest.raises(DataError, match="trained on one data directory, not a data.mix") as e:
        MixtureLoader(mix, "train", 8, 4).load_state_dict(PackedLoader(sources["web"], "train", 8, 4).state_dict())
    with pytest.raises(DataError, match="data.mix source 'web': .*global_batch is 4") as e:
        MixtureLoader(mix, "train", 8, 2).load_state_dict(state)
    assert "\n" not in str(e.value)


# --- training ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """'a' and 'b': the two halves of train_helpers' corpus, one tokenizer (trained on 'a'); 'other': 'b' with a
    tokenizer of its own."""
    tmp = corpus_halves(tmp_path_factory.mktemp("mixture"), 30)
    prepare_data([tmp / "b.txt"], tmp / "other", vocab_size=400, val_fraction=0.15, workers=1)
    return tmp


def mix_setting(a, b, wa=0.7, wb=0.3) -> str:
    return f'data.mix={{web={{path="{a}",weight={wa}}},books={{path="{b}",weight={wb}}}}}'


def test_a_mixture_run_resumes_exactly_and_logs_each_sources_eval_as_evaluating_its_directory_alone(prepared,
                                                                                                     tmp_path):
    """3 steps + stop + resume (without a config: on the mixture the checkpoint records; or with its data.mix in
    another key order) + 3 == 6 straight, bit for bit; eval_loss/NAME is `evaluate` of that directory alone with
    the saved weights, eval_loss their mean weighted 0.7 / 0.3."""
    run = run_config("train.max_steps=6", "train.eval_every=3", mix_setting(prepared / "a", prepared / "b"))
    train(run, tmp_path / "straight")
    train(run, tmp_path / "resumed", stop_after=3)
    train(run_config("train.max_steps=6", "train.eval_every=3"), tmp_path / "resumed", resume=True)
    train(run, tmp_path / "reordered", stop_after=3)
    books_first = (f'data.mix={{books={{path="{prepared / "b"}",weight=0.3}},'
                   f'web={{path="{prepared / "a"}",weight=0.7}}}}')
    train(run_config("train.max_steps=6", "train.eval_every=3", books_first), tmp_path / "reordered", resume=True)
    assert losses(tmp_path / "reordered") == losses(tmp_path / "straight")
    records = [read_metrics(tmp_path / r / "metrics.jsonl") for r in ("straight", "resumed")]
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed") and len(losses(tmp_path / "resumed")) == 6
    recorded = [json.loads((tmp_path / r / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
                ["config"]["data"]["mix"] for r in ("straight", "resumed")]  # for the next resume to find it
    assert recorded[0] == recorded[1] and list(recorded[0]) == ["web", "books"]
    evals = [[r for r in rs if "eval_loss" in r] for rs in records]
    assert evals[0] == evals[1] and len(evals[0]) == 2
    model = load_pretrained(tmp_path / "straight" / "checkpoints" / "step-000006", dtype=torch.float32)
    alone = {name: evaluate(model, prepared / d, run, World(0, 1, torch.device("cpu")), None)
             for name, d in (("web", "a"), ("books", "b"))}
    last = evals[0][-1]
    assert last["eval_loss/web"] == alone["web"] and last["eval_loss/books"] == alone["books"]
    assert alone["web"] != alone["books"] and last["eval_ppl/web"] == pytest.approx(math.exp(alone["web"]))
    assert last["eval_loss"] == pytest.approx(0.7 * alone["web"] + 0.3 * alone["books"], rel=1e-15)


def test_a_mixture_of_one_source_trains_as_the_plain_run_bit_for_bit(prepared, tmp_path):
    overrides = ("train.max_steps=4", "train.grad_accum_steps=2")
    train(run_config(*overrides), tmp_path / "plain", data_dir=str(prepared / "a"))
    train(run_config(*overrides, f'data.mix={{only={{path="{prepared / "a"}",weight=3}}}}'), tmp_path / "mix")
    plain, mixed = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("plain", "mix"))
    assert [r["loss"] for r in plain if "loss" in r] == [r["loss"] for r in mixed if "loss" in r]
    plain_evals = [r["eval_loss"] for r in plain if "eval_loss" in r]
    assert plain_evals == [r["eval_loss/only"] for r in mixed if "eval_loss" in r] == \
        [r["eval_loss"] for r in mixed if "eval_loss" in r] and len(plain_evals) == 2


@pytest.mark.parametrize("overrides, message", [
    (['data.mix={web={path="MISSING",weight=1}}'],
     "data.mix source 'web': .*/missing is not a prepared data directory .*run scripts/prepare_data.py"),
    (['data.mix={web={path="A",weight=0}}'], "data.mix source 'web': weight must be a positive finite number, got 0"),
    (['data.mix={web={path="A",weight=-0.5}}'], "weight must be a positive finite number, got -0.5"),
    (['data.mix={web={path="A",weight=nan}}'], "weight must be a positive finite number, got nan"),
    (['data.mix={web={path="A",weight=inf}}'], "weight must be a positive finite number, got inf"),
    (['data.mix={web={path="A",weight="1"}}'], "weight must be a positive finite number, got '1'"),
    (['data.mix={web={path="A",weight=1e308},books={path="A",weight=1e308}}'],
     r"data.mix: the weights sum to inf, past a float's range; scale them down \(only their ratios count\)"),
    (['data.mix={web={path="A"}}'], "data.mix source 'web' must be a table of path and weight"),
    (['data.mix={web="A"}'], "data.mix source 'web' must be a table of path and weight"),
    (['data.mix={}'], "data.mix names no source"),
    (['data.mix={""={path="A",weight=1}}'], "data.mix: a source needs a name"),
    (['data.mix=3'], "data.mix must be a table, got 3"),
    (['data.path="A"', 'data.mix={web={path="A",weight=1}}'], "data.path .* and data.mix are exclusive"),
    ([mix_setting("A", "OTHER")], "data.mix source 'books': .*other was prepared with another tokenizer than .*a "
                                  r"\(every source needs the same: scripts/prepare_data.py --tokenizer .*a\)"),
])
def test_bad_mixtures_are_refused_in_one_line(prepared, tmp_path, overrides, message):
    for name, path in {"A": prepared / "a", "OTHER": prepared / "other", "MISSING": tmp_path / "missing"}.items():
        overrides = [o.replace(f'"{name}"', f'"{path}"') for o in overrides]
    with pytest.raises(TTLError, match=message) as e:
        train(run_config("train.max_steps=1", *overrides), tmp_path / "run")
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_data_beside_a_mixture_and_a_resume_on_other_data_are_refused_in_one_line(prepared, tmp_path):
    mix = mix_setting(prepared / "a", prepared / "b")
    with pytest.raises(ConfigError, match="--data .* names one data directory, but the config sets a data.mix"):
        train(run_config("train.max_steps=1", mix), tmp_path / "refused", data_dir=str(prepared / "a"))
    train(run_config("train.max_steps=2", "train.eval_every=0", mix), tmp_path / "run", stop_after=1)
    refusals = [
        ((run_config("train.max_steps=2", "train.eval_every=0", mix_setting(prepared / "a", prepared / "b", 1, 1)),),
         DataError, r"trained on the data mixture web \(.*a, weight 0.7\), books \(.*b, weight 0.3\), this one is "
                    r"web \(.*weight 0.5\), books \(.*weight 0.5\) \(weights normalised\)"),
        ((run_config("train.max_steps=2", "train.eval_every=0"), str(prepared / "a")), ConfigError,
         "was trained on a data mixture \\(web, books\\): resume it with its data.mix, or without --data"),
    ]
    for args, error, message in refusals:
        with pytest.raises(error, match=message) as e:
            train(args[0], tmp_path / "run", data_dir=args[1] if len(args) > 1 else None, resume=True)
        assert "\n" not in str(e.value)
    train(run_config("train.max_steps=2", "train.eval_every=0"), tmp_path / "plain", data_dir=str(prepared / "a"),
          stop_after=1)
    with pytest.raises(DataError, match="trained on one data directory, not a data.mix"):
        train(run_config("train.max_steps=2", "train.eval_every=0", mix), tmp_path / "plain", resume=True)


def test_a_toml_data_mix_table_reads_as_the_set_override(tmp_path):
    (tmp_path / "run.toml").write_text('[data.mix]\nweb = { path = "data/web", weight = 0.7 }\n'
                                       'books = { path = "data/books", weight = 0.3 }\n')
    from_file = load_run_config(tmp_path / "run.toml").data.mix
    assert from_file == load_run_config(None, [mix_setting("data/web", "data/books")]).data.mix
    assert list(from_file) == ["web", "books"] and from_file["books"] == {"path": "data/books", "weight": 0.3}


@pytest.mark.slow
def test_two_processes_train_a_mixture_as_one_process(prepared, tmp_path):
    """DDP over gloo with micro_batch_size 2 on each of 2 ranks, against 4 in one process: the same losses, grad
    norms, per-source eval losses and a data.eval set's within 1e-5."""
    prepare_data([prepared / "b.txt"], tmp_path / "held", tokenizer=prepared / "a", val_fraction=1, workers=1)
    common = ["train.max_steps=4", "train.eval_every=2", mix_setting(prepared / "a", prepared / "b"),
              f'data.eval={{held="{tmp_path / "held"}"}}']
    one = run_script("pretrain", "--out", tmp_path / "one", *set_arguments(*common, "train.micro_batch_size=4"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_torchrun(ROOT / "scripts" / "pretrain.py", "--out", tmp_path / "two",
                       *set_arguments(*common, "train.micro_batch_size=2"))
    assert two.returncode == 0, two.stderr[-3000:]
    for key in ("loss", "grad_norm", "eval_loss", "eval_loss/web", "eval_loss/books", "eval_loss/held"):
        figures = [[r[key] for r in read_metrics(tmp_path / run / "metrics.jsonl") if key in r]
                   for run in ("one", "two")]
        assert figures[1] == pytest.approx(figures[0], abs=1e-5) and len(figures[0]) in (2, 4), key

