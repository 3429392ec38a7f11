"""Checkpoint averaging: the weighted mean of several checkpoints of one model (the last checkpoints of a run, as
in LAWA and the checkpoint averaging of warmup-stable-decay schedules), written as a checkpoint of its own.

The mean is taken tensor by tensor, each checkpoint's file opened for the tensor and closed again, so host memory
holds the averaged model in the output dtype (twice while `save_pretrained` writes it) and a few float64 tensors the
size of the one being averaged (up to five while a bfloat16 or float16 one is rounded), whatever the number of
checkpoints. Each tensor is accumulated in float64, not float32: a float32 sum rounds after every addition (a
weighted mean of three float32 checkpoints then misses the nearest float32 value somewhere), while in float64 the
sum of a few float32 or bfloat16 values times small integer weights (equal ones included) is exact (unless their
magnitudes lie some 2**28 apart), so each averaged element is the true mean rounded once to the output dtype, but
for a tie within 2**-29 of a float32 step. A fractional weight's product is rounded, by at most 2**-29 of the
product's float32 step: the same holds unless the weighted values cancel to far below their own size (an element the
checkpoints give opposite signs, averaging to near zero), where that rounding can move the mean's last bit. The
output is written as `save_pretrained` writes any checkpoint, into a hidden directory renamed into place when
complete, with the newest checkpoint's tokenizer and generation_config.json and an `averaging.json` naming the
checkpoints and weights averaged.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from .checkpoint import EMA_DIR, SHA256, TRAINER_STATE, checkpoint_root, complete_checkpoints, verify_digests
from .cli import refuse_to_replace
from .config import RUNTIME_FIELDS, LlamaConfig
from .errors import CheckpointError, ConfigError
from .fileio import read_json, write_dir_atomically, write_json
from .generate_output import GenerationSettings
from .hf import (GENERATION_CONFIG, IGNORED_HF_TENSORS, NATIVE_CONFIG, SAFETENSORS_DTYPES, check_against_plan,
                 check_weight_files, hf_plan, native_plan, read_model_config, resolve_dtype, save_pretrained,
                 stored_tensors)
from .lora_files import is_adapter_dir
from .model import build_model
from .tokenizer import Tokenizer

RECORD = "averaging.json"  # beside the averaged weights: what was averaged, with which weights


def run_checkpoints(run_dir: str | os.PathLike, last: int) -> list[Path]:
    """The newest `last` complete checkpoints of the run in `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if not checkpoint_root(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: not a run directory (it has no checkpoints/ folder)")
    found = complete_checkpoints(run_dir)
    if len(found) < last:
        raise CheckpointError(f"{run_dir} holds {len(found)} complete checkpoint(s) "
                              f"({', '.join(p.name for p in found) or 'none'}); asked for the last {last}")
    return found[-last:]


def average_checkpoints(dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
                        weights: Sequence[float] | None = None, dtype: torch.dtype | str | None = None,
                        overwrite: bool = False) -> Path:
    """Write to `out` the checkpoint whose every tensor is the mean of the `dirs` checkpoints' (HF or ttl-native
    layout, one architecture, config and tokenizer vocabulary), weighted by `weights` (default equal; normalized
    by their sum), in `dtype` (default: the stored dtype of the last checkpoint's embedding). The last of `dirs`
    counts as the newest: its tokenizer and generation_config.json go with the average. An existing `out` is
    replaced, whole, only with `overwrite`."""
    dirs, out = [Path(d) for d in dirs], Path(out)
    weights = _checked_weights(weights, len(dirs))
    _check_output_dir(out, dirs, overwrite)
    config, architecture = _same_model(dirs)
    tokenizer = _same_vocabulary(dirs)
    newest = dirs[-1]
    # the files are opened again for each tensor: a file kept mapped would keep every page read resident, K models
    founds = [stored_tensors(d)[1] for d in dirs]
    _same_tensors(dirs, founds)
    native = (newest / NATIVE_CONFIG).exists()
    with torch.device("meta"):
        model = build_model(config, architecture)
    plan = native_plan(model) if native else hf_plan(config, architecture)
    found = founds[-1]
    tied = config.tie_word_embeddings and architecture == "LlamaForCausalLM" and not native
    if tied and "lm_head.weight" in found:
        if "model.embed_tokens.weight" in found:  # loading would untie them if they differ: averaging cannot tie
            raise CheckpointError(f"{newest}: config.json ties the LM head to the embedding, yet lm_head.weight is "
                                  "stored beside it; load and save the checkpoints with ttl first")
        plan["backbone.embed.weight"] = [("lm_head.weight", None)]  # the shared tensor stored under the head's name
    check_against_plan(plan, dict(model.named_parameters()), found, newest,
                       lambda key: bool(IGNORED_HF_TENSORS.fullmatch(key)))
    embed_key = plan["backbone.embed.weight"][0][0]
    with safe_open(found[embed_key][0], framework="pt") as f:
        out_dtype = resolve_dtype(dtype) or SAFETENSORS_DTYPES[f.get_slice(embed_key).get_dtype()]
    dtype_name = str(out_dtype).removeprefix("torch.")

    def mean(key: str) -> torch.Tensor:
        total = torch.zeros(found[key][1], dtype=torch.float64)
        for stored, weight in zip(founds, weights):
            with safe_open(stored[key][0], framework="pt") as f:
                total.add_(f.get_tensor(key).double(), alpha=weight)
        averaged = _rounded_once(total.div_(sum(weights)), out_dtype)
        if not bool(averaged.isfinite().all()):  # written as it is, a model of inf or NaN weights
            if not bool(total.isfinite().all()):
                raise CheckpointError(f"tensor {key}: a checkpoint holds NaN or infinity in it; average finite ones")
            raise CheckpointError(f"tensor {key}: its average overflows {dtype_name} (largest finite value "
                                  f"{torch.finfo(out_dtype).max:g}); pass a wider --dtype")
        return averaged

    # fused ttl parameters (q/k/v, gate/up) are built from their averaged pieces one at a time
    state_dict = {name: torch.cat([mean(key) for key, _ in pieces]) for name, pieces in plan.items()}
    if (newest / GENERATION_CONFIG).is_file():
        model.generation_config = GenerationSettings(read_json(newest / GENERATION_CONFIG, CheckpointError))

    def write(partial: Path) -> None:
        save_pretrained(model, partial, dtype=out_dtype, tokenizer=tokenizer, state_dict=state_dict)
        write_json(partial / RECORD, {"checkpoints": [str(d.resolve()) for d in dirs], "weights": weights,
                                      "accumulation": "float64", "dtype": dtype_name})

    return write_dir_atomically(out, write)


def _check_output_dir(out: Path, dirs: list[Path], overwrite: bool) -> None:
    """Refuse an output directory that is a file, holds the working directory, replaces or lies inside a checkpoint
    averaged, or (without `overwrite`) holds files already."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; the average is written to a directory")
    if out.resolve() in (Path.cwd(), *Path.cwd().parents):  # replaced whole, it would go from under the shell
        raise ConfigError(f"{str(out)!r} is the working directory or a folder holding it; write the average to a "
                          "directory of its own")
    # replacing a checkpoint averaged, or a folder holding one (its run), would delete what is being read
    held = next((d for d in dirs if out.resolve() in (d.resolve(), *d.resolve().parents)), None)
    if held is not None:
        raise ConfigError(f"{out} would replace {held}, one of the checkpoints averaged; write the average elsewhere")
    # inside one (as its ema/), it would break the digests of the files it replaced, or go when the run prunes it
    held = next((d for d in dirs if d.resolve() in out.resolve().parents), None)
    if held is not None:
        raise ConfigError(f"{out} lies inside {held}, one of the checkpoints averaged; write the average elsewhere")
    refuse_to_replace(out, tuple(sorted(os.listdir(out))) if out.is_dir() else (), "files", overwrite)


def _rounded_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float64 `x` rounded to the nearest `dtype` value. torch casts float64 to bfloat16 and float16 through float32,
    rounding twice: a value a little past a tie of the narrow dtype lands on the tie in float32, then goes to the even
    side. Narrowed to float32 by rounding to odd instead (cut toward zero, the last bit set where anything was cut),
    which keeps every value on its side of a tie, so the cast to the narrow dtype is the one rounding."""
    if dtype.itemsize >= 4:
        return x.to(dtype)
    narrowed = x.float()
    toward_zero = torch.nextafter(narrowed, torch.zeros_like(narrowed))
    cut = torch.where(narrowed.double().abs() > x.abs(), toward_zero, narrowed)
    return (cut.view(torch.int32) | (cut.double() != x).int()).view(torch.float32).to(dtype)


def _checked_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """One finite, non-negative weight per checkpoint (equal by default) with a positive, finite sum."""
    if count < 2:
        raise ConfigError(f"averaging takes at least 2 checkpoints, got {count}")
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ConfigError(f"{len(weights)} weights for {count} checkpoints; give one weight per checkpoint")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ConfigError(f"weights must be finite and non-negative, got {weights}")
    if not 0 < sum(weights) < math.inf:
        raise ConfigError(f"the weights must have a positive, finite sum, got {weights}")
    return weights


def _same_model(dirs: list[Path]) -> tuple[LlamaConfig, str]:
    """The config and architecture the checkpoints share, each checked undamaged; a checkpoint given twice, or the
    first difference between two (a config key, the architecture, the layout), is a CheckpointError naming it."""
    described: dict[Path, dict] = {}
    for d in dirs:
        if d.resolve() in described:
            raise CheckpointError(f"{d} is given twice; give each checkpoint once (--weights weighs one more)")
        if is_adapter_dir(d):
            raise CheckpointError(f"{d} is a LoRA adapter (adapter_config.json), not a checkpoint: average full "
                                  "checkpoints, or merge each adapter into its base first (ttl_core.lora_files."
                                  "load_with_adapter, then save_pretrained)")
        _check_undamaged(d)
        config, architecture = read_model_config(d)
        fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_FIELDS}
        layout = "ttl-native" if (d / NATIVE_CONFIG).exists() else "Hugging Face"
        described[d.resolve()] = {"architecture": architecture, "layout": layout, **fields}
    first, *others = described.values()
    for d, description in zip(dirs[1:], others):
        differing = next((k for k in first if description[k] != first[k]), None)
        if differing is not None:
            raise CheckpointError(f"{dirs[0]} and {d} are different models: {differing} is {first[differing]!r} in "
                                  f"the first, {description[differing]!r} in the second")
    return config, architecture


def _same_vocabulary(dirs: list[Path]) -> Tokenizer | None:
    """The newest checkpoint's tokenizer (None where it has none); a checkpoint whose tokenizer gives some id
    another token than the first tokenizer found does is a CheckpointError: the embedding rows averaged would
    belong to different tokens."""
    carried = {d: Tokenizer.from_pretrained(d) for d in dirs
               if any((d / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))}
    first = next(iter(carried), None)
    for d, tokenizer in carried.items():
        expected = carried[first]
        i = expected.first_different_id(tokenizer)
        if i is not None or tokenizer.vocab_size != expected.vocab_size:
            difference = (f"{expected.vocab_size} tokens in the first, {tokenizer.vocab_size} in the second"
                          if i is None else f"token {i} is {expected.id_to_token(i)!r} in the first, "
                          f"{tokenizer.id_to_token(i)!r} in the second")
            raise CheckpointError(f"{first} and {d} have different tokenizers: {difference}")
    return carried.get(dirs[-1])


def _check_undamaged(checkpoint: Path) -> None:
    """Refuse a checkpoint whose weight files cannot be read, or, for a run's checkpoint or the moving average
    saved in one (step-N/ema), whose weights or config no longer match the digests the run's trainer_state.json
    recorded (a damaged byte leaves the headers readable)."""
    check_weight_files(checkpoint)
    run_checkpoint, inside = (checkpoint.parent, f"{EMA_DIR}/") if checkpoint.name == EMA_DIR else (checkpoint, "")
    if (run_checkpoint / TRAINER_STATE).is_file():
        digests = read_json(run_checkpoint / TRAINER_STATE, CheckpointError).get(SHA256)
        if isinstance(digests, dict):  # optimizer.pt is not read here: it need not be there
            verify_digests(run_checkpoint, {SHA256: {
                name: digest for name, digest in digests.items() if name.startswith(inside)
                and (name[len(inside):] == "config.json" or name[len(inside):].startswith("model"))}})


def _same_tensors(dirs: list[Path], founds: list[dict[str, tuple[Path, list[int]]]]) -> None:
    """Every checkpoint stores the same tensor names in the same shapes; the first difference is named."""
    first = founds[0]
    for d, found in zip(dirs[1:], founds[1:]):
        for key in sorted(set(first) | set(found)):
            if key not in found or key not in first:
                holder, other = (dirs[0], d) if key in first else (d, dirs[0])
                raise CheckpointError(f"tensor {key} is stored in {holder} but not in {other}")
            if list(found[key][1]) != list(first[key][1]):
                raise CheckpointError(f"tensor {key} has shape {list(first[key][1])} in {dirs[0]} and "
                                      f"{list(found[key][1])} in {d}")
