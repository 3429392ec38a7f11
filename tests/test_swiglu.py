"""The Triton SwiGLU (interpreted on CPU, compiled on CUDA) against a float64 truth."""

import pytest
import torch
from helpers import REL_TOL, rel_err

import ttl_kernels


def fused_halves(shape, dtype, seed=0, device="cpu"):
    """gate and up as the model makes them: the two halves of one (..., 2 * intermediate) projection."""
    gen = torch.Generator(device=device).manual_seed(seed)
    gate_up = (2 * torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, device=device)).to(dtype)
    gate_up.requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)
    return gate_up, gate, up


def check_against_truth(gate, up, tol, backend="triton"):
    """Forward and both input gradients of our swiglu against the reference formula in float64."""
    out = ttl_kernels.swiglu(gate, up, backend=backend)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (gate, up), grad)
    g64, u64 = (t.detach().double().requires_grad_() for t in (gate, up))
    ref_out = ttl_kernels.swiglu_reference(g64, u64)
    ref = torch.autograd.grad(ref_out, (g64, u64), grad.double())
    assert out.dtype == gate.dtype and out.shape == gate.shape
    for o, r in zip((out, *got), (ref_out, *ref)):
        assert rel_err(o, r) <= tol
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(5, 1), (2, 3, 3), (4, 768), (3, 4097)], ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_float64(shape, dtype):
    _, gate, up = fused_halves(shape, dtype)
    check_against_truth(gate, up, REL_TOL[str(dtype).split(".")[1]])


def test_separate_and_transposed_inputs():
    gen = torch.Generator().manual_seed(1)
    gate = torch.randn(6, 50, generator=gen).requires_grad_()
    up = torch.randn(50, 6, generator=gen).t().requires_grad_()  # last dim not contiguous: copied
    check_against_truth(gate, up, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(5, 1), (2, 3, 3), (3, 4097)], ids=lambda s: "x".join(map(str, s)))
def test_fused_projection_input_gives_one_gradient_equal_to_the_halves(shape, dtype):
    gate_up, gate, up = fused_halves(shape, dtype, seed=2)
    split_out = ttl_kernels.swiglu(gate, up, backend="triton")
    grad = torch.randn_like(split_out)
    (split_grad,) = torch.autograd.grad(split_out, gate_up, grad)
    packed_out = ttl_kernels.swiglu(gate_up, backend="triton")
    assert type(packed_out.grad_fn).__name__ == "SwiGLUFunctionBackward"  # no split node to concatenate
    (packed_grad,) = torch.autograd.grad(packed_out, gate_up, grad)
    assert torch.equal(packed_out, split_out) and torch.equal(packed_grad, split_grad)
    assert torch.equal(ttl_kernels.swiglu_reference(gate_up), ttl_kernels.swiglu_reference(gate, up))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_width_of_zero_gives_empty_results(backend):
    # the reference gives empty outputs and gradients; the Triton path raised deep in a reshape ("cannot reshape
    # tensor of 0 elements into shape [-1, 0]")
    gate_up = torch.randn(3, 0, requires_grad=True)
    out = ttl_kernels.swiglu(gate_up, backend=backend)
    (grad,) = torch.autograd.grad(out, gate_up, torch.ones_like(out))
    assert out.shape == (3, 0) and grad.shape == (3, 0)
    gate, up = torch.randn(3, 0, requires_grad=True), torch.randn(3, 0, requires_grad=True)
    out = ttl_kernels.swiglu(gate, up, backend=backend)
    assert [g.shape for g in torch.autograd.grad(out, (gate, up), torch.ones_like(out))] == [(3, 0), (3, 0)]


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="even last dim"):
        ttl_kernels.swiglu(torch.randn(3, 5), backend="triton")
    with pytest.raises(ValueError, match="even last dim"):  # a scalar is no gate/up pair
        ttl_kernels.swiglu(torch.tensor(1.5), backend="triton")
    with pytest.raises(ValueError, match="one shape"):
        ttl_kernels.swiglu(torch.randn(3, 4), torch.randn(3, 5), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(8, 2048, 3072), (4096, 14336), (4097, 4097)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_compiled_matches_float64(shape, dtype):
    torch.manual_seed(0)  # check_against_truth's output gradient
    _, gate, up = fused_halves(shape, dtype, device="cuda")
    out = check_against_truth(gate, up, REL_TOL[str(dtype).split(".")[1]], backend="auto")
    assert "SwiGLUFunction" in type(out.grad_fn).__name__  # "auto" takes Triton on CUDA


def test_separate_inputs_with_different_row_strides():
    # gate, up and the output gradient each with its own row stride: the kernels must index each by its own
    gen = torch.Generator().manual_seed(3)
    gate = torch.randn(7, 300, generator=gen).requires_grad_()                 # row stride 300
    up = torch.randn(7, 520, generator=gen)[:, 100:400].requires_grad_()       # row stride 520
    out = ttl_kernels.swiglu(gate, up, backend="triton")
    grad = torch.randn(7, 410, generator=gen)[:, :300]                         # row stride 410
    got = torch.autograd.grad(out, (gate, up), grad)
    g64, u64 = (t.detach().double().requires_grad_() for t in (gate, up))
    ref_out = ttl_kernels.swiglu_reference(g64, u64)
    ref = torch.autograd.grad(ref_out, (g64, u64), grad.double())
    for o, r in zip((out, *got), (ref_out, *ref)):
        assert rel_err(o, r) <= 1e-5


def test_double_backward_fails_loudly():
    gate_up, gate, up = fused_halves((3, 8), torch.float32, seed=4)
    s = torch.tensor(2.0, requires_grad=True)  # the gradient then requires grad: it must not silently lack terms
    for out in (ttl_kernels.swiglu(gate, up, backend="triton"), ttl_kernels.swiglu(gate_up, backend="triton")):
        (g,) = torch.autograd.grad(out.pow(2).sum() * s, gate_up, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            g.pow(2).sum().backward()


def test_a_gradient_penalty_fails_loudly_rather_than_adding_nothing():
    # from a constant seed (a plain loss) torch's once_differentiable gave the gradient no graph, so a penalty
    # on it added no gradient to the backward, without a word
    gate_up, gate, up = fused_halves((3, 8), torch.float32, seed=4)
    for out in (ttl_kernels.swiglu(gate, up, backend="triton"), ttl_kernels.swiglu(gate_up, backend="triton")):
        (g,) = torch.autograd.grad(out.sum(), gate_up, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            (out.sum() + g.pow(2).sum()).backward()


def test_mixed_dtypes_promote_like_the_reference():
    # a bf16 gate beside an fp32 up: the output is fp32, as the reference's silu(gate) * up is, computed in
    # fp32 from the gate's exact values; each input's gradient comes in its own dtype, du fp32-accurate
    gen = torch.Generator().manual_seed(5)
    gate = torch.randn(6, 40, generator=gen).to(torch.bfloat16).requires_grad_()
    up = torch.randn(6, 40, generator=gen).requires_grad_()
    out = ttl_kernels.swiglu(gate, up, backend="triton")
    assert out.dtype == ttl_kernels.swiglu_reference(gate, up).dtype == torch.float32
    grad = torch.randn(6, 40, generator=gen)
    dg, du = torch.autograd.grad(out, (gate, up), grad)
    g64, u64 = (t.detach().double().requires_grad_() for t in (gate, up))
    ref_out = ttl_kernels.swiglu_reference(g64, u64)
    ref_dg, ref_du = torch.autograd.grad(ref_out, (g64, u64), grad.double())
    assert dg.dtype == torch.bfloat16 and du.dtype == torch.float32
    assert rel_err(out, ref_out) <= 1e-5 and rel_err(du, ref_du) <= 1e-5 and rel_err(dg, ref_dg) <= 1e-2


def test_bf16_triton_output_is_the_float32_product_rounded_once():
    # the Triton path keeps silu(gate) in fp32 and rounds only the product (the reference, as transformers,
    # rounds silu(gate) to bf16 first: a quarter of its outputs differ by that second rounding). The float64
    # truth's 1e-2 tolerance cannot see a second rounding; only a rare one-ulp flip from the GPU's sigmoid may differ.
    gate_up, gate, up = fused_halves((37, 300), torch.bfloat16, seed=6)
    with torch.no_grad():
        got = ttl_kernels.swiglu(gate_up, backend="triton")
    want = (torch.nn.functional.silu(gate.float()) * up.float()).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and (got != want).float().mean() <= 0.01


def test_rejects_scalar_gate_and_up():
    """0-dim gate and up have no last dim to run along: refused by name on either backend, not an IndexError."""
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match="last dim"):
            ttl_kernels.swiglu(torch.tensor(1.5), torch.tensor(0.5), backend=backend)
