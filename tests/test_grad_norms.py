"""train.log_grad_norms: each part's gradient norm (grad_norm/embed, grad_norm/layers.N, grad_norm/norm,
grad_norm/lm_head) against transformers' gradients of the same weights and batch, the parts adding up to grad_norm,
and a run that logs them training as one that does not (two processes: test_train's parity runs log them too)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_reference import hf_causal_lm
from test_train_reference import blocks_of, summed_loss, target_count, training_batches
from train_helpers import run_config
from ttl_core.metrics import read_metrics
from ttl_core.train import train


def part_figures(record: dict) -> dict[str, float]:
    return {key: value for key, value in record.items() if key.startswith("grad_norm/")}


def assert_parts_make_up_the_norm(record: dict) -> None:
    """The parts hold every parameter once: their squares add up to grad_norm's, to float32 rounding."""
    squares = sum(norm ** 2 for norm in part_figures(record).values())
    assert math.isclose(squares, record["grad_norm"] ** 2, rel_tol=1e-6), record


def transformers_part_norms(model, tied: bool) -> dict[str, float]:
    """The norm of each part's gradients in transformers' LlamaForCausalLM, under the names ttl logs them by."""
    parts = {"embed": model.model.embed_tokens, **{f"layers.{i}": block for i, block in enumerate(model.model.layers)},
             "norm": model.model.norm, **({} if tied else {"lm_head": model.lm_head})}
    grads = {name: torch.cat([p.grad.flatten() for p in part.parameters()]) for name, part in parts.items()}
    return {f"grad_norm/{name}": torch.linalg.vector_norm(grad).item() for name, grad in grads.items()}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_each_parts_norm_is_the_norm_of_transformers_gradients_of_that_part(tmp_path, data_dir, tied):
    """The first step's norms, over two accumulated micro-batches, measured before clipping (which this step does);
    a tied LM head's gradient is in the embedding's, and no grad_norm/lm_head is logged."""
    reference = hf_causal_lm(seed=1, vocab_size=400, intermediate_size=128, max_position_embeddings=64,
                             num_key_value_heads=2, tie_word_embeddings=tied).float().train()
    reference.save_pretrained(tmp_path / "init")
    run = run_config("train.max_steps=1", "train.grad_accum_steps=2", "train.grad_clip=0.5", "train.eval_every=0",
                     "train.seed=5", "train.log_grad_norms=true")
    t = run.train
    train(run, tmp_path / "run", data_dir=str(data_dir), init_from=str(tmp_path / "init"))
    [record] = read_metrics(tmp_path / "run" / "metrics.jsonl")

    draw = training_batches(blocks_of(data_dir, "train", t.seq_len), t.micro_batch_size, t.seed)
    micro_batches = [next(draw) for _ in range(t.grad_accum_steps)]
    targets = sum(target_count(block, None) for block in micro_batches)
    for block in micro_batches:
        (summed_loss(reference, block, None) / targets).backward()
    expected = transformers_part_norms(reference, tied)
    assert record["grad_norm"] > t.grad_clip  # clipped: norms measured after clipping would be smaller
    assert part_figures(record).keys() == expected.keys()
    for key, norm in expected.items():
        assert math.isclose(record[key], norm, rel_tol=1e-5), (key, record[key], norm)
    assert_parts_make_up_the_norm(record)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_run_logging_the_parts_trains_bit_for_bit_as_one_that_does_not(tmp_path, data_dir, dtype):
    """The same records but for the parts (losses, norms, lrs, fp16's loss scales, evaluation), which add up to
    grad_norm at every step: with float16, unscaled, as grad_norm is (else they would be 65,536 times too large)."""
    common = ["train.max_steps=3", "train.grad_accum_steps=2", f"train.dtype=\"{dtype}\""]
    train(run_config(*common), tmp_path / "off", data_dir=str(data_dir))
    train(run_config(*common, "train.log_grad_norms=true"), tmp_path / "on", data_dir=str(data_dir))
    off, on = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("off", "on"))
    timings = ("tokens_per_s", "mfu")
    assert [{k: v for k, v in r.items() if k not in timings and k not in part_figures(r)} for r in on] == \
        [{k: v for k, v in r.items() if k not in timings} for r in off]
    assert not any(part_figures(r) for r in off)
    steps = [r for r in on if "loss" in r]
    assert len(steps) == 3 and all(len(part_figures(r)) == 5 for r in steps)
    for record in steps:
        assert_parts_make_up_the_norm(record)
