"""Zero-shot multiple-choice accuracy during pretraining (train.eval_tasks): logged at each evaluation as
`evaluate_questions` scores the saved checkpoint, with no effect on training (attention dropout on: scoring in
training mode, or drawing from the RNG, would change every later step), alike on two processes, and refused in one
line before any step when a task file cannot be scored; `scripts/pretrain.py --plan` refuses those files alike, and
counts the tokens and FLOPs of the tasks' forwards in each evaluation's cost."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import ROOT, load_script, run_script, run_torchrun
from train_helpers import losses, run_config, set_arguments
from ttl_core.choices import evaluate_questions, read_questions, read_tasks
from ttl_core.errors import TTLError
from ttl_core.hf import load_pretrained
from ttl_core.metrics import flops_per_token, read_metrics
from ttl_core.plan import make_plan
from ttl_core.tokenizer import Tokenizer
import ttl_core.train as ttl_train
from ttl_core.train import train

QUESTIONS = ROOT / "ttl_core" / "sample_data" / "escolhas_pt.jsonl"  # 32 questions of 4 choices
LIMIT = 10
pretrain = load_script("pretrain")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """escolhas_pt.jsonl as 'escolhas', and its questions from the 11th on as 'outras' (other questions under the
    limit)."""
    tmp = tmp_path_factory.mktemp("tasks")
    shutil.copy(QUESTIONS, tmp / "escolhas.jsonl")
    lines = QUESTIONS.read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp / "outras.jsonl").write_text("".join(lines[LIMIT:]), encoding="utf-8")
    return [tmp / "escolhas.jsonl", tmp / "outras.jsonl"]


def task_setting(paths) -> str:
    return "train.eval_tasks=[" + ",".join(f'"{path}"' for path in paths) + "]"


def eval_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]


def test_logged_accuracy_is_that_of_the_saved_checkpoint_and_training_stays_bit_for_bit_through_a_resume(
        data_dir, tasks, tmp_path):
    """6 steps with attention dropout, evaluated at steps 3 and 6: without tasks, with them, and with them for 3
    steps then resumed: the same losses and eval_loss bit for bit; acc/NAME and acc_norm/NAME are
    `evaluate_questions` of the first LIMIT questions with the checkpoint of that step, exactly."""
    common = ("train.max_steps=6", "train.eval_every=3", "train.save_every=3", "model.attention_dropout=0.1")
    with_tasks = run_config(*common, task_setting(tasks), f"train.eval_task_limit={LIMIT}")
    train(run_config(*common), tmp_path / "plain", data_dir=str(data_dir))
    train(with_tasks, tmp_path / "tasks", data_dir=str(data_dir))
    train(with_tasks, tmp_path / "sliced", data_dir=str(data_dir), stop_after=3)
    torch.manual_seed(12345)  # as in a new process
    train(with_tasks, tmp_path / "sliced", data_dir=str(data_dir), resume=True)
    runs = ("plain", "tasks", "sliced")
    assert losses(tmp_path / "plain") == losses(tmp_path / "tasks") == losses(tmp_path / "sliced")
    assert len(losses(tmp_path / "plain")) == 6
    evals = {run: eval_records(tmp_path / run) for run in runs}
    assert [[r["eval_loss"] for r in evals[run]] for run in runs] == [[r["eval_loss"] for r in evals["plain"]]] * 3
    assert evals["tasks"] == evals["sliced"]
    assert [list(r) for r in evals["tasks"]] == [["step", "eval_loss", "eval_ppl", "acc/escolhas",
                                                   "acc_norm/escolhas", "acc/outras", "acc_norm/outras"]] * 2
    tokenizer = Tokenizer.from_pretrained(data_dir)
    questions = {path.stem: read_questions(path)[:LIMIT] for path in tasks}
    assert questions["escolhas"][0].context != questions["outras"][0].context
    for record in evals["tasks"]:
        model = load_pretrained(tmp_path / "tasks" / "checkpoints" / f"step-{record['step']:06d}", dtype=torch.float32)
        for name, chosen in questions.items():
            figures = evaluate_questions(model, tokenizer, chosen)
            assert (record[f"acc/{name}"], record[f"acc_norm/{name}"]) == (figures["acc"], figures["acc_norm"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_log_the_accuracy_one_process_logs(data_dir, tasks, tmp_path, mode):
    """Every rank scores every question (FSDP's gathers need all of them in each forward), and training goes on
    after it; the weights of the two runs agree to float rounding, which leaves each question's choice alone."""
    common = ["train.max_steps=3", "train.eval_every=2", "train.grad_accum_steps=2", task_setting(tasks),
              f"train.eval_task_limit={LIMIT}"]
    one = run_script("pretrain", "--data", data_dir, "--out", tmp_path / "one",
                     *set_arguments(*common, "train.micro_batch_size=4"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_torchrun(ROOT / "scripts" / "pretrain.py", "--data", data_dir, "--out", tmp_path / "two",
                       *set_arguments(*common, "train.micro_batch_size=2", f"train.distributed=\"{mode}\""))
    assert two.returncode == 0, two.stderr[-3000:]
    one, two = eval_records(tmp_path / "one"), eval_records(tmp_path / "two")  # at steps 2 and 3: training went on
    assert [r["step"] for r in two] == [2, 3] and len(losses(tmp_path / "two")) == 3
    accuracies = [key for key in one[0] if key.startswith("acc")]
    assert len(accuracies) == 4 and [[r[key] for key in accuracies] for r in one] == [[r[key] for key in accuracies]
                                                                                      for r in two]


@pytest.mark.parametrize("setting, message", [
    ('train.eval_tasks=["MISSING"]', r"^.*/missing.jsonl: no such file$"),
    ('train.eval_tasks=["BAD"]', r"^.*/bad.jsonl:2: 'label' must be an integer in \[0, 2\) indexing 'choices', got 5$"),
    ('train.eval_tasks=["ESCOLHAS", "CLASH"]',
     r"^train.eval_tasks: .*/escolhas.jsonl and .*/clash/escolhas.jsonl are both named 'escolhas' \(a task's name is "
     r"its file's stem, logged as acc/escolhas\); rename one$"),
    ('train.eval_tasks=["EMPTY"]', r"^.*/empty.jsonl: no examples \(an empty file, or a header without rows\)$"),
    ('train.eval_tasks=["LONG"]', r"^.*/long.jsonl:1: choice 1 is \d+ tokens after a context of \d+; need a context "
     r"and 1 to 64 \(the model's context\)$"),
    ("train.eval_task_limit=-1", r"^train.eval_task_limit must be >= 0, got -1$"),
    ('train.eval_tasks=[""]', r"^train.eval_tasks must list task files \(non-empty strings\), got \[''\]$"),
])
def test_task_files_that_cannot_be_scored_are_refused_in_one_line_before_any_step_and_by_the_plan(
        data_dir, tasks, tmp_path, setting, message):
    good = '{"context": "O céu é", "choices": ["azul", "verde"], "label": 0}\n'
    (tmp_path / "bad.jsonl").write_text(good + good.replace('"label": 0', '"label": 5'), encoding="utf-8")
    long = " ".join(f"verde{i}" for i in range(100))  # more tokens than the model's 64 positions
    (tmp_path / "long.jsonl").write_text(good.replace('"verde"', f'"{long}"'), encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    (tmp_path / "clash").mkdir()
    shutil.copy(QUESTIONS, tmp_path / "clash" / "escolhas.jsonl")
    paths = {"MISSING": tmp_path / "missing.jsonl", "BAD": tmp_path / "bad.jsonl", "EMPTY": tmp_path / "empty.jsonl",
             "ESCOLHAS": tasks[0], "CLASH": tmp_path / "clash" / "escolhas.jsonl", "LONG": tmp_path / "long.jsonl"}
    for name, path in paths.items():
        setting = setting.replace(f'"{name}"', f'"{path}"')
    with pytest.raises(TTLError, match=message) as e:
        train(run_config("train.max_steps=1", setting), tmp_path / "run", data_dir=str(data_dir))
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()
    with pytest.raises(TTLError, match=message):  # the plan of that run
        pretrain.main(["--plan", "--data", str(data_dir), *set_arguments("train.max_steps=1", setting)])


def test_a_plan_before_the_data_is_prepared_reads_the_task_files_and_says_their_cost_is_not_counted(tasks, tmp_path,
                                                                                                   capsys):
    """Without the data's tokenizer the questions cannot be encoded: a plan without --data (the sample corpus not
    prepared yet) reads and checks the files all the same, and says their forwards are not in its FLOPs."""
    for paths, message in (([tmp_path / "missing.jsonl"], "missing.jsonl: no such file"),
                           ([tasks[0], tmp_path / "escolhas.jsonl"], "are both named 'escolhas'")):
        shutil.copy(QUESTIONS, tmp_path / "escolhas.jsonl")
        with pytest.raises(TTLError, match=message):
            pretrain.main(["--plan", *set_arguments(task_setting(paths))])
    assert pretrain.main(["--plan", *set_arguments(task_setting(tasks))]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(
        "and up to 100 questions of each of 2 tasks (not in the FLOPs: the data's tokenizer, not prepared yet, encodes "
        "them)")


def test_the_plans_task_cost_is_what_the_runs_evaluations_forward(data_dir, tasks, tmp_path, monkeypatch, capsys):
    """The tokens each evaluation feeds the model to score the tasks (padded batches of choices, longest first) and
    their FLOPs (a token as MFU counts one in a sequence of its forward's length, but the LM head's matmul only at
    the continuations' positions, which alone it scores), hooked in a run's evaluations: the plan's, which also counts
    them on every process (each scores every question) and twice with an average."""
    settings = ("train.max_steps=4", "train.eval_every=2", task_setting(tasks), f"train.eval_task_limit={LIMIT}")
    shapes = []  # [rows, length, positions scored] of the model's forwards while it scores the tasks, over the run

    def hooked(model, scored, real=ttl_train.task_figures):
        hooks = [model.backbone.register_forward_pre_hook(lambda module, args: shapes.append(list(args[0].shape))),
                 model.lm_head.register_forward_pre_hook(lambda module, args: shapes[-1].append(args[0].shape[0]))]
        try:
            return real(model, scored)
        finally:
            for hook in hooks:
                hook.remove()
    monkeypatch.setattr(ttl_train, "task_figures", hooked)
    run = run_config(*settings)
    train(run, tmp_path / "run", data_dir=str(data_dir))
    assert len(shapes) == 2 * 2 * 3  # 2 evaluations of 2 tasks of 40 choices, 16 a forward
    per_evaluation = shapes[:6]
    assert shapes[6:] == per_evaluation and len({length for _, length, _ in shapes}) > 1  # padded to unlike lengths
    tokens = sum(rows * length for rows, length, _ in per_evaluation)
    assert pretrain.main(["--plan", "--data", str(data_dir), *set_arguments(*settings)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"({tokens:,} tokens on each process, in the FLOPs)")
    config = run.model_config()
    encoded = read_tasks([str(p) for p in tasks], LIMIT, Tokenizer.from_pretrained(data_dir),
                         config.max_position_embeddings)
    model = load_pretrained(tmp_path / "run" / "checkpoints" / "step-000004")
    head = model.lm_head.weight.numel()
    backbone = model.num_parameters(exclude_embedding=True) - head
    flops = sum(rows * length * flops_per_token(backbone, config.num_hidden_layers, config.hidden_size, length)
                + 6 * head * scored for rows, length, scored in per_evaluation) / 3
    for processes, overrides in ((1, ()), (3, ()), (2, ("train.ema_decay=0.9",))):
        t = run_config(*settings, *overrides).train
        plans = [make_plan(config, t, processes, 0, t.max_steps, None, 1, scored) for scored in ({}, encoded)]
        assert plans[1].task_tokens == tokens and plans[0].task_tokens == 0
        twice = 2 if t.ema_decay else 1
        assert plans[1].eval_flops - plans[0].eval_flops == pytest.approx(processes * twice * flops, rel=1e-12)
