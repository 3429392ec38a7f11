"""SIGKILL at chosen moments (no handler runs, as in an out-of-memory kill or a lost node), then a rerun: what is left
on disk is either complete or ignored and cleaned up, and the rerun ends where the uninterrupted run ends, bit for bit.

Each run is forked from this process and kills itself at a chosen file-system call (`kill_at`), never on a timer:
at an `os.fsync`, the file being synced is first cut to half its length, as a kill while its bytes were still being
written would leave it, so a file written in place rather than into a temporary shows up torn."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import ttl_core
import ttl_core.metrics as ttl_metrics
import ttl_core.train as ttl_train
from helpers import load_script
from train_helpers import corpus_file, run_config, same_state
from ttl_core.checkpoint import complete_checkpoints, load_trainer_state, looks_complete
from ttl_core.data import prepare_data
from ttl_core.errors import TTLError
from ttl_core.metrics import read_metrics
from ttl_core.tokenizer import Tokenizer
from ttl_core.train import train

# forks, and reads which file a descriptor is and the process table in /proc
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux's fork and /proc")

RUN = ("train.max_steps=6", "train.save_every=2", "train.eval_every=3", "train.ema_decay=0.9",
       "train.keep_checkpoints=1")


def kill_at(call: str, path_pattern: str, nth: int = 1, before: bool = True) -> None:
    """SIGKILL this process at the `nth` `os.CALL` (replace, fsync or unlink) whose path (a replace's destination, an
    fsync's file) matches `path_pattern`, before or after the call."""
    real, seen = getattr(os, call), []

    def path_of(args: tuple) -> str:
        return os.readlink(f"/proc/self/fd/{args[0]}") if call == "fsync" else os.fspath(args[-1])

    def killing(*args, **kwargs):
        matched = re.search(path_pattern, path_of(args)) is not None
        seen.append(matched)
        chosen = matched and seen.count(True) == nth
        if chosen and before:
            if call == "fsync":  # a kill while the file was being written
                os.ftruncate(args[0], os.fstat(args[0]).st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if chosen:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(os, call, killing)


def killed(work: Callable[[], object], *kill: Callable[[], None]) -> int:
    """The exit code of `work()` in a forked process that first calls each of `kill` (-SIGKILL when one fired), on one
    thread: OpenMP's threads, which this process may have started, are not forked, and a child waits for them forever
    (a run's sums then group as they do on one thread: runs compared bit for bit all go through here)."""
    def target() -> None:
        torch.set_num_threads(1)
        for arm in kill:
            arm()
        work()

    process = multiprocessing.get_context("fork").Process(target=target)
    process.start()
    process.join(timeout=120)
    return process.exitcode


def tear_metrics_line(nth: int) -> None:
    """SIGKILL this process halfway through writing its `nth` metrics.jsonl record."""
    calls = []

    def log(self, record: dict) -> None:
        calls.append(record)
        if len(calls) == nth:
            self.file.write(ttl_metrics.json.dumps(record)[:20])
            self.file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_log(self, record)

    real_log = ttl_metrics.MetricsLog.log
    ttl_metrics.MetricsLog.log = log


def kill_in_evaluation(nth: int) -> None:
    """SIGKILL this process inside its `nth` evaluation."""
    real, calls = ttl_train.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    ttl_train.evaluate = evaluate


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir) -> Path:
    """The uninterrupted run the killed ones must end as (forked and on one thread, as they run)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert killed(lambda: train(run_config(*RUN), run_dir, data_dir=str(data_dir))) == 0
    return run_dir


def final_state(run_dir: Path) -> tuple:
    """The newest checkpoint's weights (the average's too), optimizer state, torch RNG and data position, and the
    metrics' figures but the timings, step by step."""
    newest = complete_checkpoints(run_dir)[-1]
    trainer_state, saved = load_trainer_state(newest)
    weights = {sub: ttl_core.load_pretrained(newest / sub).state_dict() for sub in ("", "ema")}
    figures = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")}
               for r in read_metrics(run_dir / "metrics.jsonl")]
    # python's and numpy's generators are not seeded by a run and no step draws from them (set_rank_rng_state)
    return newest.name, weights, saved["optimizer"], saved["rng"][0]["torch"], trainer_state["data"], figures


# where a run is killed: a checkpoint's file being written, its directory not yet renamed into place, the older
# checkpoint renamed for deletion, metrics.jsonl cut back on resume, a metrics line, an evaluation
KILLS = {
    "optimizer.pt written": (kill_at, "fsync", r"\.step-000004\.partial/optimizer\.pt"),
    "average's weights written": (kill_at, "fsync", r"\.step-000002\.partial/ema/model\.safetensors"),
    "checkpoint complete, not in place": (kill_at, "replace", r"/step-000004$"),
    "older checkpoint being deleted": (kill_at, "replace", r"/\.step-000002\.old$", 1, False),
    "metrics line": (tear_metrics_line, 5),
    "evaluation": (kill_in_evaluation, 2),
}


@pytest.mark.parametrize("where", KILLS)
def test_a_run_killed_resumes_to_the_uninterrupted_run_bit_for_bit(tmp_path, data_dir, straight, where):
    run_dir, arm = tmp_path / "run", KILLS[where]
    assert killed(lambda: train(run_config(*RUN), run_dir, data_dir=str(data_dir)),
                  lambda: arm[0](*arm[1:])) == -signal.SIGKILL
    assert all(looks_complete(c) for c in complete_checkpoints(run_dir))
    # killed again while the resume cuts metrics.jsonl back to the checkpoint's step
    assert killed(lambda: train(run_config(*RUN), run_dir, data_dir=str(data_dir), resume=True),
                  lambda: kill_at("fsync", r"/metrics\.jsonl")) == -signal.SIGKILL
    assert killed(lambda: train(run_config(*RUN), run_dir, data_dir=str(data_dir), resume=True)) == 0
    assert not list((run_dir / "checkpoints").glob(".*"))  # what the kills left is cleaned up
    assert same_state(final_state(run_dir), final_state(straight))


def prepared(out: Path, corpus: Path) -> None:
    prepare_data([corpus], out, vocab_size=400, val_fraction=0.1, workers=1, shard_docs=16)


@pytest.mark.parametrize("kill", [("fsync", r"\.prepare/tokenizer\.model"), ("fsync", r"\.prepare/0000002\.npz"),
                                  ("fsync", r"/train\.bin"), ("replace", r"/val\.bin$"),
                                  ("fsync", r"/meta\.json")])
def test_a_preparation_killed_and_run_again_gives_the_uninterrupted_one_s_files(tmp_path, kill):
    corpus = corpus_file(tmp_path)
    prepared(tmp_path / "straight", corpus)
    assert killed(lambda: prepared(tmp_path / "out", corpus), lambda: kill_at(*kill)) == -signal.SIGKILL
    prepared(tmp_path / "out", corpus)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert files(tmp_path / "out") == files(tmp_path / "straight")


def live_processes(group: int) -> list[int]:
    """The processes of process group `group` that have not ended (zombies aside: a container's init may never
    reap the orphans it adopts)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_tokenizing_workers_end_when_the_preparation_is_killed(tmp_path):
    """Killed outright, the preparing process never shuts its pool down: its workers waited for work forever."""
    corpus = corpus_file(tmp_path)

    def prepare_in_a_group_of_its_own() -> None:
        os.setpgid(0, 0)  # the workers forked from it join its group
        (tmp_path / "group").write_text(str(os.getpid()))
        prepare_data([corpus], tmp_path / "out", vocab_size=400, workers=2, shard_docs=4)

    code = killed(prepare_in_a_group_of_its_own, lambda: kill_at("fsync", r"\.prepare/0000001\.npz"))
    assert code == -signal.SIGKILL
    group, deadline = int((tmp_path / "group").read_text()), time.monotonic() + 10
    try:
        while live_processes(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert live_processes(group) == []
    finally:  # left, they would hold pytest's output open
        for pid in live_processes(group):
            os.kill(pid, signal.SIGKILL)


def outcome(out: Path, complete: list[dict[str, bytes]]) -> str:
    """What a writer killed midway left in `out`: nothing, one of the `complete` outputs (temporaries aside), or a
    directory whose loading is refused; never one that loads as a model and tokenizer without being complete."""
    if not out.exists():
        return "absent"
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.endswith(".tmp")}
    if files in complete:
        return "complete"
    try:
        ttl_core.load_pretrained(out)
        Tokenizer.from_pretrained(out)
    except TTLError as e:
        return f"refused: {e}"
    return "loads half-written"


@pytest.fixture(scope="module")
def run_with_checkpoints(tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "run"
    train(run_config("train.max_steps=4", "train.save_every=2", "train.eval_every=0"), run_dir, data_dir=str(data_dir))
    return run_dir


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.mark.parametrize("kill", [("unlink", r"/config\.json$", 1, False), ("fsync", r"/model-00002-of-\d+\."),
                                  ("replace", r"/generation_config\.json$"), ("replace", r"/tokenizer_config\.json$"),
                                  ("replace", r"/config\.json$")])
def test_convert_killed_over_an_earlier_conversion_leaves_it_or_the_new_one(tmp_path, run_with_checkpoints, kill):
    """--overwrite replaces OUT: killed at any moment, OUT is the earlier conversion or the new one, or a directory
    every loader refuses (it has no config), never the new weights under the old config.json, which loaded silently."""
    convert = load_script("convert").main
    source = complete_checkpoints(run_with_checkpoints)[-1]
    assert convert(["--to-hf", str(source), str(tmp_path / "new"), "--max-shard-size", "150KB"]) == 0
    assert convert(["--to-hf", str(source), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    before = contents(tmp_path / "out")
    code = killed(lambda: convert(["--to-hf", str(source), str(tmp_path / "out"), "--max-shard-size", "150KB",
                                   "--overwrite"]), lambda: kill_at(*kill))
    assert code == -signal.SIGKILL
    left = outcome(tmp_path / "out", [before, contents(tmp_path / "new")])
    assert left == "complete" or left.startswith("refused: ") and "config" in left, left


WRITERS = {  # a script's arguments to write into `out`, and the directory it writes there
    "average_checkpoints": (lambda run, out: [str(run), "--last", "2", "--out", str(out)], "."),
    "finetune_classifier": (lambda run, out: ["--model", str(complete_checkpoints(run)[-1]), "--out", str(out),
                                              "--epochs", "1", "--max-length", "16"], "best"),
}


@pytest.mark.parametrize("script", WRITERS)
@pytest.mark.parametrize("kill", [("fsync", r"\.partial/model\.safetensors"), ("replace", r"/(out|best)$")])
def test_a_checkpoint_writer_killed_leaves_no_half_written_directory(tmp_path, run_with_checkpoints, script, kill):
    arguments, written = WRITERS[script]
    main = load_script(script).main
    assert killed(lambda: main(arguments(run_with_checkpoints, tmp_path / "out")), lambda: kill_at(*kill)) \
        == -signal.SIGKILL
    assert outcome((tmp_path / "out" / written).resolve(), []) == "absent"
