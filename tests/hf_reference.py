"""Builders for small random transformers Llama models (built locally, never downloaded), their saved checkpoints
read and edited, and the pieces of a plain training loop written with transformers and torch that ttl's training
runs are checked against."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
import transformers
from safetensors import safe_open

import ttl_core


def hf_config(**overrides) -> transformers.LlamaConfig:
    base = dict(vocab_size=131, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    return transformers.LlamaConfig(**base)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.15) -> torch.nn.Module:
    """Re-draw every parameter so activations are O(1): the default 0.02 init makes logits nearly zero,
    which would let real mismatches hide under the tolerance."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_((1.0 + noise) if name.endswith("norm.weight") else noise)
    return model


def hf_causal_lm(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return randomize_(transformers.LlamaForCausalLM(hf_config(**overrides)), seed).eval()


def hf_classifier(seed: int = 0, **overrides) -> transformers.LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return randomize_(transformers.LlamaForSequenceClassification(hf_config(**overrides)), seed).eval()


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `directory`, by name."""
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def saved_hf(hf_model, directory: Path) -> Path:
    """`hf_model` saved (transformers' layout) in `directory`, which is returned."""
    hf_model.save_pretrained(directory)
    return directory


def edit_config(directory: Path, **changes) -> None:
    """Set keys of the config.json in `directory`."""
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def to_ttl(hf_model, tmp_path: Path, **overrides) -> torch.nn.Module:
    """`hf_model` saved in `tmp_path` and loaded by ttl (with `load_pretrained`'s `overrides`)."""
    return ttl_core.load_pretrained(saved_hf(hf_model, tmp_path), **overrides)


def padded_batch(vocab: int, pad: int, seed: int = 1, batch: int = 4, seq: int = 19):
    """Random ids with rows 0 and 1 left-padded (2 and 6 pads), row 2 right-padded, row 3 unpadded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :6] = 0
    mask[2, 13:] = 0
    mask[0, :2] = 0
    ids[mask == 0] = pad
    return ids, mask


def reference_adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    eps: float = 1e-8, leave_out: Callable[[str], bool] = lambda name: False) -> torch.optim.AdamW:
    """torch's AdamW with the norms and biases (by transformers' parameter names) exempt from weight decay, over
    the parameters but those whose name is to `leave_out` (another optimizer's)."""
    named = [(name, p) for name, p in model.named_parameters() if not leave_out(name)]
    exempt = [p for name, p in named if "norm" in name or "bias" in name]
    decayed = [p for name, p in named if not ("norm" in name or "bias" in name)]
    assert exempt and decayed
    return torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                              {"params": exempt, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)


def reference_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float, grad_clip: float) -> float:
    """Clip the accumulated gradients to `grad_clip`, step at `lr` and zero them; returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad()
    return grad_norm


def reference_lr(step: int, lr: float, min_lr: float, warmup: int, max_steps: int, schedule: str = "cosine",
                 decay_steps: int = 0) -> float:
    """The lr of update `step` (from 1): a linear warmup to `lr` at step `warmup`, then transformers' warmup-stable-
    decay schedule one step behind (transformers numbers its first update 0): the `schedule`'s decay to `min_lr` over
    the last `decay_steps` steps (0: all those after the warmup); "constant" holds `lr`."""
    if step <= warmup:
        return lr * step / warmup
    if schedule == "constant":
        return lr
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    decay_steps = decay_steps or max_steps - warmup
    wsd = transformers.get_wsd_schedule(probe, warmup, decay_steps, max_steps, decay_type=schedule,
                                        min_lr_ratio=min_lr / lr)
    return wsd.lr_lambdas[0](step - 1) * lr


def as_close_as_transformers(our_error: float, their_error: float, floor: float) -> bool:
    """How ttl's training runs are judged against the plain reference loop, as flash-attn judges its kernels: a
    figure of ttl's run (a loss, a gradient norm, a weight tensor) is within `floor` of the loop's float64 run
    (`our_error`), or no further from it than twice the loop's own float32 run is (`their_error`). A direct
    comparison with the float32 loop would not do: AdamW divides each gradient by its own running scale, so a
    float32 rounding in a near-zero gradient moves its weight by up to lr times its relative error, and every figure
    after that step moves with it (two steps on ttl's Triton kernels put transformers' float32 run 2e-5 from the
    float64 one in the weights, 3e-6 in a gradient norm)."""
    return our_error <= max(floor, 2 * their_error)


def assert_figures_as_close_as_transformers(ours: list[dict], theirs: list[dict], exact: list[dict]) -> None:
    """Each update's figures as metrics.jsonl logs them (`ours`) against the float32 and float64 runs of the loop:
    the same steps and lr, the same gradient norms by part, and every other figure of the loop's (the loss, the
    gradient norm, a smoothed loss, each part's norm) `as_close_as_transformers`, with a floor of 1e-5 relative."""
    assert [(r["step"], r.get("epoch")) for r in ours] == [(r["step"], r.get("epoch")) for r in theirs]
    for got, want, truth in zip(ours, theirs, exact):
        assert math.isclose(got["lr"], want["lr"], rel_tol=1e-12), got["step"]  # one formula, two spellings
        assert {k for k in got if k.startswith("grad_norm/")} == {k for k in want if k.startswith("grad_norm/")}
        for key in want.keys() - {"step", "epoch", "lr"}:
            their_error = abs(want[key] - truth[key])
            # else the two runs of the loop differ in more than rounding, and "twice their error" checks nothing
            assert their_error <= 1e-3 * abs(truth[key]), ("the float64 loop is another run", key, want, truth)
            assert as_close_as_transformers(abs(got[key] - truth[key]), their_error, 1e-5 * abs(truth[key])), \
                (key, got, want, truth)


def assert_trained_as_closely_as_transformers(ours: dict, theirs: dict, exact: dict) -> None:
    """Weights ttl trained (`ours`) against those of the float32 and float64 runs of the loop: each tensor's
    largest error `as_close_as_transformers`, with a floor of 1e-5."""
    assert ours.keys() == exact.keys()
    for name, weight in ours.items():
        our_error = (weight.double() - exact[name]).abs().max().item()
        their_error = (theirs[name].double() - exact[name]).abs().max().item()
        assert their_error <= 1e-3, ("the float64 loop is another run", name, their_error)  # as for the figures
        assert as_close_as_transformers(our_error, their_error, 1e-5), (name, our_error, their_error)
