"""The Triton rotary embedding (interpreted on CPU, compiled on CUDA) against a float64 truth."""

import pytest
import torch
from helpers import REL_TOL, heads_far_apart, rel_err

import ttl_kernels


def angles(positions, dim, dtype, theta=10000.0):
    """cos, sin of shape positions.shape + (dim,) in the HF `rotate_half` layout, as ttl's model builds them."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def projection(batch, seq, heads, kv_heads, dim, dtype, seed=0, device="cpu"):
    """q and k as the model makes them: strided views into one fused qkv projection output."""
    gen = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(batch, seq, (heads + 2 * kv_heads) * dim, generator=gen, device=device).to(dtype)
    qkv.requires_grad_()
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return qkv, q.view(batch, seq, heads, dim), k.view(batch, seq, kv_heads, dim)


def check_against_truth(q, k, cos, sin, tol, backend="triton"):
    """Forward and backward of our apply_rotary against the reference formula in float64."""
    outs = ttl_kernels.apply_rotary(q, k, cos, sin, backend=backend)
    grads = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, (q, k), grads)
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    ref_outs = ttl_kernels.apply_rotary_reference(q64, k64, cos.double(), sin.double())
    ref = torch.autograd.grad(ref_outs, (q64, k64), [g.double() for g in grads])
    for o, r in zip((*outs, *got), (*ref_outs, *ref)):
        assert o.dtype == q.dtype and o.shape == r.shape
        assert rel_err(o, r) <= tol
    return outs, got


CASES = {  # batch, seq, heads, kv_heads, head_dim
    "gqa": (2, 5, 4, 2, 64),
    "mqa": (2, 7, 3, 1, 32),
    "odd_half_dim": (1, 3, 5, 5, 6),
    "dim2": (3, 2, 2, 1, 2),
}


@pytest.mark.parametrize("angle_batch", ["seq", "one", "batch", "arbitrary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_match_float64(case, dtype, angle_batch):
    batch, seq, heads, kv_heads, dim = CASES[case]
    _, q, k = projection(batch, seq, heads, kv_heads, dim, dtype)
    # per-row positions with offsets, as in packed sequences; "seq": one table for all rows, (seq, dim)
    positions = torch.arange(seq)[None] + 3 * torch.arange(batch)[:, None]
    cos, sin = angles(positions, dim, dtype)
    if angle_batch == "seq":
        cos, sin = cos[0], sin[0]
    elif angle_batch == "one":
        cos, sin = cos[:1], sin[:1]
    elif angle_batch == "arbitrary":  # halves that differ: the kernel follows the reference formula, not a table
        gen = torch.Generator().manual_seed(5)
        cos, sin = (torch.randn(batch, seq, dim, generator=gen).to(dtype) for _ in range(2))
    check_against_truth(q, k, cos, sin, REL_TOL[str(dtype).split(".")[1]])


def test_decoding_offsets_agree_with_the_full_sequence():
    # a KV-cache step rotates one new position with that position's row of the table
    _, q, k = projection(2, 9, 4, 2, 16, torch.float32, seed=1)
    cos, sin = angles(torch.arange(9), 16, torch.float32)
    full_q, full_k = ttl_kernels.apply_rotary(q, k, cos, sin, backend="triton")
    step_q, step_k = ttl_kernels.apply_rotary(q[:, 6:7], k[:, 6:7], cos[6:7], sin[6:7], backend="triton")
    assert torch.equal(step_q, full_q[:, 6:7]) and torch.equal(step_k, full_k[:, 6:7])


def test_backward_is_the_rotation_by_minus_the_angle():
    _, q, k = projection(2, 6, 3, 3, 8, torch.float32, seed=2)
    cos, sin = angles(torch.arange(6), 8, torch.float32)
    outs = ttl_kernels.apply_rotary(q, k, cos, sin, backend="triton")
    grads = [torch.randn_like(o) for o in outs]
    dq, dk = torch.autograd.grad(outs, (q, k), grads)
    back_q, back_k = ttl_kernels.apply_rotary(grads[0], grads[1], cos, -sin, backend="triton")
    assert rel_err(dq, back_q) <= 1e-6 and rel_err(dk, back_k) <= 1e-6


def test_strided_inputs_angles_and_gradients():
    gen = torch.Generator().manual_seed(3)
    # q, k laid out (batch, heads, seq, dim) and seen as (batch, seq, heads, dim); angles from a longer
    # table, every other row; output gradients arriving transposed
    q = torch.randn(2, 4, 7, 16, generator=gen).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 2, 7, 16, generator=gen).transpose(1, 2).requires_grad_()
    cos, sin = angles(torch.arange(14), 16, torch.float32)
    outs = ttl_kernels.apply_rotary(q, k, cos[::2], sin[::2], backend="triton")
    grads = [torch.randn(o.transpose(1, 2).shape, generator=gen).transpose(1, 2) for o in outs]
    got = torch.autograd.grad(outs, (q, k), grads)
    ref_outs = ttl_kernels.apply_rotary_reference(q.double(), k.double(), cos[::2].double(), sin[::2].double())
    ref = torch.autograd.grad(ref_outs, (q, k), [g.double() for g in grads])
    for o, r in zip((*outs, *got), (*ref_outs, *ref)):
        assert rel_err(o, r) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["gqa", "mqa", "odd_half_dim"])
def test_fused_qkv_equals_split_and_rotate(case, dtype):
    # the model's path: one gradient for the whole projection instead of autograd's split + concatenation
    batch, seq, heads, kv_heads, dim = CASES[case]
    qkv, q, k = projection(batch, seq, heads, kv_heads, dim, dtype, seed=6)
    v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)[2].view(batch, seq, kv_heads, dim)
    cos, sin = angles(torch.arange(seq)[None] + 5 * torch.arange(batch)[:, None], dim, dtype)
    heads_view = qkv.view(batch, seq, heads + 2 * kv_heads, dim)
    fused = ttl_kernels.apply_rotary_qkv(heads_view, cos, sin, kv_heads, backend="triton")
    assert "RotaryQKV" in type(fused[0].grad_fn).__name__
    assert fused[2].data_ptr() == v.data_ptr() and torch.equal(fused[2], v)  # v is a view, not a copy
    split = (*ttl_kernels.apply_rotary(q, k, cos, sin, backend="triton"), v)
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(o.shape, generator=gen).to(dtype) for o in fused]
    for used in ((0, 1, 2), (0,), (2,)):  # outputs left out of the loss contribute zeros
        got = torch.autograd.grad([fused[i] for i in used], qkv, [grads[i] for i in used], retain_graph=True)[0]
        want = torch.autograd.grad([split[i] for i in used], qkv, [grads[i] for i in used], retain_graph=True)[0]
        assert torch.equal(got, want)
    for o, r in zip(fused, split):
        assert torch.equal(o, r)
    ref = ttl_kernels.apply_rotary_qkv(heads_view, cos, sin, kv_heads, backend="torch")
    for o, r in zip(fused, ref):
        assert rel_err(o, r) <= REL_TOL[str(dtype).split(".")[1]]


def test_fused_qkv_rejects_head_counts_that_do_not_fit():
    qkv = torch.randn(2, 3, 6, 8)
    cos, sin = angles(torch.arange(3), 8, torch.float32)
    for kv_heads in (0, 3, 4):
        with pytest.raises(ValueError, match="at least one query head"):
            ttl_kernels.apply_rotary_qkv(qkv, cos, sin, kv_heads, backend="triton")


DECODE_SHAPES = {**CASES, "ttl160m_decode": (8, 1, 12, 12, 64), "ttl160m_prefill": (2, 100, 12, 12, 64)}


@pytest.mark.parametrize("layout", ["sdpa", "flash", "k_sdpa_v_flash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case, device", [
    ("gqa", "cpu"), ("mqa", "cpu"), ("odd_half_dim", "cpu"),
    *(pytest.param(case, "cuda", marks=pytest.mark.gpu) for case in ("gqa", "ttl160m_decode", "ttl160m_prefill")),
])
def test_rotary_into_cache_equals_rotate_then_copy(case, device, dtype, layout):
    # the decode path: one kernel rotates q, rotates k into the cache and copies v beside it
    batch, seq, heads, kv_heads, dim = DECODE_SHAPES[case]
    max_len = 128
    qkv = projection(batch, seq, heads, kv_heads, dim, dtype, seed=8, device=device)[0].detach()
    qkv = qkv.view(batch, seq, heads + 2 * kv_heads, dim)
    positions = torch.arange(seq, device=device)[None] + 4 * torch.arange(batch, device=device)[:, None]
    cos, sin = angles(positions, dim, dtype)
    slots = torch.randperm(max_len, generator=torch.Generator().manual_seed(9))[:seq].to(device)  # scattered
    gen = torch.Generator().manual_seed(10)

    def caches():  # SDPA's (batch, kv_heads, max_len, dim) storage seen as (batch, max_len, kv_heads, dim)
        sdpa = (layout == "sdpa", layout == "sdpa") if layout != "k_sdpa_v_flash" else (True, False)
        shapes = [(batch, kv_heads, max_len, dim) if s else (batch, max_len, kv_heads, dim) for s in sdpa]
        stores = [torch.randn(shape, generator=gen).to(device, dtype) for shape in shapes]
        return [t.transpose(1, 2) if s else t for t, s in zip(stores, sdpa)]
    fused_k, fused_v = caches()
    ref_k, ref_v = (t.clone() for t in (fused_k, fused_v))
    q = ttl_kernels.rotary_into_cache(qkv, cos, sin, fused_k, fused_v, slots, backend="triton")
    want_q, want_k, want_v = ttl_kernels.apply_rotary_qkv(qkv, cos, sin, kv_heads, backend="triton")
    ref_k.index_copy_(1, slots, want_k)
    ref_v.index_copy_(1, slots, want_v)
    assert torch.equal(q, want_q) and torch.equal(fused_k, ref_k) and torch.equal(fused_v, ref_v)
    torch_k, torch_v = (t.clone() for t in caches())
    torch_q = ttl_kernels.rotary_into_cache(qkv, cos, sin, torch_k, torch_v, slots, backend="torch")
    tol = REL_TOL[str(dtype).split(".")[1]]
    assert rel_err(q, torch_q) <= tol and rel_err(fused_k[:, slots], torch_k[:, slots]) <= tol
    assert torch.equal(fused_v[:, slots], torch_v[:, slots])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rotary_into_cache_slot_types_and_range(backend):
    qkv = projection(2, 4, 2, 1, 8, torch.float32, seed=12)[0].detach().view(2, 4, 4, 8)
    cos, sin = angles(torch.arange(4), 8, torch.float32)
    slots = torch.tensor([3, 0, 6, 1], dtype=torch.int32)
    k_cache, v_cache = torch.zeros(2, 7, 1, 8), torch.zeros(2, 7, 1, 8)
    q = ttl_kernels.rotary_into_cache(qkv, cos, sin, k_cache, v_cache, slots, backend=backend)
    want_q, want_k, want_v = ttl_kernels.apply_rotary_qkv(qkv, cos, sin, 1, backend=backend)
    assert torch.equal(q, want_q)
    assert torch.equal(k_cache[:, slots.long()], want_k) and torch.equal(v_cache[:, slots.long()], want_v)
    if backend == "triton":  # a slot outside the cache is skipped, not written past its end
        k_cache.zero_(), v_cache.zero_()
        ttl_kernels.rotary_into_cache(qkv, cos, sin, k_cache, v_cache, torch.tensor([3, -1, 7, 1]), backend=backend)
        assert torch.equal(k_cache[:, [3, 1]], want_k[:, [0, 3]]) and torch.equal(v_cache[:, [3, 1]], want_v[:, [0, 3]])
        assert k_cache[:, [0, 2, 4, 5, 6]].abs().sum() == 0 and v_cache[:, [0, 2, 4, 5, 6]].abs().sum() == 0


def test_rotary_into_cache_keeps_autograd_when_asked():
    qkv = projection(1, 3, 2, 1, 8, torch.float32, seed=11)[0].view(1, 3, 4, 8)
    cos, sin = angles(torch.arange(3), 8, torch.float32)
    k_cache, v_cache = torch.zeros(1, 5, 1, 8), torch.zeros(1, 5, 1, 8)
    q = ttl_kernels.rotary_into_cache(qkv, cos, sin, k_cache, v_cache, torch.tensor([0, 1, 2]), backend="triton")
    assert q.requires_grad and k_cache.requires_grad  # rotate-then-copy, differentiable as before


def test_rotary_into_cache_rejects_caches_that_do_not_fit():
    qkv = torch.randn(2, 3, 8, 8)
    cos, sin = angles(torch.arange(3), 8, torch.float32)
    slots = torch.arange(3)
    fits = torch.zeros(2, 5, 2, 8)
    for k_cache, v_cache, message in [
        (torch.zeros(2, 5, 8), fits, "k_cache \\(batch, max_len"),
        (torch.zeros(2, 5, 4, 8), torch.zeros(2, 5, 4, 8), "at least one query head"),
        (fits, torch.zeros(2, 5, 2, 8, dtype=torch.bfloat16), "v_cache \\(2, max_len, 2, 8\\) in torch.float32"),
        (torch.zeros(2, 5, 8, 2).transpose(2, 3), fits, "contiguous last dim"),
        (torch.zeros(1, 5, 2, 8), fits, "k_cache \\(2, max_len"),
    ]:
        with pytest.raises(ValueError, match=message):
            ttl_kernels.rotary_into_cache(qkv, cos, sin, k_cache, v_cache, slots, backend="triton")
    with pytest.raises(ValueError, match="one integer cache slot per new token \\(3\\)"):
        ttl_kernels.rotary_into_cache(qkv, cos, sin, fits, fits.clone(), torch.arange(2), backend="triton")
    with pytest.raises(ValueError, match="one integer cache slot"):  # float positions are not slots
        ttl_kernels.rotary_into_cache(qkv, cos, sin, fits, fits.clone(), torch.arange(3.0), backend="triton")


def test_rejects_mismatched_shapes():
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    cos, sin = angles(torch.arange(5), 8, torch.float32)
    with pytest.raises(ValueError, match="cos/sin must be"):
        ttl_kernels.apply_rotary(q, k, cos[:4], sin[:4], backend="triton")
    with pytest.raises(ValueError, match="does not match"):
        ttl_kernels.apply_rotary(q, k, cos.expand(3, 5, 8), sin.expand(3, 5, 8), backend="triton")
    with pytest.raises(ValueError, match="q \\(batch, seq, heads, dim\\)"):
        ttl_kernels.apply_rotary(q, k[:, :4], cos, sin, backend="triton")
    with pytest.raises(ValueError, match="q \\(batch, seq, heads, dim\\)"):  # another head dim
        ttl_kernels.apply_rotary(q, k[..., :6], cos, sin, backend="triton")
    with pytest.raises(ValueError, match="cos/sin must be"):  # sin's shape is checked, not only cos's
        ttl_kernels.apply_rotary(q, k, cos, sin[:4], backend="triton")
    with pytest.raises(ValueError, match="q, k of one dtype"):
        ttl_kernels.apply_rotary(q, k.to(torch.bfloat16), cos, sin, backend="triton")
    odd_cos = torch.randn(5, 7)
    with pytest.raises(ValueError, match="even head dim"):
        ttl_kernels.apply_rotary(torch.randn(2, 5, 4, 7), torch.randn(2, 5, 2, 7), odd_cos, odd_cos, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(4, 2048, 12, 12, 64), (2, 2048, 32, 8, 128)], ids=["ttl160m", "gqa128"])
def test_cuda_compiled_matches_float64(shape, dtype):
    batch, seq, heads, kv_heads, dim = shape
    torch.manual_seed(0)  # check_against_truth's output gradients
    _, q, k = projection(batch, seq, heads, kv_heads, dim, dtype, device="cuda")
    cos, sin = angles(torch.arange(seq, device="cuda")[None].expand(batch, seq), dim, dtype)
    outs, _ = check_against_truth(q, k, cos, sin, REL_TOL[str(dtype).split(".")[1]], backend="auto")
    assert "RotaryFunction" in type(outs[0].grad_fn).__name__  # "auto" takes Triton on CUDA


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_float32_angles_with_bf16_activations_compute_as_transformers_under_autocast(backend):
    # under autocast the model's tables are fp32 while q and k are bf16: transformers' `q * cos + rotate_half(q) *
    # sin` promotes to fp32 and its result is rounded to bf16 once, by the attention that takes it. Both paths
    # once rounded the tables to bf16 first, which moved a fifth of the reference's outputs by a bf16 step.
    _, q, k = projection(2, 5, 4, 2, 64, torch.bfloat16, seed=4)
    cos, sin = angles(torch.arange(5)[None] + 7 * torch.arange(2)[:, None], 64, torch.float32)
    outs = ttl_kernels.apply_rotary(q, k, cos, sin, backend=backend)
    c, s = cos[:, :, None], sin[:, :, None]
    for got, x in zip(outs, (q, k)):
        rotated = torch.cat((-x[..., 32:], x[..., :32]), dim=-1)
        assert got.dtype == torch.bfloat16 and torch.equal(got, (x * c + rotated * s).to(torch.bfloat16))


def test_rotary_into_cache_reads_strided_slots_by_their_strides():
    # a column of a (seq, 2) tensor: the kernel once read it as a packed array and wrote the wrong rows
    qkv = projection(2, 3, 2, 1, 8, torch.float32, seed=13)[0].detach().view(2, 3, 4, 8)
    cos, sin = angles(torch.arange(3), 8, torch.float32)
    slots = torch.tensor([[4, 0], [5, 0], [6, 0]])[:, 0]
    written = []
    for s in (slots, slots.contiguous()):
        k_cache, v_cache = torch.zeros(2, 10, 1, 8), torch.zeros(2, 10, 1, 8)
        q = ttl_kernels.rotary_into_cache(qkv, cos, sin, k_cache, v_cache, s, backend="triton")
        written.append((q, k_cache, v_cache))
    assert all(torch.equal(a, b) for a, b in zip(*written))


def test_angles_that_require_grad_are_refused_by_the_triton_path():
    """The Triton backward has no gradient for cos/sin (the reference has): it once returned none, silently.
    Either table requiring grad is refused. Under no_grad, where there is nothing to differentiate, the kernels run."""
    qkv, q, k = projection(1, 3, 2, 1, 8, torch.float32, seed=14)
    heads = qkv.view(1, 3, 4, 8)
    caches = torch.zeros(1, 5, 1, 8), torch.zeros(1, 5, 1, 8)
    for differentiated in ("cos", "sin"):
        cos, sin = angles(torch.arange(3), 8, torch.float32)
        {"cos": cos, "sin": sin}[differentiated].requires_grad_()
        for call in (lambda: ttl_kernels.apply_rotary(q, k, cos, sin, backend="triton"),
                     lambda: ttl_kernels.apply_rotary_qkv(heads, cos, sin, 1, backend="triton"),
                     lambda: ttl_kernels.rotary_into_cache(heads.detach(), cos, sin, *caches, torch.arange(3),
                                                           backend="triton")):
            with pytest.raises(ValueError, match="cos/sin as constants"):
                call()
            with torch.no_grad():
                call()


def test_double_backward_fails_loudly():
    qkv, q, k = projection(1, 3, 2, 1, 8, torch.float32, seed=15)
    cos, sin = angles(torch.arange(3), 8, torch.float32)
    s = torch.tensor(2.0, requires_grad=True)  # the gradient then requires grad: it must not silently lack terms
    for outs in (ttl_kernels.apply_rotary(q, k, cos, sin, backend="triton"),
                 ttl_kernels.apply_rotary_qkv(qkv.view(1, 3, 4, 8), cos, sin, 1, backend="triton")[:2]):
        (g,) = torch.autograd.grad((outs[0].pow(2).sum() + outs[1].sum()) * s, qkv, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            g.pow(2).sum().backward()


def test_operands_with_a_strided_last_dim_are_read_by_their_strides():
    # q, k, the fused qkv, cos/sin and the output gradients with a last-dim stride other than 1 (e.g. a
    # (dim, seq) table seen transposed): the kernels index the last dim as packed, so these are copied first
    gen = torch.Generator().manual_seed(16)
    q = torch.randn(2, 5, 8, 3, generator=gen).transpose(2, 3).requires_grad_()  # (2, 5, 3, 8), last stride 3
    k = torch.randn(2, 5, 8, 2, generator=gen).transpose(2, 3).requires_grad_()
    cos, sin = (t.t().contiguous().t() for t in angles(torch.arange(5), 8, torch.float32))
    outs = ttl_kernels.apply_rotary(q, k, cos, sin, backend="triton")
    grads = [torch.randn(*o.shape[:2], 8, o.shape[2], generator=gen).transpose(2, 3) for o in outs]
    got = torch.autograd.grad(outs, (q, k), grads)
    ref_outs = ttl_kernels.apply_rotary_reference(q.double(), k.double(), cos.double(), sin.double())
    ref = torch.autograd.grad(ref_outs, (q, k), [g.double() for g in grads])
    for o, r in zip((*outs, *got), (*ref_outs, *ref)):
        assert rel_err(o, r) <= 1e-5
    qkv = torch.randn(2, 5, 8, 7, generator=gen).transpose(2, 3)  # 3 query heads, 2 kv heads
    caches = [torch.zeros(2, 6, 2, 8) for _ in range(4)]
    slots = torch.tensor([5, 0, 2, 1, 3])
    q_triton = ttl_kernels.rotary_into_cache(qkv, cos, sin, *caches[:2], slots, backend="triton")
    q_torch = ttl_kernels.rotary_into_cache(qkv, cos, sin, *caches[2:], slots, backend="torch")
    assert rel_err(q_triton, q_torch) <= 1e-5 and rel_err(caches[0], caches[2]) <= 1e-5
    assert torch.equal(caches[1], caches[3])


def test_cos_and_sin_with_different_strides():
    # the kernels index both tables with cos's strides: a sin laid out differently (every other row of a
    # longer table beside a packed cos of the same positions) must not be read with cos's strides
    _, q, k = projection(2, 4, 2, 1, 8, torch.float32, seed=17)
    cos, sin = angles(torch.arange(8), 8, torch.float32)
    cos, sin = cos[::2].contiguous(), sin[::2]
    check_against_truth(q, k, cos, sin, 1e-5)
    qkv = projection(2, 4, 2, 1, 8, torch.float32, seed=18)[0].detach().view(2, 4, 4, 8)
    caches = [torch.zeros(2, 5, 1, 8) for _ in range(4)]
    slots = torch.tensor([4, 1, 0, 2])
    q_triton = ttl_kernels.rotary_into_cache(qkv, cos, sin, *caches[:2], slots, backend="triton")
    q_torch = ttl_kernels.rotary_into_cache(qkv, cos, sin, *caches[2:], slots, backend="torch")
    assert rel_err(q_triton, q_torch) <= 1e-5 and rel_err(caches[0], caches[2]) <= 1e-5


def test_more_key_heads_than_query_heads():
    # q and k heads are tiled separately, each by its own count: k may have more heads than q
    _, q, k = projection(2, 3, 1, 3, 8, torch.float32, seed=19)
    cos, sin = angles(torch.arange(3), 8, torch.float32)
    check_against_truth(q, k, cos, sin, 1e-5)


def test_q_and_k_with_different_head_strides():
    # each operand is read by its own strides: q from the fused projection (heads side by side) beside k laid
    # out (batch, heads, seq, dim), where the tests above give both one layout
    _, q, _ = projection(2, 5, 4, 2, 16, torch.float32, seed=32)
    k = torch.randn(2, 2, 5, 16, generator=torch.Generator().manual_seed(33)).transpose(1, 2).requires_grad_()
    cos, sin = angles(torch.arange(5), 16, torch.float32)
    check_against_truth(q, k, cos, sin, 1e-5)


def test_head_offsets_beyond_32_bits():
    """q, and a fused qkv, whose heads lie 2^31 - 64 elements apart (a head-major view of a long sequence):
    the third head's offset (2^32 - 128) wrapped to -128 in 32 bits and rotated the values before the view
    instead of the head's own. The results must equal those of a compact copy, bit for bit."""
    far = heads_far_apart(1, 3, 64)[None]  # (1, 1, 3, 64)
    k = torch.randn(1, 1, 1, 64, generator=torch.Generator().manual_seed(1))
    cos, sin = angles(torch.arange(1), 64, torch.float16)
    for got, want in zip(ttl_kernels.apply_rotary(far, k.half(), cos, sin, backend="triton"),
                         ttl_kernels.apply_rotary(far.clone(), k.half(), cos, sin, backend="triton")):
        assert torch.equal(got, want)
    # two query heads, so the key head's offset (2 query heads' strides) passes 2^31 too, not only the value's
    far_qkv = heads_far_apart(1, 4, 64)[None]
    caches = [torch.zeros(1, 4, 1, 64, dtype=torch.float16) for _ in range(4)]
    slots = torch.tensor([2])
    q_far = ttl_kernels.rotary_into_cache(far_qkv, cos, sin, *caches[:2], slots, backend="triton")
    q_compact = ttl_kernels.rotary_into_cache(far_qkv.clone(), cos, sin, *caches[2:], slots, backend="triton")
    assert torch.equal(q_far, q_compact) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_zero_heads_or_head_dim_match_reference():
    """Empty head or head-dim axes give empty results on the Triton path as on the reference, not a kernel
    built with a zero-sized tile."""
    for q_heads, k_heads, dim in ((3, 0, 8), (0, 2, 8), (2, 1, 0)):
        q, k = torch.randn(2, 5, q_heads, dim, requires_grad=True), torch.randn(2, 5, k_heads, dim, requires_grad=True)
        cos, sin = torch.randn(5, dim), torch.randn(5, dim)
        got = ttl_kernels.apply_rotary(q, k, cos, sin, backend="triton")
        want = ttl_kernels.apply_rotary_reference(q, k, cos, sin)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        grads = torch.autograd.grad(got, (q, k), [torch.randn_like(t) for t in got])
        assert [g.shape for g in grads] == [q.shape, k.shape]
