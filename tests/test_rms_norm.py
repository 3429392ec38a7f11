"""The Triton RMSNorm (interpreted on CPU, compiled on CUDA) against a float64 truth, forward and backward."""

import pytest
import torch
from helpers import REL_TOL, rel_err

import ttl_kernels
from ttl_kernels.rms_norm import rms_norm_reference


def truth(x, weight, eps, residual=None, grads=None):
    """Float64 RMSNorm of the same inputs (no intermediate rounding) and its input gradients for the given
    output gradients: returns (outputs, {name: grad})."""
    leaves = {"x": x, "weight": weight} | ({} if residual is None else {"residual": residual})
    leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    h = leaves["x"] if residual is None else leaves["x"] + leaves["residual"]
    y = leaves["weight"] * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    outs = (y,) if residual is None else (y, h)
    used = [(o, g.double()) for o, g in zip(outs, grads) if g is not None]
    got = torch.autograd.grad([o for o, _ in used], list(leaves.values()), [g for _, g in used], allow_unused=True)
    return outs, dict(zip(leaves, got))


def run(x, weight, eps, residual=None, grads=None, backend="triton"):
    """Our rms_norm's outputs and the gradients of sum(output * grad) over outputs whose grad is given."""
    leaves = {"x": x, "weight": weight} | ({} if residual is None else {"residual": residual})
    outs = ttl_kernels.rms_norm(x, weight, eps, residual=residual, backend=backend)
    outs = (outs,) if residual is None else outs
    used = [(o, g) for o, g in zip(outs, grads) if g is not None]
    got = torch.autograd.grad([o for o, _ in used], list(leaves.values()), [g for _, g in used], allow_unused=True)
    return outs, dict(zip(leaves, got))


def inputs(rows, hidden, dtype, residual, seed=0, weight_dtype=None, residual_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(weight_dtype or dtype).requires_grad_()
    r = torch.randn(rows, hidden, generator=gen).to(residual_dtype or dtype).requires_grad_() if residual else None
    return x, w, r


def check(outs, grads, ref_outs, ref_grads, tol):
    for got, want in zip(outs, ref_outs):
        assert rel_err(got, want) <= tol
    for name, want in ref_grads.items():
        assert rel_err(grads[name], want) <= tol, name


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hidden", [1, 3, 768, 4097])
def test_forward_and_backward_match_float64(hidden, dtype, residual):
    rows = 9 if hidden > 1024 else 37  # with 768: several backward programs, the last tile partly masked
    # hidden 1 makes the gradient x's deviation from sign(x), eps / (x^2 + eps): a large eps keeps that
    # well-conditioned (with 1e-5 no fp32 implementation, PyTorch's included, gets 1e-5 relative error)
    eps = 1.0 if hidden == 1 else 1e-5
    x, w, r = inputs(rows, hidden, dtype, residual)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(rows, hidden, generator=gen).to(dtype) for _ in range(2 if residual else 1)]
    outs, got = run(x, w, eps, r, grads)
    ref_outs = ttl_kernels.rms_norm_reference(x, w, eps, r)
    for o, ref in zip(outs, ref_outs if residual else (ref_outs,)):
        assert o.dtype == ref.dtype and o.shape == ref.shape
    check(outs, got, *truth(x, w, eps, r, grads), REL_TOL[str(dtype).split(".")[1]])


def test_fp16_and_mixed_dtypes_promote_like_the_reference():
    # bf16 activations with an fp32 weight (mixed-precision training) give an fp32 output; an fp32 residual
    # stream under bf16 sublayer outputs gives an fp32 sum
    for dtype, w_dtype, r_dtype in [(torch.float16, None, None), (torch.bfloat16, torch.float32, torch.float32)]:
        x, w, r = inputs(19, 300, dtype, True, seed=3, weight_dtype=w_dtype, residual_dtype=r_dtype)
        ref_y, ref_h = rms_norm_reference(x, w, 1e-5, r)
        gen = torch.Generator().manual_seed(4)
        grads = [torch.randn(19, 300, generator=gen).to(ref_y.dtype),
                 torch.randn(19, 300, generator=gen).to(ref_h.dtype)]
        outs, got = run(x, w, 1e-5, r, grads)
        assert [o.dtype for o in outs] == [ref_y.dtype, ref_h.dtype]
        assert got["x"].dtype == x.dtype and got["weight"].dtype == w.dtype and got["residual"].dtype == r.dtype
        check(outs, got, *truth(x, w, 1e-5, r, grads), 1e-2)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_out_dtype_rounds_once_as_a_following_cast_would(with_residual, backend):
    # the model under bf16 autocast: bf16 sublayer outputs, an fp32 residual stream and weight; the normed
    # output is consumed in bf16, so emitting bf16 must equal rounding the fp32 output afterwards, and every
    # gradient must be unchanged (x's in bf16, the residual's in fp32)
    x, w, r = inputs(23, 300, torch.bfloat16, with_residual, seed=8, weight_dtype=torch.float32,
                     residual_dtype=torch.float32)
    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(23, 300, generator=gen).to(torch.bfloat16), torch.randn(23, 300, generator=gen)]
    leaves = [t for t in (x, w, r) if t is not None]

    def outputs_and_grads(out_dtype):
        outs = ttl_kernels.rms_norm(x, w, 1e-5, residual=r, out_dtype=out_dtype, backend=backend)
        outs = (outs,) if r is None else outs
        assert outs[0].dtype == (out_dtype or torch.float32)  # emitted in out_dtype, not cast afterwards
        y = outs[0].to(torch.bfloat16)  # what autocast's cast before a matmul does to an fp32 output
        rest = [(outs[1], grads[1])] if r is not None else []
        used = [(y, grads[0])] + rest
        return (y, *outs[1:]), torch.autograd.grad([o for o, _ in used], leaves, [g for _, g in used])

    (y, *rest), got = outputs_and_grads(torch.bfloat16)
    (want_y, *want_rest), want = outputs_and_grads(None)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want_y)
    assert all(torch.equal(a, b) for a, b in zip(rest, want_rest))
    for g, ref, leaf in zip(got, want, leaves):
        assert g.dtype == leaf.dtype and torch.equal(g, ref)
    if r is not None:  # one float32 gradient, rounded once for x
        assert torch.equal(got[0], got[2].to(torch.bfloat16))


@pytest.mark.parametrize("used", ["normed", "residual_only"])
def test_gradient_through_one_output(used):
    # the model's final norm discards the new residual; a gradient may also reach only the residual
    x, w, r = inputs(21, 96, torch.float32, True, seed=5)
    g = torch.randn(21, 96, generator=torch.Generator().manual_seed(6))
    grads = [g, None] if used == "normed" else [None, g]
    outs, got = run(x, w, 1e-5, r, grads)
    ref_outs, ref_grads = truth(x, w, 1e-5, r, grads)
    if used == "residual_only":  # y got no gradient: none for the weight, and x's is g itself
        assert ref_grads.pop("weight") is None and got["weight"] is None
    check(outs, got, ref_outs, ref_grads, 1e-5)


def test_weight_gradient_of_a_constant_input():
    # norm weights trained over activations that need no gradient: the weight's gradient is made because the
    # weight requires grad, whatever the input does
    x, w, _ = inputs(21, 96, torch.float32, False, seed=24)
    x.requires_grad_(False)
    g = torch.randn(21, 96, generator=torch.Generator().manual_seed(25))
    (got,) = torch.autograd.grad(ttl_kernels.rms_norm(x, w, 1e-5, backend="triton"), w, g, allow_unused=True)
    _, want = truth(x, w, 1e-5, None, [g])
    assert got is not None and rel_err(got, want["weight"]) <= 1e-5


def test_strided_inputs_and_gradients():
    gen = torch.Generator().manual_seed(7)
    # x: a slice of a wider projection (row stride > hidden); residual: (seq, batch, hidden) seen as
    # (batch, seq, hidden), which cannot be flattened without a copy; weight: every other element
    x = torch.randn(3, 5, 200, generator=gen)[..., :130].requires_grad_()
    r = torch.randn(5, 3, 130, generator=gen).transpose(0, 1).requires_grad_()
    w = torch.randn(260, generator=gen)[::2].requires_grad_()
    y, h = ttl_kernels.rms_norm(x, w, 1e-5, residual=r, backend="triton")
    # output gradients arrive transposed, i.e. not row-contiguous
    gy = torch.randn(5, 3, 130, generator=gen).transpose(0, 1)
    gh = torch.randn(5, 3, 130, generator=gen).transpose(0, 1)
    got = dict(zip(["x", "weight", "residual"], torch.autograd.grad((y, h), (x, w, r), (gy, gh))))
    check((y, h), got, *truth(x, w, 1e-5, r, [gy, gh]), 1e-5)


def test_output_gradient_with_another_row_stride_than_the_input():
    # a slice of a wider gradient stays a view with its own row stride (unlike the transposed ones above, which
    # are copied), beside a contiguous saved input: each must be read by its own stride
    x, w, _ = inputs(11, 96, torch.float32, False, seed=30)
    g = torch.randn(11, 160, generator=torch.Generator().manual_seed(31))[:, :96]
    outs, got = run(x, w, 1e-5, grads=[g])
    check(outs, got, *truth(x, w, 1e-5, None, [g]), 1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape", [(5, 0), (0,), (0, 0)], ids=["hidden0", "empty-1d", "no-rows-hidden0"])
def test_a_hidden_size_of_zero_gives_empty_results(shape, backend):
    # the reference (and F.rms_norm) give empty outputs and gradients; the Triton path raised deep in a reshape
    # ("cannot reshape tensor of 0 elements into shape [-1, 0]"), then divided by its block width 0
    x, w, r = inputs(1, 0, torch.float32, True)
    x, r = (t.detach().reshape(shape).requires_grad_() for t in (x, r))
    y, h = ttl_kernels.rms_norm(x, w, residual=r, backend=backend)
    grads = torch.autograd.grad((y, h), (x, w, r), (torch.ones_like(y), torch.ones_like(h)))
    assert y.shape == h.shape == x.shape and [g.shape for g in grads] == [x.shape, w.shape, r.shape]


def test_rejects_mismatched_shapes():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        ttl_kernels.rms_norm(x, torch.ones(7), backend="triton")
    with pytest.raises(ValueError, match="residual shape"):
        ttl_kernels.rms_norm(x, torch.ones(8), residual=torch.randn(4, 1), backend="triton")
    with pytest.raises(ValueError, match="hidden sizes up to"):
        ttl_kernels.rms_norm(torch.randn(1, 65537), torch.ones(65537), backend="triton")
    for backend in ("triton", "torch"):  # a scalar has no dimension to normalize over
        with pytest.raises(ValueError, match="0-dim"):
            ttl_kernels.rms_norm(torch.tensor(1.5), torch.ones(1), backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("hidden", [768, 2048, 4097, 8192, 16384])
def test_cuda_compiled_matches_float64_and_is_deterministic(hidden, dtype):
    rows = 4096
    x, w, r = (t.detach().cuda().requires_grad_() for t in inputs(rows, hidden, dtype, True, seed=8))
    gen = torch.Generator(device="cuda").manual_seed(9)
    grads = [torch.randn(rows, hidden, generator=gen, device="cuda").to(dtype) for _ in range(2)]
    outs, got = run(x, w, 1e-5, r, grads, backend="auto")
    assert "RMSNormFunction" in type(outs[0].grad_fn).__name__  # "auto" takes Triton on CUDA
    ref_outs, ref_grads = truth(x, w, 1e-5, r, grads)
    tol = REL_TOL[str(dtype).split(".")[1]]
    check(outs, got, ref_outs, ref_grads, tol)
    # flash-attn's criterion too: no worse than twice PyTorch's own error in this dtype
    torch_outs, torch_got = run(x, w, 1e-5, r, grads, backend="torch")
    for name in ref_grads:
        assert rel_err(got[name], ref_grads[name]) <= 2 * rel_err(torch_got[name], ref_grads[name]) + 1e-6, name
    _, again = run(x, w, 1e-5, r, grads)
    assert torch.equal(again["weight"], got["weight"])  # the weight gradient is reduced without atomics


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                              (torch.float64, torch.float64)],
                         ids=["fp32", "bf16", "bf16-fp32w", "fp16", "fp64"])
def test_reference_rounds_exactly_like_transformers(x_dtype, w_dtype):
    # the reference is the torch path of every model and the rounding the kernel copies: it must be
    # transformers' LlamaRMSNorm bit for bit (normed value cast to the input dtype before the weight multiply; float32
    # statistics for float64 inputs too, which a float64 model's scores against transformers' rely on:
    # test_choices.py's float64 test)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w, _ = inputs(13, 200, x_dtype, False, seed=10, weight_dtype=w_dtype)
    hf = LlamaRMSNorm(200, eps=1e-5).to(w_dtype)
    with torch.no_grad():
        hf.weight.copy_(w)
        want = hf(x)
        got = rms_norm_reference(x, w, 1e-5)
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=["bf16w", "fp32w"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_bf16_kernel_output_rounds_like_the_reference(with_residual, w_dtype):
    # the float64 truth cannot see the rounding of the normed value to bf16 before the weight multiply
    # (skipping it is *more* accurate); the kernel must round like the reference / transformers. Only a
    # rare one-ulp flip from a different fp32 reduction order (or the GPU's rsqrt) may differ.
    x, w, r = inputs(37, 300, torch.bfloat16, with_residual, seed=11, weight_dtype=w_dtype)
    with torch.no_grad():
        got = ttl_kernels.rms_norm(x, w, 1e-5, residual=r, backend="triton")
        want = rms_norm_reference(x, w, 1e-5, r)
    got, want = (got[0], want[0]) if with_residual else (got, want)
    assert got.dtype == want.dtype
    assert (got != want).float().mean() <= 0.01


def test_bf16_weight_gradient_is_summed_in_float32_and_rounded_once():
    # dW sums over rows in per-program fp32 partial rows: with a bf16 weight it must equal the gradient of
    # an fp32 copy of that weight rounded once to bf16 (partial rows rounded to bf16 would differ), and
    # be within bf16 tolerance of the float64 truth. 1000 rows of hidden 64: 16 programs, the last partial.
    x, w, _ = inputs(1000, 64, torch.bfloat16, False, seed=12)
    dy = torch.randn(1000, 64, generator=torch.Generator().manual_seed(13)).to(torch.bfloat16)
    (dw,) = torch.autograd.grad(ttl_kernels.rms_norm(x, w, 1e-5, backend="triton"), w, dy)
    w32 = w.detach().float().requires_grad_()
    (dw32,) = torch.autograd.grad(ttl_kernels.rms_norm(x, w32, 1e-5, backend="triton"), w32, dy.float())
    assert dw.dtype == torch.bfloat16 and torch.equal(dw, dw32.to(torch.bfloat16))
    _, ref = truth(x, w, 1e-5, None, [dy])
    assert rel_err(dw, ref["weight"]) <= 1e-2


@pytest.mark.parametrize("used", ["both", "residual_only"])
def test_gradients_accumulated_into_leaves_are_neither_shared_nor_the_callers(used):
    """Two backward calls into leaf x and residual, as in gradient accumulation. x.grad and residual.grad once
    were two views of one buffer, so the second call added into it twice; with only the new residual used,
    both were views of the caller's output gradient, which the second call then added into."""
    x, w, r = inputs(6, 32, torch.float32, True, seed=14)
    gen = torch.Generator().manual_seed(15)
    grads = [torch.randn(6, 32, generator=gen) if used == "both" else None, torch.randn(6, 32, generator=gen)]
    kept = [None if g is None else g.clone() for g in grads]
    for _ in range(2):
        y, h = ttl_kernels.rms_norm(x, w, 1e-5, residual=r, backend="triton")
        pairs = [(o, g) for o, g in zip((y, h), grads) if g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    _, want = truth(x, w, 1e-5, r, grads)
    assert all(g is None or torch.equal(g, k) for g, k in zip(grads, kept))
    assert x.grad.data_ptr() != r.grad.data_ptr()
    assert rel_err(x.grad, 2 * want["x"]) <= 1e-5 and rel_err(r.grad, 2 * want["residual"]) <= 1e-5


def test_double_backward_fails_loudly():
    x, w, r = inputs(4, 16, torch.float32, True, seed=16)
    s = torch.tensor(2.0, requires_grad=True)  # the gradient then requires grad: it must not silently lack terms
    y, h = ttl_kernels.rms_norm(x, w, 1e-5, residual=r, backend="triton")
    (g,) = torch.autograd.grad((y.pow(2).sum() + h.sum()) * s, x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.pow(2).sum().backward()


def test_a_gradient_penalty_fails_loudly_rather_than_adding_nothing():
    # from a constant seed (a plain loss) torch's once_differentiable gave x's gradient no graph, so a penalty
    # on it added no gradient to the backward, without a word
    x, w, _ = inputs(4, 16, torch.float32, True, seed=16)
    loss = ttl_kernels.rms_norm(x, w, 1e-5, backend="triton").sum()
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (loss + g.pow(2).sum()).backward()


def test_fp32_residual_stream_gets_a_float32_accurate_gradient():
    # bf16 x beside an fp32 residual stream: the residual's gradient is the same fp32 gradient as x's, written
    # in fp32 (not x's bf16 rounding of it, cast back up), so it must be fp32-close to the float64 truth
    x, w, r = inputs(17, 96, torch.bfloat16, True, seed=17, weight_dtype=torch.float32, residual_dtype=torch.float32)
    gen = torch.Generator().manual_seed(18)
    grads = [torch.randn(17, 96, generator=gen) for _ in range(2)]
    for used in ([grads[0], grads[1]], [grads[0], None]):
        outs, got = run(x, w, 1e-5, r, used)
        _, want = truth(x, w, 1e-5, r, used)
        assert got["residual"].dtype == torch.float32 and rel_err(got["residual"], want["residual"]) <= 1e-5
        assert got["x"].dtype == torch.bfloat16 and rel_err(got["x"], want["x"]) <= 1e-2


@pytest.mark.parametrize("scale, eps", [(1e14, 1e-6), (1e16, 1e-6), (1e-18, 0.0)], ids=["1e14", "1e16", "1e-18-eps0"])
def test_float32_gradient_accuracy_does_not_depend_on_the_rows_magnitude(scale, eps):
    # any rms whose square fits in float32: the backward's per-row factor rstd^3 / hidden once went subnormal
    # (rms above 1e11: 1e-5 off at 1e13, 6e-3 at 1e14, 5% at 1e16) or overflowed (rms below 1e-13 with eps 0:
    # inf, as the reference's autograd still gives)
    x, w, _ = inputs(5, 256, torch.float32, False, seed=22)
    x = (scale * x).detach().requires_grad_()
    grads = [torch.randn(5, 256, generator=torch.Generator().manual_seed(23))]
    check(*run(x, w, eps, None, grads), *truth(x, w, eps, None, grads), 1e-5)


def test_largest_hidden_size_is_accepted():
    # MAX_HIDDEN itself (65536) is supported; one more is refused (test_rejects_mismatched_shapes)
    x, w, r = inputs(2, 65536, torch.float32, True, seed=19)
    grads = [torch.randn(2, 65536, generator=torch.Generator().manual_seed(20)), None]
    check(*run(x, w, 1e-5, r, grads), *truth(x, w, 1e-5, r, grads), 1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_default_eps_is_transformers_default(backend):
    # LlamaRMSNorm's default eps is 1e-6; on inputs with a mean square near 1e-6 the default is visible
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w, _ = inputs(5, 64, torch.float32, False, seed=21)
    x = (1e-3 * x).detach()
    hf = LlamaRMSNorm(64)
    with torch.no_grad():
        hf.weight.copy_(w)
        assert rel_err(ttl_kernels.rms_norm(x, w, backend=backend), hf(x)) <= 1e-5
        assert rel_err(rms_norm_reference(x, w), hf(x)) <= 1e-5


def test_backward_with_no_output_gradient_gives_none():
    """Autograd may call the backward with neither output's gradient defined (gradcheck checks that it can): the
    inputs then get no gradient, rather than an AttributeError on None."""
    x, w, r = (torch.randn(3, 8, requires_grad=True), torch.randn(8, requires_grad=True),
               torch.randn(3, 8, requires_grad=True))
    assert torch.autograd.gradcheck(lambda *a: ttl_kernels.rms_norm(*a[:2], residual=a[2], backend="triton"),
                                    (x, w, r), eps=1e-3, atol=1e-2, rtol=1e-2)

