"""Rotary position embedding in the Hugging Face `rotate_half` layout: Triton kernel beside the reference.

One program handles one token: it loads that position's cos/sin row once and rotates every query head and
every key head with it, so q and k go through one launch and the angles are read once per token instead of
once per head. The backward is the same kernel run on the gradients with the transposed rotation (the
rotation by minus the angle when the two halves of cos/sin agree, as they do for real rotary tables). The
tables are constants there: angles that require grad are refused on the Triton path (the reference
differentiates them).
"""

from __future__ import annotations

import torch
# torch's own, not dispatch's: the rotation is linear in q and k, so its gradients depend on neither, and a
# second backward (create_graph=True) rightly gets nothing through them
from torch.autograd.function import once_differentiable

from .dispatch import HAVE_TRITON, apply_kernel, require_floating, require_int, require_one_device, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl


def _broadcast_angles(table: torch.Tensor) -> torch.Tensor:
    # (seq, dim) or (batch, seq, dim) -> broadcastable against (batch, seq, heads, dim)
    return table[None, :, None, :] if table.dim() == 2 else table[:, :, None, :]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (batch, seq, heads, dim) and k (batch, seq, kv_heads, dim) by the angles whose cos/sin
    are given per position, computed exactly as transformers does: in the wider of the two dtypes (fp32 tables
    with bf16 q and k under autocast), the result rounded to q's dtype."""
    cos, sin = _broadcast_angles(cos), _broadcast_angles(sin)
    return (q * cos + _rotate_half(q) * sin).to(q.dtype), (k * cos + _rotate_half(k) * sin).to(k.dtype)


if HAVE_TRITON:

    @triton.jit
    def _rotate_heads(
        X, OUT, n_heads, stride_h, stride_out_h, c1, c2, s1, s2, half,
        BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
    ):
        # 64-bit: in a head-major view (heads outside tokens) the last head's offset can pass 2^31 elements
        heads = tl.arange(0, BLOCK_H).to(tl.int64)[:, None]
        dims = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (heads < n_heads) & (dims < half)
        x1 = tl.load(X + heads * stride_h + dims, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + heads * stride_h + half + dims, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of [x1, x2] -> [x1*c1 - x2*s1, x2*c2 + x1*s2]
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(OUT + heads * stride_out_h + dims, o1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + heads * stride_out_h + half + dims, o2.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_angles(COS, SIN, half, BLOCK_HALF: tl.constexpr):
        # in the tables' own precision, as transformers multiplies by them (fp32 tables under autocast)
        dims = tl.arange(0, BLOCK_HALF)[None, :]
        dim_ok = dims < half
        c1 = tl.load(COS + dims, mask=dim_ok, other=0.0).to(tl.float32)
        c2 = tl.load(COS + half + dims, mask=dim_ok, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + dims, mask=dim_ok, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + half + dims, mask=dim_ok, other=0.0).to(tl.float32)
        return c1, c2, s1, s2

    @triton.jit
    def _rotary_kernel(
        Q, K, COS, SIN, QO, KO, seq_len, n_q_heads, n_k_heads, half,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_cb, stride_cs,
        stride_qob, stride_qos, stride_qoh, stride_kob, stride_kos, stride_koh,
        BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        b = token // seq_len
        s = token % seq_len
        angle = b * stride_cb + s * stride_cs
        c1, c2, s1, s2 = _load_angles(COS + angle, SIN + angle, half, BLOCK_HALF)
        _rotate_heads(Q + b * stride_qb + s * stride_qs, QO + b * stride_qob + s * stride_qos, n_q_heads,
                      stride_qh, stride_qoh, c1, c2, s1, s2, half, BLOCK_QH, BLOCK_HALF, BACKWARD)
        _rotate_heads(K + b * stride_kb + s * stride_ks, KO + b * stride_kob + s * stride_kos, n_k_heads,
                      stride_kh, stride_koh, c1, c2, s1, s2, half, BLOCK_KH, BLOCK_HALF, BACKWARD)

    @triton.jit
    def _rotary_into_cache_kernel(
        QKV, COS, SIN, QO, K_CACHE, V_CACHE, SLOTS, seq_len, n_q_heads, n_k_heads, half, max_len,
        stride_b, stride_s, stride_h, stride_cb, stride_cs, stride_qob, stride_qos, stride_qoh,
        stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
        BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        b = token // seq_len
        s = token % seq_len
        slot = tl.load(SLOTS + s).to(tl.int64)
        angle = b * stride_cb + s * stride_cs
        c1, c2, s1, s2 = _load_angles(COS + angle, SIN + angle, half, BLOCK_HALF)
        row = QKV + b * stride_b + s * stride_s
        _rotate_heads(row, QO + b * stride_qob + s * stride_qos, n_q_heads, stride_h, stride_qoh,
                      c1, c2, s1, s2, half, BLOCK_QH, BLOCK_HALF, False)
        # a slot outside the cache writes nothing (the reference's index_copy_ would raise; this cannot
        # without a host sync). Head offsets are 64-bit, as in _rotate_heads: the head stride of a (batch,
        # kv_heads, max_len, dim) cache is max_len * dim, whose multiples pass 2^31 at long contexts (zeros +
        # stride: also when Triton made a stride 1 a constant)
        k_heads_in_cache = tl.where((slot >= 0) & (slot < max_len), n_k_heads, 0)
        stride_h64 = tl.zeros([], tl.int64) + stride_h
        _rotate_heads(row + n_q_heads * stride_h64, K_CACHE + b * stride_kcb + slot * stride_kcs, k_heads_in_cache,
                      stride_h, stride_kch, c1, c2, s1, s2, half, BLOCK_KH, BLOCK_HALF, False)
        heads = tl.arange(0, BLOCK_KH).to(tl.int64)[:, None]
        dims = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        mask = (heads < k_heads_in_cache) & (dims < 2 * half)
        values = tl.load(row + (n_q_heads + n_k_heads + heads) * stride_h + dims, mask=mask)
        tl.store(V_CACHE + b * stride_vcb + slot * stride_vcs + heads * stride_vch + dims, values, mask=mask)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rotary_launch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (or, with `backward`, apply the transposed rotation to) q and k in one launch; cos/sin are
    already (batch, seq, dim) views (stride 0 where broadcast). Writes into `out` (views with a contiguous
    last dim) when given, else into new contiguous tensors; returns the two results."""
    # a list, not a generator: torch 2.15's dynamo fails on a generator unpacked in an autograd Function's forward
    # ("generator already executing") and splits a compiled training block at it
    q, k, cos, sin = [_last_dim_contiguous(t) for t in (q, k, cos, sin)]
    batch, seq, n_q_heads, dim = q.shape
    n_k_heads = k.shape[2]
    qo, ko = out or (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                     torch.empty(k.shape, dtype=k.dtype, device=k.device))
    cos, sin = _same_strides(cos, sin)
    if batch * seq:
        _rotary_kernel[(batch * seq,)](
            q, k, cos, sin, qo, ko, seq, n_q_heads, n_k_heads, dim // 2,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), cos.stride(0),
            cos.stride(1), qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
            BACKWARD=backward, **_tile_shape(n_q_heads, n_k_heads, dim),
        )
    return qo, ko


def _same_strides(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the kernels index both tables with cos's strides
    return (cos, sin) if cos.stride() == sin.stride() else (cos.contiguous(), sin.contiguous())


def _tile_shape(n_q_heads: int, n_k_heads: int, dim: int) -> dict[str, int]:
    # next_power_of_2(0) is 0, and a zero-sized tile does not compile: empty axes get a masked tile of 1
    block_qh, block_kh, block_half = [triton.next_power_of_2(max(n, 1)) for n in (n_q_heads, n_k_heads, dim // 2)]
    # about 16 values per thread across the q and k tiles: 8-value (16-byte) accesses on each tile at
    # ttl's 64-wide heads, where 32 threads per tile row left 4-value (8-byte) ones
    num_warps = min(8, 1 << max(0, ((block_qh + block_kh) * block_half // 512).bit_length() - 1))
    return dict(BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_HALF=block_half, num_warps=num_warps)


class RotaryFunction(torch.autograd.Function):
    """Autograd wrapper; cos/sin are constants (no gradient), as rotary tables are."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotary_launch(q, k, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return (*rotary_launch(dq, dk, cos, sin, backward=True), None, None)


class RotaryQKVFunction(torch.autograd.Function):
    """Rotary on the fused q/k/v projection, returning v as a view of it. Autograd's backward for a split
    would rotate dq and dk into new tensors and then concatenate them with dv; this one rotates them
    straight into their places in the projection's gradient and copies dv beside them, so dq and dk are
    not written and read a second time."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, kv_heads):
        ctx.split_sizes = (qkv.shape[2] - 2 * kv_heads, kv_heads, kv_heads)
        ctx.save_for_backward(cos, sin)
        q, k, v = qkv.split(ctx.split_sizes, dim=2)
        return (*rotary_launch(q, k, cos, sin), v)

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk, dv):  # unused outputs arrive as zeros (autograd materializes them)
        cos, sin = ctx.saved_tensors
        batch, seq, _, dim = dq.shape
        dqkv = torch.empty(batch, seq, sum(ctx.split_sizes), dim, dtype=dq.dtype, device=dq.device)
        dq_slot, dk_slot, dv_slot = dqkv.split(ctx.split_sizes, dim=2)
        rotary_launch(dq, dk, cos, sin, backward=True, out=(dq_slot, dk_slot))
        dv_slot.copy_(dv)
        return dqkv, None, None, None


def _check_rotary_arguments(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"apply_rotary needs q (batch, seq, heads, dim) and k (batch, seq, kv_heads, dim), "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, seq, _, dim = q.shape
    if dim % 2 or q.dtype != k.dtype:
        raise ValueError(f"apply_rotary needs an even head dim and q, k of one dtype, got dim {dim}, "
                         f"{q.dtype} and {k.dtype}")
    if cos.shape != sin.shape or cos.shape[-2:] != (seq, dim) or cos.dim() not in (2, 3):
        raise ValueError(f"apply_rotary cos/sin must be ({seq}, {dim}) or (batch, {seq}, {dim}), "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dim() == 3 and cos.shape[0] not in (1, batch):
        raise ValueError(f"apply_rotary cos/sin batch {cos.shape[0]} does not match q's batch {batch}")
    require_floating("apply_rotary", q=q, k=k, cos=cos, sin=sin)
    require_one_device("apply_rotary", q=q, k=k, cos=cos, sin=sin)


def _check_constant_angles(cos: torch.Tensor, sin: torch.Tensor) -> None:
    # the Triton path has no gradient for the angles: refuse rather than silently drop it
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("rotary's Triton kernels take cos/sin as constants, but they require grad here: detach "
                         "them, or pass backend='torch' to differentiate them")


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (batch, seq, heads, dim) and k (batch, seq, kv_heads, dim) by per-position angles given as
    cos/sin of shape (seq, dim) or (batch, seq, dim) in the `rotate_half` layout (pass the rows of the
    positions you need for offsets or packed sequences). q and k may be strided views with a contiguous
    last dim; outputs are new tensors, in q's dtype. cos/sin keep their own dtype, as in transformers' `q * cos`:
    fp32 tables with bf16/fp16 q and k (the model under autocast) compute in fp32 and round once, on both paths.
    With tables in q's dtype the reference rounds every product, as transformers does, and Triton still computes
    in fp32 and rounds once: in bf16/fp16 the two then differ by rounding. `backend` picks Triton or the
    reference (see `ttl_kernels.dispatch.use_triton`); only the reference differentiates cos/sin, and Triton
    raises ValueError when they require grad (under grad mode)."""
    _check_rotary_arguments(q, k, cos, sin)
    if not use_triton(q, backend):
        return apply_rotary_reference(q, k, cos, sin)
    _check_constant_angles(cos, sin)
    batch, seq, _, dim = q.shape
    return apply_kernel(RotaryFunction, q, k, cos.expand(batch, seq, dim), sin.expand(batch, seq, dim))


def _split_qkv(
    qkv: torch.Tensor, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    require_int("kv_heads", kv_heads)
    if qkv.dim() != 4 or not 0 < 2 * kv_heads < qkv.shape[2]:
        raise ValueError(f"qkv must be (batch, seq, heads + 2 * kv_heads, dim) with at least one query head, "
                         f"got shape {tuple(qkv.shape)} and kv_heads {kv_heads}")
    q, k, v = qkv.split((qkv.shape[2] - 2 * kv_heads, kv_heads, kv_heads), dim=2)
    _check_rotary_arguments(q, k, cos, sin)
    return q, k, v


def apply_rotary_qkv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_heads: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused projection qkv (batch, seq, heads + 2 * kv_heads, dim) into its query, key and value
    heads and rotate the first two as `apply_rotary` does; returns (q rotated, k rotated, v), v a view of
    qkv. Same values as splitting and calling `apply_rotary`, with a cheaper backward on the Triton path:
    the gradient of qkv is written in one piece (see `RotaryQKVFunction`)."""
    q, k, v = _split_qkv(qkv, kv_heads, cos, sin)
    if not use_triton(qkv, backend):
        return (*apply_rotary_reference(q, k, cos, sin), v)
    _check_constant_angles(cos, sin)
    batch, seq, _, dim = qkv.shape
    return apply_kernel(RotaryQKVFunction, qkv, cos.expand(batch, seq, dim), sin.expand(batch, seq, dim),
                        kv_heads)


def rotary_into_cache(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slots: torch.Tensor, *, backend: str = "auto",
) -> torch.Tensor:
    """For decoding with a preallocated KV cache: split the fused projection qkv (batch, seq, heads + 2 *
    kv_heads, dim), rotate its query and key heads as `apply_rotary_qkv` does, write the rotated keys and
    the values into `k_cache` and `v_cache` (batch, max_len, kv_heads, dim), strided views with a contiguous
    last dim, at sequence positions `slots` (seq,) (a device tensor, so a captured decode step can advance
    it), and return the rotated queries. The same values as `apply_rotary_qkv` followed by `index_copy_`
    into the caches; the Triton path is one launch instead of three, builds no autograd graph, skips
    (rather than raises on) a slot outside the cache, and refuses angles that require grad."""
    if k_cache.dim() != 4:
        raise ValueError(f"rotary_into_cache needs k_cache (batch, max_len, kv_heads, dim), got {tuple(k_cache.shape)}")
    kv_heads = k_cache.shape[2]
    q, _, _ = _split_qkv(qkv, kv_heads, cos, sin)
    batch, seq, q_heads, dim = q.shape
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.shape != (batch, k_cache.shape[1], kv_heads, dim) or cache.dtype != qkv.dtype or cache.stride(-1) != 1:
            raise ValueError(f"rotary_into_cache needs {name} ({batch}, max_len, {kv_heads}, {dim}) in {qkv.dtype} "
                             f"with a contiguous last dim, got {tuple(cache.shape)} {cache.dtype}")
    if slots.shape != (seq,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rotary_into_cache needs one integer cache slot per new token ({seq}), "
                         f"got {slots.dtype} slots of shape {tuple(slots.shape)}")
    require_one_device("rotary_into_cache", qkv=qkv, k_cache=k_cache, v_cache=v_cache, slots=slots)
    if not use_triton(qkv, backend) or (torch.is_grad_enabled() and qkv.requires_grad):
        q, k, v = apply_rotary_qkv(qkv, cos, sin, kv_heads, backend=backend)
        k_cache.index_copy_(1, slots.long(), k)
        v_cache.index_copy_(1, slots.long(), v)
        return q
    _check_constant_angles(cos, sin)
    qkv, slots = _last_dim_contiguous(qkv), slots.contiguous()  # the kernel indexes slots as a packed array
    cos, sin = _same_strides(*[_last_dim_contiguous(t.expand(batch, seq, dim)) for t in (cos, sin)])
    q = torch.empty(q.shape, dtype=qkv.dtype, device=qkv.device)
    if batch * seq:
        _rotary_into_cache_kernel[(batch * seq,)](
            qkv, cos, sin, q, k_cache, v_cache, slots, seq, q_heads, kv_heads, dim // 2, k_cache.shape[1],
            qkv.stride(0), qkv.stride(1), qkv.stride(2), cos.stride(0), cos.stride(1),
            q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), **_tile_shape(q_heads, kv_heads, dim),
        )
    return q
