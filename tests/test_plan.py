"""`scripts/pretrain.py --plan` (ttl_core.plan): parameters, tokens (with a batch ramp), FLOPs, memory and ideal
times against hand computation for configs/tiny.toml and the ttl-160m recipe; the epochs over each source against
the loaders run for the planned steps; a plan that writes nothing; the repeat warning; a resumed run's plan of what
is left; bad flags in one line."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from helpers import ROOT, load_script, run_torchrun
from train_helpers import run_config, set_arguments
from ttl_core.distributed import World
from ttl_core.loader import PackedLoader
from ttl_core.metrics import PEAK_BF16_TFLOPS
from ttl_core.mixture import Mixture, MixtureLoader, train_loader
from ttl_core.model import LlamaForCausalLM
from ttl_core.plan import BYTES, count, describe_plan, make_plan, repeat_warning, source_plans
from ttl_core.run_config import load_run_config
from ttl_core.train import train

pretrain = load_script("pretrain")


def llama_parameters(vocab: int, d: int, layers: int, ff: int) -> tuple[int, int]:
    """(total, without the input embedding) of an untied Llama without biases, by hand: per block q, k, v, o, gate,
    up and down and two norms; the final norm and the LM head."""
    blocks = layers * (4 * d * d + 3 * d * ff + 2 * d)
    return vocab * d + blocks + d + vocab * d, blocks + d + vocab * d


def test_tiny_plan_matches_hand_computation_and_the_model_built():
    run = load_run_config(ROOT / "configs" / "tiny.toml")
    config, t = run.model_config(), run.train
    plan = make_plan(config, t, 1, 0, t.max_steps, None, 1, {})
    total, non_embedding = llama_parameters(1024, 256, 4, 768)
    built = LlamaForCausalLM(config)
    assert (plan.parameters, plan.non_embedding_parameters) == (total, non_embedding) == (
        built.num_parameters(), built.num_parameters(exclude_embedding=True)) == (3_934_464, 3_672_320)
    assert plan.tokens == 200 * 16 * 64
    assert plan.flops_per_token == 6 * non_embedding + 12 * 4 * 256 * 64
    assert plan.memory == {"weights": 4 * total, "gradients": 4 * total, "AdamW moments": 8 * total}
    assert plan.evaluations == 10 and plan.eval_tokens == 4 * 16 * 64  # every 20 steps: 20, 40, ..., 200
    ddp = make_plan(config, t, 2, 0, t.max_steps, None, 1, {})
    assert ddp.memory == {**plan.memory, "DDP's gradient buckets": 4 * total} and ddp.tokens == 2 * plan.tokens


def test_ttl_160m_recipe_plan_on_8_processes_with_fsdp_muon_and_ema():
    run = load_run_config(ROOT / "configs" / "ttl-160m.toml",
                          ["train.distributed=\"fsdp\"", "train.optimizer=\"muon\"", "train.ema_decay=0.999"])
    plan = make_plan(run.model_config(), run.train, 8, 0, 458_000, None, 1, {})
    total, non_embedding = llama_parameters(32000, 768, 12, 3072)
    assert (plan.parameters, plan.non_embedding_parameters) == (total, non_embedding) == (162_417_408, 137_841_408)
    assert plan.tokens == 458_000 * 4 * 2048 * 8
    assert plan.flops_per_token == 6 * non_embedding + 12 * 12 * 768 * 2048
    muon = 12 * (4 * 768 * 768 + 3 * 768 * 3072)  # the blocks' projection matrices; AdamW keeps the rest
    assert plan.memory == {"weights": 4 * total // 8, "gradients": 4 * total // 8,
                           "AdamW moments": 8 * (total - muon) // 8, "Muon momentum": 4 * muon // 8,
                           "the average (EMA)": 4 * total // 8}
    hours = plan.flops_per_token * plan.tokens / (PEAK_BF16_TFLOPS["H100"] * 1e12 * 0.4 * 8) / 3600
    assert plan.ideal_hours(PEAK_BF16_TFLOPS["H100"], 0.4) == pytest.approx(hours, rel=1e-12)


def test_a_count_that_rounds_up_to_the_next_suffix_is_shown_in_it():
    """999,600 rounds to 3 digits as 1000K: shown 1M, not 1e+03K."""
    assert [count(n) for n in (512, 999.6, 999_499, 999_600)] == ["512", "1K", "999K", "1M"]
    assert [count(n, BYTES) for n in (2.6e9, 999.7e9)] == ["2.6GB", "1TB"]


def test_tokens_follow_the_batch_ramp():
    ramp = ["train.grad_accum_steps=4", "train.batch_ramp_steps=4", "train.max_steps=10"]
    run = run_config(*ramp)
    plan = make_plan(run.model_config(), run.train, 2, 0, 10, None, 1, {})
    assert [run.train.grad_accum_at(s) for s in range(1, 5)] == [1, 2, 3, 4]
    assert plan.tokens == (1 + 2 + 3 + 4 + 6 * 4) * 4 * 32 * 2
    assert make_plan(run.model_config(), run.train, 2, 3, 10, None, 1, {}).tokens == (4 + 6 * 4) * 4 * 32 * 2


def test_epochs_match_the_loader_run_for_the_planned_steps(halves):
    t = run_config("train.grad_accum_steps=3", "train.batch_ramp_steps=5", "train.max_steps=40").train
    world = World(0, 2, torch.device("cpu"))
    loader = train_loader(halves / "a", t, world)
    [plan] = source_plans(loader, t, 0, t.max_steps)
    for _ in range(sum(t.grad_accum_at(s) for s in range(1, t.max_steps + 1))):
        next(loader)
    assert plan.epochs == loader.epoch + loader.batch / loader.batches_per_epoch > 1  # wrapped around, as planned
    assert plan.tokens == len(loader.tokens) and repeat_warning([plan]) is not None


def test_a_mixtures_epochs_are_its_weights_share_of_the_rows_served(halves):
    t = run_config("train.max_steps=300").train
    weights = {"a": 0.8, "b": 0.2}
    loader = MixtureLoader(Mixture({n: {"path": str(halves / n), "weight": w} for n, w in weights.items()}), "train",
                           t.seq_len, t.micro_batch_size, t.seed)
    plans = source_plans(loader, t, 0, t.max_steps)
    for _ in range(t.max_steps):
        next(loader)
    rows = t.max_steps * t.micro_batch_size
    for plan, source, served in zip(plans, loader.sources, loader.served):
        per_epoch = source.batches_per_epoch * t.micro_batch_size
        assert plan.epochs == weights[plan.name] * rows / per_epoch
        # rows drawn at random: within 4 binomial standard deviations of the expectation
        sd = (rows * weights[plan.name] * (1 - weights[plan.name])) ** 0.5 / per_epoch
        assert abs(served / per_epoch - plan.epochs) < 4 * sd, (plan.name, served / per_epoch, plan.epochs)


def test_data_too_small_for_the_processes_is_named_and_the_rest_planned(halves, capsys):
    assert pretrain.main(["--data", str(halves / "a"), "--plan", "--plan-processes", "64", *set_arguments()]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "steps 1-1,000 (1,000 optimizer steps) on 64 processes"
    assert lines[7].startswith(f"data: not planned: {halves / 'a' / 'train.bin'}: ") and "fewer than one global " \
        "batch (micro_batch_size 4 x 64 processes) needs (256 x 32 + 1 = 8,193)" in lines[7]


def test_no_warning_when_each_token_is_seen_at_most_once(halves):
    t = run_config("train.max_steps=2").train
    assert repeat_warning(source_plans(PackedLoader(halves / "a", "train", t.seq_len, t.micro_batch_size),
                                       t, 0, 2)) is None


def test_plan_writes_nothing_and_names_the_data_not_prepared(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain.main(["--config", str(ROOT / "configs" / "tiny.toml"), "--out", str(out), "--plan"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    assert f"data: not planned: the bundled sample corpus is prepared into {out}/data when the run starts" in printed
    assert "training tokens: 204,800 (205K), 0.0521 per parameter (compute-optimal is about 20" in printed
    assert "ideal time at 40% MFU (an assumption" in printed


def test_a_plan_for_2_processes_finds_the_data_prepared_in_the_run_directory(data_dir, tmp_path, capsys):
    """RUN/data, where a run without --data prepares the sample corpus: found without the collective a run's rank 0
    prepares it under (the plan has no process group: that was a traceback)."""
    shutil.copytree(data_dir, tmp_path / "run" / "data")
    assert pretrain.main(["--out", str(tmp_path / "run"), "--plan", "--plan-processes", "2", *set_arguments()]) == 0
    assert f"data: {tmp_path / 'run' / 'data' / 'train.bin'}, " in capsys.readouterr().out


def test_the_160m_recipes_printed_times_and_memory(capsys):
    assert pretrain.main(["--config", str(ROOT / "configs" / "ttl-160m.toml"), "--plan"]) == 0  # no --out needed
    lines = capsys.readouterr().out.splitlines()
    assert lines[7] == "data: not planned: the bundled sample corpus is prepared into RUN/data when the run starts"
    # 3.95e18 FLOPs at 40% of 312 and 989 TFLOP/s: 31,600 s and 9,980 s
    assert lines[5] == ("ideal time at 40% MFU (an assumption; --plan-mfu sets it) on 1 GPU: A100 8.8 h, H100 2.8 h, "
                        "H200 2.8 h")
    assert lines[6] == ("memory per process: weights 650MB + gradients 650MB + AdamW moments 1.3GB = 2.6GB (float32; "
                        "activations not counted)")
    assert lines[-1] == "eval: 92 evaluations, each of at most 819,200 tokens (100 batches of 1 set), 2.88e+14 FLOPs"


def test_plan_of_a_mixture_with_the_repeat_warning(halves, tmp_path, capsys):
    mix = "data.mix={a = {path = \"%s\", weight = 3}, b = {path = \"%s\", weight = 1}}" % (halves / "a", halves / "b")
    before = sorted(p.relative_to(halves) for p in halves.rglob("*"))
    args = ["--out", str(tmp_path / "run"), "--plan", "--plan-processes", "4", "--plan-mfu", "0.5",
            *set_arguments(mix, "train.max_steps=100")]
    assert pretrain.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not (tmp_path / "run").exists() and sorted(p.relative_to(halves) for p in halves.rglob("*")) == before
    assert lines[5] == ("ideal time at 50% MFU (given) on 4 GPUs: A100 < 1 s, H100 < 1 s, H200 < 1 s (bf16 peaks; "
                        "train.dtype is float32)")
    data = [line for line in lines if line.startswith("data: ")]
    assert [line.split(",")[0] for line in data] == [f"data: a: {halves / 'a' / 'train.bin'}",
                                                     f"data: b: {halves / 'b' / 'train.bin'}"]
    # b's val split holds no global batch of 4 processes, which the run would refuse: named, as the run names it
    assert "weight 0.75" in data[0]
    assert lines[-2].startswith(f"eval: not planned: {halves / 'b' / 'val.bin'}: 418 tokens, fewer than one global "
                                "batch (micro_batch_size 4 x 4")
    assert lines[-1].startswith("warning: the run repeats its data: it sees tokens of a (")


def test_training_states_its_epochs_and_a_resumed_plan_is_what_is_left(data_dir, tmp_path, capsys):
    run = run_config("train.max_steps=60")  # stopped after step 2, where it has a checkpoint
    with pytest.warns(UserWarning, match="the run repeats its data"):
        train(run, tmp_path / "run", data_dir=str(data_dir), stop_after=2)
    epochs = 60 / PackedLoader(data_dir, "train", 32, 4).batches_per_epoch  # one batch of its loader a step
    assert f"the run makes {epochs:.3g} epochs of {data_dir / 'train.bin'} (" in capsys.readouterr().out
    args = ["--out", str(tmp_path / "run"), "--data", str(data_dir), "--resume", "--plan", *set_arguments(
        "train.max_steps=60")]
    files = lambda: {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}  # noqa: E731
    before = files()
    assert pretrain.main(args) == 0
    assert files() == before  # no lock, metrics or checkpoint touched
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "steps 3-60 (58 optimizer steps) on 1 process, resumed from step 2"
    assert lines[3].startswith("training tokens: 7,424 (7.42K)")
    assert f"{epochs * 58 / 60:.3g} epochs over these steps, {epochs:.3g} by step 60" in lines[7]


@pytest.mark.parametrize("flags, message", [  # refused as they are parsed: RUN is never made
    (["--out", "RUN", "--plan-mfu", "0.4"], "--plan-mfu has no effect without --plan"),
    (["--plan", "--plan-mfu", "40"], "argument --plan-mfu: expected a fraction in (0, 1], e.g. 0.4 for 40%, got '40'"),
    (["--plan", "--plan-mfu", "nan"], "expected a fraction in (0, 1], e.g. 0.4 for 40%, got 'nan'"),
    (["--plan", "--plan-mfu", "0"], "expected a fraction in (0, 1], e.g. 0.4 for 40%, got '0'"),
    (["--plan", "--plan-processes", "0"], "argument --plan-processes: expected an integer >= 1, got '0'"),
    (["--plan", "--resume"], "--resume needs --out, the run directory"),
    ([], "training needs --out, the run directory"),
])
def test_bad_plan_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit:
        pretrain.main(flags)
    assert exit.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(message)


@pytest.mark.parametrize("world_size, flags, message", [
    ("2", ["--plan-processes", "4"], "--plan-processes plans without torchrun; this one set WORLD_SIZE=2"),
    ("0", [], "WORLD_SIZE='0' must be an integer >= 1 (torchrun sets it)"),
    ("two", [], "WORLD_SIZE='two' must be an integer >= 1 (torchrun sets it)"),
    ("\u00b2", [], "WORLD_SIZE='\u00b2' must be an integer >= 1 (torchrun sets it)"),  # a digit int() refuses
])
def test_a_plan_under_a_launch_environment_it_cannot_use_is_refused(world_size, flags, message, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(SystemExit):
        pretrain.main(["--plan", *flags])
    assert capsys.readouterr().err.splitlines()[-1].endswith(message)


def test_under_torchrun_the_plan_is_for_its_world_size_and_printed_once(tmp_path, capsys, monkeypatch):
    argv = ["--config", str(ROOT / "configs" / "tiny.toml"), "--out", str(tmp_path / "run"), "--plan"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert pretrain.main(argv) == 0 and capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert pretrain.main(argv) == 0
    assert capsys.readouterr().out.startswith("steps 1-200 (200 optimizer steps) on 2 processes\n")


FSDP_GRADIENTS = """
import torch
from torch.distributed.fsdp import FSDPModule
from train_helpers import run_config
from ttl_core.distributed import close_world, init_world, wrap_model
from ttl_core.model import LlamaForCausalLM
from ttl_core.plan import state_bytes
from ttl_core.step import train_step

run = run_config("train.distributed=\\"fsdp\\"", "train.grad_accum_steps=2")
world = init_world("cpu")
model = LlamaForCausalLM(run.model_config())
planned = state_bytes(model, run.train, world.size)
model = wrap_model(model, "fsdp", world)
optimizer = torch.optim.AdamW(model.parameters())
held = []

def local_bytes(tensor):
    tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return tensor.numel() * tensor.element_size()

def measure(unwrapped, enabled):  # before each micro-batch: the gradients the earlier ones left
    unwrapped.set_requires_gradient_sync(enabled)
    whole = [getattr(p, "_unsharded_param", None) for m in model.modules() if isinstance(m, FSDPModule)
             for p in m._get_fsdp_state()._fsdp_param_group.fsdp_params]  # made at the first forward
    whole = [p.grad for p in whole if p is not None]
    held.append(sum(local_bytes(g) for g in [*whole, *(p.grad for p in model.parameters())] if g is not None))

import ttl_core.step
ttl_core.step.set_gradient_sync = measure
ids = torch.randint(0, 400, (2, 4, 32))
micro = [{"input_ids": x, "targets": x} for x in ids]
train_step(model, optimizer, micro, run.train, world, 1e-3, None, None, None)
gradients = sum(size for name, size in planned.items() if "gradients" in name)
print(f"rank {world.rank}: held {max(held)}, planned {gradients}", flush=True)
close_world(world)
"""


def test_fsdp_accumulating_micro_batches_holds_whole_gradients_as_planned(tmp_path):
    """FSDP2 reduce-scatters only at an accumulation window's last micro-batch: until then each process holds the
    whole model's gradients, which the plan's memory must count."""
    (tmp_path / "fsdp_gradients.py").write_text(FSDP_GRADIENTS, encoding="utf-8")
    done = run_torchrun(tmp_path / "fsdp_gradients.py", env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert done.returncode == 0, done.stderr[-3000:]
    for held, planned in re.findall(r"rank \d: held (\d+), planned (\d+)", done.stdout):
        assert int(held) <= int(planned) < 2 * int(held), done.stdout
    assert done.stdout.count("rank ") == 2


def test_a_resumed_plan_prints_the_plan_alone(data_dir, tmp_path, capsys):
    """A resume without --data continues on the directory the checkpoint records: the plan's data line names it, and
    nothing is printed above the plan."""
    train(run_config("train.max_steps=4"), tmp_path / "run", data_dir=str(data_dir), stop_after=1)
    capsys.readouterr()
    args = ["--out", str(tmp_path / "run"), "--resume", "--plan", *set_arguments("train.max_steps=4")]
    assert pretrain.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "steps 2-4 (3 optimizer steps) on 1 process, resumed from step 1"
    assert lines[7].startswith(f"data: {data_dir / 'train.bin'}, ")


def test_the_eval_cost_counts_the_forward_of_train_log_activation_stats():
    """train.log_activation_stats runs one more forward at each evaluation, of one global batch of the training
    data's val split (the model's, not the average's): counted in each evaluation's FLOPs, and said."""
    runs = [run_config("train.eval_every=10", "train.ema_decay=0.9", f"train.log_activation_stats={on}")
            for on in ("false", "true")]
    for processes in (1, 3):
        plain, stats = (make_plan(r.model_config(), r.train, processes, 0, 100, None, 2, {}) for r in runs)
        batch = runs[1].train.micro_batch_size * processes * runs[1].train.seq_len
        assert plain.eval_flops == pytest.approx(2 * plain.eval_tokens * plain.flops_per_token / 3, rel=1e-12)
        assert stats.eval_flops - plain.eval_flops == pytest.approx(batch * plain.flops_per_token / 3, rel=1e-12)
    assert describe_plan(stats, runs[1].train, None)[-1].endswith(
        f"{stats.eval_flops:.3g} FLOPs (twice: the average too; with train.log_activation_stats' forward of a batch)")


@pytest.mark.parametrize("settings, ending", [
    (("train.eval_every=10", "train.max_steps=10", 'train.eval_tasks=["a/escolhas.jsonl"]'),
     "eval: 1 evaluation of at most 256 tokens (2 batches of 1 set), {flops} FLOPs, and up to 100 questions of 1 "
     "task (not in the FLOPs: the data's tokenizer, not prepared yet, encodes them)"),
    (("train.eval_every=5", "train.max_steps=10", "train.eval_task_limit=0",
      'train.eval_tasks=["a/x.jsonl", "b.jsonl"]'),
     "eval: 2 evaluations, each of at most 256 tokens (2 batches of 1 set), {flops} FLOPs, and all questions of 2 "
     "tasks (not in the FLOPs: the data's tokenizer, not prepared yet, encodes them)"),
    (("train.eval_every=5", "train.max_steps=10", 'train.eval_tasks=["a/x.jsonl", "b.jsonl"]'),
     "eval: 2 evaluations, each of at most 256 tokens (2 batches of 1 set), {flops} FLOPs, and up to 100 questions "
     "of each of 2 tasks (not in the FLOPs: the data's tokenizer, not prepared yet, encodes them)"),
])
def test_the_eval_line_reads_for_one_evaluation_one_task_or_several(settings, ending):
    run = run_config(*settings)
    plan = make_plan(run.model_config(), run.train, 1, 0, run.train.max_steps, None, 1, None)
    assert describe_plan(plan, run.train, None)[-1] == ending.format(flops=f"{plan.eval_flops:.3g}")


def test_a_resumed_mixture_whose_source_is_gone_is_named_and_its_sources_evaluated_all_the_same(halves, tmp_path,
                                                                                                 capsys):
    """A mixture run resumed without its data.mix continues on the sources its checkpoint records: with one of them
    not prepared (moved away), the plan names it, and its evaluations still score each source, as the run's will."""
    for name in ("a", "b"):
        shutil.copytree(halves / name, tmp_path / name)
    mix = "data.mix={a = {path = \"%s\", weight = 3}, b = {path = \"%s\", weight = 1}}" % (tmp_path / "a",
                                                                                          tmp_path / "b")
    train(run_config(mix, "train.max_steps=4", "train.eval_every=2"), tmp_path / "run", stop_after=2)
    capsys.readouterr()
    (tmp_path / "b").rename(tmp_path / "b.moved")
    args = ["--out", str(tmp_path / "run"), "--resume", "--plan", *set_arguments("train.max_steps=4",
                                                                                 "train.eval_every=2")]
    assert pretrain.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[7] == (f"data: not planned: data.mix source 'b': {tmp_path / 'b'} is not a prepared data directory "
                        "(no meta.json); run scripts/prepare_data.py")
    assert lines[8].startswith("eval: 1 evaluation of at most 512 tokens (2 batches of 2 sets), ")
