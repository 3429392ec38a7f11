"""z-loss (PaLM's z_loss * logsumexp(logits)**2 per target) as the kernels report it apart from the loss, as the
model returns it, and as the training loop optimizes and logs it (`train.z_loss`)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import head_loss_case
from hf_reference import hf_causal_lm
from train_helpers import losses, prepared_corpus, random_model, run_config

import ttl_core
import ttl_kernels
from ttl_core.distributed import World
from ttl_core.errors import ConfigError
from ttl_core.metrics import read_metrics
from ttl_core.run_config import load_run_config
from ttl_core.step import train_step
from ttl_core.train import train


def z_formula(logits: torch.Tensor, targets: torch.Tensor, z_loss: float) -> torch.Tensor:
    """Per-token z-loss written out in float64, 0 where the target is ignored."""
    lse = torch.logsumexp(logits.double(), dim=-1)
    return torch.where(targets != -100, z_loss * lse**2, torch.zeros_like(lse))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fused", [True, False])
def test_the_kernels_return_the_z_loss_part_apart_and_the_same_loss(backend, reduction, fused):
    hidden, weight, targets, call = head_loss_case(7, fused)
    loss, z_part = call(reduction=reduction, z_loss=1e-2, return_z_loss=True, backend=backend)
    per_token = z_formula(hidden.detach().double() @ weight.double().t(), targets, 1e-2)
    want = {"none": per_token, "sum": per_token.sum(), "mean": per_token.sum() / (targets != -100).sum()}[reduction]
    assert not z_part.requires_grad and (z_part.double() - want).abs().max() <= 1e-5 * want.abs().max()
    alone = call(reduction=reduction, z_loss=1e-2, backend=backend)
    assert torch.allclose(loss, alone, rtol=1e-6, atol=0)  # the loss itself does not change with what is returned
    loss.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_every_target_ignored_gives_a_zero_z_part():
    hidden, weight = torch.randn(9, 8), torch.randn(50, 8)
    targets = torch.full((9,), -100)
    loss, z_part = ttl_kernels.fused_linear_cross_entropy(hidden, weight, targets, z_loss=1e-3, return_z_loss=True,
                                                          backend="triton")
    assert float(loss) == 0.0 and float(z_part) == 0.0


def test_the_model_adds_the_z_loss_to_transformers_loss_and_returns_it(tmp_path):
    """ttl's loss with z_loss is transformers' cross-entropy plus z * mean(lse**2) of transformers' logits; so are the
    gradients of that objective; and without z_loss the output has no z_loss field (transformers' tuple)."""
    hf = hf_causal_lm(seed=2)
    hf.save_pretrained(tmp_path)
    ours = ttl_core.load_pretrained(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = hf(ids, labels=ids)
    z_ref = z_formula(ref.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), 1e-2).mean()
    (ref.loss + z_ref).backward()
    out = ours(ids, labels=ids, z_loss=1e-2)
    out.loss.backward()
    assert abs(float(out.z_loss) - float(z_ref.detach())) <= 1e-5 * float(z_ref.detach())
    assert abs(out.loss.item() - (ref.loss + z_ref).item()) <= 1e-5
    hf_grad, our_grad = hf.model.embed_tokens.weight.grad, ours.backbone.embed.weight.grad
    assert (hf_grad - our_grad).abs().max() <= 1e-5 * hf_grad.abs().max() * 10
    assert ours(ids, labels=ids).keys() == ["loss"] and len(ours(ids, labels=ids, return_dict=False)) == 1


def test_a_training_step_optimizes_the_z_loss_and_logs_the_cross_entropy_apart():
    run = run_config("train.z_loss=0.01", "train.grad_clip=0.0", "train.grad_accum_steps=2")
    model = random_model(run)
    gen = torch.Generator().manual_seed(3)
    micro = [{"input_ids": torch.randint(0, 400, (2, 16), generator=gen),
              "targets": torch.randint(0, 400, (2, 16), generator=gen)} for _ in range(2)]
    reference = copy.deepcopy(model)
    logits = [reference(mb["input_ids"]).logits.flatten(0, 1) for mb in micro]
    targets = torch.cat([mb["targets"].flatten() for mb in micro])
    ce = torch.nn.functional.cross_entropy(torch.cat(logits), targets)
    z = z_formula(torch.cat(logits), targets, 0.01).mean()
    (ce + z).backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, _, figures = train_step(model, optimizer, micro, run.train, World(0, 1, torch.device("cpu")), 1.0, None)
    assert abs(loss - float(ce)) <= 1e-5 and abs(figures["z_loss"] - float(z)) <= 1e-5 * float(z)
    for name, p in reference.named_parameters():
        assert (before[name] - model.get_parameter(name).detach() - p.grad).abs().max() <= 1e-5, name


def test_a_run_with_z_loss_logs_it_and_one_without_does_not(tmp_path):
    (tmp_path / "data").mkdir()
    data = prepared_corpus(tmp_path / "data")
    for z_loss in (0.0, 0.1):
        out = tmp_path / f"run-{z_loss}"
        train(run_config("train.max_steps=3", "train.eval_every=0", f"train.z_loss={z_loss}"), out,
              data_dir=str(data))
        records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        assert len(losses(out)) == 3 and all(("z_loss" in r) == (z_loss > 0) for r in records)
        assert all(r["z_loss"] > 0 for r in records if z_loss)


@pytest.mark.parametrize("value, message", [("-0.1", "train.z_loss must be >= 0"), ("nan", "train.z_loss must be >= 0"),
                                            ("inf", "train.z_loss must be finite")])
def test_a_bad_z_loss_is_named(value, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, [f"train.z_loss={value}"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cuda_kernel_z_loss_part(dtype, tolerance):
    """The compiled kernel's z-loss part on a 32000 vocabulary, against the float64 formula on the same inputs."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(300, 64, generator=gen).to("cuda", dtype).requires_grad_()
    weight = (torch.randn(32000, 64, generator=gen) * 0.2).to("cuda", dtype)
    targets = torch.randint(0, 32000, (300,), generator=gen).cuda()
    targets[::3] = -100
    loss, z_part = ttl_kernels.fused_linear_cross_entropy(hidden, weight, targets, z_loss=1e-3, return_z_loss=True)
    want = z_formula(hidden.detach().double() @ weight.double().t(), targets, 1e-3).sum() / (targets != -100).sum()
    assert abs(float(z_part) - float(want)) <= tolerance * float(want)
    loss.backward()
    assert torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_an_ignored_row_adds_no_loss_whatever_its_logits(backend):
    # F.cross_entropy gives an ignored row a loss of 0 even for NaN logits; the reference's z-loss term,
    # z * lse**2 times 0, made it NaN (and the mean over the batch with it)
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    logits[1, 4] = float("nan")
    targets = torch.tensor([2, -100, 6])
    losses = ttl_kernels.cross_entropy(logits, targets, reduction="none", z_loss=1e-2, backend=backend)
    assert losses[1] == 0 and losses.isfinite().all()
    assert torch.equal(losses[[0, 2]], ttl_kernels.cross_entropy(logits[[0, 2]], targets[[0, 2]], reduction="none",
                                                                 z_loss=1e-2, backend=backend))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_z_loss_reports_a_zero_part_beside_a_non_finite_loss(backend):
    # without z-loss its part is 0 whatever the logits; the kernel's 0 * lse**2 was NaN for a row of lse inf
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    logits[1, 4] = float("inf")
    loss, z_part = ttl_kernels.cross_entropy(logits, torch.tensor([2, 3, 6]), reduction="none", return_z_loss=True,
                                             backend=backend)
    assert loss[1].isnan() and torch.equal(z_part, torch.zeros(3))
