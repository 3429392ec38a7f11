"""Errors a user can cause. Each carries a one-line message naming the file, tensor or argument at fault.

Every class derives from `TTLError`, itself a `ValueError`, so callers can catch one type; scripts turn
it into a single `error: ...` line instead of a traceback (see `ttl_core.cli.run_cli`). The two type
predicates below are the ones the checks that raise them share: JSON, TOML and Python all let a bool pass
for a number, which no setting here means.
"""

import sys
from typing import Any, Iterable, Iterator


def is_number(value: Any) -> bool:
    """A float, or an int that a float can hold (float() and math would overflow on a larger one), not a bool
    (NaN and infinities included: range checks written so NaN fails them)."""
    return isinstance(value, float) or is_integer(value) and abs(value) <= sys.float_info.max


def is_integer(value: Any) -> bool:
    """A Python int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def noting_failure(items: Iterable[Any], failures: list[Exception]) -> Iterator[Any]:
    """`items`, with the exception iterating them raises appended to `failures` before it propagates: a consumer
    in C++ (sentencepiece's trainer) re-raises it as a RuntimeError that names only a line of code."""
    try:
        yield from items
    except Exception as e:
        failures.append(e)
        raise


class TTLError(ValueError):
    """Base class of every user-facing ttl error."""


class ConfigError(TTLError):
    """A model or training configuration is invalid or unsupported."""


class CheckpointError(TTLError):
    """A checkpoint directory or file is missing, corrupt or does not fit the model."""


class DataError(TTLError):
    """Input data (text files, token files, task files) is empty, malformed or inconsistent."""


class DataNotReady(ConfigError, DataError):
    """Data a run needs is not prepared yet (no meta.json, no validation split), or a split holds no global batch:
    the run refuses it, its plan (`scripts/pretrain.py --plan`) names it and plans the rest."""


class TokenizerError(TTLError):
    """A tokenizer file is missing or of an unsupported kind."""


class AdapterError(TTLError):
    """A LoRA adapter does not fit the model it is applied to."""


class GenerationError(TTLError):
    """Arguments to text generation are out of range or inconsistent."""


class TrainingError(TTLError):
    """A training run cannot continue (a non-finite loss, a checkpoint that does not match the run)."""
