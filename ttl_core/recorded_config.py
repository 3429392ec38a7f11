"""The run config a checkpoint recorded (trainer_state.json's "config") against the one that resumes it: what
may not change, what the resumed run records, and which data the run trained on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import PRESETS, RUNTIME_FIELDS
from .errors import CheckpointError, ConfigError
from .run_config import RunConfig


def check_resumable(run: RunConfig, saved: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume `checkpoint` with a config that contradicts the run's own (`saved`, trainer_state.json's
    "config"): a [model] key given now, in the file or by --set, that resolves otherwise than in the run (the
    checkpoint fixes the model trained, and the other config would be recorded beside it), or another
    train.no_decay (it would move parameters between weight-decay groups), or another train.optimizer (whose state
    the checkpoint holds; checked even where the run recorded no [model]), or another train.seq_len or train.seed
    (they fix the data position; the loader checks the global batch, which needs the number of processes). The lr,
    schedule and other optimizer settings may change."""
    if not isinstance(saved, dict):
        return
    train_was = saved.get("train", {})
    if not isinstance(train_was, dict):
        raise CheckpointError(f"{checkpoint}: trainer_state.json records [train] as {train_was!r}, not a table")
    optimizer = train_was.get("optimizer", "adamw")  # a run from before train.optimizer was AdamW's
    if optimizer != run.train.optimizer:
        raise ConfigError(f"{checkpoint} was trained with train.optimizer={optimizer!r}, whose state it saved; resume "
                          f"with it, or start a new run with --init-from {checkpoint}")
    if not isinstance(saved.get("model"), dict):  # written before it was recorded
        return
    try:
        model_was = RunConfig(dict(saved["model"]), run.data, run.train).model_config()
    except ConfigError as e:
        raise ConfigError(f"{checkpoint}: the [model] its run recorded is not valid here ({e})") from None
    model_now = run.model_config()
    given = set(run.model) - {"preset"} | set(PRESETS.get(run.model.get("preset"), {}))  # a preset sets its fields
    for key in sorted(given - set(RUNTIME_FIELDS)):
        now, before = getattr(model_now, key), getattr(model_was, key)
        if now != before:
            raise ConfigError(f"model.{key} is {now!r} here, but {checkpoint} was trained in a run with {before!r}; "
                              f"a resumed run keeps its model: give the run's own [model] settings, or start a new "
                              f"run with --init-from {checkpoint}")
    no_decay = train_was.get("no_decay")
    if no_decay is not None and no_decay != list(run.train.no_decay):  # JSON recorded a list
        raise ConfigError(f"{checkpoint} was trained with train.no_decay={no_decay}; resuming with "
                          f"{run.train.no_decay} would move parameters between weight-decay groups")
    for key in ("seq_len", "seed"):
        if key in train_was and train_was[key] != getattr(run.train, key):
            raise ConfigError(f"train.{key} is {getattr(run.train, key)!r} here, but {checkpoint} was trained with "
                              f"{train_was[key]!r}, which fixes where its data continues: resume with the run's own "
                              f"config (--config)")


def resumed_model_settings(run: RunConfig, saved: Any) -> dict[str, Any]:
    """The [model] a resumed run records: the run's own (`saved`, trainer_state.json's "config"), under what this
    resume gives (which `check_resumable` let through: keys that resolve alike, and the runtime fields). The
    resume's alone would drop the keys it does not give, and the next resume with the run's config be refused."""
    model = saved.get("model") if isinstance(saved, dict) else None
    return {**model, **run.model} if isinstance(model, dict) else dict(run.model)


def recorded_data_setting(saved: Any, key: str) -> Any:
    """`[data]`'s `key` as a checkpoint's run recorded it (trainer_state.json's "config"), or None."""
    data = saved.get("data") if isinstance(saved, dict) else None
    return data.get(key) if isinstance(data, dict) else None


def recorded_data_path(saved: Any) -> str | None:
    """The data directory a checkpoint's run trained on; None where it is not recorded: the run's own RUN/data (the
    bundled corpus), or a checkpoint written before --data was recorded."""
    path = recorded_data_setting(saved, "path")
    return path if isinstance(path, str) and path else None
