"""Extra evaluation sets ([data.eval]): each logged as evaluating its directory alone, never in eval_loss, with no
effect on training (attention dropout on: an evaluation drawing from the RNG would change every later step), free to
change between resumes, beside a mixture, and refused in one line when they cannot be evaluated."""

from __future__ import annotations

import json

import pytest
import torch

from test_mixture import mix_setting
from train_helpers import corpus_file, losses, run_config
from ttl_core.data import prepare_data
from ttl_core.distributed import World
from ttl_core.errors import ConfigError, TTLError
from ttl_core.hf import load_pretrained
from ttl_core.metrics import perplexity, read_metrics
from ttl_core.run_config import load_run_config
from ttl_core.step import evaluate
from ttl_core.train import train

CPU = World(0, 1, torch.device("cpu"))


def articles(topic: str, n: int) -> str:
    """`n` Portuguese documents on `topic`, none of them in train_helpers' corpus."""
    return "\n\n".join(f"Artigo {i} sobre {topic}. A biblioteca municipal guarda mapas antigos do porto, e os "
                       f"pescadores contam que a maré subiu {i + 2} metros no inverno passado." for i in range(n))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """'a' (a tokenizer of its own) and 'b' (a's tokenizer): the halves of train_helpers' corpus, to train on;
    evaluation-only directories (--val-fraction 1) with a's tokenizer: 'wiki' and 'news', and 'tiny' (one short
    document: less than a global batch); 'other': wiki's text with a tokenizer of its own; 'noval': b prepared with
    --val-fraction 0 (an empty val.bin)."""
    tmp = tmp_path_factory.mktemp("eval_sets")
    docs = corpus_file(tmp).read_text(encoding="utf-8").split("\n\n")
    texts = {"a": "\n\n".join(docs[:30]), "b": "\n\n".join(docs[30:]), "wiki": articles("geografia", 20),
             "news": articles("política", 30), "tiny": "Uma frase curta."}
    for name, text in texts.items():
        (tmp / f"{name}.txt").write_text(text, encoding="utf-8")
    prepare_data([tmp / "a.txt"], tmp / "a", vocab_size=400, val_fraction=0.15, workers=1)
    prepare_data([tmp / "b.txt"], tmp / "b", tokenizer=tmp / "a", val_fraction=0.15, workers=1)
    for name in ("wiki", "news", "tiny"):
        prepare_data([tmp / f"{name}.txt"], tmp / name, tokenizer=tmp / "a", val_fraction=1, workers=1)
    prepare_data([tmp / "wiki.txt"], tmp / "other", vocab_size=400, val_fraction=1, workers=1)
    prepare_data([tmp / "b.txt"], tmp / "noval", tokenizer=tmp / "a", val_fraction=0, workers=1)
    return tmp


def eval_setting(**sets) -> str:
    return "data.eval={" + ",".join(f'{name}="{path}"' for name, path in sets.items()) + "}"


def eval_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]


def test_eval_sets_log_their_directory_alone_leave_training_bit_for_bit_and_may_change_on_resume(prepared, tmp_path):
    """6 steps with attention dropout, evaluated at steps 3 and 6: without eval sets, with wiki and news, and with
    them for 3 steps then resumed with news alone under another name: the same losses and eval_loss bit for bit;
    eval_loss/NAME is `evaluate` of that directory alone with the saved weights, exactly."""
    common = ("train.max_steps=6", "train.eval_every=3", "model.attention_dropout=0.1")
    data = str(prepared / "a")
    both = run_config(*common, eval_setting(wiki=prepared / "wiki", news=prepared / "news"))
    train(run_config(*common), tmp_path / "plain", data_dir=data)
    train(both, tmp_path / "sets", data_dir=data)
    train(both, tmp_path / "changed", data_dir=data, stop_after=3)
    train(run_config(*common, eval_setting(held=prepared / "news")), tmp_path / "changed", resume=True)
    runs = ("plain", "sets", "changed")
    assert losses(tmp_path / "plain") == losses(tmp_path / "sets") == losses(tmp_path / "changed")
    assert len(losses(tmp_path / "plain")) == 6
    evals = {run: eval_records(tmp_path / run) for run in runs}
    assert [[r["eval_loss"] for r in evals[run]] for run in runs] == [[r["eval_loss"] for r in evals["plain"]]] * 3
    assert [list(r) for r in evals["sets"]] == [["step", "eval_loss", "eval_ppl", "eval_loss/wiki", "eval_ppl/wiki",
                                                  "eval_loss/news", "eval_ppl/news"]] * 2
    first, resumed = evals["changed"]
    assert {"eval_loss/wiki", "eval_loss/news"} < set(first) and "eval_loss/held" in resumed
    assert not {"eval_loss/wiki", "eval_loss/news"} & set(resumed)
    checkpoint = tmp_path / "sets" / "checkpoints" / "step-000006"
    model = load_pretrained(checkpoint, dtype=torch.float32)
    alone = {name: evaluate(model, prepared / name, both, CPU, None) for name in ("wiki", "news", "a")}
    last = evals["sets"][-1]
    assert last["eval_loss/wiki"] == alone["wiki"] and last["eval_loss/news"] == alone["news"] == resumed[
        "eval_loss/held"]
    assert last["eval_loss"] == alone["a"] and last["eval_ppl/wiki"] == perplexity(alone["wiki"])
    assert len({alone["wiki"], alone["news"], alone["a"]}) == 3
    state = json.loads((tmp_path / "changed" / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["config"]["data"]["eval"] == {"held": str((prepared / "news").resolve())}


def test_a_mixture_with_an_eval_set_keeps_its_weighted_eval_loss_and_a_resumed_one_refuses_a_clashing_name(
        prepared, tmp_path):
    """eval_loss stays the mixture's weighted mean of its sources, the eval set logged beside them; a resume without
    data.mix (on the mixture its checkpoint records) refuses an eval set named as one of its sources."""
    run = run_config("train.max_steps=3", "train.eval_every=2", mix_setting(prepared / "a", prepared / "b"),
                     eval_setting(wiki=prepared / "wiki"))
    train(run, tmp_path / "mix", stop_after=2)
    [record] = eval_records(tmp_path / "mix")
    model = load_pretrained(tmp_path / "mix" / "checkpoints" / "step-000002", dtype=torch.float32)
    alone = {name: evaluate(model, prepared / name, run, CPU, None) for name in ("a", "b", "wiki")}
    assert (record["eval_loss/web"], record["eval_loss/books"], record["eval_loss/wiki"]) == (
        alone["a"], alone["b"], alone["wiki"])
    assert record["eval_loss"] == pytest.approx(0.7 * alone["a"] + 0.3 * alone["b"], rel=1e-15)
    with pytest.raises(ConfigError, match="data.eval set 'web' has the name of a data.mix source") as e:
        train(run_config("train.max_steps=3", eval_setting(web=prepared / "wiki")), tmp_path / "mix", resume=True)
    assert "\n" not in str(e.value) and len(losses(tmp_path / "mix")) == 2


@pytest.mark.parametrize("overrides, message", [
    ([eval_setting(wiki="MISSING")],
     r"^data.eval set 'wiki': .*/missing is not a prepared data directory \(no meta.json\); run "
     r"scripts/prepare_data.py$"),
    ([eval_setting(wiki="OTHER")],
     r"^data.eval set 'wiki': .*/other was prepared with another tokenizer than .*/a \(an eval set needs the training "
     r"data's: scripts/prepare_data.py --tokenizer .*/a\)$"),
    ([mix_setting("A", "A"), eval_setting(books="WIKI")],
     r"^data.eval set 'books' has the name of a data.mix source: both would log eval_loss/books; rename the set$"),
    (['data.eval={""="WIKI"}'], r"^data.eval: a set needs a name, as in wiki = \"data/wiki\"$"),
    (['data.eval={wiki={path="WIKI"}}'],
     r"^data.eval set 'wiki' must name a prepared data directory, as in wiki = \"data/wiki\"; got \{'path': "),
    ([eval_setting(wiki="")], r"^data.eval set 'wiki' must name a prepared data directory, .*; got ''$"),
    (["data.eval=3"], r"^data.eval must be a table, got 3$"),
    ([eval_setting(tiny="TINY")],
     r"^data.eval set 'tiny': .*/tiny/val.bin: \d+ tokens, fewer than one global batch needs \(4 x 32 \+ 1 = 129\); "
     r".*; or drop it from data.eval$"),
    ([eval_setting(noval="NOVAL")],
     r"^data.eval set 'noval': .*/noval has no validation split \(val.bin is empty\); drop it from data.eval, or "
     r"prepare it with a --val-fraction that holds out documents \(1: all\)$"),
])
def test_eval_sets_that_cannot_be_evaluated_are_refused_in_one_line(prepared, tmp_path, overrides, message):
    paths = {"A": prepared / "a", "WIKI": prepared / "wiki", "OTHER": prepared / "other", "TINY": prepared / "tiny",
             "NOVAL": prepared / "noval", "MISSING": tmp_path / "missing"}
    for name, path in paths.items():
        overrides = [o.replace(f'"{name}"', f'"{path}"') for o in overrides]
    mixed = any(o.startswith("data.mix") for o in overrides)
    with pytest.raises(TTLError, match=message) as e:
        train(run_config("train.max_steps=1", *overrides), tmp_path / "run",
              data_dir=None if mixed else str(prepared / "a"))
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_a_toml_data_eval_table_reads_as_the_set_override(tmp_path):
    (tmp_path / "run.toml").write_text('[data.eval]\nwiki = "data/wiki"\nnews = "data/news"\n')
    from_file = load_run_config(tmp_path / "run.toml").data.eval
    assert from_file == load_run_config(None, ['data.eval={wiki="data/wiki",news="data/news"}']).data.eval
    assert list(from_file.items()) == [("wiki", "data/wiki"), ("news", "data/news")]
