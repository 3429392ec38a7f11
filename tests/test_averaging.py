"""Checkpoint averaging (ttl_core.averaging, scripts/average_checkpoints.py): every tensor the float64 mean of the
checkpoints' rounded once to the output dtype, and every input it cannot average refused in one line."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import load_script
from train_helpers import random_model, run_config
from ttl_core import load_pretrained
from ttl_core.averaging import RECORD, average_checkpoints
from ttl_core.cli import run_cli
from ttl_core.evaluate import split_tokens, stream_loss
from ttl_core.finetune import SAMPLE_DATA
from ttl_core.hf import save_native, save_pretrained
from ttl_core.tokenizer import Tokenizer
from ttl_core.tokenizer_train import train_tokenizer
from ttl_core.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir) -> Path:
    """A real tiny run that kept its checkpoints of steps 2, 3 and 4, each with the moving average of the weights."""
    run_dir = tmp_path_factory.mktemp("avg") / "run"
    train(run_config("train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=3", "train.ema_decay=0.5"),
          run_dir, data_dir=str(data_dir))
    return run_dir


def steps(run_dir: Path, *numbers: int) -> list[Path]:
    return [run_dir / "checkpoints" / f"step-{n:06d}" for n in numbers]


def stored(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def nearest(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float64 `x` rounded to the nearest `dtype` value, ties to even: of torch's cast (which may round twice, through
    float32) and its neighbours, the closest by float64 distance (exact where they lie within a factor of two of x,
    everywhere but next to zero)."""
    cast = x.to(dtype)
    candidates = torch.stack([torch.nextafter(cast, torch.full_like(cast, -math.inf)), cast,
                              torch.nextafter(cast, torch.full_like(cast, math.inf))])
    even = (candidates.view(torch.int16 if dtype.itemsize == 2 else torch.int32) & 1) == 0
    distance = (candidates.double() - x).abs()
    closest = distance == distance.min(0).values
    picked = closest & (even | (closest.sum(0) == 1))  # of two equally close, the even one
    return candidates.gather(0, picked.int().argmax(0, keepdim=True))[0]


def reference_mean(dirs: list[Path], weights: list[float], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each tensor's weighted mean computed in float64 at once (no running sum), rounded once to `dtype`."""
    tensors = [stored(d) for d in dirs]
    w = torch.tensor(weights, dtype=torch.float64)
    return {key: nearest(torch.tensordot(w, torch.stack([t[key].double() for t in tensors]), 1) / w.sum(), dtype)
            for key in tensors[0]}


def assert_bit_for_bit(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_the_last_k_of_a_run_average_bit_for_bit_and_evaluate(run_dir, data_dir, tmp_path, capsys):
    script = load_script("average_checkpoints")
    assert script.main([str(run_dir), "--last", "2", "--out", str(tmp_path / "avg")]) == 0
    newest = steps(run_dir, 4)[0]
    record = json.loads((tmp_path / "avg" / RECORD).read_text())
    assert record["checkpoints"] == [str(p.resolve()) for p in steps(run_dir, 3, 4)] and record["weights"] == [1, 1]
    # float32 in, float32 out: the float64 mean of two float32 values is exact, so it is rounded once, bit for bit
    averaged = stored(tmp_path / "avg")
    assert_bit_for_bit(averaged, reference_mean(steps(run_dir, 3, 4), [1, 1], torch.float32))
    assert not torch.equal(averaged["model.norm.weight"], stored(newest)["model.norm.weight"])
    for name in ("tokenizer.model", "generation_config.json"):
        assert (tmp_path / "avg" / name).read_bytes() == (newest / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg"]  # no partial directory left behind
    evaluate = load_script("evaluate")
    assert evaluate.main(["--model", str(tmp_path / "avg"), "--data", str(data_dir), "--seq-len", "32",
                          "--json", str(tmp_path / "val.json")]) == 0
    want = stream_loss(load_pretrained(tmp_path / "avg"), split_tokens(data_dir, "val")[0], 32)
    assert json.loads((tmp_path / "val.json").read_text())["loss"] == pytest.approx(want.loss, rel=1e-6)


def test_the_newest_checkpoint_s_tokenizer_settings_and_generation_config_go_with_the_average(run_dir, tmp_path):
    """Checkpoints of one vocabulary may differ in how their tokenizer adds </s> and in their generation settings:
    the average carries the newest's (the last given), not the oldest's."""
    dirs = [tmp_path / name for name in ("older", "newer")]
    for d, source in zip(dirs, steps(run_dir, 3, 4)):
        shutil.copytree(source, d)
    config = json.loads((dirs[1] / "tokenizer_config.json").read_text())
    (dirs[1] / "tokenizer_config.json").write_text(json.dumps({**config, "add_eos_token": True}))
    generation = json.loads((dirs[1] / "generation_config.json").read_text())
    (dirs[1] / "generation_config.json").write_text(json.dumps({**generation, "temperature": 0.25}))
    average_checkpoints(dirs, tmp_path / "avg")
    text = "uma frase qualquer"
    newest, older = Tokenizer.from_pretrained(dirs[1]), Tokenizer.from_pretrained(dirs[0])
    assert newest.encode(text) != older.encode(text)  # the settings differ where it shows
    assert Tokenizer.from_pretrained(tmp_path / "avg").encode(text) == newest.encode(text)
    assert json.loads((tmp_path / "avg" / "generation_config.json").read_text())["temperature"] == 0.25


@pytest.mark.parametrize("weights, dtype", [([1.0, 2.0, 0.5], None), ([0.2, 0.0, 0.8], "bfloat16")])
def test_weighted_averages_are_the_float64_weighted_mean_rounded_once(run_dir, tmp_path, weights, dtype):
    dirs = steps(run_dir, 2, 3, 4)
    average_checkpoints(dirs, tmp_path / "avg", weights, dtype)
    want_dtype = torch.bfloat16 if dtype else torch.float32
    assert_bit_for_bit(stored(tmp_path / "avg"), reference_mean(dirs, weights, want_dtype))
    assert json.loads((tmp_path / "avg" / "config.json").read_text())["dtype"] == (dtype or "float32")


def random_checkpoints(tmp_path: Path, count: int, dtype: str, *overrides: str) -> list[Path]:
    run = run_config(*overrides)
    dirs = [tmp_path / f"ckpt{seed}" for seed in range(count)]
    for seed, d in enumerate(dirs):
        save_pretrained(random_model(run, seed).eval(), d, dtype=dtype)
    return dirs


def test_bfloat16_checkpoints_average_to_the_float64_mean_in_bfloat16(tmp_path):
    dirs = random_checkpoints(tmp_path, 3, "bfloat16")
    average_checkpoints(dirs, tmp_path / "avg")
    averaged = stored(tmp_path / "avg")
    assert_bit_for_bit(averaged, reference_mean(dirs, [1, 1, 1], torch.bfloat16))
    # a bfloat16 running sum would round after each addition: the float64 one differs from it somewhere
    tensors = [stored(d)["model.embed_tokens.weight"] for d in dirs]
    rounded_running = ((tensors[0] + tensors[1]) + tensors[2]) / 3
    assert not torch.equal(rounded_running, averaged["model.embed_tokens.weight"])


@pytest.mark.parametrize("dtype, step", [("bfloat16", 2 ** -7), ("float16", 2 ** -10)])
def test_a_narrower_output_dtype_is_rounded_to_once_not_through_float32(tmp_path, dtype, step):
    """A mean half a float32 step above the tie between 1 and 1 + step: torch's float64 -> bfloat16 / float16 cast
    goes through float32, which rounds it onto the tie (the even side), and the tie then to the even 1; the nearest
    value, rounded once, is 1 + step."""
    dirs = random_checkpoints(tmp_path, 2, "float32")
    tie = 1 + step / 2
    for d, value in zip(dirs, (tie, tie + 2 ** -23)):  # float32 values: their mean is exact in float64
        tensors = stored(d)
        tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], value)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    average_checkpoints(dirs, tmp_path / "avg", dtype=dtype)
    assert stored(tmp_path / "avg")["model.norm.weight"].unique().tolist() == [1 + step]


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_the_average_with_ttl_s_logits_and_tied_embeddings_stay_tied(tmp_path, tied):
    import transformers
    dirs = random_checkpoints(tmp_path, 2, "float32", f"model.tie_word_embeddings={str(tied).lower()}")
    average_checkpoints(dirs, tmp_path / "avg")
    with safe_open(tmp_path / "avg" / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) != tied
    ours = load_pretrained(tmp_path / "avg")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "avg").eval()
    assert (ours.lm_head.weight is ours.backbone.embed.weight) == tied
    assert (theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()) == tied
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() <= 1e-5


def test_a_tied_table_stored_under_the_head_s_name_and_native_checkpoints_average_alike(tmp_path, capsys):
    dirs = random_checkpoints(tmp_path, 2, "float32", "model.tie_word_embeddings=true")
    average_checkpoints(dirs, tmp_path / "avg")
    # safetensors' save_model keeps a shared tensor under its first name in sorted order, lm_head.weight
    as_head = [edited_copy(d, tmp_path / f"head{i}", lambda t: {"lm_head.weight" if k == "model.embed_tokens.weight"
                                                                 else k: v for k, v in t.items()})
               for i, d in enumerate(dirs)]
    average_checkpoints(as_head, tmp_path / "avg_head")
    assert_bit_for_bit(stored(tmp_path / "avg_head"), stored(tmp_path / "avg"))
    native = [tmp_path / f"native{i}" for i in range(2)]
    for d, n in zip(dirs, native):
        save_native(load_pretrained(d), n)
    average_checkpoints(native, tmp_path / "avg_native")
    assert_bit_for_bit(stored(tmp_path / "avg_native"), stored(tmp_path / "avg"))
    both = [edited_copy(d, tmp_path / f"both{i}", lambda t: {**t, "lm_head.weight": torch.randn(400, 64)})
            for i, d in enumerate(dirs)]
    assert "ties the LM head to the embedding, yet lm_head.weight is stored" in refusal(capsys, *both, "--out",
                                                                                         tmp_path / "x")
    assert "layout is 'Hugging Face' in the first, 'ttl-native' in the second" in \
        refusal(capsys, dirs[0], native[1], "--out", tmp_path / "x")


def refusal(capsys, *argv: str) -> str:
    """The one `error:` line the script ends with on `argv` (exit status 2)."""
    with pytest.raises(SystemExit) as raised:
        run_cli(load_script("average_checkpoints").main, list(map(str, argv)))
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith((" ", "usage:"))]
    assert raised.value.code == 2 and len(errors) == 1, errors
    return errors[0]


def test_every_refusal_is_one_line(run_dir, tmp_path, capsys, monkeypatch):
    a, b, c = steps(run_dir, 2, 3, 4)
    out = ["--out", tmp_path / "avg"]
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # an empty folder, which --out . would have replaced from under the shell
    assert "'.' is the working directory or a folder holding it" in refusal(capsys, a, b, "--out", ".")
    assert "argument --out: an empty path (an unset shell variable?)" in refusal(capsys, a, b, "--out", "")
    assert "'..' is the working directory or a folder holding it" in refusal(capsys, a, b, "--out", "..")
    monkeypatch.undo()
    assert "at least 2 checkpoints, got 1" in refusal(capsys, a, *out)
    assert "given twice" in refusal(capsys, a, b, a, *out)
    assert f"would replace {b}, one of the checkpoints averaged" in refusal(capsys, a, b, "--out", b, "--overwrite")
    for holder in (run_dir, run_dir / "checkpoints"):  # --overwrite would delete the run with its checkpoints
        assert f"{holder} would replace {b}, one of the checkpoints averaged" in \
            refusal(capsys, run_dir, "--last", "2", "--out", holder, "--overwrite")
    assert (c / "model.safetensors").exists() and (run_dir / "metrics.jsonl").exists()
    # inside a checkpoint (as its ema/), the average would break the digests or go when the run prunes it
    ema_files = {f.name: f.read_bytes() for f in (b / "ema").iterdir()}  # the run trains with train.ema_decay
    assert f"{b / 'ema'} lies inside {b}, one of the checkpoints averaged" in \
        refusal(capsys, a, b, "--out", b / "ema", "--overwrite")
    assert {f.name: f.read_bytes() for f in (b / "ema").iterdir()} == ema_files
    assert "non-negative, got [1.0, -1.0]" in refusal(capsys, a, b, "--weights", "1", "-1", *out)
    assert "finite and non-negative, got [1.0, nan]" in refusal(capsys, a, b, "--weights", "1", "nan", *out)
    assert "positive, finite sum, got [0.0, 0.0]" in refusal(capsys, a, b, "--weights", "0", "0", *out)
    assert "3 weights for 2 checkpoints" in refusal(capsys, a, b, "--weights", "1", "1", "1", *out)
    assert "holds 3 complete checkpoint(s) (step-000002, step-000003, step-000004); asked for the last 4" in \
        refusal(capsys, run_dir, "--last", "4", *out)
    assert "--last must be >= 2" in refusal(capsys, run_dir, "--last", "1", *out)
    assert "is a run directory: pass --last K" in refusal(capsys, run_dir, a, *out)
    assert "not a run directory" in refusal(capsys, a, "--last", "2", *out)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert f"{adapter} is a LoRA adapter" in refusal(capsys, a, adapter, *out)
    other = random_checkpoints(tmp_path, 1, "float32", "model.intermediate_size=96")[0]
    assert "different models: intermediate_size is 128 in the first, 96 in the second" in \
        refusal(capsys, a, other, *out)
    (tmp_path / "avg").mkdir()
    (tmp_path / "avg" / "notes.txt").write_text("mine")
    assert "already holds files (notes.txt); pass --overwrite" in refusal(capsys, a, b, *out)
    assert (tmp_path / "avg" / "notes.txt").exists()
    assert load_script("average_checkpoints").main([str(a), str(b), "--out", str(tmp_path / "avg"),
                                                    "--overwrite"]) == 0
    assert not (tmp_path / "avg" / "notes.txt").exists()


def edited_copy(checkpoint: Path, where: Path, edit) -> Path:
    """A copy of `checkpoint` whose model.safetensors `edit` rewrites (a dict of tensors in, one out)."""
    copy = shutil.copytree(checkpoint, where)
    (copy / "trainer_state.json").unlink(missing_ok=True)  # a run's digests would name the edit first
    save_file(edit(stored(copy)), copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def test_other_tensors_and_damaged_checkpoints_are_refused_in_one_line(run_dir, tmp_path, capsys):
    a, b = steps(run_dir, 3, 4)
    out = ["--out", tmp_path / "avg"]
    extra = edited_copy(b, tmp_path / "extra", lambda t: {**t, "model.extra": torch.randn(3)})
    assert f"tensor model.extra is stored in {extra} but not in {a}" in refusal(capsys, a, extra, *out)
    wide = edited_copy(b, tmp_path / "wide",
                       lambda t: {**t, "model.norm.weight": torch.randn(t["model.norm.weight"].shape[0] + 1)})
    assert f"tensor model.norm.weight has shape [64] in {a} and [65] in {wide}" in refusal(capsys, a, wide, *out)
    flipped = shutil.copytree(b, tmp_path / "flipped")
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-100] ^= 0x40  # a weight's byte: the header still reads
    (flipped / "model.safetensors").write_bytes(bytes(data))
    assert "model.safetensors: damaged since it was saved" in refusal(capsys, a, flipped, *out)
    # the same vocabulary size, other tokens: the embedding rows averaged would be different tokens'
    other = shutil.copytree(b, tmp_path / "other")
    texts = [SAMPLE_DATA / name for name in ("cronicas.txt", "noticias.txt", "ciencia.txt")]
    assert train_tokenizer(texts, other / "tokenizer.model", vocab_size=400).vocab_size == 400
    assert re.fullmatch(re.escape(f"error: {a} and {other} have different tokenizers: token ") +
                        r"\d+ is '.+' in the first, '.+' in the second", refusal(capsys, a, other, *out))
    cut = shutil.copytree(b, tmp_path / "cut")
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:100])
    assert "corrupt or truncated safetensors file" in refusal(capsys, a, cut, *out)
    assert not (tmp_path / "avg").exists()


def test_a_checkpoint_s_moving_averages_average_and_a_damaged_one_is_refused(run_dir, tmp_path, capsys):
    """step-N/ema averages as a checkpoint does, and is checked against the digests that step-N's
    trainer_state.json records of it, as step-N's own weights are: a damaged byte is refused, not averaged."""
    a, b = (checkpoint / "ema" for checkpoint in steps(run_dir, 3, 4))
    assert load_script("average_checkpoints").main([str(a), str(b), "--out", str(tmp_path / "avg")]) == 0
    assert_bit_for_bit(stored(tmp_path / "avg"), reference_mean([a, b], [1, 1], torch.float32))
    damaged = shutil.copytree(b.parent, tmp_path / "step-000004") / "ema"
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-100] ^= 0x40  # a weight's byte: the header still reads
    (damaged / "model.safetensors").write_bytes(bytes(data))
    assert f"{damaged}/model.safetensors: damaged since it was saved" in \
        refusal(capsys, a, damaged, "--out", tmp_path / "avg2")


def test_an_average_that_is_not_finite_is_refused_in_one_line(run_dir, tmp_path, capsys):
    """A mean past the output dtype's range (float16's 65504) would be written as inf, and a checkpoint holding
    NaN (a diverged one) would average to NaN: both are refused naming the tensor, and nothing is written."""
    a, b = steps(run_dir, 3, 4)
    out = ["--out", tmp_path / "avg"]
    big = edited_copy(b, tmp_path / "big", lambda t: {**t, "model.norm.weight": t["model.norm.weight"] + 1e6})
    assert "tensor model.norm.weight: its average overflows float16 (largest finite value 65504)" in \
        refusal(capsys, a, big, "--dtype", "float16", *out)
    assert load_script("average_checkpoints").main([str(a), str(big), "--out", str(tmp_path / "wide")]) == 0
    assert stored(tmp_path / "wide")["model.norm.weight"].isfinite().all()  # float32 holds it
    nan = edited_copy(b, tmp_path / "nan", lambda t: {**t, "model.norm.weight": t["model.norm.weight"].index_fill(
        0, torch.tensor([5]), float("nan"))})
    assert "tensor model.norm.weight: a checkpoint holds NaN or infinity in it" in refusal(capsys, a, nan, *out)
    assert not (tmp_path / "avg").exists()
