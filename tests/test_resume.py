"""Checkpoints of the training loop: bit-for-bit resume, crash safety, what a checkpoint must hold."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import ROOT, run_in_ascii_locale, run_script
from train_helpers import FAST, MICRO_MODEL, losses, random_model, run_config, set_arguments
from ttl_core import load_pretrained
from ttl_core.checkpoint import (complete_checkpoints, latest_checkpoint, load_trainer_state, looks_complete,
                                 remove_partial_checkpoints, save_checkpoint)
from ttl_core.data import prepare_data
from ttl_core.distributed import full_optimizer_state, load_optimizer_state
from ttl_core.errors import CheckpointError, ConfigError
from ttl_core.metrics import read_metrics
from ttl_core.tokenizer import Tokenizer
import ttl_core.checkpoint as ttl_checkpoint
import ttl_core.train as ttl_train
from ttl_core.optim import build_optimizer
from ttl_core.train import train


@pytest.mark.parametrize("accum, masking, dropout", [(1, "false", 0.0), (2, "false", 0.0), (2, "true", 0.0),
                                                     (1, "false", 0.2)])
def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(tmp_path, data_dir, accum, masking, dropout):
    run = run_config("train.max_steps=6", "train.save_every=100", f"train.grad_accum_steps={accum}",
                     f"data.document_masking={masking}", f"model.attention_dropout={dropout}")
    straight = tmp_path / "straight"
    train(run, straight, data_dir=str(data_dir))
    sliced = tmp_path / "sliced"
    first = train(run, sliced, data_dir=str(data_dir), stop_after=3)
    assert first.last_step == 3 and [p.name for p in complete_checkpoints(sliced)] == ["step-000003"]
    torch.manual_seed(12345)  # as in a new process: the checkpoint's RNG states, which dropout draws from, come back
    train(run, sliced, data_dir=str(data_dir), resume=True)
    assert losses(sliced) == losses(straight) and len(losses(straight)) == 6
    a, b = load_pretrained(straight / "checkpoints" / "step-000006"), \
        load_pretrained(sliced / "checkpoints" / "step-000006")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    evals = [r for r in read_metrics(sliced / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]


def test_resume_of_a_float16_run_restores_its_gradient_scaler(tmp_path, data_dir):
    """The scaler's scale and its count of steps since the last overflow decide which later steps are
    skipped, so a resumed fp16 run continues with the saved ones, not a fresh scaler's."""
    run = run_config("train.max_steps=4", "train.save_every=100", "train.dtype=\"float16\"")
    train(run, tmp_path / "straight", data_dir=str(data_dir))
    train(run, tmp_path / "sliced", data_dir=str(data_dir), stop_after=2)
    train(run, tmp_path / "sliced", data_dir=str(data_dir), resume=True)
    assert losses(tmp_path / "sliced") == losses(tmp_path / "straight")
    scalers = [load_trainer_state(d / "checkpoints" / "step-000004")[1]["scaler"] for d in
               (tmp_path / "straight", tmp_path / "sliced")]
    assert scalers[0]["_growth_tracker"] == 4 and scalers[0] == scalers[1]


KILLER = """
import os, runpy, signal, sys
import ttl_core.checkpoint as checkpoint
original = checkpoint.save_pretrained
def save_then_die(model, path, **kwargs):
    original(model, path, **kwargs)
    if "step-000004" in str(path):  # the weights are written, the rest of the checkpoint is not
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_pretrained = save_then_die
sys.argv = ["pretrain.py", *sys.argv[1:]]
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


def test_a_run_killed_while_checkpointing_resumes_from_the_previous_checkpoint(tmp_path, data_dir):
    args = ["--data", data_dir, "--save-every", "2", *set_arguments("train.max_steps=6")]
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run_dir = tmp_path / "run"
    died = subprocess.run([sys.executable, str(killer), str(ROOT / "scripts" / "pretrain.py"), "--out", str(run_dir),
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert died.returncode == -9, died.stderr[-2000:]
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-000002"]
    assert (run_dir / "checkpoints" / ".step-000004.partial").exists()
    resumed = run_script("pretrain", "--out", run_dir, "--resume", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "step-000002" in resumed.stdout
    assert not (run_dir / "checkpoints" / ".step-000004.partial").exists()
    straight = tmp_path / "straight"
    assert run_script("pretrain", "--out", straight, *args).returncode == 0
    assert losses(run_dir) == losses(straight)


def test_a_second_run_on_a_run_directory_in_use_is_refused(tmp_path, data_dir, monkeypatch):
    """Two runs on one directory would delete each other's checkpoint in progress and interleave their
    checkpoints, and the second's rewrite of metrics.jsonl would hide the first's records."""
    run = run_config("train.max_steps=2", "train.save_every=1")
    real, second = ttl_train.save_checkpoint, []

    def save_while_a_second_run_starts(*args, **kwargs):
        if not second:
            second.append("started")
            with pytest.raises(ConfigError, match=f"{tmp_path} is in use by another training run"):
                train(run, tmp_path, data_dir=str(data_dir), resume=True)
        return real(*args, **kwargs)

    monkeypatch.setattr(ttl_train, "save_checkpoint", save_while_a_second_run_starts)
    assert train(run, tmp_path, data_dir=str(data_dir)).last_step == 2 and second
    monkeypatch.undo()
    assert train(run_config("train.max_steps=3"), tmp_path, data_dir=str(data_dir), resume=True).last_step == 3


def test_every_rank_stops_when_the_run_directory_is_in_use(tmp_path, data_dir):
    """Ranks started by a launcher other than torchrun (which would kill them when rank 0 fails) must not wait
    at a collective for a rank 0 that refused the run directory."""
    import fcntl
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    (tmp_path / "run").mkdir()
    held = os.open(tmp_path / "run", os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # another run's
    ranks = []
    try:
        ranks += [subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--data", str(data_dir), "--out",
             str(tmp_path / "run"), *[x for o in [*MICRO_MODEL, *FAST] for x in ("--set", o)]],
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": str(rank),
                 "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
        for rank in ranks:
            _, err = rank.communicate(timeout=300)
            assert rank.returncode == 2 and err.strip().endswith("is in use by another training run; wait for it "
                                                                  "to end or choose another --out"), err[-1000:]
    finally:
        for rank in ranks:  # a rank still waiting (a failed or timed-out check) must not outlive the test
            if rank.poll() is None:
                rank.kill()
                rank.wait()
        os.close(held)


@pytest.mark.parametrize("keep", [1, 2])
def test_only_the_newest_checkpoints_are_kept(tmp_path, data_dir, keep):
    run = run_config("train.max_steps=4", "train.save_every=1", f"train.keep_checkpoints={keep}")
    train(run, tmp_path, data_dir=str(data_dir))
    assert [p.name for p in complete_checkpoints(tmp_path)] == [f"step-{s:06d}" for s in range(5 - keep, 5)]


def test_an_old_checkpoint_that_cannot_be_removed_is_a_warning_not_the_end_of_the_run(tmp_path, data_dir,
                                                                                       monkeypatch):
    def held_open(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ttl_checkpoint, "remove_dir_atomically", held_open)
    run = run_config("train.max_steps=2", "train.save_every=1", "train.keep_checkpoints=1")
    with pytest.warns(UserWarning, match="could not remove the old checkpoint .*step-000001 .Permission denied"):
        assert train(run, tmp_path, data_dir=str(data_dir)).last_step == 2
    (tmp_path / "checkpoints" / ".step-000001.old").write_text("a file, where a directory is usually left")
    ttl_checkpoint.remove_partial_checkpoints(tmp_path)
    assert not (tmp_path / "checkpoints" / ".step-000001.old").exists()


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_a_crash_while_deleting_an_old_checkpoint_leaves_no_half_deleted_one(tmp_path, monkeypatch):
    """A checkpoint killed midway through its deletion (keep_checkpoints) must not stay listed as complete: the
    newest is not always the one resumed (a finished run resumes nothing), and the torn one would be loaded."""
    run = run_config()
    model = random_model(run)
    for step in (1, 2):
        if step == 2:  # the deletion of step 1 removes one file, then the process dies
            def dying_rmtree(path, ignore_errors=False):
                if Path(path).is_dir():
                    next(Path(path).iterdir()).unlink()
                    raise Killed
            monkeypatch.setattr(shutil, "rmtree", dying_rmtree)
        with contextlib.suppress(Killed):
            save_checkpoint(tmp_path, step, model, model.state_dict(), {}, {"data": {}}, keep=1)
    monkeypatch.undo()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000002"]
    remove_partial_checkpoints(tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]


@pytest.mark.parametrize("failing", ["model.safetensors", "optimizer.pt"])
def test_a_checkpoint_the_disk_cannot_hold_is_one_error_line_and_leaves_the_previous_newest(tmp_path, failing):
    """A full disk while checkpointing (a file-size limit fails the writes the same way): safetensors and
    torch.save raise errors of their own, torch's without the cause, and the user got their traceback; now one
    line names the file and the free space, and the partial checkpoint is deleted, giving its space back."""
    limit = {"model.safetensors": 100_000, "optimizer.pt": 600_000}[failing]  # the weights take 536 kB
    code = f"""
import resource, signal, sys, torch
sys.path.insert(0, {str(ROOT / "tests")!r})
from train_helpers import random_model, run_config
from ttl_core.checkpoint import save_checkpoint
from ttl_core.cli import run_cli
model = random_model(run_config())
save_checkpoint({str(tmp_path)!r}, 1, model, model.state_dict(), {{}}, {{"data": {{}}}})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
moments = {{"exp_avg": torch.randn(250_000)}}  # 1 MB of optimizer state
run_cli(lambda argv: save_checkpoint({str(tmp_path)!r}, 2, model, model.state_dict(), moments, {{"data": {{}}}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr[-3000:]
    assert done.stderr.startswith(f"error: {tmp_path / 'checkpoints' / '.step-000002.partial' / failing}: write failed")
    assert "File too large" in done.stderr or failing == "optimizer.pt"  # torch does not say
    assert "MiB free on its file system" in done.stderr
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]


def test_resume_applies_the_configured_optimizer_settings(tmp_path, data_dir):
    """The checkpoint restores AdamW's moments; weight decay, betas and eps are the resumed run's config, and
    a changed no_decay (which would regroup the parameters) is refused, as are a changed seq_len or seed."""
    run = run_config("train.max_steps=4")
    train(run, tmp_path, data_dir=str(data_dir), stop_after=2)
    with pytest.raises(ConfigError, match=r"trained with train.no_decay=\['norm', 'bias'\]; resuming with \[\]"):
        train(run_config("train.max_steps=4", "train.no_decay=[]"), tmp_path, data_dir=str(data_dir), resume=True)
    for key, other in (("seq_len", run.train.seq_len // 2), ("seed", run.train.seed + 1)):  # the data position's
        with pytest.raises(ConfigError, match=rf"^train.{key} is {other} here, but \S+step-000002 was trained with"):
            train(run_config("train.max_steps=4", f"train.{key}={other}"), tmp_path, str(data_dir), resume=True)
    model = random_model(run)
    first = build_optimizer(model, run.train, torch.device("cpu"))
    model(torch.randint(0, 400, (2, 16)), labels=torch.randint(0, 400, (2, 16))).loss.backward()
    first.step()
    changed = run_config("train.weight_decay=0.5", "train.betas=[0.5, 0.6]", "train.eps=1e-3").train
    second = build_optimizer(model, changed, torch.device("cpu"))
    lrs = [g["lr"] for g in second.param_groups]
    load_optimizer_state(model, second, full_optimizer_state(model, first))
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in second.param_groups] == [
        (0.5, (0.5, 0.6), 1e-3), (0.0, (0.5, 0.6), 1e-3)]
    assert [g["lr"] for g in second.param_groups] == lrs and all(lr > 0 for lr in lrs)  # not the loader's 0
    saved, loaded = first.state_dict()["state"], second.state_dict()["state"]
    assert all(torch.equal(saved[i]["exp_avg_sq"], loaded[i]["exp_avg_sq"]) for i in saved)


def test_the_newest_checkpoint_is_found_by_step_number_past_six_digits(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-999999", "step-1000000", "step-000005", ".step-2000000.partial"):
        (root / name).mkdir(parents=True)
    (root / "step-2000001").write_text("a stray file, not a checkpoint: never resumed from nor pruned")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000005", "step-999999", "step-1000000"]
    assert latest_checkpoint(tmp_path).name == "step-1000000"


def test_a_trainer_state_that_is_not_a_training_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "step-000001"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "data": {}}))
    with pytest.raises(CheckpointError, match="is not a training checkpoint: optimizer.pt is missing"):
        load_trainer_state(ckpt)
    torch.save({"optimizer": {}, "rng": {}}, ckpt / "optimizer.pt")
    assert load_trainer_state(ckpt)[0] == {"step": 1, "data": {}}
    for state in ({"step": -1, "data": {}}, {"step": 1.5, "data": {}}, {"step": 1}, [1]):
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
        with pytest.raises(CheckpointError, match="expected a step number and the data position"):
            load_trainer_state(ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "data": {}}))
    for saved in ({"optimizer": {}}, {"rng": {}}):
        torch.save(saved, ckpt / "optimizer.pt")
        with pytest.raises(CheckpointError, match="expected the optimizer and RNG states"):
            load_trainer_state(ckpt)
    (ckpt / "optimizer.pt").write_bytes(b"")  # as a full disk or a failed copy leaves it
    with pytest.raises(CheckpointError, match="optimizer.pt: empty, truncated or corrupt"):
        load_trainer_state(ckpt)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, data_dir) -> Path:
    """A run directory holding step-000001 and step-000002."""
    run_dir = tmp_path_factory.mktemp("two") / "run"
    train(run_config("train.max_steps=2", "train.save_every=1"), run_dir, data_dir=str(data_dir))
    return run_dir


def _cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _overwrite_head(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"XXXXXXXX")


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _flip_a_tensor_byte(path: Path) -> None:
    """Damage that keeps the structure: a byte in the middle of tensor data, in model.safetensors (its weights'
    bytes fill the file after the header) or in optimizer.pt (an uncompressed zip archive: its largest member)."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".safetensors":
        at = len(data) - 100
    else:
        member = max(zipfile.ZipFile(path).infolist(), key=lambda m: m.file_size)
        name_and_extra = int.from_bytes(data[member.header_offset + 26:member.header_offset + 28], "little") + \
            int.from_bytes(data[member.header_offset + 28:member.header_offset + 30], "little")
        at = member.header_offset + 30 + name_and_extra + member.file_size // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


# what disk trouble, a manual edit or a copy cut short leaves, and the start of the line that names it
DAMAGE = {
    "optimizer.pt cut off": (lambda ck: _cut_in_half(ck / "optimizer.pt"),
                             "{ck}/optimizer.pt: empty, truncated or corrupt (not the complete zip archive"),
    # its first bytes garbled: torch.load no longer sees a zip archive and unpickles the bytes in its legacy format
    "optimizer.pt head garbled": (lambda ck: _overwrite_head(ck / "optimizer.pt"),
                                  "{ck}/optimizer.pt: empty, truncated or corrupt (not the complete zip archive"),
    "model.safetensors cut off": (lambda ck: _cut_in_half(ck / "model.safetensors"),
                                  "{ck}/model.safetensors: corrupt or truncated safetensors file"),
    "model.safetensors garbage": (lambda ck: (ck / "model.safetensors").write_bytes(b"not safetensors " * 100),
                                  "{ck}/model.safetensors: corrupt or truncated safetensors file"),
    # a byte of a tensor flipped: every structure reads, only the digests saved with the checkpoint tell
    "model.safetensors byte flipped": (lambda ck: _flip_a_tensor_byte(ck / "model.safetensors"),
                                       "{ck}/model.safetensors: damaged since it was saved (its bytes no longer "
                                       "match the digest in trainer_state.json)"),
    "optimizer.pt byte flipped": (lambda ck: _flip_a_tensor_byte(ck / "optimizer.pt"),
                                  "{ck}/optimizer.pt: damaged since it was saved"),
    # an edited record of digests may name only the checkpoint's own files (here one without a digest of its own, as
    # written before 2026-12-05)
    "trainer_state.json digests elsewhere": (lambda ck: _edit_json(ck / "trainer_state.json", sha256={"../x": "0"},
                                                                   state_sha256=None),
                                             "{ck}/trainer_state.json: 'sha256' must map the checkpoint's file names "
                                             "to digests"),
    # one bit of the step number flipped (2 -> 3): still valid JSON, checked against the digest of its own content
    "trainer_state.json step flipped": (lambda ck: _edit_json(ck / "trainer_state.json", step=3),
                                        "{ck}/trainer_state.json: damaged since it was saved (its content no longer "
                                        "matches the digest it records)"),
    # copied back under another step's name: resuming would redo the steps since and overwrite their checkpoints
    "trainer_state.json of another step": (lambda ck: shutil.copy(ck.parent / "step-000001" / "trainer_state.json", ck),
                                           "{ck}/trainer_state.json: records step 1, not the step 2 its directory is "
                                           "named for"),
    # a link to a directory that is gone (a purged scratch, a file system not mounted): never skipped for an older one
    "checkpoint links to a missing directory": (lambda ck: (shutil.rmtree(ck), ck.symlink_to(ck.parent / "purged")),
                                                "{ck} links to {ck.parent}/purged, which is missing"),
    "trainer_state.json missing": (lambda ck: (ck / "trainer_state.json").unlink(),
                                   "{ck} is not a training checkpoint: trainer_state.json is missing"),
    "trainer_state.json garbage": (lambda ck: (ck / "trainer_state.json").write_text("{\"step\": 2, \"da"),
                                   "{ck}/trainer_state.json: not valid JSON"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_names_the_file_and_the_older_checkpoint_to_resume_from(tmp_path, data_dir,
                                                                                           two_checkpoints, damage):
    """--resume takes the newest checkpoint; when one of its files is broken the run stops in one line that names
    the file and the older checkpoint that looks complete, with how to resume from that one. It never falls back
    by itself: that would silently drop the training since, which the user may still recover."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    newest = run_dir / "checkpoints" / "step-000002"
    harm, start = DAMAGE[damage]
    harm(newest)
    again = run_config("train.max_steps=3", "train.save_every=1")
    with pytest.raises(CheckpointError) as e:
        train(again, run_dir, data_dir=str(data_dir), resume=True)
    message = str(e.value)
    assert "\n" not in message and message.startswith(start.format(ck=newest)), message
    assert message.endswith(f"; the older step-000001 looks complete: to resume from it instead (losing the training "
                            f"after it), move the damaged one aside (mv {newest} {newest}.damaged) and run again with "
                            f"--resume"), message
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-000001", "step-000002"]  # nothing touched
    if damage == "optimizer.pt cut off":  # the advice works, and a damaged older checkpoint is not offered
        only = tmp_path / "only"
        shutil.copytree(run_dir, only)
        shutil.rmtree(only / "checkpoints" / "step-000001")
        with pytest.raises(CheckpointError, match=r"; it is the run's only checkpoint: restore it from a copy, or "
                                                  r"start the run again with another --out$"):
            train(again, only, data_dir=str(data_dir), resume=True)
        _cut_in_half(run_dir / "checkpoints" / "step-000001" / "model.safetensors")
        with pytest.raises(CheckpointError, match=r"; no older checkpoint \(step-000001\) looks complete either$"):
            train(again, run_dir, data_dir=str(data_dir), resume=True)
        shutil.copy(two_checkpoints / "checkpoints" / "step-000001" / "model.safetensors",
                    run_dir / "checkpoints" / "step-000001")
        oldest = run_dir / "checkpoints" / "step-000000"
        shutil.copytree(two_checkpoints / "checkpoints" / "step-000001", oldest)
        _edit_json(oldest / "trainer_state.json", step=0, state_sha256=None)  # its own step, no digest of its own
        assert looks_complete(oldest)  # both older ones would do: the newer is offered
        with pytest.raises(CheckpointError, match="; the older step-000001 looks complete"):  # the least lost
            train(again, run_dir, data_dir=str(data_dir), resume=True)
        newest.rename(f"{newest}.damaged")
        assert train(again, run_dir, data_dir=str(data_dir), resume=True).last_step == 3
        assert [p.name for p in complete_checkpoints(run_dir)] == ["step-000002", "step-000003"]
        assert Path(f"{newest}.damaged", "model.safetensors").exists()  # kept, for the user to recover or delete


def test_a_trainer_state_with_non_ascii_settings_resumes_under_an_ascii_locale(tmp_path):
    """trainer_state.json is UTF-8 whatever the locale (the default sample prompt is "O Brasil é"), and is
    read back as UTF-8 too."""
    code = (f"from pathlib import Path; import torch; from ttl_core.fileio import write_json; "
            f"from ttl_core.checkpoint import load_trainer_state, rng_state; ck = Path({str(tmp_path)!r}); "
            f"write_json(ck / 'trainer_state.json', {{'step': 1, 'data': {{}}, 'prompt': 'O Brasil \\u00e9'}}); "
            f"torch.save({{'optimizer': {{}}, 'rng': rng_state()}}, ck / 'optimizer.pt'); "
            f"print(ascii(load_trainer_state(ck)[0]['prompt']))")
    run = run_in_ascii_locale(code)
    assert run.returncode == 0 and run.stdout.strip() == "'O Brasil \\xe9'", run.stderr[-500:]


def test_an_unreadable_trainer_state_or_a_pickle_of_objects_is_refused_not_loaded(tmp_path):
    """A torn trainer_state.json is one error line, and optimizer.pt is read with weights_only: a pickle that
    would build an arbitrary object (here an argparse.Namespace) is refused, never executed."""
    import argparse
    ckpt = tmp_path / "step-000001"
    ckpt.mkdir()
    torch.save({"optimizer": {}, "rng": {}}, ckpt / "optimizer.pt")
    (ckpt / "trainer_state.json").write_text('{"step": 1, "da')
    with pytest.raises(CheckpointError, match="trainer_state.json: not valid JSON"):
        load_trainer_state(ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "data": {}}))
    torch.save({"optimizer": {}, "rng": {}, "extra": argparse.Namespace(lr=0.1)}, ckpt / "optimizer.pt")
    with pytest.raises(CheckpointError, match="optimizer.pt: unreadable trainer state"):
        load_trainer_state(ckpt)


def test_the_saved_rng_state_restores_python_numpy_and_torch_through_optimizer_pt(tmp_path):
    """rng_state() survives the weights_only round trip of optimizer.pt, and set_rng_state puts every
    generator back: the draws after restoring are the draws after saving."""
    import random
    import numpy as np
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    torch.save({"rng": ttl_checkpoint.rng_state()}, tmp_path / "optimizer.pt")

    def draws():
        return random.random(), np.random.rand(4).tolist(), torch.rand(4).tolist()

    first = draws()
    draws()  # the generators move on, as a new process's would differ
    ttl_checkpoint.set_rng_state(torch.load(tmp_path / "optimizer.pt", weights_only=True)["rng"])
    assert draws() == first


def test_a_resumed_run_hides_the_tensorboard_events_past_its_checkpoint(tmp_path, monkeypatch):
    """TensorBoard describes one history, as metrics.jsonl does: the writer of a run resumed at step 3 purges what
    a killed run logged from step 4 on (SummaryWriter's purge_step), and a fresh run's purges all an earlier one
    left. A stand-in SummaryWriter records the arguments (tensorboard itself is an optional dependency)."""
    import types
    from ttl_core.metrics import MetricsLog
    made = []

    class Writer:
        def __init__(self, log_dir, **kwargs):
            made.append(kwargs)

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    MetricsLog(tmp_path, resume_step=3, tensorboard=True).close()
    MetricsLog(tmp_path, tensorboard=True).close()
    assert [kwargs.get("purge_step") for kwargs in made] == [4, 1]


def test_data_tokenized_with_another_tokenizer_than_the_checkpoint_s_is_refused(tmp_path, data_dir):
    """A vocabulary no larger than the model's passed the size checks, so continuing pretraining (or resuming)
    on data a fresh tokenizer made trained the checkpoint's embeddings on ids that mean other tokens."""
    train(run_config("train.max_steps=1"), tmp_path / "a", data_dir=str(data_dir))
    source = tmp_path / "a" / "checkpoints" / "step-000001"
    docs = [f"Capítulo {i}: a chuva caiu sobre o telhado da escola e os alunos cantaram. " * 3 for i in range(40)]
    (tmp_path / "other.txt").write_text("\n\n".join(docs), encoding="utf-8")
    other = tmp_path / "other"
    prepare_data([tmp_path / "other.txt"], other, vocab_size=300, val_fraction=0.25)
    refusal = (f"{other} was tokenized with another tokenizer than {source}'s: prepare the data with "
               f"scripts/prepare_data.py --tokenizer {source}")  # not a resume's remedy
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        train(run_config("train.max_steps=2"), tmp_path / "b", data_dir=str(other), init_from=str(source))
    # resuming, the data is what changed (a forgotten --data trains on the bundled corpus, prepared anew)
    with pytest.raises(ConfigError, match="another tokenizer than .*step-000001's: resume on the data the run "
                                          "was trained on"):
        train(run_config("train.max_steps=2"), tmp_path / "a", data_dir=str(other), resume=True)
    # the same text tokenized with the checkpoint's tokenizer trains; so do weights saved without a tokenizer
    prepare_data([tmp_path / "other.txt"], tmp_path / "same", tokenizer=source, val_fraction=0.25)
    assert train(run_config("train.max_steps=1"), tmp_path / "c", data_dir=str(tmp_path / "same"),
                 init_from=str(source)).last_step == 1
    bare = tmp_path / "bare"
    shutil.copytree(source, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    assert train(run_config("train.max_steps=1"), tmp_path / "d", data_dir=str(other),
                 init_from=str(bare)).last_step == 1
    # tokens added after the data's (an added special token) leave every id of the data its meaning
    extended = Tokenizer.from_pretrained(source)
    extended.add_special_tokens(["<extra>"])
    extended.save_pretrained(bare)
    assert train(run_config("train.max_steps=1"), tmp_path / "e", data_dir=str(data_dir),
                 init_from=str(bare)).last_step == 1
