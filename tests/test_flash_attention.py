"""Our Triton FlashAttention (interpreted on CPU, compiled on CUDA) against explicit softmax in float64:
causal or not, GQA, packed documents of unequal odd lengths, any sequence length, forward and backward."""

import importlib

import pytest
import torch
from helpers import heads_far_apart

import ttl_kernels

fa_module = importlib.import_module("ttl_kernels.flash_attention")  # `ttl_kernels.flash_attention` is the function

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def err(got, truth):
    """Relative max error; an all-zero truth (e.g. dq of a one-token sequence) is held to an absolute 1e-6."""
    got, truth = got.detach().double(), truth.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    scale = truth.abs().max()
    if scale == 0:
        return 0.0 if got.abs().max() <= 1e-6 else float("inf")
    return float((got - truth).abs().max() / scale)


def check(q, k, v, causal, tol, cu_seqlens=None, max_seqlen=None, seed=0, grad=None, softmax_scale=None):
    """The Triton kernels' output and q/k/v gradients (for `grad`, random by default) against float64."""
    out = ttl_kernels.flash_attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                      softmax_scale=softmax_scale, backend="triton")
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    truth = ttl_kernels.flash_attention_reference(q64, k64, v64, causal, cu_seqlens, max_seqlen, softmax_scale)
    truth_grads = torch.autograd.grad(truth, (q64, k64, v64), grad.double())
    assert out.dtype == q.dtype and out.shape == q.shape
    for got, want in zip((out, *grads), (truth, *truth_grads)):
        assert err(got, want) <= tol


def qkv(shape_q, kv_heads, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    shape_kv = (*shape_q[:-2], kv_heads, shape_q[-1])
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_()
            for s in (shape_q, shape_kv, shape_kv)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seq, heads, kv_heads, dim", [(1, 2, 2, 64), (17, 4, 2, 64), (130, 2, 1, 64), (33, 2, 2, 128)],
                         ids=["seq1", "seq17-gqa", "seq130-mqa", "seq33-d128"])
def test_matches_float64(dtype, causal, seq, heads, kv_heads, dim):
    q, k, v = qkv((2, seq, heads, dim), kv_heads, dtype)
    check(q, k, v, causal, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_documents_never_attend_across(dtype, causal):
    lengths = [17, 5, 31]
    cu = torch.tensor([0, 17, 22, 53], dtype=torch.int32)
    q, k, v = qkv((sum(lengths), 4, 64), 2, dtype, seed=1)
    check(q, k, v, causal, TOL[dtype], cu_seqlens=cu, max_seqlen=max(lengths))
    # the reference is itself per document: the middle document alone gives the same rows
    out = ttl_kernels.flash_attention(q, k, v, causal=causal, cu_seqlens=cu, max_seqlen=31, backend="triton")
    alone = ttl_kernels.flash_attention(q[17:22][None], k[17:22][None], v[17:22][None], causal=causal, backend="triton")
    assert err(out[17:22], alone[0]) <= TOL[dtype]


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("candidate", range(4))
def test_every_autotuning_candidate_computes_the_same_attention(monkeypatch, dim, candidate):
    """The autotuner may pick any candidate block shape on the GPU: each one, run here in the interpreter,
    must be right on packed documents that span several blocks and end mid-block, causal, with GQA."""
    for name, by_dim in fa_module.CONFIGS.items():
        options = by_dim[dim]
        chosen = options[candidate % len(options)]
        monkeypatch.setitem(by_dim, dim, [chosen] + [c for c in options if c != chosen])
    lengths = [150, 7, 261]
    cu = torch.tensor([0, 150, 157, 418], dtype=torch.int32)
    q, k, v = qkv((sum(lengths), 4, dim), 2, torch.float32, seed=candidate)
    check(q, k, v, True, TOL[torch.float32], cu_seqlens=cu, max_seqlen=max(lengths))


def test_strided_views_of_a_fused_projection():
    qkv_out = torch.randn(2, 19, (4 + 2 + 2) * 32, requires_grad=True)
    q, k, v = qkv_out.split([4 * 32, 2 * 32, 2 * 32], dim=-1)
    q, k, v = q.view(2, 19, 4, 32), k.view(2, 19, 2, 32), v.view(2, 19, 2, 32)
    out = ttl_kernels.flash_attention(q, k, v, backend="triton")
    truth = ttl_kernels.flash_attention_reference(q.double(), k.double(), v.double())
    assert err(out, truth) <= 1e-4


def test_keys_and_values_with_different_strides():
    # each of q, k, v (and so each gradient) is read and written by its own strides, where a fused projection gives
    # k and v one layout: keys with heads outside tokens (their gradient made alike) beside values sliced from a
    # wider tensor (their gradient made contiguous)
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(19, 4, 32, generator=gen).requires_grad_()
    k = torch.randn(2, 19, 32, generator=gen).transpose(0, 1).requires_grad_()
    v = torch.randn(19, 2, 64, generator=gen)[..., :32].requires_grad_()
    check(q, k, v, True, TOL[torch.float32], torch.tensor([0, 8, 19], dtype=torch.int32), 11)


def test_inputs_and_output_gradient_with_a_strided_last_dim():
    # (tokens, dim, heads) tensors transposed to (tokens, heads, dim): the kernels index the last dim as
    # contiguous, so q, k, v and the output gradient must be made contiguous first
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(26, 32, h, generator=gen).transpose(1, 2).requires_grad_() for h in (4, 2, 2))
    grad = torch.randn(26, 32, 4, generator=gen).transpose(1, 2)
    assert q.stride(-1) != 1 and k.stride(-1) != 1 and grad.stride(-1) != 1
    check(q, k, v, True, TOL[torch.float32], torch.tensor([0, 9, 26], dtype=torch.int32), 17, grad=grad)


def test_bad_shapes_are_clear():
    q, k, v = qkv((1, 8, 3, 64), 2, torch.float32)
    with pytest.raises(ValueError, match="not a multiple of key/value heads"):
        ttl_kernels.flash_attention(q, k, v, backend="triton")
    q, k, v = qkv((1, 8, 2, 64), 2, torch.float32)
    with pytest.raises(ValueError, match="do not fit together"):  # fewer key/value tokens than queries
        ttl_kernels.flash_attention(q, k[:, :6], v[:, :6], backend="triton")
    with pytest.raises(ValueError, match="do not fit together"):  # packed: the same, with no batch dim to differ
        ttl_kernels.flash_attention(q[0], k[0, :6], v[0, :6], cu_seqlens=torch.tensor([0, 8]), max_seqlen=8,
                                    backend="triton")
    with pytest.raises(ValueError, match="do not fit together"):  # keys of another head_dim than the queries
        ttl_kernels.flash_attention(q, k[..., :32], v[..., :32], backend="triton")
    with pytest.raises(ValueError, match="do not fit together"):  # values of another shape than the keys
        ttl_kernels.flash_attention(q, k, v[:, :, :1], backend="triton")
    q, k, v = qkv((1, 8, 2, 48), 2, torch.float32)
    with pytest.raises(ValueError, match="head_dim 48 is not supported"):
        ttl_kernels.flash_attention(q, k, v, backend="triton")
    q, k, v = qkv((10, 2, 64), 2, torch.float32)
    with pytest.raises(ValueError, match="needs an int max_seqlen"):
        ttl_kernels.flash_attention(q, k, v, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32), backend="triton")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_mixed_dtypes_and_missing_heads_are_clear_and_empty_sequences_work(backend):
    """q, k, v of different dtypes once reached the kernels' dots (an interpreter assertion, or bf16 queries
    silently attending over fp32 keys), zero key/value heads divided by zero, and sequences of length 0
    (as empty as a batch of 0, which worked) made the document offsets an arange of step 0."""
    q, k, v = qkv((1, 8, 2, 16), 1, torch.float32)
    for dtypes in ((torch.float32, torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32, torch.float32)):
        with pytest.raises(ValueError, match="needs q, k, v of one dtype"):
            ttl_kernels.flash_attention(*(t.to(d) for t, d in zip((q, k, v), dtypes)), backend=backend)
    with pytest.raises(ValueError, match="not a multiple of key/value heads 0"):
        ttl_kernels.flash_attention(q, k[:, :, :0], v[:, :, :0], backend=backend)
    q, k, v = qkv((2, 0, 4, 16), 2, torch.float32)
    out = ttl_kernels.flash_attention(q, k, v, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert out.shape == q.shape and [g.shape for g in grads] == [q.shape, k.shape, v.shape]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_batch_of_no_sequences_keeps_the_graph(backend):
    # a fully filtered batch: the reference (the CPU default) returned an output cut off from q, k and v, so
    # backward raised "element 0 of tensors does not require grad" where the Triton path gave empty gradients
    q, k, v = qkv((0, 8, 4, 16), 2, torch.float32)
    out = ttl_kernels.flash_attention(q, k, v, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert out.shape == q.shape and [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_no_tokens_launch_no_kernel(monkeypatch):
    """On a GPU the autotuner would otherwise time its candidates on empty grids and keep the winner of that
    noise for every later call of the same head size."""
    def launch(*args, **kwargs):
        raise AssertionError("a kernel was launched for no tokens")

    monkeypatch.setattr(fa_module, "_launch", launch)
    q, k, v = qkv((2, 0, 4, 16), 2, torch.float32)
    out = ttl_kernels.flash_attention(q, k, v, backend="triton")
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))


@pytest.mark.gpu
def test_autotuned_kernels_on_cuda(monkeypatch):
    """The autotuner's choice (tests otherwise run the first candidate, TTL_AUTOTUNE=0) on the goal's shape."""
    monkeypatch.setenv("TTL_AUTOTUNE", "1")
    q, k, v = qkv((2, 2048, 12, 64), 12, torch.bfloat16, device="cuda")
    check(q, k, v, True, TOL[torch.bfloat16])
    assert fa_module.autotuned_configs()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_compiled_kernel_on_cuda(dtype, causal):
    q, k, v = qkv((2, 1000, 8, 64), 2, dtype, device="cuda")
    check(q, k, v, causal, TOL[dtype])
    lengths = [300, 77, 623]
    cu = torch.tensor([0, 300, 377, 1000], dtype=torch.int32, device="cuda")
    q, k, v = qkv((1000, 8, 128), 4, dtype, seed=2, device="cuda")
    check(q, k, v, causal, TOL[dtype], cu_seqlens=cu, max_seqlen=max(lengths))


def test_row_strided_output_gradient():
    # an output gradient with a contiguous last dim but its own row strides (here a slice of a wider tensor,
    # as when the output is concatenated with another): the backward must index dO by dO's strides, not O's
    cu = torch.tensor([0, 40, 47, 90], dtype=torch.int32)
    q, k, v = qkv((90, 4, 32), 2, torch.float32, seed=3)
    grad = torch.randn(90, 5, 48, generator=torch.Generator().manual_seed(4))[:, 1:, 8:40]
    assert grad.stride(-1) == 1 and grad.stride()[:2] != torch.empty(90, 4, 32).stride()[:2]  # the output's
    check(q, k, v, True, TOL[torch.float32], cu, 43, grad=grad)


def test_documents_that_do_not_fit_max_seqlen_or_the_tokens_are_refused():
    """On the CPU cu_seqlens is checked: a max_seqlen below the longest document once left the rows past it
    unwritten (uninitialized memory returned as attention), and cu_seqlens not covering the tokens likewise."""
    q, k, v = qkv((30, 2, 32), 2, torch.float32, seed=5)
    for max_seqlen in (16, 19):  # 19: one token short leaves one row unwritten just the same
        with pytest.raises(ValueError, match=f"max_seqlen {max_seqlen} is less than the longest document in "
                                             "cu_seqlens \\(20"):
            ttl_kernels.flash_attention(q, k, v, cu_seqlens=torch.tensor([0, 10, 30]), max_seqlen=max_seqlen,
                                        backend="triton")
    for cu in ([0, 10, 20], [2, 10, 30], [0, 20, 10, 30]):
        with pytest.raises(ValueError, match="cu_seqlens must start at 0, never decrease and end at the 30 packed"):
            ttl_kernels.flash_attention(q, k, v, cu_seqlens=torch.tensor(cu), max_seqlen=30, backend="triton")
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D"):
        ttl_kernels.flash_attention(q, k, v, cu_seqlens=torch.tensor([[0, 30]]), max_seqlen=30, backend="triton")
    for cu in ([0.0, 12.5, 30.0], [False, True]):  # float offsets were truncated: documents 0..12 and 12..30
        with pytest.raises(ValueError, match="cu_seqlens must hold integer token offsets"):
            ttl_kernels.flash_attention(q, k, v, cu_seqlens=torch.tensor(cu), max_seqlen=30, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("max_seqlen", [None, 20.0], ids=["missing", "float"])
def test_packed_documents_need_a_whole_max_seqlen_on_both_paths(max_seqlen, backend):
    # the reference (the CPU default) ignored max_seqlen, so code written on the CPU without it, or with a float,
    # failed on the Triton path: a ValueError without it, and for 20.0 a TypeError deep in the launch grid
    q, k, v = qkv((30, 2, 32), 2, torch.float32, seed=5)
    with pytest.raises(ValueError, match=f"packed attention needs an int max_seqlen .*, got {max_seqlen}"):
        ttl_kernels.flash_attention(q, k, v, cu_seqlens=torch.tensor([0, 10, 30]), max_seqlen=max_seqlen,
                                    backend=backend)


def test_strided_cu_seqlens_and_a_zero_softmax_scale():
    # an int32 column of a wider tensor (`.to(int32)` keeps it strided) was once read as a packed array; a
    # softmax_scale of 0.0 (uniform attention) was once replaced by the default 1/sqrt(dim)
    cu = torch.tensor([[0, 0], [10, 0], [30, 0]], dtype=torch.int32)[:, 0]
    q, k, v = (t.detach() for t in qkv((30, 2, 32), 2, torch.float32, seed=6))
    out = ttl_kernels.flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=20, backend="triton")
    assert err(out, ttl_kernels.flash_attention_reference(q.double(), k.double(), v.double(), True, cu)) <= 1e-4
    q, k, v = (t.detach() for t in qkv((1, 5, 2, 32), 2, torch.float32, seed=7))
    for backend in ("triton", "torch"):
        out = ttl_kernels.flash_attention(q, k, v, causal=False, softmax_scale=0.0, backend=backend)
        assert err(out, v.mean(1, keepdim=True).expand_as(v)) <= 1e-6, backend


def test_a_given_softmax_scale_in_forward_and_backward():
    # a softmax_scale other than 1/sqrt(dim) (only 0.0 is checked above, and in the forward): the forward and
    # both backward kernels must use it
    cu = torch.tensor([0, 11, 30], dtype=torch.int32)
    q, k, v = qkv((30, 4, 32), 2, torch.float32, seed=12)
    check(q, k, v, True, TOL[torch.float32], cu, 19, seed=13, softmax_scale=0.4)


def test_recomputed_probabilities_keep_float32_accuracy_at_large_scores():
    """Each query ties two keys at scores from 1e3 to 3e4 (every other score 0), so each row's probabilities
    are exactly 1/2 and 0 and every score product is exact: dV must be the mean of the pair's output
    gradients. The log-sum-exp once made a round trip through natural log between the forward and the
    backward, two roundings at its magnitude that the recomputed probabilities lost (4e-3 of dV near 3e4)."""
    seq, dim = 32, 16
    c = (4 * torch.linspace(1e3, 3e4, dim)).sqrt()  # scores c^2 * dim^-1/2 = c^2 / 4
    keys = (torch.eye(dim) * c[:, None]).repeat_interleave(2, 0)[None, :, None]  # keys 2i and 2i + 1 alike
    q, k = keys.clone().requires_grad_(), keys.clone().requires_grad_()
    v = torch.randn(1, seq, 1, dim, generator=torch.Generator().manual_seed(14)).requires_grad_()
    grad = torch.randn(1, seq, 1, dim, generator=torch.Generator().manual_seed(15))
    out = ttl_kernels.flash_attention(q, k, v, causal=False, backend="triton")
    (dv,) = torch.autograd.grad(out, v, grad)

    def pair_mean(t):
        return t.view(dim, 2, dim).mean(1, keepdim=True).expand(dim, 2, dim).reshape(t.shape)

    assert err(out, pair_mean(v)) <= TOL[torch.float32] and err(dv, pair_mean(grad)) <= TOL[torch.float32]


def test_double_backward_fails_loudly():
    q, k, v = qkv((1, 5, 2, 32), 2, torch.float32, seed=8)
    s = torch.tensor(2.0, requires_grad=True)  # the gradient then requires grad: it must not silently lack terms
    (g,) = torch.autograd.grad(ttl_kernels.flash_attention(q, k, v, backend="triton").pow(2).sum() * s, q,
                               create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.pow(2).sum().backward()


def test_a_gradient_penalty_fails_loudly_rather_than_adding_nothing():
    # from a constant seed (a plain loss) torch's once_differentiable gave q's gradient no graph, so a penalty
    # on it added no gradient to the backward, without a word
    q, k, v = qkv((1, 5, 2, 32), 2, torch.float32, seed=8)
    loss = ttl_kernels.flash_attention(q, k, v, backend="triton").sum()
    (g,) = torch.autograd.grad(loss, q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (loss + g.pow(2).sum()).backward()


def test_more_sequences_than_a_grid_axis_holds_go_in_several_launches(monkeypatch):
    """The grid is (blocks, heads, sequences), and CUDA holds at most 65535 on the last two axes: more
    sequences are split over launches (sequences x heads on one axis once passed it with 2048 documents of
    32 heads). With the limit lowered to 2, five documents take three launches and give the same bits."""
    cu = torch.tensor([0, 3, 10, 11, 17, 21], dtype=torch.int32)
    q, k, v = qkv((21, 4, 32), 2, torch.float32, seed=9)
    grad = torch.randn(21, 4, 32, generator=torch.Generator().manual_seed(10))
    results = []
    for limit in (fa_module.MAX_GRID_AXIS, 2):
        monkeypatch.setattr(fa_module, "MAX_GRID_AXIS", limit)
        out = ttl_kernels.flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=7, backend="triton")
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.gpu
def test_more_sequences_than_a_grid_axis_holds_on_cuda():
    """70000 two-token documents: more sequences than CUDA's second and third grid axes hold (65535), and
    sequences x heads far beyond it; against float64 attention computed with the documents as a batch."""
    docs, length, heads, kv_heads = 70000, 2, 4, 2
    cu = torch.arange(0, (docs + 1) * length, length, dtype=torch.int32, device="cuda")
    q, k, v = qkv((docs * length, heads, 64), kv_heads, torch.bfloat16, seed=9, device="cuda")
    out = ttl_kernels.flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=length, backend="triton")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(10)).to("cuda", torch.bfloat16)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().view(docs, length, -1, 64).transpose(1, 2).requires_grad_()
                     for t in (q, k, v))
    scores = q64 @ k64.repeat_interleave(heads // kv_heads, 1).transpose(2, 3) * 64**-0.5
    causal = torch.ones(length, length, dtype=torch.bool, device="cuda").triu(1)
    truth = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v64.repeat_interleave(heads // kv_heads, 1)
    truth_grad = grad.double().view(docs, length, heads, 64).transpose(1, 2)
    truth_grads = torch.autograd.grad(truth, (q64, k64, v64), truth_grad)
    for got, want in zip((out, *grads), (truth, *truth_grads)):
        assert err(got, want.transpose(1, 2).flatten(0, 1)) <= TOL[torch.bfloat16]


def test_head_offsets_beyond_32_bits():
    """Packed queries whose heads lie 2^31 - 64 elements apart (a head-major view of a long batch): the third
    head's offset (2^32 - 128) wrapped to -128 in 32 bits and attended with the values before the view instead
    of its own queries. Output and gradients must equal those of a compact copy, bit for bit."""
    far = heads_far_apart(5, 3, 16).requires_grad_()
    k, v = (torch.randn(5, 1, 16, generator=torch.Generator().manual_seed(s)).half().requires_grad_() for s in (1, 2))
    grad = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(3)).half()
    cu = torch.tensor([0, 2, 5])
    results = []
    for q in (far, far.detach().clone().requires_grad_()):
        out = ttl_kernels.flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=3, backend="triton")
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    assert all(torch.equal(a, b) for a, b in zip(*results))
