"""A whole pretraining run against a plain loop written from the documented recipe with transformers'
LlamaForCausalLM, torch's AdamW and clip_grad_norm_, and transformers' cosine schedule: the same weights in,
the same batches (drawn from train.bin as PackedLoader's docstring says, not by PackedLoader), so the same
losses, gradient norms, lrs, evaluation and final weights out (the weights judged against the loop in float64:
see `check_run_follows_reference`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from helpers import KERNEL_MODULES, record_kernel_decisions
from hf_reference import (as_close_as_transformers, assert_figures_as_close_as_transformers,
                          assert_trained_as_closely_as_transformers, hf_causal_lm, reference_adamw, reference_lr,
                          reference_update)
from train_helpers import prepared_corpus, run_config
from ttl_core.metrics import read_metrics
from ttl_core.run_config import TrainConfig
from ttl_core.train import train

# gradient accumulation, an epoch boundary (about 18 micro-batches an epoch), clipping both on and off, weight
# decay, warmup and cosine to a floor
RECIPE = ["train.max_steps=12", "train.micro_batch_size=10", "train.grad_accum_steps=2", "train.warmup_steps=3",
          "train.min_lr=3e-4", "train.weight_decay=0.1", "train.grad_clip=2.0", "train.eval_every=12",
          "train.save_every=12", "train.seed=5"]


def blocks_of(data_dir: Path, split: str, seq_len: int) -> np.ndarray:
    """`split`.bin cut into (n_blocks, seq_len + 1) windows at stride seq_len."""
    meta = json.loads((data_dir / "meta.json").read_text())
    tokens = np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)
    n_blocks = (len(tokens) - 1) // seq_len
    return np.stack([tokens[b * seq_len:b * seq_len + seq_len + 1] for b in range(n_blocks)])


def training_batches(blocks: np.ndarray, batch_size: int, seed: int):
    """Batch after batch: epoch e visits the blocks in the permutation seeded by [seed, e], in whole batches."""
    for epoch in range(1_000):
        order = np.random.default_rng([seed, epoch]).permutation(len(blocks))
        for first in range(0, len(order) - batch_size + 1, batch_size):
            yield torch.from_numpy(blocks[order[first:first + batch_size]])


def block_targets(block: torch.Tensor, meta: dict | None) -> torch.Tensor:
    """The block's targets: every token after the first, but with document masking (`meta`, the data's meta.json)
    the <s> that starts the next document, which is ignored (-100)."""
    labels = block[:, 1:]
    return labels if meta is None else labels.masked_fill(labels == meta["bos_id"], -100)


def logits_and_targets(model: transformers.LlamaForCausalLM, block: torch.Tensor,
                       meta: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of every position of the block and its targets (`block_targets`), flattened. With document masking
    each document runs alone, from position 0."""
    inputs, targets = block[:, :-1], block_targets(block, meta)
    if meta is None:
        return model(inputs).logits.flatten(0, 1), targets.flatten()
    logits = []
    for row in inputs:
        starts = [0] + [j for j in range(1, len(row)) if row[j - 1] == meta["eos_id"]] + [len(row)]
        logits += [model(row[None, start:end]).logits[0] for start, end in zip(starts, starts[1:])]
    return torch.cat(logits), targets.flatten()


def summed_loss(model: transformers.LlamaForCausalLM, block: torch.Tensor, meta: dict | None) -> torch.Tensor:
    """Cross-entropy summed over the block's targets (`logits_and_targets`)."""
    return F.cross_entropy(*logits_and_targets(model, block, meta), reduction="sum")


def target_count(block: torch.Tensor, meta: dict | None) -> int:
    return int((block_targets(block, meta) != -100).sum())


def reference_training(model: transformers.LlamaForCausalLM, data_dir: Path, t: TrainConfig,
                       document_masking: bool, make_optimizer: Callable | None = None) -> tuple[list[dict], float]:
    """Train `model` in place by the recipe in `t`, with the optimizer `make_optimizer(model, t)` gives (the
    recipe's AdamW by default); returns each step's figures (as metrics.jsonl names them) and the evaluation after
    the last step."""
    meta = json.loads((data_dir / "meta.json").read_text()) if document_masking else None
    blocks = blocks_of(data_dir, "train", t.seq_len)
    make_optimizer = make_optimizer or (lambda model, t: reference_adamw(model, t.lr, t.weight_decay, t.betas, t.eps))
    optimizer = make_optimizer(model, t)
    draw = training_batches(blocks, t.micro_batch_size, t.seed)
    figures = []
    for step in range(1, t.max_steps + 1):
        micro_batches = [next(draw) for _ in range(t.grad_accum_steps)]
        targets = sum(target_count(b, meta) for b in micro_batches)
        loss = 0.0
        for block in micro_batches:
            part = summed_loss(model, block, meta) / targets
            part.backward()
            loss += part.item()
        lr = reference_lr(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps)
        grad_norm = reference_update(model, optimizer, lr, t.grad_clip)
        figures.append({"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr})
    with torch.no_grad():
        val = torch.from_numpy(blocks_of(data_dir, "val", t.seq_len))
        first = val[:min(t.eval_batches, len(val) // t.micro_batch_size) * t.micro_batch_size]  # whole batches
        eval_loss = sum(summed_loss(model.eval(), b, meta).item()
                        for b in first.split(t.micro_batch_size)) / target_count(first, meta)
    return figures, eval_loss


def check_run_follows_reference(tmp_path: Path, *overrides: str, device: str = "cpu", tied: bool = False,
                                from_scratch: bool = False) -> list[dict]:
    """Run ttl's training from a transformers-made GQA model (its LM head `tied` to the embedding or not) or, `from
    scratch`, from the weights it draws from `train.seed` (as `transformers.LlamaForCausalLM(config)` draws them
    after `torch.manual_seed(seed)`), then `reference_training` from the same weights in float32 and in float64.
    The lrs must be the loop's; the losses, gradient norms, evaluation and weights within 1e-5 of the float64
    loop's, or no further from them than twice the float32 loop's are (`as_close_as_transformers`). Returns the
    float32 loop's step figures."""
    data_dir = prepared_corpus(tmp_path)
    run = run_config(*overrides)
    t = run.train
    if from_scratch:
        torch.manual_seed(t.seed)
        config = transformers.LlamaConfig(**run.model_config().to_hf_dict())
        reference = transformers.LlamaForCausalLM(config).train()
    else:
        reference = hf_causal_lm(seed=1, vocab_size=400, intermediate_size=128, max_position_embeddings=64,
                                 num_key_value_heads=2, tie_word_embeddings=tied).float().train()
        reference.save_pretrained(tmp_path / "init")
    truth = copy.deepcopy(reference).double()
    train(run, tmp_path / "run", data_dir=str(data_dir), device=device,
          init_from=None if from_scratch else str(tmp_path / "init"))
    expected, eval_loss = reference_training(reference, data_dir, t, run.data.document_masking)
    exact, exact_eval_loss = reference_training(truth, data_dir, t, run.data.document_masking)

    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, t.max_steps + 1))
    assert_figures_as_close_as_transformers(logged, expected, exact)
    [logged_eval] = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert as_close_as_transformers(abs(logged_eval - exact_eval_loss), abs(eval_loss - exact_eval_loss),
                                    1e-5 * exact_eval_loss)
    last = tmp_path / "run" / "checkpoints" / f"step-{t.max_steps:06d}"
    trained = transformers.LlamaForCausalLM.from_pretrained(last)
    assert_trained_as_closely_as_transformers(trained.state_dict(), reference.state_dict(), truth.state_dict())
    return expected


@pytest.mark.parametrize("start", ["untied", "tied", "from scratch"])
def test_a_run_is_the_documented_recipe_written_out_with_transformers(tmp_path, start):
    """Gradient accumulation, an epoch boundary, clipping both on and off, weight decay with the norms exempt,
    the warmup and cosine to a floor; a tied head trains as one tensor with the embedding; and a run from scratch
    is transformers' from the same seed."""
    expected = check_run_follows_reference(tmp_path, *RECIPE, tied=start == "tied",
                                           from_scratch=start == "from scratch")
    assert min(e["grad_norm"] for e in expected) < 2.0 < max(e["grad_norm"] for e in expected)
    batches_per_epoch = len(blocks_of(tmp_path / "prepared", "train", 32)) // 10
    assert batches_per_epoch < 12 * 2  # the run takes more micro-batches than an epoch holds


@pytest.mark.gpu
def test_a_cuda_run_is_the_documented_recipe_written_out_with_transformers(tmp_path, monkeypatch):
    """The same recipe on the GPU in float32: the Triton kernels (their dots in full float32, not TF32), Triton
    attention and fused AdamW, against the loop on the CPU."""
    decisions = record_kernel_decisions(monkeypatch)
    monkeypatch.setenv("TTL_ATTENTION", "triton")
    check_run_follows_reference(tmp_path, *RECIPE, device="cuda")
    assert decisions == {module.__name__: {True} for module in KERNEL_MODULES}


def documents_share_rows(data_dir: Path, t: TrainConfig, steps: int) -> bool:
    """Whether a row of the first `steps` optimizer steps' batches holds the start of a second document."""
    meta = json.loads((data_dir / "meta.json").read_text())
    draw = training_batches(blocks_of(data_dir, "train", t.seq_len), t.micro_batch_size, t.seed)
    return any((next(draw)[:, :-2] == meta["eos_id"]).any() for _ in range(steps * t.grad_accum_steps))


def test_a_document_masked_run_is_each_document_run_alone_with_transformers(tmp_path):
    """With data.document_masking, every document of a packed row is its own sequence, as transformers runs it
    alone: attention within it, positions from 0, and the next document's <s> no target."""
    overrides = ["train.max_steps=6", "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.warmup_steps=2",
                 "train.eval_every=6", "train.save_every=6", "data.document_masking=true", "train.seed=5"]
    check_run_follows_reference(tmp_path, *overrides)
    assert documents_share_rows(tmp_path / "prepared", run_config(*overrides).train, 6)


@pytest.mark.parametrize("document_masking", [False, True], ids=["causal", "documents"])
def test_a_run_on_the_triton_kernels_is_the_recipe_written_out_with_transformers(tmp_path, monkeypatch,
                                                                                 document_masking):
    """The same on every Triton kernel (in the interpreter) and Triton attention (over packed documents through
    cu_seqlens, with document masking): RMSNorm with the fused residual, rotary on the fused projection, SwiGLU
    and the fused linear cross-entropy, in training and in evaluation."""
    decisions = record_kernel_decisions(monkeypatch)
    monkeypatch.setenv("TTL_KERNELS", "triton")
    monkeypatch.setenv("TTL_ATTENTION", "triton")
    overrides = ["train.max_steps=2", "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.warmup_steps=1",
                 "train.eval_every=2", "train.eval_batches=1", "train.save_every=2", "train.seed=5",
                 f"data.document_masking={str(document_masking).lower()}"]
    check_run_follows_reference(tmp_path, *overrides)
    assert decisions == {module.__name__: {True} for module in KERNEL_MODULES}  # Triton, each time
    assert not document_masking or documents_share_rows(tmp_path / "prepared", run_config(*overrides).train, 2)
