"""The Triton fused linear cross-entropy (interpreted on CPU) against float64 truths: loss, hidden and weight
gradients chunk by chunk, the float32 weight-gradient accumulation, a second backward, and autocast."""

import importlib

import pytest
import torch
from cross_entropy_helpers import FLCE_TOL, OPTION_IDS, OPTIONS, formula, reduce, targets_for
from helpers import rel_err

import ttl_kernels
from ttl_kernels.cross_entropy import chunk_rows


def flce_check(n, d, vocab, dtype, reduction, options, hidden_view=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if hidden_view:  # every other column of a wider tensor: not contiguous
        hidden = torch.randn(n, 2 * d, generator=gen)[:, ::2].to(dtype).requires_grad_()
    else:
        hidden = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=gen) / d**0.5 * 2).to(dtype).requires_grad_()
    t = targets_for(n, vocab, seed=seed)
    out = ttl_kernels.fused_linear_cross_entropy(hidden, weight, t, reduction=reduction, backend="triton", **options)
    grad_out = torch.randn(out.shape, generator=gen) if reduction == "none" else torch.tensor(0.7)
    grads = torch.autograd.grad(out, (hidden, weight), grad_out)
    h64, w64 = (x.detach().double().requires_grad_() for x in (hidden, weight))
    truth = reduce(formula(h64 @ w64.T, t, **options), t, reduction)
    truth_grads = torch.autograd.grad(truth, (h64, w64), grad_out.double())
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    for got, want in zip((out, *grads), (truth, *truth_grads)):
        assert rel_err(got, want) <= FLCE_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS[::3], ids=OPTION_IDS[::3])
def test_fused_linear_cross_entropy_matches_float64(dtype, reduction, options):
    # 70 rows in chunks of 64 leave a 6-row tail: a chunk boundary that splits the rows unevenly
    assert 70 % chunk_rows(70) != 0
    flce_check(70, 16, 1003, dtype, reduction, options)


def test_fused_linear_cross_entropy_32000_vocab_and_strided_hidden():
    flce_check(9, 24, 32000, torch.float32, "mean", dict(z_loss=1e-4), hidden_view=True, seed=4)


def test_a_second_backward_through_the_fused_loss_fails_loudly_rather_than_scaling_twice():
    """The backward scales the gradients computed in the forward in place (no second weight-sized buffer):
    the first backward is right, and a retained graph's second backward raises, naming the function (autograd's
    version check named only an internal tensor), instead of returning gradients scaled by grad_output twice."""
    hidden = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (10,))
    loss = ttl_kernels.fused_linear_cross_entropy(hidden, weight, t, backend="triton")
    first = torch.autograd.grad(loss * 3.0, (hidden, weight), retain_graph=True)
    truth = torch.autograd.grad(ttl_kernels.fused_linear_cross_entropy_reference(hidden, weight, t) * 3.0,
                                (hidden, weight))
    assert all(rel_err(got, want) <= 1e-5 for got, want in zip(first, truth))
    with pytest.raises(RuntimeError, match="fused_linear_cross_entropy .* once: .* a second backward"):
        torch.autograd.grad(loss * 3.0, (hidden, weight))


def test_bf16_weight_gradient_accumulates_over_chunks_in_float32():
    """512 rows make 8 chunks whose weight gradients are summed: in float32 the sum adds no error of its own,
    in bf16 every partial sum is rounded. The float64 tolerance (1e-2) cannot tell the two apart, so the
    criterion is test_model_parity's: the norm-wise error within 1.6x the PyTorch path's (one bf16 matmul;
    about 1.3x here over seeds, where a bf16 accumulator gives about 2x)."""
    n, d, vocab = 512, 32, 257
    assert n // chunk_rows(n) == 8
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(n, d, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, d, generator=gen) / d**0.5).to(torch.bfloat16).requires_grad_()
    t = targets_for(n, vocab, seed=5, ignored_every=7)
    loss = ttl_kernels.fused_linear_cross_entropy(hidden, weight, t, reduction="sum", backend="triton")
    (ours,) = torch.autograd.grad(loss, weight)
    ref_loss = ttl_kernels.fused_linear_cross_entropy_reference(hidden, weight, t, reduction="sum")
    (ref,) = torch.autograd.grad(ref_loss, weight)
    h64, w64 = (x.detach().double().requires_grad_() for x in (hidden, weight))
    (truth,) = torch.autograd.grad(reduce(formula(h64 @ w64.T, t), t, "sum"), w64)

    def norm_err(got):
        return float((got.double() - truth).norm() / truth.norm())

    assert ours.dtype == torch.bfloat16 and rel_err(ours, truth) <= 1e-2
    assert norm_err(ours) <= 1.6 * norm_err(ref)


def test_unreduced_fused_loss_backward_under_cpu_autocast():
    """reduction="none" recomputes the logits in the backward, which autograd runs outside the forward's
    autocast region; it once multiplied the bf16 hidden states by the fp32 weight there and failed. It must
    reproduce the forward's bf16 logits: the gradients of "none" are those "sum" makes in its forward."""
    gen = torch.Generator().manual_seed(24)
    hidden = torch.randn(12, 16, generator=gen, requires_grad=True)
    weight = torch.randn(300, 16, generator=gen, requires_grad=True)
    t = targets_for(12, 300, seed=24)
    grads = {}
    for backend, reduction in [("triton", "none"), ("triton", "sum"), ("torch", "none")]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ttl_kernels.fused_linear_cross_entropy(hidden, weight, t, reduction=reduction, backend=backend)
        grads[backend, reduction] = torch.autograd.grad(loss.sum(), (hidden, weight))
    for got, same, ref in zip(grads["triton", "none"], grads["triton", "sum"], grads["torch", "none"]):
        assert got.dtype == torch.float32 and torch.equal(got, same) and rel_err(got, ref) <= 1e-2


def test_running_out_of_memory_keeps_the_float32_weight_gradient_path(monkeypatch):
    """On CUDA the weight gradient accumulates in float32 through addmm's out_dtype, and falls back for good to
    a product rounded to bf16 where torch refuses out_dtype (< 2.8). An out-of-memory error is a RuntimeError
    as well: it once turned the fallback on for the rest of the process (lower precision, and a V x d product
    and float32 copy allocated just when memory ran out). It must propagate and leave the path on."""
    module = importlib.import_module("ttl_kernels.cross_entropy")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(module, "_fp32_addmm", True)
    monkeypatch.setattr(torch, "addmm", out_of_memory)
    on_cuda = type("CudaAccumulator", (), {"is_cuda": True})()  # only its device is read before addmm
    grad_logits, hidden = torch.zeros(4, 3, dtype=torch.bfloat16), torch.zeros(4, 2, dtype=torch.bfloat16)
    with pytest.raises(torch.OutOfMemoryError):
        module._accumulate_weight_grad(on_cuda, grad_logits, hidden)
    assert module._fp32_addmm
